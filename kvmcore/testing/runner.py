"""``run_conformance``: every check, on every option set, with shrunk reproducers.

Each stateful check gets its own hypothesis run, holding only that check after every
step, so a result names exactly the property that broke and one check's failure never
hides another's.  Failures from the arch itself (exceptions, unresolved faults) are
reported under ``steps-run`` whichever run met them.
"""

from __future__ import annotations

import random
import sys
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from hypothesis import HealthCheck, Phase, Verbosity, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.errors import Flaky, Unsatisfiable
from hypothesis.stateful import get_state_machine_test

import kvmcore
from kvmcore import uapi
from kvmcore.plugins import arch_name
from kvmcore.testing.checks import CHECK_NAMES, STATEFUL_CHECKS, ConformanceFailure, get_check
from kvmcore.testing.geometry_rules import check_geometry
from kvmcore.testing.machine import DirtyLogMachine, MachineConfig
from kvmcore.testing.ring_traces import check_ring_batched_faults, why_not_applicable
from kvmcore.testing.unbatched import batched_hooks
from kvmcore.testing.report import ERROR, FAILED, PASSED, SKIPPED, CheckResult, ConformanceReport

DEFAULT_MAX_EXAMPLES = 100
DEFAULT_STEPS = 20


def run_conformance(arch: Any, *, options: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
                    checks: Iterable[str] | None = None, max_examples: int = DEFAULT_MAX_EXAMPLES,
                    seed: int | None = None, steps: int = DEFAULT_STEPS, shrink: bool = True) -> ConformanceReport:
    """Hold ``arch`` to every check of :data:`kvmcore.testing.CHECKS` and report.

    :param arch: an installed arch's name (``kvmcore.available_archs()``, third-party
        ones included) or a plugin object, as :func:`kvmcore.create_vm` takes.
    :param options: VM options, or a list of option sets to run each (default: the
        arch's defaults).
    :param checks: names of the checks to run (default: all).
    :param max_examples: traces hypothesis tries per stateful check.
    :param seed: makes the run repeatable; a random one is chosen and reported if None.
    :param steps: the most steps in one trace.
    :param shrink: shrink a failing trace to the smallest one (slower, much shorter reports).
    """
    selected = list(CHECK_NAMES) if checks is None else [get_check(c).name for c in checks]
    option_sets = [dict(options or {})] if options is None or isinstance(options, Mapping) else \
        [dict(o) for o in options]
    seed = random.SystemRandom().randrange(1 << 32) if seed is None else int(seed)
    results: list[CheckResult] = []
    for opts in option_sets:
        results += _run_option_set(arch, opts, selected, max_examples, seed, steps, shrink)
    return ConformanceReport(arch if isinstance(arch, str) else arch_name(arch), seed, max_examples, results)


