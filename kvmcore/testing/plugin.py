"""A pytest plugin: ``pytest -p kvmcore.testing.plugin --kvmcore-arch NAME``.

It adds one test item per check (``kvmcore-conformance[NAME-CHECK]``) to whatever else
pytest collected.  The checks of one arch share a single :func:`run_conformance`, run
by the first of its items; each item then passes, fails with that check's report
(message and reproducer) or skips.
"""

from __future__ import annotations

import pytest

from kvmcore.testing.checks import CHECK_NAMES
from kvmcore.testing.report import PASSED, SKIPPED, ConformanceReport
from kvmcore.testing.runner import DEFAULT_MAX_EXAMPLES, parse_option, run_conformance

_REPORTS = pytest.StashKey[dict]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvmcore", "kvmcore arch conformance kit")
    group.addoption("--kvmcore-arch", action="append", default=[], metavar="NAME",
                    help="run the conformance kit on this installed arch (repeatable)")
    group.addoption("--kvmcore-max-examples", type=int, default=DEFAULT_MAX_EXAMPLES,
                    help="traces tried per stateful check")
    group.addoption("--kvmcore-seed", type=int, default=None, help="repeat a run")
    group.addoption("--kvmcore-option", action="append", default=[], metavar="KEY=VALUE",
                    help="a VM option of the arch (repeatable)")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_REPORTS] = {}


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    for arch in config.getoption("kvmcore_arch"):
        for check in CHECK_NAMES:
            items.append(ConformanceItem.from_parent(session, name=f"kvmcore-conformance[{arch}-{check}]",
                                                     arch=arch, check=check))


class ConformanceFailed(Exception):
    """One check of the kit failed; the message is its report section."""


class ConformanceItem(pytest.Item):
    def __init__(self, *, arch: str, check: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.arch = arch
        self.check = check

    def _report(self) -> ConformanceReport:
        reports = self.config.stash[_REPORTS]
        if self.arch not in reports:
            reports[self.arch] = run_conformance(
                self.arch, options=dict(parse_option(o) for o in self.config.getoption("kvmcore_option")),
                max_examples=self.config.getoption("kvmcore_max_examples"),
                seed=self.config.getoption("kvmcore_seed"))
        return reports[self.arch]

    def runtest(self) -> None:
        report = self._report()
        mine = [r for r in report.results if r.check == self.check]
        if not mine or all(r.status == SKIPPED for r in mine):
            pytest.skip(next((r.message for r in mine if r.message), f"{self.check} did not run"))
        bad = [r for r in mine if r.status not in (PASSED, SKIPPED)]
        if bad:
            r = bad[0]
            lines = [f"{self.check} {r.status} for arch {self.arch!r} {r.options or ''} (seed {report.seed})",
                     r.message]
            if r.reproducer:
                lines += ["smallest failing trace:", r.reproducer]
            raise ConformanceFailed("\n".join(lines))

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ConformanceFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, self.name


