"""The pre-copy engine: full pass, dirty rounds, switchover test, stop-and-copy, check.

It uses only the public VM API, so it migrates a guest on the model or on the real
kernel alike:

1. setup: the dirty-log source's capabilities, then ``KVM_MEM_LOG_DIRTY_PAGES`` on
   every slot (QEMU's ``memory_global_dirty_log_start``);
2. round 1 sends every page; each later round sends the pages the last sync found.
   Pages go in order, slot by slot, in batches the link sends in one time step,
   never crossing a clear chunk (the source re-arms a chunk right before it is
   sent).  While a batch is on the link the guest runs;
3. each live round ends with a sync (``ram.dirty-sync-count``): the KVM log and the
   VMM's own log are merged into the engine's bitmap (QEMU's RAMBlock ``bmap``).
   If what is pending fits the downtime (``remaining <= max-bandwidth x
   downtime-limit``) the guest is stopped; so it is too, without having
   converged, after ``max-iterations`` rounds or ``max-time``;
4. stop-and-copy: with the vCPU stopped, one last sync and the rest is sent
   (``downtime``);
5. the destination's memory is compared with the source's, byte for byte
   (``verified``), and logging is turned off.

Auto-converge is QEMU's: at a sync at least one second after the last check, if
the bytes dirtied in the period exceed ``throttle-trigger-threshold`` % of the
bytes sent, a counter goes up; at 2 the guest is throttled (``cpu-throttle-initial``
%, then ``+cpu-throttle-increment`` up to ``max-cpu-throttle``).
"""

from __future__ import annotations

from typing import Any, Protocol

import attrs
import numpy as np

from kvmcore.migration.dirtylog import BitmapSource, DirtyLogSource, ManualProtectSource
from kvmcore.migration.driver import GuestDriver
from kvmcore.migration.guest import Guest, GuestSpec
from kvmcore.migration.params import MigrationParameters
from kvmcore.migration.stats import MigrationReport, RamStats, RoundRecord
from kvmcore.migration.timing import TIME_MODELS, RealTime, VirtualTime
from kvmcore.migration.vmmlog import VmmDirtyLog
from kvmcore.migration.workloads import Workload
from kvmcore.stats import STAT_NAMES

PAGE_HEADER_BYTES = 8
"""QEMU's ``save_page_header``: the page's offset and flags, before its data."""
ZERO_PAGE_BYTES = PAGE_HEADER_BYTES + 1
"""A zero page on the wire: its header and one byte (``save_zero_page``)."""
THROTTLE_PERIOD_S = 1.0
"""QEMU looks at the dirty rate once a second at most (``migration_bitmap_sync``)."""
_VERIFY_CHUNK = 16 << 20


class Progress(Protocol):
    """What the engine tells a progress display."""

    def round_started(self, iteration: int, kind: str, pages: int) -> None: ...

    def advance(self, pages: int) -> None: ...

    def round_finished(self, record: RoundRecord) -> None: ...


