"""The dirty ring on the real kernel, and the model held against it.

Skipped, with the reason, where ``/dev/kvm`` cannot be used.  The model side is the
x86 plugin once it builds a VM with a ring, else the core's stand-in (its caps are
x86's).  Malformed entries given to the kernel are only ones that every kernel
rejects (small offsets past the slot, bad slot ids): never a wrapped offset, which
kernels without the 2026 fix hand to the shadow MMU's rmap unchecked.
"""

from __future__ import annotations

import errno
import gc
import os

import numpy as np
import pytest

import kvmcore
from kvmcore.dirty_ring import DIRTY_GFN_DTYPE
from simple_arch import SimpleArch
from test_dirty_ring import ENABLE_CASES

pytestmark = pytest.mark.arch("x86")  # the real kernel is an x86 host

LOG = kvmcore.KVM_MEM_LOG_DIRTY_PAGES
RING = kvmcore.KVM_CAP_DIRTY_LOG_RING
FULL = kvmcore.KVM_EXIT_DIRTY_RING_FULL
RESET = kvmcore.KVM_DIRTY_GFN_F_RESET
PAGE = 4096
BASE = 1 << 32



def raises(code, fn, *args):
    with pytest.raises(kvmcore.KvmError) as err:
        fn(*args)
    assert err.value.errno == code, str(err.value)


def model_arch():
    """The x86 plugin if it builds a VM that offers the ring, else the stand-in."""
    if "x86" in kvmcore.available_archs():
        try:
            vm = kvmcore.create_vm("x86")
        except Exception:  # the plugin is not complete yet
            return SimpleArch()
        if vm.check_extension(RING):
            return "x86"
    return SimpleArch()


def open_pair(size, npages=1000, slots=((1, BASE),), vcpus=1):
    """The same VM on the model and on the kernel: ring, logging slots, vCPUs."""
    out = []
    for backend in ("sim", "kvm"):
        vm = kvmcore.create_vm(model_arch() if backend == "sim" else "x86", backend=backend)
        vm.enable_cap(RING, size)
        for slot, gpa in slots:
            vm.set_user_memory_region(slot, gpa, npages * PAGE, LOG)
        out.append((vm, [vm.create_vcpu(i) for i in range(vcpus)]))
    return out


def kernel_rsvd_entries() -> int:
    """64, or 64 + 512 with PML: a 4 KiB ring (256 entries) is refused with PML."""
    with kvmcore.create_vm("x86", backend="kvm") as vm:
        try:
            vm.enable_cap(RING, 4096)
        except kvmcore.KvmError:
            return 576
    return 64


def harvest(vcpu):
    h = vcpu.harvest_dirty_ring()
    return list(zip(h["slot"].tolist(), h["offset"].tolist()))


def drive(vm, vcpus, rounds):
    """Run a trace of ``(vcpu index, page offsets)`` bursts per round, as a VMM does:
    on KVM_EXIT_DIRTY_RING_FULL harvest every ring, reset, resume the same burst.
    Returns everything observable, in order."""
    log = []
    for value, bursts in enumerate(rounds, 1):
        for who, offsets in bursts:
            gpas = BASE + np.asarray(offsets, np.uint64) * np.uint64(PAGE)
            pos = 0
            while True:
                n = vcpus[who].write_many(gpas[pos:], value)
                full = vcpus[who].exit_reason == FULL
                log.append(("write", who, n, full))
                pos += n
                if not full:
                    assert pos == len(gpas), f"unexpected exit {vcpus[who].exit_reason}"
                    break
                log.append(("harvest", [harvest(v) for v in vcpus]))
                reset = vm.reset_dirty_rings()
                log.append(("reset", reset))
                assert reset, "a full ring that nothing was harvested from would never drain"
        log.append(("harvest", [harvest(v) for v in vcpus]))
        log.append(("reset", vm.reset_dirty_rings()))
    return log


# --- the mapping -----------------------------------------------------------------------


def test_the_ring_is_the_mapped_vcpu_page_range(kvm):
    with kvmcore.create_vm("x86", backend="kvm") as vm:
        vm.enable_cap(RING, 8192)
        assert vm.dirty_ring_size == 8192
        vcpu = vm.create_vcpu(0)
        entries = vcpu.dirty_ring.entries
        assert entries.dtype == DIRTY_GFN_DTYPE and len(entries) == 512
        assert not entries.view(np.uint8).any()
        vm.set_user_memory_region(1, BASE, 64 * PAGE, LOG)
        assert vcpu.write_many(BASE + np.array([3, 1], np.uint64) * PAGE, 1) == 2
        assert entries[:3].tolist() == [(1, 1, 3), (1, 1, 1), (0, 0, 0)]
        assert harvest(vcpu) == [(1, 3), (1, 1)]
        assert entries["flags"][:2].tolist() == [RESET, RESET]
    with kvmcore.create_vm("x86", backend="kvm") as vm:
        vcpu = vm.create_vcpu(0)
        assert vcpu.dirty_ring is None
        raises(errno.EINVAL, vcpu.harvest_dirty_ring)


def test_closing_unmaps_the_ring_and_leaks_no_fd(kvm):
    gc.collect()  # earlier tests' views and VMs
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        vm = kvmcore.create_vm("x86", backend="kvm")
        vm.enable_cap(RING, 4096)
        vm.create_vcpu(0)
        vm.create_vcpu(1)
        vm.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_view_outlives_the_vm(kvm):
    vm = kvmcore.create_vm("x86", backend="kvm")
    vm.enable_cap(RING, 4096)
    entries = vm.create_vcpu(0).dirty_ring.entries
    vm.close()
    assert entries["flags"].sum() == 0   # still mapped: the view keeps it (and a dup of the vCPU fd)
    del entries


