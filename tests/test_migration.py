"""Live migration on the dirty log: every workload, both log modes, every arch.

The ``arch`` fixture (conftest) runs each test once per selected arch plus the
stand-in; an arch whose plugin cannot build a VM yet is skipped with the reason.
Guests are small (16-32 MiB) so the whole file runs in seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import kvmcore
from kvmcore.migration import (
    GuestSpec,
    ManualProtectSource,
    MigrationParameters,
    Workload,
    build,
    load_trace,
    migrate,
)
from simple_arch import SimpleArch, SimpleArchBatch

MIB = 1 << 20
SMALL = GuestSpec(memory=16 * MIB)
FAST_LINK = MigrationParameters(max_bandwidth=64 * MIB)


def make_vm(arch, backend: str = "sim", **options):
    """A VM of ``arch``, or a skip that says why the arch cannot make one yet."""
    try:
        return kvmcore.create_vm(arch, backend=backend, **options)
    except Exception as exc:  # a plugin still being written
        pytest.skip(f"arch {arch!r} cannot create a VM: {type(exc).__name__}: {exc}")


def write_trace(path, rows) -> str:
    path.write_text("# slot gfn\n" + "".join(f"{s} {g}\n" for s, g in rows))
    return str(path)


def workload_for(kind: str, tmp_path, npages: int, **kw) -> Workload:
    if kind != "trace":
        return Workload(kind=kind, rate=4096, device_fraction=0.02, **kw)
    rng = np.random.default_rng(7)
    rows = [(0, int(g)) for g in rng.integers(0, npages, 3000)]
    return Workload(kind="trace", rate=4096, trace=load_trace(write_trace(tmp_path / "t.trace", rows)), **kw)


# -- every workload, both modes ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uniform", "hotset", "sweep", "once", "trace"])
def test_every_workload_is_verified(arch, kind, tmp_path):
    vm = make_vm(arch)
    report = migrate(vm, guest=SMALL, workload=workload_for(kind, tmp_path, SMALL.memory // vm.page_size),
                     params=FAST_LINK)
    assert report.status == "completed"
    assert report.verified, f"{report.mismatched_pages} pages differ"
    assert report.guest_writes > 0


@pytest.mark.parametrize("kind", ["hotset", "sweep"])
def test_manual_protect_clears_chunk_by_chunk(arch, kind, tmp_path):
    vm = make_vm(arch)
    params = MigrationParameters(max_bandwidth=64 * MIB, manual_protect=True, clear_bitmap_shift=6)
    engine = build(vm, guest=SMALL, workload=workload_for(kind, tmp_path, SMALL.memory // vm.page_size),
                   params=params)
    report = engine.run()
    assert report.verified
    assert isinstance(engine.source, ManualProtectSource)
    assert report.dirty_log.startswith("manual-protect")
    # the full pass alone clears every 64-page chunk once, right before sending it
    assert engine.source.clears >= SMALL.memory // vm.page_size // 64
    assert report.kvm_stats["dirty_log_clears"] == engine.source.clears


def test_manual_protect_without_initially_set():
    class NoInitiallySet(SimpleArchBatch):
        @kvmcore.hookimpl
        def kvm_arch_info(self):
            return kvmcore.ArchInfo(name="simple-noinit", description="manual protect without INITIALLY_SET",
                                    manual_dirty_log_caps=kvmcore.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
                                    options={"ipa_bits": 40})

    vm = kvmcore.create_vm(NoInitiallySet())
    engine = build(vm, guest=SMALL, workload=Workload(kind="uniform", rate=4096),
                   params=MigrationParameters(manual_protect=True, clear_bitmap_shift=8))
    report = engine.run()
    assert not engine.source.initially_set
    assert report.verified


@pytest.mark.parametrize("host_page_size", [4096, 2 * MIB, 1 << 30])
def test_host_page_sizes(arch, host_page_size):
    vm = make_vm(arch)
    spec = GuestSpec(memory=32 * MIB, host_page_size=host_page_size)
    report = migrate(vm, guest=spec, workload=Workload(kind="hotset", rate=4096), params=FAST_LINK)
    assert report.verified
    assert report.guest["host-page-size"] == host_page_size
    if host_page_size == 2 * MIB and report.kvm_stats.get("huge_pages_split", 0) == 0:
        # 2M-backed memory the guest touched before logging was mapped with blocks,
        # so logging had to take them apart (eagerly or on fault) or protect them
        assert report.kvm_stats["pages_write_protected"] > 0


def test_two_slots_and_a_trace_naming_both(tmp_path):
    vm = kvmcore.create_vm(SimpleArchBatch())
    spec = GuestSpec(memory=24 * MIB, low_memory_limit=8 * MIB)  # 8 MiB at 0, 16 MiB at 4 GiB
    rows = [(0, g) for g in range(0, 2048, 3)] + [(1, g) for g in range(0, 4096, 5)]
    trace = load_trace(write_trace(tmp_path / "two.trace", rows))
    engine = build(vm, guest=spec, workload=Workload(kind="trace", rate=20000, trace=trace), params=FAST_LINK)
    report = engine.run()
    assert [s["slot"] for s in report.guest["slots"]] == [0, 1]
    assert report.guest["slots"][1]["gpa"] == 4 << 30
    assert report.verified
    assert report.guest_writes == len(rows)  # replayed once, then idle


# -- a broken arch is caught ------------------------------------------------------------


@pytest.mark.parametrize("broken", [SimpleArch(flush=False), SimpleArch(protect=False),
                                    SimpleArchBatch(flush=False)], ids=["no-flush", "no-protect", "batch-no-flush"])
@pytest.mark.parametrize("manual_protect", [False, True])
def test_broken_arch_is_not_verified(broken, manual_protect):
    vm = kvmcore.create_vm(broken)
    report = migrate(vm, guest=SMALL, workload=Workload(kind="hotset", rate=4096),
                     params=MigrationParameters(max_bandwidth=32 * MIB, manual_protect=manual_protect))
    assert report.status == "completed"
    assert not report.verified
    assert report.mismatched_pages > 0


# -- device writes ------------------------------------------------------------------------


@pytest.mark.parametrize("device_log", ["kvm", "vmm"])
def test_device_writes_are_merged(device_log):
    vm = kvmcore.create_vm(SimpleArchBatch())
    report = migrate(vm, guest=SMALL, workload=Workload(kind="uniform", rate=4096, device_fraction=0.3),
                     params=FAST_LINK, device_log=device_log)
    assert report.device_writes > 100
    assert report.guest["device-log"] == device_log
    assert report.verified


def test_device_writes_left_out_of_the_log_are_lost(monkeypatch):
    """The negative control: a VMM that forgets its own bitmap loses device writes."""
    from kvmcore.migration.vmmlog import VmmDirtyLog

    monkeypatch.setattr(VmmDirtyLog, "harvest", lambda self, index: np.zeros(0, np.int64))
    vm = kvmcore.create_vm(SimpleArchBatch())
    report = migrate(vm, guest=SMALL, workload=Workload(kind="uniform", rate=4096, device_fraction=0.3),
                     params=FAST_LINK, device_log="vmm")
    assert not report.verified


# -- the report -------------------------------------------------------------------------


def test_report_is_consistent():
    vm = kvmcore.create_vm(SimpleArchBatch())
    params = MigrationParameters(max_bandwidth=32 * MIB, downtime_limit_ms=50)
    report = migrate(vm, guest=SMALL, workload=Workload(kind="hotset", rate=6000), params=params)
    d = report.to_dict()
    ram = d["ram"]
    for key in ("status", "verified", "total-time", "downtime", "expected-downtime", "setup-time"):
        assert key in d
    for key in ("transferred", "remaining", "total", "dirty-sync-count", "dirty-pages-rate", "duplicate",
                "normal", "normal-bytes", "mbps", "page-size"):
        assert key in ram
    rounds = d["rounds"]
    assert d["status"] == "completed" and d["verified"] is True
    assert len(rounds) >= 3, "the test wants at least one iterate round"
    assert ram["total"] == SMALL.memory
    assert ram["transferred"] >= ram["total"]  # every page once at least, headers on top
    assert ram["remaining"] == 0
    assert ram["dirty-sync-count"] == len(rounds)
    assert [r["kind"] for r in rounds] == ["full"] + ["iterate"] * (len(rounds) - 2) + ["stop-copy"]
    assert rounds[0]["pages-sent"] == SMALL.memory // 4096
    assert sum(r["pages-sent"] for r in rounds) == ram["normal"] + ram["duplicate"]
    assert sum(r["bytes-sent"] for r in rounds) == ram["transferred"]
    assert ram["precopy-bytes"] + ram["downtime-bytes"] == ram["transferred"]
    for before, after in zip(rounds[:-1], rounds[1:], strict=True):
        assert after["pages-sent"] == before["dirty-pages"] + (after["dirty-pages"] if after["kind"] == "stop-copy"
                                                               else 0)
        assert after["start-time"] == pytest.approx(before["start-time"] + before["duration"], abs=2e-3)
    assert d["total-time"] == pytest.approx(sum(r["duration"] for r in rounds), abs=0.01)
    assert d["downtime"] == pytest.approx(rounds[-1]["duration"], abs=1e-3)
    assert d["converged"] and d["switchover-reason"] == "downtime-limit"
    assert rounds[-2]["remaining"] <= params.switchover_bytes < rounds[-3]["remaining"]
    assert d["expected-downtime"] <= 50.0
    assert d["downtime"] == pytest.approx(d["expected-downtime"], rel=0.01)  # virtual time: headers only
    assert json.loads(json.dumps(d)) == d


def test_same_seed_same_report():
    def run(seed):
        vm = kvmcore.create_vm(SimpleArchBatch())
        return json.dumps(migrate(vm, guest=SMALL, workload=Workload(kind="uniform", rate=8192, device_fraction=0.05),
                                  params=FAST_LINK, seed=seed).to_dict())

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_zero_pages_are_duplicates():
    vm = kvmcore.create_vm(SimpleArchBatch())
    report = migrate(vm, guest=GuestSpec(memory=16 * MIB, prefill=0.5), workload=Workload(kind="uniform", rate=1024),
                     params=FAST_LINK)
    assert report.verified
    assert 1000 < report.ram.duplicate < 4096
    assert report.ram.transferred < report.ram.total  # a zero page costs 9 bytes, not 4 KiB
    off = migrate(kvmcore.create_vm(SimpleArchBatch()), guest=GuestSpec(memory=16 * MIB, prefill=0.5),
                  workload=Workload(kind="uniform", rate=1024),
                  params=MigrationParameters(max_bandwidth=64 * MIB, zero_page_detection="none"))
    assert off.ram.duplicate == 0 and off.verified


def test_reads_are_issued_too():
    vm = kvmcore.create_vm(SimpleArchBatch())
    report = migrate(vm, guest=SMALL, workload=Workload(kind="uniform", rate=2048, write_fraction=0.5),
                     params=FAST_LINK)
    assert report.verified
    assert report.guest_reads == pytest.approx(report.guest_writes, rel=0.05)


# -- convergence ------------------------------------------------------------------------


def test_a_migration_that_cannot_converge_is_forced_and_says_so():
    vm = kvmcore.create_vm(SimpleArchBatch())
    report = migrate(vm, guest=SMALL, workload=Workload(kind="sweep", rate=8192),
                     params=MigrationParameters(max_bandwidth=16 * MIB, max_iterations=3))
    assert report.status == "completed"
    assert report.verified
    assert not report.converged
    assert report.switchover_reason == "max-iterations"
    assert len(report.rounds) == 4
    assert report.downtime * 1000 > report.params.downtime_limit_ms


def test_time_cap_forces_the_switchover():
    vm = kvmcore.create_vm(SimpleArchBatch())
    report = migrate(vm, guest=SMALL, workload=Workload(kind="sweep", rate=8192),
                     params=MigrationParameters(max_bandwidth=16 * MIB, max_time_s=2.5))
    assert report.switchover_reason == "max-time" and not report.converged and report.verified
    assert report.rounds[-2].start_time + report.rounds[-2].duration >= 2.5


def test_auto_converge_throttles_as_qemu_does():
    def run(auto_converge):
        vm = kvmcore.create_vm(SimpleArchBatch())
        return migrate(vm, guest=GuestSpec(memory=8 * MIB), workload=Workload(kind="uniform", rate=2048),
                       params=MigrationParameters(max_bandwidth=4 * MIB, max_iterations=8,
                                                  auto_converge=auto_converge))

    plain, throttled = run(False), run(True)
    assert [r.throttle for r in plain.rounds] == [0] * len(plain.rounds)
    steps = [r.throttle for r in throttled.rounds]
    # rounds last about 2 s, so each sync is a QEMU period; the 2nd high one throttles
    assert steps[:5] == [0, 0, 20, 20, 30]
    assert max(steps) <= 99
    assert throttled.verified and plain.verified
    assert throttled.rounds[-1].pages_sent < plain.rounds[-1].pages_sent


# -- time models and backends ------------------------------------------------------------


def test_real_time_on_the_model():
    vm = kvmcore.create_vm(SimpleArchBatch())
    report = migrate(vm, guest=SMALL, workload=Workload(kind="hotset", rate=4096, device_fraction=0.05),
                     params=MigrationParameters(max_bandwidth=64 * MIB, manual_protect=True, clear_bitmap_shift=8),
                     time="real")
    assert report.time_model == "real"
    assert report.verified
    assert report.total_time > 0.2  # 16 MiB at 64 MiB/s, paced on the wall clock


@pytest.fixture(scope="module")
def kvm():
    try:
        from kvmcore.kvm import kvm_available
    except ImportError as exc:
        pytest.skip(f"kvmcore.kvm is missing: {exc}")
    ok, reason = kvm_available()
    if not ok:
        pytest.skip(f"/dev/kvm is not usable: {reason}")


@pytest.mark.kvm
@pytest.mark.parametrize("manual_protect", [False, True])
@pytest.mark.parametrize("kind", ["hotset", "sweep"])
def test_kvm_backend_is_verified(kvm, manual_protect, kind):
    vm = kvmcore.create_vm("x86", backend="kvm")
    try:
        report = migrate(vm, guest=GuestSpec(memory=32 * MIB),
                         workload=Workload(kind=kind, rate=16384, device_fraction=0.02),
                         params=MigrationParameters(max_bandwidth=64 * MIB, manual_protect=manual_protect,
                                                    clear_bitmap_shift=8, max_iterations=5))
    finally:
        vm.close()
    assert report.time_model == "real"
    assert report.guest["device-log"] == "vmm"  # the kernel cannot see the VMM's writes
    assert report.device_writes > 0 and report.guest_writes > 1000
    assert report.verified, f"{report.mismatched_pages} pages differ"


# -- values and parsing ------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"max_bandwidth": 0}, "max-bandwidth"),
    ({"downtime_limit_ms": -1}, "downtime-limit"),
    ({"max_iterations": 0}, "max-iterations"),
    ({"clear_bitmap_shift": 5}, "x-clear-bitmap-shift"),
    ({"cpu_throttle_initial": 100}, "cpu-throttle-initial"),
    ({"zero_page_detection": "multifd"}, "zero-page-detection"),
])
def test_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MigrationParameters(**kwargs)


def test_parameters_by_qemu_names():
    d = MigrationParameters().to_dict()
    assert d["downtime-limit"] == 300
    assert d["max-bandwidth"] == 128 * MIB
    assert (d["cpu-throttle-initial"], d["cpu-throttle-increment"], d["max-cpu-throttle"],
            d["throttle-trigger-threshold"]) == (20, 10, 99, 50)


def test_trace_formats(tmp_path):
    rows = np.array([[0, 1], [0, 5], [1, 2]], np.int64)
    text = load_trace(write_trace(tmp_path / "a.trace", rows.tolist()))
    np.save(tmp_path / "b.npy", rows)
    npy = load_trace(tmp_path / "b.npy")
    np.savez(tmp_path / "c.npz", slot=rows[:, 0], gfn=rows[:, 1])
    npz = load_trace(tmp_path / "c.npz")
    for trace in (text, npy, npz):
        assert trace.slots.tolist() == [0, 0, 1] and trace.offsets.tolist() == [1, 5, 2]


@pytest.mark.parametrize("content, message", [
    ("0 1\nnot a line\n", "line 2"),
    ("0 1 2\n", "line 1"),
    ("# nothing\n", "no entries"),
    ("0 -1\n", "negative"),
])
def test_bad_trace_files(tmp_path, content, message):
    path = tmp_path / "bad.trace"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_trace(path)


@pytest.mark.parametrize("rows, message", [([(0, 4096)], "page 4096 of slot 0"), ([(3, 0)], "slot 3")])
def test_trace_outside_the_guest(tmp_path, rows, message):
    trace = load_trace(write_trace(tmp_path / "out.trace", rows))
    vm = kvmcore.create_vm(SimpleArchBatch())
    with pytest.raises(ValueError, match=message):
        migrate(vm, guest=SMALL, workload=Workload(kind="trace", trace=trace))


def test_units():
    from kvmcore.migration.units import parse_bandwidth, parse_duration_ms, parse_rate, parse_size

    assert parse_size("4G") == 4 << 30 and parse_size("512MiB") == 512 * MIB and parse_size("4096") == 4096
    assert parse_rate("20000", 4096) == 20000 and parse_rate("64M", 4096) == 16384
    assert parse_rate("64MiB/s", 65536) == 1024
    assert parse_bandwidth("128M") == 128 * MIB and parse_bandwidth("1GiB/s") == 1 << 30
    assert parse_duration_ms("300") == 300 and parse_duration_ms("0.3s") == 300 and parse_duration_ms("5ms") == 5
    for bad in ("4X", "", "G", "-1"):
        with pytest.raises(ValueError):
            parse_size(bad)


# -- the dirty ring ------------------------------------------------------------------------

from kvmcore.dirty_ring import HARVEST_DTYPE  # noqa: E402
from kvmcore.migration import RingSource  # noqa: E402

RING_ARCHS = [pytest.param(name, marks=pytest.mark.arch(name), id=name) for name in ("x86", "arm64")]


def smallest_ring(vm) -> int:
    """The smallest ring the VM's arch accepts (4 KiB, or 16 KiB with x86 PML), so
    the ring fills during a 16 MiB migration."""
    from kvmcore.uapi import KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL

    cap = KVM_CAP_DIRTY_LOG_RING if vm.check_extension(KVM_CAP_DIRTY_LOG_RING) else KVM_CAP_DIRTY_LOG_RING_ACQ_REL
    for size in (4096, 8192, 16384, 32768):
        probe = kvmcore.create_vm(vm.arch) if getattr(vm, "backend", "sim") == "sim" else None
        if probe is None:
            return 4096
        try:
            probe.enable_cap(cap, size)
            return size
        except kvmcore.KvmError:
            continue
    raise AssertionError("no small ring accepted")


def ring_params(size: int, **kw) -> MigrationParameters:
    return MigrationParameters(max_bandwidth=64 * MIB, dirty_ring=True, dirty_ring_size=size, **kw)


@pytest.mark.parametrize("ring_arch", RING_ARCHS)
@pytest.mark.parametrize("kind", ["hotset", "sweep"])
def test_ring_mode_is_verified_with_ring_full_exits_and_device_writes(ring_arch, kind):
    vm = make_vm(ring_arch)
    size = smallest_ring(vm)
    engine = build(vm, guest=SMALL, workload=Workload(kind=kind, rate=8192, device_fraction=0.1),
                   params=ring_params(size))
    report = engine.run()
    assert isinstance(engine.source, RingSource)
    assert report.dirty_log.startswith("dirty-ring")
    assert report.verified, f"{report.mismatched_pages} pages differ"
    ring = report.to_dict()["dirty-ring"]
    assert ring["size"] == size and ring["entries"] == size // 16
    assert ring["ring-full-exits"] > 0          # the small ring filled, and the driver resumed the vCPU
    assert ring["harvested"] > 0 and ring["reset-entries"] == ring["harvested"]
    assert ring["resets"] == ring["ring-full-exits"] + report.ram.dirty_sync_count
    # KVM drops the VMM's writes in a ring-only VM: the engine's own log carries them
    assert report.guest["device-log"] == "vmm"
    assert report.device_writes > 50
    assert report.kvm_stats["dirty_marks_dropped"] == 0
    assert report.kvm_stats["dirty_log_gets"] == 0


@pytest.mark.arch("x86")
def test_ring_mode_default_size_and_the_report():
    vm = make_vm("x86")
    report = migrate(vm, guest=SMALL, workload=Workload(kind="hotset", rate=4096, device_fraction=0.02),
                     params=MigrationParameters(max_bandwidth=64 * MIB, dirty_ring=True))
    data = report.to_dict()
    assert report.verified
    assert data["dirty-ring"]["entries"] == 4096 and data["dirty-ring"]["ring-full-exits"] == 0
    assert data["parameters"]["x-dirty-ring"] is True
    # QEMU's ram fields are the same as in the bitmap modes
    assert data["ram"]["precopy-bytes"] + data["ram"]["downtime-bytes"] == data["ram"]["transferred"]
    assert data["ram"]["dirty-sync-count"] == len(data["rounds"])
    assert "dirty-ring" not in migrate(make_vm("x86"), guest=SMALL, workload=Workload(rate=1024),
                                       params=FAST_LINK).to_dict()


@pytest.mark.arch("x86")
def test_device_writes_through_kvm_are_refused_in_a_ring_only_vm():
    with pytest.raises(ValueError, match="ring-only"):
        migrate(make_vm("x86"), guest=SMALL, params=ring_params(65536), device_log="kvm")


class LateResetRing(RingSource):
    """Broken: harvests without resetting, and re-arms the pages only at the next
    harvest, after they were copied: a write in between is not logged."""

    def harvest(self, vm, slots):
        with self._lock:
            self._reset(vm)
            self._collect(vm)
            got = np.concatenate(self._buffer) if self._buffer else np.zeros(0, HARVEST_DTYPE)
            self._buffer = []
        from kvmcore.migration.dirtylog import _bucket
        return _bucket(got, slots)


class DroppingRing(RingSource):
    """Broken: loses every 8th entry it harvests."""

    def _collect(self, vm):
        super()._collect(vm)
        self._buffer = [b[np.arange(len(b)) % 8 != 7] for b in self._buffer]


@pytest.mark.arch("x86")
@pytest.mark.parametrize("broken", [LateResetRing, DroppingRing], ids=["late-reset", "drops-entries"])
def test_a_broken_ring_consumer_is_not_verified(broken, monkeypatch):
    import kvmcore.migration.engine as engine_module

    monkeypatch.setattr(engine_module, "RingSource", broken)
    vm = make_vm("x86")
    engine = build(vm, guest=SMALL, workload=Workload(kind="hotset", rate=8192),
                   params=ring_params(65536, max_iterations=4, downtime_limit_ms=10))
    assert isinstance(engine.source, broken)
    report = engine.run()
    assert report.status == "completed"
    assert not report.verified and report.mismatched_pages > 0


@pytest.mark.parametrize("arch_name", [pytest.param(n, marks=pytest.mark.arch(n), id=n) for n in ("arm", "riscv")])
def test_ring_on_an_arch_without_one_names_those_with_one(arch_name):
    vm = make_vm(arch_name)
    with pytest.raises(ValueError, match="offers no dirty ring") as info:
        migrate(vm, guest=SMALL, params=ring_params(65536))
    assert "x86" in str(info.value) and "arm64" in str(info.value)


@pytest.mark.arch("x86")
@pytest.mark.parametrize("size, errno_name", [(1000, "EINVAL"), (2 << 20, "E2BIG"), (1 << 31, "E2BIG"),
                                              (1 << 32, "EINVAL")])  # the kernel's u32: 2**32 is 0
def test_bad_ring_sizes_are_the_kernels(size, errno_name):
    with pytest.raises(ValueError, match=errno_name):
        migrate(make_vm("x86"), guest=SMALL, params=ring_params(size))


def test_ring_and_manual_protect_are_exclusive():
    with pytest.raises(ValueError, match="choose one"):
        MigrationParameters(dirty_ring=True, manual_protect=True)


@pytest.mark.kvm
@pytest.mark.parametrize("size", [65536, 4096])
def test_kvm_backend_ring_mode_is_verified(kvm, size):
    vm = kvmcore.create_vm("x86", backend="kvm")
    try:
        report = migrate(vm, guest=GuestSpec(memory=32 * MIB),
                         workload=Workload(kind="hotset", rate=16384, device_fraction=0.02),
                         params=ring_params(size, max_iterations=5))
    finally:
        vm.close()
    assert report.time_model == "real" and report.guest["device-log"] == "vmm"
    assert report.device_writes > 0 and report.guest_writes > 1000
    assert report.verified, f"{report.mismatched_pages} pages differ"
    if size == 4096:  # the vCPU thread met KVM_EXIT_DIRTY_RING_FULL and went on
        assert report.dirty_ring["ring-full-exits"] > 0


@pytest.mark.arch("x86")
def test_ring_mode_in_real_time_on_the_model():
    vm = make_vm("x86")
    report = migrate(vm, guest=SMALL, workload=Workload(kind="hotset", rate=8192, device_fraction=0.05),
                     params=ring_params(smallest_ring(vm)), time="real")
    assert report.verified and report.dirty_ring["ring-full-exits"] > 0


# -- a big, sparse guest -----------------------------------------------------------------

TIB = 1 << 40


@pytest.mark.arch("x86")
def test_a_1tib_sparse_guest_migrates_in_little_memory():
    import resource
    import time

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    t0 = time.monotonic()
    vm = make_vm("x86")
    engine = build(vm, guest=GuestSpec(memory=TIB), workload=Workload(kind="sparse", rate=16384, device_fraction=0.01,
                                                                     working_set=16384),
                   params=MigrationParameters())
    report = engine.run()
    elapsed = time.monotonic() - t0
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    npages = TIB // 4096
    assert report.verified, f"{report.mismatched_pages} pages differ"
    assert report.converged
    assert report.ram.total == TIB
    # the never-written pages went as zero pages, unread; only the working set was read
    assert report.rounds[0].pages_sent == npages
    assert report.ram.duplicate >= npages - 16384
    assert report.ram.normal < 4 * 16384
    assert report.checked_pages <= 16384 + report.guest_writes
    assert grown < 1536 * 1024, f"max RSS grew by {grown >> 10} MiB"
    assert elapsed < 120


def test_sparse_check_still_catches_a_lost_write():
    vm = kvmcore.create_vm(SimpleArch(flush=False))
    report = migrate(vm, guest=GuestSpec(memory=64 * MIB),
                     workload=Workload(kind="sparse", rate=4096, working_set=512),
                     params=MigrationParameters(max_bandwidth=32 * MIB))
    assert report.checked_pages < 64 * MIB // 4096
    assert not report.verified and report.mismatched_pages > 0


def test_sparse_guest_sends_zero_pages_unread_and_is_verified(arch):
    vm = make_vm(arch)
    report = migrate(vm, guest=GuestSpec(memory=64 * MIB),
                     workload=Workload(kind="sparse", rate=4096, working_set=256, device_fraction=0.1),
                     params=FAST_LINK)
    npages = 64 * MIB // vm.page_size
    assert report.verified
    assert report.ram.duplicate >= npages - 256
    assert report.checked_pages < npages


@pytest.mark.arch("arm64")
def test_memory_beyond_the_ipa_space_is_refused():
    vm = make_vm("arm64")
    with pytest.raises(ValueError, match="40-bit IPA"):
        migrate(vm, guest=GuestSpec(memory=TIB), workload=Workload(kind="sparse"))


@pytest.mark.arch("x86")
def test_a_huge_guest_that_would_be_filled_is_refused():
    with pytest.raises(ValueError, match="sparse"):
        migrate(make_vm("x86"), guest=GuestSpec(memory=TIB), workload=Workload(kind="hotset"))
