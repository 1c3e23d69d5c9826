"""The contract between the generic core and an architecture plugin.

Every hook names the kernel function it mirrors.  The core always calls hooks with
keyword arguments.  ``kvm`` is the :class:`kvmcore.vm.Vm` (its page table is
``kvm.pgtable``, its TLB operations ``kvm.tlb_flush_*``, its dirty logging
``kvm.mark_page_dirty_in_slot``); ``slot`` is a :class:`kvmcore.memslot.Memslot`.

Hooks marked *required* must be implemented by every arch: the plugin manager
refuses an arch that lacks one (pluggy itself would silently return ``None``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import numpy as np

    from kvmcore.archinfo import ArchInfo
    from kvmcore.geometry import Geometry
    from kvmcore.memslot import Memslot, MemslotChange
    from kvmcore.vcpu import Vcpu
    from kvmcore.vm import Vm

hookspec = pluggy.HookspecMarker("kvmcore")

REQUIRED_HOOKS = (
    "kvm_arch_info",
    "kvm_arch_geometry",
    "kvm_arch_handle_stage2_fault",
    "kvm_mmu_wp_memory_region",
    "kvm_mmu_write_protect_pt_masked",
    "kvm_arch_commit_memory_region",
    "kvm_flush_remote_tlbs",
)


@hookspec(firstresult=True)
def kvm_arch_info() -> ArchInfo:
    """*Required.* Describe the arch: name, BITS_PER_LONG, address spaces, slot limit,
    ``KVM_DIRTY_LOG_MANUAL_CAPS`` and the VM options it accepts with their defaults.

    Mirrors the per-arch constants of ``arch/*/include/asm/kvm_host.h``.
    """


@hookspec(firstresult=True)
def kvm_arch_geometry(options: Mapping[str, Any]) -> Geometry:
    """*Required.* The stage-2 geometry for these VM options (granule, IPA size, levels).

    Mirrors ``kvm_init_stage2_mmu`` / ``kvm_get_vtcr`` (arm64) and
    ``kvm_mmu_get_tdp_level`` (x86).  Raise :class:`kvmcore.KvmError` (EINVAL) with a
    message naming the limits for a combination the kernel refuses.
    """


@hookspec
def kvm_arch_init_vm(kvm: Vm, options: Mapping[str, Any]) -> None:
    """Set up per-VM arch state in ``kvm.arch_state`` (a dict).  Mirrors ``kvm_arch_init_vm``."""


@hookspec(firstresult=True)
def kvm_arch_handle_stage2_fault(kvm: Vm, vcpu: Vcpu, slot: Memslot, gfn: int, write: bool) -> bool:
    """*Required.* Resolve a stage-2 fault on ``gfn`` of ``slot``; return True.

    Mirrors ``user_mem_abort`` (arm, arm64) and ``kvm_tdp_page_fault`` (x86): decide the
    mapping size (never a block while the slot logs), break or split blocks with the
    TLB maintenance that costs, map writable only for a write while logging, and call
    ``kvm.mark_page_dirty_in_slot(slot, gfn, vcpu)`` when a writable mapping of a
    logging slot is installed.  Called with ``kvm.mmu_lock`` held.  The core retries the
    access afterwards; a handler that leaves the access faulting is an arch bug.
    """


@hookspec(firstresult=True)
def kvm_arch_handle_stage2_faults_batch(kvm: Vm, vcpu: Vcpu, slot: Memslot, gfns: np.ndarray,
                                        write: bool) -> int:
    """Optional.  :func:`kvm_arch_handle_stage2_fault` for runs of faults: the fast path.

    Resolve the faults on ``gfns[0]``, ``gfns[1]``, ... (distinct gfns of ``slot``) in
    this order, exactly as the per-fault hook would, for as long as each resolution
    maps nothing but its own page and leaves its retried access nothing more to do
    (the dirty-logging case: 4K pages made writable, and dirty, one by one); return
    how many were resolved.  The core handles the rest one at a
    time, so returning 0 is always correct.  Page tables, dirty log, statistics and
    TLB maintenance must end as the per-fault hook would leave them (the conformance
    kit checks it).  The core batches only where no access between the faults can
    tell: no stale cached translation on the vCPU and, in a VM with a dirty ring, only
    for an arch whose ``ArchInfo.batched_faults_with_ring`` says it pushes the entries
    in the order of ``gfns``, and never more faults than the ring takes before its
    soft limit.
    """


@hookspec(firstresult=True)
def kvm_mmu_wp_memory_region(kvm: Vm, slot: Memslot) -> None:
    """*Required.* Write-protect every mapping of ``slot`` and flush (``kvm_mmu_wp_memory_region``
    on arm/arm64, ``kvm_mmu_slot_remove_write_access`` + memslot flush on x86)."""


@hookspec(firstresult=True)
def kvm_mmu_write_protect_pt_masked(kvm: Vm, slot: Memslot, gfn_offset: int, mask: int) -> None:
    """*Required.* Re-arm dirty logging for the pages of one bitmap word.

    Mirrors ``kvm_arch_mmu_enable_log_dirty_pt_masked``: page ``gfn_offset + i`` of
    ``slot`` must trap (or be hardware-logged) on its next write for every set bit
    ``i`` of ``mask`` (a non-zero BITS_PER_LONG-bit value), once the caller has flushed
    the TLB.  Protecting more is allowed; less is a lost dirty page.  ``gfn_offset``
    is a multiple of BITS_PER_LONG for GET/CLEAR but arbitrary for a dirty-ring reset.
    Called once per non-zero word with ``kvm.mmu_lock`` held; no flush inside.
    """


@hookspec(firstresult=True)
def kvm_mmu_write_protect_pt_masked_batch(kvm: Vm, slot: Memslot, gfn_offsets: np.ndarray,
                                          masks: np.ndarray) -> None:
    """Optional.  :func:`kvm_mmu_write_protect_pt_masked` for every ``(gfn_offsets[i],
    masks[i])`` of one GET or CLEAR, as numpy arrays, in one call.

    The core prefers it when present; it must leave the page tables, faults and
    flushes exactly as the per-word hook would (the conformance kit checks it).
    """


@hookspec
def kvm_arch_prepare_memory_region(kvm: Vm, old: Memslot | None, new: Memslot | None,
                                   change: MemslotChange) -> None:
    """Optional.  Refuse a memslot change by raising :class:`kvmcore.KvmError`
    (``kvm_arch_prepare_memory_region``: IPA limits, I/O regions with logging)."""


@hookspec(firstresult=True)
def kvm_arch_commit_memory_region(kvm: Vm, old: Memslot | None, new: Memslot | None,
                                  change: MemslotChange) -> None:
    """*Required.* Act on a committed memslot change (``kvm_arch_commit_memory_region``):
    logging on (write-protect or eagerly split, unless INITIALLY_SET), logging off
    (huge pages may return), create, move and delete.  Mappings of a deleted or moved
    slot are already gone when this is called."""


@hookspec(firstresult=True)
def kvm_flush_remote_tlbs(kvm: Vm) -> None:
    """*Required.* Invalidate every vCPU's stage-2 TLB entries of this VM
    (``kvm_arch_flush_remote_tlbs``; a whole-VMID TLBI on arm, a TLB_FLUSH request on x86).
    Use ``kvm.tlb_flush_all(kind=...)``."""


@hookspec(firstresult=True)
def kvm_flush_remote_tlbs_range(kvm: Vm, gfn: int, nr_pages: int) -> bool:
    """Optional.  Invalidate the TLB entries of ``[gfn, gfn + nr_pages)`` and return True
    (``kvm_arch_flush_remote_tlbs_range``); return False or leave unimplemented for the
    core to fall back to :func:`kvm_flush_remote_tlbs`, as the kernel does."""


@hookspec
def kvm_arch_sync_dirty_log(kvm: Vm, slot: Memslot) -> None:
    """Optional.  Bring hardware-held dirty state into the log before GET/CLEAR
    (``kvm_arch_sync_dirty_log``: x86 kicks vCPUs so PML buffers drain)."""


@hookspec(firstresult=True)
def kvm_arch_hw_set_dirty(kvm: Vm, vcpu: Vcpu, slot: Memslot, gfns: np.ndarray) -> None:
    """Optional.  The vCPU's hardware set the D bit of writable leaves for ``gfns``, in
    this order (x86 with PML logs them: the model of ``vmx_flush_pml_buffer``'s source).
    Only leaves created with D clear ever reach it."""


@hookspec(firstresult=True)
def kvm_cpu_dirty_log_size(kvm: Vm) -> int:
    """Optional.  How many dirty GFNs the vCPU's hardware may hold before KVM sees them
    (``kvm_cpu_dirty_log_size``: 512, the PML buffer, on x86 with PML; 0 elsewhere,
    and when unimplemented).  The dirty ring keeps that many entries, plus 64, free
    past its soft limit, so a drain at VM exit never overflows the ring."""


@hookspec
def kvm_arch_vcpu_exit(kvm: Vm, vcpu: Vcpu) -> None:
    """Optional.  The vCPU leaves guest mode (every exit: x86 drains PML here)."""


@hookspec(firstresult=True)
def kvm_arch_check_extension(kvm: Vm, cap: int) -> int | None:
    """Optional.  ``KVM_CHECK_EXTENSION`` for an arch capability; None if not one."""


@hookspec(firstresult=True)
def kvm_arch_enable_cap(kvm: Vm, cap: int, args: tuple[int, ...], flags: int) -> int | None:
    """Optional.  ``kvm_vm_ioctl_enable_cap`` for an arch capability (for example
    ``KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE``); return its result, or None if not one."""
