"""A real KVM virtual machine (``KVM_CREATE_VM``) behind kvmcore's VM API.

Memslots, dirty logs and capabilities are the kernel's: every call here is one
ioctl on the VM fd, and its errno is the kernel's.  The only state kept in Python
is what the kernel needs from userspace: the host memory behind each slot (so
``KVM_GET_DIRTY_LOG`` gets a buffer of the slot's size and a deleted slot's memory
can be unmapped) and the guest program's private slot.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import weakref
from typing import Any, Mapping

import attrs
import numpy as np

from kvmcore import uapi
from kvmcore.errors import KvmError
from kvmcore.kvm import guest
from kvmcore.kvm.hostmem import HostMemory
from kvmcore.kvm.ioctls import (
    KVM_CAP_BINARY_STATS_FD,
    KVM_CHECK_EXTENSION,
    KVM_CLEAR_DIRTY_LOG,
    KVM_CREATE_VM,
    KVM_ENABLE_CAP,
    KVM_GET_DIRTY_LOG,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_RESET_DIRTY_RINGS,
    KVM_SET_USER_MEMORY_REGION,
    kvm_clear_dirty_log,
    kvm_dirty_log,
    kvm_enable_cap,
    kvm_ioctl,
    kvm_userspace_memory_region,
)
from kvmcore.kvm.stats import StatsFile
from kvmcore.kvm.system import open_system, supported_cpuid
from kvmcore.kvm.vcpu import RealVcpu

__all__ = ["RealVm", "RealVcpu"]

DEFAULT_MAX_VCPUS = 16
_U32_MAX = (1 << 32) - 1
_U64_MAX = (1 << 64) - 1
_SLOT_ID_MASK = 0xFFFF  # struct kvm_userspace_memory_region.slot: as_id << 16 | id


def _uint(name: str, value: int, limit: int) -> int:
    """``value`` as the unsigned uapi field ``name``; refuse what C would truncate."""
    value = int(value)
    if not 0 <= value <= limit:
        raise ValueError(f"{name}={value} does not fit its __u{limit.bit_length()} field")
    return value


@attrs.define
class _Slot:
    """What userspace must remember about one memslot: its host memory and shape."""

    guest_phys_addr: int
    memory_size: int
    flags: int
    mem: HostMemory

    @property
    def npages(self) -> int:
        return self.memory_size // guest.PAGE_SIZE

    @property
    def bitmap_words(self) -> int:
        return -(-self.npages // 64)


def _release_slots(slots: dict[int, _Slot]) -> None:
    """Unmap every user slot's host memory (teardown; no reference to the VM object)."""
    for entry in slots.values():
        entry.mem.close()
    slots.clear()


