"""Stage-2 pieces common to arm and arm64 (``arch/arm/kvm/mmu.c``, ``arch/arm64/kvm/mmu.c``).

Addresses are guest frame numbers (Python ints, so never truncated: the model of the
64-bit ``phys_addr_t`` arithmetic the 32-bit port needed); ranges are ``[start, end)``.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import numpy as np

from kvmcore.bitops import ffs_fls

from kvmcore.errors import KvmError
from kvmcore.geometry import LAST_LEVEL
from kvmcore.memslot import MemslotChange
from kvmcore.pgtable import PTE_VALID, PTE_W, WALK_LEAF, WalkContext

if TYPE_CHECKING:
    from kvmcore.memslot import Memslot
    from kvmcore.vm import Vm


# -- the range one bitmap word covers ------------------------------------------------

def mask_range(base_gfn: int, mask: int) -> tuple[int, int]:
    """``[base + __ffs(mask), base + __fls(mask) + 1)``: the gfns from the lowest to the
    highest set bit, as ``kvm_mmu_write_protect_pt_masked`` computes them.

    The end comes from the bits of the long (the 2014 review's request), not from
    ``BITS_PER_LONG`` pages after the start; clear bits in between are protected too.
    """
    first = (mask & -mask).bit_length() - 1
    return base_gfn + first, base_gfn + mask.bit_length()


def mask_ranges(base_gfns: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`mask_range` for arrays of words (uint32 or uint64), without a loop per word."""
    first, last1 = ffs_fls(masks)
    base = np.asarray(base_gfns, np.int64)
    return base + first, base + last1


# -- write protection ------------------------------------------------------------------

def _wrprotect_visitor(ctx: WalkContext) -> int | None:
    """Clear W on a valid leaf (``kvm_set_s2pte_readonly`` / ``kvm_set_s2pmd_readonly``,
    ``stage2_wp_walker``); a block is write-protected whole."""
    if ctx.pte & (PTE_VALID | PTE_W) == PTE_VALID | PTE_W:
        return ctx.pte & ~PTE_W
    return None


def stage2_wp_range(kvm: Vm, start_gfn: int, end_gfn: int) -> None:
    """Write-protect every leaf overlapping ``[start_gfn, end_gfn)``; no TLB maintenance.

    Mirrors ``stage2_wp_range`` (v3.19: pgd → pud → pmd → pte loops) and
    ``kvm_pgtable_stage2_wrprotect`` (arm64): the core's walker steps every level with
    the clamped ``p*d_addr_end`` and stops when ``addr == end``, so a range that starts
    on the last page of a block, or in an unmapped table, visits exactly what it overlaps.
    """
    shift = kvm.page_shift
    kvm.pgtable.walk(start_gfn << shift, end_gfn << shift, _wrprotect_visitor, WALK_LEAF)


def wp_memory_region(kvm: Vm, slot: Memslot) -> None:
    """``kvm_mmu_wp_memory_region``: write-protect the whole slot, then flush the VMID.

    The slot-wide walk is the vectorised one (only existing tables are scanned); the
    flush is ``kvm_flush_remote_tlbs``, after the MMU lock is dropped.
    """
    with kvm.mmu_lock:
        kvm.pgtable.wrprotect_range(slot.base_gfn, slot.end_gfn)
    kvm.flush_remote_tlbs()


def blocks_in_range(kvm: Vm, start_gfn: int, end_gfn: int) -> list[tuple[int, int]]:
    """Every valid block leaf overlapping ``[start_gfn, end_gfn)``, as ``(first_gfn, level)``
    in address order: one vectorised lookup per smallest-block span, not a loop per page."""
    geo = kvm.geometry
    if not geo.block_levels or start_gfn >= end_gfn:
        return []
    step = geo.level_pages(max(geo.block_levels))
    first_aligned = -(-start_gfn // step) * step
    points = np.concatenate(([start_gfn], np.arange(first_aligned, end_gfn, step, dtype=np.int64)))
    leaves = kvm.pgtable.lookup(points)
    sel = leaves.valid & (leaves.level < LAST_LEVEL)
    if not sel.any():
        return []
    levels = leaves.level[sel].astype(np.int64)
    spans = np.left_shift(np.int64(1), geo.bits_per_level * (LAST_LEVEL - levels))
    bases = points[sel] & ~(spans - 1)
    return sorted(set(zip(bases.tolist(), levels.tolist())))


# -- huge mappings ---------------------------------------------------------------------

def fault_supports_stage2_huge_mapping(slot: Memslot, gfn: int, map_size: int, page_shift: int) -> bool:
    """May the fault on ``gfn`` be mapped by a block of ``map_size`` bytes?
    (``fault_supports_stage2_huge_mapping``)

    The IPA and the host address must be congruent modulo the block size, and the
    whole block must lie inside the memslot.
    """
    if map_size == 1 << page_shift:
        return True
    gpa_start = slot.base_gfn << page_shift
    uaddr_start = slot.userspace_addr
    uaddr_end = uaddr_start + (slot.npages << page_shift)
    if gpa_start & (map_size - 1) != uaddr_start & (map_size - 1):
        return False
    hva = uaddr_start + ((gfn - slot.base_gfn) << page_shift)
    block = hva & ~(map_size - 1)
    return block >= uaddr_start and block + map_size <= uaddr_end


def huge_mapping_level(kvm: Vm, slot: Memslot, gfn: int) -> int:
    """The level ``user_mem_abort`` maps a fault at when the slot does not log.

    The largest block level whose size the host backing covers (hugetlbfs/THP, the
    model's ``host_page_size``) and that :func:`fault_supports_stage2_huge_mapping`
    allows, falling back level by level (PUD → PMD → page) as the kernel does.
    """
    geo = kvm.geometry
    for level in sorted(geo.block_levels):
        size = geo.level_size(level)
        if size <= slot.host_page_size and fault_supports_stage2_huge_mapping(slot, gfn, size, geo.page_shift):
            return level
    return LAST_LEVEL


# -- memslot changes -------------------------------------------------------------------

def prepare_memory_region(kvm: Vm, new: Memslot | None, change: MemslotChange, *, end_inclusive: bool) -> None:
    """``kvm_arch_prepare_memory_region``: refuse a slot beyond the IPA space (EFAULT).

    v3.19 arm refused ``base_gfn + npages >= KVM_PHYS_SIZE >> PAGE_SHIFT`` (a slot may
    not reach the top page); arm64 refuses ``> kvm_phys_size >> PAGE_SHIFT``.
    """
    if change not in (MemslotChange.CREATE, MemslotChange.MOVE, MemslotChange.FLAGS_ONLY):
        return
    limit = kvm.geometry.max_gfn
    if new.end_gfn > limit or (end_inclusive and new.end_gfn == limit):
        raise KvmError(errno.EFAULT, f"memslot [{new.base_gfn:#x}, {new.end_gfn:#x}) reaches beyond the "
                                     f"{kvm.geometry.ipa_bits}-bit IPA space (gfn {limit:#x})")


def commit_wants_write_protect(kvm: Vm, new: Memslot | None, change: MemslotChange) -> bool:
    """Should ``kvm_arch_commit_memory_region`` write-protect the slot now?

    Yes whenever the new slot logs and the change is not a delete (create, move or a
    flags change alike), unless INITIALLY_SET defers protection to CLEAR.  Nothing is
    done when logging goes off: blocks come back lazily, on later faults.
    """
    if new is None or change is MemslotChange.DELETE or not new.dirty_track_enabled:
        return False
    return not kvm.initially_all_set
