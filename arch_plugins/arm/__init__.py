"""arm: ARMv7 LPAE stage 2 with dirty-page logging as merged in v3.19 (``arch/arm/kvm``).

A 40-bit IPA (``KVM_PHYS_SHIFT``), 4 KiB pages, a first level of 1 GiB entries made of
two concatenated tables (1024 entries, 8 KiB: ``PTRS_PER_S2_PGD``, ``S2_PGD_ORDER``,
walk from level 1), 2 MiB blocks only, and a 32-bit ``unsigned long``: dirty-bitmap
words and masks are 32 bits wide.  Every TLB invalidation is a whole-VMID flush.

The hooks are module-level functions, loaded by the ``kvmcore.arch`` entry point
``arm = "arch_plugins.arm"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from arch_plugins.arm import mmu
from arch_plugins.arm_common import (
    commit_wants_write_protect,
    mask_range,
    prepare_memory_region,
    stage2_wp_range,
    wp_memory_region,
)
from kvmcore.archinfo import ArchInfo
from kvmcore.bitops import spans
from kvmcore.geometry import Geometry
from kvmcore.pgtable import PTE_W
from kvmcore.plugins import hookimpl
from kvmcore.uapi import KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE

if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    from kvmcore.memslot import Memslot, MemslotChange
    from kvmcore.vcpu import Vcpu
    from kvmcore.vm import Vm

KVM_PHYS_SHIFT = 40       # arch/arm/include/asm/kvm_arm.h
KVM_USER_MEM_SLOTS = 32   # arch/arm/include/asm/kvm_host.h
BITS_PER_LONG = 32


@hookimpl
def kvm_arch_info() -> ArchInfo:
    """The constants of ``arch/arm/include/asm/kvm_host.h``; arm never got INITIALLY_SET."""
    return ArchInfo(name="arm", description="ARMv7 LPAE stage 2 (v3.19): 40-bit IPA, 4K pages, 2M blocks",
                    bits_per_long=BITS_PER_LONG, user_mem_slots=KVM_USER_MEM_SLOTS,
                    manual_dirty_log_caps=KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, options={})


@hookimpl
def kvm_arch_geometry(options: Mapping[str, Any]) -> Geometry:
    """``kvm_alloc_stage2_pgd`` / ``VTCR_SL_L1``: start at level 1 with 2^(40-30) = 1024
    concatenated entries; blocks at level 2 only (``stage2_wp_puds`` BUGs on a pud block)."""
    return Geometry(page_shift=12, ipa_bits=KVM_PHYS_SHIFT, start_level=1, block_levels={mmu.PMD_LEVEL},
                    bits_per_long=BITS_PER_LONG)


@hookimpl
def kvm_arch_prepare_memory_region(kvm: Vm, new: Memslot | None, change: MemslotChange) -> None:
    """``kvm_arch_prepare_memory_region``: EFAULT unless the slot ends below the top page."""
    prepare_memory_region(kvm, new, change, end_inclusive=True)


@hookimpl
def kvm_arch_handle_stage2_fault(kvm: Vm, vcpu: Vcpu, slot: Memslot, gfn: int, write: bool) -> bool:
    """``kvm_handle_guest_abort`` → ``user_mem_abort``."""
    mmu.user_mem_abort(kvm, vcpu, slot, gfn, write)
    return True


@hookimpl
def kvm_arch_handle_stage2_faults_batch(kvm: Vm, vcpu: Vcpu, slot: Memslot, gfns: np.ndarray, write: bool) -> int:
    """``kvm_handle_guest_abort`` → ``user_mem_abort``, for a run of faults (the fast path):
    see :func:`arch_plugins.arm.mmu.user_mem_abort_batch`."""
    return mmu.user_mem_abort_batch(kvm, vcpu, slot, gfns, write)


@hookimpl
def kvm_mmu_wp_memory_region(kvm: Vm, slot: Memslot) -> None:
    """``kvm_mmu_wp_memory_region``: the whole slot, then ``kvm_flush_remote_tlbs``."""
    wp_memory_region(kvm, slot)


@hookimpl
def kvm_mmu_write_protect_pt_masked(kvm: Vm, slot: Memslot, gfn_offset: int, mask: int) -> None:
    """``kvm_mmu_write_protect_pt_masked``: ``stage2_wp_range`` over ``[__ffs, __fls + 1)``
    of the 32-bit mask; no flush (the GET ioctl flushes the VMID afterwards)."""
    start, end = mask_range(slot.base_gfn + gfn_offset, mask)
    stage2_wp_range(kvm, start, end)


@hookimpl
def kvm_mmu_write_protect_pt_masked_batch(kvm: Vm, slot: Memslot, gfn_offsets: np.ndarray,
                                          masks: np.ndarray) -> None:
    """The per-word hook for a whole GET/CLEAR at once: the same ranges, write-protected
    in one vectorised pass (the ranges only remove W, so their order does not matter)."""
    kvm.pgtable.clear_bits_masked(slot.base_gfn + np.asarray(gfn_offsets, np.int64), spans(masks), PTE_W)


@hookimpl
def kvm_arch_commit_memory_region(kvm: Vm, old: Memslot | None, new: Memslot | None,
                                  change: MemslotChange) -> None:
    """``kvm_arch_commit_memory_region``: a slot that logs (and is not being deleted) is
    write-protected at once; turning logging off does nothing."""
    if commit_wants_write_protect(kvm, new, change):
        wp_memory_region(kvm, new)


@hookimpl
def kvm_flush_remote_tlbs(kvm: Vm) -> None:
    """``kvm_flush_remote_tlbs`` → ``__kvm_tlb_flush_vmid``: the whole VMID.  arm has no
    range flush, so GET falls back to this too."""
    kvm.tlb_flush_all(kind="full")
