"""The x86 MMU with EPT, as far as dirty logging sees it (``arch/x86/kvm/mmu/``).

Every function names the kernel function it mirrors.  The model is KVM 6.12 with EPT
A/D bits: the TDP MMU by default (``tdp_mmu=False`` selects the legacy direct MMU,
which zaps where the TDP MMU splits).  SPTEs are kvmcore page-table leaves:

* ``PTE_W`` is the hardware writable bit, ``PTE_D`` the EPT dirty bit;
* ``MMU_WRITABLE`` (``shadow_mmu_writable_mask``) says KVM *may* make the SPTE
  writable: dirty logging clears only ``PTE_W`` and keeps it, so the fast page-fault
  path can restore W without the MMU lock, and marks the page dirty when it does;
* ``HOST_WRITABLE`` (``shadow_host_writable_mask``) says the host mapping was
  writable when the SPTE was made.

The reverse map (``gfn_to_rmap``) is derived from the page table: guest memory is
mapped directly, so the rmap of ``gfn`` at a level is the leaf at that level which
maps it, if there is one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from arch_plugins.x86.config import HUGE_LEVELS, PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K, state
from kvmcore.bitops import ffs_fls
from kvmcore.hostmem import lazy_zeros
from kvmcore.memslot import MemslotChange
from kvmcore.pgtable import PTE_ADDR_SHIFT, PTE_D, PTE_SW0, PTE_VALID, PTE_W, unique

if TYPE_CHECKING:
    from kvmcore.memslot import Memslot
    from kvmcore.vcpu import Vcpu
    from kvmcore.vm import Vm

MMU_WRITABLE = PTE_SW0         # EPT_SPTE_MMU_WRITABLE
HOST_WRITABLE = PTE_SW0 << 1   # EPT_SPTE_HOST_WRITABLE
SPTE_BITS = PTE_VALID | PTE_W | PTE_D | MMU_WRITABLE | HOST_WRITABLE
PMD_PAGES = 512                # PMD_SIZE >> PAGE_SHIFT: "Cross two large pages?" is always about 2 MiB

_HOST_LEVEL = {4096: PG_LEVEL_4K, 2 << 20: PG_LEVEL_2M, 1 << 30: PG_LEVEL_1G}


def _no_tlbi(gfn: int, level: int) -> None:
    """The TDP MMU splits and recovers huge pages without a TLB flush: the new SPTEs
    map the same memory with the same permissions (``tdp_mmu_split_huge_page``)."""


def ffs(mask: int) -> int:
    """``__ffs``: index of the lowest set bit."""
    return (mask & -mask).bit_length() - 1


def fls(mask: int) -> int:
    """``__fls``: index of the highest set bit."""
    return mask.bit_length() - 1


# -- TLB -----------------------------------------------------------------------------------

def flush_remote_tlbs_gfn(kvm: Vm, gfn: int, level: int) -> None:
    """``kvm_flush_remote_tlbs_gfn``: a range flush of one SPTE's span, which without a
    Hyper-V range flush is a full flush (the core falls back when the range hook says no)."""
    pages = kvm.geometry.level_pages(level)
    kvm.flush_remote_tlbs_range(gfn & ~(pages - 1), pages)


# -- the host side -------------------------------------------------------------------------

def _host_flags(kvm: Vm, slot: Memslot) -> np.ndarray:
    st = state(kvm)
    flags = st.host_writable.get(slot.userspace_addr)
    if flags is None:
        per = slot.host_page_size >> kvm.page_shift
        flags = st.host_writable[slot.userspace_addr] = lazy_zeros(-(-slot.npages // per) + 1, np.uint8)
    return flags


def faultin_map_writable(kvm: Vm, slot: Memslot, gfn: int, write: bool) -> bool:
    """``kvm_faultin_pfn`` → ``hva_to_pfn``'s ``map_writable``: may KVM map this gfn writable?

    A write fault gets the host page with FOLL_WRITE, so it is writable from then on.  A
    read fault gets it writable only if the host page already is: an untouched
    anonymous page is the shared zero page (read-only); one the guest wrote through
    KVM, or one that holds data (a host write the model cannot otherwise see), is
    writable.  Read-only slots never are.
    """
    if slot.readonly:
        return False
    flags = _host_flags(kvm, slot)
    per = slot.host_page_size >> kvm.page_shift
    ufn = slot.userspace_addr >> kvm.page_shift
    i = (ufn + gfn - slot.base_gfn) // per - ufn // per
    if write or flags[i]:
        flags[i] = 1
        return True
    off = (gfn - slot.base_gfn) << kvm.page_shift
    if slot.memory[off:off + kvm.page_size].any():
        flags[i] = 1
        return True
    return False


def forget_host_memory(kvm: Vm, slot: Memslot) -> None:
    """The slot's host memory is gone (the VMM unmaps it after a delete)."""
    state(kvm).host_writable.pop(slot.userspace_addr, None)


