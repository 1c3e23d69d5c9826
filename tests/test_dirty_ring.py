"""The dirty ring on the model: capabilities, errno, push/harvest/reset, ring full,
coalescing and malformed entries (``virt/kvm/dirty_ring.c``)."""

import errno

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvmcore
from helpers import LOG, dirty_pages, page_gpas
from kvmcore import dirty_ring
from kvmcore.dirty_ring import DIRTY_GFN_DTYPE, Run, coalesce
from kvmcore.testing import unbatched_vm
from simple_arch import SimpleArch, SimpleArchBatch

hyp = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
RING = kvmcore.KVM_CAP_DIRTY_LOG_RING
ACQ_REL = kvmcore.KVM_CAP_DIRTY_LOG_RING_ACQ_REL
WITH_BITMAP = kvmcore.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP
DIRTY, RESET = kvmcore.KVM_DIRTY_GFN_F_DIRTY, kvmcore.KVM_DIRTY_GFN_F_RESET
FULL = kvmcore.KVM_EXIT_DIRTY_RING_FULL
BASE_PAGE = 512
U64 = (1 << 64) - 1


def raises(code, fn, *args, **kwargs):
    with pytest.raises(kvmcore.KvmError) as err:
        fn(*args, **kwargs)
    assert err.value.errno == code, str(err.value)
    return err.value


def ring_cap(vm):
    """The ring capability the arch offers (the TSO one first), or skip."""
    for cap in (RING, ACQ_REL):
        if vm.check_extension(cap):
            return cap
    pytest.skip(f"arch {vm.arch} has no dirty ring")


def ring_vm(arch, size=65536, npages=300, vcpus=1):
    """A VM with a ring of ``size`` bytes, slot 1 logging at page BASE_PAGE, vCPUs."""
    vm = kvmcore.create_vm(arch)
    vm.enable_cap(ring_cap(vm), size)
    base = BASE_PAGE * vm.page_size
    vm.set_user_memory_region(1, base, npages * vm.page_size, LOG)
    return vm, [vm.create_vcpu(i) for i in range(vcpus)], base


def offsets_of(harvested):
    return harvested["offset"].tolist()


def writable(vm, base, offsets):
    """Offsets whose page is mapped writable now."""
    out = []
    for off in offsets:
        t = vm.translate(base + off * vm.page_size)
        if t is not None and t.writable:
            out.append(off)
    return out


# -- capabilities and enabling ------------------------------------------------------------

@pytest.mark.parametrize(("caps", "expect"), [
    (SimpleArch.X86_RING_CAPS, {RING: 1 << 20, ACQ_REL: 1 << 20, WITH_BITMAP: 0}),
    (SimpleArch.ARM64_RING_CAPS, {RING: 0, ACQ_REL: 1 << 20, WITH_BITMAP: 1}),
    (frozenset(), {RING: 0, ACQ_REL: 0, WITH_BITMAP: 0}),
])
def test_check_extension_follows_the_arch(caps, expect):
    vm = kvmcore.create_vm(SimpleArch(ring_caps=caps))
    assert {cap: vm.check_extension(cap) for cap in expect} == expect
    for cap in (RING, ACQ_REL):
        if expect[cap]:
            kvmcore.create_vm(SimpleArch(ring_caps=caps)).enable_cap(cap, 4096)
        else:
            raises(errno.EINVAL, kvmcore.create_vm(SimpleArch(ring_caps=caps)).enable_cap, cap, 4096)


# (size, errno) for a fresh VM whose arch reserves 64 entries (no PML), 4K pages.
ENABLE_CASES = [
    (0, errno.EINVAL),                     # not a power of two
    (3 * 4096, errno.EINVAL),              # not a power of two
    (3 << 20, errno.EINVAL),               # not a power of two, though above the max: EINVAL first
    (512, errno.EINVAL),                   # a power of two, below the reserved 64 entries
    (2048, errno.EINVAL),                  # holds the reserve, below PAGE_SIZE
    (2 << 20, errno.E2BIG),                # above 65536 entries
    (4096, 0),
    (1 << 20, 0),
    ((1 << 32) + 4096, 0),                 # args[0] is a u32 in the kernel: this is 4096
    (1 << 32, errno.EINVAL),               # ... and this is 0
]


