"""State checks on a VM: what must hold between any two steps of a trace.

Each function raises the failure of its check (see :mod:`kvmcore.testing.checks`) with
a message naming the first offending pages; they are public so that a reproducer
snippet, or a plugin author's own test, can call them on any VM.

"Writable" means a write would go through without being logged: a leaf with W (and
D, if the arch logs hardware D-bit updates through ``kvm_arch_hw_set_dirty``, as x86
PML does), or a vCPU TLB entry that lets a store through without a walk
(``TLB_WRITE_DIRTY``; also ``TLB_WRITE`` for an arch that does not log D-bit updates).
"""

from __future__ import annotations

import numpy as np

from kvmcore.geometry import LAST_LEVEL
from kvmcore.memslot import Memslot, pages_from_bitmap
from kvmcore.pgtable import PTE_D, PTE_VALID, PTE_W
from kvmcore.testing.checks import BatchedHookFailure, HugePageFailure, InvariantFailure, ProtectHookFailure
from kvmcore.tlb import TLB_WRITE, TLB_WRITE_DIRTY

SHOWN = 6  # offending pages named in a message


def logs_hardware_dirty(vm) -> bool:
    """True if the arch turns hardware D-bit updates into dirty log entries (PML)."""
    return bool(vm.hook.kvm_arch_hw_set_dirty.get_hookimpls())


def _writable_leaves(vm, ptes: np.ndarray) -> np.ndarray:
    need = PTE_VALID | PTE_W | (PTE_D if logs_hardware_dirty(vm) else 0)
    return (ptes & np.uint64(need)) == np.uint64(need)


def dirty_mask(slot: Memslot) -> np.ndarray:
    """One bool per page of a logging slot: its bit in the dirty log."""
    bits = np.unpackbits(slot.dirty_bitmap.astype(slot.dirty_bitmap.dtype.newbyteorder("<")).view(np.uint8),
                         bitorder="little")
    return bits[:slot.npages].astype(bool)


def leaf_pages(geo, levels: np.ndarray) -> np.ndarray:
    """Pages one leaf at each of ``levels`` maps (``Geometry.level_pages``, vectorised)."""
    return np.left_shift(1, geo.bits_per_level * (LAST_LEVEL - levels.astype(np.int64)))


def writable_in_tables(vm, slot: Memslot) -> np.ndarray:
    """One bool per page of ``slot``: a leaf maps it writable (blocks count on every page)."""
    firsts, levels, ptes = vm.pgtable.mapped_leaves()
    pages = leaf_pages(vm.geometry, levels)
    sel = _writable_leaves(vm, ptes) & (firsts < slot.end_gfn) & (firsts + pages > slot.base_gfn)
    lo = np.maximum(firsts[sel], slot.base_gfn) - slot.base_gfn
    hi = np.minimum(firsts[sel] + pages[sel], slot.end_gfn) - slot.base_gfn
    diff = np.zeros(slot.npages + 1, np.int64)
    np.add.at(diff, lo, 1)
    np.add.at(diff, hi, -1)
    return np.cumsum(diff[:-1]) > 0


def writable_in_tlb(vm, vcpu, slot: Memslot) -> np.ndarray:
    """One bool per page of ``slot``: the vCPU's TLB would let a store through unlogged."""
    states = vcpu.tlb.states(slot, np.arange(slot.npages, dtype=np.int64))
    fast = states == TLB_WRITE_DIRTY
    if not logs_hardware_dirty(vm):
        fast |= states == TLB_WRITE
    return fast


def _where(vm, slot: Memslot, pages: np.ndarray, tables: np.ndarray, tlbs: list[np.ndarray]) -> str:
    parts = []
    for off in pages[:SHOWN].tolist():
        gfn = slot.base_gfn + off
        places = []
        if tables[off]:
            leaf = vm.pgtable.leaf(gfn)
            places.append(f"a level-{leaf.level} leaf of {leaf.pages} page(s)")
        places += [f"vCPU {vcpu.id}'s TLB" for vcpu, t in zip(vm.vcpus, tlbs) if t[off]]
        parts.append(f"gfn {gfn:#x} (slot {slot.slot} page {off}): writable in {' and '.join(places)}")
    more = f" (and {len(pages) - SHOWN} more)" if len(pages) > SHOWN else ""
    return "; ".join(parts) + more