@attrs.define(eq=False)
class Precopy:
    """One pre-copy migration of ``guest`` (state; :meth:`run` does it once)."""

    guest: Guest
    params: MigrationParameters
    source: DirtyLogSource
    vmm: VmmDirtyLog
    driver: GuestDriver
    timing: VirtualTime | RealTime
    progress: Progress | None = None
    info: dict[str, Any] = attrs.field(factory=dict)
    rounds: list[RoundRecord] = attrs.field(factory=list, init=False)
    transferred: int = attrs.field(default=0, init=False)
    normal: int = attrs.field(default=0, init=False)
    duplicate: int = attrs.field(default=0, init=False)
    sync_count: int = attrs.field(default=0, init=False)
    throttle: int = attrs.field(default=0, init=False)
    _pending: list[np.ndarray] = attrs.field(factory=list, init=False)
    _src: list[np.ndarray] = attrs.field(factory=list, init=False)
    _dst: list[np.ndarray] = attrs.field(factory=list, init=False)
    _period_start: float = attrs.field(default=0.0, init=False)
    _period_pages: int = attrs.field(default=0, init=False)
    _period_xfer: int = attrs.field(default=0, init=False)
    _high_count: int = attrs.field(default=0, init=False)

    @property
    def destination(self) -> list[np.ndarray]:
        """The destination's memory, one uint8 array per guest slot."""
        return self._dst

    def run(self) -> MigrationReport:
        guest, params, timing = self.guest, self.params, self.timing
        vm = guest.vm
        ps = guest.page_size
        stats_before = _counters(vm)
        self._src = [vm.memory(s.slot).reshape(s.npages, ps) for s in guest.slots]
        self._dst = [np.zeros((s.npages, ps), np.uint8) for s in guest.slots]
        self._pending = [np.ones(s.npages, bool) for s in guest.slots]
        try:
            timing.start()
            self.source.setup(vm)
            guest.set_logging(True)
            setup_time = timing.now
            self._period_start = setup_time
            iteration, reason = 0, ""
            while not reason:
                iteration += 1
                live = self._round(iteration, "full" if iteration == 1 else "iterate")
                if live.remaining <= params.switchover_bytes:
                    reason = "downtime-limit"
                elif iteration >= params.max_iterations:
                    reason = "max-iterations"
                elif timing.now >= params.max_time_s:
                    reason = "max-time"
                else:
                    self._auto_converge()
            stop_at = timing.now
            timing.stop_guest()
            last = self._round(iteration + 1, "stop-copy")
            downtime = timing.now - stop_at
            total_time = timing.now
            mismatched = self._verify()
            guest.set_logging(False)
        finally:
            timing.close()
        return self._report(live, last, reason, mismatched, setup_time, downtime, total_time,
                            _delta(stats_before, _counters(vm)))

    # -- one round -----------------------------------------------------------------

    def _round(self, iteration: int, kind: str) -> RoundRecord:
        start = self.timing.now
        writes_before = self.driver.writes
        found = self._sync() if kind == "stop-copy" else 0
        sent, zeros, nbytes = self._send_pending(iteration, kind)
        if kind != "stop-copy":
            found = self._sync()
            self._period_pages += found
        remaining = sum(int(p.sum()) for p in self._pending) * self.guest.page_size
        record = RoundRecord(
            iteration=iteration, kind=kind, start_time=start, duration=self.timing.now - start,
            pages_sent=sent, zero_pages=zeros, bytes_sent=nbytes, dirty_pages=found, remaining=remaining,
            expected_downtime=remaining / self.params.max_bandwidth, throttle=self.throttle,
            guest_writes=self.driver.writes - writes_before)
        self.rounds.append(record)
        if self.progress is not None:
            self.progress.round_finished(record)
        return record

    def _sync(self) -> int:
        """Harvest every slot's log (KVM's and the VMM's) into the pending bitmap;
        returns how many pages became pending."""
        found = 0
        logged = self.source.harvest(self.guest.vm, self.guest.slots)
        for i, pending in enumerate(self._pending):
            before = int(np.count_nonzero(pending))
            pending[logged[i]] = True
            pending[self.vmm.harvest(i)] = True
            found += int(np.count_nonzero(pending)) - before
        self.sync_count += 1
        return found

    def _send_pending(self, iteration: int, kind: str) -> tuple[int, int, int]:
        """Send every pending page; returns (pages, zero pages, bytes)."""
        vm = self.guest.vm
        todo = [np.flatnonzero(p) for p in self._pending]
        for p in self._pending:
            p[:] = False
        total = sum(len(t) for t in todo)
        if self.progress is not None:
            self.progress.round_started(iteration, kind, total)
        ps = self.guest.page_size
        bandwidth = self.params.max_bandwidth
        batch = max(1, int(bandwidth * self.params.time_step_ms / 1000.0 / (ps + PAGE_HEADER_BYTES)))
        shift = self.source.chunk_shift
        sent = zeros = nbytes = 0
        for i, s in enumerate(self.guest.slots):
            pages = todo[i]
            if not len(pages):
                continue
            cuts = np.flatnonzero(np.diff(pages >> shift)) + 1
            for chunk in np.split(pages, cuts):
                self.source.before_send(vm, s, chunk)
                for a in range(0, len(chunk), batch):
                    part = chunk[a:a + batch]
                    part_bytes, part_zeros = self._copy(i, part)
                    self.timing.send(part_bytes / bandwidth)
                    sent += len(part)
                    zeros += part_zeros
                    nbytes += part_bytes
                    if self.progress is not None:
                        self.progress.advance(len(part))
        return sent, zeros, nbytes

    def _copy(self, i: int, pages: np.ndarray) -> tuple[int, int]:
        """Copy ``pages`` of slot ``i`` to the destination; returns (bytes on the wire, zero pages)."""
        first, last = int(pages[0]), int(pages[-1])
        if last - first + 1 == len(pages):  # a run of pages (the full pass): no gather
            block = self._src[i][first:last + 1]
            self._dst[i][first:last + 1] = block
        else:
            block = self._src[i][pages]
            self._dst[i][pages] = block
        zero = 0
        if self.params.zero_page_detection != "none":
            zero = len(pages) - int(np.count_nonzero(block.view(np.uint64).any(axis=1)))
        normal = len(pages) - zero
        nbytes = normal * (self.guest.page_size + PAGE_HEADER_BYTES) + zero * ZERO_PAGE_BYTES
        self.transferred += nbytes
        self.normal += normal
        self.duplicate += zero
        return nbytes, zero

    def _auto_converge(self) -> None:
        """QEMU's ``migration_trigger_throttle``, checked at most once a period."""
        now = self.timing.now
        if now - self._period_start < THROTTLE_PERIOD_S:
            return
        params = self.params
        dirtied = self._period_pages * self.guest.page_size
        sent = self.transferred - self._period_xfer
        if params.auto_converge and dirtied > sent * params.throttle_trigger_threshold / 100:
            self._high_count += 1
            if self._high_count >= 2:
                self._high_count = 0
                self.throttle = params.cpu_throttle_initial if not self.throttle else \
                    min(self.throttle + params.cpu_throttle_increment, params.max_cpu_throttle)
                self.timing.set_throttle(self.throttle)
        self._period_start, self._period_pages, self._period_xfer = now, 0, self.transferred

    def _verify(self) -> int:
        """Pages whose destination copy differs from the source (0: verified)."""
        bad = 0
        for src, dst in zip(self._src, self._dst, strict=True):
            step = max(1, _VERIFY_CHUNK // src.shape[1])
            for a in range(0, len(src), step):
                s = src[a:a + step].view(np.uint64)
                d = dst[a:a + step].view(np.uint64)
                bad += int(np.count_nonzero((s != d).any(axis=1)))
        return bad

    # -- the report ----------------------------------------------------------------

    def _report(self, live: RoundRecord, last: RoundRecord, reason: str, mismatched: int,
                setup_time: float, downtime: float, total_time: float,
                kvm_stats: dict[str, int]) -> MigrationReport:
        ps = self.guest.page_size
        live_rounds = [r for r in self.rounds if r.kind != "stop-copy"]
        pages = self.normal + self.duplicate
        ram = RamStats(
            transferred=self.transferred, remaining=last.remaining, total=self.guest.memory_bytes,
            duplicate=self.duplicate, normal=self.normal, normal_bytes=self.normal * ps,
            dirty_sync_count=self.sync_count, dirty_pages_rate=live.dirty_pages_rate,
            mbps=self.transferred * 8 / total_time / 1e6 if total_time > 0 else 0.0,
            pages_per_second=pages / total_time if total_time > 0 else 0.0, page_size=ps,
            precopy_bytes=sum(r.bytes_sent for r in live_rounds), downtime_bytes=last.bytes_sent)
        return MigrationReport(
            status="completed", verified=mismatched == 0, mismatched_pages=mismatched,
            converged=reason == "downtime-limit", switchover_reason=reason, total_time=total_time,
            downtime=downtime, expected_downtime=live.expected_downtime, setup_time=setup_time,
            throttle=self.throttle, ram=ram, rounds=tuple(self.rounds), params=self.params, guest=self.info,
            time_model=self.timing.name, dirty_log=self.source.describe(),
            guest_writes=self.driver.writes - self.driver.device_writes, device_writes=self.driver.device_writes,
            guest_reads=self.driver.reads, kvm_stats=kvm_stats)


def _counters(vm) -> dict[str, int]:
    try:
        stats = dict(vm.stats)
    except Exception:  # a backend without stats still migrates
        return {}
    if getattr(vm, "backend", "sim") == "sim":
        return {k: int(stats.get(k, 0)) for k in STAT_NAMES}
    return {k: int(v) for k, v in stats.items() if isinstance(v, (int, np.integer))}


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in sorted(after)}


