"""G-stage table operations of ``arch/riscv/kvm/gstage.c`` and ``mmu.c``, on the core's
page-table engine.  Levels are the core's (3 maps 4 KiB, 2 maps 2 MiB, 1 maps 1 GiB);
the kernel counts the other way (0 maps 4 KiB).

RISC-V needs no break-before-make, but the model's engine replaces a block with
break-before-make anyway; the flushes counted are the kernel's ``gstage_tlb_flush``
calls (one HFENCE.GVMA per changed leaf) plus the engine's.
"""

import numpy as np

from kvmcore.geometry import LAST_LEVEL
from kvmcore.pgtable import PTE_D, PTE_VALID, PTE_W

HUGE_LEVELS = (LAST_LEVEL - 2, LAST_LEVEL - 1)  # PUD (1 GiB), PMD (2 MiB)


def fault_supports_huge_mapping(kvm, slot, gfn, level):
    """``fault_supports_gstage_huge_mapping``: the slot's GPA and host address agree within
    the block, and the block lies wholly inside the slot."""
    size = kvm.geometry.level_size(level)
    gpa_start = slot.base_gfn << kvm.page_shift
    uaddr_start = slot.userspace_addr
    uaddr_end = uaddr_start + (slot.npages << kvm.page_shift)
    if (gpa_start & (size - 1)) != (uaddr_start & (size - 1)):
        return False
    hva = uaddr_start + ((gfn - slot.base_gfn) << kvm.page_shift)
    return -(-uaddr_start // size) * size <= hva < (uaddr_end // size) * size


def mapping_level(kvm, slot, gfn):
    """``hugetlb_mapping_size`` / ``transparent_hugepage_adjust``: the largest block the
    host backing (``host_page_size``) and the slot allow, else a page."""
    for level in HUGE_LEVELS:
        if kvm.geometry.level_size(level) <= slot.host_page_size and \
                fault_supports_huge_mapping(kvm, slot, gfn, level):
            return level
    return LAST_LEVEL


def _update_leaf(kvm, leaf, pte):
    """``kvm_riscv_gstage_try_update_pte``: store, and flush the leaf if it changed."""
    if pte != leaf.pte:
        kvm.pgtable.set_entry(leaf.li, leaf.row, leaf.idx, pte)
        kvm.tlb_flush_ipa(leaf.base_gfn, leaf.level)


def dirty_log_write_fault_fast(kvm, slot, gfn, vcpu):
    """``kvm_riscv_mmu_dirty_log_write_fault_fast``: a write to a 4K leaf while logging
    marks the page and makes the leaf writable and dirty, without the slow path."""
    leaf = kvm.pgtable.leaf(gfn)
    if not leaf.valid or leaf.level != LAST_LEVEL:
        return False
    kvm.mark_page_dirty_in_slot(slot, gfn, vcpu)
    _update_leaf(kvm, leaf, leaf.pte | PTE_W | PTE_D)
    return True


def split_huge(kvm, gfn, target_level, tlbi):
    """``kvm_riscv_gstage_split_huge``: split the block holding ``gfn`` one level at a time
    down to ``target_level``; children keep the block's permissions.  True if any split."""
    split = False
    leaf = kvm.pgtable.leaf(gfn)
    while leaf.valid and leaf.level < target_level:
        kvm.pgtable.split(gfn, tlbi=tlbi, to_level=leaf.level + 1)
        split = True
        leaf = kvm.pgtable.leaf(gfn)
    return split


def map_page(kvm, gfn, level, writable):
    """``kvm_riscv_gstage_map_page`` + ``kvm_riscv_gstage_set_pte``.

    A block above ``level`` is split first (dirty logging wants 4K).  A leaf already at
    or below ``level`` only has its permissions updated: after logging stops, 4K leaves
    stay 4K.  Otherwise the new leaf is installed (replacing a table if one is there)
    and flushed, as a host without Svvptc does.
    """
    prot = (PTE_W if writable else 0) | PTE_D  # A and D are always set at creation
    leaf = kvm.pgtable.leaf(gfn)
    if leaf.valid and leaf.level >= level:
        _update_leaf(kvm, leaf, (leaf.pte & ~(PTE_W | PTE_D)) | prot)
        return
    if leaf.valid:
        split_huge(kvm, gfn, level, tlbi=kvm.tlb_flush_ipa)
        _update_leaf(kvm, kvm.pgtable.leaf(gfn), (kvm.pgtable.leaf(gfn).pte & ~(PTE_W | PTE_D)) | prot)
        return
    kvm.pgtable.map(gfn, level, prot, tlbi=kvm.tlb_flush_ipa)
    kvm.tlb_flush_ipa(gfn, level)


def _protect(kvm, leaf):
    """``kvm_riscv_gstage_op_pte(GSTAGE_OP_WP)`` on a leaf: clear W, no flush."""
    if leaf.pte & (PTE_VALID | PTE_W) == PTE_VALID | PTE_W:
        kvm.pgtable.set_entry(leaf.li, leaf.row, leaf.idx, leaf.pte & ~PTE_W)


def wp_pt_masked(kvm, base_gfn, mask):
    """``kvm_riscv_gstage_wp_pt_masked``: for each set bit, lowest first, protect the leaf
    mapping that page; a block is protected whole, and the bits it covers cleared
    (``clear_huge_mask``)."""
    while mask:
        bit = (mask & -mask).bit_length() - 1
        leaf = kvm.pgtable.leaf(base_gfn + bit)
        if leaf.valid:
            _protect(kvm, leaf)
            if leaf.level != LAST_LEVEL:
                lo = max(leaf.base_gfn - base_gfn, 0)
                hi = min(leaf.base_gfn + leaf.pages - base_gfn, mask.bit_length())
                mask &= ~(((1 << (hi - lo)) - 1) << lo)
                continue
        mask &= mask - 1


def split_memory_region(kvm, slot):
    """``mmu_split_memory_region`` -> ``mmu_split_huge_pages``: every block of the slot
    split down to 4K without a flush each, then one memslot flush if any was split."""
    firsts, levels, _ = kvm.pgtable.mapped_leaves()
    pages = np.left_shift(1, kvm.geometry.bits_per_level * (LAST_LEVEL - levels.astype(np.int64)))
    blocks = (levels < LAST_LEVEL) & (firsts < slot.end_gfn) & (firsts + pages > slot.base_gfn)
    pmd = kvm.geometry.level_pages(LAST_LEVEL - 1)
    split = False
    for first, n in zip(firsts[blocks].tolist(), pages[blocks].tolist()):
        for gfn in range(max(first, slot.base_gfn // pmd * pmd), min(first + n, slot.end_gfn), pmd):
            split |= split_huge(kvm, gfn, LAST_LEVEL, tlbi=lambda gfn, level: None)
    if split:
        kvm.flush_remote_tlbs_memslot(slot)
