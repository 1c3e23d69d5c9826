"""Helpers for the arm / arm64 tests: configurations, a dirty-log oracle, broken variants.

A broken variant is the real plugin with one hook replaced (or removed), registered
as a plain namespace, so each test can show that it notices the bug it is about.
"""

from __future__ import annotations

import hashlib
import types

import numpy as np
import pytest

import arch_plugins.arm
import arch_plugins.arm64
import kvmcore
from arch_plugins.arm_common import mask_range, stage2_wp_range
from kvmcore.memslot import pages_from_bitmap
from kvmcore.pgtable import NO_LEVEL, PTE_VALID, PTE_W

MODULES = {"arm": arch_plugins.arm, "arm64": arch_plugins.arm64}

# (arch, options): arm, and arm64 with each granule (plus a 4-level 4K table); each
# marked with its arch, so the tox env of another arch deselects it (tests/conftest.py).
CONFIGS = [
    pytest.param(arch, opts, id=name, marks=pytest.mark.arch(arch))
    for name, arch, opts in [
        ("arm", "arm", {}),
        ("arm64-4k", "arm64", {"granule": 4096}),
        ("arm64-4k-48", "arm64", {"granule": 4096, "ipa_bits": 48}),
        ("arm64-16k", "arm64", {"granule": 16384}),
        ("arm64-64k", "arm64", {"granule": 65536}),
    ]
]

LOG = kvmcore.KVM_MEM_LOG_DIRTY_PAGES


def variant(arch: str, name: str = "broken", **hooks):
    """The ``arch`` plugin with some hooks replaced (a hookimpl) or removed (None)."""
    mod = MODULES[arch]
    ns = types.ModuleType(f"{arch}_{name}")
    for attr in dir(mod):
        obj = getattr(mod, attr)
        if callable(obj) and hasattr(obj, "kvmcore_impl"):
            setattr(ns, attr, obj)
    for attr, impl in hooks.items():
        if impl is None:
            delattr(ns, attr)
        else:
            setattr(ns, attr, impl)
    return ns


def per_word_only(arch: str):
    """The arch without its batched protect hook: the core calls the per-word one."""
    return variant(arch, "per_word", kvm_mmu_write_protect_pt_masked_batch=None)


def per_fault_only(arch: str):
    """The arch without its batched fault hook: the core hands it one fault at a time."""
    return variant(arch, "per_fault", kvm_arch_handle_stage2_faults_batch=None)


def counting_fast_faults(arch: str):
    """The arch with its batched fault hook wrapped to record ``(len(gfns), resolved)``
    per call, in ``plugin.calls``."""
    calls: list[tuple[int, int]] = []
    real = MODULES[arch].kvm_arch_handle_stage2_faults_batch

    @kvmcore.hookimpl
    def kvm_arch_handle_stage2_faults_batch(kvm, vcpu, slot, gfns, write):
        done = real(kvm=kvm, vcpu=vcpu, slot=slot, gfns=gfns, write=write)
        calls.append((len(gfns), done))
        return done

    plugin = variant(arch, "counted", kvm_arch_handle_stage2_faults_batch=kvm_arch_handle_stage2_faults_batch)
    plugin.calls = calls
    return plugin