class RealVm:
    """An x86 VM on ``/dev/kvm``; see docs/kvm-backend.md."""

    arch = "x86"
    page_size = guest.PAGE_SIZE
    bits_per_long = 64
    backend = "kvm"

    def __init__(self, *, max_vcpus: int = DEFAULT_MAX_VCPUS) -> None:
        if max_vcpus < 1:
            raise ValueError("max_vcpus must be at least 1")
        self._lock = threading.Lock()  # the slot table and each GET/CLEAR against it
        self._slots: dict[int, _Slot] = {}
        self._vcpus: list[RealVcpu] = []
        self.dirty_ring_size = 0  # bytes per vCPU ring, once KVM_CAP_DIRTY_LOG_RING is enabled
        self._stats: StatsFile | None = None
        self._teardown = contextlib.ExitStack()
        self._finalizer = weakref.finalize(self, self._teardown.close)
        try:
            self._create(max_vcpus)
            self._teardown.callback(_release_slots, self._slots)  # runs first (LIFO)
        except BaseException:
            self._teardown.close()
            raise

    def _create(self, max_vcpus: int) -> None:
        system_fd = open_system()
        try:
            self._fd = kvm_ioctl(system_fd, KVM_CREATE_VM, 0, "KVM_CREATE_VM", "machine type 0")
            self._teardown.callback(os.close, self._fd)
            self._mmap_size = kvm_ioctl(
                system_fd, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE", "/dev/kvm"
            )
            self._cpuid = supported_cpuid(system_fd)
        finally:
            os.close(system_fd)
        self.capabilities: dict[str, int] = {
            name: self._check_extension(getattr(uapi, name))
            for name in sorted(vars(uapi))
            if name.startswith("KVM_CAP_")
        }
        self._has_stats = self._check_extension(KVM_CAP_BINARY_STATS_FD) > 0
        if self._has_stats:
            self._stats = StatsFile(self._fd, "vm")
            self._teardown.callback(self._stats.close)
        # Guest program: private slot at 64 GiB and its read-only doorbell page right
        # after it, with the last two slot ids the kernel allows.
        nr_memslots = self.capabilities["KVM_CAP_NR_MEMSLOTS"]
        self.private_slot = nr_memslots - 1
        self.doorbell_slot = nr_memslots - 2
        self._layout = guest.GuestLayout(max_vcpus=max_vcpus, gbpages=self._cpuid_has_gbpages())
        self._private = HostMemory(self._layout.private_size)
        self._teardown.callback(self._private.close)
        for offset, blob in guest.image(self._layout).items():
            self._private.write(offset, blob)
        self._set_region(
            self.private_slot, 0, guest.PRIVATE_BASE, self._layout.private_size, self._private.addr
        )
        self._doorbell = HostMemory(guest.PAGE_SIZE)
        self._teardown.callback(self._doorbell.close)
        self._set_region(
            self.doorbell_slot,
            uapi.KVM_MEM_READONLY,
            self._layout.doorbell_gpa,
            guest.PAGE_SIZE,
            self._doorbell.addr,
        )

    def _check_extension(self, cap: int) -> int:
        return kvm_ioctl(self._fd, KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION", f"cap {cap}")

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd, as the model's ``check_extension``."""
        self._check_open()
        return self._check_extension(cap)

    def _cpuid_has_gbpages(self) -> bool:
        entries = self._cpuid.entries[: self._cpuid.nent]
        return any(
            e.function == guest.CPUID_EXT_FEATURES and e.edx & guest.CPUID_EDX_PDPE1GB for e in entries
        )

    @property
    def guest_page_size(self) -> int:
        """Size of the guest program's identity-map pages: 1 GiB with pdpe1gb, else 2 MiB."""
        return guest.GIB if self._layout.gbpages else 2 * guest.MIB

    # --- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Close vCPUs, stats and VM fds and unmap all host memory (idempotent)."""
        for vcpu in self._vcpus:
            vcpu.close()
        with self._lock:
            self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> RealVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("VM is closed")

    # --- memslots ----------------------------------------------------------------------

    def _refuse_private(self, slot: int, call: str) -> None:
        if slot in (self.private_slot, self.doorbell_slot):
            raise KvmError(
                errno.EINVAL,
                f"{call}: slot {slot} is reserved by the kvm backend for its guest program "
                f"(user slots are 0..{self.doorbell_slot - 1})",
            )

    def _set_region(self, slot: int, flags: int, gpa: int, size: int, addr: int) -> None:
        region = kvm_userspace_memory_region(
            slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=size, userspace_addr=addr
        )
        kvm_ioctl(
            self._fd,
            KVM_SET_USER_MEMORY_REGION,
            region,
            "KVM_SET_USER_MEMORY_REGION",
            f"slot {slot} gpa {gpa:#x} size {size:#x} flags {flags:#x}",
        )

    def set_user_memory_region(
        self,
        slot: int,
        guest_phys_addr: int,
        memory_size: int,
        flags: int = 0,
        host_page_size: int | None = None,
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION`` with fresh anonymous host memory for a new slot.

        A new slot gets ``memory_size`` bytes of host memory (see :mod:`.hostmem` for
        ``host_page_size``).  On an existing slot the call keeps the slot's memory and
        the kernel decides: a flags change, a move, or its errno for anything else
        (e.g. ``EINVAL`` for a size change); ``host_page_size`` is then ignored.
        ``memory_size`` 0 deletes the slot; its host memory is unmapped once the
        kernel has accepted the delete.
        """
        self._check_open()
        slot = _uint("slot", slot, _U32_MAX)
        flags = _uint("flags", flags, _U32_MAX)
        gpa = _uint("guest_phys_addr", guest_phys_addr, _U64_MAX)
        size = _uint("memory_size", memory_size, _U64_MAX)
        self._refuse_private(slot, "KVM_SET_USER_MEMORY_REGION")
        with self._lock:
            old = self._slots.get(slot)
            if size == 0:  # delete: the kernel says whether there is anything to delete
                self._set_region(slot, flags, gpa, 0, old.mem.addr if old else 0)
                if old is not None:
                    del self._slots[slot]
                    old.mem.close()
                return
            if old is not None:  # flags change or move of the same host memory
                self._set_region(slot, flags, gpa, size, old.mem.addr)
                old.guest_phys_addr, old.flags = gpa, flags
                return
            if size > uapi.KVM_MEM_MAX_NR_PAGES * guest.PAGE_SIZE:
                raise KvmError(
                    errno.EINVAL,
                    f"KVM_SET_USER_MEMORY_REGION: slot {slot}: {size:#x} bytes exceed "
                    f"KVM_MEM_MAX_NR_PAGES ({uapi.KVM_MEM_MAX_NR_PAGES}) pages",
                )
            mem = HostMemory(size, host_page_size)
            try:
                self._set_region(slot, flags, gpa, size, mem.addr)
            except BaseException:
                mem.close()
                raise
            self._slots[slot] = _Slot(gpa, size, flags, mem)

    def memory(self, slot: int) -> np.ndarray:
        """A writable ``uint8`` view of the slot's host memory; host writes are not logged."""
        self._check_open()
        self._refuse_private(slot, "memory")
        with self._lock:
            entry = self._slots.get(slot)
            if entry is None:
                raise KvmError(errno.ENOENT, f"memory: slot {slot} has no memory region")
            return entry.mem.view()

    def translate(self, gpa: int) -> Any:
        raise NotImplementedError("the kernel does not expose its stage-2 tables")

    # --- dirty logging -----------------------------------------------------------------

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> int:
        """``KVM_ENABLE_CAP`` on the VM fd with ``args`` in ``args[0..3]``.

        Enabling ``KVM_CAP_DIRTY_LOG_RING`` (or ``_ACQ_REL``) records the ring size
        (``args[0]`` as the kernel's u32) so each later vCPU maps its ring.
        """
        self._check_open()
        if len(args) > 4:
            raise ValueError("struct kvm_enable_cap has 4 args")
        req = kvm_enable_cap(cap=_uint("cap", cap, _U32_MAX), flags=_uint("flags", flags, _U32_MAX))
        for i, arg in enumerate(args):
            req.args[i] = _uint(f"args[{i}]", arg, _U64_MAX)
        result = kvm_ioctl(
            self._fd, KVM_ENABLE_CAP, req, "KVM_ENABLE_CAP", f"cap {cap} args {list(args)}"
        )
        if cap in (uapi.KVM_CAP_DIRTY_LOG_RING, uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL):
            self.dirty_ring_size = req.args[0] & _U32_MAX
        return result

    def get_dirty_log(self, slot: int) -> np.ndarray:
        """``KVM_GET_DIRTY_LOG``: ``ceil(npages/64)`` uint64 words, bit ``i%64`` of word ``i//64`` = page i.

        Without manual protect the kernel also resets the log and write-protects the
        pages it reports; with it, only ``clear_dirty_log`` does that.
        """
        self._check_open()
        slot = _uint("slot", slot, _U32_MAX)
        self._refuse_private(slot, "KVM_GET_DIRTY_LOG")
        with self._lock:  # the buffer must match the slot the kernel sees
            entry = self._slots.get(slot)
            bitmap = np.zeros(max(entry.bitmap_words if entry else 0, 1), dtype=np.uint64)
            req = kvm_dirty_log(slot=slot, dirty_bitmap=bitmap.ctypes.data)
            kvm_ioctl(self._fd, KVM_GET_DIRTY_LOG, req, "KVM_GET_DIRTY_LOG", f"slot {slot}")
        return bitmap

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: Any) -> None:
        """``KVM_CLEAR_DIRTY_LOG``: clear (and re-protect) the pages whose bit is set.

        ``bitmap`` holds uint64 words for pages ``first_page ..``; words missing at the
        end count as zero (nothing cleared there), so the kernel never reads past it.
        """
        self._check_open()
        slot = _uint("slot", slot, _U32_MAX)
        first_page = _uint("first_page", first_page, _U64_MAX)
        num_pages = _uint("num_pages", num_pages, _U32_MAX)
        self._refuse_private(slot, "KVM_CLEAR_DIRTY_LOG")
        words = np.asarray(bitmap, dtype=np.uint64).reshape(-1)
        with self._lock:
            entry = self._slots.get(slot)
            # The kernel reads ALIGN(num_pages, 64) / 8 bytes only after checking the
            # range against the slot, so a slot-sized buffer always suffices.
            needed = min(-(-num_pages // 64), entry.bitmap_words if entry else 0)
            buffer = np.zeros(max(needed, words.size, 1), dtype=np.uint64)
            buffer[: words.size] = words
            req = kvm_clear_dirty_log(
                slot=slot, num_pages=num_pages, first_page=first_page, dirty_bitmap=buffer.ctypes.data
            )
            kvm_ioctl(
                self._fd,
                KVM_CLEAR_DIRTY_LOG,
                req,
                "KVM_CLEAR_DIRTY_LOG",
                f"slot {slot} first_page {first_page} num_pages {num_pages}",
            )

    def reset_dirty_rings(self) -> int:
        """``KVM_RESET_DIRTY_RINGS``: the kernel resets the entries harvested (RESET) in
        every vCPU's ring, re-protects their pages and returns how many it reset."""
        self._check_open()
        return kvm_ioctl(self._fd, KVM_RESET_DIRTY_RINGS, 0, "KVM_RESET_DIRTY_RINGS", "vm")

    # --- vCPUs and stats ---------------------------------------------------------------

    def create_vcpu(self, vcpu_id: int = 0) -> RealVcpu:
        """``KVM_CREATE_VCPU`` plus long-mode setup; the vCPU gets its own guest window."""
        self._check_open()
        window = len(self._vcpus)
        if window >= self._layout.max_vcpus:
            raise KvmError(
                errno.ENOSPC,
                f"KVM_CREATE_VCPU: the guest program has {self._layout.max_vcpus} vCPU windows; "
                "open the VM with a larger max_vcpus",
            )
        vcpu = RealVcpu(
            self._fd,
            _uint("vcpu_id", vcpu_id, _U32_MAX),
            window,
            self._layout,
            self._private,
            self._cpuid,
            self._mmap_size,
            self._has_stats,
            self.dirty_ring_size,
        )
        self._vcpus.append(vcpu)
        return vcpu

    @property
    def vcpus(self) -> tuple[RealVcpu, ...]:
        return tuple(self._vcpus)

    @property
    def stats(self) -> Mapping[str, int]:
        """Kernel binary stats: VM stats and the sum over vCPUs, by kernel name.

        Adds ``tlb_flushes`` (VM ``remote_tlb_flush``).  There is no write-fault
        counter in the kernel's stats (``pf_taken``/``pf_fixed`` count every MMU
        fault), so no ``write_faults`` is derived.  Empty without KVM_CAP_BINARY_STATS_FD.
        """
        self._check_open()
        totals: dict[str, int] = {}
        for vcpu in self._vcpus:
            for name, value in vcpu.stats().items():
                totals[name] = totals.get(name, 0) + value
        if self._stats is not None:
            totals.update(self._stats.read())
        if "remote_tlb_flush" in totals:
            totals["tlb_flushes"] = totals["remote_tlb_flush"]
        return totals
