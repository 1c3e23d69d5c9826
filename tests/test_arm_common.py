"""What arm and arm64 share: the masked write-protect walk (the 2014 review's cases),
huge-mapping rules, and batched ≡ per-word, on every arm configuration."""

import errno

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvmcore
from arch_plugins.arm_common import fault_supports_stage2_huge_mapping, mask_range, mask_ranges
from arm_testlib import (
    CONFIGS,
    LOG,
    counting_fast_faults,
    flush_nothing,
    flush_range_nothing,
    fault_trace,
    logging_slot,
    per_fault_only,
    per_word_only,
    state,
    variant,
    wp_masked_fls_no_plus_one,
    wp_masked_unclamped,
)
from kvmcore.memslot import Memslot, pages_from_bitmap
from kvmcore.pgtable import PTE_D, PTE_W

configs = pytest.mark.parametrize("arch,opts", CONFIGS)


def make(arch, opts, plugin=None):
    return kvmcore.create_vm(plugin or arch, **opts)


def boundaries(vm):
    """1 GiB, 2 MiB and every table span of the geometry, inside the IPA space."""
    geo = vm.geometry
    sizes = {1 << 30, 2 << 20} | {geo.level_size(lv) for lv in range(geo.start_level, 3)}
    return sorted(s for s in sizes if 4 * s < 1 << geo.ipa_bits and s >= 64 * vm.page_size)


# -- the word's range ------------------------------------------------------------------

@given(st.integers(0, 1 << 40), st.integers(1, (1 << 64) - 1))
def test_mask_range_is_ffs_to_fls_plus_one(base, mask):
    bits = [i for i in range(64) if mask >> i & 1]
    assert mask_range(base, mask) == (base + bits[0], base + bits[-1] + 1)


@given(st.lists(st.integers(1, (1 << 64) - 1), min_size=1, max_size=20), st.sampled_from([32, 64]))
def test_mask_ranges_vectorised_matches_scalar(masks, bpl):
    masks = [m & ((1 << bpl) - 1) or 1 for m in masks]
    words = np.array(masks, dtype=np.uint32 if bpl == 32 else np.uint64)
    bases = np.arange(len(masks), dtype=np.int64) * bpl + (1 << 33)
    starts, ends = mask_ranges(bases, words)
    assert list(zip(starts.tolist(), ends.tolist())) == [mask_range(int(b), m) for b, m in zip(bases, masks)]


# -- the 2014 review's cases: every written page is reported --------------------------

def rounds(vm, oracle, pages, n=3, host_pages=()):
    vcpu = vm.vcpus[0] if vm.vcpus else vm.create_vcpu(0)
    for _ in range(n):
        oracle.host_write(host_pages)
        oracle.write(vcpu, pages)
        oracle.check()


@configs
@pytest.mark.parametrize("where", ["last-page", "last-two-pages"])
def test_mask_starting_at_last_page_of_a_range(arch, opts, where):
    """A word whose first set bit is the last page before a 1 GiB / 2 MiB / table
    boundary (the review's ``pud_addr_end`` question)."""
    vm = make(arch, opts)
    bpl = vm.bits_per_long
    back = 1 if where == "last-page" else 2
    for i, boundary in enumerate(boundaries(vm)):
        gpa = 3 * boundary - back * vm.page_size
        oracle = logging_slot(vm, gpa, 4 * bpl, slot=i)
        rounds(vm, oracle, np.arange(2 * bpl))
        rounds(vm, oracle, [0, bpl - 1, bpl, 2 * bpl - 1])


@configs
def test_mask_crossing_a_boundary_with_first_part_unmapped(arch, opts):
    """The pages before the boundary are dirty (a host write) but were never mapped:
    the walk must step over the empty table entry to the pages behind the boundary."""
    vm = make(arch, opts)
    bpl = vm.bits_per_long
    for i, boundary in enumerate(boundaries(vm)):
        gpa = 5 * boundary - 4 * vm.page_size
        oracle = logging_slot(vm, gpa, 2 * bpl, slot=i)
        rounds(vm, oracle, np.arange(4, bpl), host_pages=[0, 1])


