"""The generic core of one VM: memslots, dirty logging, TLB flushes (``virt/kvm/kvm_main.c``)."""

from __future__ import annotations

import errno
import itertools
import threading
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any

import attrs
import numpy as np
import pluggy

from kvmcore import dirty_ring, ranges, uapi
from kvmcore.errors import KvmError
from kvmcore.geometry import LAST_LEVEL, Geometry
from kvmcore.hostmem import lazy_zeros
from kvmcore.memslot import Memslot, MemslotChange, bitmap_words, word_dtype
from kvmcore.pgtable import NO_LEVEL, PTE_D, PTE_W, PageTable, unique
from kvmcore.stats import Stats
from kvmcore.vcpu import ArchBugError, Vcpu

Event = tuple[str, int | np.ndarray, int | np.ndarray]
"""A change seen by vCPUs in flight: ``(kind, start_gfn, end_gfn)``, see :meth:`Vm._event`."""

HOST_PAGE_SIZES = (4096, 2 << 20, 1 << 30)
_USERSPACE_ADDR_ALIGN = 1 << 30


@attrs.frozen
class Translation:
    """What ``vm.translate(gpa)`` returns: the leaf that maps ``gpa``."""

    gpa: int
    level: int
    size: int
    writable: bool
    dirty: bool