class DirtyOracle:
    """Tracks which pages of one slot were written since the last harvest, and checks
    that ``get_dirty_log`` reports exactly those (classic mode)."""

    def __init__(self, vm, slot: int, gpa: int, npages: int) -> None:
        self.vm, self.slot, self.gpa, self.npages = vm, slot, gpa, npages
        self.pending: set[int] = set()
        self.value = 0

    def write(self, vcpu, pages) -> None:
        pages = np.asarray(pages, np.int64)
        self.value += 1
        assert vcpu.write_many(self.gpa + pages * self.vm.page_size, self.value) == len(pages)
        self.pending.update(pages.tolist())

    def host_write(self, pages) -> None:
        """``kvm_write_guest``: marked dirty without any stage-2 mapping."""
        for p in np.asarray(pages, np.int64).tolist():
            self.vm.write_guest(self.gpa + p * self.vm.page_size, b"\x01")
            self.pending.add(p)

    def harvest(self) -> tuple[set[int], set[int]]:
        """GET; returns (written but not reported, reported but not written)."""
        bitmap = self.vm.get_dirty_log(self.slot)
        assert bitmap.dtype == (np.uint32 if self.vm.bits_per_long == 32 else np.uint64)
        got = set(pages_from_bitmap(bitmap).tolist())
        lost, extra = self.pending - got, got - self.pending
        self.pending = set()
        return lost, extra

    def check(self) -> None:
        lost, extra = self.harvest()
        assert not lost, f"lost dirty pages {sorted(lost)[:10]}"
        assert not extra, f"pages reported but never written {sorted(extra)[:10]}"


def logging_slot(vm, gpa: int, npages: int, host_page_size: int | None = None, slot: int = 0) -> DirtyOracle:
    vm.set_user_memory_region(slot, gpa, npages * vm.page_size, flags=LOG, host_page_size=host_page_size)
    return DirtyOracle(vm, slot, gpa, npages)


def state(vm) -> tuple:
    """Everything the batched and per-word hooks must agree on."""
    firsts, levels, ptes = vm.pgtable.mapped_leaves()
    order = np.lexsort((levels, firsts))
    return firsts[order].tolist(), levels[order].tolist(), ptes[order].tolist(), dict(vm.stats)


