"""Every bad input gets the kernel's errno, in the kernel's order, and changes nothing."""

import errno

import numpy as np
import pytest

import kvmcore
from helpers import LOG, dirty_pages, page_gpas


def raises(code, fn, *args, **kwargs):
    with pytest.raises(kvmcore.KvmError) as err:
        fn(*args, **kwargs)
    assert err.value.errno == code, str(err.value)
    assert isinstance(err.value, OSError)
    return err.value


@pytest.fixture
def vm(arch):
    vm = kvmcore.create_vm(arch)
    vm.set_user_memory_region(0, 0, 256 * vm.page_size, LOG)
    return vm


def test_memslot_errors(vm):
    ps = vm.page_size
    slots = vm.info.user_mem_slots
    raises(errno.EINVAL, vm.set_user_memory_region, 1, 1 << 30, ps, 1 << 7)              # unknown flag
    raises(errno.EINVAL, vm.set_user_memory_region, 1, 1 << 30, ps + 1)                  # size not aligned
    raises(errno.EINVAL, vm.set_user_memory_region, 1, (1 << 30) + 8, ps)                # gpa not aligned
    raises(errno.EINVAL, vm.set_user_memory_region, slots, 1 << 30, ps)                  # id too big
    raises(errno.EINVAL, vm.set_user_memory_region, vm.info.nr_address_spaces << 16, 1 << 30, ps)
    raises(errno.EEXIST, vm.set_user_memory_region, 1, 255 * ps, 2 * ps)                 # overlaps slot 0
    raises(errno.EINVAL, vm.set_user_memory_region, 5, 0, 0)                             # delete a missing slot
    raises(errno.EINVAL, vm.set_user_memory_region, 0, 0, 512 * ps, LOG)                 # resize
    raises(errno.EINVAL, vm.set_user_memory_region, 0, 0, 256 * ps, LOG | kvmcore.KVM_MEM_READONLY)
    raises(errno.EINVAL, vm.set_user_memory_region, 1, 1 << 30, (kvmcore.KVM_MEM_MAX_NR_PAGES + 1) * ps)
    raises(errno.EINVAL, vm.set_user_memory_region, 1, -ps, ps)
    assert [s.slot for s in vm.memslots] == [0]


def test_userspace_addr_must_be_page_aligned_and_cannot_change(vm):
    ps = vm.page_size
    raises(errno.EINVAL, vm.set_user_memory_region, 1, 1 << 30, ps, userspace_addr=(1 << 40) + 8)
    vm.set_user_memory_region(1, 1 << 30, ps, userspace_addr=(1 << 40) + ps)
    assert vm.memslot(1).userspace_addr == (1 << 40) + ps
    raises(errno.EINVAL, vm.set_user_memory_region, 1, 1 << 30, ps, LOG, userspace_addr=1 << 40)
    vm.set_user_memory_region(1, 1 << 30, ps, LOG)


def test_flags_are_checked_before_overlap(vm):
    raises(errno.EINVAL, vm.set_user_memory_region, 1, 0, vm.page_size, 1 << 7)


def test_moving_onto_another_slot_is_eexist(vm):
    ps = vm.page_size
    vm.set_user_memory_region(1, 1 << 30, 16 * ps)
    raises(errno.EEXIST, vm.set_user_memory_region, 1, 100 * ps, 16 * ps)
    assert vm.memslot(1).base_gfn == (1 << 30) // ps


def test_an_address_space_of_its_own_does_not_overlap(arch):
    vm = kvmcore.create_vm(arch)
    if vm.info.nr_address_spaces < 2:
        pytest.skip(f"arch {vm.arch} has one address space")
    vm.set_user_memory_region(0, 0, 16 * vm.page_size)
    vm.set_user_memory_region(1 << 16, 0, 16 * vm.page_size)
    assert len(vm.memslots) == 2


