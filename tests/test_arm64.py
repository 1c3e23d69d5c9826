"""arm64: geometry per granule, eager splitting, the fault path, TLB flush scopes."""

import errno

import numpy as np
import pluggy
import pytest

import kvmcore
from arch_plugins.arm64 import mmu
from arm_testlib import LOG, counting_fast_faults, fault_trace, per_fault_only
from kvmcore import hookspecs
from kvmcore.memslot import pages_from_bitmap

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
EAGER = kvmcore.KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE

pytestmark = pytest.mark.arch("arm64")

# kernel-dirty-log.md §3.1: granule, IPA → levels, start level, entry-level bits, tables.
WORKED_EXAMPLES = [
    (4096, 32, 2, 2, 11, 4), (4096, 36, 3, 1, 6, 1), (4096, 40, 3, 1, 10, 2), (4096, 42, 3, 1, 12, 8),
    (4096, 43, 3, 1, 13, 16), (4096, 44, 4, 0, 5, 1), (4096, 48, 4, 0, 9, 1),
    (16384, 36, 2, 2, 11, 1), (16384, 40, 2, 2, 15, 16), (16384, 42, 3, 1, 6, 1), (16384, 48, 3, 1, 12, 2),
    (65536, 40, 2, 2, 11, 1), (65536, 44, 2, 2, 15, 4), (65536, 46, 2, 2, 17, 16), (65536, 48, 3, 1, 6, 1),
    (65536, 52, 3, 1, 10, 1),
]


@pytest.mark.parametrize("granule,ipa,levels,start,bits,tables", WORKED_EXAMPLES)
def test_worked_examples(granule, ipa, levels, start, bits, tables):
    geo = kvmcore.create_vm("arm64", granule=granule, ipa_bits=ipa).geometry
    assert (geo.levels, geo.start_level) == (levels, start)
    assert geo.ipa_bits - geo.level_shift(geo.start_level) == bits
    assert geo.concatenated_tables == tables


VALID = [(g, ipa) for g in (4096, 16384, 65536) for ipa in range(32, mmu.IPA_LIMIT[g] + 1)]