# -- huge-page rules -----------------------------------------------------------------------

def host_mapping_level(slot: Memslot) -> int:
    """``host_pfn_mapping_level``: how the host maps the memory (4K, THP 2M, hugetlb 1G)."""
    return _HOST_LEVEL[slot.host_page_size]


def lpage_allowed(kvm: Vm, slot: Memslot, gfn: int, level: int) -> bool:
    """``!lpage_info_slot(gfn, slot, level)->disallow_lpage`` as ``kvm_alloc_memslot_metadata``
    sets it: the huge page must lie inside the slot (head and tail are disallowed) and
    the slot's gpa and hva must be congruent modulo the huge-page size."""
    pages = kvm.geometry.level_pages(level)
    base = gfn & ~(pages - 1)
    ugfn = slot.userspace_addr >> kvm.page_shift
    return base >= slot.base_gfn and base + pages <= slot.end_gfn and not (slot.base_gfn ^ ugfn) & (pages - 1)


def kvm_mmu_max_mapping_level(kvm: Vm, slot: Memslot, gfn: int) -> int:
    """``__kvm_mmu_max_mapping_level``: the largest level lpage_info allows (up to 1G),
    capped by the host mapping level.  Levels are kvmcore's: smaller is larger."""
    for level in HUGE_LEVELS:
        if lpage_allowed(kvm, slot, gfn, level):
            return max(level, host_mapping_level(slot))
    return PG_LEVEL_4K


def max_mapping_levels(kvm: Vm, slot: Memslot, gfns: np.ndarray) -> np.ndarray:
    """:func:`kvm_mmu_max_mapping_level` for many gfns (vectorised)."""
    gfns = np.asarray(gfns, np.int64)
    ugfn = slot.userspace_addr >> kvm.page_shift
    out = np.full(len(gfns), PG_LEVEL_4K, np.int16)
    for level in reversed(HUGE_LEVELS):  # 2M, then 1G overrides where it is allowed too
        pages = kvm.geometry.level_pages(level)
        base = gfns & ~(pages - 1)
        ok = (base >= slot.base_gfn) & (base + pages <= slot.end_gfn)
        if not (slot.base_gfn ^ ugfn) & (pages - 1):
            out[ok] = level
    return np.maximum(out, host_mapping_level(slot))


def kvm_mmu_hugepage_adjust(kvm: Vm, slot: Memslot, gfn: int) -> int:
    """``kvm_mmu_hugepage_adjust``: the goal level of a fault; 4K whenever the slot logs
    (``kvm_slot_dirty_track_enabled``), else the max mapping level."""
    if slot.dirty_track_enabled:
        return PG_LEVEL_4K
    return kvm_mmu_max_mapping_level(kvm, slot, gfn)


def huge_leaves_in(kvm: Vm, start: int, end: int) -> np.ndarray:
    """First gfns of the huge leaves overlapping ``[start, end)``, ascending: every
    aligned 2M/1G leaf overlapping the range holds one probe at a 2 MiB stride."""
    if start >= end:
        return np.zeros(0, np.int64)
    stride = kvm.geometry.level_pages(PG_LEVEL_2M)
    probes = np.arange(start & ~(stride - 1), end, stride, dtype=np.int64)
    probes[0] = start
    leaves = kvm.pgtable.lookup(probes)
    huge = leaves.valid & (leaves.level < PG_LEVEL_4K)
    if not huge.any():
        return np.zeros(0, np.int64)
    lv = leaves.level[huge].astype(np.int64)
    pages = np.left_shift(1, kvm.geometry.bits_per_level * (PG_LEVEL_4K - lv))
    return unique(probes[huge] & ~(pages - 1))


