"""Broken arch plugins, one classic bug each (kernel-dirty-log.md section 8), built on
the stand-in arch.  The conformance kit must fail every one of them."""

import kvmcore
from kvmcore import hookimpl
from kvmcore.geometry import LAST_LEVEL
from kvmcore.pgtable import PTE_D, PTE_VALID, PTE_W
from simple_arch import SimpleArch, SimpleArchBatch

PMD_LEVEL, PUD_LEVEL = 2, 1  # 2 MiB and 1 GiB entries of the stand-in's 4K geometry


def protect_leaf(kvm, gfn):
    """Clear W on the leaf mapping ``gfn`` (a block loses it as a whole)."""
    leaf = kvm.pgtable.leaf(gfn)
    if leaf.pte & (PTE_VALID | PTE_W) == PTE_VALID | PTE_W:
        kvm.pgtable.set_entry(leaf.li, leaf.row, leaf.idx, leaf.pte & ~PTE_W)


class DropTopBit(SimpleArch):
    """Bug 7's cousin: the highest bit of the word is lost (``mask & ~(1 << 63)``)."""

    @hookimpl
    def kvm_mmu_write_protect_pt_masked(self, kvm, slot, gfn_offset, mask):
        mask &= ~(1 << (kvm.bits_per_long - 1))
        if mask:
            super().kvm_mmu_write_protect_pt_masked(kvm, slot, gfn_offset, mask)


class FlsWithoutPlusOne(SimpleArch):
    """Bug 7: ``__fls(mask)`` used as an exclusive end, so the last masked page stays writable."""

    @hookimpl
    def kvm_mmu_write_protect_pt_masked(self, kvm, slot, gfn_offset, mask):
        low = (mask & -mask).bit_length() - 1
        start = slot.base_gfn + gfn_offset + low
        end = slot.base_gfn + gfn_offset + mask.bit_length() - 1
        self._wp_range(kvm, start, end)