@pytest.mark.parametrize("granule,ipa", VALID)
def test_geometry_is_the_kernels_arithmetic(granule, ipa):
    """levels = max(2, (ipa - 8) // (PAGE_SHIFT - 3)), start = 4 - levels, tables =
    kvm_pgd_pages; blocks from KVM_PGTABLE_MIN_BLOCK_LEVEL, never above the start."""
    shift = {4096: 12, 16384: 14, 65536: 16}[granule]
    geo = mmu.stage2_geometry(granule, ipa)
    levels = max(2, (ipa - 8) // (shift - 3))
    assert geo.levels == levels and geo.start_level == 4 - levels
    assert geo.concatenated_tables == mmu.kvm_pgd_pages(ipa, geo.start_level, shift) <= 16
    min_block = 1 if granule == 4096 else 2
    assert geo.block_levels == {lv for lv in (1, 2) if lv >= max(min_block, geo.start_level)}
    assert geo.max_gfn == 1 << (ipa - shift)


def test_block_sizes_per_granule():
    sizes = lambda **o: [kvmcore.create_vm("arm64", **o).geometry.level_size(lv)  # noqa: E731
                         for lv in sorted(kvmcore.create_vm("arm64", **o).geometry.block_levels)]
    assert sizes(granule=4096) == [GiB, 2 * MiB]
    assert sizes(granule=4096, ipa_bits=32) == [2 * MiB]
    assert sizes(granule=16384) == [32 * MiB]
    assert sizes(granule=65536) == [512 * MiB]
    assert sizes(granule=65536, ipa_bits=52) == [512 * MiB]


@pytest.mark.parametrize("opts", [
    {"granule": 8192}, {"granule": 4096, "ipa_bits": 31}, {"granule": 4096, "ipa_bits": 49},
    {"granule": 16384, "ipa_bits": 52}, {"granule": 65536, "ipa_bits": 53}, {"ipa_bits": "40"},
    {"granule": True}, {"ipa_bits": 40.0}, {"levels": 4},
])
def test_invalid_geometry_is_einval(opts):
    with pytest.raises(kvmcore.KvmError) as exc:
        kvmcore.create_vm("arm64", **opts)
    assert exc.value.errno == errno.EINVAL
    if "levels" not in opts:
        assert "must be" in str(exc.value)


def test_info_and_defaults():
    vm = kvmcore.create_vm("arm64")
    assert (vm.page_size, vm.geometry.ipa_bits, vm.bits_per_long) == (4096, 40, 64)
    assert vm.info.user_mem_slots == 32767
    assert vm.check_extension(kvmcore.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) == kvmcore.KVM_DIRTY_LOG_MANUAL_CAPS
    assert vm.check_extension(kvmcore.KVM_CAP_ARM_VM_IPA_SIZE) == 48
    assert kvmcore.create_vm("arm64", granule=65536).check_extension(kvmcore.KVM_CAP_ARM_VM_IPA_SIZE) == 52
    pm = pluggy.PluginManager("kvmcore")
    pm.add_hookspecs(hookspecs)
    assert pm.load_setuptools_entrypoints("kvmcore.arch", name="arm64") == 1
    pm.check_pending()
    assert pm.hook.kvm_flush_remote_tlbs_range.get_hookimpls()
    assert pm.hook.kvm_arch_handle_stage2_faults_batch.get_hookimpls()


# -- KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE ------------------------------------------------

@pytest.mark.parametrize("granule,sizes", [(4096, [2 * MiB, GiB]), (16384, [32 * MiB]), (65536, [512 * MiB])])
def test_eager_split_cap(granule, sizes):
    vm = kvmcore.create_vm("arm64", granule=granule)
    assert vm.check_extension(kvmcore.KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES) == sum(sizes)
    assert vm.check_extension(EAGER) == 0
    for bad in (granule, 3 * MiB, 2 * sizes[-1] if 2 * sizes[-1] not in sizes else 4 * GiB, 64 * KiB * 3):
        with pytest.raises(kvmcore.KvmError) as exc:
            vm.enable_cap(EAGER, bad)
        assert exc.value.errno == errno.EINVAL
    with pytest.raises(kvmcore.KvmError) as exc:
        vm.enable_cap(EAGER, sizes[0], flags=1)
    assert exc.value.errno == errno.EINVAL
    for size in sizes + [0, sizes[0]]:
        assert vm.enable_cap(EAGER, size) == 0
        assert vm.check_extension(EAGER) == size
    vm.set_user_memory_region(0, 0, sizes[0])
    with pytest.raises(kvmcore.KvmError) as exc:
        vm.enable_cap(EAGER, 0)
    assert exc.value.errno == errno.EINVAL
    assert vm.check_extension(EAGER) == sizes[0]
    vm.set_user_memory_region(0, 0, 0)                  # no memslot again: allowed
    assert vm.enable_cap(EAGER, 0) == 0


def _blocked_vm(chunk, granule=4096, host=GiB, nblocks=1, level=1, ipa_bits=40):
    """A VM whose slot is mapped by ``nblocks`` blocks at ``level``, logging off."""
    vm = kvmcore.create_vm("arm64", granule=granule, ipa_bits=ipa_bits)
    if chunk:
        vm.enable_cap(EAGER, chunk)
    blk = vm.geometry.level_size(level)
    gpa = 2 * max(blk, GiB)
    vm.set_user_memory_region(0, gpa, nblocks * blk, host_page_size=host)
    vcpu = vm.create_vcpu(0)
    vcpu.write_many(gpa + np.arange(nblocks) * blk, 1)
    assert vm.stats["blocks_mapped"] == nblocks and vm.translate(gpa).level == level
    return vm, vcpu, gpa, nblocks * blk


@pytest.mark.parametrize("chunk,splits,new_blocks", [(2 * MiB, 513, 512), (GiB, 1, 0)])
def test_eager_split_of_a_1g_block_at_enable(chunk, splits, new_blocks):
    """With a 2M chunk the split cache cannot hold the 513 tables of a 1G block, so it
    becomes 2M blocks first, each split as its chunk is walked; a 1G chunk splits it
    straight to pages.  One TLBI by IPA per block broken."""
    vm, _, gpa, size = _blocked_vm(chunk)
    before = dict(vm.stats)
    vm.set_user_memory_region(0, gpa, size, flags=LOG)
    s = vm.stats
    assert s["huge_pages_split"] - before["huge_pages_split"] == splits
    assert s["tlb_flushes_ipa"] - before["tlb_flushes_ipa"] == splits
    assert s["tlb_flushes_full"] - before["tlb_flushes_full"] == 1           # kvm_mmu_wp_memory_region
    assert s["blocks_mapped"] - before["blocks_mapped"] == new_blocks
    assert s["pages_mapped"] - before["pages_mapped"] == size // 4096
    assert s["pages_write_protected"] - before["pages_write_protected"] == size // 4096
    leaves = vm.pgtable.mapped_leaves()
    assert set(leaves[1].tolist()) == {3} and len(leaves[0]) == size // 4096
    assert not vm.translate(gpa + 12345 * 4096).writable


@pytest.mark.parametrize("granule,chunk", [(4096, 2 * MiB), (4096, GiB), (16384, 32 * MiB), (65536, 512 * MiB)])
def test_eager_split_one_split_per_pmd_block(granule, chunk):
    vm, vcpu, gpa, size = _blocked_vm(chunk, granule=granule, host=GiB if granule != 4096 else 2 * MiB,
                                      nblocks=3, level=2)
    before = dict(vm.stats)
    vm.set_user_memory_region(0, gpa, size, flags=LOG)
    assert vm.stats["huge_pages_split"] - before["huge_pages_split"] == 3
    assert vm.stats["tlb_flushes_ipa"] - before["tlb_flushes_ipa"] == 3
    pages = vm.geometry.level_pages(2)
    vcpu.write_many(gpa + np.array([0, pages + 5, 2 * pages + 7]) * vm.page_size, 2)
    assert vm.stats["huge_pages_split"] - before["huge_pages_split"] == 3     # split already: relax only
    assert vm.stats["pages_mapped"] - before["pages_mapped"] == 3 * pages
    assert pages_from_bitmap(vm.get_dirty_log(0)).tolist() == [0, pages + 5, 2 * pages + 7]


def test_without_eager_split_a_write_breaks_the_block_on_fault():
    vm, vcpu, gpa, size = _blocked_vm(0, host=2 * MiB, nblocks=2, level=2)
    vm.set_user_memory_region(0, gpa, size, flags=LOG)
    s0 = dict(vm.stats)
    vcpu.write_many(np.array([gpa + 4096]), 2)                 # write inside a WP block
    s = vm.stats
    assert s["huge_pages_split"] - s0["huge_pages_split"] == 1
    assert s["tlb_flushes_ipa"] - s0["tlb_flushes_ipa"] == 1   # BBM of the block
    assert vm.translate(gpa) is None                           # only the faulting page is mapped
    assert vm.translate(gpa + 4096).writable
    vcpu.write_many(np.array([gpa + 8192]), 2)                 # translation fault: no TLBI
    assert s["tlb_flushes_ipa"] - s0["tlb_flushes_ipa"] == 1
    vcpu.read(gpa + 3 * 4096, 8)
    assert not vm.translate(gpa + 3 * 4096).writable
    assert pages_from_bitmap(vm.get_dirty_log(0)).tolist() == [1, 2]
    assert s["tlb_flushes_range"] - s0["tlb_flushes_range"] == 1     # GET: the memslot, by range
    mapped = s["pages_mapped"]
    vcpu.write_many(np.array([gpa + 4096, gpa + 3 * 4096]), 3)  # permission faults on 4K pages
    assert s["pages_mapped"] == mapped                         # relax_perms, no new mapping
    assert s["tlb_flushes_ipa"] - s0["tlb_flushes_ipa"] == 3
    assert pages_from_bitmap(vm.get_dirty_log(0)).tolist() == [1, 3]
    assert s["tlb_flushes_full"] == s0["tlb_flushes_full"]


def test_blocks_come_back_after_logging_is_off():
    vm, vcpu, gpa, size = _blocked_vm(2 * MiB)
    vm.set_user_memory_region(0, gpa, size, flags=LOG)
    vm.set_user_memory_region(0, gpa, size, flags=0)
    assert vm.translate(gpa).level == 3                       # no collapse when logging stops
    blocks = vm.stats["blocks_mapped"]
    vcpu.write_many(np.array([gpa + 4096]), 2)                # permission fault on a WP page
    t = vm.translate(gpa)
    assert (t.level, t.writable) == (1, True)
    assert vm.stats["blocks_mapped"] == blocks + 1
    assert vm.stats["tlb_flushes_range"] >= 1                 # the table it replaced, by range


def test_a_2_level_table_demotes_1g_hosts_to_2m_blocks():
    vm, *_ = _blocked_vm(0, ipa_bits=32, level=2, host=GiB)
    assert vm.geometry.start_level == 2


@pytest.mark.parametrize("chunk", [0, 2 * MiB])
def test_initially_set_protects_and_splits_in_clear(chunk):
    vm = kvmcore.create_vm("arm64")
    vm.enable_cap(kvmcore.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 3)
    if chunk:
        vm.enable_cap(EAGER, chunk)
    gpa, size = 2 * GiB, 4 * 2 * MiB
    vm.set_user_memory_region(0, gpa, size, host_page_size=2 * MiB)
    vcpu = vm.create_vcpu(0)
    vcpu.write_many(gpa + np.arange(4) * 2 * MiB, 1)
    s0 = dict(vm.stats)
    vm.set_user_memory_region(0, gpa, size, flags=LOG)
    assert dict(vm.stats) == s0                                # nothing protected, nothing flushed
    bitmap = vm.get_dirty_log(0)
    assert len(pages_from_bitmap(bitmap)) == size // 4096
    vm.clear_dirty_log(0, 512 + 64, 64, bitmap[9:10])          # pages 576..639: inside block 1
    s = vm.stats
    assert s["pages_write_protected"] - s0["pages_write_protected"] == 512     # the whole block
    assert s["huge_pages_split"] - s0["huge_pages_split"] == (1 if chunk else 0)
    assert s["tlb_flushes_range"] - s0["tlb_flushes_range"] == 1
    assert vm.translate(gpa).writable and vm.translate(gpa).level == 2        # block 0 untouched
    vcpu.write_many(np.array([gpa + 2 * MiB + 4096]), 2)
    assert s["huge_pages_split"] - s0["huge_pages_split"] == 1                # on fault if not eagerly
    assert 513 in pages_from_bitmap(vm.get_dirty_log(0)).tolist()


def test_range_flush_scope_and_tlbi_range_limit():
    vm = kvmcore.create_vm("arm64")
    size = (mmu.MAX_TLBI_RANGE_PAGES + 1) * 4096
    vm.set_user_memory_region(0, 16 * GiB, size, flags=LOG)
    assert vm.stats["tlb_flushes_full"] == 1
    vm.create_vcpu(0).write_many(np.array([16 * GiB]), 1)
    vm.get_dirty_log(0)
    assert vm.stats["tlb_flushes_range"] == 2 and vm.stats["tlb_flushes_full"] == 1


def test_slot_may_end_at_the_top_of_the_ipa_space():
    vm = kvmcore.create_vm("arm64", ipa_bits=36)
    vm.set_user_memory_region(0, (1 << 36) - 2 * MiB, 2 * MiB)
    with pytest.raises(kvmcore.KvmError) as exc:
        vm.set_user_memory_region(0, (1 << 36) - MiB, 2 * MiB)     # a move beyond: EFAULT
    assert exc.value.errno == errno.EFAULT


@pytest.mark.parametrize("with_bitmap", [False, True])
def test_ring_vm_logs_at_4k_only_with_the_backup_bitmap(with_bitmap):
    """``memslot_is_logging`` keys on the slot's bitmap, as the kernel's does: in a
    ring-only VM (no bitmap) the fault path does not see logging, so a write into a
    write-protected block relaxes the block whole, and its other pages are written
    unlogged (reference note: classic bug #24, unverified on hardware).  With
    ``KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP`` the block is broken and every page logged."""
    vm = kvmcore.create_vm("arm64")
    vm.enable_cap(kvmcore.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 1 << 16)
    if with_bitmap:
        vm.enable_cap(kvmcore.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    gpa, size = GiB, 4 * MiB
    vm.set_user_memory_region(0, gpa, size, host_page_size=2 * MiB)
    vcpu = vm.create_vcpu(0)
    vcpu.write_many(np.array([gpa, gpa + 2 * MiB]), 1)
    vm.set_user_memory_region(0, gpa, size, flags=LOG)
    vcpu.write_many(gpa + np.array([1, 2, 3]) * 4096, 2)
    logged = sorted(vcpu.dirty_ring.harvest()["offset"].tolist())
    assert vm.translate(gpa + 4096).level == (3 if with_bitmap else 2)
    assert logged == ([1, 2, 3] if with_bitmap else [1])
    assert vm.stats["huge_pages_split"] == int(with_bitmap)


# -- the batched fault path -----------------------------------------------------------------

@pytest.mark.parametrize("chunk", [0, 2 * MiB])
@pytest.mark.parametrize("manual", [0, 1, 3])
def test_batched_faults_on_a_1g_block_agree_with_single_faults(chunk, manual):
    """A 1 GiB block (4K granule) populated before logging: broken by the first fault
    under it (or split eagerly, or left writable until CLEAR under INITIALLY_SET), the
    rest of a sweep mapped in the same batch; the batched hook and the per-fault hook
    leave identical tables, statistics, logs and memory, and every logging fault the
    core handed over in a run went through the batch."""
    counted = counting_fast_faults("arm64")
    layout = [((0, 0), 1, 600)]
    ops = [("sweep", 0, (0, 3000, 1, False)), ("sweep", 0, (100, 600, 513, True)), ("harvest", 0, 7),
           ("sweep", 0, (-700, 1400, 1, False)), ("read", 0, (5000, 40)), ("harvest", 0, 0),
           ("sweep", 0, (0, 3000, 3, True))]
    opts = {"granule": 4096}
    fast = fault_trace("arm64", opts, counted, GiB, manual, chunk, layout, ops)
    assert fast == fault_trace("arm64", opts, per_fault_only("arm64"), GiB, manual, chunk, layout, ops)
    steps = [step[-1] for step in fast if step[0] != "memory"]
    assert steps[0]["blocks_mapped"] >= 1 and any(s["huge_pages_split"] for s in steps)
    logging_faults = steps[-1]["write_faults"] + steps[-1]["read_faults"] - steps[1]["write_faults"]
    assert sum(done for _, done in counted.calls) == logging_faults > 0


def test_fast_path_relaxes_permissions_by_ipa_per_page():
    """A second sweep over write-protected pages: one ``set_bits`` and one TLBI by IPA
    per page (``kvm_pgtable_stage2_relax_perms``), nothing mapped, all in one call."""
    counted = counting_fast_faults("arm64")
    vm = kvmcore.create_vm(counted)
    vm.set_user_memory_region(0, GiB + 4096, 4096 * 4096, flags=LOG)
    vcpu = vm.create_vcpu(0)
    gpas = GiB + 4096 + np.arange(4096) * 4096
    vcpu.write_many(gpas, 1)
    vm.get_dirty_log(0)
    before = dict(vm.stats)
    assert vcpu.write_many(gpas, 2) == 4096
    delta = {k: v - before[k] for k, v in vm.stats.items() if v != before[k]}
    assert delta == {"write_faults": 4096, "tlb_flushes": 4096, "tlb_flushes_ipa": 4096, "pages_dirtied": 4096,
                     "mark_page_dirty_calls": 4096, "vcpu_exits": 1}
    assert counted.calls == [(4096, 4096)] * 2
