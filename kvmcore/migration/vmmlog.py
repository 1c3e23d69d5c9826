"""Writes the VMM itself makes to guest memory (device emulation), and their log.

A device that DMAs into guest memory dirties pages no vCPU wrote, so a migration
that read only the vCPUs' log would lose them (cloud-hypervisor #2458, spdk #2805).
Two ways to catch them, one per backend:

* the model has ``vm.write_guest`` (the kernel's ``kvm_write_guest``): the core marks
  the page in the slot's dirty bitmap, so the next GET reports it with the rest;
* a backend without it (the real kernel, where a VMM writes through its own
  mapping, which KVM never sees), and a ring-only VM (where KVM drops the marks of
  writes made without a vCPU), get the VMM's own log, as QEMU's
  ``DIRTY_MEMORY_MIGRATION`` and cloud-hypervisor's ``AtomicBitmap`` are: each
  write records its page *after* storing the data, and each sync takes and
  forgets the records and merges them with the KVM log.

The VMM's log holds the pages written since the last sync (sorted on harvest), so
it costs what the device writes, not what the guest's memory is: a 1 TiB guest
does not need a 256 MiB bitmap per sync.
"""

from __future__ import annotations

import threading

import numpy as np


class VmmDirtyLog:
    """Device writes into the guest, logged where the migration will see them."""

    def __init__(self, guest, through_kvm: bool | None = None) -> None:
        self.guest = guest
        vm = guest.vm
        can = callable(getattr(vm, "write_guest", None))
        if through_kvm and not can:
            raise ValueError(f"the {getattr(vm, 'backend', '?')} backend has no write_guest")
        self.through_kvm = can if through_kvm is None else through_kvm
        self._dirty: list[list[np.ndarray]] = [[] for _ in guest.slots]
        self._lock = threading.Lock()
        self.writes = 0

    def write(self, pages: np.ndarray, words: np.ndarray, value: int) -> None:
        """Store the u64 ``value`` at word ``words[i]`` of guest page ``pages[i]``."""
        if not len(pages):
            return
        self.writes += len(pages)
        guest = self.guest
        if self.through_kvm:
            data = int(value).to_bytes(8, "little")
            for gpa in guest.gpas(pages, words).tolist():
                guest.vm.write_guest(gpa, data)
            return
        index, offsets = guest.locate(pages)
        words_per_page = guest.page_size // 8
        for i in np.unique(index).tolist():
            sel = index == i
            memory = guest.vm.memory(guest.slots[i].slot).view(np.uint64)
            memory[offsets[sel] * words_per_page + words[sel]] = np.uint64(value)
            with self._lock:  # the record comes after the data
                self._dirty[i].append(offsets[sel].astype(np.int64))

    def harvest(self, index: int) -> np.ndarray:
        """Page offsets the VMM dirtied in slot ``guest.slots[index]`` since the last
        harvest, sorted, and forget them (empty when the KVM log carries them)."""
        with self._lock:
            parts, self._dirty[index] = self._dirty[index], []
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