@pytest.mark.parametrize(("size", "code"), ENABLE_CASES)
def test_enable_cap_errno(size, code):
    vm = kvmcore.create_vm(SimpleArch())
    if code:
        raises(code, vm.enable_cap, RING, size)
        assert vm.dirty_ring_size == 0
    else:
        assert vm.enable_cap(RING, size) == 0
        assert vm.dirty_ring_size == size & 0xFFFFFFFF


def test_enable_cap_order_once_and_before_vcpus():
    vm = kvmcore.create_vm(SimpleArch())
    vm.enable_cap(RING, 4096)
    raises(errno.EINVAL, vm.enable_cap, RING, 8192)           # set once
    raises(errno.EINVAL, vm.enable_cap, ACQ_REL, 4096)        # either cap: the same ring
    raises(errno.E2BIG, vm.enable_cap, RING, 2 << 20)         # size checks come first
    vm = kvmcore.create_vm(SimpleArch())
    vm.set_user_memory_region(1, 0, 64 * vm.page_size, LOG)   # slots may exist ...
    vm.create_vcpu(0)
    raises(errno.EINVAL, vm.enable_cap, RING, 4096)           # ... vCPUs may not
    raises(errno.E2BIG, vm.enable_cap, RING, 2 << 20)


def test_reserved_entries_grow_with_the_cpu_dirty_log():
    """x86 with PML reserves 64 + 512 entries: 9216 bytes, so 16 KiB is the least."""
    vm = kvmcore.create_vm(SimpleArch(cpu_dirty_log_size=512))
    assert vm.dirty_ring_rsvd_entries == 576
    raises(errno.EINVAL, vm.enable_cap, RING, 8192)
    vm.enable_cap(RING, 16384)
    ring = vm.create_vcpu(0).dirty_ring
    assert (ring.size, ring.soft_limit) == (1024, 1024 - 576)


def test_ring_layout_is_the_kernels():
    vm, (vcpu,), base = ring_vm(SimpleArch(), size=4096)
    entries = vcpu.dirty_ring.entries
    assert entries.dtype == DIRTY_GFN_DTYPE and entries.dtype.itemsize == 16
    assert [entries.dtype.fields[f][1] for f in ("flags", "slot", "offset")] == [0, 4, 8]
    assert len(entries) == 256 and vcpu.dirty_ring.soft_limit == 192
    vcpu.write_many(page_gpas(vm, base, [7]), 1)
    raw = entries[:1].view(np.uint8).tobytes()
    assert raw == (DIRTY).to_bytes(4, "little") + (1).to_bytes(4, "little") + (7).to_bytes(8, "little")


# -- ring-only VMs and WITH_BITMAP --------------------------------------------------------

def test_ring_only_vm_has_no_bitmaps_and_get_clear_are_enxio(arch):
    vm, (vcpu,), base = ring_vm(arch)
    assert vm.memslot(1).dirty_bitmap is None
    for slot in (1, 7, 1 << 16 | 999):       # ENXIO before any slot check
        raises(errno.ENXIO, vm.get_dirty_log, slot)
        raises(errno.ENXIO, vm.clear_dirty_log, slot, 1, 3, [0])


def test_non_vcpu_writes_are_dropped_without_a_bitmap(arch):
    vm, (vcpu,), base = ring_vm(arch)
    vm.write_guest(base + 5 * vm.page_size, b"x")
    assert vm.stats["dirty_marks_dropped"] == 1
    assert len(vcpu.harvest_dirty_ring()) == 0


def test_ring_enabled_after_logging_slots_keeps_their_bitmaps_unreadable():
    vm = kvmcore.create_vm(SimpleArch())
    vm.set_user_memory_region(1, 0, 64 * vm.page_size, LOG)
    vm.enable_cap(RING, 4096)
    assert vm.memslot(1).dirty_bitmap is not None
    raises(errno.ENXIO, vm.get_dirty_log, 1)
    vm.set_user_memory_region(2, 1 << 30, 64 * vm.page_size, LOG)
    assert vm.memslot(2).dirty_bitmap is None