# -- building SPTEs and handling faults ----------------------------------------------------

def make_spte(kvm: Vm, vcpu: Vcpu | None, slot: Memslot, gfn: int, level: int, host_writable: bool) -> int:
    """``make_spte``: a writable SPTE is W, MMU-writable and **D pre-set** (PML or not),
    and installing one in a slot that tracks dirty pages marks the page dirty *now*
    (``mark_page_dirty_in_slot``), whether the fault was a write or a read."""
    if not host_writable:
        return 0
    if slot.dirty_track_enabled:
        # WARN_ON_ONCE(level > PG_LEVEL_4K): kvm_mmu_hugepage_adjust enforces it.
        assert level == PG_LEVEL_4K, "a writable huge SPTE in a slot that logs"
        kvm.mark_page_dirty_in_slot(slot, gfn, vcpu)
    return HOST_WRITABLE | PTE_W | MMU_WRITABLE | PTE_D


def kvm_tdp_page_fault(kvm: Vm, vcpu: Vcpu, slot: Memslot, gfn: int, write: bool) -> None:
    """``kvm_tdp_page_fault`` → ``direct_page_fault``: the fast path first, then fault the
    pfn in, pick the level and map (TDP MMU or legacy ``direct_map``)."""
    if fast_page_fault(kvm, vcpu, slot, gfn, write):
        return
    map_writable = faultin_map_writable(kvm, slot, gfn, write)
    goal = kvm_mmu_hugepage_adjust(kvm, slot, gfn)
    if state(kvm).tdp_mmu:
        kvm_tdp_mmu_map(kvm, vcpu, slot, gfn, goal, map_writable)
    else:
        direct_map(kvm, vcpu, slot, gfn, goal, map_writable)


def fast_page_fault(kvm: Vm, vcpu: Vcpu, slot: Memslot, gfn: int, write: bool) -> bool:
    """``fast_page_fault`` + ``fast_pf_fix_direct_spte``: a write to a present SPTE that
    is MMU-writable gets W back without the MMU lock, and the page is marked dirty.

    Never on a huge SPTE while the slot logs ("Do not fix write-permission on the large
    spte when dirty logging is enabled"): marking one gfn dirty would hide the writes
    to the others (classic bug #8).  D is not set here, so with PML the write may be
    logged once more (harmless).  Returns True if the fault is resolved.
    """
    pt = kvm.pgtable
    leaf = pt.leaf(gfn)
    if not leaf.valid:
        return False  # page_fault_can_be_fast: not-present faults are slow with A/D bits
    if not write or leaf.pte & PTE_W:
        kvm.stats["spurious_page_faults"] += 1  # is_access_allowed: another vCPU fixed it
        return True
    if not leaf.pte & MMU_WRITABLE:
        return False
    bugs = state(kvm).bugs
    if leaf.level != PG_LEVEL_4K and slot.dirty_track_enabled and "fix_w_on_large_spte" not in bugs:
        return False
    pt.set_entry(leaf.li, leaf.row, leaf.idx, leaf.pte | PTE_W)
    if "fast_path_no_dirty" not in bugs:
        kvm.mark_page_dirty_in_slot(slot, gfn, vcpu)
    kvm.stats["fast_page_faults"] += 1
    return True


