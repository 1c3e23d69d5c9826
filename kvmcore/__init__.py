"""kvmcore: a model of Linux KVM dirty-page logging, per architecture.

``kvmcore.create_vm(arch, **options)`` builds a VM on the model of the named arch, or
on the real kernel with ``backend="kvm"``.  Arch plugins register under the
``kvmcore.arch`` entry-point group and mark their hooks with ``kvmcore.hookimpl``;
``kvmcore.hookspecs`` is their contract.
"""

import errno as _errno
from typing import Any

from kvmcore.archinfo import ArchInfo
from kvmcore.errors import KvmError
from kvmcore.geometry import LAST_LEVEL, Geometry
from kvmcore.plugins import available_archs, get_plugin_manager, hookimpl
from kvmcore.uapi import *  # noqa: F401,F403  (the kernel's names are the API)
from kvmcore.vcpu import ArchBugError, Vcpu
from kvmcore.vm import Translation, Vm

BACKENDS = ("sim", "kvm")


def create_vm(arch: Any, backend: str = "sim", **options: Any):
    """A new VM of ``arch`` (an installed arch's name, or a plugin object).

    ``backend="sim"`` is the model; ``backend="kvm"`` drives the real kernel through
    ``/dev/kvm`` (x86-64 hosts only).  ``options`` are the arch's (see ``kvmcore archs``).
    """
    if backend == "kvm":
        from kvmcore.kvm import open_vm

        return open_vm(arch, **options)
    if backend != "sim":
        raise KvmError(_errno.EINVAL, f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    try:
        pm = get_plugin_manager(arch)
    except ValueError as exc:
        raise KvmError(_errno.EINVAL, str(exc)) from None
    return Vm(pm, options)


__all__ = [
    "ArchBugError", "ArchInfo", "BACKENDS", "Geometry", "KvmError", "LAST_LEVEL", "Translation", "Vcpu",
    "Vm", "available_archs", "create_vm", "get_plugin_manager", "hookimpl",
]