def _run_option_set(arch: Any, opts: dict, selected: list[str], max_examples: int, seed: int,
                    steps: int, shrink: bool) -> list[CheckResult]:
    start = time.perf_counter()
    try:
        vm = kvmcore.create_vm(arch, **opts)
        batched = batched_hooks(arch)
    except Exception as exc:
        msg = f"{type(exc).__name__}: {exc}"
        out = [CheckResult("loads", FAILED, opts, msg, seconds=time.perf_counter() - start)]
        return out + [CheckResult(c, SKIPPED, opts, "the arch does not load") for c in selected if c != "loads"]
    out = []
    if "loads" in selected:
        out.append(CheckResult("loads", PASSED, opts, seconds=time.perf_counter() - start))
    if "geometry" in selected:
        out.append(_timed("geometry", opts, lambda: check_geometry(arch, opts)))
    if "ring-batched-faults" in selected:
        why = why_not_applicable(vm)
        traces = max(1, max_examples // 5)
        out.append(CheckResult("ring-batched-faults", SKIPPED, opts, why) if why else
                   _timed("ring-batched-faults", opts, lambda: check_ring_batched_faults(arch, opts, seed, traces)))
    caps = vm.check_extension(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
    manual_modes = (0, uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    if caps & uapi.KVM_DIRTY_LOG_INITIALLY_SET:
        manual_modes += (uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | uapi.KVM_DIRTY_LOG_INITIALLY_SET,)
    run_settings = settings(max_examples=max_examples, stateful_step_count=steps, deadline=None, database=None,
                            suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet,
                            print_blob=False, report_multiple_bugs=False,
                            phases=[p for p in Phase if shrink or p is not Phase.shrink])
    step_failure: CheckResult | None = None
    ran = False
    for check in (c for c in STATEFUL_CHECKS if c in selected):
        if check == "batched-hook" and not batched:
            out.append(CheckResult(check, SKIPPED, opts, "the arch implements no batched hook"))
            continue
        ran = True
        config = MachineConfig(arch, opts, check, vm.geometry, manual_modes,
                               "kvm_mmu_write_protect_pt_masked_batch" in batched)
        t0 = time.perf_counter()
        found = _run_machine(config, run_settings, seed)
        secs = time.perf_counter() - t0
        mine = [f for f in found if isinstance(f, ConformanceFailure) and f.check == check]
        steps_failed = [f for f in found if isinstance(f, ConformanceFailure) and f.check == "steps-run"]
        other = [f for f in found if not isinstance(f, ConformanceFailure)]
        if mine:
            out.append(CheckResult(check, FAILED, opts, mine[0].message, mine[0].trace, secs))
        elif other:
            out.append(CheckResult(check, ERROR, opts, _describe(other[0]), seconds=secs))
        elif steps_failed:
            out.append(CheckResult(check, ERROR, opts, "undecided: the arch raised during this check's traces "
                                                       "(see steps-run)", seconds=secs))
        else:
            out.append(CheckResult(check, PASSED, opts, seconds=secs))
        if steps_failed and step_failure is None:
            step_failure = CheckResult("steps-run", FAILED, opts, steps_failed[0].message, steps_failed[0].trace)
    if step_failure is not None:  # reported even when not selected: it decides the others
        out.append(step_failure)
    elif "steps-run" in selected and ran:
        out.append(CheckResult("steps-run", PASSED, opts))
    return out


def _timed(check: str, opts: dict, fn) -> CheckResult:
    t0 = time.perf_counter()
    try:
        fn()
    except ConformanceFailure as failure:
        return CheckResult(check, FAILED, opts, failure.message, failure.trace, time.perf_counter() - t0)
    except Exception as exc:
        return CheckResult(check, ERROR, opts, _describe(exc), seconds=time.perf_counter() - t0)
    return CheckResult(check, PASSED, opts, seconds=time.perf_counter() - t0)


@contextmanager
def _seed_decides_alone():
    """Keep hypothesis from mixing the literals of locally imported modules into the
    values it draws (its "local constants", 6.131 and later): which modules count
    depends on what the process has imported and from where (a checkout or an
    installed package), so the same seed drew different traces.  Where hypothesis
    has no such thing, nothing is changed."""
    providers = sys.modules.get("hypothesis.internal.conjecture.providers")
    original = getattr(providers, "_get_local_constants", None)
    if original is None:
        yield
        return
    empty = providers.Constants()
    providers._get_local_constants = lambda: empty
    providers.CONSTANTS_CACHE.cache.clear()
    try:
        yield
    finally:
        providers._get_local_constants = original
        providers.CONSTANTS_CACHE.cache.clear()


def _run_machine(config: MachineConfig, run_settings: settings, seed: int) -> list[BaseException]:
    """Run one check's state machine; the (shrunk) failures it ended with."""
    test = get_state_machine_test(lambda: DirtyLogMachine(config), settings=run_settings)
    test = hypothesis_seed(seed)(test)
    try:
        with _seed_decides_alone():
            test()
    except BaseException as exc:  # noqa: BLE001 - every way a run can end is reported
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return _flatten(exc)
    return []


def _flatten(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup) and not isinstance(exc, Flaky):
        return [leaf for sub in exc.exceptions for leaf in _flatten(sub)]
    return [exc]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, Flaky):
        return (f"the arch behaved differently when hypothesis replayed a trace ({type(exc).__name__}): "
                "does it keep state outside kvm.arch_state, shared between VMs? " + str(exc).split("\n")[0])
    if isinstance(exc, Unsatisfiable):
        return "the arch refused every slot layout tried (kvm_arch_prepare_memory_region)"
    return "the kit failed to run: " + "".join(traceback.format_exception(exc)).strip()


def parse_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` from a command line: the value as a Python literal (``16384``,
    ``True``, ``'sv39x4'``) where it is one, else as the string."""
    import ast

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"option {text!r} is not KEY=VALUE")
    try:
        return key.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip(), value
