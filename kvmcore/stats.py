"""Counters of what dirty tracking cost: faults, protections, flushes, splits."""

import collections

STAT_NAMES = (
    "write_faults",             # stage-2 write faults handed to the arch
    "read_faults",              # stage-2 read faults handed to the arch
    "fault_retries",            # accesses that faulted again after their fault was handled
    "hw_dirty_bits_set",        # D bits the hardware set (PML's source)
    "pages_write_protected",    # pages whose mapping lost W (a block counts all its pages)
    "leaves_write_protected",   # leaf entries that lost W
    "huge_pages_split",         # blocks replaced by a table (eager or on fault)
    "blocks_mapped",            # block leaves installed
    "pages_mapped",             # last-level leaves installed
    "page_tables",              # table pages in use, the concatenated root included
    "tlb_flushes",              # every TLB invalidation, of any scope
    "tlb_flushes_full",         # whole-VM (VMID) invalidations
    "tlb_flushes_range",        # range invalidations (a memslot, a GET/CLEAR)
    "tlb_flushes_ipa",          # single-entry invalidations (TLBI IPA, break-before-make)
    "pages_dirtied",            # bits newly set in a dirty bitmap, or entries pushed to a ring
    "mark_page_dirty_calls",    # calls of mark_page_dirty_in_slot for a logging slot
    "dirty_log_gets",           # KVM_GET_DIRTY_LOG calls that succeeded
    "dirty_log_clears",         # KVM_CLEAR_DIRTY_LOG calls that succeeded
    "protect_hook_calls",       # kvm_mmu_write_protect_pt_masked calls (batched: words)
    "vcpu_exits",               # returns from guest mode to the VMM
    "dirty_ring_pushes",        # entries pushed to a vCPU's dirty ring
    "dirty_ring_full_exits",    # KVM_EXIT_DIRTY_RING_FULL returns to the VMM
    "dirty_ring_resets",        # entries reset by KVM_RESET_DIRTY_RINGS
    "dirty_ring_invalid_entries",  # of those, entries skipped as invalid (bad slot, offset)
    "dirty_marks_dropped",      # marks with nowhere to go (ring VM, no vCPU, no bitmap)
)


class Stats(collections.Counter):
    """A ``Counter`` that lists every known statistic, at 0 until it happens."""

    def __init__(self) -> None:
        super().__init__({name: 0 for name in STAT_NAMES})

    def snapshot(self) -> dict[str, int]:
        return dict(self)
