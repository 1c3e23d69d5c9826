"""Where a migration learns which pages were dirtied: the ``DirtyLogSource`` strategy.

A source harvests the pages dirtied in every slot since the last harvest (all slots
at once, as a dirty ring reports them mixed), and is told right before the engine
sends pages of a chunk, so it can re-arm tracking of those pages first.  Two
sources exist now:

* :class:`BitmapSource`: ``KVM_GET_DIRTY_LOG``, which snapshots, clears and
  re-protects in one call (the classic mode);
* :class:`ManualProtectSource`: ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``; GET only
  reads, and ``KVM_CLEAR_DIRTY_LOG`` clears and re-protects one chunk of
  ``2**x-clear-bitmap-shift`` pages right before that chunk is sent, and only the
  bits that are about to be sent (QEMU's clear bitmap).

The dirty ring will be a third: ``harvest`` collects every vCPU's ring and buckets
the entries by slot, then ``KVM_RESET_DIRTY_RINGS`` re-arms them (before any copy).
"""

from __future__ import annotations

import errno

import numpy as np

from kvmcore import uapi
from kvmcore.errors import KvmError
from kvmcore.memslot import bitmap_from_pages, pages_from_bitmap


class DirtyLogSource:
    """The strategy interface; see the module docstring."""

    name = "abstract"
    chunk_shift = 62  # the engine never lets one batch of sends cross a chunk

    def setup(self, vm) -> None:
        """Called once, before dirty logging is turned on."""

    def harvest(self, vm, slots) -> list[np.ndarray]:
        """For each of ``slots`` (GuestSlots), the page offsets dirtied since the last harvest."""
        raise NotImplementedError

    def before_send(self, vm, slot, pages: np.ndarray) -> None:
        """``pages`` (offsets, all in one chunk) are about to be copied."""

    def describe(self) -> str:
        return self.name


class BitmapSource(DirtyLogSource):
    """``KVM_GET_DIRTY_LOG`` alone: each GET returns and resets the log."""

    name = "dirty-bitmap"

    def harvest(self, vm, slots) -> list[np.ndarray]:
        return [_logged_pages(vm, slot) for slot in slots]


class ManualProtectSource(DirtyLogSource):
    """GET reads, and a chunked ``KVM_CLEAR_DIRTY_LOG`` re-arms right before sending.

    ``KVM_DIRTY_LOG_INITIALLY_SET`` is asked for too where the arch offers it, as
    QEMU does: logging then starts without write-protecting anything, and the
    first pass's clears protect memory chunk by chunk.
    """

    name = "manual-protect"

    def __init__(self, clear_bitmap_shift: int = 18) -> None:
        if not 6 <= clear_bitmap_shift <= 31:
            raise ValueError("x-clear-bitmap-shift must be 6..31: CLEAR works on 64-page granules")
        self.chunk_shift = clear_bitmap_shift
        self.initially_set = False
        self.clears = 0

    def setup(self, vm) -> None:
        cap = uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
        try:
            vm.enable_cap(cap, uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | uapi.KVM_DIRTY_LOG_INITIALLY_SET)
            self.initially_set = True
        except KvmError as exc:
            if exc.errno != errno.EINVAL:
                raise
            vm.enable_cap(cap, uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)

    def harvest(self, vm, slots) -> list[np.ndarray]:
        return [_logged_pages(vm, slot) for slot in slots]

    def before_send(self, vm, slot, pages: np.ndarray) -> None:
        if not len(pages):
            return
        first = (int(pages[0]) >> self.chunk_shift) << self.chunk_shift
        count = min(1 << self.chunk_shift, slot.npages - first)
        mask = bitmap_from_pages(pages - first, count, int(vm.bits_per_long))
        vm.clear_dirty_log(slot.slot, first, count, mask)
        self.clears += 1

    def describe(self) -> str:
        return f"{self.name} (chunks of {1 << self.chunk_shift} pages" + \
            (", initially set)" if self.initially_set else ")")


def _logged_pages(vm, slot) -> np.ndarray:
    """``KVM_GET_DIRTY_LOG`` of one slot, as page offsets."""
    pages = pages_from_bitmap(vm.get_dirty_log(slot.slot))
    return pages[pages < slot.npages]
