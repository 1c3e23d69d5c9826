"""What a conformance run found: one result per check and option set, readable and JSON."""

from __future__ import annotations

from typing import Any

import attrs

from kvmcore.testing.checks import get_check

PASSED, FAILED, SKIPPED, ERROR = "passed", "failed", "skipped", "error"


@attrs.frozen
class CheckResult:
    """One check on one option set.

    :param status: passed, failed (the arch broke it), skipped (does not apply, e.g. no
        batched hook) or error (the run could not decide: flaky arch, kit error).
    :param message: what broke, for the smallest failing trace hypothesis found.
    :param reproducer: a Python program that replays that trace and fails.
    """

    check: str
    status: str
    options: dict = attrs.field(factory=dict, converter=dict)
    message: str = ""
    reproducer: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in (PASSED, SKIPPED)

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class ConformanceReport:
    """The outcome of :func:`kvmcore.testing.run_conformance`; ``passed`` iff no check
    failed or errored."""

    arch: str
    seed: int
    max_examples: int
    results: tuple[CheckResult, ...] = attrs.field(converter=tuple)

    @property
    def passed(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if not r.ok]

    def status(self, check: str) -> str:
        """The worst status of ``check`` over the option sets (failed > error > passed > skipped)."""
        order = (FAILED, ERROR, PASSED, SKIPPED)
        found = [r.status for r in self.results if r.check == check]
        return min(found, key=order.index) if found else SKIPPED

    def format(self) -> str:
        lines = [f"kvmcore conformance: arch {self.arch!r}, seed {self.seed}, "
                 f"{self.max_examples} examples per check"]
        for r in self.results:
            opts = f" {r.options}" if r.options else ""
            lines.append(f"  {r.status.upper():7} {r.check}{opts}  ({r.seconds:.1f} s)")
        for r in self.failures:
            check = get_check(r.check)
            lines += ["", f"== {r.check} {r.status.upper()}{' ' + str(r.options) if r.options else ''}",
                      f"demands: {check.title}", f"from:    {check.spec}", f"found:   {r.message}"]
            if r.reproducer:
                lines += ["smallest failing trace (a Python program):", ""]
                lines += ["    " + line if line else "" for line in r.reproducer.rstrip("\n").split("\n")]
        verdict = "PASSED" if self.passed else f"FAILED ({len(self.failures)} of {len(self.results)})"
        lines += ["", f"{verdict}; rerun with --seed {self.seed} to repeat this run"]
        return "\n".join(lines)

    __str__ = format

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "passed": self.passed, "seed": self.seed, "max_examples": self.max_examples,
                "results": [r.to_dict() for r in self.results]}
