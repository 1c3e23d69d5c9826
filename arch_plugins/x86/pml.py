"""Page Modification Logging (``arch/x86/kvm/vmx/vmx.c``).

With PML the CPU appends the GPA of every write that sets an EPT D bit to a 512-entry
per-vCPU log.  KVM empties the log into the dirty bitmap at the start of every VM exit
(``vmx_flush_pml_buffer``) and kicks every vCPU before GET/CLEAR
(``kvm_arch_sync_dirty_log``); when the log is full the next logging write exits first
(``EXIT_REASON_PML_FULL``).  Entries are read in write order (as since 2025, so a dirty
ring would see the writes in order).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

from arch_plugins.x86.config import PML_LOG_NR_ENTRIES, state

if TYPE_CHECKING:
    from kvmcore.vcpu import Vcpu
    from kvmcore.vm import Vm


class PmlBuffer:
    """``vmx->pml_pg`` and ``GUEST_PML_INDEX``: the gfns logged since the last flush."""

    def __init__(self) -> None:
        self.gfns: list[int] = []
        self.lock = threading.Lock()  # the CPU appends while KVM may be flushing


def pml_buffer(vcpu: Vcpu) -> PmlBuffer:
    buf = vcpu.arch_state.get("pml")
    if buf is None:
        buf = vcpu.arch_state.setdefault("pml", PmlBuffer())
    return buf


def pml_log(kvm: Vm, vcpu: Vcpu, gfns: np.ndarray) -> None:
    """The CPU set D bits for ``gfns``: log each one, taking a PML-full exit (flush the
    log, ``handle_pml_full``) when the log has no room left.  PML runs only while at
    least one slot logs (``vmx_update_cpu_dirty_logging``)."""
    if not state(kvm).nr_memslots_dirty_logging:
        return
    buf = pml_buffer(vcpu)
    for gfn in np.asarray(gfns, np.int64).tolist():
        if len(buf.gfns) == PML_LOG_NR_ENTRIES:
            kvm.stats["pml_full_exits"] += 1
            vmx_flush_pml_buffer(kvm, vcpu)
        with buf.lock:
            buf.gfns.append(gfn)
        kvm.stats["pml_entries_logged"] += 1


def vmx_flush_pml_buffer(kvm: Vm, vcpu: Vcpu) -> None:
    """``vmx_flush_pml_buffer``: every logged gfn → ``kvm_vcpu_mark_page_dirty``, in order.
    A gfn whose slot no longer logs (or exists) is dropped there."""
    buf = pml_buffer(vcpu)
    with buf.lock:
        gfns, buf.gfns = buf.gfns, []
    if not gfns:
        return
    kvm.stats["pml_buffer_flushes"] += 1
    gfns = np.array(gfns, np.int64)
    idx, slots = kvm.slots_for(gfns)
    cuts = np.flatnonzero(np.diff(idx)) + 1
    for run_idx, run in zip(np.split(idx, cuts), np.split(gfns, cuts)):
        if run_idx[0] >= 0:
            kvm.mark_pages_dirty_in_slot(slots[run_idx[0]], run, vcpu)


def kvm_arch_sync_dirty_log(kvm: Vm) -> None:
    """``kvm_arch_sync_dirty_log``: kick every vCPU out of guest mode, which flushes its log."""
    for vcpu in kvm.vcpus:
        with vcpu.guest_lock:
            vmx_flush_pml_buffer(kvm, vcpu)
