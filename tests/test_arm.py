"""arm (ARMv7 LPAE, v3.19): geometry, 32-bit words, the v7 TLB, the fault path."""

import errno

import numpy as np
import pluggy
import pytest

import kvmcore
from arm_testlib import LOG, counting_fast_faults, logging_slot, per_fault_only, variant, wp_masked_truncated
from kvmcore import hookspecs
from kvmcore.memslot import pages_from_bitmap

MiB, GiB = 1 << 20, 1 << 30

pytestmark = pytest.mark.arch("arm")


@pytest.fixture
def vm():
    return kvmcore.create_vm("arm")


def test_entry_point_loads_the_module_hooks():
    pm = pluggy.PluginManager("kvmcore")
    pm.add_hookspecs(hookspecs)
    assert pm.load_setuptools_entrypoints("kvmcore.arch", name="arm") == 1
    pm.check_pending()
    for name in hookspecs.REQUIRED_HOOKS + ("kvm_mmu_write_protect_pt_masked_batch",
                                            "kvm_arch_handle_stage2_faults_batch",
                                            "kvm_arch_prepare_memory_region"):
        assert getattr(pm.hook, name).get_hookimpls(), name
    assert not pm.hook.kvm_flush_remote_tlbs_range.get_hookimpls()   # v7: no range flush


def test_info(vm):
    assert vm.arch == "arm" and vm.bits_per_long == 32 and vm.page_size == 4096
    assert vm.info.user_mem_slots == 32
    assert vm.check_extension(kvmcore.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) == kvmcore.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    assert vm.check_extension(kvmcore.KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE) == 0


def test_geometry_is_the_1024_entry_8k_concatenated_pgd(vm):
    geo = vm.geometry
    assert (geo.ipa_bits, geo.page_shift, geo.start_level, geo.levels) == (40, 12, 1, 3)
    assert geo.entries(1) == 1024 and geo.entries(1) * 8 == 8192          # PTRS_PER_S2_PGD, S2_PGD_ORDER 1
    assert geo.concatenated_tables == 2 and vm.stats["page_tables"] == 2
    assert geo.entries(2) == geo.entries(3) == 512
    assert (geo.level_size(1), geo.level_size(2), geo.level_size(3)) == (GiB, 2 * MiB, 4096)
    assert geo.block_levels == {2}                                       # no 1 GiB blocks
    assert geo.bits_per_long == 32


def test_no_options_and_no_initially_set(vm):
    with pytest.raises(kvmcore.KvmError) as exc:
        kvmcore.create_vm("arm", granule=4096)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(kvmcore.KvmError) as exc:
        vm.enable_cap(kvmcore.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 3)
    assert exc.value.errno == errno.EINVAL
    assert vm.enable_cap(kvmcore.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 1) == 0
    with pytest.raises(kvmcore.KvmError) as exc:
        vm.enable_cap(kvmcore.KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE, 2 * MiB)
    assert exc.value.errno == errno.EINVAL


def test_user_mem_slots(vm):
    vm.set_user_memory_region(31, 0, 4096)
    with pytest.raises(kvmcore.KvmError) as exc:
        vm.set_user_memory_region(32, 8192, 4096)
    assert exc.value.errno == errno.EINVAL


def test_slot_may_not_reach_the_top_page(vm):
    """v3.19: ``base_gfn + npages >= KVM_PHYS_SIZE >> PAGE_SHIFT`` is EFAULT."""
    top = 1 << 40
    with pytest.raises(kvmcore.KvmError) as exc:
        vm.set_user_memory_region(0, top - 2 * MiB, 2 * MiB)
    assert exc.value.errno == errno.EFAULT
    vm.set_user_memory_region(0, top - 2 * MiB - 4096, 2 * MiB)


def test_get_dirty_log_returns_32_bit_words(vm):
    oracle = logging_slot(vm, 5 * GiB, 100)
    vcpu = vm.create_vcpu(0)
    oracle.write(vcpu, [0, 31, 32, 99])
    bitmap = vm.get_dirty_log(0)
    assert bitmap.dtype == np.uint32 and len(bitmap) == 4
    assert bitmap.tolist() == [1 | 1 << 31, 1, 0, 1 << 3]


def test_clear_dirty_log_with_32_bit_words(vm):
    vm.enable_cap(kvmcore.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 1)
    oracle = logging_slot(vm, 5 * GiB, 130)
    vcpu = vm.create_vcpu(0)
    oracle.write(vcpu, [1, 40, 64, 129])
    bitmap = vm.get_dirty_log(0)
    assert pages_from_bitmap(bitmap).tolist() == [1, 40, 64, 129]
    vm.clear_dirty_log(0, 64, 66, bitmap[2:])
    assert pages_from_bitmap(vm.get_dirty_log(0)).tolist() == [1, 40]
    vcpu.write_many(np.array([5 * GiB + 129 * 4096]), 9)        # re-protected: logged again
    assert pages_from_bitmap(vm.get_dirty_log(0)).tolist() == [1, 40, 129]