def test_with_bitmap_rules():
    arm64 = SimpleArch(ring_caps=SimpleArch.ARM64_RING_CAPS)
    raises(errno.EINVAL, kvmcore.create_vm(SimpleArch()).enable_cap, WITH_BITMAP)       # x86: not offered
    vm = kvmcore.create_vm(arm64)
    raises(errno.EINVAL, vm.enable_cap, WITH_BITMAP)                                    # ring first
    vm.enable_cap(ACQ_REL, 4096)
    raises(errno.EINVAL, vm.enable_cap, WITH_BITMAP, flags=1)                           # flags 0
    vm.set_user_memory_region(1 << 16, 0, 64 * vm.page_size)                           # any slot, any space
    raises(errno.EINVAL, vm.enable_cap, WITH_BITMAP)                                    # no memslot yet
    assert not vm.dirty_ring_with_bitmap


def test_with_bitmap_after_deleting_every_slot_is_allowed():
    vm = kvmcore.create_vm(SimpleArch(ring_caps=SimpleArch.ARM64_RING_CAPS))
    vm.enable_cap(ACQ_REL, 4096)
    vm.set_user_memory_region(1, 0, 64 * vm.page_size, LOG)
    vm.set_user_memory_region(1, 0, 0)
    assert vm.enable_cap(WITH_BITMAP) == 0
    assert vm.enable_cap(WITH_BITMAP) == 0   # a one-way boolean: again is fine


def test_ring_with_bitmap_vcpu_writes_to_the_ring_others_to_the_bitmap():
    vm = kvmcore.create_vm(SimpleArch(ring_caps=SimpleArch.ARM64_RING_CAPS))
    vm.enable_cap(ACQ_REL, 4096)
    vm.enable_cap(WITH_BITMAP)
    base = BASE_PAGE * vm.page_size
    vm.set_user_memory_region(1, base, 100 * vm.page_size, LOG)
    vcpu = vm.create_vcpu(0)
    vcpu.write_many(page_gpas(vm, base, [3, 4]), 1)
    vm.write_guest(base + 50 * vm.page_size, b"its table")      # no running vCPU
    assert offsets_of(vcpu.harvest_dirty_ring()) == [3, 4]
    assert dirty_pages(vm.get_dirty_log(1)) == {50}


def test_marks_follow_mark_page_dirty_in_slot(arch):
    """§1.4: slot not logging -> nothing; ring and vCPU -> ring; else bitmap or nothing."""
    vm, (vcpu,), base = ring_vm(arch)
    vm.set_user_memory_region(2, 1 << 32, 64 * vm.page_size)
    quiet = vm.memslot(2)
    vm.mark_page_dirty_in_slot(quiet, quiet.base_gfn + 1, vcpu)
    ms = vm.memslot(1)
    vm.mark_pages_dirty_in_slot(ms, np.array([ms.base_gfn + 9, ms.base_gfn + 2, ms.base_gfn + 9]), vcpu)
    vm.mark_page_dirty_in_slot(ms, ms.base_gfn + 1, None)
    assert offsets_of(vcpu.harvest_dirty_ring()) == [9, 2, 9]
    assert vm.stats["dirty_marks_dropped"] == 1
    other = kvmcore.create_vm(arch).create_vcpu(0)
    with pytest.raises(kvmcore.ArchBugError):
        vm.mark_page_dirty_in_slot(ms, ms.base_gfn, other)


# -- exact sets, in first-write order ------------------------------------------------------

@hyp
@given(data=st.data())
def test_harvest_gives_the_pages_written_in_first_write_order(arch, data):
    npages = data.draw(st.integers(1, 400), label="npages")
    vm, vcpus, base = ring_vm(arch, npages=npages, vcpus=2)
    for value in range(1, data.draw(st.integers(1, 4), label="rounds") + 1):
        expect, seen = [[], []], set()
        for _ in range(data.draw(st.integers(1, 3), label="bursts")):
            who = data.draw(st.integers(0, 1), label="vcpu")
            offsets = data.draw(st.lists(st.integers(0, npages - 1), max_size=60), label="writes")
            assert vcpus[who].write_many(page_gpas(vm, base, offsets), value) == len(offsets)
            for off in offsets:  # a page goes to the ring of the vCPU that first writes it
                if off not in seen:
                    seen.add(off)
                    expect[who].append(off)
        assert [offsets_of(v.harvest_dirty_ring()) for v in vcpus] == expect
        assert vm.reset_dirty_rings() == len(seen)
        assert writable(vm, base, seen) == []