def check_mst_invariant(vm) -> None:
    """Spec 7.17: every page of a logging slot is dirty in its log, or nothing lets a
    store to it through unlogged (no writable leaf, no writable TLB entry on any vCPU)."""
    for slot in vm.memslots:
        if slot.dirty_bitmap is None or slot.readonly:
            continue
        dirty = dirty_mask(slot)
        tables = writable_in_tables(vm, slot)
        tlbs = [writable_in_tlb(vm, vcpu, slot) for vcpu in vm.vcpus]
        writable = tables.copy()
        for t in tlbs:
            writable |= t
        bad = np.nonzero(writable & ~dirty)[0]
        if len(bad):
            raise InvariantFailure(f"{len(bad)} clean page(s) of logging slot {slot.slot} can be written "
                                   f"without being logged: {_where(vm, slot, bad, tables, tlbs)}")


def block_snapshot(vm) -> set[tuple[int, int]]:
    """The ``(first_gfn, level)`` of every block leaf, to compare across a step."""
    firsts, levels, _ = vm.pgtable.mapped_leaves()
    sel = levels < LAST_LEVEL
    return set(zip(firsts[sel].tolist(), levels[sel].tolist()))


def _inside_a_block(geo, first: int, level: int, blocks: set[tuple[int, int]]) -> bool:
    """True if a larger block in ``blocks`` covered ``first``: a read-only piece of a block
    being split one level at a time (riscv's and x86's splits) is not a new mapping."""
    return any((first & ~(geo.level_pages(lv) - 1), lv) in blocks for lv in geo.block_levels if lv < level)


def check_huge_pages(vm, blocks_before: set[tuple[int, int]] | None = None,
                     logging_before: set[int] | None = None) -> None:
    """Spec 7.10-7.12: every block is a block level of the geometry, lies inside one slot
    and within its host_page_size; no block of a logging slot is writable over clean pages;
    and no block appeared in a slot that logged throughout the step, except the read-only
    pieces of a larger block being split."""
    geo = vm.geometry
    firsts, levels, ptes = vm.pgtable.mapped_leaves()
    blocks = levels < LAST_LEVEL
    writable = _writable_leaves(vm, ptes[blocks])
    problems = []
    for first, level, w in zip(firsts[blocks].tolist(), levels[blocks].tolist(), writable.tolist()):
        pages = geo.level_pages(level)
        size = geo.level_size(level)
        what = f"level-{level} block at gfn {first:#x} ({size // 1024} KiB)"
        if level not in geo.block_levels:
            problems.append(f"{what}: level {level} is not a block level of the geometry")
        slot = vm.gfn_to_memslot(first)
        if slot is None or first + pages > slot.end_gfn:
            problems.append(f"{what} is not inside one memslot")
            continue
        if size > slot.host_page_size:
            problems.append(f"{what} is larger than slot {slot.slot}'s host pages ({slot.host_page_size} bytes)")
        if slot.dirty_bitmap is None or slot.readonly:
            continue
        if w and not dirty_mask(slot)[first - slot.base_gfn:first - slot.base_gfn + pages].all():
            problems.append(f"{what} is writable in logging slot {slot.slot} while some of its pages are clean")
        if blocks_before is not None and (first, level) not in blocks_before and \
                logging_before is not None and slot.slot in logging_before and \
                (w or not _inside_a_block(geo, first, level, blocks_before)):
            problems.append(f"{what} was created while slot {slot.slot} logs dirty pages")
    if problems:
        more = f" (and {len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
        raise HugePageFailure("; ".join(problems[:SHOWN]) + more)


def masked_pages(gfn_offsets, masks, bits_per_long: int) -> np.ndarray:
    """The slot page offsets named by ``(gfn_offsets[i], masks[i])`` pairs, sorted."""
    out = [off + bit for off, mask in zip(gfn_offsets, masks) for bit in range(bits_per_long)
           if int(mask) >> bit & 1]
    return np.array(sorted(set(out)), np.int64)