def test_get_dirty_log_errors(vm):
    raises(errno.EINVAL, vm.get_dirty_log, vm.info.user_mem_slots)
    raises(errno.EINVAL, vm.get_dirty_log, vm.info.nr_address_spaces << 16)
    raises(errno.ENOENT, vm.get_dirty_log, 3)
    vm.set_user_memory_region(3, 1 << 30, vm.page_size)
    raises(errno.ENOENT, vm.get_dirty_log, 3)


def test_clear_dirty_log_checks_in_the_kernels_order(vm):
    words = np.zeros(8, {32: np.uint32, 64: np.uint64}[vm.bits_per_long])
    raises(errno.EINVAL, vm.clear_dirty_log, vm.info.user_mem_slots, 1, 64, words)  # slot before alignment
    raises(errno.EINVAL, vm.clear_dirty_log, 9, 1, 64, words)                        # alignment before ENOENT
    raises(errno.ENOENT, vm.clear_dirty_log, 9, 0, 64, words)
    raises(errno.EINVAL, vm.clear_dirty_log, 0, 320, 0, words)                       # first_page > npages
    raises(errno.EINVAL, vm.clear_dirty_log, 0, 192, 128, words)                     # past the end
    raises(errno.EINVAL, vm.clear_dirty_log, 0, 0, 65, words)                        # not a multiple of 64
    raises(errno.EFAULT, vm.clear_dirty_log, 0, 0, 256, words[:1])                   # bitmap too short
    vm.clear_dirty_log(0, 256, 0, words)                                             # empty, at the end
    vm.clear_dirty_log(0, 0, 0, words)                                               # num_pages 0


def test_clear_accepts_a_partial_word_only_at_the_end_of_the_slot(arch):
    vm = kvmcore.create_vm(arch)
    vm.enable_cap(kvmcore.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, kvmcore.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    npages = 64 * 2 + 3
    vm.set_user_memory_region(0, 0, npages * vm.page_size, LOG)
    vcpu = vm.create_vcpu(0)
    vcpu.write_many(page_gpas(vm, 0, [0, 128, 130]), 1)
    bitmap = vm.get_dirty_log(0)
    raises(errno.EINVAL, vm.clear_dirty_log, 0, 64, 3, bitmap)
    vm.clear_dirty_log(0, 128, 3, bitmap[128 // vm.bits_per_long:])
    assert dirty_pages(vm.get_dirty_log(0)) == {0}


def test_manual_protect_cap_rules(vm):
    cap = kvmcore.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    raises(errno.EINVAL, vm.enable_cap, cap, kvmcore.KVM_DIRTY_LOG_INITIALLY_SET)
    raises(errno.EINVAL, vm.enable_cap, cap, kvmcore.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, flags=1)
    raises(errno.EINVAL, vm.enable_cap, cap, 1 << 5)
    assert vm.manual_dirty_log_protect == 0
    vm.enable_cap(cap, kvmcore.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    assert vm.manual_protect
    vm.enable_cap(cap, 0)
    assert not vm.manual_protect
    raises(errno.EINVAL, vm.enable_cap, 987654)


def test_bad_accesses(vm):
    vcpu = vm.create_vcpu(0)
    raises(errno.EEXIST, vm.create_vcpu, 0)
    raises(errno.EINVAL, vcpu.write_many, np.array([4]), 1)
    raises(errno.EINVAL, vcpu.write_many, np.array([[8]]), 1)
    raises(errno.EFAULT, vcpu.read, 1 << 40, 8)
    raises(errno.EFAULT, vm.write_guest, 1 << 40, b"x")
    assert dirty_pages(vm.get_dirty_log(0)) == set()


def test_unknown_arch_backend_and_option_name_what_is_available(arch):
    err = raises(errno.EINVAL, kvmcore.create_vm, "no-such-arch")
    for name in kvmcore.available_archs():
        assert name in str(err)
    err = raises(errno.EINVAL, kvmcore.create_vm, arch, backend="qemu")
    assert "sim" in str(err) and "kvm" in str(err)
    err = raises(errno.EINVAL, kvmcore.create_vm, arch, no_such_option=1)
    assert "no_such_option" in str(err)