def test_unreset_pages_stay_writable_and_are_not_pushed_again(arch):
    vm, (vcpu,), base = ring_vm(arch)
    vcpu.write_many(page_gpas(vm, base, [1, 2]), 1)
    vcpu.write_many(page_gpas(vm, base, [2, 1, 3]), 2)
    assert offsets_of(vcpu.harvest_dirty_ring()) == [1, 2, 3]
    vcpu.write_many(page_gpas(vm, base, [3, 1]), 3)          # harvested, not reset: still writable
    assert offsets_of(vcpu.harvest_dirty_ring()) == []
    assert vm.reset_dirty_rings() == 3
    vcpu.write_many(page_gpas(vm, base, [3, 1]), 4)
    assert offsets_of(vcpu.harvest_dirty_ring()) == [3, 1]


def test_reset_flushes_the_whole_vm_only_when_it_reset_something(arch):
    vm, (vcpu,), base = ring_vm(arch)
    flushes = vm.stats["tlb_flushes_full"]
    assert vm.reset_dirty_rings() == 0
    assert vm.stats["tlb_flushes_full"] == flushes
    vcpu.write_many(page_gpas(vm, base, [1]), 1)
    vcpu.harvest_dirty_ring()
    assert vm.reset_dirty_rings() == 1
    assert vm.stats["tlb_flushes_full"] == flushes + 1
    raises(errno.EINVAL, kvmcore.create_vm(arch).reset_dirty_rings)


def test_reset_without_its_flush_loses_dirty_pages():
    """A stale writable TLB entry after a reset hides the next write: the flush matters."""
    for plugin, lost in ((SimpleArch(), False), (SimpleArch(flush=False), True)):
        vm, (vcpu,), base = ring_vm(plugin)
        gpas = page_gpas(vm, base, [1, 2])
        vcpu.write_many(gpas, 1)
        vcpu.harvest_dirty_ring()
        vm.reset_dirty_rings()
        vcpu.write_many(gpas, 2)
        assert (offsets_of(vcpu.harvest_dirty_ring()) != [1, 2]) is lost


# -- ring full ---------------------------------------------------------------------------

