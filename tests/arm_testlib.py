"""Helpers for the arm / arm64 tests: configurations, a dirty-log oracle, broken variants.

A broken variant is the real plugin with one hook replaced (or removed), registered
as a plain namespace, so each test can show that it notices the bug it is about.
"""

from __future__ import annotations

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
