"""RISC-V: the H extension's G-stage, as ``arch/riscv/kvm/{mmu,gstage,tlb}.c`` drive it.

Option ``mode``: ``sv39x4``, ``sv48x4`` (default) or ``sv57x4``: 3, 4 or 5 levels of
4 KiB tables translating 41-, 50- or 59-bit guest-physical addresses.  The "x4" is
two more address bits at the root, resolved by a 16 KiB root of four concatenated
tables (``kvm_riscv_gstage_pgd_xbits`` = 2).  The kernel picks the largest mode the
host's ``hgatp`` accepts (``kvm_riscv_gstage_mode_detect``); the model has no host,
so it asks.  Blocks are 2 MiB and 1 GiB, from hugetlbfs or THP backing.

Option ``eager_page_split`` (the module parameter of the same name, default on):
turning logging on splits every block of the slot down to 4 KiB at once.

Written only against the public hooks; see ``docs/arch-riscv.md``.
"""

import errno

import numpy as np

from kvmcore import ArchInfo, KvmError, hookimpl
from kvmcore.geometry import LAST_LEVEL, Geometry
from kvmcore.memslot import MemslotChange
from kvmcore.pgtable import PTE_D, PTE_W
from kvmcore.uapi import KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE

from arch_plugins.riscv import gstage

MODES = {"sv39x4": 3, "sv48x4": 4, "sv57x4": 5}  # hgatp.MODE -> page-table levels
PGD_XBITS = 2  # kvm_riscv_gstage_pgd_xbits: the root resolves 2 extra bits


@hookimpl
def kvm_arch_info():
    """``arch/riscv/include/asm/kvm_host.h``: RV64 only (BITS_PER_LONG 64), one address
    space, the generic slot count, and no ``KVM_DIRTY_LOG_MANUAL_CAPS`` override, so
    manual protect without INITIALLY_SET."""
    return ArchInfo(name="riscv", description="RISC-V G-stage: Sv39x4/Sv48x4/Sv57x4, 4K pages, 2M/1G blocks",
                    bits_per_long=64, nr_address_spaces=1, user_mem_slots=32767,
                    manual_dirty_log_caps=KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, has_readonly_mem=True,
                    options={"mode": "sv48x4", "eager_page_split": True})


@hookimpl
def kvm_arch_geometry(options):
    """``kvm_riscv_gstage_gpa_bits``: 12 + 9 bits per level + 2 at the root."""
    mode = options["mode"]
    if mode not in MODES:
        raise KvmError(errno.EINVAL, f"riscv mode {mode!r}: must be one of {', '.join(MODES)}")
    if not isinstance(options["eager_page_split"], bool):
        raise KvmError(errno.EINVAL, "riscv eager_page_split must be True or False")
    levels = MODES[mode]
    return Geometry(page_shift=12, ipa_bits=12 + 9 * levels + PGD_XBITS, start_level=LAST_LEVEL + 1 - levels,
                    block_levels={LAST_LEVEL - 2, LAST_LEVEL - 1}, bits_per_long=64)


@hookimpl
def kvm_arch_prepare_memory_region(kvm, old, new, change):
    """``kvm_arch_prepare_memory_region``: a slot must end below the top of the GPA
    space (the kernel compares with ``>=``, so the very last page is refused too)."""
    if change in (MemslotChange.CREATE, MemslotChange.MOVE, MemslotChange.FLAGS_ONLY) and \
            new.end_gfn >= kvm.geometry.max_gfn:
        raise KvmError(errno.EFAULT, f"slot {new.slot} ends at gfn {new.end_gfn:#x}, not below the "
                                     f"{kvm.geometry.ipa_bits}-bit GPA space of {kvm.options['mode']}")