def fault_trace(arch, opts, plugin, host, manual, chunk, layout, ops, populate=True):
    """Run ``ops`` on a VM of ``plugin`` (or ``arch``); after each, everything the batched
    and per-fault hooks must agree on: the op's result, the leaves in table order (so
    tables must be allocated in the same order), the table count and every statistic;
    at the end, the memory of every page touched.

    ``layout``: per slot, ``((level-2 blocks, pages), largest blocks, extra pages)``.
    Slot ``i`` starts that many level-2 blocks and pages (mod the largest block) into
    its own region of 8 largest blocks, so slots never overlap, and bases may be
    unaligned to any block size (the host address is 1 GiB aligned, so only
    congruent bases get blocks).  Its size is ``largest blocks * largest + extra``
    pages.  Every slot is populated (one write per level-2 block: blocks where the
    host backing allows them; not with ``populate=False``), then logs, before ``ops``
    run.  ``ops`` are
    ``(name, slot, arg)``: ``write`` (page offsets), ``sweep`` (start, length, step,
    backwards), ``read`` (start, pages), ``log`` (on?), ``harvest`` (GET, then with
    manual protect CLEAR from a page derived from arg), ``populate``; page offsets are
    taken modulo the slot's size.
    """
    vm = kvmcore.create_vm(plugin or arch, **opts)
    if manual:
        vm.enable_cap(kvmcore.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, manual)
    if chunk:
        vm.enable_cap(kvmcore.KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE, vm.geometry.level_size(2))
    geo, ps = vm.geometry, vm.page_size
    big, pmd = geo.level_pages(min(geo.block_levels)), geo.level_pages(2)
    slots = []
    for i, ((blocks, pages), units, extra) in enumerate(layout):
        base = (1 + 8 * i) * big + (blocks * pmd + pages) % big
        npages = units * big + extra
        vm.set_user_memory_region(i, base * ps, npages * ps, host_page_size=host)
        slots.append((base, npages))
    vcpu = vm.create_vcpu(0)
    touched = [set() for _ in slots]
    logging = [False] * len(slots)
    out = []

    def write(i, offsets, value):
        base, npages = slots[i]
        offsets = np.asarray(offsets, np.int64) % npages
        touched[i].update(offsets.tolist())
        return vcpu.write_many((base + offsets) * ps, value)

    ops = [("populate", i, None) for i in range(len(slots)) if populate] + \
        [("log", i, True) for i in range(len(slots))] + ops
    for value, (op, i, arg) in enumerate(ops, start=1):
        i %= len(slots)
        base, npages = slots[i]
        result = None
        if op == "populate":
            result = write(i, np.arange(0, npages, pmd), value)
        elif op == "write":
            result = write(i, arg, value)
        elif op == "sweep":
            start, length, step, backwards = arg
            offsets = start + np.arange(length, dtype=np.int64) * step
            result = write(i, offsets[::-1] if backwards else offsets, value)
        elif op == "read":
            start, n = arg[0] % npages, arg[1]
            n = min(n, npages - start)
            touched[i].update(range(start, start + n))
            result = hashlib.sha1(vcpu.read((base + start) * ps, n * ps)).hexdigest()
        elif op == "log":
            logging[i] = arg
            vm.set_user_memory_region(i, base * ps, npages * ps, flags=LOG if arg else 0)
        elif op == "harvest" and logging[i]:
            bitmap = vm.get_dirty_log(i)
            result = bitmap.tolist()
            if manual:
                first = (arg % (npages // 64 + 1)) * 64
                vm.clear_dirty_log(i, first, npages - first, bitmap[first // vm.bits_per_long:])
        firsts, levels, ptes = vm.pgtable.mapped_leaves()   # in table order: rows allocated alike
        tables = hashlib.sha1(firsts.tobytes() + levels.tobytes() + ptes.tobytes()).hexdigest()
        out.append((op, result, tables, vm.pgtable.nr_tables, dict(vm.stats)))
    for i, (base, npages) in enumerate(slots):
        pages = np.array(sorted(touched[i]), np.int64)
        words = vm.memory(i).view(np.uint64)[pages * (ps // 8)]
        out.append(("memory", pages.tolist(), words.tolist()))
    return out


# -- hooks with the classic bugs ---------------------------------------------------------

def _v7_wp_range(kvm, start: int, end: int) -> None:
    """The v7 patch's walk: an empty entry is skipped with ``addr += P*D_SIZE`` from an
    unaligned address, and the loop runs ``while (addr < end)``."""
    addr = start
    while addr < end:
        leaf = kvm.pgtable.leaf(addr)
        if leaf.level != NO_LEVEL:
            if leaf.pte & (PTE_VALID | PTE_W) == PTE_VALID | PTE_W:
                kvm.pgtable.set_entry(leaf.li, leaf.row, leaf.idx, leaf.pte & ~PTE_W)
            addr = leaf.base_gfn + leaf.pages
        else:
            addr += leaf.pages


@kvmcore.hookimpl
def wp_masked_unclamped(kvm, slot, gfn_offset, mask):
    start, end = mask_range(slot.base_gfn + gfn_offset, mask)
    _v7_wp_range(kvm, start, end)


@kvmcore.hookimpl
def wp_masked_truncated(kvm, slot, gfn_offset, mask):
    """``start``/``end`` in a 32-bit ``unsigned long`` (bug #14)."""
    start, end = mask_range(slot.base_gfn + gfn_offset, mask)
    shift = kvm.page_shift
    stage2_wp_range(kvm, ((start << shift) & 0xFFFFFFFF) >> shift, ((end << shift) & 0xFFFFFFFF) >> shift)


@kvmcore.hookimpl
def wp_masked_fls_no_plus_one(kvm, slot, gfn_offset, mask):
    """``end = base + __fls(mask)``: the last page of each word stays writable (bug #7)."""
    start, end = mask_range(slot.base_gfn + gfn_offset, mask)
    stage2_wp_range(kvm, start, end - 1)


@kvmcore.hookimpl
def flush_nothing(kvm):
    """A flush hook that forgets to flush (bug #4)."""


@kvmcore.hookimpl
def flush_range_nothing(kvm, gfn, nr_pages):
    return True
