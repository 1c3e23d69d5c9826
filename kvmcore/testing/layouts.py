"""Random memslot layouts and page choices that put the walks on their edges.

Slots straddle an alignment boundary (a bitmap word, a block of each block level, or
4 GiB, where 32-bit arithmetic wraps), start unaligned, have page counts that are not
multiples of 64, and sometimes span whole blocks so that memory can be mapped huge
before logging starts.  Page choices favour the first and last page, word edges and
block edges.  Hypothesis shrinks toward low addresses and the first alternative.
"""

from __future__ import annotations

import attrs
from hypothesis import assume
from hypothesis import strategies as st

from kvmcore.geometry import Geometry

HOST_PAGE_SIZES = (4096, 2 << 20, 1 << 30)
MAX_BLOCK_PAGES = 1 << 18  # a slot spans whole blocks only up to 1 GiB of 4K pages
MAX_SLOTS = 3


@attrs.frozen
class SlotLayout:
    """Where one memslot lives.  ``region`` is the gfn range it may move within, so
    that slots never overlap; ``anchor`` is the boundary it was placed across."""

    slot: int
    base_gfn: int
    npages: int
    host_page_size: int
    region: tuple[int, int]
    anchor: int


def alignments(geo: Geometry) -> list[int]:
    """Boundaries worth straddling, in pages: a bitmap word, each block level, 4 GiB."""
    aligns = [64] + [geo.level_pages(lv) for lv in sorted(geo.block_levels, reverse=True)]
    four_gib = (1 << 32) >> geo.page_shift
    if four_gib < geo.max_gfn:
        aligns.append(four_gib)
    return list(dict.fromkeys(aligns))


@st.composite
def placement(draw, geo: Geometry, region: tuple[int, int], npages: int | None = None) -> tuple[int, int, int]:
    """``(base_gfn, npages, anchor)`` of a slot across a boundary inside ``region``."""
    lo, hi = region
    blocks = [geo.level_pages(lv) for lv in sorted(geo.block_levels) if geo.level_pages(lv) <= MAX_BLOCK_PAGES]
    if npages is None and blocks and draw(st.booleans(), label="spans whole blocks"):
        # aligned blocks inside the slot, so that memory can be mapped huge before logging
        align = draw(st.sampled_from(blocks), label="block pages")
        head = draw(st.one_of(st.just(0), st.integers(0, 70)), label="pages before the first block")
        nblocks = draw(st.integers(1, 2), label="blocks")
        npages = head + align * nblocks + draw(st.integers(0, 70), label="tail")
        before = head + align * draw(st.integers(0, nblocks - 1), label="blocks before the boundary")
    else:
        align = draw(st.sampled_from(alignments(geo)), label="boundary")
        if npages is None:
            npages = draw(st.integers(1, 300), label="npages")
        before = draw(st.integers(0, npages), label="pages before the boundary")
    kmin, kmax = -(-(lo + before) // align), (hi - npages + before) // align
    assume(kmin <= kmax)
    anchor = draw(st.integers(kmin, kmax), label="boundary index") * align
    base = anchor - before
    assume(lo <= base and base + npages <= hi)
    return base, npages, anchor


@st.composite
def vm_layouts(draw, geo: Geometry) -> list[SlotLayout]:
    """One to three slots, slot ``i`` in the ``i``-th third of the IPA space (so that
    dropping a slot while shrinking leaves the others where they were)."""
    n = draw(st.integers(1, MAX_SLOTS), label="slots")
    share = geo.max_gfn // MAX_SLOTS
    out = []
    for i in range(n):
        region = (i * share, geo.max_gfn if i == MAX_SLOTS - 1 else (i + 1) * share)
        base, npages, anchor = draw(placement(geo, region))
        hps = draw(st.sampled_from(HOST_PAGE_SIZES), label="host_page_size")
        out.append(SlotLayout(i, base, npages, hps, region, anchor))
    return out


def interesting_offsets(base_gfn: int, npages: int, anchor: int, geo: Geometry) -> list[int]:
    """Page offsets on the edges: first, last, around the anchor, bitmap words and blocks."""
    bpl = geo.bits_per_long
    cand = {0, npages - 1, anchor - base_gfn - 1, anchor - base_gfn, bpl - 1, bpl, 2 * bpl - 1,
            npages - 1 - (npages - 1) % bpl}
    cand.update(k * bpl + d for k in range(1, 9) for d in (-1, 0))
    for align in alignments(geo):
        edge = -(-(base_gfn + 1) // align) * align - base_gfn
        cand.update({edge - 1, edge})
    return sorted(off for off in cand if 0 <= off < npages)


def page_offsets(base_gfn: int, npages: int, anchor: int, geo: Geometry,
                 touched: list[int] = ()) -> st.SearchStrategy[int]:
    """A page of the slot: one touched before (a second store through a stale TLB entry
    is how a missing flush loses a page), one on an edge, or any."""
    choices = [st.sampled_from(sorted(set(touched)))] if touched else []
    return st.one_of(*choices, st.sampled_from(interesting_offsets(base_gfn, npages, anchor, geo)),
                     st.integers(0, npages - 1))


def masks(bits_per_long: int) -> st.SearchStrategy[int]:
    """Non-zero bitmap words, favouring the top bit, both ends, and full words."""
    top = 1 << (bits_per_long - 1)
    full = (1 << bits_per_long) - 1
    return st.one_of(st.sampled_from([top, top | 1, full, 1, 3 << (bits_per_long // 2 - 1)]),
                     st.integers(1, full))
