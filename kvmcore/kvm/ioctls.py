"""The KVM ioctl ABI: request numbers, ``ctypes`` mirrors of the uapi structs, one call.

Everything here mirrors ``include/uapi/linux/kvm.h`` and
``arch/x86/include/uapi/asm/kvm.h`` (x86-64 layout).  The request numbers are
computed with the same ``_IOC`` encoding as ``include/uapi/asm-generic/ioctl.h``
so that no number is copied by hand.  :func:`kvm_ioctl` is the only place an
ioctl is issued: it turns every failure into :class:`~kvmcore.errors.KvmError`
with the kernel's own errno and the ioctl's name.
"""

from __future__ import annotations

import ctypes
import fcntl
from typing import Any

from kvmcore.errors import KvmError

# --- include/uapi/asm-generic/ioctl.h -------------------------------------------------

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, struct: type) -> int:
    return _IOC(_IOC_READ, type_, nr, ctypes.sizeof(struct))


def _IOW(type_: int, nr: int, struct: type) -> int:
    return _IOC(_IOC_WRITE, type_, nr, ctypes.sizeof(struct))


def _IOWR(type_: int, nr: int, struct: type) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, ctypes.sizeof(struct))


KVMIO = 0xAE
KVM_API_VERSION = 12

# --- structs (include/uapi/linux/kvm.h) -----------------------------------------------

u8, u16, u32, u64, s16 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int16


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class kvm_dirty_log(ctypes.Structure):
    """``dirty_bitmap`` is a union with ``__u64 padding2``: a pointer stored as a u64."""

    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class kvm_clear_dirty_log(ctypes.Structure):
    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("dirty_bitmap", u64)]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_stats_header(ctypes.Structure):
    _fields_ = [
        ("flags", u32),
        ("name_size", u32),
        ("num_desc", u32),
        ("id_offset", u32),
        ("desc_offset", u32),
        ("data_offset", u32),
    ]


class kvm_stats_desc(ctypes.Structure):
    """Fixed part; ``name[name_size]`` follows each descriptor in the stats file."""

    _fields_ = [
        ("flags", u32),
        ("exponent", s16),
        ("size", u16),
        ("offset", u32),
        ("bucket_size", u32),
    ]


KVM_STATS_TYPE_MASK = 0xF
KVM_STATS_TYPE_CUMULATIVE = 0x0
KVM_STATS_TYPE_INSTANT = 0x1
KVM_STATS_TYPE_PEAK = 0x2


# struct kvm_run: only the fixed head and the exit union members this backend reads.
class kvm_run_io(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class kvm_run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_exit(ctypes.Union):
    _fields_ = [
        ("io", kvm_run_io),
        ("mmio", kvm_run_mmio),
        ("fail_entry", kvm_run_fail_entry),
        ("internal", kvm_run_internal),
        ("padding", ctypes.c_char * 256),
    ]


class kvm_run(ctypes.Structure):
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", kvm_run_exit),
    ]


# --- x86 structs (arch/x86/include/uapi/asm/kvm.h) ------------------------------------


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, u64)
        for name in (
            "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()
        )
    ]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class kvm_cpuid2(ctypes.Structure):
    """Header only; ``entries[nent]`` follow (see :func:`cpuid2_buffer`)."""

    _fields_ = [("nent", u32), ("padding", u32)]


def cpuid2_buffer(nent: int) -> ctypes.Structure:
    """A ``struct kvm_cpuid2`` with room for ``nent`` entries, as one ctypes object."""

    class _cpuid2(ctypes.Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * nent)]

    buf = _cpuid2()
    buf.nent = nent
    return buf


# --- request numbers ------------------------------------------------------------------

# /dev/kvm
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, kvm_cpuid2)
# VM fd
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_ENABLE_CAP = _IOW(KVMIO, 0xA3, kvm_enable_cap)
KVM_CLEAR_DIRTY_LOG = _IOWR(KVMIO, 0xC0, kvm_clear_dirty_log)
KVM_RESET_DIRTY_RINGS = _IO(KVMIO, 0xC7)
KVM_GET_STATS_FD = _IO(KVMIO, 0xCE)  # VM and vCPU fds
# vCPU fd
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, kvm_cpuid2)

# Capabilities this backend uses that kvmcore.uapi does not list.
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_BINARY_STATS_FD = 203


def kvm_ioctl(fd: int, request: int, arg: Any, name: str, what: str) -> int:
    """Issue one ioctl; a failure becomes ``KvmError(kernel errno, "<name>: <what>")``.

    ``arg`` is an int or a ctypes object; a ctypes object is passed by address so the
    kernel reads and writes it in place (``fcntl.ioctl`` with a mutable buffer).  The
    GIL is released for the duration of the call, so a vCPU blocked in ``KVM_RUN``
    does not stop other threads.
    """
    try:
        if isinstance(arg, int):
            return fcntl.ioctl(fd, request, arg)
        return fcntl.ioctl(fd, request, memoryview(arg).cast("B"), True)
    except OSError as exc:
        raise KvmError(exc.errno, f"{name}: {what}: {exc.strerror}") from None
