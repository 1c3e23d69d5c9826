"""The real-KVM backend against the running kernel (skipped where /dev/kvm is unusable).

Errnos asserted here are the kernel's own: every one is what the ioctl returned.
"""

from __future__ import annotations

import errno
import gc
import os
import threading

import numpy as np
import pytest

from kvmcore import uapi
from kvmcore.errors import KvmError
from kvmcore.kvm import kvm_available, open_vm, system

pytestmark = pytest.mark.arch("x86")  # the real kernel is an x86 host

LOG = uapi.KVM_MEM_LOG_DIRTY_PAGES
PROTECT2 = uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
ENABLE = uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
INITIALLY_SET = uapi.KVM_DIRTY_LOG_INITIALLY_SET
PAGE = 4096
NPAGES = 16384 + 3  # 64 MiB and 3 pages: the last bitmap word is partial
BASE = 1 << 32  # user slot GPA (4 GiB)


# --- fixtures ---------------------------------------------------------------------------



@pytest.fixture
def vm(kvm):
    with open_vm("x86") as machine:
        yield machine


@pytest.fixture
def vcpu(vm):
    return vm.create_vcpu(0)


def dirty_pages(bitmap: np.ndarray, npages: int) -> np.ndarray:
    """Page indices whose bit is set; asserts no bit beyond ``npages`` is."""
    bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")
    assert not bits[npages:].any(), "bits set past the end of the slot"
    return np.flatnonzero(bits[:npages])