def migrate(vm, *, guest: GuestSpec | None = None, workload: Workload | None = None,
            params: MigrationParameters | None = None, seed: int = 0, time: str | None = None,
            device_log: str | None = None, progress: Progress | None = None) -> MigrationReport:
    """Set up the guest on ``vm`` (a fresh VM of any backend), run ``workload`` in it
    and migrate it live; returns the report.

    ``time`` is "virtual" (default on the model) or "real" (default on other
    backends); ``device_log`` is "kvm" (device writes through ``vm.write_guest``,
    logged by the core) or "vmm" (the VMM's own bitmap); by default "kvm" where the
    backend has ``write_guest``.
    """
    return build(vm, guest=guest, workload=workload, params=params, seed=seed, time=time,
                 device_log=device_log, progress=progress).run()


def build(vm, *, guest: GuestSpec | None = None, workload: Workload | None = None,
          params: MigrationParameters | None = None, seed: int = 0, time: str | None = None,
          device_log: str | None = None, progress: Progress | None = None) -> Precopy:
    """:func:`migrate`'s set-up, for callers who want the engine (e.g. its destination)."""
    spec = guest or GuestSpec()
    workload = workload or Workload()
    params = params or MigrationParameters()
    backend = getattr(vm, "backend", "sim")
    time = time or ("virtual" if backend == "sim" else "real")
    if time not in TIME_MODELS:
        raise ValueError(f"unknown time model {time!r}; choose {' or '.join(TIME_MODELS)}")
    if device_log not in (None, "kvm", "vmm"):
        raise ValueError(f"device log must be 'kvm' or 'vmm', not {device_log!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a whole number of at least 0, not {seed!r}")
    fill_seq, work_seq, drive_seq = np.random.SeedSequence(seed).spawn(3)
    g = Guest.create(vm, spec, np.random.default_rng(fill_seq))
    stream = workload.start(g.layout(), np.random.default_rng(work_seq))
    vmm = VmmDirtyLog(g, through_kvm=None if device_log is None else device_log == "kvm")
    driver = GuestDriver(g, workload, stream, vmm, np.random.default_rng(drive_seq))
    timing = VirtualTime(driver) if time == "virtual" else RealTime(driver)
    source = ManualProtectSource(params.clear_bitmap_shift) if params.manual_protect else BitmapSource()
    info = {
        "arch": vm.arch, "backend": backend, "memory": g.memory_bytes, "page-size": g.page_size,
        "host-page-size": spec.host_page_size or (4096 if backend == "sim" else None), "seed": seed,
        "slots": [{"slot": s.slot, "gpa": s.gpa, "size": s.size} for s in g.slots],
        "workload": workload.describe(), "device-log": "kvm" if vmm.through_kvm else "vmm",
    }
    return Precopy(g, params, source, vmm, driver, timing, progress, info)
