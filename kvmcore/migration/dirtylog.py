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

* :class:`RingSource`: ``KVM_CAP_DIRTY_LOG_RING`` (or ``_ACQ_REL``): ``harvest``
  collects every vCPU's ring, then ``KVM_RESET_DIRTY_RINGS`` re-arms the pages
  (before any of them is copied), and buckets the entries by slot.  A vCPU that
  stops with ``KVM_EXIT_DIRTY_RING_FULL`` is handled by :meth:`DirtyLogSource.vcpu_exit`:
  every ring is harvested into the source's buffer and reset, and the vCPU resumes
  (QEMU's reaper).  KVM drops the VMM's own writes in a ring-only VM, so the engine
  logs device writes in its own bitmap (:mod:`kvmcore.migration.vmmlog`).
"""

from __future__ import annotations

import contextlib
import errno
import threading

import numpy as np

from kvmcore import uapi
from kvmcore.dirty_ring import HARVEST_DTYPE
from kvmcore.errors import KvmError
from kvmcore.memslot import bitmap_from_pages, pages_from_bitmap


class DirtyLogSource:
    """The strategy interface; see the module docstring."""

    name = "abstract"
    chunk_shift = 62  # the engine never lets one batch of sends cross a chunk

    needs_vmm_log = False  # True: KVM does not log the VMM's writes (a ring-only VM)
    rearms_before_send = False  # True: before_send must see every page of a chunk, even in the full pass

    def prepare(self, vm) -> None:
        """Called once on the fresh VM, before any memslot or vCPU exists."""

    def setup(self, vm) -> None:
        """Called once, before dirty logging is turned on."""

    def guard(self):
        """A context the vCPU's stores run in (a lock against a concurrent harvest)."""
        return contextlib.nullcontext()

    def vcpu_exit(self, vm, vcpu) -> bool:
        """The vCPU stopped before finishing its stores; True if handled (resume it)."""
        return False

    def counters(self) -> dict[str, int]:
        """What the source did, for the report (empty: nothing to add)."""
        return {}

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
    rearms_before_send = True

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


RING_CAPS = (uapi.KVM_CAP_DIRTY_LOG_RING, uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL)
DEFAULT_RING_BYTES = 65536
"""4096 entries of 16 bytes: what api.rst recommends at least."""


def ring_archs() -> list[str]:
    """The installed archs whose model offers a dirty ring (for error messages)."""
    import kvmcore

    names = []
    for name in kvmcore.available_archs():
        try:
            vm = kvmcore.create_vm(name)
            if any(vm.check_extension(c) for c in RING_CAPS):
                names.append(name)
        except Exception:  # a plugin that does not load offers nothing
            continue
    return names


class RingSource(DirtyLogSource):
    """The per-vCPU dirty ring: harvest every ring, reset, then the pages may be read.

    ``KVM_CAP_DIRTY_LOG_RING`` is enabled where the arch offers it (x86, TSO), else
    ``KVM_CAP_DIRTY_LOG_RING_ACQ_REL`` (arm64), with ``size_bytes`` per vCPU, before
    any vCPU exists.  The VM is ring-only: KVM drops the VMM's own writes, so
    :attr:`needs_vmm_log` asks the engine for its own log of device writes.
    """

    name = "dirty-ring"
    needs_vmm_log = True

    def __init__(self, size_bytes: int = DEFAULT_RING_BYTES) -> None:
        if isinstance(size_bytes, bool) or not isinstance(size_bytes, int):
            raise ValueError(f"dirty ring size must be a whole number of bytes, not {size_bytes!r}")
        self.size_bytes = size_bytes
        self.cap = 0
        self.entries = 0          # ring entries per vCPU
        self.harvested = 0        # entries collected, over all harvests and reaps
        self.ring_full_exits = 0  # KVM_EXIT_DIRTY_RING_FULL seen by the vCPU
        self.resets = 0           # KVM_RESET_DIRTY_RINGS calls
        self.reset_entries = 0    # entries those resets re-armed
        self._buffer: list[np.ndarray] = []
        self._lock = threading.RLock()

    def prepare(self, vm) -> None:
        cap = next((c for c in RING_CAPS if vm.check_extension(c)), 0)
        if not cap:
            offered = ring_archs() if getattr(vm, "backend", "sim") == "sim" else []
            where = f"; archs with a ring: {', '.join(offered)}" if offered else ""
            raise ValueError(f"arch {vm.arch!r} offers no dirty ring (KVM_CAP_DIRTY_LOG_RING or _ACQ_REL)"
                             f"{where}")
        top = int(vm.check_extension(cap))
        try:
            vm.enable_cap(cap, self.size_bytes)
        except KvmError as exc:
            name = "KVM_CAP_DIRTY_LOG_RING" if cap == uapi.KVM_CAP_DIRTY_LOG_RING else \
                "KVM_CAP_DIRTY_LOG_RING_ACQ_REL"
            raise ValueError(f"dirty ring size {self.size_bytes} bytes refused by {name} "
                             f"({errno.errorcode.get(exc.errno, exc.errno)}): it must be a power of two, at least "
                             f"a page and the reserved entries x 16 bytes, and at most {top} bytes") from None
        self.cap = cap
        self.entries = self.size_bytes // 16

    def guard(self):
        return self._lock

    def vcpu_exit(self, vm, vcpu) -> bool:
        if vcpu.exit_reason != uapi.KVM_EXIT_DIRTY_RING_FULL:
            return False
        with self._lock:
            self.ring_full_exits += 1
            self._reap(vm)
        return True

    def _collect(self, vm) -> None:
        """Harvest every vCPU's ring into the buffer (marks the entries collected)."""
        for vcpu in vm.vcpus:
            got = vcpu.harvest_dirty_ring()
            if len(got):
                self._buffer.append(got)
                self.harvested += len(got)

    def _reset(self, vm) -> None:
        self.reset_entries += int(vm.reset_dirty_rings() or 0)
        self.resets += 1

    def _reap(self, vm) -> None:
        """QEMU's ``kvm_dirty_ring_reap``: collect every ring, then reset them all."""
        self._collect(vm)
        self._reset(vm)

    def harvest(self, vm, slots) -> list[np.ndarray]:
        with self._lock:
            self._reap(vm)
            got = np.concatenate(self._buffer) if self._buffer else np.zeros(0, HARVEST_DTYPE)
            self._buffer = []
        return _bucket(got, slots)

    def counters(self) -> dict[str, int]:
        return {"size": self.size_bytes, "entries": self.entries, "harvested": self.harvested,
                "ring-full-exits": self.ring_full_exits, "resets": self.resets,
                "reset-entries": self.reset_entries}

    def describe(self) -> str:
        return f"{self.name} ({self.entries} entries per vCPU)"


def _bucket(entries: np.ndarray, slots) -> list[np.ndarray]:
    """Ring entries ``(slot, offset)`` as page offsets per guest slot (address space 0),
    each sorted and unique; an entry naming no slot of the guest, or a page past its
    end, is dropped (KVM itself skips such entries at reset)."""
    out = []
    for s in slots:
        sel = entries["offset"][entries["slot"] == s.slot].astype(np.int64)
        out.append(np.unique(sel[(sel >= 0) & (sel < s.npages)]))
    return out


def _logged_pages(vm, slot) -> np.ndarray:
    """``KVM_GET_DIRTY_LOG`` of one slot, as page offsets."""
    pages = pages_from_bitmap(vm.get_dirty_log(slot.slot))
    return pages[pages < slot.npages]
