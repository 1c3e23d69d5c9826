"""The conformance kit passes every built-in arch and the stand-in; its report, command
and pytest plugin say so in the forms the contract promises."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

import kvmcore
from kvmcore.testing import CHECK_NAMES, run_conformance
from kvmcore.testing.command import conformance
from kvmcore.testing.report import FAILED, SKIPPED
from simple_arch import SimpleArch, SimpleArchBatch

EXAMPLES = 15  # per check; the kit's own default (100) is for users


def loads_or_skip(arch):
    """Skip, with the reason, an arch whose plugin cannot be imported yet."""
    try:
        kvmcore.get_plugin_manager(arch)
    except (ImportError, AttributeError, ValueError) as exc:
        if isinstance(arch, str):
            pytest.skip(f"arch {arch!r} does not load: {type(exc).__name__}: {exc}")
        raise


def test_kit_passes_every_arch_of_the_matrix(arch):
    loads_or_skip(arch)
    report = run_conformance(arch, max_examples=EXAMPLES, seed=20240601)
    assert report.passed, report.format()
    assert {r.check for r in report.results} == set(CHECK_NAMES)


@pytest.mark.arch("simple")
def test_kit_passes_the_stand_in_with_the_batched_hook_and_32_bit_longs():
    for plugin in (SimpleArchBatch(), SimpleArch(bits_per_long=32)):
        report = run_conformance(plugin, max_examples=EXAMPLES, seed=7)
        assert report.passed, report.format()
    assert report.status("batched-hook") == SKIPPED


@pytest.mark.arch("simple")
def test_report_names_the_failed_check_and_carries_a_runnable_reproducer():
    report = run_conformance(SimpleArch(flush=False), checks=["mst-invariant"], max_examples=40, seed=1)
    assert not report.passed
    assert report.status("mst-invariant") == FAILED
    result = report.failures[0]
    assert "TLB" in result.message
    text = report.format()
    assert "== mst-invariant FAILED" in text and "check_mst_invariant(vm)" in text
    assert f"--seed {report.seed}" in text
    with pytest.raises(AssertionError, match="without being logged"):
        exec(result.reproducer, {"ARCH": SimpleArch(flush=False)})
    assert json.loads(json.dumps(report.to_dict()))["results"][0]["status"] == FAILED


@pytest.mark.arch("simple")
def test_same_seed_same_report():
    a = run_conformance(SimpleArch(flush=False), checks=["protect-hook"], max_examples=20, seed=5, shrink=False)
    b = run_conformance(SimpleArch(flush=False), checks=["protect-hook"], max_examples=20, seed=5, shrink=False)
    assert [(r.status, r.message, r.reproducer) for r in a.results] == \
        [(r.status, r.message, r.reproducer) for r in b.results]


@pytest.mark.arch("simple")
def test_a_plugin_that_does_not_load_fails_loads_and_skips_the_rest():
    class NoHooks:
        pass

    report = run_conformance(NoHooks(), max_examples=1, seed=1)
    assert report.status("loads") == FAILED and "required hook" in report.results[0].message
    assert {r.status for r in report.results[1:]} == {SKIPPED}


@pytest.mark.arch("simple")
def test_command_exit_status_is_0_iff_the_arch_passes():
    runner = CliRunner()
    ok = runner.invoke(conformance, ["--arch", "simple_arch:SimpleArchBatch", "--max-examples", "5", "--seed", "3"])
    assert ok.exit_code == 0, ok.output
    assert "PASSED" in ok.output
    bad = runner.invoke(conformance, ["--arch", "mutants:MissingFlush", "--max-examples", "30", "--seed", "1",
                                      "--check", "mst-invariant", "--json", "--no-shrink"])
    assert bad.exit_code == 1, bad.output
    report = json.loads(bad.output)
    assert report["passed"] is False and report["results"][0]["check"] == "mst-invariant"


@pytest.mark.arch("simple")
def test_command_refuses_an_unknown_arch_in_one_line():
    result = CliRunner().invoke(conformance, ["--arch", "vax"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "unknown arch 'vax'" in result.output


@pytest.mark.arch("riscv")
def test_command_takes_an_installed_arch_by_name_and_its_options():
    result = CliRunner().invoke(conformance, ["--arch", "riscv", "--option", "mode='sv39x4'", "--check", "geometry",
                                              "--check", "loads", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["results"][0]["options"] == {"mode": "sv39x4"}


@pytest.mark.arch("riscv")
def test_pytest_plugin_adds_one_item_per_check(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "kvmcore.testing.plugin", "-p", "no:cacheprovider",
                           "--kvmcore-arch", "riscv", "--kvmcore-max-examples", "2", "--kvmcore-seed", "1",
                           "-q", "-rs"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # riscv has no dirty ring: the ring check is an item too, skipped with the reason
    assert f"{len(CHECK_NAMES) - 1} passed, 1 skipped" in proc.stdout, proc.stdout
    assert "takes faults one at a time with a dirty ring" in proc.stdout


@pytest.mark.arch("simple")
def test_the_kit_draws_from_its_seed_alone(tmp_path, monkeypatch):
    """Hypothesis mixes in the literals of local modules the process has imported; in
    the kit they would make ``--seed`` repeat a run only if the same code was loaded
    from the same places.  While the kit's traces run, hypothesis sees none."""
    providers = pytest.importorskip("hypothesis.internal.conjecture.providers")
    if not hasattr(providers, "_get_local_constants"):
        pytest.skip("this hypothesis draws no local constants")
    (tmp_path / "kvmcore_kit_constants.py").write_text("GPAS = [" + ", ".join(
        str((1 << 30) + 4096 * k + 8) for k in range(50)) + "]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import kvmcore_kit_constants  # noqa: F401 - imported for its literals
    seen = []

    class Spy(SimpleArch):
        @kvmcore.hookimpl
        def kvm_flush_remote_tlbs(self, kvm):
            seen.append(len(providers._get_local_constants()))
            super().kvm_flush_remote_tlbs(kvm)

    assert len(providers._get_local_constants()) > 0
    report = run_conformance(Spy(), checks=["exact-dirty-set"], max_examples=5, seed=11)
    assert report.results[0].status == "passed"
    assert seen and set(seen) == {0}
