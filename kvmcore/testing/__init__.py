"""A conformance kit for arch plugins: does this arch log every dirty page?

``run_conformance(arch)`` holds an arch (an installed name, or a plugin object) to the
checks of :data:`CHECKS` with hypothesis-driven traces and returns a
:class:`ConformanceReport` whose failures carry the smallest trace found, as a Python
program.  The same run is ``kvmcore conformance --arch NAME`` on the command line and
``pytest -p kvmcore.testing.plugin --kvmcore-arch NAME`` under pytest.  The state
checks (``check_mst_invariant`` and friends) can be called on any VM.
"""

from kvmcore.testing.checks import CHECK_NAMES, CHECKS, Check, ConformanceFailure
from kvmcore.testing.invariants import (block_snapshot, check_huge_pages, check_mst_invariant, check_protected,
                                        check_same_effects, has_batched_hook, protect_masked)
from kvmcore.testing.unbatched import unbatched_vm
from kvmcore.testing.report import CheckResult, ConformanceReport
from kvmcore.testing.runner import run_conformance

__all__ = [
    "CHECKS", "CHECK_NAMES", "Check", "CheckResult", "ConformanceFailure", "ConformanceReport", "block_snapshot",
    "check_huge_pages", "check_mst_invariant", "check_protected", "check_same_effects", "has_batched_hook",
    "protect_masked", "run_conformance", "unbatched_vm",
]