def kvm_tdp_page_faults_batch(kvm: Vm, vcpu: Vcpu, slot: Memslot, gfns: np.ndarray, write: bool) -> int:
    """:func:`kvm_tdp_page_fault` for a run of faults on distinct gfns, in order, as long
    as each touches nothing but its own 4K SPTE; returns how many it resolved.

    Such a fault leaves every other gfn's SPTE as it was, so one lookup classifies the
    run: fast-path fixes (W set on a 4K SPTE) are applied together; spurious faults are
    counted; a 4K SPTE to install or rebuild goes through the per-fault path.  The run
    stops before a fault that would map, split or zap a huge page.
    """
    pt = kvm.pgtable
    gfns = np.asarray(gfns, np.int64)
    leaves = pt.lookup(gfns)
    ptes, valid, small = leaves.pte, leaves.valid, leaves.level == PG_LEVEL_4K
    if write:
        spurious = valid & ((ptes & np.uint64(PTE_W)) != 0)
        fixable = valid & small & ((ptes & np.uint64(PTE_W | MMU_WRITABLE)) == MMU_WRITABLE)
    else:
        spurious, fixable = valid, np.zeros(len(gfns), bool)
    goal_4k = np.full(len(gfns), True) if slot.dirty_track_enabled else \
        max_mapping_levels(kvm, slot, gfns) == PG_LEVEL_4K
    own_page = (valid & small) | (~valid & goal_4k)
    ok = spurious | fixable | own_page
    if state(kvm).pml:
        # The fast path leaves D clear, so under PML the retried store sets D and logs
        # before the next fault exits: one at a time keeps that order.
        ok &= ~fixable
    done = len(ok) if ok.all() else int(np.argmin(ok))
    if kvm.dirty_ring_size and done and "ring_mixed_batch" not in state(kvm).bugs:
        # Fixes are marked together, installs one by one: with a ring, whose entries
        # keep the order, a run is all fixes or all installs (spurious faults push none).
        pushes = fixable[:done] | ~spurious[:done]
        kinds = fixable[:done][pushes]
        if len(kinds) and not (kinds == kinds[0]).all():
            done = int(np.flatnonzero(pushes)[np.argmax(kinds != kinds[0])])
    fix = fixable[:done]
    if fix.any():
        pt.set_bits(gfns[:done][fix], PTE_W)
        if "fast_path_no_dirty" not in state(kvm).bugs:
            kvm.mark_pages_dirty_in_slot(slot, gfns[:done][fix], vcpu)
        kvm.stats["fast_page_faults"] += int(fix.sum())
    kvm.stats["spurious_page_faults"] += int(spurious[:done].sum())
    slow = ~(fix | spurious[:done])
    if write and not slot.readonly and slow.any() and not valid[:done][slow].any():
        _install_written_pages(kvm, vcpu, slot, gfns[:done][slow])
    else:
        for gfn in gfns[:done][slow].tolist():
            kvm_tdp_page_fault(kvm, vcpu, slot, gfn, write)
    return done


