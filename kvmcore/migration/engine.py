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

Zero pages: a page that was never written is zero, and QEMU sends it as a zero
("duplicate") page of 9 bytes.  Host memory is reserved lazily, so a 1 TiB guest
that has used 64 MiB costs 64 MiB, and reading every page to find it is zero would
cost minutes and the page tables of 1 TiB.  So the full pass sends the pages the
guest wrote before logging started (:attr:`Guest.prewritten`, all of them unless
the guest is sparse) as QEMU does, reading each and detecting zeros, and counts
every other page as a zero page without reading it.  That is right whatever
happens meanwhile: a page the guest writes after logging started is in the log, and
a later round sends it.  The check then compares only the pages that can differ:
those written before the migration, those any store (vCPU or device) went to, as
the driver records them independently of any log, and those copied to the
destination.  Every other page was never written on either side, so it is zero on
both (lazily allocated) by construction.

Auto-converge is QEMU's: at a sync at least one second after the last check, if
the bytes dirtied in the period exceed ``throttle-trigger-threshold`` % of the
bytes sent, a counter goes up; at 2 the guest is throttled (``cpu-throttle-initial``
%, then ``+cpu-throttle-increment`` up to ``max-cpu-throttle``).
"""

from __future__ import annotations

from typing import Any, Protocol

import attrs
import numpy as np

from kvmcore.hostmem import lazy_zeros
from kvmcore.migration.dirtylog import BitmapSource, DirtyLogSource, ManualProtectSource, RingSource
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
_RANGE_PAGES = 1 << 16
"""The full pass looks at memory this many pages at a time (to skip the zero pages)."""
MAX_FILLED_MEMORY = 64 << 30
"""Above this, only a guest that populated part of its memory (``sparse``) is built:
filling every page of a bigger one would take the model minutes and all its RAM."""


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
    _pending: list[np.ndarray] = attrs.field(factory=list, init=False)  # sorted page offsets per slot
    _copied: list[list[np.ndarray]] = attrs.field(factory=list, init=False)
    _sparse_check: bool = attrs.field(default=False, init=False)
    checked_pages: int = attrs.field(default=0, init=False)
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
        self._dst = [lazy_zeros(s.npages * ps).reshape(s.npages, ps) for s in guest.slots]
        self._pending = [np.zeros(0, np.int64) for _ in guest.slots]
        prewritten = guest.prewritten or [None] * len(guest.slots)
        self._sparse_check = all(p is not None for p in prewritten)
        self._copied = [[] for _ in guest.slots]
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
        sent, zeros, nbytes = self._send_full(iteration) if kind == "full" else self._send_pending(iteration, kind)
        if kind != "stop-copy":
            found = self._sync()
            self._period_pages += found
        remaining = sum(len(p) for p in self._pending) * self.guest.page_size
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
            merged = np.union1d(pending, np.union1d(np.asarray(logged[i], np.int64), self.vmm.harvest(i)))
            found += len(merged) - len(pending)
            self._pending[i] = merged
        self.sync_count += 1
        return found

    def _send_full(self, iteration: int) -> tuple[int, int, int]:
        """Round 1: every page, slot by slot and chunk by chunk.  The pages written
        before logging started are read and sent (a zero one as a zero page); the
        others were never written and are counted as zero pages unread."""
        guest = self.guest
        vm = guest.vm
        if self.progress is not None:
            self.progress.round_started(iteration, "full", guest.npages)
        batch = self._batch_pages()
        chunk = 1 << min(self.source.chunk_shift, 40)
        # a whole number of batches, so a filled guest is sent in the same batches as one chunk at a time
        span = batch * max(1, _RANGE_PAGES // batch)
        prewritten = guest.prewritten or [None] * len(guest.slots)
        sent = zeros = nbytes = 0
        for i, s in enumerate(guest.slots):
            pre = prewritten[i]
            for c0 in range(0, s.npages, chunk):
                c1 = min(s.npages, c0 + chunk)
                if self.source.rearms_before_send:
                    self.source.before_send(vm, s, np.arange(c0, c1, dtype=np.int64))
                for a in range(c0, c1, span):
                    b = min(c1, a + span)
                    if pre is None:
                        written = np.arange(a, b, dtype=np.int64)
                    else:
                        lo, hi = np.searchsorted(pre, (a, b))
                        written = pre[lo:hi]
                    n, z, b_ = self._send_pages(i, written, batch)
                    sent, zeros, nbytes = sent + n, zeros + z, nbytes + b_
                    unwritten = (b - a) - len(written)
                    if unwritten:
                        part_bytes, part_zeros = self._send_unwritten(unwritten)
                        sent += unwritten
                        zeros += part_zeros
                        nbytes += part_bytes
                    if self.progress is not None:
                        self.progress.advance(b - a)
        return sent, zeros, nbytes

    def _send_unwritten(self, n: int) -> tuple[int, int]:
        """``n`` never-written pages: zero pages (9 bytes each), or, with zero-page
        detection off, normal pages of zeros the destination already holds."""
        ps = self.guest.page_size
        zero = self.params.zero_page_detection != "none"
        each = ZERO_PAGE_BYTES if zero else ps + PAGE_HEADER_BYTES
        step = max(1, int(self.params.max_bandwidth * self.params.time_step_ms / 1000.0 / each))
        for a in range(0, n, step):
            self.timing.send(min(step, n - a) * each / self.params.max_bandwidth)
        nbytes = n * each
        self.transferred += nbytes
        if zero:
            self.duplicate += n
        else:
            self.normal += n
        return nbytes, n if zero else 0

    def _batch_pages(self) -> int:
        """Normal pages the link carries in one time step."""
        step = self.params.max_bandwidth * self.params.time_step_ms / 1000.0
        return max(1, int(step / (self.guest.page_size + PAGE_HEADER_BYTES)))

    def _send_pending(self, iteration: int, kind: str) -> tuple[int, int, int]:
        """Send every pending page; returns (pages, zero pages, bytes)."""
        vm = self.guest.vm
        todo = self._pending
        self._pending = [np.zeros(0, np.int64) for _ in todo]
        total = sum(len(t) for t in todo)
        if self.progress is not None:
            self.progress.round_started(iteration, kind, total)
        batch = self._batch_pages()
        shift = self.source.chunk_shift
        sent = zeros = nbytes = 0
        for i, s in enumerate(self.guest.slots):
            pages = todo[i]
            if not len(pages):
                continue
            cuts = np.flatnonzero(np.diff(pages >> shift)) + 1
            for chunk in np.split(pages, cuts):
                self.source.before_send(vm, s, chunk)
                n, z, b_ = self._send_pages(i, chunk, batch, progress=True)
                sent, zeros, nbytes = sent + n, zeros + z, nbytes + b_
        return sent, zeros, nbytes

    def _send_pages(self, i: int, pages: np.ndarray, batch: int, progress: bool = False) -> tuple[int, int, int]:
        """Copy and send ``pages`` of slot ``i``, ``batch`` pages per time step; returns
        (pages, zero pages, bytes)."""
        zeros = nbytes = 0
        for a in range(0, len(pages), batch):
            part = pages[a:a + batch]
            part_bytes, part_zeros = self._copy(i, part)
            self.timing.send(part_bytes / self.params.max_bandwidth)
            zeros += part_zeros
            nbytes += part_bytes
            if progress and self.progress is not None:
                self.progress.advance(len(part))
        return len(pages), zeros, nbytes

    def _copy(self, i: int, pages: np.ndarray) -> tuple[int, int]:
        """Copy ``pages`` of slot ``i`` to the destination; returns (bytes on the wire, zero pages)."""
        first, last = int(pages[0]), int(pages[-1])
        if last - first + 1 == len(pages):  # a run of pages (the full pass): no gather
            block = self._src[i][first:last + 1]
            self._dst[i][first:last + 1] = block
        else:
            block = self._src[i][pages]
            self._dst[i][pages] = block
        if self._sparse_check:
            self._copied[i].append(pages)
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
        """Pages whose destination copy differs from the source (0: verified).

        Every page, unless the guest is sparse: then the pages that can differ (see
        the module docstring); the others are zero on both sides."""
        bad = checked = 0
        if not self._sparse_check:
            for src, dst in zip(self._src, self._dst, strict=True):
                step = max(1, _VERIFY_CHUNK // src.shape[1])
                for a in range(0, len(src), step):
                    s = src[a:a + step].view(np.uint64)
                    d = dst[a:a + step].view(np.uint64)
                    bad += int(np.count_nonzero((s != d).any(axis=1)))
                checked += len(src)
            self.checked_pages = checked
            return bad
        guest = self.guest
        index, offsets = guest.locate(self.driver.written_pages())
        for i, (src, dst) in enumerate(zip(self._src, self._dst, strict=True)):
            parts = [guest.prewritten[i], offsets[index == i], *self._copied[i]]
            pages = np.unique(np.concatenate([np.asarray(p, np.int64) for p in parts]))
            step = max(1, _VERIFY_CHUNK // src.shape[1])
            for a in range(0, len(pages), step):
                part = pages[a:a + step]
                bad += int(np.count_nonzero((src[part].view(np.uint64) != dst[part].view(np.uint64)).any(axis=1)))
            checked += len(pages)
        self.checked_pages = checked
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
            guest_reads=self.driver.reads, kvm_stats=kvm_stats, checked_pages=self.checked_pages,
            dirty_ring=self.source.counters())


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
    layout = Guest.plan(vm, spec)
    ps = int(vm.page_size)
    if workload.kind != "sparse" and spec.memory > MAX_FILLED_MEMORY:
        raise ValueError(f"a {spec.memory >> 30} GiB guest with the {workload.kind} workload would have all of its "
                         f"memory filled and walked (more than {MAX_FILLED_MEMORY >> 30} GiB): use the sparse workload "
                         "for a big guest with a small working set")
    stream = workload.start([(slot, size // ps) for slot, _, size in layout], np.random.default_rng(work_seq))
    populated = getattr(stream, "populated", None)
    if params.dirty_ring:
        source: DirtyLogSource = RingSource(params.dirty_ring_size)
    elif params.manual_protect:
        source = ManualProtectSource(params.clear_bitmap_shift)
    else:
        source = BitmapSource()
    if source.needs_vmm_log:
        if device_log == "kvm":
            raise ValueError(f"device writes through KVM (write_guest) are dropped in a ring-only VM; the "
                             f"{source.name} needs the VMM's own log (device_log='vmm')")
        device_log = "vmm"
    source.prepare(vm)
    g = Guest.create(vm, spec, np.random.default_rng(fill_seq), populated=populated)
    vmm = VmmDirtyLog(g, through_kvm=None if device_log is None else device_log == "kvm")
    driver = GuestDriver(g, workload, stream, vmm, np.random.default_rng(drive_seq), source=source)
    timing = VirtualTime(driver) if time == "virtual" else RealTime(driver)
    info = {
        "arch": vm.arch, "backend": backend, "memory": g.memory_bytes, "page-size": g.page_size,
        "host-page-size": spec.host_page_size or (4096 if backend == "sim" else None), "seed": seed,
        "slots": [{"slot": s.slot, "gpa": s.gpa, "size": s.size} for s in g.slots],
        "workload": workload.describe(), "device-log": "kvm" if vmm.through_kvm else "vmm",
    }
    return Precopy(g, params, source, vmm, driver, timing, progress, info)
