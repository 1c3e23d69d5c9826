"""The guest at work: a workload's pages turned into stores at a rate.

``run_for(seconds)`` does what the guest does in that time at the workload's rate,
slowed by the auto-converge throttle (a throttle of p% leaves the vCPU running
(100 - p)% of the time, so it writes that much less).  Fractions of a write are
carried over, so many short steps write what one long step would.

Each batch of stores writes a new value (a batch counter), at a random 8-byte word
of each page: a store the migration missed leaves a difference the final
comparison sees.

A vCPU that stops before its stores are done (``KVM_EXIT_DIRTY_RING_FULL``) is
handed to the dirty-log source, which harvests and resets the rings, and then
resumes with the stores that remain, as QEMU's reaper does; in virtual time this
happens in the main thread, in real time in the vCPU's thread.

The driver also keeps the ground truth the final check needs: every guest page any
store (vCPU or device) went to (:meth:`written_pages`), independent of any log.
"""

from __future__ import annotations

import contextlib

import attrs
import numpy as np

from kvmcore.migration.vmmlog import VmmDirtyLog
from kvmcore.migration.workloads import PageStream, Workload


@attrs.define(eq=False)
class GuestDriver:
    guest: object
    workload: Workload
    stream: PageStream
    vmm: VmmDirtyLog
    rng: np.random.Generator
    throttle: int = 0
    writes: int = 0
    reads: int = 0
    _carry_writes: float = 0.0
    _carry_reads: float = 0.0
    _value: int = 0
    source: object = None  # the DirtyLogSource: it guards the stores and handles vCPU exits
    _written: list = attrs.field(factory=list)
    _written_len: int = 0
    _merged_len: int = 0

    @property
    def device_writes(self) -> int:
        return self.vmm.writes

    @property
    def idle(self) -> bool:
        """A once-over or trace workload that has written all it had to."""
        return self.stream.finished

    def run_for(self, seconds: float) -> int:
        """Run the guest for ``seconds``; returns the stores it made."""
        share = (100 - self.throttle) / 100.0
        due_w = self.workload.rate * share * seconds + self._carry_writes
        due_r = self.workload.read_rate * share * seconds + self._carry_reads
        n_w, n_r = int(due_w), int(due_r)
        self._carry_writes, self._carry_reads = due_w - n_w, due_r - n_r
        return self.step(n_w, n_r)

    def step(self, n_writes: int, n_reads: int = 0) -> int:
        """``n_writes`` stores and ``n_reads`` loads of the workload's next pages."""
        if n_writes + n_reads <= 0 or self.stream.finished:
            return 0
        pages = self.stream.take(n_writes + n_reads)
        if n_reads:
            is_read = np.zeros(len(pages), bool)
            is_read[self.rng.choice(len(pages), min(n_reads, len(pages)), replace=False)] = True
            self._read(pages[is_read])
            pages = pages[~is_read]
        if not len(pages):
            return 0
        self._value += 1
        words = self.rng.integers(0, self.guest.page_size // 8, len(pages), dtype=np.int64)
        by_device = np.zeros(len(pages), bool)
        if self.workload.device_fraction > 0:
            by_device = self.rng.random(len(pages)) < self.workload.device_fraction
        cpu = ~by_device
        self._record(pages)
        gpas = self.guest.gpas(pages[cpu], words[cpu])
        self._store(gpas, self._value)
        self.vmm.write(pages[by_device], words[by_device], self._value)
        self.writes += len(pages)
        return len(pages)

    def _store(self, gpas: np.ndarray, value: int) -> None:
        """vCPU stores of ``value`` at ``gpas``, resumed after each exit the source handles."""
        vcpu, vm = self.guest.vcpu, self.guest.vm
        source = self.source
        pos = 0
        while pos < len(gpas):
            with source.guard() if source is not None else contextlib.nullcontext():
                done = vcpu.write_many(gpas[pos:], value)
                pos += done
                if pos < len(gpas) and source is not None and source.vcpu_exit(vm, vcpu):
                    continue
            if pos < len(gpas):
                raise RuntimeError(f"a guest store to gpa {int(gpas[pos]):#x} did not complete "
                                   f"(exit reason {vcpu.exit_reason})")

    def _record(self, pages: np.ndarray) -> None:
        self._written.append(pages)
        self._written_len += len(pages)
        if self._written_len > max(1 << 22, 2 * self._merged_len):  # as big as the pages, not the writes
            merged = np.unique(np.concatenate(self._written))
            self._written, self._written_len, self._merged_len = [merged], len(merged), len(merged)

    def written_pages(self) -> np.ndarray:
        """Every guest page a store (vCPU or device) went to so far, sorted."""
        if not self._written:
            return np.zeros(0, np.int64)
        return np.unique(np.concatenate(self._written))

    def _read(self, pages: np.ndarray) -> None:
        vcpu = self.guest.vcpu
        for gpa in self.guest.gpas(pages).tolist():
            vcpu.read(gpa, 8)
        self.reads += len(pages)