def _install_written_pages(kvm: Vm, vcpu: Vcpu, slot: Memslot, gfns: np.ndarray) -> None:
    """:func:`kvm_tdp_page_fault` for write faults on distinct gfns no SPTE maps, each
    mapped at 4K (the slot logs, or its huge pages were ruled out): the host pages
    become writable (``faultin_map_writable``), each SPTE is :func:`make_spte`'s
    writable one, marked dirty in order, and the tables are allocated as one fault
    after another would (``map_pages``)."""
    flags = _host_flags(kvm, slot)
    per = slot.host_page_size >> kvm.page_shift
    ufn = slot.userspace_addr >> kvm.page_shift
    flags[(ufn + gfns - slot.base_gfn) // per - ufn // per] = 1
    if slot.dirty_track_enabled:
        kvm.mark_pages_dirty_in_slot(slot, gfns, vcpu)
    kvm.pgtable.map_pages(gfns, HOST_WRITABLE | PTE_W | MMU_WRITABLE | PTE_D,
                          tlbi=lambda g, lv: flush_remote_tlbs_gfn(kvm, g, lv))


def _install(kvm: Vm, gfn: int, goal: int, spte: int) -> None:
    """Set the SPTE at the goal level.  An existing leaf there is overwritten in place
    (same pfn, no flush); a huge leaf above it (legacy MMU) or a table at it is zapped
    and the TLB flushed (``drop_large_spte`` / "replacing a non-leaf SPTE")."""
    pt = kvm.pgtable
    leaf = pt.leaf(gfn)
    if leaf.valid and leaf.level == goal:
        new = (leaf.pte & ~((1 << PTE_ADDR_SHIFT) - 1)) | spte | PTE_VALID
        if new != leaf.pte:
            pt.set_entry(leaf.li, leaf.row, leaf.idx, new)
        else:
            kvm.stats["spurious_page_faults"] += 1
        return
    pt.map(gfn, goal, spte, tlbi=lambda g, lv: flush_remote_tlbs_gfn(kvm, g, lv))


def kvm_tdp_mmu_map(kvm: Vm, vcpu: Vcpu, slot: Memslot, gfn: int, goal: int, map_writable: bool) -> None:
    """``kvm_tdp_mmu_map``: walk down to the goal level, splitting any huge SPTE on the
    way one level at a time (``tdp_mmu_split_huge_page``: the children inherit its
    permissions, no flush), then install the SPTE (``tdp_mmu_map_handle_target_level``)."""
    pt = kvm.pgtable
    leaf = pt.leaf(gfn)
    while leaf.valid and leaf.level < goal:
        pt.split(gfn, _no_tlbi, to_level=leaf.level + 1)
        leaf = pt.leaf(gfn)
    _install(kvm, gfn, goal, make_spte(kvm, vcpu, slot, gfn, goal, map_writable))


def direct_map(kvm: Vm, vcpu: Vcpu, slot: Memslot, gfn: int, goal: int, map_writable: bool) -> None:
    """``direct_map`` (legacy MMU): a huge SPTE above the goal level is zapped and the TLB
    flushed (``link_shadow_page`` → ``drop_large_spte``); the rest of it faults back in."""
    _install(kvm, gfn, goal, make_spte(kvm, vcpu, slot, gfn, goal, map_writable))


# -- eager splitting -----------------------------------------------------------------------

def _split_huge_page(kvm: Vm, gfn: int, start: int, end: int) -> None:
    """``tdp_mmu_split_huge_pages_root`` for the huge leaf holding ``gfn``: split it one
    level, then (pre-order) the children that overlap ``[start, end)``, down to 4K."""
    pt = kvm.pgtable
    leaf = pt.leaf(gfn)
    if not leaf.valid or leaf.level == PG_LEVEL_4K:
        return
    pt.split(gfn, _no_tlbi, to_level=leaf.level + 1)
    child = leaf.level + 1
    if child == PG_LEVEL_4K:
        return
    pages = kvm.geometry.level_pages(child)
    lo, hi = max(start, leaf.base_gfn), min(end, leaf.base_gfn + leaf.pages)
    for g in range(lo & ~(pages - 1), hi, pages):
        _split_huge_page(kvm, g, start, end)


def kvm_mmu_try_split_huge_pages(kvm: Vm, slot: Memslot, start: int, end: int) -> None:
    """``kvm_mmu_try_split_huge_pages(kvm, slot, start, end, PG_LEVEL_4K)``: split every
    huge page overlapping ``[start, end)`` down to 4K; TDP MMU only; no flush."""
    if not state(kvm).tdp_mmu:
        return
    for g in huge_leaves_in(kvm, start, end).tolist():
        _split_huge_page(kvm, g, start, end)


def kvm_mmu_slot_try_split_huge_pages(kvm: Vm, slot: Memslot) -> None:
    """``kvm_mmu_slot_try_split_huge_pages``: eager splitting of a whole slot."""
    kvm_mmu_try_split_huge_pages(kvm, slot, slot.base_gfn, slot.end_gfn)


# -- write protection and D-bit clearing ---------------------------------------------------

def rmap_clear_4k(kvm: Vm, gfn: int, bit: int) -> None:
    """``rmap_write_protect(gfn_to_rmap(gfn, PG_LEVEL_4K), false)`` (``bit`` = W: clear
    only the hardware W, keep MMU-writable) or ``__rmap_clear_dirty`` (``bit`` = D)."""
    pt = kvm.pgtable
    leaf = pt.leaf(gfn)
    if leaf.valid and leaf.level == PG_LEVEL_4K and leaf.pte & bit:
        pt.set_entry(leaf.li, leaf.row, leaf.idx, leaf.pte & ~bit)


def kvm_mmu_slot_gfn_write_protect(kvm: Vm, slot: Memslot, gfn: int, min_level: int) -> None:
    """``kvm_mmu_slot_gfn_write_protect``: the SPTE mapping ``gfn`` at ``min_level`` or
    larger loses W *and* MMU-writable (``pt_protect``), so no fast path undoes it."""
    pt = kvm.pgtable
    leaf = pt.leaf(gfn)
    if leaf.valid and leaf.level <= min_level and leaf.pte & (PTE_W | MMU_WRITABLE):
        pt.set_entry(leaf.li, leaf.row, leaf.idx, leaf.pte & ~(PTE_W | MMU_WRITABLE))


def _crosses_two_large_pages(start: int, end: int) -> bool:
    """``ALIGN(start << PAGE_SHIFT, PMD_SIZE) != ALIGN(end << PAGE_SHIFT, PMD_SIZE)``
    (ALIGN rounds up, so a 2 MiB-aligned ``start`` also says yes: redundant, harmless)."""
    return -(-start // PMD_PAGES) != -(-end // PMD_PAGES)


def kvm_arch_mmu_enable_log_dirty_pt_masked(kvm: Vm, slot: Memslot, gfn_offset: int, mask: int) -> None:
    """``kvm_arch_mmu_enable_log_dirty_pt_masked``, one word.

    With INITIALLY_SET the huge pages under the first and last page of the mask are
    handled first (they were not protected when logging started): eagerly split over
    ``[start, end + 1)``, then write-protected at 2M and up at ``start``, and at ``end``
    too if the range crosses two large pages.  Then the 4K SPTEs, one gfn at a time
    through the rmap (``__ffs``, ``mask &= mask - 1``): W cleared
    (``kvm_mmu_write_protect_pt_masked``) or, with PML, D cleared
    (``kvm_mmu_clear_dirty_pt_masked``).
    """
    st = state(kvm)
    base = slot.base_gfn + gfn_offset
    if kvm.initially_all_set:
        start, end = base + ffs(mask), base + fls(mask)
        if st.eager_page_split:
            kvm_mmu_try_split_huge_pages(kvm, slot, start, end + 1)
        kvm_mmu_slot_gfn_write_protect(kvm, slot, start, PG_LEVEL_2M)
        if _crosses_two_large_pages(start, end) and "no_cross_two_large_pages" not in st.bugs:
            kvm_mmu_slot_gfn_write_protect(kvm, slot, end, PG_LEVEL_2M)
    bit = PTE_D if st.pml else PTE_W
    while mask:
        rmap_clear_4k(kvm, base + ffs(mask), bit)
        mask &= mask - 1


def enable_log_dirty_pt_masked_batch(kvm: Vm, slot: Memslot, gfn_offsets: np.ndarray, masks: np.ndarray) -> None:
    """:func:`kvm_arch_mmu_enable_log_dirty_pt_masked` for every word of a GET or CLEAR,
    vectorised.  Same tables, counts and flushes as the per-word loop: the huge-page
    steps touch only huge leaves and the 4K step only 4K leaves, and the split of one
    word's range never reaches another word's (a range spans at most 64 pages)."""
    st = state(kvm)
    pt = kvm.pgtable
    offsets = np.asarray(gfn_offsets, np.int64)
    masks = np.asarray(masks)
    if kvm.initially_all_set:
        first, last1 = ffs_fls(masks)
        starts = slot.base_gfn + offsets + first
        ends = slot.base_gfn + offsets + last1 - 1
        if st.eager_page_split and st.tdp_mmu:
            leaves = pt.lookup(np.concatenate([starts, ends]))
            huge = leaves.valid & (leaves.level < PG_LEVEL_4K)
            todo = huge[:len(starts)] | huge[len(starts):]
            for s, e in zip(starts[todo].tolist(), ends[todo].tolist()):
                kvm_mmu_try_split_huge_pages(kvm, slot, s, e + 1)
        cross = -(-starts // PMD_PAGES) != -(-ends // PMD_PAGES)
        if "no_cross_two_large_pages" in st.bugs:
            cross[:] = False
        probes = np.concatenate([starts, ends[cross]])
        pt.clear_bits(probes, PTE_W | MMU_WRITABLE, max_level=PG_LEVEL_2M)
    # The rmap walk of every set bit, at the 4K level.
    pt.clear_bits_masked(slot.base_gfn + offsets, masks, PTE_D if st.pml else PTE_W,
                         min_level=PG_LEVEL_4K, max_level=PG_LEVEL_4K)


def kvm_mmu_slot_remove_write_access(kvm: Vm, slot: Memslot, min_level: int) -> None:
    """``kvm_mmu_slot_remove_write_access``: clear W (not MMU-writable) on every leaf of
    the slot at ``min_level`` or larger; no flush (the caller flushes)."""
    if min_level == PG_LEVEL_4K:
        kvm.pgtable.wrprotect_range(slot.base_gfn, slot.end_gfn)
        return
    firsts = huge_leaves_in(kvm, slot.base_gfn, slot.end_gfn)
    if len(firsts):
        kvm.pgtable.clear_bits(firsts, PTE_W, max_level=min_level)


def _slot_leaves(kvm: Vm, slot: Memslot) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    firsts, levels, ptes = kvm.pgtable.mapped_leaves()
    inside = (firsts >= slot.base_gfn) & (firsts < slot.end_gfn)
    return firsts[inside], levels[inside], ptes[inside]


def kvm_mmu_slot_leaf_clear_dirty(kvm: Vm, slot: Memslot) -> None:
    """``kvm_mmu_slot_leaf_clear_dirty`` (PML, logging on): clear D on the slot's leaves
    (TDP MMU: every leaf, ``clear_dirty_gfn_range``; legacy: 4K leaves only); no flush."""
    firsts, levels, ptes = _slot_leaves(kvm, slot)
    sel = (ptes & np.uint64(PTE_D)) != 0
    if not state(kvm).tdp_mmu:
        sel &= levels == PG_LEVEL_4K
    if sel.any():
        kvm.pgtable.clear_bits(firsts[sel], PTE_D)


def kvm_mmu_wp_memory_region(kvm: Vm, slot: Memslot) -> None:
    """Write-protect the whole slot and flush it (``kvm_mmu_slot_remove_write_access`` at 4K
    + ``kvm_flush_remote_tlbs_memslot``)."""
    kvm_mmu_slot_remove_write_access(kvm, slot, PG_LEVEL_4K)
    kvm.flush_remote_tlbs_memslot(slot)


# -- logging off: huge pages come back -----------------------------------------------------

def _collapsible_tables(kvm: Vm, slot: Memslot) -> list[tuple[int, int]]:
    """The non-leaf SPTEs of the slot that a huge page could replace, in pre-order
    (``for_each_tdp_pte_min_level(..., PG_LEVEL_2M, ...)``): a 1G-level table if the
    slot allows 1G there, else the 2M-level tables inside it that allow 2M.  A table's
    first gfn must lie in the slot; lpage_info refuses tables that run past its end."""
    firsts, levels, _ = _slot_leaves(kvm, slot)
    g = kvm.geometry
    n1g, n2m = g.level_pages(PG_LEVEL_1G), g.level_pages(PG_LEVEL_2M)
    t1g = unique(firsts[levels > PG_LEVEL_1G] & ~(n1g - 1))
    t2m = unique(firsts[levels == PG_LEVEL_4K] & ~(n2m - 1))
    t1g, t2m = t1g[t1g >= slot.base_gfn], t2m[t2m >= slot.base_gfn]
    ok1g = max_mapping_levels(kvm, slot, t1g) <= PG_LEVEL_1G
    ok2m = max_mapping_levels(kvm, slot, t2m) <= PG_LEVEL_2M
    parent_collapses = np.isin(t2m & ~(n1g - 1), t1g[ok1g])
    out = [(int(x), PG_LEVEL_1G) for x in t1g[ok1g]] + \
          [(int(x), PG_LEVEL_2M) for x in t2m[ok2m & ~parent_collapses]]
    return sorted(out)


def kvm_tdp_mmu_zap_collapsible_sptes(kvm: Vm, slot: Memslot) -> None:
    """``kvm_tdp_mmu_zap_collapsible_sptes`` (6.12): zap each collapsible non-leaf SPTE with
    its tables; each atomic zap flushes (``tdp_mmu_zap_spte_atomic``).  Later faults map
    huge pages again."""
    for gfn, level in _collapsible_tables(kvm, slot):
        kvm.pgtable.unmap_range(gfn, gfn + kvm.geometry.level_pages(level))
        kvm.stats["collapsible_sptes_zapped"] += 1
        flush_remote_tlbs_gfn(kvm, gfn, level)


def kvm_tdp_mmu_recover_huge_pages(kvm: Vm, slot: Memslot) -> None:
    """``kvm_tdp_mmu_recover_huge_pages`` (6.13+): replace each collapsible non-leaf SPTE
    by a huge SPTE made from the first present leaf under it (``make_huge_spte`` keeps
    its bits), then flush the memslot once."""
    firsts, _, ptes = _slot_leaves(kvm, slot)
    order = np.argsort(firsts)
    firsts, ptes = firsts[order], ptes[order]
    recovered = False
    for gfn, level in _collapsible_tables(kvm, slot):
        i = int(np.searchsorted(firsts, gfn))
        prot = int(ptes[i]) & (SPTE_BITS & ~PTE_VALID)
        kvm.pgtable.map(gfn, level, prot, tlbi=_no_tlbi)
        kvm.stats["huge_pages_recovered"] += 1
        recovered = True
    if recovered:
        kvm.flush_remote_tlbs_memslot(slot)


def kvm_rmap_zap_collapsible_sptes(kvm: Vm, slot: Memslot) -> None:
    """``kvm_rmap_zap_collapsible_sptes`` (legacy MMU): zap every 4K or 2M leaf whose
    shadow page could be mapped by a larger page (the tables stay), then flush the
    memslot once."""
    firsts, levels, _ = _slot_leaves(kvm, slot)
    sel = levels >= PG_LEVEL_2M
    firsts, levels = firsts[sel], levels[sel].astype(np.int64)
    parent_pages = np.left_shift(1, kvm.geometry.bits_per_level * (PG_LEVEL_4K - levels + 1))
    sp_gfns = firsts & ~(parent_pages - 1)
    zap = max_mapping_levels(kvm, slot, sp_gfns) < levels
    if zap.any():
        kvm.pgtable.clear_bits(firsts[zap], SPTE_BITS, min_level=PG_LEVEL_2M)
        kvm.stats["collapsible_sptes_zapped"] += int(zap.sum())
        kvm.flush_remote_tlbs_memslot(slot)


def kvm_mmu_recover_huge_pages(kvm: Vm, slot: Memslot) -> None:
    """Logging turned off: let huge mappings come back (``kvm_mmu_zap_collapsible_sptes``
    in 6.12, ``kvm_mmu_recover_huge_pages`` from 6.13, as the option says)."""
    st = state(kvm)
    if not st.tdp_mmu:
        kvm_rmap_zap_collapsible_sptes(kvm, slot)
    elif st.recovery == "in_place":
        kvm_tdp_mmu_recover_huge_pages(kvm, slot)
    else:
        kvm_tdp_mmu_zap_collapsible_sptes(kvm, slot)


# -- memslot flags -------------------------------------------------------------------------

def kvm_mmu_slot_apply_flags(kvm: Vm, old: Memslot | None, new: Memslot | None, change: MemslotChange) -> None:
    """``kvm_mmu_slot_apply_flags`` (``arch/x86/kvm/x86.c``, 6.12).

    Logging toggled: PML is on while at least one slot logs.  Only a flags-only change
    of a writable slot acts on mappings.  Logging off: huge pages come back.  Logging
    on (not INITIALLY_SET): eager split, then write-protect every leaf (or, with PML,
    clear the D bits of the leaves and write-protect the huge ones), then an
    unconditional memslot flush, after the MMU lock is dropped.
    """
    st = state(kvm)
    old_log = bool(old is not None and old.dirty_track_enabled)
    new_log = bool(new is not None and new.dirty_track_enabled)
    if old_log != new_log:
        st.nr_memslots_dirty_logging += 1 if new_log else -1  # kvm_mmu_update_cpu_dirty_logging
    if change is not MemslotChange.FLAGS_ONLY or new.readonly or old_log == new_log:
        return
    with kvm.mmu_lock:
        if not new_log:
            kvm_mmu_recover_huge_pages(kvm, new)
            return
        if kvm.initially_all_set:
            return
        if st.eager_page_split:
            kvm_mmu_slot_try_split_huge_pages(kvm, new)
        if st.pml:
            kvm_mmu_slot_leaf_clear_dirty(kvm, new)
            kvm_mmu_slot_remove_write_access(kvm, new, PG_LEVEL_2M)
        else:
            kvm_mmu_slot_remove_write_access(kvm, new, PG_LEVEL_4K)
    kvm.flush_remote_tlbs_memslot(new)
