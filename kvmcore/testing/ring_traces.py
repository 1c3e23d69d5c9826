"""The ``ring-batched-faults`` check: in a VM with a dirty ring, the batched fault hook
held against one fault at a time.

Only for an arch that declares ``ArchInfo.batched_faults_with_ring``.  Seeded traces of
guest stores over a logging slot, with a ring small enough to fill, run on a VM with
the batched hooks and on one without them (:func:`~kvmcore.testing.unbatched_vm`);
every store batch's completions and exit, every harvest and every reset must be the
same, and at the end the memory, page tables and statistics.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import kvmcore
from kvmcore import uapi
from kvmcore.errors import KvmError
from kvmcore.testing.checks import ConformanceFailure
from kvmcore.testing.invariants import check_same_effects
from kvmcore.testing.trace import arch_source
from kvmcore.testing.unbatched import unbatched_vm

SLOT_GPA = 1 << 30
NPAGES = 600
RING_CAPS = (uapi.KVM_CAP_DIRTY_LOG_RING, uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL)


class RingBatchingFailure(ConformanceFailure):
    check = "ring-batched-faults"


def why_not_applicable(vm) -> str | None:
    """Why the check does not apply to this arch, or None if it does."""
    if not vm.info.batched_faults_with_ring:
        return "the arch takes faults one at a time with a dirty ring (ArchInfo.batched_faults_with_ring)"
    if not vm.hook.kvm_arch_handle_stage2_faults_batch.get_hookimpls():
        return "the arch has no batched fault hook"
    if not any(vm.check_extension(cap) for cap in RING_CAPS):
        return "the arch offers no dirty ring"
    return None


def _ring_vm(vm):
    """``vm`` with the smallest ring it accepts, one logging slot and a vCPU."""
    cap = next(c for c in RING_CAPS if vm.check_extension(c))
    for size in (4096 << k for k in range(5)):
        try:
            vm.enable_cap(cap, size)
            break
        except KvmError:
            continue
    vm.set_user_memory_region(1, SLOT_GPA, NPAGES * vm.page_size, uapi.KVM_MEM_LOG_DIRTY_PAGES)
    return vm, vm.create_vcpu(0)


def replay(arch: Any, options: dict, seed: int, trace: int) -> None:
    """Run trace number ``trace`` of ``seed`` on both VMs; raise the first difference."""
    rng = np.random.default_rng([seed, trace])
    runs = [_ring_vm(kvmcore.create_vm(arch, **options)), _ring_vm(unbatched_vm(arch, **options))]
    for step in range(int(rng.integers(1, 6))):
        offsets = rng.integers(0, NPAGES, int(rng.integers(0, 400)))
        reset = bool(rng.integers(0, 2))
        seen = []
        for vm, vcpu in runs:
            done = vcpu.write_many(SLOT_GPA + offsets * vm.page_size, step + 1)
            ring = vcpu.harvest_dirty_ring()
            seen.append((done, vcpu.exit_reason, list(zip(ring["slot"].tolist(), ring["offset"].tolist())),
                         vm.reset_dirty_rings() if reset else None))
        if seen[0] != seen[1]:
            (a, b) = seen
            raise RingBatchingFailure(
                f"step {step}: {len(offsets)} stores, then harvest{' and reset' if reset else ''}: with the batched "
                f"hook {a[0]} completed (exit {a[1]}), {len(a[2])} entries, reset {a[3]}; one fault at a time "
                f"{b[0]} completed (exit {b[1]}), {len(b[2])} entries, reset {b[3]}"
                + ("; the entries differ" if a[2] != b[2] and len(a[2]) == len(b[2]) else ""),
                _reproducer(arch, options, seed, trace))
    (a, _), (b, _) = runs
    if (a.memory(1) != b.memory(1)).any():
        raise RingBatchingFailure("guest memory differs", _reproducer(arch, options, seed, trace))
    try:
        check_same_effects(a, b)
    except ConformanceFailure as failure:
        raise RingBatchingFailure(failure.message, _reproducer(arch, options, seed, trace)) from None


def check_ring_batched_faults(arch: Any, options: dict, seed: int, traces: int) -> None:
    """``traces`` seeded traces of :func:`replay`."""
    for trace in range(traces):
        replay(arch, options, seed, trace)


def _reproducer(arch: Any, options: dict, seed: int, trace: int) -> str:
    return (f"from kvmcore.testing.ring_traces import replay\n{arch_source(arch)}\n"
            f"replay(ARCH, {options!r}, seed={seed}, trace={trace})\n")
