"""arm64: ARMv8 stage 2 with dirty-page logging (``arch/arm64/kvm``, ``kvm_pgtable``).

Options: ``granule`` (4096, 16384, 65536; default 4096) and ``ipa_bits`` (32..48, up to
52 with 64K pages; default 40).  Levels, start level and concatenated tables follow
``stage2_pgtable_levels`` / ``kvm_pgd_pages``; blocks from ``KVM_PGTABLE_MIN_BLOCK_LEVEL``
(4K: 1 GiB and 2 MiB; 16K: 32 MiB; 64K: 512 MiB).  Eager page splitting with
``KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE`` (off by default); GET and CLEAR flush by range
(FEAT_TLBIRANGE), everything else the whole VMID.

The hooks are module-level functions, loaded by the ``kvmcore.arch`` entry point
``arm64 = "arch_plugins.arm64"``.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import numpy as np

from arch_plugins.arm64 import mmu
from arch_plugins.arm_common import (
    commit_wants_write_protect,
    mask_range,
    mask_ranges,
    prepare_memory_region,
    stage2_wp_range,
    wp_memory_region,
)
from kvmcore.archinfo import ArchInfo
from kvmcore.bitops import spans
from kvmcore.errors import KvmError
from kvmcore.geometry import Geometry
from kvmcore.pgtable import PTE_W
from kvmcore.plugins import hookimpl
from kvmcore.uapi import (
    KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE,
    KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES,
    KVM_CAP_ARM_VM_IPA_SIZE,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
    KVM_DIRTY_LOG_MANUAL_CAPS,
)

if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    from kvmcore.memslot import Memslot, MemslotChange
    from kvmcore.vcpu import Vcpu
    from kvmcore.vm import Vm

KVM_USER_MEM_SLOTS = 32767   # the generic SHRT_MAX - KVM_INTERNAL_MEM_SLOTS; arm64 dropped its 512
KVM_ARM_EAGER_SPLIT_CHUNK_SIZE_DEFAULT = 0


@hookimpl
def kvm_arch_info() -> ArchInfo:
    """The constants of ``arch/arm64/include/asm/kvm_host.h``; the ring only with
    acquire/release ordering, and with the backup bitmap (``arch/arm64/kvm/Kconfig``).
    The batched fault path pushes ring entries in fault order."""
    return ArchInfo(name="arm64", description="ARMv8 stage 2: 4K/16K/64K granules, 32..52-bit IPA, eager split",
                    bits_per_long=64, user_mem_slots=KVM_USER_MEM_SLOTS,
                    manual_dirty_log_caps=KVM_DIRTY_LOG_MANUAL_CAPS,
                    dirty_ring_caps={KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP},
                    options={"granule": 4096, "ipa_bits": mmu.KVM_PHYS_SHIFT}, batched_faults_with_ring=True)


@hookimpl
def kvm_arch_geometry(options: Mapping[str, Any]) -> Geometry:
    """``kvm_init_ipa_range`` + ``kvm_get_vtcr``; EINVAL for what the kernel refuses."""
    return mmu.stage2_geometry(options["granule"], options["ipa_bits"])


@hookimpl
def kvm_arch_init_vm(kvm: Vm) -> None:
    """``kvm_init_stage2_mmu``: eager page splitting starts disabled."""
    kvm.arch_state["split_page_chunk_size"] = KVM_ARM_EAGER_SPLIT_CHUNK_SIZE_DEFAULT


@hookimpl
def kvm_arch_check_extension(kvm: Vm, cap: int) -> int | None:
    """``kvm_vm_ioctl_check_extension`` for the arm64 capabilities kvmcore names."""
    if cap == KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE:
        return kvm.arch_state["split_page_chunk_size"]
    if cap == KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES:
        return mmu.supported_block_sizes(kvm.page_shift)
    if cap == KVM_CAP_ARM_VM_IPA_SIZE:
        return mmu.IPA_LIMIT[kvm.page_size]
    return None


@hookimpl
def kvm_arch_enable_cap(kvm: Vm, cap: int, args: tuple[int, ...], flags: int) -> int | None:
    """``kvm_vm_ioctl_enable_cap``: ``KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE`` only while no
    memslot exists, and only 0 or a supported block size; EINVAL otherwise."""
    if cap != KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE:
        return None
    if flags:
        raise KvmError(errno.EINVAL, f"KVM_ENABLE_CAP flags must be 0, not {flags:#x}")
    new_cap = args[0]
    with kvm.slots_lock:
        if kvm.memslots:
            raise KvmError(errno.EINVAL, "KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE can only change before any "
                                         "memslot is created")
        if new_cap and not mmu.kvm_is_block_size_supported(new_cap, kvm.page_shift):
            sizes = [1 << b for b in range(64) if mmu.supported_block_sizes(kvm.page_shift) >> b & 1]
            raise KvmError(errno.EINVAL, f"eager split chunk size {new_cap:#x}: must be 0 or a block size "
                                         f"({', '.join(hex(s) for s in sizes)})")
        kvm.arch_state["split_page_chunk_size"] = new_cap
    return 0


@hookimpl
def kvm_arch_prepare_memory_region(kvm: Vm, new: Memslot | None, change: MemslotChange) -> None:
    """``kvm_arch_prepare_memory_region``: EFAULT for a slot past ``kvm_phys_size``."""
    prepare_memory_region(kvm, new, change, end_inclusive=False)


@hookimpl
def kvm_arch_handle_stage2_fault(kvm: Vm, vcpu: Vcpu, slot: Memslot, gfn: int, write: bool) -> bool:
    """``kvm_handle_guest_abort`` → ``user_mem_abort``."""
    mmu.user_mem_abort(kvm, vcpu, slot, gfn, write)
    return True


@hookimpl
def kvm_arch_handle_stage2_faults_batch(kvm: Vm, vcpu: Vcpu, slot: Memslot, gfns: np.ndarray, write: bool) -> int:
    """``kvm_handle_guest_abort`` → ``user_mem_abort``, for a run of faults (the fast path):
    see :func:`arch_plugins.arm64.mmu.user_mem_abort_batch`."""
    return mmu.user_mem_abort_batch(kvm, vcpu, slot, gfns, write)


@hookimpl
def kvm_mmu_wp_memory_region(kvm: Vm, slot: Memslot) -> None:
    """``kvm_mmu_wp_memory_region``: the whole slot, then ``kvm_flush_remote_tlbs``."""
    wp_memory_region(kvm, slot)


@hookimpl
def kvm_mmu_write_protect_pt_masked(kvm: Vm, slot: Memslot, gfn_offset: int, mask: int) -> None:
    """``kvm_arch_mmu_enable_log_dirty_pt_masked``: ``kvm_stage2_wp_range`` over
    ``[__ffs, __fls + 1)``, then, under INITIALLY_SET, ``kvm_mmu_split_huge_pages`` of the
    same range (without it, blocks were split when logging was enabled)."""
    start, end = mask_range(slot.base_gfn + gfn_offset, mask)
    stage2_wp_range(kvm, start, end)
    if kvm.initially_all_set:
        mmu.kvm_mmu_split_huge_pages(kvm, start, end)


@hookimpl
def kvm_mmu_write_protect_pt_masked_batch(kvm: Vm, slot: Memslot, gfn_offsets: np.ndarray,
                                          masks: np.ndarray) -> None:
    """The per-word hook for a whole GET/CLEAR: every range write-protected in one
    vectorised pass, then the INITIALLY_SET splits in word order.  Splitting keeps
    permissions and write protection never creates or removes entries, so doing all
    the protection first leaves the same tables and costs the same TLBIs."""
    firsts = slot.base_gfn + np.asarray(gfn_offsets, np.int64)
    kvm.pgtable.clear_bits_masked(firsts, spans(masks), PTE_W)
    if not kvm.initially_all_set or not kvm.arch_state["split_page_chunk_size"]:
        return
    starts, ends = mask_ranges(firsts, masks)
    # A word spans at most 64 pages and a block at least 512: its two ends find every
    # block it overlaps; ranges over no block have nothing to split.
    edges = kvm.pgtable.lookup(np.concatenate((starts, ends - 1)))
    is_block = (edges.valid & (edges.level < mmu.LAST_LEVEL)).reshape(2, -1).any(axis=0)
    for start, end in zip(starts[is_block].tolist(), ends[is_block].tolist()):
        mmu.kvm_mmu_split_huge_pages(kvm, start, end)


@hookimpl
def kvm_arch_commit_memory_region(kvm: Vm, old: Memslot | None, new: Memslot | None,
                                  change: MemslotChange) -> None:
    """``kvm_arch_commit_memory_region``: logging on (not INITIALLY_SET) →
    ``kvm_mmu_wp_memory_region`` then ``kvm_mmu_split_memory_region``; otherwise
    nothing (blocks come back lazily on faults)."""
    if commit_wants_write_protect(kvm, new, change):
        wp_memory_region(kvm, new)
        with kvm.mmu_lock:
            mmu.kvm_mmu_split_huge_pages(kvm, new.base_gfn, new.end_gfn)


@hookimpl
def kvm_flush_remote_tlbs(kvm: Vm) -> None:
    """``kvm_arch_flush_remote_tlbs`` → ``__kvm_tlb_flush_vmid``: the whole VMID."""
    kvm.tlb_flush_all(kind="full")


@hookimpl
def kvm_flush_remote_tlbs_range(kvm: Vm, gfn: int, nr_pages: int) -> bool:
    """``kvm_arch_flush_remote_tlbs_range`` → ``kvm_tlb_flush_vmid_range`` (FEAT_TLBIRANGE)."""
    mmu.kvm_tlb_flush_vmid_range(kvm, gfn, nr_pages)
    return True