def test_ring_full_exit_refusal_reset_and_resume(arch):
    vm, (vcpu,), base = ring_vm(arch, size=4096, npages=600)     # 256 entries, soft limit 192
    ring = vcpu.dirty_ring
    soft = ring.soft_limit
    assert (ring.size, soft) == (256, 256 - vm.dirty_ring_rsvd_entries)
    gpas = page_gpas(vm, base, range(500))
    done = vcpu.write_many(gpas, 7)
    assert (done, vcpu.exit_reason) == (soft - 1, FULL)       # the store that filled it did not retire
    assert ring.used == soft
    mem = vm.memory(1).view(np.uint64)[::vm.page_size // 8]
    assert (mem[:done] == 7).all() and mem[done] == 0
    faults = vm.stats["write_faults"]
    assert vcpu.write_many(gpas[done:], 7) == 0 and vcpu.exit_reason == FULL   # no entry at all
    assert vm.stats["write_faults"] == faults
    harvested = offsets_of(vcpu.harvest_dirty_ring())
    assert harvested == list(range(soft))
    assert vm.reset_dirty_rings() == soft and ring.used == 0
    more = vcpu.write_many(gpas[done:], 7)
    assert (more, vcpu.exit_reason) == (soft - 1, FULL)
    # page `done` was reset before its store retired: it faults and is pushed again
    assert offsets_of(vcpu.harvest_dirty_ring()) == list(range(done, done + soft))
    vm.reset_dirty_rings()
    rest = gpas[done + more:]
    assert vcpu.write_many(rest, 7) == len(rest) and vcpu.exit_reason != FULL
    assert (mem[:500] == 7).all()
    assert vm.stats["dirty_ring_full_exits"] == 3


@hyp
@given(data=st.data())
def test_batched_faults_fill_the_ring_as_one_fault_at_a_time_does(arch, data):
    """With a ring the core hands runs of faults to an arch that pushes in order, never
    more than the ring takes before its soft limit: completions, exits, ring entries,
    memory, page tables and statistics are those of one fault at a time."""
    if not kvmcore.create_vm(arch).info.batched_faults_with_ring:
        pytest.skip(f"arch {arch} takes faults one at a time with a ring")
    npages = 600
    runs = []
    for vm in (kvmcore.create_vm(arch), unbatched_vm(arch)):
        vm.enable_cap(ring_cap(vm), 4096)            # 256 entries: soft-full exits happen
        vm.set_user_memory_region(1, BASE_PAGE * vm.page_size, npages * vm.page_size, LOG)
        runs.append((vm, vm.create_vcpu(0)))
    for value in range(1, data.draw(st.integers(1, 5), label="rounds") + 1):
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32), label="seed"))
        offsets = rng.integers(0, npages, data.draw(st.integers(0, 400), label="writes"))  # runs past the soft limit
        reset = data.draw(st.booleans(), label="reset")
        seen = []
        for vm, vcpu in runs:
            done = vcpu.write_many(page_gpas(vm, BASE_PAGE * vm.page_size, offsets), value)
            seen.append((done, vcpu.exit_reason, offsets_of(vcpu.harvest_dirty_ring()),
                         vm.reset_dirty_rings() if reset else None))
        assert seen[0] == seen[1]
    (a, _), (b, _) = runs
    assert (a.memory(1) == b.memory(1)).all()
    assert dict(a.stats) == dict(b.stats)
    la, lb = a.pgtable.mapped_leaves(), b.pgtable.mapped_leaves()
    for x, y in zip(la, lb):
        assert (x[np.lexsort(la[:2])] == y[np.lexsort(lb[:2])]).all()


def test_a_partial_reset_lets_the_vcpu_in_only_below_the_soft_limit():
    vm, (vcpu,), base = ring_vm(SimpleArch(), size=4096, npages=600)
    gpas = page_gpas(vm, base, range(300))
    done = vcpu.write_many(gpas, 1)
    entries = vcpu.dirty_ring.entries
    assert vm.reset_dirty_rings() == 0            # nothing collected yet
    assert vcpu.write_many(gpas[done:], 1) == 0
    entries["flags"][:10] = RESET                  # the VMM collects ten, in sequence
    vcpu.dirty_ring.fetch_index = 10
    assert vm.reset_dirty_rings() == 10
    assert vcpu.write_many(gpas[done:], 1) == 10 and vcpu.exit_reason == FULL


def test_harvesting_out_of_sequence_keeps_the_vcpu_stuck():
    """§8 #19: entries marked RESET after a skipped one are not reset."""
    vm, (vcpu,), base = ring_vm(SimpleArch(), size=4096, npages=600)
    gpas = page_gpas(vm, base, range(300))
    done = vcpu.write_many(gpas, 1)
    vcpu.dirty_ring.entries["flags"][1:] = RESET   # entry 0 skipped
    assert vm.reset_dirty_rings() == 0
    assert vcpu.write_many(gpas[done:], 1) == 0 and vcpu.exit_reason == FULL


def test_a_push_into_a_full_ring_is_refused():
    vm, (vcpu,), base = ring_vm(SimpleArch(), size=4096, npages=600)
    ms = vm.memslot(1)
    vm.mark_pages_dirty_in_slot(ms, ms.base_gfn + np.arange(250), vcpu)   # past soft, below hard
    assert vcpu.dirty_ring.soft_full and not vcpu.dirty_ring.full
    with pytest.raises(dirty_ring.DirtyRingOverflowError):
        vm.mark_pages_dirty_in_slot(ms, ms.base_gfn + np.arange(250, 257), vcpu)
    assert vcpu.dirty_ring.used == 250


