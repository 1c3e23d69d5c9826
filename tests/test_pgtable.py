"""The generic page-table engine: geometry arithmetic, the walker, vectorised twins."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvmcore.geometry import LAST_LEVEL, Geometry
from kvmcore.pgtable import (NO_LEVEL, PTE_D, PTE_VALID, PTE_W, WALK_LEAF, WALK_TABLE_POST, WALK_TABLE_PRE,
                             PageTable)

# (granule shift, IPA bits) -> (levels, concatenated start-level tables): kernel-dirty-log.md §3.1,
# derived from stage2_pgtable_levels() and kvm_pgd_pages().
ARM64_TABLE = {
    (12, 32): (2, 4), (12, 36): (3, 1), (12, 40): (3, 2), (12, 42): (3, 8), (12, 43): (3, 16),
    (12, 44): (4, 1), (12, 48): (4, 1), (14, 36): (2, 1), (14, 40): (2, 16), (14, 42): (3, 1),
    (14, 48): (3, 2), (16, 40): (2, 1), (16, 44): (2, 4), (16, 46): (2, 16), (16, 48): (3, 1),
    (16, 52): (3, 1),
}


@pytest.mark.parametrize(("shift", "ipa"), sorted(ARM64_TABLE))
def test_geometry_matches_the_kernels_arithmetic(shift, ipa):
    levels = max(2, (ipa - 8) // (shift - 3))
    g = Geometry(page_shift=shift, ipa_bits=ipa, start_level=LAST_LEVEL + 1 - levels)
    assert (g.levels, g.concatenated_tables) == ARM64_TABLE[shift, ipa]
    assert g.level_shift(LAST_LEVEL) == shift
    assert g.entries(g.start_level) << g.level_shift(g.start_level) == 1 << ipa


def test_geometry_refuses_impossible_shapes():
    with pytest.raises(ValueError):
        Geometry(page_shift=12, ipa_bits=48, start_level=1)   # would need 512 tables
    with pytest.raises(ValueError):
        Geometry(page_shift=12, ipa_bits=40, start_level=1, block_levels={3})


def test_addr_end_clamps_like_pxd_addr_end():
    g = Geometry(page_shift=12, ipa_bits=40, start_level=1, block_levels={1, 2})
    assert g.addr_end((1 << 30) - 4096, 1 << 31, 1) == 1 << 30
    assert g.addr_end((2 << 20) - 4096, (2 << 20) + 4096, 2) == 2 << 20
    assert g.addr_end(0, 4096, 2) == 4096
    assert g.addr_end((1 << 40) - 4096, 1 << 40, 1) == 1 << 40


def geometry():
    return Geometry(page_shift=12, ipa_bits=40, start_level=1, block_levels={1, 2})


def test_map_breaks_a_block_with_break_before_make():
    pt = PageTable(geometry())
    tlbis = []
    pt.map(512, 2, PTE_W | PTE_D, tlbi=lambda g, lv: tlbis.append((g, lv)))
    assert pt.leaf(700).level == 2 and tlbis == []
    pt.map(700, LAST_LEVEL, PTE_W | PTE_D, tlbi=lambda g, lv: tlbis.append((g, lv)))
    assert tlbis == [(512, 2)]
    assert pt.leaf(700).level == LAST_LEVEL
    assert pt.leaf(701).level == NO_LEVEL, "the rest of the block faults back in lazily"


def test_split_keeps_permissions_and_counts():
    stats = {}
    pt = PageTable(geometry(), stats=stats)
    pt.map(0, 1, PTE_D, tlbi=lambda g, lv: None)
    assert pt.split(5, tlbi=lambda g, lv: None) == 1
    assert stats["huge_pages_split"] == 1
    leaves = pt.lookup(np.arange(0, 1 << 18, 4099))
    assert (leaves.level == LAST_LEVEL).all() and not leaves.writable.any() and leaves.dirty.all()
    assert pt.nr_tables == 2 + 1 + 512


def test_unmap_range_frees_what_lies_inside():
    pt = PageTable(geometry())
    for gfn in range(0, 2048, 7):
        pt.map(gfn, LAST_LEVEL, PTE_W, tlbi=lambda g, lv: None)
    pt.unmap_range(0, 2048)
    assert pt.nr_tables == 2
    assert not pt.lookup(np.arange(2048)).valid.any()


def test_walker_visits_each_entry_once_with_clamped_steps():
    pt = PageTable(geometry())
    pt.map(511, LAST_LEVEL, PTE_W, tlbi=lambda g, lv: None)
    pt.map(512, 2, PTE_W, tlbi=lambda g, lv: None)
    seen = []
    pt.walk(511 * 4096, 1025 * 4096, lambda ctx: seen.append((ctx.flag, ctx.level, ctx.addr)),
            WALK_LEAF | WALK_TABLE_PRE | WALK_TABLE_POST)
    leaves = [(lv, a >> 12) for f, lv, a in seen if f == WALK_LEAF]
    assert leaves == [(3, 511), (2, 512), (2, 1024)]
    assert [f for f, lv, a in seen if lv == 1] == [WALK_TABLE_PRE, WALK_TABLE_POST]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1 << 20), st.sampled_from([1, 2, 3]), st.booleans()), max_size=30),
       st.lists(st.integers(0, (1 << 20) + 600), max_size=50))
def test_vectorised_lookup_and_scalar_walk_agree(maps, probes):
    pt = PageTable(geometry())
    for gfn, level, w in maps:
        pt.map(gfn, level, PTE_D | (PTE_W if w else 0), tlbi=lambda g, lv: None)
    leaves = pt.lookup(np.array(probes, np.int64))
    for i, gfn in enumerate(probes):
        leaf = pt.leaf(gfn)
        assert (leaf.level, leaf.pte) == (int(leaves.level[i]), int(leaves.pte[i]))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1 << 19), st.sampled_from([1, 2, 3])), max_size=20),
       st.lists(st.tuples(st.integers(0, 1 << 19), st.integers(1, 64)), min_size=1, max_size=10))
def test_range_write_protect_three_ways_agree(maps, ranges):
    """The walker with a visitor, the table scan and the many-ranges form protect the same leaves."""
    tables = [PageTable(geometry()) for _ in range(3)]
    for pt in tables:
        for gfn, level in maps:
            pt.map(gfn, level, PTE_W | PTE_D, tlbi=lambda g, lv: None)

    def visit(ctx):
        return ctx.pte & ~PTE_W if ctx.pte & (PTE_VALID | PTE_W) == PTE_VALID | PTE_W else None

    for start, n in ranges:
        tables[0].walk(start << 12, (start + n) << 12, visit)
        tables[1].wrprotect_range(start, start + n)
    tables[2].clear_bits_ranges(np.array([s for s, n in ranges]), np.array([s + n for s, n in ranges]), PTE_W)
    leaves = [pt.mapped_leaves() for pt in tables]
    for other in leaves[1:]:
        order0, order1 = np.lexsort(leaves[0][:2]), np.lexsort(other[:2])
        for a, b in zip(leaves[0], other):
            assert (a[order0] == b[order1]).all()


def test_restriction_is_reported_for_permission_loss_only():
    events = []
    pt = PageTable(geometry(), on_restrict=lambda a, b: events.extend(zip(np.atleast_1d(a).tolist(),
                                                                            np.atleast_1d(b).tolist())))
    pt.map(10, LAST_LEVEL, PTE_D, tlbi=lambda g, lv: None)
    leaf = pt.leaf(10)
    pt.set_entry(leaf.li, leaf.row, leaf.idx, leaf.pte | PTE_W)
    assert events == []
    pt.wrprotect_range(0, 64)
    assert events == [(10, 11)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, (1 << 64) - 1), min_size=1, max_size=20))
def test_ffs_fls_and_spans_match_the_scalar_definitions(words):
    from kvmcore.bitops import ffs_fls, spans

    first, last1 = ffs_fls(np.array(words, np.uint64))
    filled = spans(np.array(words, np.uint64))
    for w, f, l1, span in zip(words, first.tolist(), last1.tolist(), filled.tolist()):
        assert (f, l1) == ((w & -w).bit_length() - 1, w.bit_length())
        assert span == sum(1 << b for b in range(f, l1))
    narrow = [w & 0xFFFFFFFF for w in words]            # 32-bit arm words, in their own dtype
    filled = spans(np.array(narrow, np.uint32))
    assert filled.dtype == np.uint32
    assert filled.tolist() == [sum(1 << b for b in range((w & -w).bit_length() - 1, w.bit_length())) if w else 0
                               for w in narrow]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, (1 << 64) - 1) | st.integers(0, 63).map(lambda b: 1 << b), max_size=20),
       st.sampled_from([np.uint64, np.uint32]))
def test_bit_positions_lists_every_set_bit_in_order(words, dtype):
    from kvmcore.bitops import bit_positions

    width = np.dtype(dtype).itemsize * 8
    words = [x & ((1 << width) - 1) for x in words]
    w, b = bit_positions(np.array(words, dtype))
    assert list(zip(w.tolist(), b.tolist())) == [(i, j) for i, x in enumerate(words) for j in range(width) if x >> j & 1]
    single = [x for x in words if x and not x & (x - 1)]   # the one-bit-per-word shortcut
    w, b = bit_positions(np.array(single, dtype))
    assert b.tolist() == [x.bit_length() - 1 for x in single] and w.tolist() == list(range(len(single)))


def _reported_pages(events):
    return {g for a, b in events for g in range(a, b)}


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1 << 12), st.sampled_from([2, 3]), st.integers(1, 300)), max_size=8),
       st.lists(st.tuples(st.integers(0, (1 << 12) // 32), st.integers(0, 31), st.integers(1, (1 << 64) - 1)),
                min_size=1, max_size=12),
       st.sampled_from([np.uint64, np.uint32]),
       st.sampled_from([PTE_W, PTE_D, PTE_W | PTE_D]),
       st.sampled_from([(None, LAST_LEVEL), (LAST_LEVEL, LAST_LEVEL)]))
@example(maps=[(0, 3, 1)], words=[(0, 0, 1), (0, 0, 1)], dtype=np.uint64, bits=PTE_W,
         levels=(None, LAST_LEVEL))                         # a word twice, sparse (a ring reset)
@example(maps=[(0, 3, 64)], words=[(0, 0, (1 << 40) - 1), (0, 0, 1 << 50)], dtype=np.uint64, bits=PTE_W,
         levels=(LAST_LEVEL, LAST_LEVEL))                   # a word twice, dense
def test_masked_clear_matches_clearing_each_set_bit_alone(maps, words, dtype, bits, levels):
    """clear_bits_masked, whichever of its paths a word takes (whole runs of a table
    row, bit positions, the general lookup), leaves the tables, counts, statistics
    and reports that clearing the set bits one at a time does."""
    stats, events = [{}, {}], [[], []]
    tables = [PageTable(geometry(), stats=stats[k], on_restrict=lambda a, b, k=k: events[k].extend(
        zip(np.atleast_1d(a).tolist(), np.atleast_1d(b).tolist()))) for k in range(2)]
    for pt in tables:
        for gfn, level, n in maps:   # a block, or a run of n pages (dense words)
            for g in ([gfn * 512] if level == 2 else range(gfn * 32, gfn * 32 + n)):
                pt.map(g, level, PTE_W | PTE_D, tlbi=lambda g, lv: None)
        pt.stats.clear()
    width = np.dtype(dtype).itemsize * 8
    firsts = np.array([w * width + skew * (skew % 3 == 0) for w, skew, _ in words], np.int64)  # some unaligned
    masks = np.array([m & ((1 << width) - 1) or 1 for _, _, m in words], dtype)
    lo, hi = levels
    got = tables[0].clear_bits_masked(firsts, masks, bits, min_level=lo, max_level=hi)
    want = 0
    for first, mask in zip(firsts.tolist(), masks.tolist()):
        for b in range(width):
            if mask >> b & 1:
                want += tables[1].clear_bits(np.array([first + b]), bits, min_level=lo, max_level=hi)
    assert got == want
    assert {k: v for k, v in stats[0].items() if v} == {k: v for k, v in stats[1].items() if v}
    assert _reported_pages(events[0]) == _reported_pages(events[1])
    a, b = tables[0].mapped_leaves(), tables[1].mapped_leaves()
    for x, y in zip(a, b):
        assert (x[np.lexsort(a[:2])] == y[np.lexsort(b[:2])]).all()
