"""A small stand-in arch for the core's own tests: ARM-like, 4K pages, 2M/1G blocks.

It uses only the public hooks and the core's page-table engine, so it is also the
smallest example of a plugin.  Its switches break it on purpose, to prove that the
core's tests notice a broken arch.
"""

import errno

import numpy as np

import kvmcore
from kvmcore import hookimpl
from kvmcore.geometry import LAST_LEVEL, Geometry
from kvmcore.pgtable import PTE_D, PTE_W, PTE_VALID, WALK_LEAF


class SimpleArch:
    __name__ = "simple"

    X86_RING_CAPS = frozenset({kvmcore.KVM_CAP_DIRTY_LOG_RING, kvmcore.KVM_CAP_DIRTY_LOG_RING_ACQ_REL})
    ARM64_RING_CAPS = frozenset({kvmcore.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, kvmcore.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP})

    def __init__(self, flush: bool = True, protect: bool = True, bits_per_long: int = 64,
                 ring_caps=X86_RING_CAPS, cpu_dirty_log_size: int = 0) -> None:
        self.flush = flush
        self.protect = protect
        self.bpl = bits_per_long
        self.ring_caps = frozenset(ring_caps)
        self.cpu_dirty_log = cpu_dirty_log_size

    @hookimpl
    def kvm_arch_info(self):
        return kvmcore.ArchInfo(name="simple", description="core test stand-in", bits_per_long=self.bpl,
                                nr_address_spaces=2, user_mem_slots=512,
                                manual_dirty_log_caps=kvmcore.KVM_DIRTY_LOG_MANUAL_CAPS,
                                dirty_ring_caps=self.ring_caps, options={"ipa_bits": 40})

    @hookimpl
    def kvm_cpu_dirty_log_size(self, kvm):
        return self.cpu_dirty_log

    @hookimpl
    def kvm_arch_geometry(self, options):
        if not 32 <= options["ipa_bits"] <= 42:
            raise kvmcore.KvmError(errno.EINVAL, "ipa_bits must be 32..42")
        return Geometry(page_shift=12, ipa_bits=options["ipa_bits"], start_level=1 if options["ipa_bits"] > 39 else 2,
                        block_levels={2} | ({1} if options["ipa_bits"] > 39 else set()),
                        bits_per_long=self.bpl)

    @hookimpl
    def kvm_arch_prepare_memory_region(self, kvm, new):
        if new is not None and new.end_gfn > kvm.geometry.max_gfn:
            raise kvmcore.KvmError(errno.EFAULT, "slot beyond the IPA space")

    @hookimpl
    def kvm_arch_handle_stage2_fault(self, kvm, vcpu, slot, gfn, write):
        level = LAST_LEVEL
        if not slot.is_logging:
            for lv in sorted(kvm.geometry.block_levels):
                pages = kvm.geometry.level_pages(lv)
                base = gfn & ~(pages - 1)
                if pages * kvm.page_size <= slot.host_page_size and base >= slot.base_gfn and \
                        base + pages <= slot.end_gfn:
                    level = lv
                    break
        writable = (write or not slot.is_logging) and not slot.readonly
        prot = (PTE_W if writable else 0) | PTE_D
        leaf = kvm.pgtable.leaf(gfn)
        if leaf.valid and leaf.level == level:
            kvm.pgtable.set_entry(leaf.li, leaf.row, leaf.idx, leaf.pte | prot)
            kvm.tlb_flush_ipa(gfn, level)
        else:
            kvm.pgtable.map(gfn, level, prot, tlbi=kvm.tlb_flush_ipa)
        if writable:
            kvm.mark_page_dirty_in_slot(slot, gfn, vcpu)
        return True

    def _wp_range(self, kvm, start_gfn, end_gfn):
        def visit(ctx):
            if ctx.pte & (PTE_VALID | PTE_W) == PTE_VALID | PTE_W:
                return ctx.pte & ~PTE_W
            return None

        shift = kvm.page_shift
        kvm.pgtable.walk(start_gfn << shift, end_gfn << shift, visit, WALK_LEAF)

    @hookimpl
    def kvm_mmu_wp_memory_region(self, kvm, slot):
        if self.protect:
            kvm.pgtable.wrprotect_range(slot.base_gfn, slot.end_gfn)
        kvm.flush_remote_tlbs()

    @hookimpl
    def kvm_mmu_write_protect_pt_masked(self, kvm, slot, gfn_offset, mask):
        if not self.protect:
            return
        low = (mask & -mask).bit_length() - 1
        start = slot.base_gfn + gfn_offset + low
        end = slot.base_gfn + gfn_offset + mask.bit_length()
        self._wp_range(kvm, start, end)

    def _batch(self, kvm, slot, gfn_offsets, masks):
        low = np.array([(int(m) & -int(m)).bit_length() - 1 for m in masks.tolist()], np.int64)
        high = np.array([int(m).bit_length() for m in masks.tolist()], np.int64)
        base = slot.base_gfn + gfn_offsets
        kvm.pgtable.clear_bits_ranges(base + low, base + high, PTE_W)

    @hookimpl
    def kvm_arch_commit_memory_region(self, kvm, old, new, change):
        if new is not None and new.dirty_track_enabled and not kvm.initially_all_set and \
                (old is None or not old.dirty_track_enabled):
            kvm.hook.kvm_mmu_wp_memory_region(kvm=kvm, slot=new)

    @hookimpl
    def kvm_flush_remote_tlbs(self, kvm):
        if self.flush:
            kvm.tlb_flush_all()



class SimpleArchBatch(SimpleArch):
    """The same arch with the batched protect hook."""

    @hookimpl
    def kvm_mmu_write_protect_pt_masked_batch(self, kvm, slot, gfn_offsets, masks):
        if self.protect:
            self._batch(kvm, slot, gfn_offsets, masks)


class SimpleArchFastFaults(SimpleArch):
    """The same arch with the batched fault hook: 4K logging faults in bulk."""

    @hookimpl
    def kvm_arch_handle_stage2_faults_batch(self, kvm, vcpu, slot, gfns, write):
        if not slot.is_logging:
            return 0  # blocks may be mapped: one fault at a time
        writable = write and not slot.readonly
        prot = (PTE_W if writable else 0) | PTE_D
        leaves = kvm.pgtable.lookup(gfns)
        relax = leaves.valid & (leaves.level == LAST_LEVEL)
        kvm.pgtable.set_bits(gfns[relax], prot)
        kvm.tlb_flush_pages(gfns[relax])
        kvm.pgtable.map_pages(gfns[~relax], prot, tlbi=kvm.tlb_flush_ipa)
        if writable:
            kvm.mark_pages_dirty_in_slot(slot, gfns, vcpu)
        return len(gfns)