@configs
@pytest.mark.parametrize("offset", [1, 3, 31, 33, 63])
def test_unaligned_slot_bases(arch, opts, offset):
    """Slot bases that are not a multiple of BITS_PER_LONG pages (or of any block):
    words straddle table boundaries differently from the slot's start."""
    vm = make(arch, opts)
    bpl = vm.bits_per_long
    gpa = (1 << 32) - 2 * bpl * vm.page_size + offset * vm.page_size
    oracle = logging_slot(vm, gpa, 6 * bpl + 5)
    rng = np.random.default_rng(offset)
    for _ in range(4):
        rounds(vm, oracle, np.unique(rng.integers(0, oracle.npages, 40)), n=1)
    rounds(vm, oracle, [oracle.npages - 1, 0], n=2)


@configs
def test_high_ipa(arch, opts):
    """Slots above 4 GiB and at the top of the IPA space (64-bit address arithmetic)."""
    vm = make(arch, opts)
    top = 1 << vm.geometry.ipa_bits
    npages = 3 * vm.bits_per_long
    size = npages * vm.page_size
    for i, gpa in enumerate([(1 << 32) + 5 * vm.page_size, (top >> 1) - size // 2, top - size - vm.page_size]):
        oracle = logging_slot(vm, gpa, npages, slot=i)
        rounds(vm, oracle, np.arange(0, npages, 3))


# -- each of those tests fails on the bug it is about ---------------------------------

def lost_pages(plugin, arch, opts, build):
    vm = make(arch, opts, plugin)
    vcpu = vm.create_vcpu(0)
    lost = set()
    for oracle, pages, host_pages in build(vm):
        for _ in range(3):
            oracle.host_write(host_pages)
            oracle.write(vcpu, pages)
            lost |= oracle.harvest()[0]
    return lost


def _first_part_unmapped(vm):
    bpl = vm.bits_per_long
    boundary = vm.geometry.level_size(2)
    return [(logging_slot(vm, 5 * boundary - 4 * vm.page_size, 2 * bpl), np.arange(4, bpl), [0, 1])]


@configs
def test_unclamped_walk_loses_pages(arch, opts):
    """The v7 patch's ``addr += PMD_SIZE`` walk: the boundary case above catches it."""
    broken = variant(arch, kvm_mmu_write_protect_pt_masked=wp_masked_unclamped,
                     kvm_mmu_write_protect_pt_masked_batch=None)
    assert lost_pages(broken, arch, opts, _first_part_unmapped)
    assert not lost_pages(per_word_only(arch), arch, opts, _first_part_unmapped)


@configs
def test_fls_without_plus_one_loses_pages(arch, opts):
    broken = variant(arch, kvm_mmu_write_protect_pt_masked=wp_masked_fls_no_plus_one,
                     kvm_mmu_write_protect_pt_masked_batch=None)
    assert lost_pages(broken, arch, opts, _first_part_unmapped)


@configs
def test_missing_flush_loses_pages(arch, opts):
    """No TLB flush after GET: the vCPU keeps writing through its cached writable entry."""
    hooks = {"kvm_flush_remote_tlbs": flush_nothing}
    if arch == "arm64":
        hooks["kvm_flush_remote_tlbs_range"] = flush_range_nothing
    assert lost_pages(variant(arch, **hooks), arch, opts, _first_part_unmapped)


@configs
def test_writable_read_fault_while_logging_loses_pages(arch, opts):
    """Bug #9: a read fault while logging mapped writable; the first write never traps."""
    real = variant(arch).kvm_arch_handle_stage2_fault

    @kvmcore.hookimpl
    def kvm_arch_handle_stage2_fault(kvm, vcpu, slot, gfn, write):
        real(kvm=kvm, vcpu=vcpu, slot=slot, gfn=gfn, write=write)
        leaf = kvm.pgtable.leaf(gfn)
        kvm.pgtable.set_entry(leaf.li, leaf.row, leaf.idx, leaf.pte | PTE_W)   # writable, not logged
        return True

    def build(vm):
        oracle = logging_slot(vm, 1 << 32, vm.bits_per_long)
        vm.create_vcpu(1).read(oracle.gpa, 8)
        return [(oracle, [0], [])]

    assert lost_pages(variant(arch, kvm_arch_handle_stage2_fault=kvm_arch_handle_stage2_fault), arch, opts, build)
    assert not lost_pages(arch, arch, opts, build)


# -- faults while logging --------------------------------------------------------------

@configs
def test_read_fault_while_logging_maps_read_only_page(arch, opts):
    vm = make(arch, opts)
    gpa = 1 << 32
    vm.set_user_memory_region(0, gpa, 4 * vm.geometry.level_size(2), flags=LOG, host_page_size=1 << 30)
    vcpu = vm.create_vcpu(0)
    vcpu.read(gpa + 3 * vm.page_size, 8)
    t = vm.translate(gpa + 3 * vm.page_size)
    assert (t.level, t.writable) == (3, False)
    assert vm.stats["blocks_mapped"] == 0
    assert not pages_from_bitmap(vm.get_dirty_log(0)).size
    vcpu.write_many(np.array([gpa + 3 * vm.page_size]), 1)
    assert vm.translate(gpa + 3 * vm.page_size).writable
    assert pages_from_bitmap(vm.get_dirty_log(0)).tolist() == [3]


@configs
def test_no_block_while_logging_blocks_return_lazily(arch, opts):
    vm = make(arch, opts)
    blk = vm.geometry.level_size(2)
    gpa = 4 * blk
    vm.set_user_memory_region(0, gpa, 2 * blk, flags=LOG, host_page_size=1 << 30)
    vcpu = vm.create_vcpu(0)
    vcpu.write_many(np.array([gpa, gpa + blk + 8]), 1)
    assert vm.translate(gpa).level == 3 and vm.stats["blocks_mapped"] == 0
    vm.set_user_memory_region(0, gpa, 2 * blk, flags=0)
    assert vm.translate(gpa).level == 3            # no immediate collapse
    vcpu.write_many(np.array([gpa + vm.page_size]), 2)
    t = vm.translate(gpa + vm.page_size)
    assert (t.level, t.writable) == (2, True)      # the pte table gave way to a block
    assert vm.stats["blocks_mapped"] == 1


# -- huge mappings ---------------------------------------------------------------------

def _slot(base_gfn, npages, uaddr):
    return Memslot(id=0, as_id=0, base_gfn=base_gfn, npages=npages, flags=0, userspace_addr=uaddr,
                   host_page_size=2 << 20, memory=np.zeros(1, np.uint8))


def test_fault_supports_stage2_huge_mapping():
    two_m = 2 << 20
    slot = _slot(512, 3 * 512 + 7, 64 << 30)            # gpa 2M, aligned like the hva
    assert fault_supports_stage2_huge_mapping(slot, 512, two_m, 12)
    assert fault_supports_stage2_huge_mapping(slot, 3 * 512 + 511, two_m, 12)
    assert not fault_supports_stage2_huge_mapping(slot, 4 * 512, two_m, 12)   # tail block not inside
    assert fault_supports_stage2_huge_mapping(slot, 4 * 512, 4096, 12)
    skewed = _slot(513, 4 * 512, 64 << 30)               # gpa and hva not congruent
    assert not fault_supports_stage2_huge_mapping(skewed, 1024, two_m, 12)


@configs
def test_blocks_only_where_the_kernel_maps_them(arch, opts):
    vm = make(arch, opts)
    blk = vm.geometry.level_size(2)
    vcpu = vm.create_vcpu(0)
    vm.set_user_memory_region(0, 2 * blk, 2 * blk + 3 * vm.page_size, host_page_size=1 << 30)
    vcpu.write_many(np.array([2 * blk, 4 * blk]), 1)
    assert vm.translate(2 * blk).level == 2
    assert vm.translate(4 * blk).level == 3             # the slot's tail is not a whole block
    vm.set_user_memory_region(1, 8 * blk + vm.page_size, 2 * blk)      # unaligned base
    vcpu.write_many(np.array([9 * blk]), 1)
    assert vm.translate(9 * blk).level == 3
    vm.set_user_memory_region(2, 12 * blk, 2 * blk, host_page_size=4096)  # 4K host pages
    vcpu.write_many(np.array([12 * blk]), 1)
    assert vm.translate(12 * blk).level == 3


# -- batched and per-word hooks agree ----------------------------------------------------

def _trace(arch, opts, host_page_size, manual, chunk, ops, plugin):
    vm = make(arch, opts, plugin)
    if manual:
        vm.enable_cap(kvmcore.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, manual)
    if chunk:
        vm.enable_cap(kvmcore.KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE, vm.geometry.level_size(2))
    blk = vm.geometry.level_size(2)
    gpa = 2 * blk
    npages = (2 * blk + 40 * vm.page_size) // vm.page_size
    vm.set_user_memory_region(0, gpa, npages * vm.page_size, host_page_size=host_page_size)
    vcpu = vm.create_vcpu(0)
    flags = 0
    out = [state(vm)]
    for op, arg in ops:
        if op == "populate":
            vcpu.write_many(gpa + np.arange(0, npages, blk // vm.page_size) * vm.page_size, 3)
        elif op == "write":
            vcpu.write_many(gpa + (np.asarray(arg, np.int64) % npages) * vm.page_size, 7)
        elif op == "read":
            vcpu.read(gpa + (arg % npages) * vm.page_size, 8)
        elif op == "log":
            flags = LOG if arg else 0
            vm.set_user_memory_region(0, gpa, npages * vm.page_size, flags=flags)
        elif op == "harvest" and flags:
            bitmap = vm.get_dirty_log(0)
            out.append(bitmap.tolist())
            if manual:
                first = (arg % (npages // 64 + 1)) * 64
                vm.clear_dirty_log(0, first, npages - first, bitmap[first // vm.bits_per_long:])
        out.append(state(vm))
    return out


OPS = st.lists(st.one_of(
    st.tuples(st.just("write"), st.lists(st.integers(0, 1 << 20), min_size=1, max_size=12)),
    st.tuples(st.just("read"), st.integers(0, 1 << 20)),
    st.tuples(st.just("log"), st.booleans()),
    st.tuples(st.just("harvest"), st.integers(0, 100)),
), max_size=14)


@configs
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(host=st.sampled_from([4096, 2 << 20, 1 << 30]), manual=st.sampled_from([0, 1, 3]),
       chunk=st.booleans(), ops=OPS)
def test_batched_and_per_word_hooks_agree(arch, opts, host, manual, chunk, ops):
    if arch == "arm":
        manual, chunk = min(manual, 1), False
    ops = [("populate", None), ("log", True)] + ops
    batched = _trace(arch, opts, host, manual, chunk, ops, None)
    per_word = _trace(arch, opts, host, manual, chunk, ops, per_word_only(arch))
    assert batched == per_word


@pytest.mark.arch("arm64")
def test_a_wrong_batch_hook_is_noticed():
    """The comparison above fails for a batch hook that skips the INITIALLY_SET split."""
    @kvmcore.hookimpl
    def kvm_mmu_write_protect_pt_masked_batch(kvm, slot, gfn_offsets, masks):
        from arch_plugins.arm_common import mask_ranges as ranges
        from kvmcore.pgtable import PTE_W
        starts, ends = ranges(slot.base_gfn + gfn_offsets, masks)
        kvm.pgtable.clear_bits_ranges(starts, ends, PTE_W)

    lazy = variant("arm64", kvm_mmu_write_protect_pt_masked_batch=kvm_mmu_write_protect_pt_masked_batch)
    ops = [("write", [0, 600]), ("log", True), ("harvest", 0), ("write", [1])]
    opts = {"granule": 4096}
    assert _trace("arm64", opts, 2 << 20, 3, True, ops, lazy) != \
        _trace("arm64", opts, 2 << 20, 3, True, ops, per_word_only("arm64"))
    assert _trace("arm64", opts, 2 << 20, 3, True, ops, None) == \
        _trace("arm64", opts, 2 << 20, 3, True, ops, per_word_only("arm64"))


@configs
def test_slot_beyond_ipa_space_is_efault(arch, opts):
    vm = make(arch, opts)
    top = 1 << vm.geometry.ipa_bits
    with pytest.raises(kvmcore.KvmError) as exc:
        vm.set_user_memory_region(0, top - vm.page_size, 2 * vm.page_size)
    assert exc.value.errno == errno.EFAULT


# -- batched and one-at-a-time faults agree ------------------------------------------------

# ((level-2 blocks, pages) of misalignment, largest blocks, extra pages): see fault_trace
SLOT_LAYOUT = st.tuples(st.tuples(st.integers(0, 1 << 10), st.sampled_from([0, 0, 0, 1, 3, 509, 1 << 20])),
                        st.sampled_from([0, 0, 1, 2]), st.integers(1, 2048))
SLOT_INDEX = st.integers(0, 1)
OFFSET = st.one_of(st.integers(0, 1 << 30), st.integers(-600, -1))   # page, mod the slot's size
SWEEP = st.tuples(st.just("sweep"), SLOT_INDEX,
                  st.tuples(st.one_of(st.just(0), OFFSET), st.integers(1, 1500),
                            st.sampled_from([1, 1, 1, 2, 3, 511, 513]), st.booleans()))
FAULT_OPS = st.lists(st.one_of(
    st.tuples(st.just("write"), SLOT_INDEX, st.lists(OFFSET, min_size=1, max_size=16)),
    SWEEP,
    SWEEP,
    st.tuples(st.just("read"), SLOT_INDEX, st.tuples(OFFSET, st.integers(1, 40))),
    st.tuples(st.just("log"), SLOT_INDEX, st.booleans()),
    st.tuples(st.just("harvest"), SLOT_INDEX, st.integers(0, 1 << 20)),
    st.tuples(st.just("populate"), SLOT_INDEX, st.none()),
), max_size=8)


@configs
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(host=st.sampled_from([4096, 2 << 20, 1 << 30]), manual=st.sampled_from([0, 1, 3]), chunk=st.booleans(),
       layout=st.lists(SLOT_LAYOUT, min_size=1, max_size=2), sweep=SWEEP, ops=FAULT_OPS)
def test_batched_and_one_at_a_time_faults_agree(arch, opts, host, manual, chunk, layout, sweep, ops):
    """The batched fault hook against the same plugin with it hidden: identical tables
    (in table order), table count, every statistic, bitmaps, reads and memory after
    every step, on unaligned slots populated with blocks before logging starts."""
    if arch == "arm":
        manual, chunk = min(manual, 1), False
    ops = [sweep] + ops
    fast = fault_trace(arch, opts, None, host, manual, chunk, layout, ops)
    slow = fault_trace(arch, opts, per_fault_only(arch), host, manual, chunk, layout, ops)
    assert fast == slow


def _agree(arch, opts, host, manual, chunk, layout, ops, plugin=None, **kw):
    """The trace on ``plugin`` (the real arch by default) equals it one fault at a time."""
    fast = fault_trace(arch, opts, plugin, host, manual, chunk, layout, ops, **kw)
    assert fast == fault_trace(arch, opts, per_fault_only(arch), host, manual, chunk, layout, ops, **kw)
    return fast


@configs
def test_the_fast_path_takes_every_logging_fault_in_bulk(arch, opts):
    """Not vacuous: on a slot of write-protected blocks, one sweep's faults (each block
    broken by its first fault, the rest mapped, unmapped tables allocated) and then,
    after GET, the next sweep's (write-protected pages) all go through the batched
    hook, in a handful of calls, with the per-fault results."""
    plugin = counting_fast_faults(arch)
    vm = make(arch, opts)
    pmd = vm.geometry.level_pages(2)
    npages = 2 * pmd + 40
    layout = [((2, 0), 0, npages)]
    sweep = ("sweep", 0, (0, npages, 1, False))
    ops = [sweep, ("harvest", 0, 0), sweep, ("harvest", 0, 0)]
    out = _agree(arch, opts, 1 << 30, 0, False, layout, ops, plugin)
    stats = [step[-1] for step in out if step[0] != "memory"]
    populated, logging, first, _, second, _ = stats
    assert populated["blocks_mapped"] == 2                        # the blocks exist before logging
    assert first["huge_pages_split"] == 2
    assert second["write_faults"] - first["write_faults"] == npages
    assert second["write_faults"] - logging["write_faults"] == 2 * npages
    batched = [(n, done) for n, done in plugin.calls if done]
    assert batched == [(npages, npages)] * 2                      # one call per sweep, all resolved
    assert second["pages_mapped"] == first["pages_mapped"] + (npages if arch == "arm" else 0)


@configs
def test_the_fast_path_stops_where_a_block_may_be_mapped(arch, opts):
    """Not logging, on a block-backed slot: the 4K-only pages past the last block are
    resolved in bulk up to the first page a block may map; that one, and what follows,
    the core takes one at a time (same results)."""
    plugin = counting_fast_faults(arch)
    pmd = make(arch, opts).geometry.level_pages(2)
    layout = [((0, 0), 0, 2 * pmd + 30)]
    ops = [("log", 0, False), ("write", 0, [-1, -2, -3, 5, -4]), ("sweep", 0, (-10, 9, 1, False))]
    _agree(arch, opts, 1 << 30, 0, False, layout, ops, plugin)
    assert (5, 3) in plugin.calls                                 # three tail pages, then a block
    assert (5, 5) in plugin.calls or (6, 6) in plugin.calls      # the rest of the tail: 4K pages


@pytest.mark.parametrize("order", ["ascending", "descending", "scattered"])
@configs
def test_tables_are_allocated_in_fault_order(arch, opts, order):
    """Faults on pages of several unmapped last-level tables allocate the tables in the
    order the per-fault path meets them (table rows, and so ``mapped_leaves()``, follow
    it); a batch hook that allocates them in address order is noticed by the leaves
    alone, every statistic being the same."""
    pmd = make(arch, opts).geometry.level_pages(2)
    offsets = np.arange(0, 6 * pmd, pmd // 4 + 1)
    if order == "descending":
        offsets = offsets[::-1]
    elif order == "scattered":
        offsets = np.random.default_rng(1).permutation(offsets)
    layout = [((0, 0), 0, 6 * pmd)]
    ops = [("write", 0, offsets.tolist()), ("log", 0, False), ("write", 0, (offsets + 1).tolist())]
    _agree(arch, opts, 4096, 0, False, layout, ops, populate=False)

    @kvmcore.hookimpl
    def address_order(kvm, vcpu, slot, gfns, write):
        """Right but for the table order: unmapped pages while logging, mapped in address order."""
        if not slot.is_logging or kvm.pgtable.lookup(gfns).valid.any():
            return 0
        kvm.pgtable.map_pages(np.sort(gfns), PTE_D | (PTE_W if write else 0), tlbi=kvm.tlb_flush_ipa)
        if write:
            kvm.mark_pages_dirty_in_slot(slot, gfns, vcpu)
        return len(gfns)

    wrong = variant(arch, kvm_arch_handle_stage2_faults_batch=address_order)
    ops = [("write", 0, offsets.tolist())]
    right = fault_trace(arch, opts, per_fault_only(arch), 4096, 0, False, layout, ops, populate=False)
    got = fault_trace(arch, opts, wrong, 4096, 0, False, layout, ops, populate=False)
    assert [step[-1] for step in got[:-1]] == [step[-1] for step in right[:-1]]   # the same statistics
    assert (got == right) == (order == "ascending")
    assert right == fault_trace(arch, opts, None, 4096, 0, False, layout, ops, populate=False)


def _prepared(arch, opts, host):
    """A VM with a logging slot holding every kind of leaf: write-protected blocks,
    writable and write-protected pages, unmapped pages and missing tables."""
    vm = make(arch, opts)
    pmd = vm.geometry.level_pages(2)
    base, npages = 4 * pmd, 4 * pmd
    vm.set_user_memory_region(0, base * vm.page_size, npages * vm.page_size, host_page_size=host)
    vcpu = vm.create_vcpu(0)
    vcpu.write_many((base + np.array([0, pmd, 3 * pmd])) * vm.page_size, 1)         # blocks (or pages)
    vm.set_user_memory_region(0, base * vm.page_size, npages * vm.page_size, flags=LOG)
    vcpu.write_many((base + np.arange(2 * pmd, 2 * pmd + 64)) * vm.page_size, 2)   # pages, writable
    vm.get_dirty_log(0)                                                             # ... write-protected
    vcpu.write_many((base + np.arange(2 * pmd + 32, 2 * pmd + 48)) * vm.page_size, 3)   # writable again
    return vm, vcpu, vm.memslot(0)


@configs
@settings(max_examples=20, deadline=None)
@given(data=st.data(), host=st.sampled_from([4096, 1 << 30]), write=st.booleans())
def test_the_batched_hook_called_directly_is_the_per_fault_hook_in_turn(arch, opts, data, host, write):
    """Called on any distinct pages of a logging slot, in any order, writes or reads,
    also on pages the core never hands over (writable ptes, mapped pages for a read),
    the batched hook resolves all of them exactly as the per-fault hook would in turn."""
    fast_vm, fast_vcpu, fast_slot = _prepared(arch, opts, host)
    slow_vm, slow_vcpu, slow_slot = _prepared(arch, opts, host)
    pmd = fast_vm.geometry.level_pages(2)
    pages = data.draw(st.lists(st.sampled_from(list(range(0, 4 * pmd, max(1, pmd // 64))) +
                                               list(range(2 * pmd, 2 * pmd + 70))),
                               min_size=1, max_size=200, unique=True))
    gfns = fast_slot.base_gfn + np.array(pages, np.int64)
    with fast_vm.mmu_lock:
        done = fast_vm.hook.kvm_arch_handle_stage2_faults_batch(kvm=fast_vm, vcpu=fast_vcpu, slot=fast_slot,
                                                                gfns=gfns, write=write)
    assert done == len(gfns)                                  # a logging slot: every fault maps a page
    with slow_vm.mmu_lock:
        for gfn in gfns.tolist():
            slow_vm.hook.kvm_arch_handle_stage2_fault(kvm=slow_vm, vcpu=slow_vcpu, slot=slow_slot, gfn=gfn,
                                                      write=write)
    assert all((a == b).all() for a, b in zip(fast_vm.pgtable.mapped_leaves(), slow_vm.pgtable.mapped_leaves()))
    assert dict(fast_vm.stats) == dict(slow_vm.stats)
    assert fast_vm.pgtable.nr_tables == slow_vm.pgtable.nr_tables
    assert (fast_slot.dirty_bitmap == slow_slot.dirty_bitmap).all()
