"""The riscv plugin: its geometry per mode, its IPA limit, its fault and logging paths,
and the conformance kit in every mode."""

import errno

import numpy as np
import pytest

import kvmcore
import kvmcore.testing
from kvmcore.testing import run_conformance
from helpers import LOG, dirty_pages, page_gpas

pytestmark = pytest.mark.arch("riscv")
MIB2, GIB = 2 << 20, 1 << 30


@pytest.mark.parametrize("mode, levels, gpa_bits", [("sv39x4", 3, 41), ("sv48x4", 4, 50), ("sv57x4", 5, 59)])
def test_geometry_per_mode(mode, levels, gpa_bits):
    g = kvmcore.create_vm("riscv", mode=mode).geometry
    assert (g.page_size, g.levels, g.ipa_bits, g.bits_per_long) == (4096, levels, gpa_bits, 64)
    assert g.concatenated_tables == 4          # the 16 KiB root of the "x4" modes
    assert sorted(g.level_size(lv) for lv in g.block_levels) == [MIB2, GIB]


def test_default_mode_and_bad_options():
    assert kvmcore.create_vm("riscv").geometry.ipa_bits == 50
    with pytest.raises(kvmcore.KvmError) as err:
        kvmcore.create_vm("riscv", mode="sv32x4")
    assert err.value.errno == errno.EINVAL and "sv39x4" in str(err.value)


def test_slot_must_end_below_the_top_of_the_gpa_space():
    vm = kvmcore.create_vm("riscv", mode="sv39x4")
    top = 1 << 41
    with pytest.raises(kvmcore.KvmError) as err:
        vm.set_user_memory_region(0, top - 4096, 4096)
    assert err.value.errno == errno.EFAULT
    vm.set_user_memory_region(0, top - 2 * 4096, 4096)


def huge_vm(**options):
    """A 4 MiB slot at 1 GiB on 2 MiB host pages, written all over before logging."""
    vm = kvmcore.create_vm("riscv", **options)
    vm.set_user_memory_region(0, GIB, 2 * MIB2, 0, host_page_size=MIB2)
    vcpu = vm.create_vcpu(0)
    vcpu.write_many(page_gpas(vm, GIB, range(1024)), 1)
    assert vm.translate(GIB).size == MIB2 and vm.translate(GIB).writable
    return vm, vcpu


def test_logging_on_protects_and_eagerly_splits():
    vm, vcpu = huge_vm()
    vm.set_user_memory_region(0, GIB, 2 * MIB2, LOG)
    leaf = vm.translate(GIB + 5 * 4096)
    assert leaf.size == 4096 and not leaf.writable
    assert vm.stats["huge_pages_split"] == 2
    vcpu.write_many(page_gpas(vm, GIB, [5, 700]), 2)
    assert dirty_pages(vm.get_dirty_log(0)) == {5, 700}


def test_without_eager_split_a_write_splits_the_protected_block_on_fault():
    vm, vcpu = huge_vm(eager_page_split=False)
    vm.set_user_memory_region(0, GIB, 2 * MIB2, LOG)
    assert vm.translate(GIB).size == MIB2 and not vm.translate(GIB).writable
    vcpu.write_many(page_gpas(vm, GIB, [3]), 2)
    assert vm.translate(GIB + 3 * 4096).size == 4096 and vm.translate(GIB + 3 * 4096).writable
    assert not vm.translate(GIB + 4 * 4096).writable
    assert dirty_pages(vm.get_dirty_log(0)) == {3}


def test_reads_while_logging_map_read_only_and_are_not_dirty():
    vm = kvmcore.create_vm("riscv")
    vm.set_user_memory_region(0, 0, 64 * 4096, LOG)
    vcpu = vm.create_vcpu(0)
    vcpu.read(7 * 4096, 8)
    assert not vm.translate(7 * 4096).writable
    assert dirty_pages(vm.get_dirty_log(0)) == set()


def test_write_fault_fast_path_on_a_4k_leaf():
    vm = kvmcore.create_vm("riscv")
    vm.set_user_memory_region(0, 0, 64 * 4096, LOG)
    vcpu = vm.create_vcpu(0)
    vcpu.write_many(page_gpas(vm, 0, [1]), 1)
    vm.get_dirty_log(0)
    assert not vm.translate(4096).writable
    vcpu.write_many(page_gpas(vm, 0, [1]), 2)
    assert vm.translate(4096).writable and dirty_pages(vm.get_dirty_log(0)) == {1}


def test_protect_hook_is_per_bit_and_a_block_is_protected_whole():
    vm, vcpu = huge_vm(eager_page_split=False)
    slot = vm.memslot(0)
    vcpu.write_many(page_gpas(vm, GIB, [0]), 1)  # still mapped writable by the 2 MiB block
    with vm.mmu_lock:
        vm.hook.kvm_mmu_write_protect_pt_masked(kvm=vm, slot=slot, gfn_offset=510, mask=0b101)
    assert not vm.translate(GIB).writable           # bit 0: page 510, in block 0: all of it
    assert not vm.translate(GIB + MIB2).writable    # bit 2: page 512, in block 1
    assert vm.stats["leaves_write_protected"] == 2