def test_the_indexes_run_free_past_the_ring_size(arch):
    vm, (vcpu,), base = ring_vm(arch, size=4096, npages=3000)
    total = 0
    for value in range(1, 12):
        gpas = page_gpas(vm, base, np.arange(150) + 150 * value)
        assert vcpu.write_many(gpas, value) == 150
        assert offsets_of(vcpu.harvest_dirty_ring()) == list(range(150 * value, 150 * value + 150))
        total += vm.reset_dirty_rings()
    ring = vcpu.dirty_ring
    assert total == 1650 and ring.dirty_index == ring.reset_index == ring.fetch_index == 1650


def test_reset_is_bounded_per_ioctl(monkeypatch):
    monkeypatch.setattr(dirty_ring, "RESET_BUDGET", 5)
    vm, vcpus, base = ring_vm(SimpleArch(), vcpus=2)
    vcpus[0].write_many(page_gpas(vm, base, range(4)), 1)
    vcpus[1].write_many(page_gpas(vm, base, range(4, 8)), 1)
    for v in vcpus:
        v.harvest_dirty_ring()
    assert vm.reset_dirty_rings() == 5            # 4 of vCPU 0, 1 of vCPU 1
    assert vm.reset_dirty_rings() == 3
    assert vm.reset_dirty_rings() == 0


# -- coalescing ----------------------------------------------------------------------------

def runs(offsets, slots=None, bpl=64):
    slots = slots or [1] * len(offsets)
    return [(r.slot, r.offset, r.mask, r.entries) for r in coalesce(slots, offsets, bpl)]


def test_coalesce_forward_backward_and_breaks():
    assert runs([]) == []
    assert runs([10, 11, 15, 73]) == [(1, 10, 0b100011 | 1 << 63, 4)]
    assert runs([10, 74]) == [(1, 10, 1, 1), (1, 74, 1, 1)]                   # delta 64: new run
    assert runs([10, 9, 8]) == [(1, 8, 0b111, 3)]                             # backward, rebased
    assert runs([70, 7]) == [(1, 7, 1 | 1 << 63, 2)]                          # delta -63
    assert runs([70, 6]) == [(1, 70, 1, 1), (1, 6, 1, 1)]                     # delta -64: new run
    assert runs([100, 163, 99]) == [(1, 100, 1 | 1 << 63, 2), (1, 99, 1, 1)]  # would lose bit 63
    assert runs([5, 5, 6, 5]) == [(1, 5, 0b11, 4)]                            # duplicates
    assert runs([5, 6, 7], slots=[1, 2, 1]) == [(1, 5, 1, 1), (2, 6, 1, 1), (1, 7, 1, 1)]
    assert runs([60, 70]) == [(1, 60, 1 | 1 << 10, 2)]                        # across a 64-page word
    assert runs([U64, 0]) == [(1, U64, 0b11, 2)]                              # u64 difference, as C


def broken_coalesce(slots, offsets, bits_per_long):
    """Backward rebase without the no-bit-loss check: high bits fall off the word."""
    out, word = [], (1 << bits_per_long) - 1
    for s, o in zip(slots, offsets):
        if out and out[-1].slot == s and -bits_per_long < o - out[-1].offset < 0:
            r = out[-1]
            out[-1] = Run(s, o, ((r.mask << (r.offset - o)) & word) | 1, r.entries + 1)
        elif out and out[-1].slot == s and 0 <= o - out[-1].offset < bits_per_long:
            r = out[-1]
            out[-1] = Run(s, r.offset, r.mask | 1 << (o - r.offset), r.entries + 1)
        else:
            out.append(Run(s, o, 1, 1))
    return out


def lost_after_reset(plugin, order):
    """Write pages in ``order``, harvest and reset, write them again: the pages the
    second round did not log (and that were left writable)."""
    vm, (vcpu,), base = ring_vm(plugin, npages=400)
    gpas = page_gpas(vm, base, order)
    vcpu.write_many(gpas, 1)
    vcpu.harvest_dirty_ring()
    vm.reset_dirty_rings()
    left_writable = set(writable(vm, base, order))
    vcpu.write_many(gpas, 2)
    lost = set(order) - set(offsets_of(vcpu.harvest_dirty_ring()))
    assert lost == left_writable
    return lost


