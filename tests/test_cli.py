"""The ``kvmcore`` command: ``archs``, ``migrate``, and one line for every bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

import kvmcore
from kvmcore.cli import main
from simple_arch import SimpleArch

STAND_IN = "simple_arch:SimpleArchBatch"
BROKEN = SimpleArch(flush=False)  # reached as f"{__name__}:BROKEN"
SMALL = ["--memory", "16M"]
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def run(*args: str):
    return CliRunner().invoke(main, list(args))


# -- archs ------------------------------------------------------------------------------


def test_archs_table():
    result = run("archs")
    assert result.exit_code == 0, result.stderr
    for name in kvmcore.available_archs():
        assert name in result.stdout
    assert "backend kvm" in result.stdout


def test_archs_json():
    result = run("archs", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert [a["name"] for a in data["archs"]] == kvmcore.available_archs()
    for entry in data["archs"]:
        if entry["loadable"]:
            vm = kvmcore.create_vm(entry["name"])
            assert entry["geometry"] == vm.geometry.describe()
            assert entry["options"] == dict(vm.info.options)
        else:
            assert entry["error"]
    assert data["backends"]["sim"]["available"] is True
    assert set(data["backends"]["kvm"]) == {"available", "reason"}


# -- migrate ----------------------------------------------------------------------------


def test_migrate_json_is_one_object_with_the_design_fields():
    result = run("migrate", "--arch", STAND_IN, *SMALL, "--json")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    data = json.loads(result.stdout)  # exactly one JSON document, nothing around it
    assert data["status"] == "completed" and data["verified"] is True
    for key in ("total-time", "downtime", "expected-downtime", "setup-time", "converged", "rounds"):
        assert key in data
    for key in ("transferred", "remaining", "total", "dirty-sync-count", "dirty-pages-rate"):
        assert key in data["ram"]
    assert data["ram"]["total"] == 16 << 20
    assert data["ram"]["remaining"] == 0
    assert data["ram"]["dirty-sync-count"] == len(data["rounds"])
    assert data["ram"]["transferred"] >= data["ram"]["total"]


def test_migrate_each_arch(arch):
    """Once per arch of the test matrix (conftest); the stand-in goes by MODULE:OBJECT."""
    try:
        kvmcore.create_vm(arch)
    except Exception as exc:  # a plugin still being written
        pytest.skip(f"arch {arch!r} cannot create a VM: {type(exc).__name__}: {exc}")
    if not isinstance(arch, str):
        arch = STAND_IN
    result = run("migrate", "--arch", arch, *SMALL, "--json", "--manual-protect", "--clear-bitmap-shift", "8")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["verified"] is True and data["guest"]["arch"] in (arch, "simple")


def test_migrate_human_output():
    result = run("migrate", "--arch", STAND_IN, *SMALL, "--workload", "sweep", "--auto-converge")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "Rounds" in out and "stop-copy" in out
    assert "verified: yes" in out and "downtime" in out and "dirty-sync-count" in out


def test_same_seed_same_json():
    args = ["migrate", "--arch", STAND_IN, *SMALL, "--workload", "uniform", "--json"]
    first, second = run(*args, "--seed", "5"), run(*args, "--seed", "5")
    assert first.exit_code == second.exit_code == 0
    assert first.stdout == second.stdout
    assert run(*args, "--seed", "6").stdout != first.stdout


def test_not_verified_exits_1_with_the_report():
    result = run("migrate", "--arch", f"{__name__}:BROKEN", *SMALL, "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["verified"] is False
    assert len(result.stderr.splitlines()) == 1 and "verification failed" in result.stderr


def test_not_converging_says_so():
    result = run("migrate", "--arch", STAND_IN, *SMALL, "--workload", "sweep", "--dirty-rate", "64M",
                 "--bandwidth", "32M", "--max-iterations", "2")
    assert result.exit_code == 0, result.stderr
    assert "converged   NO" in result.stdout and "max-iterations" in result.stdout


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "rounds.png"
    result = run("migrate", "--arch", STAND_IN, *SMALL, "--plot", str(path), "--json")
    assert result.exit_code == 0, result.stderr
    json.loads(result.stdout)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_trace_workload(tmp_path):
    trace = tmp_path / "w.trace"
    trace.write_text("".join(f"0 {g}\n" for g in range(0, 4096, 7)))
    result = run("migrate", "--arch", STAND_IN, *SMALL, "--workload", f"trace:{trace}", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["verified"] and data["guest"]["workload"]["kind"] == "trace"


# -- bad input: one line on stderr, non-zero, no traceback -------------------------------


def _bad_trace(tmp_path):
    path = tmp_path / "outside.trace"
    path.write_text("0 1\n0 999999\n")
    return str(path)


BAD_INPUT = {
    "unknown arch": (["--arch", "no-such-arch"], "unknown arch"),
    "memory does not parse": (["--memory", "4X"], "4X"),
    "memory zero": (["--memory", "0"], "memory"),
    "memory not whole pages": (["--memory", "1000"], "page"),
    "bandwidth zero": (["--bandwidth", "0"], "max-bandwidth"),
    "bandwidth does not parse": (["--bandwidth", "fast"], "bandwidth"),
    "dirty rate does not parse": (["--dirty-rate", "lots"], "rate"),
    "downtime does not parse": (["--downtime-limit", "soon"], "duration"),
    "unknown workload": (["--workload", "bogus"], "workload"),
    "trace outside the guest": (["--workload", "trace:{bad_trace}"], "outside the guest"),
    "trace missing": (["--workload", "trace:/no/such/file"], "does not exist"),
    "unknown backend": (["--backend", "xen"], "backend"),
    "kvm backend for another arch": (["--backend", "kvm", "--arch", "arm64"], "x86"),
    "unknown arch option": (["--opt", "bogus=1"], "bogus"),
    "option without value": (["--opt", "nokey"], "KEY=VALUE"),
    "plot not png": (["--plot", "rounds.jpg"], "PNG"),
    "bad host page size": (["--host-page-size", "3M"], "host-page-size"),
    "zero iterations": (["--max-iterations", "0"], "max-iterations"),
    "clear shift too small": (["--manual-protect", "--clear-bitmap-shift", "3"], "x-clear-bitmap-shift"),
    "plugin object missing": (["--arch", "simple_arch:NoSuchThing"], "NoSuchThing"),
    "unknown flag": (["--frobnicate"], "frobnicate"),
    "write fraction zero": (["--write-fraction", "0"], "write-fraction"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line(case, tmp_path):
    args, needle = BAD_INPUT[case]
    args = [a.format(bad_trace=_bad_trace(tmp_path)) for a in args]
    if "--arch" not in args:
        args = ["--arch", STAND_IN, *args]
    result = run("migrate", *SMALL, *args, "--json")
    assert result.exit_code not in (0, None), result.stdout
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and needle.lower() in lines[0].lower()
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_unavailable_kvm_backend_is_one_line(monkeypatch):
    system = pytest.importorskip("kvmcore.kvm.system")
    monkeypatch.setattr(system, "DEV_KVM", "/nonexistent/kvm")
    result = run("migrate", "--backend", "kvm", *SMALL, "--json")
    assert result.exit_code not in (0, None)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "/nonexistent/kvm" in lines[0], result.stderr
    assert result.stdout == ""


# -- a real process ---------------------------------------------------------------------


def _kvmcore_command() -> list[str]:
    script = shutil.which("kvmcore")
    return [script] if script else [sys.executable, "-c", "from kvmcore.cli import main; main()"]


def test_subprocess_migrate_json():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [TESTS_DIR, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([*_kvmcore_command(), "migrate", "--json", "--arch", STAND_IN, *SMALL],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    data = json.loads(proc.stdout)
    assert data["status"] == "completed" and data["verified"] is True


def test_subprocess_bad_input_has_no_traceback():
    proc = subprocess.run([*_kvmcore_command(), "migrate", "--memory", "lots"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


# -- conformance (the kit is kvmcore.testing's; this is its command line) -----------------


def test_conformance_passes_for_the_stand_in():
    result = run("conformance", "--arch", STAND_IN, "--max-examples", "3", "--seed", "1", "--json")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["passed"] is True


def test_conformance_fails_a_broken_arch():
    result = run("conformance", "--arch", f"{__name__}:BROKEN", "--max-examples", "5", "--seed", "1",
                 "--no-shrink", "--check", "mst-invariant")
    assert result.exit_code == 1
    assert "FAILED" in result.stdout


@pytest.mark.parametrize("args, needle", [(["--arch", "no-such-arch"], "unknown arch"),
                                          (["--arch", STAND_IN, "--check", "nope"], "unknown check"),
                                          ([], "--arch")])
def test_conformance_bad_input_is_one_line(args, needle):
    result = run("conformance", *args)
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1 and needle in result.stderr


# -- difftest ---------------------------------------------------------------------------


@pytest.mark.arch("x86")
def test_difftest_agrees_with_the_kernel(kvm):
    result = run("difftest", "--rounds", "3", "--seeds", "2", "--mode", "manual", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["agree"] for r in data["results"]] == [True, True]


@pytest.mark.arch("x86")
def test_difftest_names_where_a_broken_model_differs(kvm):
    result = run("difftest", "--arch", f"{__name__}:BROKEN", "--rounds", "3")
    assert result.exit_code == 1
    assert "seed 1: round" in result.stdout and "only in B" in result.stdout


def test_difftest_between_two_models_and_bad_input():
    result = run("difftest", "--arch", STAND_IN, "--against", "sim", "--against-arch", "arm64", "--rounds", "2")
    assert result.exit_code == 0, result.output
    result = run("difftest", "--arch", "no-such-arch")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


# -- the dirty ring and big sparse guests (migrate) ---------------------------------------


def test_migrate_dirty_ring_json_has_the_ring_counters():
    result = run("migrate", "--arch", "x86", *SMALL, "--dirty-ring", "--ring-size", "4K", "--dirty-rate", "32M",
                 "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["verified"] is True and data["dirty-log"].startswith("dirty-ring")
    assert data["dirty-ring"]["entries"] == 256 and data["dirty-ring"]["ring-full-exits"] > 0
    assert data["guest"]["device-log"] == "vmm"
    assert set(data["ram"]) >= {"transferred", "remaining", "total", "dirty-sync-count", "dirty-pages-rate"}


def test_migrate_dirty_ring_human_output():
    result = run("migrate", "--arch", "arm64", *SMALL, "--dirty-ring")
    assert result.exit_code == 0, result.stderr
    assert "dirty-ring (4096 entries per vCPU)" in result.stdout
    assert "ring-full exits" in result.stdout


RING_BAD_INPUT = {
    "ring on arm": (["--arch", "arm", "--dirty-ring"], "archs with a ring: arm64, x86"),
    "ring on riscv": (["--arch", "riscv", "--dirty-ring"], "offers no dirty ring"),
    "ring size not a power of two": (["--arch", "x86", "--dirty-ring", "--ring-size", "1000"], "EINVAL"),
    "ring size too big": (["--arch", "x86", "--dirty-ring", "--ring-size", "2M"], "E2BIG"),
    "ring size does not parse": (["--arch", "x86", "--dirty-ring", "--ring-size", "big"], "size"),
    "ring size without ring": (["--arch", "x86", "--ring-size", "4K"], "--dirty-ring"),
    "ring and manual protect": (["--arch", "x86", "--dirty-ring", "--manual-protect"], "choose one"),
    "memory beyond the IPA": (["--arch", "arm64", "--memory", "1T", "--workload", "sparse"], "IPA"),
    "huge guest filled": (["--arch", "x86", "--memory", "1T"], "sparse"),
    "working set below a page": (["--arch", "x86", "--workload", "sparse", "--working-set", "100"], "page"),
}


@pytest.mark.parametrize("case", sorted(RING_BAD_INPUT))
def test_ring_and_sparse_bad_input_is_one_line_exit_2(case):
    args, needle = RING_BAD_INPUT[case]
    result = run("migrate", *SMALL, *args, "--json")
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and needle.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_migrate_sparse_guest_counts_zero_pages():
    result = run("migrate", "--arch", "x86", "--memory", "4G", "--workload", "sparse", "--working-set", "4M",
                 "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    npages = (4 << 30) // 4096
    assert data["verified"] is True
    assert data["ram"]["duplicate"] >= npages - 1024
    assert data["checked-pages"] < npages // 100
    assert data["guest"]["workload"]["working-set-pages"] == 1024
