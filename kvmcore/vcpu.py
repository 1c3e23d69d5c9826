"""A vCPU's access path: TLB lookup, page-table walk, stage-2 fault, retry.

A batch of guest accesses runs as hardware would run it, in order, but vectorised:
every page is classified once (a write through a cached writable-and-dirty entry or a
writable-and-dirty leaf goes straight through; a writable leaf with D clear makes the
hardware set D; anything else faults), and only the accesses that need KVM are
visited one by one, in order.  After each exit to KVM the pages whose mappings or
cached translations changed are classified again from that point on, so the result
is that of executing the accesses one at a time.
"""

from __future__ import annotations

import errno
import heapq
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from kvmcore.dirty_ring import DirtyRing
from kvmcore.errors import KvmError
from kvmcore.geometry import LAST_LEVEL
from kvmcore import ranges
from kvmcore.pgtable import NO_LEVEL, PTE_D, PTE_VALID, PTE_W, distinct, unique
from kvmcore.tlb import TLB_INVALID, TLB_READ, TLB_WRITE, TLB_WRITE_DIRTY, Tlb
from kvmcore.uapi import KVM_EXIT_DIRTY_RING_FULL, KVM_EXIT_MMIO

if TYPE_CHECKING:
    from kvmcore.memslot import Memslot
    from kvmcore.vm import Event, Vm

FAST, SET_DIRTY, FAULT = 0, 1, 2
MAX_FAULT_RETRIES = 4
MAX_BATCH = 1 << 16


class ArchBugError(RuntimeError):
    """The arch plugin broke the hook contract (for example, a fault it did not resolve)."""


