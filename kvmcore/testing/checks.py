"""The catalog of conformance checks, and the failure each one raises.

Every check has its own exception class, so that hypothesis, which shrinks each
distinct failure separately (by exception type and place), keeps the checks apart:
a trace that loses a dirty page is never shrunk into one that breaks a huge-page rule.
"""

import attrs


@attrs.frozen
class Check:
    """One property the kit holds an arch to.

    :param name: how reports, ``--check`` and ``checks=`` name it.
    :param title: what it demands, in one line.
    :param spec: where the rule comes from (``kernel-dirty-log.md`` sections, hook docs).
    """

    name: str
    title: str
    spec: str


CHECKS: tuple[Check, ...] = (
    Check("loads", "the arch loads: entry point imports, required hooks present, options accepted",
          "kvmcore.hookspecs.REQUIRED_HOOKS"),
    Check("geometry", "geometry and arch info are consistent (entries x level size = IPA space, "
                      "<= 16 concatenated tables, block levels valid, bitmap words of BITS_PER_LONG)",
          "spec 7.2; kvm_arch_geometry, kvm_arch_info"),
    Check("steps-run", "every guest access and ioctl of a trace completes without an error from the arch",
          "kvm_arch_handle_stage2_fault must resolve the fault it is given"),
    Check("huge-pages", "no block is created while its slot logs, none stays writable over clean pages, "
                        "none exceeds host_page_size or crosses a slot boundary",
          "spec 7.10-7.12; bugs 8, 10, 11"),
    Check("mst-invariant", "after every step, each page of a logging slot is dirty in the log or has no "
                           "writable translation (page tables and every vCPU's TLB)",
          "spec 7.17 (MST's rule); bugs 4-9, 13, 14"),
    Check("exact-dirty-set", "GET_DIRTY_LOG reports exactly the pages stored to since the last GET/CLEAR",
          "spec 7.5-7.7; every lost-dirty-page bug of section 8"),
    Check("protect-hook", "kvm_mmu_write_protect_pt_masked, called directly with any offset and mask and "
                          "followed by a flush, leaves every masked page unwritable",
          "spec 7.9; bugs 5, 6, 7, 11, 14"),
    Check("batched-hook", "the batched hooks (protect, faults) leave the same page tables, bitmaps, faults "
                          "and flushes as one call per word and per fault",
          "kvm_mmu_write_protect_pt_masked_batch, kvm_arch_handle_stage2_faults_batch docstrings"),
    Check("ring-batched-faults", "with a dirty ring, the batched fault hook gives the same completions, exits, "
                                 "ring entries, resets, tables and statistics as one fault at a time",
          "ArchInfo.batched_faults_with_ring; kvm_dirty_ring_push, KVM_EXIT_DIRTY_RING_FULL"),
)

CHECK_NAMES = tuple(c.name for c in CHECKS)
STATEFUL_CHECKS = ("huge-pages", "mst-invariant", "exact-dirty-set", "protect-hook", "batched-hook")


def get_check(name: str) -> Check:
    for check in CHECKS:
        if check.name == name:
            return check
    raise ValueError(f"unknown check {name!r}; the checks are: {', '.join(CHECK_NAMES)}")


class ConformanceFailure(AssertionError):
    """An arch broke a check.  ``trace`` is a Python snippet that reproduces it."""

    check = ""

    def __init__(self, message: str, trace: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.trace = trace


class GeometryFailure(ConformanceFailure):
    check = "geometry"


class StepFailure(ConformanceFailure):
    check = "steps-run"


class HugePageFailure(ConformanceFailure):
    check = "huge-pages"


class InvariantFailure(ConformanceFailure):
    check = "mst-invariant"


class DirtySetFailure(ConformanceFailure):
    check = "exact-dirty-set"


class ProtectHookFailure(ConformanceFailure):
    check = "protect-hook"


class BatchedHookFailure(ConformanceFailure):
    check = "batched-hook"