def test_dissolve_and_v7_flushes(vm):
    """Blocks on a 2M-backed slot; logging dissolves each written block with a
    whole-VMID flush, maps only the written page, and maps reads read-only."""
    base = 4 * GiB
    vm.set_user_memory_region(0, base, 8 * 2 * MiB, host_page_size=1 * GiB)
    vcpu = vm.create_vcpu(0)
    blocks = base + np.arange(8) * 2 * MiB
    vcpu.write_many(blocks, 1)
    assert vm.stats["blocks_mapped"] == 8 and vm.translate(base).level == 2     # never a 1G block
    full = vm.stats["tlb_flushes_full"]
    vm.set_user_memory_region(0, base, 8 * 2 * MiB, flags=LOG)
    assert vm.stats["pages_write_protected"] == 8 * 512
    assert vm.stats["tlb_flushes_full"] == full + 1
    vcpu.write_many(blocks[:4] + 4096, 2)
    assert vm.stats["huge_pages_split"] == 4
    assert vm.stats["tlb_flushes_full"] == full + 1 + 4                       # one per stage2_dissolve_pmd
    assert vm.stats["pages_mapped"] == 4
    assert vm.translate(base) is None                                          # the rest faults back lazily
    assert vm.translate(blocks[5]).level == 2 and not vm.translate(blocks[5]).writable
    vcpu.read(base + 3 * 4096, 8)
    t = vm.translate(base + 3 * 4096)
    assert (t.level, t.writable) == (3, False)
    assert vm.stats["tlb_flushes_full"] == full + 5                            # a new pte: no flush
    vcpu.write_many(np.array([base + 3 * 4096]), 3)                           # replace a present pte
    assert vm.stats["tlb_flushes_full"] == full + 6
    got = pages_from_bitmap(vm.get_dirty_log(0)).tolist()
    assert got == sorted([1 + 512 * i for i in range(4)] + [3])
    assert vm.stats["tlb_flushes_full"] == full + 7 and vm.stats["tlb_flushes_range"] == 0
    assert vm.stats["tlb_flushes_ipa"] == 0                                    # v7 has no TLBI by IPA


def test_truncated_addresses_lose_pages_above_4g():
    """A 32-bit ``unsigned long`` start/end (bug #14) walks the wrong range."""
    broken = variant("arm", kvm_mmu_write_protect_pt_masked=wp_masked_truncated,
                     kvm_mmu_write_protect_pt_masked_batch=None)
    for plugin, should_lose in ((broken, True), ("arm", False)):
        vm = kvmcore.create_vm(plugin)
        oracle = logging_slot(vm, 6 * GiB + 8192, 64)
        vcpu = vm.create_vcpu(0)
        lost = set()
        for _ in range(3):
            oracle.write(vcpu, np.arange(0, 64, 3))
            lost |= oracle.harvest()[0]
        assert bool(lost) == should_lose


def test_batched_faults_count_a_whole_vmid_flush_per_rewritten_pte(vm):
    """v7 rewrites a present pte as clear + ``TLBIALL`` + set: a batch of N writes to
    write-protected ptes counts N whole-VMID flushes (``tlb_flush_all(count=N)``), as
    N faults one at a time do, and no TLBI by IPA."""
    results = []
    counted = counting_fast_faults("arm")
    for plugin in (counted, per_fault_only("arm")):
        vm = kvmcore.create_vm(plugin)
        oracle = logging_slot(vm, 5 * GiB + 8192, 300)
        vcpu = vm.create_vcpu(0)
        oracle.write(vcpu, np.arange(300))
        oracle.check()
        before = dict(vm.stats)
        oracle.write(vcpu, np.arange(299, -1, -1))
        oracle.check()
        after = dict(vm.stats)
        assert after["tlb_flushes_full"] - before["tlb_flushes_full"] == 300 + 1     # + the GET's
        assert after["pages_mapped"] - before["pages_mapped"] == 300
        assert after["tlb_flushes_ipa"] == after["tlb_flushes_range"] == 0
        results.append((after, vm.pgtable.mapped_leaves()))
    (fast, fast_leaves), (slow, slow_leaves) = results
    assert fast == slow
    assert all((a == b).all() for a, b in zip(fast_leaves, slow_leaves))
    assert counted.calls == [(300, 300), (300, 300)]              # mapped, then rewritten, in bulk


def test_tlb_flush_all_counts_count_flushes_and_invalidates(vm):
    """``Vm.tlb_flush_all(count=N)``: one invalidation, N flushes counted."""
    oracle = logging_slot(vm, 5 * GiB, 4)
    vcpu = vm.create_vcpu(0)
    oracle.write(vcpu, [0])
    assert vcpu.tlb.state(vm.memslot(0), 0)
    before = vm.stats["tlb_flushes"], vm.stats["tlb_flushes_full"]
    vm.tlb_flush_all(kind="full", count=5)
    assert (vm.stats["tlb_flushes"], vm.stats["tlb_flushes_full"]) == (before[0] + 5, before[1] + 5)
    assert not vcpu.tlb.state(vm.memslot(0), 0)