ORDERS = [
    [100, 163, 99],                 # backward visit that would drop bit 63
    [200, 263, 201, 199, 136],      # more of the same, and a rebase by -63
    [10, 11, 12, 9, 8, 74, 7],      # forward, backward, a break, backward again
    [60, 70, 127, 64, 63],          # runs across 64-page words, arbitrary offsets
    [5, 5, 300, 5, 299],            # duplicates and two runs
    list(range(300, 236, -1)),      # a full backward sweep of 64 pages
]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("plugin_type", [SimpleArch, SimpleArchBatch])
def test_reset_reprotects_every_page_of_every_run(plugin_type, order):
    assert lost_after_reset(plugin_type(), order) == set()


def test_a_coalescer_that_drops_high_bits_is_caught(monkeypatch):
    monkeypatch.setattr(dirty_ring, "coalesce", broken_coalesce)
    assert lost_after_reset(SimpleArch(), ORDERS[0]) == {163}
    assert lost_after_reset(SimpleArchBatch(), ORDERS[1]) >= {263}


def test_runs_in_different_slots_are_protected_in_their_own_slot(arch):
    vm, (vcpu,), base = ring_vm(arch, npages=100)
    base2 = base + 100 * vm.page_size                      # adjacent: gfns continue
    vm.set_user_memory_region(2, base2, 100 * vm.page_size, LOG)
    gpas = np.concatenate([page_gpas(vm, base, [98, 99]), page_gpas(vm, base2, [0, 1]),
                           page_gpas(vm, base, [97])])
    vcpu.write_many(gpas, 1)
    h = vcpu.harvest_dirty_ring()
    assert list(zip(h["slot"].tolist(), offsets_of(h))) == [(1, 98), (1, 99), (2, 0), (2, 1), (1, 97)]
    assert vm.reset_dirty_rings() == 5
    vcpu.write_many(gpas, 2)
    assert len(vcpu.harvest_dirty_ring()) == 5


# -- malformed entries from userspace -------------------------------------------------------

