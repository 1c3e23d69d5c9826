"""The ARMv7 LPAE stage-2 fault path of v3.19 (``arch/arm/kvm/mmu.c``).

Before ``kvm_pgtable``: the fault handler edits pmd and pte entries itself, and every
TLB invalidation, even of one IPA, is a whole-VMID ``TLBIALLIS`` on ARMv7
(``__kvm_tlb_flush_vmid_ipa`` in ``interrupts.S``: "As v7 does not support flushing
per IPA, just nuke the whole TLB instead").

Every leaf is installed with the model's D bit set: KVM's stage 2 on arm keeps no
hardware dirty state (no DBM), so write permission alone decides what traps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from arch_plugins.arm_common import huge_mapping_level
from arch_plugins.arm_common.fastpath import handle_faults_batch, no_tlbi
from kvmcore.geometry import LAST_LEVEL
from kvmcore.pgtable import PTE_D, PTE_W, Leaves

if TYPE_CHECKING:
    from kvmcore.memslot import Memslot
    from kvmcore.vcpu import Vcpu
    from kvmcore.vm import Vm

PMD_LEVEL = 2  # the only block level: 2 MiB sections; KVM never maps a 1 GiB pud block


def kvm_tlb_flush_vmid_ipa(kvm: Vm, gfn: int = 0, level: int = LAST_LEVEL, count: int = 1) -> None:
    """``kvm_tlb_flush_vmid_ipa``: on ARMv7 the IPA is ignored and the whole VMID goes
    (``count`` of them back to back: the batched fault path)."""
    kvm.tlb_flush_all(kind="full", count=count)


def _clear_and_flush(kvm: Vm, li: int, row: int, idx: int) -> None:
    """Clear a present entry, then flush (the ``pmd_clear``/``kvm_set_pte(pte, 0)`` +
    ``kvm_tlb_flush_vmid_ipa`` pairs of ``stage2_set_pte``)."""
    kvm.pgtable.set_entry(li, row, idx, 0)
    kvm_tlb_flush_vmid_ipa(kvm)


def stage2_dissolve_pmd(kvm: Vm, gfn: int) -> None:
    """``stage2_dissolve_pmd``: while logging, clear a 2 MiB block covering ``gfn`` and
    flush; its other pages fault back in one by one."""
    leaf = kvm.pgtable.leaf(gfn)
    if leaf.valid and leaf.level == PMD_LEVEL:
        _clear_and_flush(kvm, leaf.li, leaf.row, leaf.idx)
        kvm.stats["huge_pages_split"] += 1


def stage2_set_pmd_huge(kvm: Vm, gfn: int, prot: int) -> None:
    """``stage2_set_pmd_huge``: install a 2 MiB block; a present entry is cleared and
    flushed first.  A pte table left by an earlier dissolve is unmapped with it (the
    later fix, "Fix handling of stage2 huge mappings", that v3.19 lacked)."""
    leaf = kvm.pgtable.leaf(gfn)
    if leaf.valid and leaf.level == PMD_LEVEL:
        _clear_and_flush(kvm, leaf.li, leaf.row, leaf.idx)
    kvm.pgtable.map(gfn, PMD_LEVEL, prot, tlbi=lambda g, lv: kvm_tlb_flush_vmid_ipa(kvm))


def stage2_set_pte(kvm: Vm, gfn: int, prot: int, logging_active: bool) -> None:
    """``stage2_set_pte``: dissolve a block while logging, then install the pte; a
    present pte is cleared and flushed before the new one is written."""
    if logging_active:
        stage2_dissolve_pmd(kvm, gfn)
    leaf = kvm.pgtable.leaf(gfn)
    if leaf.valid and leaf.level == LAST_LEVEL:
        _clear_and_flush(kvm, leaf.li, leaf.row, leaf.idx)
    kvm.pgtable.map(gfn, LAST_LEVEL, prot, tlbi=lambda g, lv: kvm_tlb_flush_vmid_ipa(kvm))


def user_mem_abort(kvm: Vm, vcpu: Vcpu, slot: Memslot, gfn: int, write: bool) -> None:
    """``user_mem_abort`` (v3.19): a 2 MiB block when the slot does not log and the host
    backing allows it; otherwise a pte, read-only for a read while logging, and the
    page marked dirty whenever the pte is writable."""
    logging_active = slot.is_logging
    writable = not slot.readonly and (write or not logging_active)
    prot = PTE_D | (PTE_W if writable else 0)
    if not logging_active and huge_mapping_level(kvm, slot, gfn) == PMD_LEVEL:
        stage2_set_pmd_huge(kvm, gfn, prot)
        return
    if writable:
        kvm.mark_page_dirty_in_slot(slot, gfn, vcpu)
    stage2_set_pte(kvm, gfn, prot, logging_active)


def user_mem_abort_batch(kvm: Vm, vcpu: Vcpu, slot: Memslot, gfns: np.ndarray, write: bool) -> int:
    """:func:`user_mem_abort` on ``gfns[0]``, ``gfns[1]``, ... for as long as each maps
    a pte (see :mod:`arch_plugins.arm_common.fastpath`); returns how many.

    A run of faults: the pages are marked dirty if the pte is writable; each present
    pte is cleared (``kvm_set_pte(pte, 0)``), flushed and rewritten, so N present ptes
    cost N whole-VMID flushes, counted as such (the TLBs are invalidated once: nothing
    runs in between); absent ptes are mapped as ``stage2_set_pte`` maps them one by one.
    The first fault under each 2 MiB block goes through :func:`user_mem_abort` itself
    (``stage2_dissolve_pmd``).

    A present pte that is read-only (the write-protected page of a write fault) is
    rewritten in place by ``map_pages``: the same entry, counters and flushes as
    clearing it first, without reporting the momentary invalid entry as a restriction
    (nobody can see it: the MMU lock is held and the VMID is flushed after it).  A
    present writable pte, which the core never hands over, goes through
    :func:`user_mem_abort` itself (it touches nothing but its own pte).
    """
    writable = not slot.readonly and (write or not slot.is_logging)
    prot = PTE_D | (PTE_W if writable else 0)

    def resolve_one(gfn: int) -> None:
        user_mem_abort(kvm, vcpu, slot, gfn, write)

    def resolve_run(run: np.ndarray, leaves: Leaves) -> None:
        present = leaves.valid        # ptes: nothing here is under a block
        was_writable = present & ((leaves.pte & np.uint64(PTE_W)) != 0)
        if was_writable.any():
            for gfn in run[was_writable].tolist():
                resolve_one(gfn)
            keep = ~was_writable
            run, leaves, present = run[keep], leaves.take(keep), present[keep]
        if writable:
            kvm.mark_pages_dirty_in_slot(slot, run, vcpu)
        replaced = int(present.sum())
        if replaced:
            kvm_tlb_flush_vmid_ipa(kvm, count=replaced)
        kvm.pgtable.map_pages(run, prot, no_tlbi)

    return handle_faults_batch(kvm, slot, gfns, resolve_one, resolve_run)