class Vm:
    """One simulated VM: ``struct kvm`` and the VM ioctls.

    Built by :func:`kvmcore.create_vm`; see the design's public API.  The arch plugin
    is reached through ``self.hook``; it works on ``self.pgtable`` and calls back into
    :meth:`mark_page_dirty_in_slot` and the ``tlb_flush_*`` methods.
    """

    backend = "sim"

    def __init__(self, pm: pluggy.PluginManager, options: Mapping[str, Any]) -> None:
        self.hook = pm.hook
        self.info = self.hook.kvm_arch_info()
        unknown = sorted(set(options) - set(self.info.options))
        if unknown:
            known = ", ".join(sorted(self.info.options)) or "none"
            raise KvmError(errno.EINVAL, f"arch {self.info.name!r} has no option(s) {', '.join(unknown)}; "
                                         f"its options are: {known}")
        self.options = {**self.info.options, **options}
        self.geometry: Geometry = self.hook.kvm_arch_geometry(options=self.options)
        if self.geometry.bits_per_long != self.info.bits_per_long:
            raise ValueError(f"arch {self.info.name!r}: geometry and info disagree on BITS_PER_LONG")
        self.stats = Stats()
        self.pgtable = PageTable(self.geometry, on_restrict=self._on_restrict, stats=self.stats,
                                 on_grant=self._on_grant)
        self.pgtable.reporting = False  # until a vCPU runs (event_cursor)
        self.mmu_lock = threading.RLock()     # KVM_MMU_LOCK
        self.slots_lock = threading.RLock()   # kvm->slots_lock
        self._bitmap_lock = threading.Lock()  # stands for the atomic bitops on bitmap words
        self._slots: dict[tuple[int, int], Memslot] = {}
        self._slot_index: tuple[np.ndarray, list[Memslot]] | None = None
        self.vcpus: list[Vcpu] = []
        self.manual_dirty_log_protect = 0
        self.dirty_ring_size = 0              # bytes per vCPU ring; 0: no ring
        self.dirty_ring_with_bitmap = False
        self.arch_state: dict[str, Any] = {}  # the plugin's own per-VM state
        self._events: list[Event] = []
        self._event_users = 0
        self._next_uaddr = itertools.count(1)
        self.hook.kvm_arch_init_vm(kvm=self, options=self.options)

    # -- identity ------------------------------------------------------------------

    @property
    def arch(self) -> str:
        """The arch's name."""
        return self.info.name

    @property
    def page_size(self) -> int:
        return self.geometry.page_size

    @property
    def page_shift(self) -> int:
        return self.geometry.page_shift

    @property
    def bits_per_long(self) -> int:
        return self.geometry.bits_per_long

    def __repr__(self) -> str:
        return f"<kvmcore.Vm arch={self.info.name} {self.geometry.describe()}>"

    # -- capabilities ----------------------------------------------------------------

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM (``kvm_vm_ioctl_check_extension_generic``)."""
        generic = {
            uapi.KVM_CAP_USER_MEMORY: 1,
            uapi.KVM_CAP_SYNC_MMU: 1,
            uapi.KVM_CAP_NR_MEMSLOTS: self.info.user_mem_slots,
            uapi.KVM_CAP_READONLY_MEM: int(self.info.has_readonly_mem),
            uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: self.info.manual_dirty_log_caps,
            uapi.KVM_CAP_MULTI_ADDRESS_SPACE: self.info.nr_address_spaces,
            uapi.KVM_CAP_DIRTY_LOG_RING: self._ring_cap(uapi.KVM_CAP_DIRTY_LOG_RING),
            uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL: self._ring_cap(uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL),
        }
        if cap in generic:
            return generic[cap]
        if cap == uapi.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP and cap in self.info.dirty_ring_caps:
            return 1
        result = self.hook.kvm_arch_check_extension(kvm=self, cap=cap)
        return 0 if result is None else int(result)

    def _ring_cap(self, cap: int) -> int:
        """The ring's largest size in bytes if the arch offers ``cap``, else 0."""
        return dirty_ring.MAX_RING_BYTES if cap in self.info.dirty_ring_caps else 0

    @property
    def capabilities(self) -> dict[str, int]:
        """``KVM_CHECK_EXTENSION`` for every capability kvmcore names."""
        return {name: self.check_extension(value) for name, value in vars(uapi).items()
                if name.startswith("KVM_CAP_")}

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> int:
        """``KVM_ENABLE_CAP`` on the VM (``kvm_vm_ioctl_enable_cap_generic``)."""
        if len(args) > 4:
            raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP takes at most 4 args")
        args = tuple(int(a) for a in args) + (0,) * (4 - len(args))
        if cap == uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
            allowed = uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            if args[0] & uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
                allowed = self.info.manual_dirty_log_caps
            if flags or args[0] & ~allowed:
                raise KvmError(errno.EINVAL, f"KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: flags {flags:#x}, "
                                             f"args[0] {args[0]:#x}; allowed bits are {allowed:#x}")
            self.manual_dirty_log_protect = args[0]
            return 0
        if cap in (uapi.KVM_CAP_DIRTY_LOG_RING, uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL):
            if not self.check_extension(cap):
                raise KvmError(errno.EINVAL, f"arch {self.info.name!r} has no dirty ring capability {cap}")
            self._enable_dirty_log_ring(args[0] & 0xFFFFFFFF)
            return 0
        if cap == uapi.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP:
            self._enable_dirty_ring_with_bitmap(flags)
            return 0
        result = self.hook.kvm_arch_enable_cap(kvm=self, cap=cap, args=args, flags=flags)
        if result is None:
            raise KvmError(errno.EINVAL, f"capability {cap} cannot be enabled on arch {self.info.name!r}")
        return int(result)

    def _enable_dirty_log_ring(self, size: int) -> None:
        """``kvm_vm_ioctl_enable_dirty_log_ring``: checks and errno in the kernel's order.
        ``size`` is a u32 there, so the caller passes ``args[0]`` truncated."""
        rsvd = self.dirty_ring_rsvd_entries
        if not size or size & (size - 1):
            raise KvmError(errno.EINVAL, f"dirty ring size {size} is not a power of two")
        if size < rsvd * dirty_ring.DIRTY_GFN_DTYPE.itemsize or size < self.page_size:
            raise KvmError(errno.EINVAL, f"dirty ring size {size} is below a page ({self.page_size}) or "
                                         f"the {rsvd} reserved entries ({rsvd * 16} bytes)")
        if size > dirty_ring.MAX_RING_BYTES:
            raise KvmError(errno.E2BIG, f"dirty ring size {size} is above {dirty_ring.MAX_RING_BYTES} bytes")
        if self.dirty_ring_size:
            raise KvmError(errno.EINVAL, f"the dirty ring is already enabled ({self.dirty_ring_size} bytes)")
        if self.vcpus:
            raise KvmError(errno.EINVAL, "the dirty ring must be enabled before any vCPU is created")
        self.dirty_ring_size = size

    def _enable_dirty_ring_with_bitmap(self, flags: int) -> None:
        """``KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP`` (``kvm_vm_ioctl_enable_cap_generic``)."""
        if uapi.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP not in self.info.dirty_ring_caps or \
                not self.dirty_ring_size or flags:
            raise KvmError(errno.EINVAL, "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP needs an arch that offers it, "
                                         f"the ring enabled first and flags 0 (flags {flags:#x})")
        with self.slots_lock:
            if self._slots:  # kvm_are_all_memslots_empty
                raise KvmError(errno.EINVAL, "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP must be enabled before "
                                             "any memslot exists")
            self.dirty_ring_with_bitmap = True

    @property
    def dirty_ring_rsvd_entries(self) -> int:
        """``kvm_dirty_ring_get_rsvd_entries``: 64 plus the arch's ``kvm_cpu_dirty_log_size``."""
        return dirty_ring.rsvd_entries(int(self.hook.kvm_cpu_dirty_log_size(kvm=self) or 0))

    @property
    def use_dirty_bitmap(self) -> bool:
        """``kvm_use_dirty_bitmap``: no ring, or ring and bitmap together."""
        return not self.dirty_ring_size or self.dirty_ring_with_bitmap

    @property
    def manual_protect(self) -> bool:
        return bool(self.manual_dirty_log_protect)

    @property
    def initially_all_set(self) -> bool:
        """``kvm_dirty_log_manual_protect_and_init_set``."""
        return bool(self.manual_dirty_log_protect & uapi.KVM_DIRTY_LOG_INITIALLY_SET)

    # -- memslots ------------------------------------------------------------------

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int, flags: int = 0,
                               host_page_size: int | None = None, userspace_addr: int | None = None) -> None:
        """``KVM_SET_USER_MEMORY_REGION``: create, move, change flags of, or delete a slot.

        Checks and errno in the order of ``kvm_set_memory_region``.  ``memory_size``
        0 deletes.  ``host_page_size`` says how the host backs the memory (4K, 2M, 1G),
        which bounds the blocks the arch may map.  ``userspace_addr`` is the host
        virtual address the model pretends the memory is at (default: 1 GiB aligned);
        huge mappings need it congruent with the gpa, as in the kernel.
        """
        with self.slots_lock:
            self._set_memory_region(int(slot), int(guest_phys_addr), int(memory_size), int(flags),
                                    host_page_size, userspace_addr)

    def _set_memory_region(self, slot: int, gpa: int, size: int, flags: int, host_page_size: int | None,
                           uaddr: int | None) -> None:
        valid_flags = uapi.KVM_MEM_LOG_DIRTY_PAGES
        if self.info.has_readonly_mem:
            valid_flags |= uapi.KVM_MEM_READONLY
        if flags & ~valid_flags:
            raise KvmError(errno.EINVAL, f"memslot flags {flags:#x} are not a subset of {valid_flags:#x}")
        as_id, slot_id = self._decode_slot(slot)
        if size & (self.page_size - 1):
            raise KvmError(errno.EINVAL, f"memory_size {size:#x} is not a multiple of the page size")
        if gpa & (self.page_size - 1):
            raise KvmError(errno.EINVAL, f"guest_phys_addr {gpa:#x} is not page aligned")
        if uaddr is not None and (uaddr & (self.page_size - 1) or not 0 <= uaddr < 1 << 64):
            raise KvmError(errno.EINVAL, f"userspace_addr {uaddr:#x} is not a page-aligned address")
        if gpa < 0 or size < 0 or gpa + size >= 1 << 64:
            raise KvmError(errno.EINVAL, "guest_phys_addr + memory_size overflows")
        npages = size >> self.page_shift
        if npages > uapi.KVM_MEM_MAX_NR_PAGES:
            raise KvmError(errno.EINVAL, f"{npages} pages is more than KVM_MEM_MAX_NR_PAGES")
        if host_page_size is not None and host_page_size not in HOST_PAGE_SIZES:
            raise KvmError(errno.EINVAL, f"host_page_size must be one of {HOST_PAGE_SIZES}")
        old = self._slots.get((as_id, slot_id))
        if not size:
            if old is None:
                raise KvmError(errno.EINVAL, f"slot {slot} does not exist, so it cannot be deleted")
            self._commit(old, None, MemslotChange.DELETE)
            return
        base_gfn = gpa >> self.page_shift
        if old is None:
            change = MemslotChange.CREATE
        else:
            if npages != old.npages:
                raise KvmError(errno.EINVAL, f"slot {slot}: memory_size cannot change ({old.npages} pages)")
            if (host_page_size is not None and host_page_size != old.host_page_size) or \
                    (uaddr is not None and uaddr != old.userspace_addr):
                raise KvmError(errno.EINVAL, f"slot {slot}: host memory (userspace_addr) cannot change")
            if (flags ^ old.flags) & uapi.KVM_MEM_READONLY:
                raise KvmError(errno.EINVAL, f"slot {slot}: KVM_MEM_READONLY cannot be toggled")
            if base_gfn != old.base_gfn:
                change = MemslotChange.MOVE
            elif flags != old.flags:
                change = MemslotChange.FLAGS_ONLY
            else:
                return
        if change in (MemslotChange.CREATE, MemslotChange.MOVE):
            for (other_as, other_id), other in self._slots.items():
                if other_as == as_id and other_id != slot_id and \
                        base_gfn < other.end_gfn and other.base_gfn < base_gfn + npages:
                    raise KvmError(errno.EEXIST, f"slot {slot} at gfn {base_gfn:#x}+{npages:#x} overlaps "
                                                 f"slot {other.slot}")
        if change is MemslotChange.CREATE:
            hps = host_page_size or 4096
            new = Memslot(id=slot_id, as_id=as_id, base_gfn=base_gfn, npages=npages, flags=flags,
                          userspace_addr=next(self._next_uaddr) * _USERSPACE_ADDR_ALIGN * 64 if uaddr is None else uaddr,
                          host_page_size=hps, memory=lazy_zeros(npages << self.page_shift))
        else:
            new = attrs.evolve(old, base_gfn=base_gfn, flags=flags)
        self._commit(old, new, change)

    def _decode_slot(self, slot: int) -> tuple[int, int]:
        as_id, slot_id = (slot >> 16) & 0xFFFF, slot & 0xFFFF
        if slot < 0 or slot >= 1 << 32 or as_id >= self.info.nr_address_spaces or \
                slot_id >= self.info.user_mem_slots:
            raise KvmError(errno.EINVAL, f"slot {slot:#x}: address space {as_id} (of "
                                         f"{self.info.nr_address_spaces}), id {slot_id} (of "
                                         f"{self.info.user_mem_slots})")
        return as_id, slot_id

    def _commit(self, old: Memslot | None, new: Memslot | None, change: MemslotChange) -> None:
        """``kvm_set_memslot``: prepare (bitmap lifecycle, arch veto), install, commit."""
        if new is not None:
            if not new.dirty_track_enabled:
                new.dirty_bitmap = None
            elif old is not None and old.dirty_bitmap is not None:
                new.dirty_bitmap = old.dirty_bitmap
            elif not self.use_dirty_bitmap:
                new.dirty_bitmap = None
            else:
                bitmap = np.zeros(bitmap_words(new.npages, self.bits_per_long), word_dtype(self.bits_per_long))
                if self.initially_all_set:
                    bits = np.zeros(len(bitmap) * self.bits_per_long, np.uint8)
                    bits[:new.npages] = 1
                    bitmap[:] = np.packbits(bits, bitorder="little").view(bitmap.dtype)
                new.dirty_bitmap = bitmap
        self.hook.kvm_arch_prepare_memory_region(kvm=self, old=old, new=new, change=change)
        with self.mmu_lock:
            if change in (MemslotChange.DELETE, MemslotChange.MOVE):
                # kvm_arch_flush_shadow_memslot: zap the old range, then flush.
                self.pgtable.unmap_range(old.base_gfn, old.end_gfn)
        if change in (MemslotChange.DELETE, MemslotChange.MOVE):
            self.flush_remote_tlbs()
            for vcpu in self.vcpus:
                vcpu.tlb.forget(old)
        key = (old or new).as_id, (old or new).id
        if change is MemslotChange.FLAGS_ONLY:
            snapshot = attrs.evolve(old)
            old.flags, old.dirty_bitmap = new.flags, new.dirty_bitmap
            old, new = snapshot, self._slots[key]
        elif new is None:
            del self._slots[key]
        else:
            self._slots[key] = new
        self._slot_index = None
        self.hook.kvm_arch_commit_memory_region(kvm=self, old=old, new=new, change=change)

    @property
    def memslots(self) -> list[Memslot]:
        """Every memslot, in order of ``(as_id, id)``."""
        return [self._slots[k] for k in sorted(self._slots)]

    def memslot(self, slot: int) -> Memslot:
        """The memslot for a userspace slot number; KvmError(EINVAL/ENOENT) if none."""
        as_id, slot_id = self._decode_slot(int(slot))
        ms = self._slots.get((as_id, slot_id))
        if ms is None:
            raise KvmError(errno.ENOENT, f"slot {slot} does not exist")
        return ms

    def id_to_memslot(self, as_id: int, slot_id: int) -> Memslot | None:
        """``id_to_memslot``: the memslot with this address space and id, or None."""
        return self._slots.get((as_id, slot_id))

    def memory(self, slot: int) -> np.ndarray:
        """The host view of a slot's memory (uint8); host writes are not logged."""
        return self.memslot(slot).memory

    def gfn_to_memslot(self, gfn: int, as_id: int = 0) -> Memslot | None:
        for ms in self._slots.values():
            if ms.as_id == as_id and ms.base_gfn <= gfn < ms.end_gfn:
                return ms
        return None

    def slots_for(self, gfns: np.ndarray) -> tuple[np.ndarray, list[Memslot]]:
        """For each gfn (address space 0), the index of its memslot in the returned
        list, or -1 where no memslot backs it."""
        if self._slot_index is None:
            slots = sorted((s for s in self._slots.values() if s.as_id == 0), key=lambda s: s.base_gfn)
            self._slot_index = np.array([s.base_gfn for s in slots], np.int64), slots
        bases, slots = self._slot_index
        idx = np.searchsorted(bases, gfns, side="right") - 1
        ends = np.array([s.end_gfn for s in slots] + [0], np.int64)
        inside = (idx >= 0) & (gfns < ends[idx])
        return np.where(inside, idx, -1), slots

    # -- marking pages dirty -------------------------------------------------------

    def mark_page_dirty_in_slot(self, slot: Memslot, gfn: int, vcpu: Vcpu | None = None) -> None:
        """``mark_page_dirty_in_slot``: log a write to ``gfn`` if the slot logs.

        ``vcpu`` is the running vCPU (``kvm_get_running_vcpu``), None for a write KVM
        makes on its own.  With a dirty ring and a running vCPU the page goes to that
        vCPU's ring, else to the slot's bitmap if it has one, else nowhere.
        """
        if vcpu is not None and vcpu.vm is not self:
            raise ArchBugError(f"mark_page_dirty_in_slot with a vCPU of another VM ({vcpu!r})")
        if slot is None or not slot.dirty_track_enabled:
            return
        self.stats["mark_page_dirty_calls"] += 1
        if self.dirty_ring_size and vcpu is not None:
            self._ring_push(vcpu, slot, np.array([gfn - slot.base_gfn], np.uint64))
            return
        if slot.dirty_bitmap is None:
            self.stats["dirty_marks_dropped"] += 1
            return
        rel = gfn - slot.base_gfn
        bpl = self.bits_per_long
        bit = slot.dirty_bitmap.dtype.type(1 << (rel % bpl))
        with self._bitmap_lock:
            word = slot.dirty_bitmap[rel // bpl]
            if not word & bit:
                slot.dirty_bitmap[rel // bpl] = word | bit
                self.stats["pages_dirtied"] += 1

    def mark_pages_dirty_in_slot(self, slot: Memslot, gfns: np.ndarray, vcpu: Vcpu | None = None) -> None:
        """:meth:`mark_page_dirty_in_slot` for many gfns at once, in order."""
        if vcpu is not None and vcpu.vm is not self:
            raise ArchBugError(f"mark_pages_dirty_in_slot with a vCPU of another VM ({vcpu!r})")
        if slot is None or not slot.dirty_track_enabled or not len(gfns):
            return
        self.stats["mark_page_dirty_calls"] += len(gfns)
        if self.dirty_ring_size and vcpu is not None:
            self._ring_push(vcpu, slot, np.asarray(gfns, np.int64) - slot.base_gfn)
            return
        if slot.dirty_bitmap is None:
            self.stats["dirty_marks_dropped"] += len(gfns)
            return
        rel = np.asarray(gfns, np.int64) - slot.base_gfn
        if len(rel) > 1 and (np.diff(rel) < 0).any():
            rel = np.sort(rel)
        bpl = self.bits_per_long
        dtype = slot.dirty_bitmap.dtype
        words = rel // bpl
        bits = np.ones(len(rel), dtype) << (rel % bpl).astype(dtype)
        starts = np.flatnonzero(np.r_[True, words[1:] != words[:-1]])
        words, masks = words[starts], np.bitwise_or.reduceat(bits, starts)
        with self._bitmap_lock:
            new = masks & ~slot.dirty_bitmap[words]
            slot.dirty_bitmap[words] |= masks
        self.stats["pages_dirtied"] += int(np.bitwise_count(new).sum())

    def _ring_push(self, vcpu: Vcpu, slot: Memslot, offsets: np.ndarray) -> None:
        """``kvm_dirty_ring_push``; a soft-full ring makes the vCPU exit
        (``KVM_REQ_DIRTY_RING_SOFT_FULL``, then ``KVM_EXIT_DIRTY_RING_FULL``)."""
        if vcpu.dirty_ring.push(slot.slot, offsets):
            vcpu.request_exit(uapi.KVM_EXIT_DIRTY_RING_FULL)
        self.stats["dirty_ring_pushes"] += len(offsets)
        self.stats["pages_dirtied"] += len(offsets)

    def mark_page_dirty(self, gfn: int) -> None:
        """``mark_page_dirty``: by guest frame number, in address space 0."""
        self.mark_page_dirty_in_slot(self.gfn_to_memslot(gfn), gfn)

    def write_guest(self, gpa: int, data: bytes) -> None:
        """``kvm_write_guest``: the VMM or a device writes guest memory; each page written
        is marked dirty (without a running vCPU, so into the bitmap)."""
        data = memoryview(bytes(data))
        pos = 0
        while pos < len(data):
            gfn = (gpa + pos) >> self.page_shift
            ms = self.gfn_to_memslot(gfn)
            if ms is None:
                raise KvmError(errno.EFAULT, f"gpa {gpa + pos:#x} is not backed by a memslot")
            off = (gpa + pos) - (ms.base_gfn << self.page_shift)
            n = min(len(data) - pos, self.page_size - (off & (self.page_size - 1)))
            ms.memory[off:off + n] = np.frombuffer(data[pos:pos + n], np.uint8)
            self.mark_page_dirty_in_slot(ms, gfn)
            pos += n

    # -- the dirty-log ioctls --------------------------------------------------------

    def _logging_slot(self, slot: int) -> Memslot:
        self._check_use_dirty_bitmap("KVM_GET_DIRTY_LOG")
        as_id, slot_id = self._decode_slot(int(slot))
        ms = self._slots.get((as_id, slot_id))
        if ms is None or ms.dirty_bitmap is None:
            raise KvmError(errno.ENOENT, f"slot {slot} does not exist or does not log dirty pages")
        return ms

    def get_dirty_log(self, slot: int) -> np.ndarray:
        """``KVM_GET_DIRTY_LOG`` (``kvm_get_dirty_log_protect``).

        Classic mode: snapshot and clear the bitmap, re-protect every non-zero word
        under the MMU lock, flush the memslot's TLB entries if anything was dirty, and
        return the snapshot.  Manual-protect mode: return a copy of the live bitmap.
        """
        with self.slots_lock:
            ms = self._logging_slot(slot)
            self.hook.kvm_arch_sync_dirty_log(kvm=self, slot=ms)
            if self.manual_protect:
                with self._bitmap_lock:
                    out = ms.dirty_bitmap.copy()
                self.stats["dirty_log_gets"] += 1
                return out
            with self.mmu_lock:
                with self._bitmap_lock:
                    snapshot = ms.dirty_bitmap.copy()
                    ms.dirty_bitmap[:] = 0
                words = np.nonzero(snapshot)[0]
                self._protect_words(ms, words, snapshot[words])
            if len(words):
                self.flush_remote_tlbs_memslot(ms)
            self.stats["dirty_log_gets"] += 1
            return snapshot

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: Any) -> None:
        """``KVM_CLEAR_DIRTY_LOG`` (``kvm_clear_dirty_log_protect``), checks in the kernel's order.

        Only bits set both in ``bitmap`` and in the log are cleared, and exactly those
        pages re-protected; the memslot is flushed if any bit was cleared.
        """
        with self.slots_lock:
            self._clear_dirty_log(int(slot), int(first_page), int(num_pages), bitmap)

    def _clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: Any) -> None:
        self._check_use_dirty_bitmap("KVM_CLEAR_DIRTY_LOG")
        as_id, slot_id = self._decode_slot(slot)
        if first_page & 63:
            raise KvmError(errno.EINVAL, f"first_page {first_page} is not a multiple of 64")
        ms = self._slots.get((as_id, slot_id))
        if ms is None or ms.dirty_bitmap is None:
            raise KvmError(errno.ENOENT, f"slot {slot} does not exist or does not log dirty pages")
        if num_pages < 0 or first_page > ms.npages or num_pages > ms.npages - first_page or \
                (num_pages < ms.npages - first_page and num_pages & 63):
            raise KvmError(errno.EINVAL, f"pages [{first_page}, {first_page}+{num_pages}) of a "
                                         f"{ms.npages}-page slot: num_pages must be a multiple of 64 "
                                         "unless the range ends at the end of the slot")
        self.hook.kvm_arch_sync_dirty_log(kvm=self, slot=ms)
        bpl = self.bits_per_long
        nwords = -(-num_pages // bpl)
        try:
            user = np.asarray(bitmap).astype(ms.dirty_bitmap.dtype, casting="unsafe")
        except (TypeError, ValueError) as exc:
            raise KvmError(errno.EFAULT, f"bitmap is not an array of words: {exc}") from None
        if user.ndim != 1 or len(user) < nwords:
            raise KvmError(errno.EFAULT, f"bitmap has {user.size} words; {nwords} are needed for "
                                         f"{num_pages} pages")
        user = user[:nwords]
        first_word = first_page // bpl
        with self.mmu_lock:
            with self._bitmap_lock:
                live = ms.dirty_bitmap[first_word:first_word + nwords]
                cleared = user & live            # atomic_long_fetch_andnot
                live &= ~user
            words = np.nonzero(cleared)[0]
            self._protect_words(ms, first_word + words, cleared[words])
        if len(words):
            self.flush_remote_tlbs_memslot(ms)
        self.stats["dirty_log_clears"] += 1

    def _check_use_dirty_bitmap(self, ioctl: str) -> None:
        if not self.use_dirty_bitmap:
            raise KvmError(errno.ENXIO, f"{ioctl}: this VM logs to a dirty ring only, it has no bitmaps")

    def _protect_words(self, ms: Memslot, words: np.ndarray, masks: np.ndarray) -> None:
        """Call the arch's protect hook for each non-zero word (batched if it can)."""
        self.enable_log_dirty_pt_masked(ms, words.astype(np.int64) * self.bits_per_long, masks)

    def enable_log_dirty_pt_masked(self, ms: Memslot, gfn_offsets: np.ndarray, masks: np.ndarray) -> None:
        """``kvm_arch_mmu_enable_log_dirty_pt_masked`` for each ``(gfn_offsets[i], masks[i])``:
        the arch's per-word hook, or its batched hook if it has one.  The offsets are
        word-aligned for GET/CLEAR, arbitrary for a ring reset.  Caller holds the MMU lock."""
        if not len(gfn_offsets):
            return
        self.stats["protect_hook_calls"] += len(gfn_offsets)
        if self.hook.kvm_mmu_write_protect_pt_masked_batch.get_hookimpls():
            self.hook.kvm_mmu_write_protect_pt_masked_batch(kvm=self, slot=ms, gfn_offsets=gfn_offsets,
                                                             masks=masks)
            return
        for off, mask in zip(gfn_offsets.tolist(), masks.tolist()):
            self.hook.kvm_mmu_write_protect_pt_masked(kvm=self, slot=ms, gfn_offset=off, mask=mask)

    def reset_dirty_rings(self) -> int:
        """``KVM_RESET_DIRTY_RINGS`` (``kvm_vm_ioctl_reset_dirty_pages``): reset every
        vCPU's harvested entries under ``slots_lock``, then flush the whole VM's TLBs
        if any entry was reset.  Returns how many entries were reset (invalid ones too)."""
        if not self.dirty_ring_size:
            raise KvmError(errno.EINVAL, "KVM_RESET_DIRTY_RINGS: the dirty ring is not enabled")
        cleared = 0
        with self.slots_lock:
            for vcpu in self.vcpus:
                cleared = vcpu.dirty_ring.reset(self, cleared)
        if cleared:
            self.flush_remote_tlbs()
        self.stats["dirty_ring_resets"] += cleared
        return cleared

    # -- TLB maintenance -----------------------------------------------------------

    def flush_remote_tlbs(self) -> None:
        """``kvm_flush_remote_tlbs``: the arch's whole-VM flush."""
        self.hook.kvm_flush_remote_tlbs(kvm=self)

    def flush_remote_tlbs_range(self, gfn: int, nr_pages: int) -> None:
        """``kvm_flush_remote_tlbs_range``: the arch's range flush, else a whole-VM one."""
        if not self.hook.kvm_flush_remote_tlbs_range(kvm=self, gfn=gfn, nr_pages=nr_pages):
            self.flush_remote_tlbs()

    def flush_remote_tlbs_memslot(self, slot: Memslot) -> None:
        """``kvm_flush_remote_tlbs_memslot``."""
        self.flush_remote_tlbs_range(slot.base_gfn, slot.npages)

    def tlb_flush_all(self, kind: str = "full", count: int = 1) -> None:
        """Invalidate every vCPU's TLB (for the arch's flush hooks).  Each vCPU is kicked
        out of guest mode first, as the kernel's request + IPI does.  ``count``: how many
        such flushes back to back this stands for (a batched fault path); the TLBs are
        invalidated once, the counters add ``count``."""
        for vcpu in self.vcpus:
            with vcpu.guest_lock:
                vcpu.tlb.invalidate_all()
        self._event("tlb", 0, self.geometry.max_gfn)
        self.stats["tlb_flushes"] += count
        self.stats["tlb_flushes_" + kind] += count

    def tlb_flush_range(self, gfn: int, nr_pages: int, kind: str = "range") -> None:
        """Invalidate the entries of ``[gfn, gfn + nr_pages)`` on every vCPU."""
        end = gfn + nr_pages
        for vcpu in self.vcpus:
            with vcpu.guest_lock:
                for ms in self._slots.values():
                    if ms.base_gfn < end and gfn < ms.end_gfn:
                        vcpu.tlb.invalidate_range(ms, gfn - ms.base_gfn, end - ms.base_gfn)
        self._event("tlb", gfn, end)
        self.stats["tlb_flushes"] += 1
        self.stats["tlb_flushes_" + kind] += 1

    def tlb_flush_pages(self, gfns: np.ndarray, kind: str = "ipa") -> None:
        """One last-level TLBI per gfn, for many gfns at once (the batched fault paths).
        Counts one flush of ``kind`` per gfn, as the per-page calls would."""
        gfns = np.asarray(gfns, np.int64)
        if len(gfns) > 1 and not (np.diff(gfns) > 0).all():
            gfns = unique(gfns)
        if not len(gfns):
            return
        for vcpu in self.vcpus:
            with vcpu.guest_lock:
                for ms in self._slots.values():
                    inside = gfns[(gfns >= ms.base_gfn) & (gfns < ms.end_gfn)]
                    if len(inside):
                        vcpu.tlb.invalidate_pages(ms, inside - ms.base_gfn)
        if self._event_users:
            self._event("tlb", *ranges.runs(gfns))
        self.stats["tlb_flushes"] += len(gfns)
        self.stats["tlb_flushes_" + kind] += len(gfns)

    def tlb_flush_ipa(self, gfn: int, level: int = LAST_LEVEL) -> None:
        """Invalidate the entry at ``level`` mapping ``gfn`` (a TLBI by IPA)."""
        pages = self.geometry.level_pages(level)
        self.tlb_flush_range(gfn & ~(pages - 1), pages, kind="ipa")

    # -- events for vCPUs in flight --------------------------------------------------

    def _on_restrict(self, start: int, end: int) -> None:
        self._event("pt", start, end)

    def _on_grant(self, start: int, end: int) -> None:
        self._event("grant", start, end)

    def _event(self, kind: str, start: int | np.ndarray, end: int | np.ndarray) -> None:
        """Record a change for the vCPUs in flight: ``kind`` "tlb" (invalidated), "pt"
        (restricted) or "grant", over ``[start, end)`` (ints, or arrays of runs)."""
        if self._event_users:
            self._events.append((kind, start, end))

    @contextmanager
    def event_cursor(self):
        """Follow the mapping and TLB changes made while a vCPU runs a batch of accesses."""
        with self.mmu_lock:
            self._event_users += 1
            self.pgtable.reporting = True
        cursor = _EventCursor(self)
        try:
            yield cursor
        finally:
            with self.mmu_lock:
                self._event_users -= 1
                if not self._event_users:
                    self._events.clear()
                    self.pgtable.reporting = False

    # -- vCPUs and translation -------------------------------------------------------

    def create_vcpu(self, vcpu_id: int = 0) -> Vcpu:
        """``KVM_CREATE_VCPU``."""
        if any(v.id == vcpu_id for v in self.vcpus):
            raise KvmError(errno.EEXIST, f"vCPU {vcpu_id} exists")
        vcpu = Vcpu(self, vcpu_id)
        self.vcpus.append(vcpu)
        return vcpu

    def translate(self, gpa: int) -> Translation | None:
        """The stage-2 leaf mapping ``gpa``, or None if it is not mapped."""
        leaf = self.pgtable.leaf(gpa >> self.page_shift)
        if leaf.level == NO_LEVEL:
            return None
        size = self.geometry.level_size(leaf.level)
        return Translation(gpa & ~(size - 1), leaf.level, size, bool(leaf.pte & PTE_W), bool(leaf.pte & PTE_D))

    def close(self) -> None:
        """Nothing to release in the model; kept so code runs on both backends."""

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _EventCursor:
    """Reads the VM's change events from where it last stopped."""

    def __init__(self, vm: Vm) -> None:
        self._vm = vm
        self._pos = len(vm._events)

    def new(self) -> list[Event]:
        events = self._vm._events
        out = events[self._pos:]
        self._pos = len(events)
        return out
