"""Differential testing: one trace of guest stores and dirty-log calls, played on two VMs.

The two are usually the model and the real kernel (``backend="kvm"``); every bitmap a
GET returns is compared, and the first difference is reported with the pages that
differ.  Traces use only the public API, so any two backends or archs can be held
against each other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import numpy as np

from kvmcore import uapi
from kvmcore.errors import KvmError
from kvmcore.memslot import pages_from_bitmap

MIB2 = 2 << 20
GIB = 1 << 30


@attrs.frozen
class SlotSpec:
    """A memslot of a trace: ``npages`` pages at ``gpa``, logging from the start."""

    slot: int
    gpa: int
    npages: int
    host_page_size: int = 4096


@attrs.frozen
class Round:
    """The stores of one round (gpas, in order), then a collection of every slot."""

    gpas: np.ndarray = attrs.field(eq=False)
    value: int


@attrs.frozen
class Trace:
    """What both VMs do: create the slots, optionally enable manual protect, run rounds.

    ``mode`` is "classic" (GET only) or "manual" (GET, then CLEAR of what it
    returned, in 64-page chunks as a VMM does).
    """

    slots: tuple[SlotSpec, ...]
    rounds: tuple[Round, ...]
    mode: str = "classic"
    seed: int | None = None


@attrs.frozen
class Difference:
    """Where two VMs first disagreed."""

    round: int
    slot: int
    only_a: tuple[int, ...]
    only_b: tuple[int, ...]
    what: str = "dirty pages"

    def __str__(self) -> str:
        def some(pages: tuple[int, ...]) -> str:
            return ", ".join(str(p) for p in pages[:10]) + (" ..." if len(pages) > 10 else "")

        return (f"round {self.round}, slot {self.slot}: {self.what} differ; "
                f"only in A: [{some(self.only_a)}] ({len(self.only_a)}), "
                f"only in B: [{some(self.only_b)}] ({len(self.only_b)})")


def random_trace(seed: int, rounds: int = 8, mode: str = "classic", writes_per_round: int = 400,
                 page_size: int = 4096) -> Trace:
    """A seeded trace that reaches the places dirty logging gets wrong.

    Three slots of unaligned sizes: one whose bitmap words straddle a 2 MiB boundary,
    one that crosses a 1 GiB boundary (backed by 2 MiB host pages), one at a base that
    is not 64-page aligned; stores repeat pages, and runs of consecutive pages cross
    the 2 MiB and 1 GiB boundaries.
    """
    rng = np.random.default_rng(seed)
    slots = (
        SlotSpec(0, 3 * MIB2 - 37 * page_size, 2 * MIB2 // page_size + 3),
        SlotSpec(1, 5 * GIB - MIB2, 2 * MIB2 // page_size + 64 * 3 + 5, host_page_size=MIB2),
        SlotSpec(2, 7 * GIB + 5 * page_size, 1000),
    )
    out = []
    for r in range(rounds):
        chunks = []
        for spec in slots:
            n = writes_per_round // len(slots)
            random_pages = rng.integers(0, spec.npages, n // 2)
            boundary = (-(spec.gpa // page_size)) % (MIB2 // page_size)   # first page at a 2 MiB boundary
            start = max(0, min(spec.npages - 1, boundary + int(rng.integers(-40, 40))))
            run = np.arange(start, min(spec.npages, start + int(rng.integers(1, 100))))
            repeats = rng.choice(random_pages, size=max(1, n // 8)) if len(random_pages) else run
            pages = rng.permutation(np.concatenate([random_pages, run, repeats]))
            chunks.append(spec.gpa + pages.astype(np.int64) * page_size + 8 * rng.integers(0, page_size // 8, len(pages)))
        gpas = np.concatenate(chunks)
        out.append(Round(rng.permutation(gpas), value=r + 1))
    return Trace(slots, tuple(out), mode=mode, seed=seed)


def setup(vm: Any, trace: Trace) -> Any:
    """Create the trace's slots and mode on ``vm``; returns its vCPU."""
    if trace.mode == "manual":
        vm.enable_cap(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    for spec in trace.slots:
        vm.set_user_memory_region(spec.slot, spec.gpa, spec.npages * vm.page_size, uapi.KVM_MEM_LOG_DIRTY_PAGES,
                                  host_page_size=spec.host_page_size)
    return vm.create_vcpu(0)


def collect(vm: Any, trace: Trace, spec: SlotSpec) -> np.ndarray:
    """One collection of a slot: GET, and in manual mode CLEAR what it returned."""
    bitmap = vm.get_dirty_log(spec.slot)
    if trace.mode == "manual":
        bpl = vm.bits_per_long
        for first in range(0, spec.npages, 64):
            num = min(64, spec.npages - first)
            words = bitmap[first // bpl: first // bpl + -(-num // bpl)]
            if words.any():
                vm.clear_dirty_log(spec.slot, first, num, words)
    return pages_from_bitmap(bitmap)


def first_difference(trace: Trace, make_a: Callable[[], Any], make_b: Callable[[], Any]) -> Difference | None:
    """Play ``trace`` on a VM from each factory, round by round; the first difference or None."""
    vm_a, vm_b = make_a(), make_b()
    try:
        vcpus = setup(vm_a, trace), setup(vm_b, trace)
        for r, rnd in enumerate(trace.rounds):
            for vm, vcpu in zip((vm_a, vm_b), vcpus):
                done = vcpu.write_many(rnd.gpas, rnd.value)
                if done != len(rnd.gpas):
                    raise KvmError(5, f"{vm!r}: the vCPU stopped after {done} of {len(rnd.gpas)} stores "
                                      f"(exit reason {vcpu.exit_reason})")
            for spec in trace.slots:
                a, b = collect(vm_a, trace, spec), collect(vm_b, trace, spec)
                if not np.array_equal(a, b):
                    return Difference(r, spec.slot, tuple(np.setdiff1d(a, b).tolist()),
                                      tuple(np.setdiff1d(b, a).tolist()))
            for spec in trace.slots:
                ma, mb = vm_a.memory(spec.slot), vm_b.memory(spec.slot)
                if not np.array_equal(ma, mb):
                    pages = np.unique(np.nonzero(ma != mb)[0] // vm_a.page_size)
                    return Difference(r, spec.slot, tuple(pages.tolist()), (), what="memory contents")
        return None
    finally:
        for vm in (vm_a, vm_b):
            vm.close()


def errno_of(call: Callable[[], Any]) -> int:
    """0 if the call succeeds, else the errno of its KvmError."""
    try:
        call()
    except KvmError as exc:
        return exc.errno
    return 0


BAD_INPUTS: Sequence[tuple[str, Callable[[Any], Any]]] = (
    ("unknown memslot flag", lambda vm: vm.set_user_memory_region(1, GIB, 4096, 1 << 7)),
    ("size not page aligned", lambda vm: vm.set_user_memory_region(1, GIB, 4097)),
    ("gpa not page aligned", lambda vm: vm.set_user_memory_region(1, GIB + 8, 4096)),
    ("slot id too large", lambda vm: vm.set_user_memory_region(40000, GIB, 4096)),
    ("overlapping slot", lambda vm: vm.set_user_memory_region(1, 255 * 4096, 2 * 4096)),
    ("delete a missing slot", lambda vm: vm.set_user_memory_region(5, 0, 0)),
    ("resize a slot", lambda vm: vm.set_user_memory_region(0, 0, 512 * 4096, uapi.KVM_MEM_LOG_DIRTY_PAGES)),
    ("toggle READONLY", lambda vm: vm.set_user_memory_region(0, 0, 256 * 4096, uapi.KVM_MEM_LOG_DIRTY_PAGES
                                                             | uapi.KVM_MEM_READONLY)),
    ("GET on a missing slot", lambda vm: vm.get_dirty_log(3)),
    ("GET on a slot id too large", lambda vm: vm.get_dirty_log(40000)),
    ("CLEAR first_page not 64-aligned", lambda vm: vm.clear_dirty_log(0, 1, 64, np.zeros(4, np.uint64))),
    ("CLEAR alignment before ENOENT", lambda vm: vm.clear_dirty_log(9, 1, 64, np.zeros(4, np.uint64))),
    ("CLEAR past the end", lambda vm: vm.clear_dirty_log(0, 192, 128, np.zeros(4, np.uint64))),
    ("CLEAR num_pages not a multiple of 64", lambda vm: vm.clear_dirty_log(0, 0, 65, np.zeros(4, np.uint64))),
    ("CLEAR of an empty range at the end", lambda vm: vm.clear_dirty_log(0, 256, 0, np.zeros(4, np.uint64))),
    ("INITIALLY_SET without PROTECT_ENABLE",
     lambda vm: vm.enable_cap(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, uapi.KVM_DIRTY_LOG_INITIALLY_SET)),
    ("unknown manual-protect bit", lambda vm: vm.enable_cap(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 1 << 5)),
)
"""Bad inputs whose errno both backends must agree on, each on a VM holding one
256-page logging slot 0 at gpa 0 (see :func:`errno_table`)."""


def errno_table(make_vm: Callable[[], Any]) -> dict[str, int]:
    """The errno each of :data:`BAD_INPUTS` gets on a fresh VM from ``make_vm``."""
    out = {}
    for name, call in BAD_INPUTS:
        vm = make_vm()
        try:
            vm.set_user_memory_region(0, 0, 256 * 4096, uapi.KVM_MEM_LOG_DIRTY_PAGES)
            out[name] = errno_of(lambda: call(vm))
        finally:
            vm.close()
    return out
