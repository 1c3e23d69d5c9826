"""The batched stage-2 fault path shared by arm and arm64
(``kvm_arch_handle_stage2_faults_batch``): many ``user_mem_abort`` calls at once.

The hook must leave everything exactly as calling the per-fault hook on ``gfns[0]``,
``gfns[1]``, ... in turn would.  What makes that possible without a loop per page:

* A fault that maps a 4K page touches nothing but that page's entry, its TLB entry,
  its dirty bit and the counters, so such faults commute with each other; only the
  order in which they allocate missing tables is visible (table rows are numbered in
  allocation order), and :meth:`~kvmcore.pgtable.PageTable.map_pages` reproduces it.
* A fault under a valid block (a write-protected block while logging) is resolved by
  the per-fault code itself, at its place in the order; it changes only the pages of
  that block, whose later faults then see the block gone.  So the gfns are cut into
  runs at the first fault under each block: each run is resolved vectorised, each cut
  point one at a time.
* A fault that would map a block (the slot does not log and the host backing allows
  one) is where the batch stops: the prefix before it is returned and the core does
  the rest one at a time.
* In a VM with a dirty ring the entries are pushed in the order of the gfns (a run's
  pages in order, each cut point at its place), and the core hands over no more
  faults than the ring takes before its soft limit, so the soft-full exit it may
  cause can only follow the last of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from kvmcore.geometry import LAST_LEVEL
from kvmcore.pgtable import Leaves

if TYPE_CHECKING:
    from kvmcore.memslot import Memslot
    from kvmcore.vm import Vm

ResolveOne = Callable[[int], None]
"""Resolve the fault on one gfn with the per-fault code (``user_mem_abort``)."""

ResolveRun = Callable[[np.ndarray, Leaves], None]
"""Resolve faults on distinct gfns none of which is under a valid block, given their
current leaves (``kvm.pgtable.lookup``), as the per-fault code would one after another."""


def no_tlbi(gfn: int, level: int) -> None:
    """The ``tlbi`` for ``map_pages`` of unmapped pages: it replaces no valid entry, so it never
    invalidates anything; being called is a bug in the caller."""
    raise AssertionError(f"a batched fault replaced a valid entry at level {level} (gfn {gfn:#x})")


def page_sized_prefix(kvm: Vm, slot: Memslot, gfns: np.ndarray) -> int:
    """How many of ``gfns``, from the first, ``user_mem_abort`` maps at PAGE_SIZE.

    All of them while the slot logs; otherwise up to the first for which
    :func:`~arch_plugins.arm_common.huge_mapping_level` would find a block: a block
    level the host backing covers, congruent IPA and host address, and the block
    inside the memslot (``fault_supports_stage2_huge_mapping``, vectorised).
    """
    if slot.is_logging:
        return len(gfns)
    geo = kvm.geometry
    huge = np.zeros(len(gfns), bool)
    for level in geo.block_levels:
        size = geo.level_size(level)
        gpa_start = slot.base_gfn << geo.page_shift
        if size > slot.host_page_size or gpa_start & (size - 1) != slot.userspace_addr & (size - 1):
            continue   # too big for the backing, or IPA and host address not congruent
        # Congruent, so the block holding the hva lies inside the slot's host range
        # exactly when the block holding the gfn lies inside the slot.
        pages = geo.level_pages(level)
        block = gfns & ~np.int64(pages - 1)
        huge |= (block >= slot.base_gfn) & (block + pages <= slot.end_gfn)
    return int(np.argmax(huge)) if huge.any() else len(gfns)


def first_fault_under_each_block(kvm: Vm, gfns: np.ndarray, leaves: Leaves) -> np.ndarray:
    """Ascending indices of the first of ``gfns`` under each valid block leaf."""
    under = leaves.valid & (leaves.level < LAST_LEVEL)
    if not under.any():
        return np.zeros(0, np.int64)
    idx = np.flatnonzero(under)
    geo = kvm.geometry
    spans = np.left_shift(np.int64(1), geo.bits_per_level * (LAST_LEVEL - leaves.level[idx].astype(np.int64)))
    _, first = np.unique(gfns[idx] & ~(spans - 1), return_index=True)   # blocks are disjoint: base = identity
    return np.sort(idx[first])


def handle_faults_batch(kvm: Vm, slot: Memslot, gfns: np.ndarray, resolve_one: ResolveOne,
                        resolve_run: ResolveRun) -> int:
    """Resolve the page-sized prefix of ``gfns`` in order: runs vectorised by
    ``resolve_run``, the first fault under each block by ``resolve_one``.  Returns
    the length of the prefix (0: the core takes the first fault one at a time)."""
    gfns = np.asarray(gfns, np.int64)
    n = page_sized_prefix(kvm, slot, gfns)
    if not n:
        return 0
    gfns = gfns[:n]
    leaves = kvm.pgtable.lookup(gfns)
    cuts = first_fault_under_each_block(kvm, gfns, leaves)
    if not len(cuts):
        resolve_run(gfns, leaves)
        return n
    pos = 0
    for cut in cuts.tolist() + [n]:
        if cut > pos:
            run = gfns[pos:cut]
            # Before the first cut nothing has changed; after one, its block has gone.
            resolve_run(run, leaves.take(slice(0, cut)) if pos == 0 else kvm.pgtable.lookup(run))
        if cut < n:
            resolve_one(int(gfns[cut]))
        pos = cut + 1
    return n