class RecordingArch(SimpleArch):
    """Records the protect calls; refuses (records, does not apply) any outside the slot."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = []

    @kvmcore.hookimpl
    def kvm_mmu_write_protect_pt_masked(self, kvm, slot, gfn_offset, mask):
        self.calls.append((slot.slot, gfn_offset, mask))
        if 0 <= gfn_offset and gfn_offset + mask.bit_length() <= slot.npages:
            super().kvm_mmu_write_protect_pt_masked(kvm, slot, gfn_offset, mask)


def malformed_setup(plugin):
    """Slot 1 (100 pages, logging) with slot 2 right after it (not logging, mapped
    writable).  Pages 0..9 of slot 1 are written and harvested."""
    vm, (vcpu,), base = ring_vm(plugin, npages=100)
    base2 = base + 100 * vm.page_size
    vm.set_user_memory_region(2, base2, 200 * vm.page_size)
    vcpu.write_many(page_gpas(vm, base2, range(200)), 5)
    vcpu.write_many(page_gpas(vm, base, range(10)), 1)
    vcpu.harvest_dirty_ring()
    return vm, vcpu, base, base2


BAD_ENTRIES = [
    ("offset past the slot", 1, 100 + 5),
    ("offset at the end", 1, 100),
    ("address space too big", 2 << 16 | 1, 3),
    ("id too big", 512, 3),
    ("no such slot", 7, 3),
]


@pytest.mark.parametrize(("what", "slot", "offset"), BAD_ENTRIES)
def test_malformed_entries_are_skipped_but_counted(what, slot, offset):
    plugin = RecordingArch()
    vm, vcpu, base, base2 = malformed_setup(plugin)
    entries = vcpu.dirty_ring.entries
    entries["slot"][3] = slot
    entries["offset"][3] = offset
    entries["flags"][:10] = 0xDEADBEEF         # garbage flags, RESET bit set: harvested
    assert vm.reset_dirty_rings() == 10
    assert vm.stats["dirty_ring_invalid_entries"] == 1
    assert plugin.calls == [(1, 0, 0b111), (1, 4, 0b111111)]   # the runs around the bad entry
    assert writable(vm, base, range(10)) == [3]
    assert writable(vm, base2, range(200)) == list(range(200)), "slot 2 must be untouched"
    assert (entries["flags"][:10] == 0).all()


WRAP = 0xFFFFFFFFFFFFFFC1   # with a next offset 0: delta 63, so offset + __fls(mask) is 2**64


def wrapped_setup(plugin):
    vm, vcpu, base, base2 = malformed_setup(plugin)
    vm.reset_dirty_rings()
    vcpu.write_many(page_gpas(vm, base, [20, 21]), 2)
    vcpu.harvest_dirty_ring()
    entries = vcpu.dirty_ring.entries
    entries["offset"][10], entries["offset"][11] = WRAP, 0
    plugin.calls.clear()
    return vm, vcpu, base, base2


def test_a_wrapped_offset_is_skipped():
    """KVM: Reject wrapped offset in kvm_reset_dirty_gfn() (2026): ``offset >= npages``
    is checked on its own, so the u64 sum cannot wrap past the bounds check."""
    plugin = RecordingArch()
    vm, vcpu, base, base2 = wrapped_setup(plugin)
    assert dirty_ring.coalesce([1, 1], [WRAP, 0], 64) == [Run(1, WRAP, 1 | 1 << 63, 2)]
    assert vm.reset_dirty_rings() == 2
    assert plugin.calls == [] and vm.stats["dirty_ring_invalid_entries"] == 2


def test_garbage_flags_without_the_reset_bit_stop_the_walk():
    vm, vcpu, base, base2 = malformed_setup(SimpleArch())
    vcpu.dirty_ring.entries["flags"][4] = 0xFFFFFFFD   # RESET bit clear
    assert vm.reset_dirty_rings() == 4
    vcpu.dirty_ring.entries["flags"][4] = RESET
    assert vm.reset_dirty_rings() == 6


def test_unchecked_offsets_would_protect_outside_the_slot(monkeypatch):
    """The pre-2026 check alone (``offset + __fls(mask)`` in u64) lets a wrapped
    offset through: the reset hands the arch an offset outside the slot."""

    def pre_2026(kvm, slot, offset, mask):
        ms = kvm.id_to_memslot(slot >> 16, slot & 0xFFFF)
        if ms is None or ((offset + dirty_ring.fls(mask)) & U64) >= ms.npages:
            return None
        return ms

    monkeypatch.setattr(dirty_ring, "reset_target", pre_2026)
    plugin = RecordingArch()
    vm, vcpu, base, base2 = wrapped_setup(plugin)
    vm.reset_dirty_rings()
    assert plugin.calls == [(1, WRAP - (1 << 64), 1 | 1 << 63)]   # base_gfn - 63: the slot before


def test_a_reset_that_skips_validation_protects_the_next_slot(monkeypatch):
    monkeypatch.setattr(dirty_ring, "reset_target",
                        lambda kvm, slot, offset, mask: kvm.id_to_memslot(slot >> 16, slot & 0xFFFF))
    vm, vcpu, base, base2 = malformed_setup(SimpleArch())
    entries = vcpu.dirty_ring.entries
    entries["offset"][3] = 100 + 5             # page 5 of slot 2
    entries["flags"][:10] = RESET
    vm.reset_dirty_rings()
    assert 5 not in writable(vm, base2, range(200))


def test_a_skipped_entry_leaves_its_page_writable_and_unlogged():
    """What a VMM sees when it corrupts an entry: that page is not re-armed."""
    vm, vcpu, base, base2 = malformed_setup(SimpleArch())
    entries = vcpu.dirty_ring.entries
    entries["slot"][9] = 7                     # page 9's entry names a slot that does not exist
    entries["flags"][:10] = RESET
    assert vm.reset_dirty_rings() == 10
    vcpu.write_many(page_gpas(vm, base, range(10)), 2)
    assert offsets_of(vcpu.harvest_dirty_ring()) == list(range(9))
