"""A vCPU's stage-2 TLB: cached translations, with their write and dirty state.

The model caches every translation a vCPU uses until it is invalidated, so a write
through a cached writable entry does not fault and is not logged; a flush that is
missing or late therefore shows up as a lost dirty page.  A cached block entry is
recorded on every page it covers.

Entries live in one lazily allocated ``uint32`` per page of each memslot, holding
``generation << 2 | state``, with a generation per memslot: flushing a whole slot, or
everything, bumps generations (O(1) a slot); a partial range flush zeroes the range.
"""

import numpy as np

from kvmcore.hostmem import lazy_zeros
from kvmcore.memslot import Memslot

TLB_INVALID = 0
TLB_READ = 1
TLB_WRITE = 2        # writable, dirty bit clear: a write makes the hardware set D
TLB_WRITE_DIRTY = 3  # writable and dirty: a write goes straight through


class Tlb:
    """One vCPU's TLB."""

    def __init__(self) -> None:
        self._entries: dict[Memslot, np.ndarray] = {}
        self._generation: dict[Memslot, int] = {}

    def _array(self, slot: Memslot) -> np.ndarray:
        arr = self._entries.get(slot)
        if arr is None:
            arr = self._entries[slot] = lazy_zeros(slot.npages, np.uint32)
            self._generation[slot] = 1
        return arr

    def states(self, slot: Memslot, offsets: np.ndarray) -> np.ndarray:
        """The cached state of each page offset of ``slot`` (``TLB_*``)."""
        arr = self._entries.get(slot)
        if arr is None:
            return np.zeros(len(offsets), np.uint8)
        e = arr[offsets]
        return np.where((e >> 2) == self._generation[slot], e & 3, 0).astype(np.uint8)

    def state(self, slot: Memslot, offset: int) -> int:
        """The cached state of one page offset (the scalar :meth:`states`)."""
        arr = self._entries.get(slot)
        if arr is None:
            return TLB_INVALID
        e = int(arr[offset])
        return e & 3 if e >> 2 == self._generation[slot] else TLB_INVALID

    def fill(self, slot: Memslot, offsets: np.ndarray, states: np.ndarray) -> None:
        """Cache translations for page offsets of ``slot``."""
        arr = self._array(slot)
        arr[offsets] = (np.uint32(self._generation[slot]) << np.uint32(2)) | states.astype(np.uint32)

    def fill_range(self, slot: Memslot, lo: int, hi: int, state: int) -> None:
        """Cache one block translation over page offsets ``[lo, hi)`` of ``slot``."""
        arr = self._array(slot)
        arr[max(lo, 0):min(hi, slot.npages)] = (self._generation[slot] << 2) | state

    def invalidate_all(self) -> None:
        for slot in self._generation:
            self._generation[slot] += 1

    def invalidate_range(self, slot: Memslot, lo: int, hi: int) -> None:
        """Drop cached entries for page offsets ``[lo, hi)`` of ``slot``."""
        arr = self._entries.get(slot)
        if arr is None:
            return
        if lo <= 0 and hi >= slot.npages:
            self._generation[slot] += 1
        else:
            arr[max(lo, 0):min(hi, slot.npages)] = 0

    def invalidate_pages(self, slot: Memslot, offsets: np.ndarray) -> None:
        """Drop cached entries for these page offsets of ``slot``."""
        arr = self._entries.get(slot)
        if arr is not None:
            arr[offsets] = 0

    def forget(self, slot: Memslot) -> None:
        """The slot is gone (deleted or moved, after its flush)."""
        self._entries.pop(slot, None)
        self._generation.pop(slot, None)