@hookimpl
def kvm_arch_handle_stage2_fault(kvm, vcpu, slot, gfn, write):
    """``kvm_riscv_mmu_map``: while logging, a write to a 4K leaf takes the fast path;
    otherwise map a 4K page (logging) or the largest block the backing and the slot
    allow, read-only for a read while logging, marking the page dirty if writable."""
    logging = slot.dirty_track_enabled and not slot.readonly
    if write and logging and gstage.dirty_log_write_fault_fast(kvm, slot, gfn, vcpu):
        return True
    level = LAST_LEVEL if logging else gstage.mapping_level(kvm, slot, gfn)
    writable = not slot.readonly and (write or not logging)
    if writable:
        kvm.mark_page_dirty_in_slot(slot, gfn, vcpu)
    gstage.map_page(kvm, gfn, level, writable)
    return True


@hookimpl
def kvm_arch_handle_stage2_faults_batch(kvm, vcpu, slot, gfns, write):
    """:func:`kvm_arch_handle_stage2_fault` for a run of write faults while logging, each
    on a 4K leaf (the fast path: W and D set, one flush a page) or an unmapped page (a
    4K page mapped writable and flushed); the run stops at a page under a block."""
    if not (write and slot.dirty_track_enabled and not slot.readonly) or kvm.dirty_ring_size:
        return 0
    leaves = kvm.pgtable.lookup(gfns)
    page_sized = ~leaves.valid | (leaves.level == LAST_LEVEL)
    done = len(gfns) if page_sized.all() else int(np.argmin(page_sized))
    gfns, mapped = gfns[:done], leaves.valid[:done]
    kvm.mark_pages_dirty_in_slot(slot, gfns, vcpu)
    kvm.pgtable.set_bits(gfns[mapped], PTE_W | PTE_D)
    kvm.pgtable.map_pages(gfns[~mapped], PTE_W | PTE_D, tlbi=kvm.tlb_flush_ipa)
    kvm.tlb_flush_pages(gfns)
    return done


@hookimpl
def kvm_mmu_wp_memory_region(kvm, slot):
    """``mmu_wp_memory_region``: write-protect every leaf of the slot, flush if any changed."""
    if kvm.pgtable.wrprotect_range(slot.base_gfn, slot.end_gfn):
        kvm.flush_remote_tlbs_memslot(slot)


@hookimpl
def kvm_mmu_write_protect_pt_masked(kvm, slot, gfn_offset, mask):
    """``kvm_arch_mmu_enable_log_dirty_pt_masked`` -> ``kvm_riscv_gstage_wp_pt_masked``:
    bit by bit, protect the leaf mapping each page; a block is protected whole and the
    bits it covers are done.  No flush here: the caller flushes."""
    gstage.wp_pt_masked(kvm, slot.base_gfn + gfn_offset, mask)


@hookimpl
def kvm_mmu_write_protect_pt_masked_batch(kvm, slot, gfn_offsets, masks):
    """The same for a whole GET/CLEAR at once: every leaf mapping a masked page loses W."""
    kvm.pgtable.clear_bits_masked(slot.base_gfn + np.asarray(gfn_offsets, np.int64), masks, PTE_W)


@hookimpl
def kvm_arch_commit_memory_region(kvm, old, new, change):
    """``kvm_arch_commit_memory_region``: a slot (created, moved or changed) that logs is
    write-protected, then eagerly split, unless INITIALLY_SET defers it to CLEAR."""
    if change is MemslotChange.DELETE or not new.dirty_track_enabled:
        return
    if kvm.initially_all_set:
        return
    kvm.hook.kvm_mmu_wp_memory_region(kvm=kvm, slot=new)
    if kvm.options["eager_page_split"]:
        gstage.split_memory_region(kvm, new)


@hookimpl
def kvm_flush_remote_tlbs(kvm):
    """``kvm_arch_flush_remote_tlbs`` -> ``kvm_riscv_hfence_gvma_vmid_all``: the whole VMID."""
    kvm.tlb_flush_all(kind="full")


@hookimpl
def kvm_flush_remote_tlbs_range(kvm, gfn, nr_pages):
    """``kvm_arch_flush_remote_tlbs_range`` -> ``kvm_riscv_hfence_gvma_vmid_gpa`` over the range."""
    kvm.tlb_flush_range(gfn, nr_pages, kind="range")
    return True