class Vcpu:
    """One vCPU of a simulated VM (``struct kvm_vcpu``)."""

    def __init__(self, vm: Vm, vcpu_id: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.tlb = Tlb()
        self.exit_reason: int | None = None
        self.guest_lock = threading.RLock()  # held while in guest mode; kicks wait for it
        self.arch_state: dict = {}
        self._pending_exit: int | None = None
        self.dirty_ring: DirtyRing | None = None  # kvm_dirty_ring_alloc at KVM_CREATE_VCPU
        if vm.dirty_ring_size:
            self.dirty_ring = DirtyRing.alloc(vm.dirty_ring_size, vm.dirty_ring_rsvd_entries)

    def __repr__(self) -> str:
        return f"<kvmcore.Vcpu {self.id} of {self.vm.arch}>"

    def request_exit(self, reason: int) -> None:
        """Make the vCPU return to userspace before its next access (a ``kvm_run`` exit)."""
        self._pending_exit = reason

    def harvest_dirty_ring(self) -> np.ndarray:
        """Collect this vCPU's dirty ring as a VMM does: the ``(slot, offset)`` of each
        entry pushed since the last harvest, in push order, each marked RESET for the
        next ``vm.reset_dirty_rings()`` (see :func:`kvmcore.dirty_ring.harvest`)."""
        if self.dirty_ring is None:
            raise KvmError(errno.EINVAL, "this vCPU has no dirty ring: enable KVM_CAP_DIRTY_LOG_RING "
                                         "before creating vCPUs")
        return self.dirty_ring.harvest()

    # -- the public accesses ---------------------------------------------------------

    def write_many(self, gpas: np.ndarray, value: int | np.ndarray = 0) -> int:
        """Guest stores of a u64 at each 8-byte aligned gpa, in order; returns how many
        completed before the vCPU exited (all of them unless ``exit_reason`` says why)."""
        gpas = np.asarray(gpas)
        if gpas.ndim != 1 or (gpas.size and not np.issubdtype(gpas.dtype, np.integer)):
            raise KvmError(errno.EINVAL, "gpas must be a 1-d array of integers")
        gpas = gpas.astype(np.int64)
        if gpas.size and ((gpas & 7).any() or (gpas < 0).any()):
            raise KvmError(errno.EINVAL, "every gpa of write_many must be a non-negative multiple of 8")
        values = np.broadcast_to(np.asarray(value, dtype=np.uint64), gpas.shape)
        vm = self.vm

        def commit(a: int, b: int, slots: list[Memslot], slot_idx: np.ndarray) -> None:
            if b - a <= 8:
                for i in range(a, b):
                    ms = slots[slot_idx[i]]
                    ms.memory.view(np.uint64)[(int(gpas[i]) - (ms.base_gfn << vm.page_shift)) >> 3] = values[i]
                return
            for k in distinct(slot_idx[a:b]):
                sel = np.nonzero(slot_idx[a:b] == k)[0] + a
                ms = slots[k]
                offs = (gpas[sel] - (ms.base_gfn << vm.page_shift)) >> 3
                ms.memory.view(np.uint64)[offs] = values[sel]

        return self._run(gpas >> vm.page_shift, write=True, commit=commit)

    def write(self, gpa: int, data: bytes) -> int:
        """A guest store of ``data`` at ``gpa``; returns the bytes stored (all of them
        unless the vCPU exited, e.g. ``KVM_EXIT_MMIO`` for a gpa no memslot backs)."""
        data = np.frombuffer(bytes(data), np.uint8)
        gpas, lens = self._split(gpa, len(data))
        starts = np.concatenate(([0], np.cumsum(lens)[:-1])) if len(lens) else lens

        def commit(a: int, b: int, slots: list[Memslot], slot_idx: np.ndarray) -> None:
            for i in range(a, b):
                ms = slots[slot_idx[i]]
                off = gpas[i] - (ms.base_gfn << self.vm.page_shift)
                ms.memory[off:off + lens[i]] = data[starts[i]:starts[i] + lens[i]]

        done = self._run(gpas >> self.vm.page_shift, write=True, commit=commit)
        return int(lens[:done].sum())

    def read(self, gpa: int, size: int) -> bytes:
        """A guest load of ``size`` bytes at ``gpa``."""
        gpas, lens = self._split(gpa, size)
        out = bytearray()

        def commit(a: int, b: int, slots: list[Memslot], slot_idx: np.ndarray) -> None:
            for i in range(a, b):
                ms = slots[slot_idx[i]]
                off = gpas[i] - (ms.base_gfn << self.vm.page_shift)
                out.extend(ms.memory[off:off + lens[i]].tobytes())

        done = self._run(gpas >> self.vm.page_shift, write=False, commit=commit)
        if done < len(gpas):
            why = "no memslot backs it" if self.exit_reason == KVM_EXIT_MMIO else "the vCPU exited"
            raise KvmError(errno.EFAULT, f"guest load at {int(gpas[done]):#x} exited "
                                         f"(exit reason {self.exit_reason}): {why}")
        return bytes(out)

    def _split(self, gpa: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Cut ``[gpa, gpa + size)`` at page boundaries: one access per page."""
        if gpa < 0 or size < 0:
            raise KvmError(errno.EINVAL, "gpa and size must be non-negative")
        ps = self.vm.page_size
        first = gpa & ~(ps - 1)
        bounds = np.arange(first, gpa + size + ps, ps, dtype=np.int64) if size else np.zeros(0, np.int64)
        starts = np.maximum(bounds[:-1], gpa) if size else bounds
        ends = np.minimum(bounds[1:], gpa + size) if size else bounds
        keep = ends > starts
        return starts[keep], (ends - starts)[keep]

    # -- the engine ----------------------------------------------------------------

    def _run(self, gfns: np.ndarray, write: bool,
             commit: Callable[[int, int, list, np.ndarray], None]) -> int:
        """Execute accesses to ``gfns`` in order; returns how many completed."""
        vm = self.vm
        self.exit_reason = None
        self._pending_exit = None
        if not len(gfns):
            return 0
        if self.dirty_ring is not None and self.dirty_ring.soft_full:
            # kvm_dirty_ring_check_request: no guest entry until a reset makes room.
            self.exit_reason = KVM_EXIT_DIRTY_RING_FULL
            vm.stats["dirty_ring_full_exits"] += 1
            return 0
        run = _AccessRun(self, gfns, write, commit)
        with vm.event_cursor() as events:
            self.guest_lock.acquire()
            try:
                run.classify()
                while (i := run.next_candidate()) is not None:
                    u = int(run.inv[i])
                    ms = run.slots[run.uslot[u]]
                    kind, via_tlb_only = self._classify_one(int(run.uniq[u]), ms, write)
                    if via_tlb_only:
                        run.tlb_only.add(u)
                    if kind == FAST:
                        continue
                    batch = run.gather(i, kind)
                    run.commit_until(i)
                    self.guest_lock.release()
                    try:
                        if len(batch) > 1:
                            done = self._exit_to_kvm_batch(ms, run.uniq[run.inv[batch]], kind, write, run.retries, i)
                        else:
                            self._exit_to_kvm(ms, int(run.uniq[u]), kind, write, run.retries, i)
                            done = 1
                    finally:
                        self.guest_lock.acquire()
                    if self._pending_exit is not None:
                        # The exit follows the last fault KVM took: the accesses before it ran.
                        run.stop = int(batch[done - 1])
                        self.exit_reason = self._pending_exit
                        break
                    run.after_exit(batch, events.new())
                run.commit_until(run.stop)
            finally:
                self.guest_lock.release()
        if self.exit_reason == KVM_EXIT_DIRTY_RING_FULL:
            vm.stats["dirty_ring_full_exits"] += 1
        self._exit_to_user()
        return run.stop

    def _exit_to_kvm(self, ms: Memslot, gfn: int, kind: int, write: bool, retries: dict[int, tuple[int, int]],
                     i: int) -> None:
        """Handle one access that needs KVM (or the hardware's D-bit update)."""
        vm = self.vm
        if kind == SET_DIRTY:
            self._set_dirty(ms, np.array([gfn], np.int64))
            return
        # A fault on a leaf that is not what the last handling of this access left
        # means another thread changed it meanwhile: not the arch's failure.
        tries, left = retries.get(i, (0, -1))
        tries = tries + 1 if vm.pgtable.leaf(gfn).pte == left else 1
        if tries > MAX_FAULT_RETRIES:
            raise ArchBugError(f"arch {vm.arch!r}: a {'write' if write else 'read'} fault on gfn {gfn:#x} "
                               f"is still not resolved after {MAX_FAULT_RETRIES} tries")
        if i in retries:
            vm.stats["fault_retries"] += 1
        vm.stats["write_faults" if write else "read_faults"] += 1
        with vm.mmu_lock:
            vm.hook.kvm_arch_handle_stage2_fault(kvm=vm, vcpu=self, slot=ms, gfn=gfn, write=write)
            retries[i] = (tries, vm.pgtable.leaf(gfn).pte)

    def _exit_to_kvm_batch(self, ms: Memslot, gfns: np.ndarray, kind: int, write: bool,
                           retries: dict[int, tuple[int, int]], first: int) -> int:
        """Handle a run of accesses that each need KVM in one call (see
        :meth:`_AccessRun.gather`); faults the arch will not take in bulk go one by one.
        Returns how many of them KVM took (at least the first)."""
        vm = self.vm
        gfns = gfns.astype(np.int64)
        if kind == SET_DIRTY:
            self._set_dirty(ms, gfns)
            return len(gfns)
        with vm.mmu_lock:
            done = int(vm.hook.kvm_arch_handle_stage2_faults_batch(kvm=vm, vcpu=self, slot=ms, gfns=gfns,
                                                                   write=write) or 0)
        vm.stats["write_faults" if write else "read_faults"] += done
        if not done:
            self._exit_to_kvm(ms, int(gfns[0]), kind, write, retries, first)
        return max(done, 1)

    def _set_dirty(self, ms: Memslot, gfns: np.ndarray) -> None:
        """The hardware sets the D bit of the leaves mapping ``gfns``, in order."""
        vm = self.vm
        vm.pgtable.set_bits(gfns, PTE_D)
        vm.stats["hw_dirty_bits_set"] += len(gfns)
        vm.hook.kvm_arch_hw_set_dirty(kvm=vm, vcpu=self, slot=ms, gfns=gfns)

    def _exit_to_user(self) -> None:
        self.vm.stats["vcpu_exits"] += 1
        self.vm.hook.kvm_arch_vcpu_exit(kvm=self.vm, vcpu=self)

    def _tlb_states(self, uniq: np.ndarray, uslot: np.ndarray, slots: list[Memslot]) -> np.ndarray:
        states = np.zeros(len(uniq), np.uint8)
        for k in distinct(uslot[uslot >= 0]):
            m = uslot == k
            states[m] = self.tlb.states(slots[k], uniq[m] - slots[k].base_gfn)
        return states

    def _classify(self, uniq: np.ndarray, uslot: np.ndarray, slots: list[Memslot],
                  write: bool) -> tuple[np.ndarray, np.ndarray]:
        """Per page: FAST, SET_DIRTY or FAULT, and whether it is fast only through a
        cached translation the page tables no longer grant."""
        tlb = self._tlb_states(uniq, uslot, slots)
        pte = self.vm.pgtable.lookup(uniq).pte
        if write:
            wd = np.uint64(PTE_VALID | PTE_W | PTE_D)
            pt_fast = (pte & wd) == wd
            pt_w = (pte & np.uint64(PTE_VALID | PTE_W)) == (PTE_VALID | PTE_W)
            tlb_fast = tlb == TLB_WRITE_DIRTY
            cls = np.where(tlb_fast | pt_fast, FAST, np.where(pt_w, SET_DIRTY, FAULT))
        else:
            pt_fast = (pte & np.uint64(PTE_VALID)) != 0
            tlb_fast = tlb != TLB_INVALID
            cls = np.where(tlb_fast | pt_fast, FAST, FAULT)
        return cls, tlb_fast & ~pt_fast

    def _classify_one(self, gfn: int, ms: Memslot, write: bool) -> tuple[int, bool]:
        tlb = self.tlb.state(ms, gfn - ms.base_gfn)
        pte = self.vm.pgtable.leaf(gfn).pte
        if write:
            pt_fast = pte & (PTE_VALID | PTE_W | PTE_D) == PTE_VALID | PTE_W | PTE_D
            tlb_fast = tlb == TLB_WRITE_DIRTY
            if tlb_fast or pt_fast:
                return FAST, tlb_fast and not pt_fast
            return (SET_DIRTY if pte & (PTE_VALID | PTE_W) == PTE_VALID | PTE_W else FAULT), False
        pt_fast = bool(pte & PTE_VALID)
        tlb_fast = tlb != TLB_INVALID
        return (FAST if tlb_fast or pt_fast else FAULT), tlb_fast and not pt_fast

    def _fill(self, uniq: np.ndarray, a: int, b: int, uslot: np.ndarray, inv: np.ndarray,
              slots: list[Memslot], write: bool) -> None:
        """Cache the translations accesses ``[a, b)`` used, where the TLB did not serve them."""
        if a >= b:
            return
        if b - a <= 8:
            for u in set(inv[a:b].tolist()):
                self._fill_one(int(uniq[u]), slots[uslot[u]], write)
            return
        seen = np.zeros(len(uniq), bool)
        seen[inv[a:b]] = True
        us = np.flatnonzero(seen)
        pages, pslot = uniq[us], uslot[us]
        cached = self._tlb_states(pages, pslot, slots)
        missing = (cached != TLB_WRITE_DIRTY) if write else (cached == TLB_INVALID)
        pages, pslot = pages[missing], pslot[missing]
        if not len(pages):
            return
        leaves = self.vm.pgtable.lookup(pages)
        state = np.where((leaves.pte & np.uint64(PTE_W)) == 0, TLB_READ,
                         np.where((leaves.pte & np.uint64(PTE_D)) != 0, TLB_WRITE_DIRTY, TLB_WRITE)).astype(np.uint8)
        valid = leaves.level != NO_LEVEL
        page_leaf = valid & (leaves.level == LAST_LEVEL)
        for k in distinct(pslot):
            ms = slots[k]
            m = page_leaf & (pslot == k)
            self.tlb.fill(ms, pages[m] - ms.base_gfn, state[m])
        block = valid & (leaves.level != LAST_LEVEL)
        if block.any():
            geo = self.vm.geometry
            seen = set()
            for g, lv, st, k in zip(pages[block].tolist(), leaves.level[block].tolist(),
                                    state[block].tolist(), pslot[block].tolist()):
                span = geo.level_pages(lv)
                base = g & ~(span - 1)
                if (base, lv, k) in seen:
                    continue
                seen.add((base, lv, k))
                ms = slots[k]
                self.tlb.fill_range(ms, base - ms.base_gfn, base + span - ms.base_gfn, st)

    def _fill_one(self, gfn: int, ms: Memslot, write: bool) -> None:
        """:meth:`_fill` for one page (short segments are the common case between faults)."""
        cached = self.tlb.state(ms, gfn - ms.base_gfn)
        if cached == TLB_WRITE_DIRTY or (not write and cached != TLB_INVALID):
            return
        leaf = self.vm.pgtable.leaf(gfn)
        if leaf.level == NO_LEVEL:
            return
        state = TLB_READ if not leaf.pte & PTE_W else TLB_WRITE_DIRTY if leaf.pte & PTE_D else TLB_WRITE
        self.tlb.fill_range(ms, leaf.base_gfn - ms.base_gfn, leaf.base_gfn + leaf.pages - ms.base_gfn, state)


class _AccessRun:
    """The state of one batch of accesses while a vCPU executes it.

    Accesses are indexed 0..n-1 in program order.  ``candidates`` are the accesses
    that may need KVM: the first access to each page that was not FAST when the run
    was classified, plus later accesses to pages whose mappings or cached
    translations changed since.  Accesses before ``done`` have completed.
    """

    def __init__(self, vcpu: Vcpu, gfns: np.ndarray, write: bool,
                 commit: Callable[[int, int, list, np.ndarray], None]) -> None:
        self.vcpu = vcpu
        self.write = write
        self._commit = commit
        self.n = n = len(gfns)
        if n > 1 and (np.diff(gfns) > 0).all():  # already distinct and ascending: a sweep
            self.uniq, self.inv = gfns, np.arange(n)
        else:
            self.uniq, inv = np.unique(gfns, return_inverse=True)
            self.inv = inv.ravel()
        self.uslot, self.slots = vcpu.vm.slots_for(self.uniq)
        self.slot_idx = self.uslot[self.inv]
        bad = self.uslot < 0
        if write:
            bad |= np.array([s.readonly for s in self.slots] + [False])[self.uslot]
        self.stop = n
        if bad.any():
            self.stop = int(np.argmax(bad[self.inv]))
            vcpu.exit_reason = KVM_EXIT_MMIO
        order = self.inv if self.uniq is gfns else np.argsort(self.inv, kind="stable")
        self._keys = self.inv[order].astype(np.int64) * n + order
        self.done = 0
        self.retries: dict[int, tuple[int, int]] = {}
        self.tlb_only: set[int] = set()
        self._heap: list[int] = []
        self._initial = np.zeros(0, np.int64)
        self._pos = 0

    def classify(self) -> None:
        """Classify every page once; later changes mark pages ``_stale`` to look at again."""
        self._cls, tlb_only = self.vcpu._classify(self.uniq, self.uslot, self.slots, self.write)
        self._stale = np.zeros(len(self.uniq), bool)
        firsts = self._keys[np.searchsorted(self._keys, np.arange(len(self.uniq), dtype=np.int64) * self.n)] % self.n
        initial = firsts[self._cls != FAST]
        self._initial = initial if (np.diff(initial) >= 0).all() else np.sort(initial)
        self.tlb_only = set(np.nonzero(tlb_only)[0].tolist())

    def _classes(self, us: np.ndarray) -> np.ndarray:
        """The current class of pages ``us``, classifying again only the stale ones."""
        stale = us[self._stale[us]]
        if len(stale):
            self._cls[stale], _ = self.vcpu._classify(self.uniq[stale], self.uslot[stale], self.slots, self.write)
            self._stale[stale] = False
        return self._cls[us]

    def next_candidate(self) -> int | None:
        heap, initial = self._heap, self._initial
        if heap and (self._pos >= len(initial) or heap[0] <= initial[self._pos]):
            i = heapq.heappop(heap)
            if self._pos < len(initial) and initial[self._pos] == i:
                self._pos += 1  # queued twice: from the start and again after a change
        elif self._pos < len(initial):
            i = int(initial[self._pos])
            self._pos += 1
        else:
            return None
        return i if i < self.stop else None

    def next_use(self, us: np.ndarray, pos: int) -> np.ndarray:
        """The first access at or after ``pos`` to each page ``us`` (``n`` if none)."""
        n, keys = self.n, self._keys
        at = np.searchsorted(keys, us.astype(np.int64) * n + pos)
        hit = keys[np.minimum(at, n - 1)]
        return np.where((at < n) & (hit // n == us), hit % n, n)

    def gather(self, i: int, kind: int) -> np.ndarray:
        """Access ``i`` and the candidates after it that KVM can take in the same call.

        They must be first accesses to distinct pages of the same slot, of the same
        kind now, with nothing else pending before the last of them; faults batch only
        where the arch has the batched fault hook and no stale cached translation could
        be invalidated under them.  With a dirty ring only faults batch, only for an arch
        that pushes in order (``ArchInfo.batched_faults_with_ring``), and no more than
        the ring takes before its soft limit: a soft-full exit can only follow the last.
        """
        vm = self.vcpu.vm
        one = np.array([i], np.int64)
        if self._pos >= len(self._initial):
            return one
        if kind == FAULT and (self.tlb_only or
                              not vm.hook.kvm_arch_handle_stage2_faults_batch.get_hookimpls()):
            return one
        size = MAX_BATCH
        ring = self.vcpu.dirty_ring
        if ring is not None:
            if kind != FAULT or not vm.info.batched_faults_with_ring:
                return one
            size = ring.soft_limit - ring.used   # pushes until soft-full, that one included
        limit = min(self._heap[0] if self._heap else self.n, self.stop)
        more = self._initial[self._pos:self._pos + max(size - 1, 0)]
        more = more[(more < limit) & (more > i)]
        us = self.inv[more]
        ok = (self.uslot[us] == self.uslot[self.inv[i]]) & (self._classes(us) == kind)
        take = len(ok) if ok.all() else int(np.argmin(ok))
        self._pos += take
        return np.concatenate([one, more[:take]])

    def commit_until(self, i: int) -> None:
        """Complete accesses ``[done, i)``: cache their translations, store their data."""
        self.vcpu._fill(self.uniq, self.done, i, self.uslot, self.inv, self.slots, self.write)
        self._commit(self.done, i, self.slots, self.slot_idx)
        self.done = max(self.done, i)

    def after_exit(self, batch: np.ndarray, events: list[Event]) -> None:
        """Queue what must be looked at again after KVM ran: the accesses just handled
        (their retry), and later accesses to pages whose translations were restricted."""
        first = int(batch[0])
        if len(batch) == 1:
            heapq.heappush(self._heap, first)
            self._stale[self.inv[first]] = True
        else:
            us = self.inv[batch]
            self._stale[us] = True
            self._push(batch[self._classes(us) != FAST])
        # Granted pages may need KVM no more: look again before batching them.
        self._stale[ranges.expand(*np.searchsorted(self.uniq, _runs_of(events, "grant")))] = True
        restricted = []
        lo, hi = _runs_of(events, "tlb")
        if len(lo) and self.tlb_only:
            tlb_only = np.array(sorted(self.tlb_only), np.int64)
            gone = tlb_only[ranges.covered(self.uniq[tlb_only], lo, hi)]
            self.tlb_only.difference_update(gone.tolist())
            restricted.append(gone)
        lo, hi = _runs_of(events, "pt")
        if len(lo):
            restricted.append(ranges.expand(*np.searchsorted(self.uniq, [lo, hi])))
        if restricted:
            us = unique(np.concatenate(restricted))
            self._stale[us] = True
            self._push(self.next_use(us, first + 1))

    def _push(self, accesses: np.ndarray) -> None:
        """Queue accesses (indices; ``n`` and beyond mean none) to be looked at in order."""
        accesses = accesses[accesses < self.n].tolist()
        if len(accesses) > 8:
            self._heap.extend(accesses)
            heapq.heapify(self._heap)
        else:
            for j in accesses:
                heapq.heappush(self._heap, j)


def _runs_of(events: list[Event], kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``[start, end)`` runs of the events of one kind, as two arrays."""
    picked = [(np.atleast_1d(lo), np.atleast_1d(hi)) for k, lo, hi in events if k == kind]
    if not picked:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate([lo for lo, _ in picked]), np.concatenate([hi for _, hi in picked])