def test_logging_off_keeps_4k_leaves_but_unmapped_regions_get_blocks_back():
    vm, vcpu = huge_vm()
    vm.set_user_memory_region(0, GIB, 2 * MIB2, LOG)
    vm.set_user_memory_region(0, GIB, 2 * MIB2, 0)
    vcpu.write_many(page_gpas(vm, GIB, [9]), 3)
    assert vm.translate(GIB + 9 * 4096).size == 4096 and vm.translate(GIB + 9 * 4096).writable
    vm.set_user_memory_region(0, GIB + 4 * MIB2, 2 * MIB2, 0)  # a move unmaps everything
    vcpu.write_many(page_gpas(vm, GIB + 4 * MIB2, [9]), 4)
    assert vm.translate(GIB + 4 * MIB2).size == MIB2


def test_batched_and_per_word_protect_agree_on_a_get():
    results = []
    for batched in (True, False):
        vm = kvmcore.create_vm("riscv") if batched else kvmcore.testing.unbatched_vm("riscv")
        vm.set_user_memory_region(0, GIB - 7 * 4096, 3000 * 4096, LOG)
        vcpu = vm.create_vcpu(0)
        rng = np.random.default_rng(5)
        bitmaps = []
        for value in range(3):
            vcpu.write_many(page_gpas(vm, GIB - 7 * 4096, rng.integers(0, 3000, 200)), value)
            bitmaps.append(vm.get_dirty_log(0))
        results.append((sorted(map(tuple, np.array(vm.pgtable.mapped_leaves()).T.tolist())), dict(vm.stats), bitmaps))
    (l0, s0, b0), (l1, s1, b1) = results
    assert l0 == l1 and s0 == s1 and all((x == y).all() for x, y in zip(b0, b1))


def test_riscv_passes_the_conformance_kit_in_its_other_modes():
    """(The default mode runs with every arch in test_conformance.py.)"""
    options = [{"mode": "sv39x4"}, {"mode": "sv57x4", "eager_page_split": False}]
    report = run_conformance("riscv", options=options, max_examples=8, seed=99)
    assert report.passed, report.format()



class _PerFaultOnly:
    """riscv with every hook but the batched fault hook: one fault at a time."""

    __name__ = "riscv-per-fault"

    def __init__(self):
        import arch_plugins.riscv as riscv

        for name in dir(riscv):
            fn = getattr(riscv, name)
            if name.startswith("kvm_") and name != "kvm_arch_handle_stage2_faults_batch" and callable(fn):
                setattr(self, name, fn)


@pytest.mark.parametrize("eager", [True, False])
def test_batched_faults_leave_what_one_at_a_time_leaves(eager):
    """Tables (in allocation order), statistics, log and memory agree with the per-fault
    path; the batch path is really taken (fewer vCPU-side fault visits than faults)."""
    results = []
    for plugin in ("riscv", _PerFaultOnly()):
        vm = kvmcore.create_vm(plugin, eager_page_split=eager)
        base, npages = 3 * (2 << 20) - 5 * 4096, 2000
        vm.set_user_memory_region(0, base, npages * 4096, 0, host_page_size=2 << 20)
        vcpu = vm.create_vcpu(0)
        vcpu.write_many(page_gpas(vm, base, range(0, npages, 7)), 1)
        vm.set_user_memory_region(0, base, npages * 4096, LOG)
        rng = np.random.default_rng(4)
        bitmaps = []
        for value in range(2, 5):
            vcpu.write_many(page_gpas(vm, base, rng.permutation(npages)[:900]), value)
            bitmaps.append(vm.get_dirty_log(0))
        results.append((vm.pgtable.mapped_leaves(), dict(vm.stats), bitmaps, vm.memory(0).copy()))
    (l0, s0, b0, m0), (l1, s1, b1, m1) = results
    assert s0 == s1
    assert all((x == y).all() for x, y in zip(l0, l1))
    assert all((x == y).all() for x, y in zip(b0, b1))
    assert (m0 == m1).all()


def test_the_batched_fault_hook_is_used():
    import arch_plugins.riscv as riscv

    calls = []
    original = riscv.kvm_arch_handle_stage2_faults_batch

    class Counting(_PerFaultOnly):
        @kvmcore.hookimpl
        def kvm_arch_handle_stage2_faults_batch(self, kvm, vcpu, slot, gfns, write):
            calls.append(len(gfns))
            return original(kvm, vcpu, slot, gfns, write)

    vm = kvmcore.create_vm(Counting())
    vm.set_user_memory_region(0, 0, 4096 * 4096, LOG)
    vcpu = vm.create_vcpu(0)
    vcpu.write_many(page_gpas(vm, 0, range(4096)), 1)
    assert max(calls) > 1000 and vm.stats["write_faults"] == 4096
