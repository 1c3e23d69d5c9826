"""Proof that the kit works: it fails every classic bug of kernel-dirty-log.md section 8
that a plugin can make (tests/mutants.py), on the check that names it, and the
reproducer it prints replays the failure.  (That it passes correct archs is
test_conformance.py's.)"""

import pytest

from kvmcore.testing import run_conformance
from kvmcore.testing.report import FAILED
from mutants import MUTANTS, REAL_MUTANTS

pytestmark = pytest.mark.arch("simple")  # the mutants are built on the stand-in (and a few on real archs)

# (mutant, check that must fail, seed).  Every lost-dirty-page bug is caught by the
# invariant right away and by the exact dirty set one harvest later; walk bugs also by
# calling the protect hook directly.
CAUGHT = [
    ("drop-top-bit", "mst-invariant", 1),
    ("drop-top-bit", "exact-dirty-set", 1),
    ("drop-top-bit", "protect-hook", 1),
    ("fls-without-plus-one", "mst-invariant", 1),
    ("fls-without-plus-one", "protect-hook", 1),
    ("skipped-2m-boundary", "mst-invariant", 1),
    ("skipped-2m-boundary", "protect-hook", 1),
    ("skipped-2m-boundary", "exact-dirty-set", 1),
    ("skipped-1g-boundary", "mst-invariant", 1),
    ("skipped-1g-boundary", "exact-dirty-set", 1),
    ("missing-flush", "mst-invariant", 1),
    ("missing-flush", "exact-dirty-set", 1),
    ("missing-flush", "protect-hook", 1),
    ("writable-block-on-fault", "huge-pages", 1),
    ("writable-block-on-fault", "mst-invariant", 1),
    ("writable-block-on-fault", "exact-dirty-set", 1),
    ("read-fault-writable", "mst-invariant", 1),
    ("no-initial-protect", "mst-invariant", 1),
    ("no-initial-protect", "huge-pages", 1),
    ("no-initial-protect", "exact-dirty-set", 1),
    ("truncated-32", "mst-invariant", 1),
    ("truncated-32", "protect-hook", 1),
    ("mask-truncated-32", "mst-invariant", 1),
    ("mask-truncated-32", "exact-dirty-set", 1),
    ("sloppy-batch", "batched-hook", 3),
    ("wrong-granule", "geometry", 1),
    ("unresolved-read-fault", "steps-run", 1),
]


def failing(name, check, seed, shrink=False):
    checks = ["mst-invariant"] if check == "steps-run" else [check]
    report = run_conformance(MUTANTS[name](), checks=checks, max_examples=100, seed=seed, shrink=shrink)
    assert report.status(check) == FAILED, report.format()
    return next(r for r in report.results if r.check == check)


@pytest.mark.parametrize("name, check, seed", CAUGHT, ids=[f"{n}-{c}" for n, c, _ in CAUGHT])
def test_kit_fails_the_mutant_on_the_check_that_names_its_bug(name, check, seed):
    result = failing(name, check, seed)
    if result.reproducer:
        with pytest.raises(Exception):
            exec(result.reproducer, {"ARCH": MUTANTS[name]()})


def test_every_mutant_is_caught():
    assert {name for name, _, _ in CAUGHT} == set(MUTANTS)


def test_stateful_failures_are_not_confused_with_each_other():
    """The batched-hook mutant over-protects: safe, so the lost-page checks pass it."""
    report = run_conformance(MUTANTS["sloppy-batch"](), checks=["mst-invariant", "exact-dirty-set"],
                             max_examples=25, seed=3)
    assert report.passed, report.format()


def test_shrinking_leaves_a_short_reproducer():
    name = "missing-flush"
    result = failing(name, "mst-invariant", 1, shrink=True)
    body = result.reproducer.split("vm = kvmcore.create_vm(ARCH, **OPTIONS)\n", 1)[1].strip().splitlines()
    assert len(body) <= 12, result.reproducer
    with pytest.raises(AssertionError):
        exec(result.reproducer, {"ARCH": MUTANTS[name]()})


@pytest.mark.parametrize("check", ["mst-invariant", "exact-dirty-set", "protect-hook"])
@pytest.mark.parametrize("name", sorted(REAL_MUTANTS))
def test_kit_fails_mutants_of_the_real_plugins(name, check):
    """The real arm, arm64 and x86 plugins with one hook broken (they pass unbroken:
    test_conformance.py)."""
    try:
        mutant = REAL_MUTANTS[name]()
    except ImportError as exc:
        pytest.skip(f"{name}: the arch plugin does not import yet: {exc}")
    report = run_conformance(mutant, checks=[check], max_examples=100, seed=1, shrink=False)
    assert report.status(check) == FAILED, report.format()
