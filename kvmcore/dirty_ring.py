"""The per-vCPU dirty ring (``virt/kvm/dirty_ring.c``, ``include/linux/kvm_dirty_ring.h``).

A ring is an array of ``struct kvm_dirty_gfn`` that the kernel shares with userspace
(``mmap`` of the vCPU fd at page ``KVM_DIRTY_LOG_PAGE_OFFSET``).  The kernel pushes
``(slot, offset)`` with ``flags = DIRTY``; userspace harvests entries in order from
its own fetch index and sets ``flags = RESET``; ``KVM_RESET_DIRTY_RINGS`` walks each
ring from its reset index while the RESET bit is set, clears the flags and
re-protects the pages.  Here :attr:`DirtyRing.entries` is that array, a numpy
structured array with the kernel's 16-byte layout, so a test can read or write it
exactly as a VMM reads or writes the mapping (including writing garbage to it).

The reset mirrors the 2025 bounded form of ``kvm_dirty_ring_reset`` ("KVM: Dirty ring
fixes and cleanups": at most ``INT_MAX`` entries per ioctl, counted over all vCPUs;
the empty-run check in the caller) and the 2026 ``kvm_reset_dirty_gfn`` that also
rejects ``offset >= npages`` on its own ("KVM: Reject wrapped offset in
kvm_reset_dirty_gfn()"), so an offset near 2**64 cannot wrap past the bounds check.
The model has no signals, so the ``-EINTR`` bail-out has nothing to mirror.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import numpy as np

from kvmcore.memslot import word_dtype
from kvmcore.uapi import KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET

if TYPE_CHECKING:
    from kvmcore.memslot import Memslot
    from kvmcore.vm import Vm

DIRTY_GFN_DTYPE = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])
"""``struct kvm_dirty_gfn``: 16 bytes, little-endian, as the mapped ring."""
HARVEST_DTYPE = np.dtype([("slot", "<u4"), ("offset", "<u8")])
"""What a harvest returns: the ``(slot, offset)`` of each collected entry, in order."""

KVM_DIRTY_RING_RSVD_ENTRIES = 64
KVM_DIRTY_RING_MAX_ENTRIES = 65536
MAX_RING_BYTES = KVM_DIRTY_RING_MAX_ENTRIES * DIRTY_GFN_DTYPE.itemsize
INT_MAX = (1 << 31) - 1
RESET_BUDGET = INT_MAX
"""Entries one ``KVM_RESET_DIRTY_RINGS`` may reset, over all vCPUs (2025 bound)."""

_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1


class DirtyRingOverflowError(RuntimeError):
    """A push into a full ring.  The kernel WARNs and overwrites an unharvested entry
    (a lost dirty page); the model refuses.  Only an arch that pushes more entries
    between two guest entries than it reserved (``kvm_cpu_dirty_log_size``) gets here."""


@attrs.frozen
class Run:
    """One coalesced reset: ``mask`` bit ``i`` is page ``offset + i`` of ``slot``;
    ``entries`` is how many ring entries it stands for."""

    slot: int
    offset: int
    mask: int
    entries: int


def rsvd_entries(cpu_dirty_log_size: int) -> int:
    """``kvm_dirty_ring_get_rsvd_entries``: headroom kept past the soft limit."""
    return KVM_DIRTY_RING_RSVD_ENTRIES + cpu_dirty_log_size


def fls(mask: int) -> int:
    """``__fls``: index of the highest set bit (``mask`` is non-zero)."""
    return mask.bit_length() - 1


def coalesce(slots: list[int], offsets: list[int], bits_per_long: int) -> list[Run]:
    """The coalescing loop of ``kvm_dirty_ring_reset``, one step per entry.

    Same-slot entries within a ``BITS_PER_LONG`` window join the current run:
    forward (``0 <= delta < BPL``: set bit ``delta``), or backward (``-BPL < delta <
    0``) if shifting the mask up by ``-delta`` loses no bit, rebasing the run at
    the new offset.  Anything else closes the run.  ``delta`` is the u64 difference
    read as s64 and the mask is an unsigned long, as in C.
    """
    runs: list[Run] = []
    word = (1 << bits_per_long) - 1
    cur_slot = cur_offset = mask = count = 0
    for next_slot, next_offset in zip(slots, offsets):
        if mask:
            if next_slot == cur_slot:
                delta = (next_offset - cur_offset) & _U64
                if delta >= 1 << 63:
                    delta -= 1 << 64
                if 0 <= delta < bits_per_long:
                    mask |= 1 << delta
                    count += 1
                    continue
                if -bits_per_long < delta < 0 and ((mask << -delta) & word) >> -delta == mask:
                    cur_offset = next_offset
                    mask = ((mask << -delta) & word) | 1
                    count += 1
                    continue
            runs.append(Run(cur_slot, cur_offset, mask, count))
        cur_slot, cur_offset, mask, count = next_slot, next_offset, 1, 1
    if mask:
        runs.append(Run(cur_slot, cur_offset, mask, count))
    return runs


def reset_target(kvm: Vm, slot: int, offset: int, mask: int) -> Memslot | None:
    """The checks of ``kvm_reset_dirty_gfn``: the memslot to re-protect, or None to
    skip the run silently (bad address space or id, no such slot, or pages past
    its end).  ``offset >= npages`` is checked on its own first, as the 2026 fix
    does, so ``offset + __fls(mask)`` cannot wrap around 2**64."""
    as_id, slot_id = slot >> 16, slot & 0xFFFF
    if as_id >= kvm.info.nr_address_spaces or slot_id >= kvm.info.user_mem_slots:
        return None
    ms = kvm.id_to_memslot(as_id, slot_id)
    if ms is None or offset >= ms.npages or ((offset + fls(mask)) & _U64) >= ms.npages:
        return None
    return ms


def reset_dirty_gfns(kvm: Vm, runs: list[Run]) -> None:
    """``kvm_reset_dirty_gfn`` for each run, in order: re-protect the valid ones under
    the MMU lock (the arch's ``kvm_mmu_write_protect_pt_masked`` with an arbitrary,
    not word-aligned, gfn offset; its batched form, per memslot, if it has one)."""
    groups: dict[int, tuple[Memslot, list[int], list[int]]] = {}
    invalid = 0
    for run in runs:
        ms = reset_target(kvm, run.slot, run.offset, run.mask)
        if ms is None:
            invalid += run.entries
            continue
        group = groups.setdefault(id(ms), (ms, [], []))
        group[1].append(run.offset)
        group[2].append(run.mask)
    kvm.stats["dirty_ring_invalid_entries"] += invalid
    with kvm.mmu_lock:
        for ms, offsets, masks in groups.values():
            # u64 offsets as the s64 they add as (base_gfn + offset wraps in C): only a
            # validation without the offset check lets one >= 2**63 through.
            gfn_offsets = np.array(offsets, np.uint64).view(np.int64)
            kvm.enable_log_dirty_pt_masked(ms, gfn_offsets, np.array(masks, word_dtype(kvm.bits_per_long)))


def harvest(entries: np.ndarray, fetch_index: int) -> tuple[np.ndarray, int]:
    """What a VMM does with a mapped ring (api.rst "KVM_CAP_DIRTY_LOG_RING", the
    selftest's ``dirty_ring_collect_one``): from its own fetch index, collect entries
    while ``flags == DIRTY``, in order, stopping at the first other entry, and mark
    each collected one ``flags = RESET``.  Returns the ``(slot, offset)`` records and
    the new fetch index (a free-running u32).

    The flags are all read before any payload and the RESET stores come after the
    payload loads, in program order: on x86 (TSO) plain loads and stores are the
    load-acquire / store-release the protocol asks for.  A weakly ordered host
    would need real barriers between the three steps.
    """
    size = len(entries)
    idx = (fetch_index + np.arange(size, dtype=np.int64)) & (size - 1)
    flags = entries["flags"][idx]
    other = flags != KVM_DIRTY_GFN_F_DIRTY
    n = int(np.argmax(other)) if other.any() else size
    sel = idx[:n]
    out = np.empty(n, HARVEST_DTYPE)
    out["slot"] = entries["slot"][sel]
    out["offset"] = entries["offset"][sel]
    entries["flags"][sel] = KVM_DIRTY_GFN_F_RESET
    return out, (fetch_index + n) & _U32


@attrs.define(eq=False)
class DirtyRing:
    """``struct kvm_dirty_ring`` of one vCPU.

    ``dirty_index`` and ``reset_index`` are the kernel's free-running u32 counters
    (they are not in the shared mapping); ``fetch_index`` is the VMM's own index for
    :func:`harvest`, kept here because the model is both sides.
    """

    size: int
    soft_limit: int
    entries: np.ndarray = attrs.field(repr=False)
    dirty_index: int = 0
    reset_index: int = 0
    fetch_index: int = 0

    @classmethod
    def alloc(cls, size_bytes: int, rsvd: int) -> DirtyRing:
        """``kvm_dirty_ring_alloc``: ``size_bytes / 16`` zeroed entries."""
        size = size_bytes // DIRTY_GFN_DTYPE.itemsize
        return cls(size=size, soft_limit=size - rsvd, entries=np.zeros(size, DIRTY_GFN_DTYPE))

    @property
    def used(self) -> int:
        """``kvm_dirty_ring_used``: entries pushed and not yet reset."""
        return (self.dirty_index - self.reset_index) & _U32

    @property
    def soft_full(self) -> bool:
        """``kvm_dirty_ring_soft_full``: the vCPU may not enter the guest."""
        return self.used >= self.soft_limit

    @property
    def full(self) -> bool:
        """``kvm_dirty_ring_full``."""
        return self.used >= self.size

    def push(self, slot: int, offsets: np.ndarray) -> bool:
        """``kvm_dirty_ring_push`` for each offset, in order; returns whether the ring
        is now soft-full (the caller then requests ``KVM_EXIT_DIRTY_RING_FULL``)."""
        offsets = np.asarray(offsets, np.uint64).reshape(-1)
        n = len(offsets)
        if n > self.size - self.used:
            raise DirtyRingOverflowError(
                f"dirty ring of {self.size} entries holds {self.used} unreset entries; "
                f"{n} more would overwrite unharvested ones (the kernel WARNs: a lost dirty page)")
        if n == 1:  # the fault path: one page at a time
            entry = self.entries[self.dirty_index & (self.size - 1)]
            entry["slot"], entry["offset"] = slot, offsets[0]
            entry["flags"] = KVM_DIRTY_GFN_F_DIRTY            # after the payload (smp_wmb)
        else:
            idx = (self.dirty_index + np.arange(n, dtype=np.int64)) & (self.size - 1)
            self.entries["slot"][idx] = slot
            self.entries["offset"][idx] = offsets
            self.entries["flags"][idx] = KVM_DIRTY_GFN_F_DIRTY
        self.dirty_index = (self.dirty_index + n) & _U32
        return self.soft_full

    def harvest(self) -> np.ndarray:
        """:func:`harvest` from this ring's ``fetch_index`` (the VMM side)."""
        out, self.fetch_index = harvest(self.entries, self.fetch_index)
        return out

    def reset(self, kvm: Vm, nr_reset: int) -> int:
        """``kvm_dirty_ring_reset`` (2025 bounded form); returns the updated count of
        entries reset by this ioctl so far (``*nr_entries_reset``).

        Walk from ``reset_index`` while the entry has the RESET bit, at most until the
        ioctl's count reaches :data:`RESET_BUDGET`; clear each entry's flags, then coalesce
        (:func:`coalesce`) and re-protect each valid run (:func:`reset_target`) under
        the MMU lock.  Invalid runs are skipped silently, but their entries count.
        Called with ``kvm.slots_lock`` held, so the memslots cannot change meanwhile
        and checking the runs after the walk is the same as checking them during it.
        """
        idx = (self.reset_index + np.arange(self.size, dtype=np.int64)) & (self.size - 1)
        pending = (self.entries["flags"][idx] & KVM_DIRTY_GFN_F_RESET) != 0
        n = int(np.argmax(~pending)) if not pending.all() else self.size
        n = max(0, min(n, RESET_BUDGET - nr_reset))
        sel = idx[:n]
        slots = self.entries["slot"][sel].tolist()
        offsets = self.entries["offset"][sel].tolist()
        self.entries["flags"][sel] = 0
        self.reset_index = (self.reset_index + n) & _U32
        reset_dirty_gfns(kvm, coalesce(slots, offsets, kvm.bits_per_long))
        return nr_reset + n