def bitmap_of(pages: np.ndarray, npages: int) -> np.ndarray:
    bits = np.zeros(-(-npages // 64) * 64, dtype=np.uint8)
    bits[pages] = 1
    return np.packbits(bits, bitorder="little").view(np.uint64)


def gpas_of(pages: np.ndarray, base: int = BASE) -> np.ndarray:
    return base + pages.astype(np.uint64) * np.uint64(PAGE)


def random_pages(rng: np.random.Generator, npages: int, count: int) -> np.ndarray:
    return np.sort(rng.choice(npages, size=count, replace=False))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- without /dev/kvm -------------------------------------------------------------------


def test_other_arch_is_einval():
    with pytest.raises(KvmError) as info:
        open_vm("arm64")
    assert info.value.errno == errno.EINVAL
    assert "x86" in str(info.value)


def test_unavailable_reasons(monkeypatch):
    monkeypatch.setattr(system.platform, "machine", lambda: "aarch64")
    ok, reason = kvm_available()
    assert not ok and "x86-64" in reason and "aarch64" in reason
    with pytest.raises(KvmError) as info:
        open_vm("x86")
    assert info.value.errno == errno.ENODEV

    monkeypatch.setattr(system.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(system, "DEV_KVM", "/nonexistent/kvm")
    ok, reason = kvm_available()
    assert not ok and "/nonexistent/kvm" in reason
    with pytest.raises(KvmError) as info:
        open_vm("x86")
    assert info.value.errno == errno.ENOENT


# --- VM basics --------------------------------------------------------------------------


def test_identity_and_capabilities(vm):
    assert (vm.arch, vm.page_size, vm.bits_per_long, vm.backend) == ("x86", 4096, 64, "kvm")
    caps = vm.capabilities
    assert set(caps) == {name for name in vars(uapi) if name.startswith("KVM_CAP_")}
    assert all(isinstance(v, int) for v in caps.values())
    assert caps["KVM_CAP_USER_MEMORY"] == 1
    assert caps["KVM_CAP_NR_MEMSLOTS"] > 2
    assert caps["KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"] & ENABLE
    assert vm.private_slot == caps["KVM_CAP_NR_MEMSLOTS"] - 1


def test_translate_is_not_available(vm):
    with pytest.raises(NotImplementedError, match="stage-2"):
        vm.translate(0)


def test_stats_from_the_kernel(vm, vcpu):
    vm.set_user_memory_region(0, BASE, 64 * PAGE, LOG)
    before = vm.stats
    assert "tlb_flushes" in before and "remote_tlb_flush" in before and "pf_taken" in before
    assert vcpu.write_many(gpas_of(np.arange(64)), 1) == 64
    after = vm.stats
    assert after["pf_taken"] >= before["pf_taken"] + 64  # one MMU fault per first store
    assert after["exits"] > before["exits"]


# --- errnos straight from the kernel ----------------------------------------------------


@pytest.mark.parametrize(
    ("gpa", "size"), [(BASE + 1, PAGE), (BASE, PAGE + 1), (BASE + 2048, 2 * PAGE)]
)
def test_unaligned_region_is_einval(vm, gpa, size):
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region(0, gpa, size)
    assert info.value.errno == errno.EINVAL
    assert "KVM_SET_USER_MEMORY_REGION" in str(info.value)


def test_overlapping_slot_is_eexist(vm):
    vm.set_user_memory_region(0, BASE, 16 * PAGE)
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region(1, BASE + 8 * PAGE, 16 * PAGE)
    assert info.value.errno == errno.EEXIST


def test_get_without_logging_is_enoent(vm):
    vm.set_user_memory_region(0, BASE, 16 * PAGE)
    for slot in (0, 5):  # a slot without logging, and a valid id with no slot
        with pytest.raises(KvmError) as info:
            vm.get_dirty_log(slot)
        assert info.value.errno == errno.ENOENT


@pytest.mark.parametrize("slot", ["nr_memslots", 1 << 16, 40000])
def test_bad_slot_id_is_einval(vm, slot):
    if slot == "nr_memslots":
        slot = vm.capabilities["KVM_CAP_NR_MEMSLOTS"]
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region(slot, BASE, PAGE)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(KvmError) as info:
        vm.get_dirty_log(slot)
    assert info.value.errno == errno.EINVAL


def test_reserved_slots_are_refused(vm):
    for slot in (vm.private_slot, vm.doorbell_slot):
        with pytest.raises(KvmError, match="reserved") as info:
            vm.set_user_memory_region(slot, BASE, PAGE)
        assert info.value.errno == errno.EINVAL
        with pytest.raises(KvmError, match="reserved"):
            vm.get_dirty_log(slot)


def test_delete_missing_slot_and_resize_are_einval(vm):
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region(3, BASE, 0)
    assert info.value.errno == errno.EINVAL
    vm.set_user_memory_region(3, BASE, 16 * PAGE)
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region(3, BASE, 32 * PAGE)
    assert info.value.errno == errno.EINVAL


def test_clear_first_page_not_multiple_of_64_is_einval(vm):
    vm.enable_cap(PROTECT2, ENABLE)
    vm.set_user_memory_region(0, BASE, 256 * PAGE, LOG)
    with pytest.raises(KvmError) as info:
        vm.clear_dirty_log(0, 1, 63, [0])
    assert info.value.errno == errno.EINVAL
    with pytest.raises(KvmError) as info:  # num_pages not a multiple of 64 short of the end
        vm.clear_dirty_log(0, 0, 63, [0])
    assert info.value.errno == errno.EINVAL


def test_initially_set_alone_is_einval(vm):
    with pytest.raises(KvmError) as info:
        vm.enable_cap(PROTECT2, INITIALLY_SET)
    assert info.value.errno == errno.EINVAL
    assert vm.enable_cap(PROTECT2, ENABLE | INITIALLY_SET) == 0


def test_reset_dirty_rings_without_a_ring_is_einval(vm):
    with pytest.raises(KvmError) as info:
        vm.reset_dirty_rings()
    assert info.value.errno == errno.EINVAL


def test_duplicate_vcpu_is_eexist(vm, vcpu):
    with pytest.raises(KvmError) as info:
        vm.create_vcpu(0)
    assert info.value.errno == errno.EEXIST


# --- dirty logging: exactly the pages the guest wrote -----------------------------------


def test_exact_dirty_set(vm, vcpu):
    vm.set_user_memory_region(0, BASE, NPAGES * PAGE, LOG)
    rng = np.random.default_rng(2024)
    assert dirty_pages(vm.get_dirty_log(0), NPAGES).size == 0
    for round_ in range(4):
        pages = random_pages(rng, NPAGES, 1500)
        pages[-1] = NPAGES - 1  # the partial last word too
        pages = np.unique(pages)
        order = rng.permutation(pages)
        offsets = np.uint64(8 * (round_ % 512))
        assert vcpu.write_many(gpas_of(order) + offsets, 0xC0FFEE00 + round_) == order.size
        assert vcpu.completed
        bitmap = vm.get_dirty_log(0)
        assert bitmap.dtype == np.uint64 and bitmap.size == -(-NPAGES // 64)
        np.testing.assert_array_equal(dirty_pages(bitmap, NPAGES), pages)
        # Without manual protect the GET reset the log: nothing until the next stores.
        assert dirty_pages(vm.get_dirty_log(0), NPAGES).size == 0


def test_exact_dirty_set_manual_protect(vm, vcpu):
    assert vm.enable_cap(PROTECT2, ENABLE) == 0
    vm.set_user_memory_region(0, BASE, NPAGES * PAGE, LOG)
    rng = np.random.default_rng(7)
    for _ in range(4):
        pages = random_pages(rng, NPAGES, 1200)
        assert vcpu.write_many(gpas_of(rng.permutation(pages)), 1) == pages.size
        bitmap = vm.get_dirty_log(0)
        np.testing.assert_array_equal(dirty_pages(bitmap, NPAGES), pages)
        # Manual protect: GET does not reset; the same set again.
        np.testing.assert_array_equal(dirty_pages(vm.get_dirty_log(0), NPAGES), pages)
        vm.clear_dirty_log(0, 0, NPAGES, bitmap)
        assert dirty_pages(vm.get_dirty_log(0), NPAGES).size == 0


def test_partial_clear_keeps_the_rest(vm, vcpu):
    vm.enable_cap(PROTECT2, ENABLE)
    vm.set_user_memory_region(0, BASE, NPAGES * PAGE, LOG)
    pages = np.array([0, 63, 64, 200, 4095, NPAGES - 1])
    vcpu.write_many(gpas_of(pages), 1)
    vm.clear_dirty_log(0, 64, 192, bitmap_of(np.array([0, 136]), 192))  # pages 64 and 200
    np.testing.assert_array_equal(
        dirty_pages(vm.get_dirty_log(0), NPAGES), [0, 63, 4095, NPAGES - 1]
    )
    # The range may end exactly at the slot's end with num_pages not a multiple of 64.
    last = (NPAGES // 64) * 64
    vm.clear_dirty_log(0, last, NPAGES - last, [~np.uint64(0)])
    np.testing.assert_array_equal(dirty_pages(vm.get_dirty_log(0), NPAGES), [0, 63, 4095])
    # A cleared page is write-protected again: the next store is logged again.
    vcpu.write_many(gpas_of(np.array([200])), 2)
    np.testing.assert_array_equal(dirty_pages(vm.get_dirty_log(0), NPAGES), [0, 63, 200, 4095])


def test_initially_set_reports_every_page_first(vm, vcpu):
    vm.enable_cap(PROTECT2, ENABLE | INITIALLY_SET)
    vm.set_user_memory_region(0, BASE, NPAGES * PAGE, LOG)
    first = vm.get_dirty_log(0)
    np.testing.assert_array_equal(dirty_pages(first, NPAGES), np.arange(NPAGES))
    vm.clear_dirty_log(0, 0, NPAGES, first)
    assert dirty_pages(vm.get_dirty_log(0), NPAGES).size == 0
    pages = random_pages(np.random.default_rng(3), NPAGES, 800)
    vcpu.write_many(gpas_of(pages), 9)
    np.testing.assert_array_equal(dirty_pages(vm.get_dirty_log(0), NPAGES), pages)


def test_clear_without_manual_protect_is_accepted(vm, vcpu):
    """The kernel does not require manual protect for KVM_CLEAR_DIRTY_LOG."""
    vm.set_user_memory_region(0, BASE, 256 * PAGE, LOG)
    vcpu.write_many(gpas_of(np.array([0, 1, 2])), 1)
    vm.clear_dirty_log(0, 0, 256, [0b011])
    np.testing.assert_array_equal(dirty_pages(vm.get_dirty_log(0), 256), [2])


def test_logging_turned_on_later_and_slot_moved(vm, vcpu):
    vm.set_user_memory_region(0, BASE, 64 * PAGE)
    vcpu.write_many(gpas_of(np.arange(8)), 1)
    vm.set_user_memory_region(0, BASE, 64 * PAGE, LOG)  # flags change
    vcpu.write_many(gpas_of(np.array([5, 9])), 2)
    np.testing.assert_array_equal(dirty_pages(vm.get_dirty_log(0), 64), [5, 9])
    vm.set_user_memory_region(0, 2 * BASE, 64 * PAGE, LOG)  # move: same host memory
    assert vcpu.read(2 * BASE + 9 * PAGE, 8) == (2).to_bytes(8, "little")
    vm.set_user_memory_region(0, 2 * BASE, 0)  # delete
    with pytest.raises(KvmError) as info:
        vm.get_dirty_log(0)
    assert info.value.errno == errno.ENOENT


def test_2m_host_pages(vm, vcpu):
    size = 8 << 20
    vm.set_user_memory_region(0, BASE, size, LOG, host_page_size=2 << 20)
    assert vm.memory(0).ctypes.data % (2 << 20) == 0
    pages = random_pages(np.random.default_rng(5), size // PAGE, 300)
    assert vcpu.write_many(gpas_of(pages), 3) == pages.size
    np.testing.assert_array_equal(dirty_pages(vm.get_dirty_log(0), size // PAGE), pages)


def test_1g_host_pages_need_a_hugetlb_pool(vm):
    try:
        vm.set_user_memory_region(0, BASE, 1 << 30, 0, host_page_size=1 << 30)
    except KvmError as exc:
        assert exc.errno == errno.ENOMEM and "1 GiB" in str(exc)
    else:
        assert vm.memory(0).size == 1 << 30


# --- guest stores and loads -------------------------------------------------------------


def test_write_read_round_trip_and_host_view(vm, vcpu):
    vm.set_user_memory_region(0, BASE, 64 * PAGE, LOG)
    data = bytes(range(256)) * 40  # crosses pages
    assert vcpu.write(BASE + 100, data) == len(data)
    assert vcpu.read(BASE + 100, len(data)) == data
    mem = vm.memory(0)
    assert bytes(mem[100 : 100 + len(data)]) == data
    np.testing.assert_array_equal(dirty_pages(vm.get_dirty_log(0), 64), [0, 1, 2])


def test_host_writes_are_not_logged(vm, vcpu):
    vm.set_user_memory_region(0, BASE, 64 * PAGE, LOG)
    mem = vm.memory(0)
    mem[5 * PAGE : 5 * PAGE + 4] = [1, 2, 3, 4]
    assert dirty_pages(vm.get_dirty_log(0), 64).size == 0


def test_loads_of_untouched_pages_are_not_logged(vm, vcpu):
    vm.set_user_memory_region(0, BASE, 64 * PAGE, LOG)
    assert vcpu.read(BASE + 7 * PAGE, 64) == bytes(64)
    assert dirty_pages(vm.get_dirty_log(0), 64).size == 0


def test_load_of_a_host_written_page_may_be_logged(vm, vcpu):
    """The kernel maps a read fault writable when the host page is writable, and a
    writable SPTE in a logged slot is marked dirty at once: the load is logged."""
    vm.set_user_memory_region(0, BASE, 64 * PAGE, LOG)
    vm.memory(0)[5 * PAGE : 5 * PAGE + 4] = [1, 2, 3, 4]
    assert vcpu.read(BASE + 5 * PAGE, 4) == b"\x01\x02\x03\x04"  # the guest sees it
    assert set(dirty_pages(vm.get_dirty_log(0), 64)) <= {5}
    # Once the GET has write-protected it, loading it again is not logged.
    assert vcpu.read(BASE + 5 * PAGE, 4) == b"\x01\x02\x03\x04"
    assert dirty_pages(vm.get_dirty_log(0), 64).size == 0


def test_write_many_stops_at_a_gpa_without_memslot(vm, vcpu):
    vm.set_user_memory_region(0, BASE, 64 * PAGE, LOG)
    hole = 3 * BASE
    gpas = np.array([BASE, BASE + PAGE, hole, BASE + 2 * PAGE], dtype=np.uint64)
    assert vcpu.write_many(gpas, 7) == 2
    assert vcpu.exit_reason == uapi.KVM_EXIT_MMIO and vcpu.exit_gpa == hole
    assert not vcpu.completed
    np.testing.assert_array_equal(dirty_pages(vm.get_dirty_log(0), 64), [0, 1])
    # The vCPU is usable again afterwards.
    assert vcpu.write_many(gpas[3:], 7) == 1 and vcpu.completed
    assert vcpu.read(hole, 8) == b""  # a load there stops too
    assert vcpu.exit_gpa == hole


def test_write_many_stops_at_a_readonly_slot(vm, vcpu):
    vm.set_user_memory_region(0, BASE, 64 * PAGE, LOG)
    vm.set_user_memory_region(1, 2 * BASE, 64 * PAGE, LOG | uapi.KVM_MEM_READONLY)
    gpas = np.array([BASE, 2 * BASE + PAGE, BASE + PAGE], dtype=np.uint64)
    assert vcpu.write_many(gpas, 7) == 1
    assert vcpu.exit_reason == uapi.KVM_EXIT_MMIO and vcpu.exit_gpa == 2 * BASE + PAGE
    assert dirty_pages(vm.get_dirty_log(1), 64).size == 0
    vm.memory(1)[0] = 0x5A
    assert vcpu.read(2 * BASE, 1) == b"\x5a"  # loads from a read-only slot are memory


def test_write_many_chunks_large_arrays(vm, vcpu):
    vm.set_user_memory_region(0, BASE, NPAGES * PAGE, LOG)
    rng = np.random.default_rng(11)
    pages = rng.integers(0, NPAGES, 300_000)  # > 131072 gpas per KVM_RUN
    assert vcpu.write_many(gpas_of(pages), 0x55) == pages.size
    np.testing.assert_array_equal(dirty_pages(vm.get_dirty_log(0), NPAGES), np.unique(pages))


def test_write_many_refuses_unreachable_or_unaligned(vcpu):
    with pytest.raises(ValueError):
        vcpu.write_many([BASE + 4], 1)
    with pytest.raises(ValueError):
        vcpu.write_many([64 << 30], 1)


# --- threads ----------------------------------------------------------------------------


@pytest.mark.parametrize("manual", [False, True], ids=["get-resets", "get-then-clear"])
def test_concurrent_harvest_loses_nothing(vm, vcpu, manual):
    if manual:
        vm.enable_cap(PROTECT2, ENABLE)
    vm.set_user_memory_region(0, BASE, NPAGES * PAGE, LOG)
    rng = np.random.default_rng(99)
    batches = [random_pages(rng, NPAGES, 400) for _ in range(30)]
    written = np.unique(np.concatenate(batches))
    done = threading.Event()
    errors: list[BaseException] = []

    def guest() -> None:
        try:
            for batch in batches:
                assert vcpu.write_many(gpas_of(batch), 1) == batch.size
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            done.set()

    def harvest() -> np.ndarray:
        bitmap = vm.get_dirty_log(0)
        if manual:
            vm.clear_dirty_log(0, 0, NPAGES, bitmap)
        return bitmap

    seen = np.zeros(-(-NPAGES // 64), dtype=np.uint64)
    harvests = 0
    thread = threading.Thread(target=guest)
    thread.start()
    while not done.is_set():
        seen |= harvest()
        harvests += 1
    thread.join()
    seen |= harvest()
    assert not errors
    assert harvests > 1
    np.testing.assert_array_equal(dirty_pages(seen, NPAGES), written)


def test_kvm_run_releases_the_gil(vm, vcpu):
    vm.set_user_memory_region(0, BASE, NPAGES * PAGE, LOG)
    all_pages = np.arange(NPAGES)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (vcpu.write_many(gpas_of(all_pages), 1), done.set()))
    seen = np.zeros(-(-NPAGES // 64), dtype=np.uint64)
    harvests = 0
    thread.start()
    while not done.is_set():  # one write_many is one KVM_RUN: harvest during it
        seen |= vm.get_dirty_log(0)
        harvests += 1
    thread.join()
    seen |= vm.get_dirty_log(0)
    assert harvests > 1
    np.testing.assert_array_equal(dirty_pages(seen, NPAGES), all_pages)


def test_two_vcpus_in_threads(vm):
    vm.set_user_memory_region(0, BASE, NPAGES * PAGE, LOG)
    vcpus = [vm.create_vcpu(0), vm.create_vcpu(1)]
    rng = np.random.default_rng(4)
    pages = rng.permutation(NPAGES)[:4000]
    halves = [np.sort(pages[:2000]), np.sort(pages[2000:])]
    counts: list[int] = [0, 0]

    def run(i: int) -> None:
        for part in np.array_split(halves[i], 10):
            counts[i] += vcpus[i].write_many(gpas_of(part), i + 1)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts == [2000, 2000]
    np.testing.assert_array_equal(dirty_pages(vm.get_dirty_log(0), NPAGES), np.sort(pages))
    words = vm.memory(0).view(np.uint64)
    for i in range(2):
        assert (words[halves[i] * (PAGE // 8)] == i + 1).all()


# --- teardown ---------------------------------------------------------------------------


def test_many_vms_leak_no_fds(kvm):
    with open_vm("x86") as warm:  # first use may open lazily created fds elsewhere
        warm.create_vcpu(0)
    before = open_fds()
    for i in range(25):
        machine = open_vm("x86")
        machine.set_user_memory_region(0, BASE, 16 * PAGE, LOG)
        machine.create_vcpu(i).write_many([BASE], 1)
        machine.get_dirty_log(0)
        machine.close()
        machine.close()  # idempotent
    assert open_fds() == before


def test_finalizer_closes_an_abandoned_vm(kvm):
    before = open_fds()
    machine = open_vm("x86")
    machine.set_user_memory_region(0, BASE, 16 * PAGE)
    machine.create_vcpu(0)
    assert open_fds() > before
    del machine
    gc.collect()
    assert open_fds() == before


def test_closed_vm_refuses_calls_and_views_survive(kvm):
    machine = open_vm("x86")
    machine.set_user_memory_region(0, BASE, 16 * PAGE)
    view = machine.memory(0)
    view[0] = 42
    machine.close()
    assert view[0] == 42  # the mapping lives as long as the view
    with pytest.raises(ValueError):
        machine.get_dirty_log(0)


def test_failed_region_releases_host_memory(vm):
    before = open_fds()
    with pytest.raises(KvmError):
        vm.set_user_memory_region(vm.capabilities["KVM_CAP_NR_MEMSLOTS"], BASE, 16 * PAGE)
    assert open_fds() == before