def protect_masked(vm, slot: int, gfn_offsets, masks, batched: bool = False) -> None:
    """Re-arm logging for these pages as GET/CLEAR would, but straight through the hook:
    ``kvm_mmu_write_protect_pt_masked`` once per pair (or the batched hook in one call)
    under the MMU lock, then the memslot flush the caller owes."""
    ms = vm.memslot(slot)
    with vm.mmu_lock:
        if batched:
            vm.hook.kvm_mmu_write_protect_pt_masked_batch(
                kvm=vm, slot=ms, gfn_offsets=np.asarray(gfn_offsets, np.int64),
                masks=np.asarray([int(m) for m in masks], dtype=np.uint64 if vm.bits_per_long == 64 else np.uint32))
        else:
            for off, mask in zip(gfn_offsets, masks):
                vm.hook.kvm_mmu_write_protect_pt_masked(kvm=vm, slot=ms, gfn_offset=int(off), mask=int(mask))
    vm.flush_remote_tlbs_memslot(ms)


def check_protected(vm, slot: int, gfn_offsets, masks) -> None:
    """Spec 7.9: after the hook and the flush, every masked page traps on its next write."""
    ms = vm.memslot(slot)
    pages = masked_pages(gfn_offsets, masks, vm.bits_per_long)
    tables = writable_in_tables(vm, ms)
    tlbs = [writable_in_tlb(vm, vcpu, ms) for vcpu in vm.vcpus]
    writable = tables.copy()
    for t in tlbs:
        writable |= t
    bad = pages[writable[pages]]
    if len(bad):
        pairs = ", ".join(f"({int(o)}, {int(m):#x})" for o, m in zip(gfn_offsets, masks))
        raise ProtectHookFailure(f"after kvm_mmu_write_protect_pt_masked with (gfn_offset, mask) {pairs} "
                                 f"and a flush, {len(bad)} masked page(s) are still writable: "
                                 f"{_where(vm, ms, bad, tables, tlbs)}")


def _leaves(vm) -> list[tuple[int, int, int]]:
    firsts, levels, ptes = vm.pgtable.mapped_leaves()
    return sorted(zip(firsts.tolist(), levels.tolist(), ptes.tolist()))


def check_same_effects(batched_vm, unbatched_vm) -> None:
    """The batched hooks must leave what the one-at-a-time hooks leave: the same leaves
    (addresses, levels, permission bits) and the same statistics (faults, flushes, ...)."""
    a, b = _leaves(batched_vm), _leaves(unbatched_vm)
    problems = []
    if a != b:
        only_a = sorted(set(a) - set(b))[:SHOWN]
        only_b = sorted(set(b) - set(a))[:SHOWN]
        fmt = lambda leaves: ", ".join(f"(gfn {f:#x}, level {lv}, pte {p & 0xfff:#x})" for f, lv, p in leaves)
        problems.append(f"page tables differ: only with the batched hooks: {fmt(only_a) or 'none'}; "
                        f"only without them: {fmt(only_b) or 'none'}")
    stats = sorted(k for k in set(batched_vm.stats) | set(unbatched_vm.stats)
                   if batched_vm.stats[k] != unbatched_vm.stats[k])
    if stats:
        problems.append("statistics differ: " + ", ".join(
            f"{k} {batched_vm.stats[k]} (batched) vs {unbatched_vm.stats[k]} (unbatched)" for k in stats))
    if problems:
        raise BatchedHookFailure("; ".join(problems))


def check_bitmaps_equal(batched: np.ndarray, per_word: np.ndarray, call: str) -> None:
    if batched.shape != per_word.shape or (batched != per_word).any():
        a, b = set(pages_from_bitmap(batched).tolist()), set(pages_from_bitmap(per_word).tolist())
        raise BatchedHookFailure(f"{call} differs: pages only with the batched hooks {sorted(a - b)[:SHOWN]}, "
                                 f"only without them {sorted(b - a)[:SHOWN]}")


def has_batched_hook(vm) -> bool:
    """True if this VM's core calls the batched protect hook."""
    return bool(vm.hook.kvm_mmu_write_protect_pt_masked_batch.get_hookimpls())
