"""One real vCPU (``KVM_CREATE_VCPU``) running the guest program of :mod:`.guest`.

Each vCPU owns its fd, its ``struct kvm_run`` mapping and its own window of the
private slot (command block + data buffer), so vCPUs can run in their own threads
(``KVM_RUN`` releases the GIL) while another thread reads or clears dirty logs.
A vCPU itself is meant to be driven by one thread at a time.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import struct
import weakref
from typing import Any

import numpy as np

from kvmcore import uapi
from kvmcore.errors import KvmError
from kvmcore.kvm import guest
from kvmcore.kvm.dirty_ring import MappedDirtyRing
from kvmcore.kvm.hostmem import HostMemory
from kvmcore.kvm.ioctls import (
    KVM_CREATE_VCPU,
    KVM_GET_SREGS,
    KVM_RUN,
    KVM_SET_CPUID2,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    kvm_ioctl,
    kvm_regs,
    kvm_run,
    kvm_segment,
    kvm_sregs,
)
from kvmcore.kvm.stats import StatsFile

_U64_MAX = (1 << 64) - 1
_IMMEDIATE_EXIT_OFFSET = kvm_run.immediate_exit.offset


def _flat_segment(seg: kvm_segment, selector: int, type_: int, long_mode: bool) -> None:
    """A present, flat, ring-3 code or data segment for KVM_SET_SREGS."""
    seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, selector, type_
    seg.present, seg.dpl, seg.s, seg.g, seg.avl, seg.unusable = 1, 3, 1, 1, 0, 0
    seg.l, seg.db = (1, 0) if long_mode else (0, 1)


def _long_mode_sregs(sregs: kvm_sregs) -> None:
    """Paging on, PAE, EFER.LME|LMA, 64-bit code: long mode without any boot code."""
    _flat_segment(sregs.cs, guest.SEL_CODE, 0xB, long_mode=True)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _flat_segment(seg, guest.SEL_DATA, 0x3, long_mode=False)
    tr = sregs.tr  # a busy 64-bit TSS (type 0xB), as long mode requires
    tr.base, tr.limit, tr.selector, tr.type = guest.PRIVATE_BASE + guest.TSS_OFFSET, guest.TSS_LIMIT, guest.SEL_TSS, 0xB
    tr.present, tr.dpl, tr.s, tr.l, tr.db, tr.g, tr.avl, tr.unusable = 1, 0, 0, 0, 0, 0, 0, 0
    sregs.gdt.base, sregs.gdt.limit = guest.PRIVATE_BASE + guest.GDT_OFFSET, len(guest.gdt()) - 1
    sregs.idt.base, sregs.idt.limit = 0, 0
    sregs.cr0 = guest.CR0_PE | guest.CR0_MP | guest.CR0_ET | guest.CR0_NE | guest.CR0_PG
    sregs.cr3 = guest.PRIVATE_BASE + guest.PML4_OFFSET
    sregs.cr4 = guest.CR4_PAE
    sregs.efer = guest.EFER_LME | guest.EFER_LMA


class RealVcpu:
    """A vCPU whose guest stores and loads are performed by guest code under ``KVM_RUN``."""

    def __init__(
        self,
        vm_fd: int,
        vcpu_id: int,
        window: int,
        layout: guest.GuestLayout,
        private: HostMemory,
        cpuid: Any,
        mmap_size: int,
        with_stats: bool,
        dirty_ring_size: int = 0,
    ) -> None:
        self.id = vcpu_id
        self._layout = layout
        self._private = private
        self._cmd_offset = layout.window_offset(window)
        self._cmd_gpa = layout.cmd_gpa(window)
        self._data_offset = self._cmd_offset + guest.CMD_SIZE
        self._data_gpa = layout.data_gpa(window)
        self._exit_reason = uapi.KVM_EXIT_UNKNOWN
        self._exit_gpa: int | None = None
        self._completed = False
        self._stale = False  # guest stopped mid-command: complete and reload state first
        self._stats: StatsFile | None = None
        self.dirty_ring: MappedDirtyRing | None = None
        self._teardown = contextlib.ExitStack()
        self._finalizer = weakref.finalize(self, self._teardown.close)
        try:
            self._fd = kvm_ioctl(vm_fd, KVM_CREATE_VCPU, vcpu_id, "KVM_CREATE_VCPU", f"vcpu id {vcpu_id}")
            self._teardown.callback(os.close, self._fd)
            try:
                self._run = mmap.mmap(self._fd, mmap_size, flags=mmap.MAP_SHARED)
            except OSError as exc:
                raise KvmError(exc.errno, f"mmap of struct kvm_run for vcpu {vcpu_id}: {exc.strerror}") from None
            self._teardown.callback(self._run.close)
            if dirty_ring_size:
                self.dirty_ring = MappedDirtyRing(self._fd, dirty_ring_size, guest.PAGE_SIZE)
                self._teardown.callback(self.dirty_ring.close)
            kvm_ioctl(self._fd, KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2", "the host's supported CPUID")
            self._load_state()
            if with_stats:
                self._stats = StatsFile(self._fd, f"vcpu {vcpu_id}")
                self._teardown.callback(self._stats.close)
        except BaseException:
            self._teardown.close()
            raise

    # --- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Unmap ``struct kvm_run`` and close the vCPU fds (idempotent)."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> RealVcpu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- state -------------------------------------------------------------------------

    @property
    def exit_reason(self) -> int:
        """``struct kvm_run.exit_reason`` of the last ``KVM_RUN`` (kvmcore.uapi ``KVM_EXIT_*``).

        A command that ran to completion ends with the guest's doorbell store, so
        this is then ``KVM_EXIT_MMIO`` with :attr:`exit_gpa` the doorbell; see
        :attr:`completed` to tell it from a store to a GPA without a memslot.
        """
        return self._exit_reason

    @property
    def exit_gpa(self) -> int | None:
        """``kvm_run.mmio.phys_addr`` of the last exit if it was ``KVM_EXIT_MMIO``, else None."""
        return self._exit_gpa

    @property
    def completed(self) -> bool:
        """Whether the last command ran to completion (exit at the doorbell)."""
        return self._completed

    def stats(self) -> dict[str, int]:
        """This vCPU's binary stats by kernel name ({} without KVM_CAP_BINARY_STATS_FD)."""
        return self._stats.read() if self._stats is not None and not self.closed else {}

    def harvest_dirty_ring(self) -> np.ndarray:
        """Collect this vCPU's dirty ring from the mapping: ``(slot, offset)`` of each
        entry the kernel pushed since the last harvest, in order, each marked RESET
        for the next ``vm.reset_dirty_rings()``."""
        self._check_open()
        if self.dirty_ring is None:
            raise KvmError(errno.EINVAL, f"vcpu {self.id} has no dirty ring: enable KVM_CAP_DIRTY_LOG_RING "
                                         "before creating vCPUs")
        return self.dirty_ring.harvest()

    def _load_state(self) -> None:
        """KVM_SET_SREGS + KVM_SET_REGS: long mode, CPL 3, at the top of the program."""
        sregs = kvm_sregs()
        kvm_ioctl(self._fd, KVM_GET_SREGS, sregs, "KVM_GET_SREGS", f"vcpu {self.id}")
        _long_mode_sregs(sregs)
        kvm_ioctl(self._fd, KVM_SET_SREGS, sregs, "KVM_SET_SREGS", f"vcpu {self.id}: long mode")
        regs = kvm_regs()
        regs.rip = self._layout.entry
        regs.rflags = guest.RFLAGS_RESERVED
        regs.rbx = self._cmd_gpa
        kvm_ioctl(self._fd, KVM_SET_REGS, regs, "KVM_SET_REGS", f"vcpu {self.id}: program entry")

    def _recover(self) -> None:
        """After an early exit: let the kernel finish the pending exit, then restart.

        ``KVM_RUN`` with ``immediate_exit`` completes a pending MMIO/PIO instruction
        and returns ``EINTR`` without entering the guest (Documentation/virt/kvm/api.rst).
        """
        self._run[_IMMEDIATE_EXIT_OFFSET] = 1
        try:
            kvm_ioctl(self._fd, KVM_RUN, 0, "KVM_RUN", f"vcpu {self.id}: completing the last exit")
        except KvmError as exc:
            if exc.errno != errno.EINTR:
                raise
        finally:
            self._run[_IMMEDIATE_EXIT_OFFSET] = 0
        self._load_state()
        self._stale = False

    # --- running commands --------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"vcpu {self.id} is closed")

    def _execute(self, op: int, count: int, value: int = 0, src: int = 0, dst: int = 0) -> tuple[int, bool]:
        """Run one command to completion or to the first other exit: (progress, completed)."""
        self._check_open()
        if self._stale:
            self._recover()
        doorbell = self._layout.doorbell_gpa
        self._private.write(
            self._cmd_offset, struct.pack(guest.CMD_FORMAT, op, count, value, src, dst, 0, doorbell)
        )
        self._stale = True  # until the doorbell says otherwise (also if KVM_RUN raises)
        while True:
            try:
                kvm_ioctl(self._fd, KVM_RUN, 0, "KVM_RUN", f"vcpu {self.id}")
            except KvmError as exc:
                if exc.errno == errno.EINTR:  # a signal: the guest state is consistent, go on
                    continue
                raise
            break
        run = kvm_run.from_buffer_copy(self._run)
        self._exit_reason = run.exit_reason
        is_mmio = run.exit_reason == uapi.KVM_EXIT_MMIO
        self._exit_gpa = run.exit.mmio.phys_addr if is_mmio else None
        done = is_mmio and run.exit.mmio.phys_addr == doorbell and bool(run.exit.mmio.is_write)
        self._completed = done
        (progress,) = struct.unpack(
            "<Q", self._private.read(self._cmd_offset + guest.CMD_PROGRESS, 8)
        )
        self._stale = not done
        return progress, done

    def _check_range(self, gpa: int, size: int) -> None:
        if gpa < 0 or size < 0 or gpa + size > guest.PRIVATE_BASE:
            raise ValueError(
                f"gpa range [{gpa:#x}, {gpa + size:#x}) is outside what the guest program can "
                f"reach: [0, {guest.PRIVATE_BASE:#x})"
            )

    def write_many(self, gpas: Any, value: int = 0) -> int:
        """Guest stores of u64 ``value`` at each 8-byte aligned GPA, in order.

        Returns how many stores completed: all of them, or the index of the store at
        which ``KVM_RUN`` returned something else (``exit_reason`` says what), e.g.
        ``KVM_EXIT_MMIO`` for a GPA no memslot covers.  GPAs go through the data
        buffer 131072 at a time, one ``KVM_RUN`` each.
        """
        if not 0 <= value <= _U64_MAX:
            raise ValueError(f"value {value!r} is not a u64")
        addrs = np.ascontiguousarray(np.asarray(gpas, dtype=np.uint64).reshape(-1), dtype="<u8")
        if addrs.size and (np.any(addrs & np.uint64(7)) or int(addrs.max()) + 8 > guest.PRIVATE_BASE):
            raise ValueError(
                "write_many takes 8-byte aligned gpas below "
                f"{guest.PRIVATE_BASE:#x} (the guest program's private slot)"
            )
        chunk = guest.DATA_SIZE // 8
        total = 0
        for start in range(0, addrs.size, chunk):
            part = addrs[start : start + chunk]
            self._private.write(self._data_offset, part)
            progress, done = self._execute(guest.OP_STORE_U64, part.size, value, src=self._data_gpa)
            total += progress
            if not done:
                break
        return total

    def write(self, gpa: int, data: bytes) -> int:
        """Guest stores of ``data`` at ``gpa``, byte by byte; returns the bytes completed."""
        data = bytes(data)
        self._check_range(gpa, len(data))
        done_bytes = 0
        for start in range(0, len(data), guest.DATA_SIZE):
            part = data[start : start + guest.DATA_SIZE]
            self._private.write(self._data_offset, part)
            progress, done = self._execute(
                guest.OP_COPY_BYTES, len(part), src=self._data_gpa, dst=gpa + start
            )
            done_bytes += progress
            if not done:
                break
        return done_bytes

    def read(self, gpa: int, size: int) -> bytes:
        """Guest loads of ``size`` bytes at ``gpa``; shorter if ``KVM_RUN`` stopped early."""
        self._check_range(gpa, size)
        out = bytearray()
        for start in range(0, size, guest.DATA_SIZE):
            n = min(guest.DATA_SIZE, size - start)
            progress, done = self._execute(
                guest.OP_COPY_BYTES, n, src=gpa + start, dst=self._data_gpa
            )
            out += self._private.read(self._data_offset, progress)
            if not done:
                break
        return bytes(out)
