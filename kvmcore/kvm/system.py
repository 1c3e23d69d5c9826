"""Opening ``/dev/kvm`` (the "system" fd) and saying why it cannot be used.

Only ``KVM_GET_API_VERSION``, ``KVM_CREATE_VM``, ``KVM_GET_VCPU_MMAP_SIZE`` and
``KVM_GET_SUPPORTED_CPUID`` are issued on it; the VM closes it once created.
"""

from __future__ import annotations

import errno
import os
import platform

from kvmcore.errors import KvmError
from kvmcore.kvm.ioctls import (
    KVM_API_VERSION,
    KVM_GET_API_VERSION,
    KVM_GET_SUPPORTED_CPUID,
    cpuid2_buffer,
    kvm_ioctl,
)

DEV_KVM = "/dev/kvm"
X86_64_MACHINES = ("x86_64", "amd64")


def open_system() -> int:
    """Open ``/dev/kvm`` on an x86-64 host and check the API version; return the fd.

    Raises ``KvmError(ENODEV)`` for a non x86-64 host or a foreign API version, and
    ``KvmError(<errno of open>)`` when the device cannot be opened.
    """
    machine = platform.machine()
    if machine.lower() not in X86_64_MACHINES:
        raise KvmError(
            errno.ENODEV, f"the kvm backend drives x86-64 KVM only; this host is {machine or 'unknown'}"
        )
    try:
        fd = os.open(DEV_KVM, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise KvmError(exc.errno, f"cannot open {DEV_KVM}: {exc.strerror}") from None
    try:
        version = kvm_ioctl(fd, KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION", DEV_KVM)
        if version != KVM_API_VERSION:
            raise KvmError(
                errno.ENODEV, f"{DEV_KVM} speaks KVM API {version}, this backend speaks {KVM_API_VERSION}"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def kvm_available() -> tuple[bool, str]:
    """``(True, description)`` if a VM can be created here, else ``(False, why not)``."""
    try:
        fd = open_system()
    except KvmError as exc:
        return False, exc.strerror
    os.close(fd)
    return True, f"{DEV_KVM} opens (KVM API {KVM_API_VERSION}, {platform.machine()})"


def supported_cpuid(system_fd: int):
    """``KVM_GET_SUPPORTED_CPUID``, growing the buffer while the kernel says ``E2BIG``."""
    nent = 64
    while True:
        buf = cpuid2_buffer(nent)
        try:
            kvm_ioctl(system_fd, KVM_GET_SUPPORTED_CPUID, buf, "KVM_GET_SUPPORTED_CPUID", f"{nent} entries")
            return buf
        except KvmError as exc:
            if exc.errno != errno.E2BIG or nent >= 4096:
                raise
            nent *= 2
