"""The real-KVM backend: kvmcore's VM API driven through ``/dev/kvm``.

``kvmcore.create_vm("x86", backend="kvm")`` calls :func:`open_vm`.  Plain Python:
``fcntl.ioctl``, ``mmap`` and ``ctypes``; see docs/kvm-backend.md.
"""

from __future__ import annotations

import errno
from typing import Any

from kvmcore.errors import KvmError
from kvmcore.kvm.system import kvm_available
from kvmcore.kvm.vm import RealVcpu, RealVm

__all__ = ["open_vm", "kvm_available", "RealVm", "RealVcpu"]

SUPPORTED_ARCH = "x86"


def open_vm(arch: str, **options: Any) -> RealVm:
    """A new VM on ``/dev/kvm`` for ``arch`` (only ``"x86"``).

    Options: ``max_vcpus`` (default 16), how many vCPUs the guest program has
    windows for.  Raises ``KvmError(EINVAL)`` for another arch and
    ``KvmError(ENODEV or open's errno)`` where ``/dev/kvm`` cannot be used.
    """
    if arch != SUPPORTED_ARCH:
        raise KvmError(
            errno.EINVAL,
            f"backend 'kvm' supports arch {SUPPORTED_ARCH!r} only (x86-64 hosts), not {arch!r}",
        )
    return RealVm(**options)