# --- errno, the kernel's and the model's ----------------------------------------------------


@pytest.mark.parametrize(("size", "code"), ENABLE_CASES)
def test_enable_cap_errno_is_the_kernels(kvm, size, code):
    with kvmcore.create_vm("x86", backend="kvm") as vm:
        if code:
            raises(code, vm.enable_cap, RING, size)
        else:
            assert vm.enable_cap(RING, size) == 0


def test_enable_order_on_the_kernel(kvm):
    with kvmcore.create_vm("x86", backend="kvm") as vm:
        vm.set_user_memory_region(1, BASE, 64 * PAGE, LOG)   # slots may exist
        vm.enable_cap(RING, 4096)
        raises(errno.EINVAL, vm.enable_cap, RING, 8192)
        raises(errno.EINVAL, vm.enable_cap, kvmcore.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 4096)
        raises(errno.E2BIG, vm.enable_cap, RING, 2 << 20)
    with kvmcore.create_vm("x86", backend="kvm") as vm:
        vm.create_vcpu(0)
        raises(errno.EINVAL, vm.enable_cap, RING, 4096)
        raises(errno.E2BIG, vm.enable_cap, RING, 2 << 20)


def test_ring_only_bitmap_ioctls_are_enxio_and_with_bitmap_is_einval(kvm):
    for backend, arch in (("kvm", "x86"), ("sim", model_arch())):
        vm = kvmcore.create_vm(arch, backend=backend)
        raises(errno.EINVAL, vm.enable_cap, kvmcore.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
        vm.enable_cap(RING, 4096)
        vm.set_user_memory_region(1, BASE, 64 * PAGE, LOG)
        for slot in (1, 5, 1 << 16 | 40000):
            raises(errno.ENXIO, vm.get_dirty_log, slot)
            raises(errno.ENXIO, vm.clear_dirty_log, slot, 1, 3, [0])
        raises(errno.EINVAL, vm.enable_cap, kvmcore.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
        vm.close()


# --- the same traces on both ------------------------------------------------------------------


def random_rounds(seed, npages, nrounds, bursts, vcpus=1, size=(1, 120)):
    rng = np.random.default_rng(seed)
    return [[(int(rng.integers(vcpus)), rng.integers(0, npages, int(rng.integers(*size))).tolist())
             for _ in range(bursts)] for _ in range(nrounds)]


@pytest.mark.parametrize("seed", [1, 2])
def test_harvests_match_the_kernel_round_by_round(kvm, seed):
    rounds = random_rounds(seed, 1000, nrounds=4, bursts=3, vcpus=2)
    (model, mv), (real, rv) = open_pair(65536, vcpus=2)
    try:
        expected = drive(model, mv, rounds)
        assert not any(e[0] == "write" and e[3] for e in expected)   # no ring full here
        assert drive(real, rv, rounds) == expected
    finally:
        model.close()
        real.close()


def test_ring_full_exits_match_the_kernel(kvm):
    (model, mv), (real, rv) = open_pair(4096, npages=2000)
    try:
        if model.dirty_ring_rsvd_entries != kernel_rsvd_entries():
            pytest.skip(f"the model reserves {model.dirty_ring_rsvd_entries} ring entries, the kernel "
                        f"{kernel_rsvd_entries()} (PML): soft limits differ")
        rounds = [[(0, list(range(0, 700)))], [(0, list(range(650, 1000)) + list(range(0, 100)))],
                  random_rounds(3, 2000, 1, 4, size=(100, 300))[0]]
        expected = drive(model, mv, rounds)
        assert sum(1 for e in expected if e[0] == "write" and e[3]) >= 4
        assert drive(real, rv, rounds) == expected
        mem = (model.memory(1).view(np.uint64)[::512], real.memory(1).view(np.uint64)[::512])
        assert np.array_equal(*mem)
    finally:
        model.close()
        real.close()


def test_malformed_entries_match_the_kernel(kvm):
    """Bad entries are skipped and counted on both; a bad entry that coalesces into a
    run poisons the whole run (its pages stay writable, their next writes unlogged)."""
    results = []
    for vm, (vcpu,) in open_pair(8192, npages=100, slots=((1, BASE), (2, BASE + (1 << 30)))):
        gpas = BASE + np.arange(40, 80, dtype=np.uint64) * np.uint64(PAGE)
        assert vcpu.write_many(gpas, 1) == 40
        vcpu.harvest_dirty_ring()
        e = vcpu.dirty_ring.entries
        e["offset"][5] = 101                 # merges with 40..: the run [40, 101] is past the end
        e["slot"][25] = 7                    # no such slot
        e["slot"][26] = 40000                # id beyond KVM_USER_MEM_SLOTS
        e["slot"][27] = 1 << 16 | 1          # an address space the VM does not have
        e["slot"][28] = 2                    # another slot: page 68 of slot 2 (inside it)
        e["flags"][:40] = 0xDEADBEEF         # garbage flags with the RESET bit
        count = vm.reset_dirty_rings()
        vcpu.write_many(gpas, 2)
        results.append((count, harvest(vcpu)))
        vm.close()
    assert results[0] == results[1]
    count, logged = results[0]
    assert count == 40
    assert [off for _, off in logged] == list(range(69, 80))
