"""The vCPU access path, huge pages around logging, threads, and the plugin manager."""

import threading

import numpy as np
import pluggy
import pytest

import kvmcore
from helpers import LOG, dirty_pages, page_gpas
from simple_arch import SimpleArch, SimpleArchBatch

MIB2, GIB = 2 << 20, 1 << 30


@pytest.mark.parametrize("host_page_size", [4096, MIB2, GIB])
def test_slot_straddling_2m_and_1g_boundaries_loses_nothing(arch, host_page_size):
    """A slot that starts 5 pages below a 1 GiB boundary, mapped (perhaps huge) before
    logging starts; words of its bitmap straddle 2 MiB and 1 GiB boundaries."""
    vm = kvmcore.create_vm(arch)
    ps = vm.page_size
    npages = 3 * (MIB2 // 4096) + 11
    base = 2 * GIB - 5 * ps
    vm.set_user_memory_region(0, base, npages * ps, 0, host_page_size=host_page_size)
    vcpu = vm.create_vcpu(0)
    everything = np.arange(npages)
    vcpu.write_many(page_gpas(vm, base, everything), 1)
    vm.set_user_memory_region(0, base, npages * ps, LOG)
    rng = np.random.default_rng(7)
    boundary_pages = [off for off in range(npages) if (base + off * ps) % MIB2 in (0, MIB2 - ps)]
    for value in range(2, 6):
        offsets = np.unique(np.concatenate([rng.integers(0, npages, 200), boundary_pages[value % 3::3]]))
        vcpu.write_many(page_gpas(vm, base, offsets, byte=8 * value), value)
        assert dirty_pages(vm.get_dirty_log(0)) == set(offsets.tolist())
    vm.set_user_memory_region(0, base, npages * ps, 0)
    vcpu.write_many(page_gpas(vm, base, everything), 9)
    assert (vm.memory(0).view(np.uint64)[::ps // 8] == 9).all()


def test_batched_and_per_word_protect_give_the_same_tables_and_counts():
    results = []
    for plugin in (SimpleArch(), SimpleArchBatch()):
        vm = kvmcore.create_vm(plugin)
        vm.set_user_memory_region(0, 3 * MIB2 - 7 * 4096, 4000 * 4096, 0, host_page_size=MIB2)
        vcpu = vm.create_vcpu(0)
        vcpu.write_many(page_gpas(vm, 3 * MIB2 - 7 * 4096, range(4000)), 1)
        vm.set_user_memory_region(0, 3 * MIB2 - 7 * 4096, 4000 * 4096, LOG)
        rng = np.random.default_rng(3)
        bitmaps = []
        for value in range(4):
            vcpu.write_many(page_gpas(vm, 3 * MIB2 - 7 * 4096, rng.integers(0, 4000, 300)), value)
            bitmaps.append(vm.get_dirty_log(0))
        stats = dict(vm.stats)
        stats.pop("protect_hook_calls")
        results.append((vm.pgtable.mapped_leaves(), stats, bitmaps))
    (l0, s0, b0), (l1, s1, b1) = results
    assert s0 == s1
    assert all((x == y).all() for x, y in zip(b0, b1))
    assert all((x == y).all() for x, y in zip(l0, l1))


def test_stale_writable_tlb_entry_lets_writes_through_until_the_flush():
    vm = kvmcore.create_vm(SimpleArch())
    vm.set_user_memory_region(0, 0, 64 * 4096, LOG)
    vcpu = vm.create_vcpu(0)
    vcpu.write_many(page_gpas(vm, 0, [1]), 1)
    vm.pgtable.wrprotect_range(0, 64)          # protect without a flush
    faults = vm.stats["write_faults"]
    vcpu.write_many(page_gpas(vm, 0, [1]), 2)
    assert vm.stats["write_faults"] == faults, "the cached writable entry must still be used"
    vm.flush_remote_tlbs()
    vcpu.write_many(page_gpas(vm, 0, [1]), 3)
    assert vm.stats["write_faults"] == faults + 1


def test_a_cached_block_entry_covers_pages_never_touched():
    vm = kvmcore.create_vm(SimpleArch())
    vm.set_user_memory_region(0, 0, 512 * 4096, 0, host_page_size=MIB2)
    vcpu = vm.create_vcpu(0)
    vcpu.write_many(page_gpas(vm, 0, [0]), 1)
    assert vm.translate(0).size == MIB2
    vm.pgtable.wrprotect_range(0, 512)
    faults = vm.stats["write_faults"]
    vcpu.write_many(page_gpas(vm, 0, [300]), 1)   # never touched, but under the cached block
    assert vm.stats["write_faults"] == faults


def test_threads_lose_nothing(arch):
    """vCPU threads write while the main thread gets the log and copies what it reports,
    as a migrating VMM does; after the final round the copy equals the memory."""
    vm = kvmcore.create_vm(arch)
    ps = vm.page_size
    npages = 4096
    vm.set_user_memory_region(0, 0, npages * ps, LOG)
    vcpus = [vm.create_vcpu(i) for i in range(2)]
    dest = np.zeros(npages * ps, np.uint8)
    src = vm.memory(0)
    stop = threading.Event()
    errors = []

    def guest(vcpu, seed):
        rng = np.random.default_rng(seed)
        value = 1
        try:
            while not stop.is_set():
                vcpu.write_many(page_gpas(vm, 0, rng.integers(0, npages, 64), byte=8 * vcpu.id), value)
                value += 1
        except Exception as exc:  # surfaced below
            errors.append(exc)

    def copy(bitmap):
        for off in dirty_pages(bitmap):
            dest[off * ps:(off + 1) * ps] = src[off * ps:(off + 1) * ps]

    dest[:] = src
    threads = [threading.Thread(target=guest, args=(v, v.id)) for v in vcpus]
    for t in threads:
        t.start()
    for _ in range(30):
        copy(vm.get_dirty_log(0))
    stop.set()
    for t in threads:
        t.join()
    copy(vm.get_dirty_log(0))
    assert not errors
    assert (dest == src).all()


def test_plugin_missing_a_required_hook_is_refused_by_name():
    class NoFlush:
        __name__ = "noflush"

    plugin = SimpleArch()
    for name in ("kvm_flush_remote_tlbs",):
        broken = type("Broken", (SimpleArch,), {name: None})()
        with pytest.raises(kvmcore.KvmError, match=name):
            kvmcore.create_vm(broken)
    assert kvmcore.create_vm(plugin).arch == "simple"


def test_misspelled_hook_is_refused():
    class Typo(SimpleArch):
        @kvmcore.hookimpl
        def kvm_flush_remote_tlb(self, kvm):
            pass

    with pytest.raises(pluggy.PluginValidationError, match="kvm_flush_remote_tlb"):
        kvmcore.create_vm(Typo())


def test_installed_archs_each_build_a_vm():
    for name in kvmcore.available_archs():
        vm = kvmcore.create_vm(name)
        assert vm.arch == name
        assert vm.page_size == vm.geometry.page_size
        assert vm.bits_per_long in (32, 64)
        assert vm.stats["page_tables"] == vm.geometry.concatenated_tables


def test_batched_faults_give_what_one_fault_at_a_time_gives():
    """The core hands runs of faults to the batched hook; tables, stats, log and memory
    must be those of handling each fault in turn (including pages under blocks)."""
    from simple_arch import SimpleArchFastFaults

    results = []
    for plugin in (SimpleArch(), SimpleArchFastFaults()):
        vm = kvmcore.create_vm(plugin)
        base = 3 * MIB2 - 7 * 4096
        vm.set_user_memory_region(0, base, 3000 * 4096, 0, host_page_size=MIB2)
        vcpu = vm.create_vcpu(0)
        vcpu.write_many(page_gpas(vm, base, range(0, 3000, 3)), 1)
        vm.set_user_memory_region(0, base, 3000 * 4096, LOG)
        rng = np.random.default_rng(5)
        bitmaps = []
        for value in range(4):
            offsets = rng.integers(0, 3000, 2000)
            vcpu.write_many(page_gpas(vm, base, offsets, byte=8 * value), value)
            vcpu.read(base + int(offsets[0]) * 4096, 64)
            bitmaps.append(vm.get_dirty_log(0))
        results.append((vm.pgtable.mapped_leaves(), dict(vm.stats), bitmaps, vm.memory(0).copy()))
    (l0, s0, b0, m0), (l1, s1, b1, m1) = results
    assert s0 == s1
    assert all((x == y).all() for x, y in zip(b0, b1))
    assert all((x == y).all() for x, y in zip(l0, l1))
    assert (m0 == m1).all()