class SkippedBoundary(SimpleArch):
    """Bug 5, as in the seed's v7 walk: at ``level`` the walk steps ``addr += SIZE``
    instead of to the clamped ``p*d_addr_end``, so a range starting inside one entry
    never visits the pages past its boundary."""

    level = PMD_LEVEL

    def _wp_range(self, kvm, start_gfn, end_gfn):
        step = kvm.geometry.level_pages(self.level)
        addr = start_gfn
        while addr < end_gfn:
            entry_end = (addr // step + 1) * step
            for gfn in range(addr, min(end_gfn, entry_end)):
                protect_leaf(kvm, gfn)
            addr += step  # the bug: should be entry_end


class SkippedPmdBoundary(SkippedBoundary):
    level = PMD_LEVEL


class SkippedPudBoundary(SkippedBoundary):
    level = PUD_LEVEL


class MissingFlush(SimpleArch):
    """Bug 4: ``kvm_flush_remote_tlbs`` does nothing, so stale writable TLB entries live on."""

    def __init__(self):
        super().__init__(flush=False)


class WritableBlockOnFault(SimpleArch):
    """Bug 8: a write fault on a write-protected block makes the whole block writable and
    marks only the faulting gfn."""

    @hookimpl
    def kvm_arch_handle_stage2_fault(self, kvm, vcpu, slot, gfn, write):
        leaf = kvm.pgtable.leaf(gfn)
        if write and slot.is_logging and leaf.valid and leaf.level < LAST_LEVEL:
            kvm.pgtable.set_entry(leaf.li, leaf.row, leaf.idx, leaf.pte | PTE_W | PTE_D)
            kvm.tlb_flush_ipa(gfn, leaf.level)
            kvm.mark_page_dirty_in_slot(slot, gfn, vcpu)
            return True
        return super().kvm_arch_handle_stage2_fault(kvm, vcpu, slot, gfn, write)


class ReadFaultWritable(SimpleArch):
    """Bug 9: a read fault while logging maps the page writable without marking it."""

    @hookimpl
    def kvm_arch_handle_stage2_fault(self, kvm, vcpu, slot, gfn, write):
        if write or not slot.is_logging:
            return super().kvm_arch_handle_stage2_fault(kvm, vcpu, slot, gfn, write)
        kvm.pgtable.map(gfn, LAST_LEVEL, PTE_W | PTE_D, tlbi=kvm.tlb_flush_ipa)
        return True


class NoInitialProtect(SimpleArch):
    """Spec 7.11 skipped: turning logging on does not write-protect what is mapped."""

    @hookimpl
    def kvm_arch_commit_memory_region(self, kvm, old, new, change):
        return None


class Truncated32(SimpleArch):
    """Bug 14: on a BITS_PER_LONG=32 arch the walk computes ``gfn << PAGE_SHIFT`` in an
    unsigned long, so ranges at or above 4 GiB are walked at their address mod 4 GiB."""

    def __init__(self):
        super().__init__(bits_per_long=32)

    def _wp_range(self, kvm, start_gfn, end_gfn):
        shift = kvm.page_shift
        start = (start_gfn << shift) & 0xFFFFFFFF
        end = (end_gfn << shift) & 0xFFFFFFFF
        super()._wp_range(kvm, start >> shift, end >> shift)


class MaskTruncated32(SimpleArch):
    """Bug 14's other face: the 64-bit mask passed through a 32-bit int."""

    @hookimpl
    def kvm_mmu_write_protect_pt_masked(self, kvm, slot, gfn_offset, mask):
        mask &= 0xFFFFFFFF
        if mask:
            super().kvm_mmu_write_protect_pt_masked(kvm, slot, gfn_offset, mask)


class SloppyBatch(SimpleArchBatch):
    """A batched hook that protects whole words instead of the [ffs, fls] range: safe
    (over-protection), but not what the per-word hook does, so faults and tables differ."""

    @hookimpl
    def kvm_mmu_write_protect_pt_masked_batch(self, kvm, slot, gfn_offsets, masks):
        base = slot.base_gfn + gfn_offsets
        kvm.pgtable.clear_bits_ranges(base, base + kvm.bits_per_long, PTE_W)


MUTANTS = {
    "drop-top-bit": DropTopBit,
    "fls-without-plus-one": FlsWithoutPlusOne,
    "skipped-2m-boundary": SkippedPmdBoundary,
    "skipped-1g-boundary": SkippedPudBoundary,
    "missing-flush": MissingFlush,
    "writable-block-on-fault": WritableBlockOnFault,
    "read-fault-writable": ReadFaultWritable,
    "no-initial-protect": NoInitialProtect,
    "truncated-32": Truncated32,
    "mask-truncated-32": MaskTruncated32,
    "sloppy-batch": SloppyBatch,
}



class WrongGranule(SimpleArch):
    """Geometry that disagrees with its own option: ``granule=16384`` yet 4K pages."""

    @hookimpl
    def kvm_arch_info(self):
        return kvmcore.ArchInfo(name="simple", description="wrong granule", options={"ipa_bits": 40, "granule": 16384})


class UnresolvedReadFault(SimpleArch):
    """A read fault while logging is left unresolved: the access can never complete."""

    @hookimpl
    def kvm_arch_handle_stage2_fault(self, kvm, vcpu, slot, gfn, write):
        if not write and slot.is_logging:
            return True
        return super().kvm_arch_handle_stage2_fault(kvm, vcpu, slot, gfn, write)


MUTANTS.update({"wrong-granule": WrongGranule, "unresolved-read-fault": UnresolvedReadFault})


# -- mutants of the real plugins: the module's hooks, one of them broken ---------------

class _Mutant:
    """A plugin object holding another plugin's hookimpls, with some replaced or left out."""


def mutate(module, name, drop=(), **overrides):
    plugin = _Mutant()
    plugin.__name__ = f"{module.__name__}[{name}]"
    for attr in dir(module):
        fn = getattr(module, attr)
        if hasattr(fn, "kvmcore_impl") and attr not in drop and attr not in overrides:
            setattr(plugin, attr, fn)
    for attr, fn in overrides.items():
        setattr(plugin, attr, hookimpl(fn))
    return plugin


def _protect_with(walker):
    """A per-word protect hook that write-protects ``[__ffs, __fls]`` of each word with
    ``walker``'s broken ``_wp_range``."""
    from arch_plugins.arm_common import mask_range

    def protect(kvm, slot, gfn_offset, mask):
        walker._wp_range(kvm, *mask_range(slot.base_gfn + gfn_offset, mask))

    return protect


def arm64_skipped_2m_boundary():
    """arm64 whose re-arm walk steps ``addr += PMD_SIZE`` (the seed's v7 walk), with its
    batched hook left out so that the broken one runs."""
    import arch_plugins.arm64 as arm64

    return mutate(arm64, "skipped-2m-boundary", drop=["kvm_mmu_write_protect_pt_masked_batch"],
                  kvm_mmu_write_protect_pt_masked=_protect_with(SkippedPmdBoundary()))


def x86_no_flush():
    """x86 whose remote TLB flushes do nothing."""
    import arch_plugins.x86 as x86

    def flush(kvm):
        return None

    def flush_range(kvm, gfn, nr_pages):
        return True

    return mutate(x86, "no-flush", kvm_flush_remote_tlbs=flush, kvm_flush_remote_tlbs_range=flush_range)


def arm_truncated_ipa():
    """32-bit arm whose re-arm walk computes ``gfn << PAGE_SHIFT`` in an unsigned long."""
    import arch_plugins.arm as arm

    return mutate(arm, "truncated-ipa", drop=["kvm_mmu_write_protect_pt_masked_batch"],
                  kvm_mmu_write_protect_pt_masked=_protect_with(Truncated32()))


REAL_MUTANTS = {"arm64-skipped-2m-boundary": arm64_skipped_2m_boundary, "x86-no-flush": x86_no_flush,
                "arm-truncated-ipa": arm_truncated_ipa}
