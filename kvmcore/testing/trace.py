"""The steps a trace ran, kept as Python source so a failure comes with a reproducer.

A failing check prints a short program against the public API (``kvmcore.create_vm``,
``vm.set_user_memory_region``, ``vcpu.write_many``, ...) that replays the shrunk trace
and ends with the check that fails.  For the batched-hook check the steps run twice,
once with the batched hooks and once without, and the results are compared.
"""

from __future__ import annotations

from typing import Any

HEADER = """\
import numpy as np
import kvmcore
from kvmcore.memslot import pages_from_bitmap
from kvmcore.testing import (block_snapshot, check_huge_pages, check_mst_invariant, check_protected,
                             check_same_effects, has_batched_hook, protect_masked, unbatched_vm)
"""


def arch_source(arch: Any) -> str:
    """How the snippet names the arch: its entry-point name, or a placeholder for an object."""
    if isinstance(arch, str):
        return f"ARCH = {arch!r}"
    return f"# ARCH = the plugin object you passed ({type(arch).__name__}); bind it before running this"


class Trace:
    """Source lines of the steps run so far.  ``twin``: steps run on two VMs."""

    def __init__(self, arch: Any, options: dict, twin: bool = False) -> None:
        self.arch = arch
        self.options = dict(options)
        self.twin = twin
        self.steps: list[list[str]] = []
        self.rule_start = 0  # where the steps of the rule running now begin

    def add(self, *lines: str) -> None:
        self.steps.append(list(lines))

    def begin_rule(self) -> None:
        """The steps added from now on belong to the next rule."""
        self.rule_start = len(self.steps)

    def get_line(self, slot: int) -> str:
        """The source of a GET whose result the snippet keeps."""
        return f"bitmaps.append(vm.get_dirty_log({slot}))" if self.twin else f"bitmap = vm.get_dirty_log({slot})"

    def render(self, final: list[str], before_last: list[str] = ()) -> str:
        """The program: header, steps (``before_last`` inserted ahead of the last rule's
        steps), then ``final``, the lines that fail."""
        steps = [line for step in self.steps[:self.rule_start] for line in step] + list(before_last) + \
            [line for step in self.steps[self.rule_start:] for line in step]
        out = [HEADER, arch_source(self.arch), f"OPTIONS = {self.options!r}", ""]
        if self.twin:
            out.append("def run(vm):")
            out.append("    bitmaps = []")
            out += ["    " + line for line in steps]
            out.append("    return vm, bitmaps")
            out.append("")
            out.append("(vm, bitmaps), (twin, twin_bitmaps) = (run(kvmcore.create_vm(ARCH, **OPTIONS)),")
            out.append("                                       run(unbatched_vm(ARCH, **OPTIONS)))")
        else:
            out.append("vm = kvmcore.create_vm(ARCH, **OPTIONS)")
            out += steps
        out += final
        return "\n".join(out) + "\n"
