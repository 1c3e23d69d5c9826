"""The x86 hooks: thin wrappers that name the kernel entry point and call the MMU model.

:class:`X86` implements the per-word protect hook and the per-fault hook only;
:class:`X86Batched` adds the vectorised batch hooks for both (the registered default).
``bugs`` breaks the plugin on purpose, for tests that must prove they catch a classic
bug:

* ``"no_flush"``: remote TLB flushes do nothing (a D-bit or W-bit clear leaves stale
  TLB entries);
* ``"fast_path_no_dirty"``: the fast page fault restores W without marking the page dirty;
* ``"fix_w_on_large_spte"``: the fast path makes a huge SPTE writable while logging (#8);
* ``"no_cross_two_large_pages"``: INITIALLY_SET protects only the huge page at ``start`` (#6).
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Mapping
from typing import Any

import kvmcore
from arch_plugins.x86 import mmu, pml
from arch_plugins.x86.config import (
    DEFAULTS,
    KVM_ADDRESS_SPACE_NUM,
    KVM_USER_MEM_SLOTS,
    PML_LOG_NR_ENTRIES,
    STAT_NAMES,
    X86State,
    ept_geometry,
    state,
)
from kvmcore import hookimpl
from kvmcore.errors import KvmError
from kvmcore.memslot import MemslotChange

BUGS = frozenset({"no_flush", "fast_path_no_dirty", "fix_w_on_large_spte", "no_cross_two_large_pages",
                  "ring_mixed_batch"})


class X86:
    """KVM on x86 with EPT (``arch/x86/kvm``): per-word protect and per-fault hooks."""

    __name__ = "x86"

    def __init__(self, bugs: Iterable[str] = ()) -> None:
        self.bugs = frozenset(bugs)
        if self.bugs - BUGS:
            raise ValueError(f"unknown bug(s) {sorted(self.bugs - BUGS)}; known: {sorted(BUGS)}")

    @hookimpl
    def kvm_arch_info(self) -> kvmcore.ArchInfo:
        """``arch/x86/include/asm/kvm_host.h``: 64-bit longs, two address spaces (SMM),
        32764 user slots, ``KVM_DIRTY_LOG_MANUAL_CAPS`` with INITIALLY_SET, and the
        dirty ring in both its TSO and acquire/release forms (no ring-with-bitmap),
        whose entries the batched fault path pushes in fault order."""
        return kvmcore.ArchInfo(
            name="x86", description="x86-64 with EPT: 4/5-level, 2M/1G pages, rmap write protect, PML",
            bits_per_long=64, nr_address_spaces=KVM_ADDRESS_SPACE_NUM, user_mem_slots=KVM_USER_MEM_SLOTS,
            manual_dirty_log_caps=kvmcore.KVM_DIRTY_LOG_MANUAL_CAPS, has_readonly_mem=True,
            dirty_ring_caps={kvmcore.KVM_CAP_DIRTY_LOG_RING, kvmcore.KVM_CAP_DIRTY_LOG_RING_ACQ_REL},
            options=DEFAULTS, batched_faults_with_ring=True)

    @hookimpl
    def kvm_arch_geometry(self, options: Mapping[str, Any]) -> kvmcore.Geometry:
        """``kvm_mmu_get_tdp_level``: 4- or 5-level EPT."""
        return ept_geometry(options)

    @hookimpl
    def kvm_arch_init_vm(self, kvm, options: Mapping[str, Any]) -> None:
        """``kvm_arch_init_vm``: the MMU configuration of this VM (module parameters here),
        and x86's own statistics, listed at 0."""
        kvm.arch_state["x86"] = X86State(
            pml=options["dirty_tracking"] == "pml", eager_page_split=options["eager_page_split"],
            tdp_mmu=options["tdp_mmu"], recovery=options["huge_page_recovery"], bugs=self.bugs)
        for name in STAT_NAMES:
            kvm.stats.setdefault(name, 0)

    @hookimpl
    def kvm_arch_prepare_memory_region(self, kvm, old, new, change) -> None:
        """``kvm_arch_prepare_memory_region``: a slot must end below the largest GPA
        (``kvm_mmu_max_gfn``; here the EPT's reach)."""
        if change in (MemslotChange.CREATE, MemslotChange.MOVE) and new.end_gfn > kvm.geometry.max_gfn:
            raise KvmError(errno.EINVAL, f"slot ends at gpa {new.end_gfn << kvm.page_shift:#x}, beyond the "
                                         f"{kvm.geometry.ipa_bits}-bit GPA space of {kvm.geometry.levels}-level EPT")

    @hookimpl
    def kvm_arch_commit_memory_region(self, kvm, old, new, change) -> None:
        """``kvm_arch_commit_memory_region`` → ``kvm_mmu_slot_apply_flags``."""
        if change is MemslotChange.DELETE:
            mmu.forget_host_memory(kvm, old)
        mmu.kvm_mmu_slot_apply_flags(kvm, old, new, change)

    @hookimpl
    def kvm_arch_handle_stage2_fault(self, kvm, vcpu, slot, gfn: int, write: bool) -> bool:
        """An EPT violation: an exit, so the PML log is flushed first (``vmx_handle_exit``),
        then ``kvm_tdp_page_fault``."""
        if state(kvm).pml:
            pml.vmx_flush_pml_buffer(kvm, vcpu)
        mmu.kvm_tdp_page_fault(kvm, vcpu, slot, gfn, write)
        return True

    @hookimpl
    def kvm_mmu_wp_memory_region(self, kvm, slot) -> None:
        mmu.kvm_mmu_wp_memory_region(kvm, slot)

    @hookimpl
    def kvm_mmu_write_protect_pt_masked(self, kvm, slot, gfn_offset: int, mask: int) -> None:
        """``kvm_arch_mmu_enable_log_dirty_pt_masked``, one gfn at a time."""
        mmu.kvm_arch_mmu_enable_log_dirty_pt_masked(kvm, slot, gfn_offset, mask)

    @hookimpl
    def kvm_flush_remote_tlbs(self, kvm) -> None:
        """``kvm_arch_flush_remote_tlbs``: KVM_REQ_TLB_FLUSH to every vCPU, a full flush."""
        if "no_flush" not in self.bugs:
            kvm.tlb_flush_all(kind="full")

    @hookimpl
    def kvm_flush_remote_tlbs_range(self, kvm, gfn: int, nr_pages: int) -> bool:
        """``kvm_arch_flush_remote_tlbs_range``: only Hyper-V's enlightened flush can do a
        range (-EOPNOTSUPP otherwise), so the core falls back to a full flush."""
        kvm.stats["tlb_range_flush_fallbacks"] += 1
        return False

    @hookimpl
    def kvm_arch_sync_dirty_log(self, kvm, slot) -> None:
        """``kvm_arch_sync_dirty_log``: with PML, kick every vCPU so its log is flushed."""
        if state(kvm).pml:
            pml.kvm_arch_sync_dirty_log(kvm)

    @hookimpl
    def kvm_arch_hw_set_dirty(self, kvm, vcpu, slot, gfns) -> None:
        """The CPU set EPT D bits: with PML it logs the GPAs."""
        if state(kvm).pml:
            pml.pml_log(kvm, vcpu, gfns)

    @hookimpl
    def kvm_cpu_dirty_log_size(self, kvm) -> int:
        """``kvm_cpu_dirty_log_size``: the PML log's 512 entries when PML is on, else 0."""
        return PML_LOG_NR_ENTRIES if state(kvm).pml else 0

    @hookimpl
    def kvm_arch_vcpu_exit(self, kvm, vcpu) -> None:
        """Every exit flushes the PML log (``vmx_flush_pml_buffer`` in ``vmx_handle_exit``)."""
        if state(kvm).pml:
            pml.vmx_flush_pml_buffer(kvm, vcpu)


class X86Batched(X86):
    """:class:`X86` with the vectorised batch hooks (protect, faults)."""

    @hookimpl
    def kvm_arch_handle_stage2_faults_batch(self, kvm, vcpu, slot, gfns, write: bool) -> int:
        """A run of EPT violations that each touch only their own 4K SPTE: one exit's PML
        flush, then ``kvm_tdp_page_fault`` for each, the fast-path fixes together."""
        if state(kvm).pml:
            pml.vmx_flush_pml_buffer(kvm, vcpu)
        return mmu.kvm_tdp_page_faults_batch(kvm, vcpu, slot, gfns, write)

    @hookimpl
    def kvm_mmu_write_protect_pt_masked_batch(self, kvm, slot, gfn_offsets, masks) -> None:
        mmu.enable_log_dirty_pt_masked_batch(kvm, slot, gfn_offsets, masks)
