"""arm64 stage 2 on the model of ``kvm_pgtable`` (``arch/arm64/kvm/mmu.c``,
``arch/arm64/kvm/hyp/pgtable.c``, ``arch/arm64/include/asm/kvm_pgtable.h``).

Geometry as arithmetic, the fault path (``user_mem_abort``), and eager page
splitting (``kvm_mmu_split_huge_pages`` → ``kvm_pgtable_stage2_split``).  Every
break-before-make pays its TLB invalidation: a valid leaf by IPA (with its level), a
table by range (``stage2_try_break_pte``).  Leaves carry the model's D bit: KVM does
not use hardware dirty state (DBM) at stage 2, so write permission alone traps.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import numpy as np

from arch_plugins.arm_common import blocks_in_range, huge_mapping_level
from arch_plugins.arm_common.fastpath import handle_faults_batch, no_tlbi
from kvmcore.errors import KvmError
from kvmcore.geometry import LAST_LEVEL, Geometry
from kvmcore.pgtable import PTE_D, PTE_W, Leaf, Leaves

if TYPE_CHECKING:
    from kvmcore.memslot import Memslot
    from kvmcore.vcpu import Vcpu
    from kvmcore.vm import Vm

GRANULES = {4096: 12, 16384: 14, 65536: 16}
ARM64_MIN_PARANGE_BITS = 32
KVM_PHYS_SHIFT = 40                    # the default IPA size
IPA_LIMIT = {4096: 48, 16384: 48, 65536: 52}   # kvm_ipa_limit: > 48 bits needs LPA (64K pages)
MAX_TLBI_RANGE_PAGES = 32 << 16        # __TLBI_RANGE_PAGES(31, 3)


# -- geometry --------------------------------------------------------------------------

def stage2_pgtable_levels(ipa_bits: int, page_shift: int) -> int:
    """``stage2_pgtable_levels`` = ``ARM64_HW_PGTABLE_LEVELS(ipa - 4)``, at least 2
    (``kvm_get_vtcr``: "Use a minimum 2 level page table")."""
    return max(2, (ipa_bits - 4 - 4) // (page_shift - 3))


def kvm_pgd_pages(ipa_bits: int, start_level: int, page_shift: int) -> int:
    """``kvm_pgd_pages``: the concatenated start-level tables, from the index of the
    last IPA at the level above the start (``__kvm_pgd_page_idx(pgt, -1ULL) + 1``)."""
    shift_above = (page_shift - 3) * (LAST_LEVEL - (start_level - 1)) + page_shift
    return (((1 << ipa_bits) - 1) >> shift_above) + 1


def kvm_pgtable_min_block_level(page_shift: int) -> int:
    """``KVM_PGTABLE_MIN_BLOCK_LEVEL``: 1 with 4K pages (1 GiB blocks), else 2."""
    return 1 if page_shift == 12 else 2


def supported_block_sizes(page_shift: int) -> int:
    """``kvm_supported_block_sizes``: a bitmap of the block sizes of the granule
    (``KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES``)."""
    res = 0
    for level in range(kvm_pgtable_min_block_level(page_shift), LAST_LEVEL):
        res |= 1 << ((page_shift - 3) * (LAST_LEVEL - level) + page_shift)
    return res


def kvm_is_block_size_supported(size: int, page_shift: int) -> bool:
    """``kvm_is_block_size_supported``: a power of two that is one of the block sizes."""
    return size > 0 and size & (size - 1) == 0 and bool(size & supported_block_sizes(page_shift))


def stage2_geometry(granule: object, ipa_bits: object) -> Geometry:
    """The stage-2 geometry of ``kvm_init_stage2_mmu`` / ``kvm_get_vtcr`` for a granule
    and an IPA size, or EINVAL naming the limits for a combination the kernel refuses."""
    if isinstance(granule, bool) or not isinstance(granule, int) or granule not in GRANULES:
        raise KvmError(errno.EINVAL, f"granule {granule!r}: must be one of 4096, 16384, 65536")
    page_shift = GRANULES[granule]
    limit = IPA_LIMIT[granule]
    if isinstance(ipa_bits, bool) or not isinstance(ipa_bits, int) or \
            not ARM64_MIN_PARANGE_BITS <= ipa_bits <= limit:
        raise KvmError(errno.EINVAL, f"ipa_bits {ipa_bits!r}: must be {ARM64_MIN_PARANGE_BITS}..{limit} with a "
                                     f"{granule >> 10}K granule (more than 48 bits needs 64K pages: LPA)")
    start_level = LAST_LEVEL + 1 - stage2_pgtable_levels(ipa_bits, page_shift)
    blocks = {lv for lv in range(kvm_pgtable_min_block_level(page_shift), LAST_LEVEL) if lv >= start_level}
    return Geometry(page_shift=page_shift, ipa_bits=ipa_bits, start_level=start_level, block_levels=blocks,
                    bits_per_long=64)


# -- TLB maintenance -------------------------------------------------------------------

def kvm_tlb_flush_vmid_range(kvm: Vm, gfn: int, nr_pages: int) -> None:
    """``kvm_tlb_flush_vmid_range`` with FEAT_TLBIRANGE: range TLBIs of at most
    ``MAX_TLBI_RANGE_PAGES`` pages each."""
    end = gfn + nr_pages
    while gfn < end:
        n = min(end - gfn, MAX_TLBI_RANGE_PAGES)
        kvm.tlb_flush_range(gfn, n)
        gfn += n


def _bbm_tlbi(kvm: Vm, before: Leaf):
    """The TLBI of ``stage2_try_break_pte`` for an entry ``kvm_pgtable_stage2_map``
    breaks: by IPA (with the level hint) for a valid leaf, by range for a table."""
    def tlbi(gfn: int, level: int) -> None:
        if before.valid and level == before.level:
            kvm.tlb_flush_ipa(gfn, level)
        else:
            kvm_tlb_flush_vmid_range(kvm, gfn, kvm.geometry.level_pages(level))
    return tlbi


# -- the fault path --------------------------------------------------------------------

def kvm_pgtable_stage2_relax_perms(kvm: Vm, gfn: int, leaf: Leaf, prot: int) -> None:
    """``kvm_pgtable_stage2_relax_perms``: add permissions to the existing leaf, then
    TLBI that IPA at the leaf's level."""
    kvm.pgtable.set_entry(leaf.li, leaf.row, leaf.idx, leaf.pte | prot)
    kvm.tlb_flush_ipa(gfn, leaf.level)


def kvm_pgtable_stage2_map(kvm: Vm, gfn: int, level: int, prot: int, before: Leaf) -> None:
    """``kvm_pgtable_stage2_map`` of one mapping at ``level``: a block above is broken
    (break-before-make, only the new mapping installed, the rest faults back lazily);
    a table at ``level`` is replaced whole (a block coming back)."""
    broken = kvm.pgtable.map(gfn, level, prot, tlbi=_bbm_tlbi(kvm, before))
    kvm.stats["huge_pages_split"] += sum(1 for _, lv in broken if lv < level)


def user_mem_abort(kvm: Vm, vcpu: Vcpu, slot: Memslot, gfn: int, write: bool) -> None:
    """``user_mem_abort``.

    Logging forces PAGE_SIZE and maps a read fault read-only.  A permission fault whose
    granule equals the mapping size relaxes permissions; anything else maps, breaking a
    write-protected block into a table holding just the faulting page.  When the slot
    does not log, the mapping may be a block again (``huge_mapping_level``), which is
    how blocks come back after logging is turned off.  A writable mapping marks the
    page dirty.
    """
    logging_active = slot.is_logging
    leaf = kvm.pgtable.leaf(gfn)
    fault_is_perm = leaf.valid
    level = LAST_LEVEL if logging_active else huge_mapping_level(kvm, slot, gfn)
    writable = not slot.readonly and (write or not logging_active)
    prot = PTE_D | (PTE_W if writable else 0)
    if fault_is_perm and level == leaf.level:
        kvm_pgtable_stage2_relax_perms(kvm, gfn, leaf, prot)
    else:
        kvm_pgtable_stage2_map(kvm, gfn, level, prot, leaf)
    if writable:
        kvm.mark_page_dirty_in_slot(slot, gfn, vcpu)


def user_mem_abort_batch(kvm: Vm, vcpu: Vcpu, slot: Memslot, gfns: np.ndarray, write: bool) -> int:
    """:func:`user_mem_abort` on ``gfns[0]``, ``gfns[1]``, ... for as long as each maps
    a page (see :mod:`arch_plugins.arm_common.fastpath`); returns how many.

    A run of faults on pages that are mapped (permission faults at the page's own
    granule) is one :meth:`~kvmcore.pgtable.PageTable.set_bits` and one TLBI by IPA
    per page (``kvm_pgtable_stage2_relax_perms``, counted per page); unmapped pages are
    mapped as ``kvm_pgtable_stage2_map`` maps them one by one; a writable mapping marks
    its page dirty.  The first fault under each block goes through :func:`user_mem_abort`
    itself (break-before-make of the block).
    """
    writable = not slot.readonly and (write or not slot.is_logging)
    prot = PTE_D | (PTE_W if writable else 0)

    def resolve_one(gfn: int) -> None:
        user_mem_abort(kvm, vcpu, slot, gfn, write)

    def resolve_run(run: np.ndarray, leaves: Leaves) -> None:
        relax = leaves.valid          # page leaves: nothing here is under a block
        if relax.all():
            kvm.pgtable.set_bits(run, prot)
            kvm.tlb_flush_pages(run, kind="ipa")
        else:
            if relax.any():
                kvm.pgtable.set_bits(run[relax], prot)
                kvm.tlb_flush_pages(run[relax], kind="ipa")
            unmapped = ~relax
            kvm.pgtable.map_pages(run[unmapped], prot, no_tlbi)
        if writable:
            kvm.mark_pages_dirty_in_slot(slot, run, vcpu)

    return handle_faults_batch(kvm, slot, gfns, resolve_one, resolve_run)


# -- eager page splitting --------------------------------------------------------------

def stage2_block_get_nr_page_tables(geo: Geometry, level: int) -> int:
    """``stage2_block_get_nr_page_tables``: tables needed to map a block at ``level``
    down to pages (1 + 512 for a 4K 1 GiB block, 1 for a PMD block)."""
    per_table = 1 << geo.bits_per_level
    return sum(per_table ** k for k in range(LAST_LEVEL - level))


def kvm_mmu_split_nr_page_tables(geo: Geometry, chunk_bytes: int) -> int:
    """``kvm_mmu_split_nr_page_tables``: the split cache's capacity for one chunk."""
    pmd, pud = geo.level_size(2), geo.level_size(1)
    n = -(-chunk_bytes // pmd)
    if kvm_pgtable_min_block_level(geo.page_shift) < 2:
        n += -(-chunk_bytes // pud)
    return n


def _split_block(kvm: Vm, base: int, level: int, start: int, end: int, cache: list[int]) -> bool:
    """``stage2_split_walker`` on one valid block overlapping ``[start, end)``: down to
    pages if the cache holds enough tables, else one level down and then its blocks
    that overlap the range (the walker descends into the new table).  False: -ENOMEM."""
    geo = kvm.geometry
    need = stage2_block_get_nr_page_tables(geo, level)
    to_level = LAST_LEVEL
    if cache[0] < need:
        need, to_level = 1, level + 1
    if cache[0] < need:
        return False
    kvm.pgtable.split(base, tlbi=kvm.tlb_flush_ipa, to_level=to_level)
    cache[0] -= need
    if to_level == LAST_LEVEL:
        return True
    span = geo.level_pages(to_level)
    lo = max(base, start) & ~(span - 1)
    for sub in range(lo, min(base + geo.level_pages(level), end), span):
        if not _split_block(kvm, sub, to_level, start, end, cache):
            return False
    return True


def kvm_pgtable_stage2_split(kvm: Vm, start: int, end: int, cache: list[int]) -> bool:
    """``kvm_pgtable_stage2_split`` over ``[start, end)``: every valid block overlapping
    it, in address order, is replaced by a table (break-before-make, TLBI per block);
    the new leaves keep the block's permissions."""
    for base, level in blocks_in_range(kvm, start, end):
        if not _split_block(kvm, base, level, start, end, cache):
            return False
    return True


def kvm_mmu_split_huge_pages(kvm: Vm, start: int, end: int) -> None:
    """``kvm_mmu_split_huge_pages``: split the blocks of ``[start, end)`` in chunks of
    ``split_page_chunk_size`` (none if it is 0), the split cache topped up to the
    chunk's capacity before each chunk.  Best effort: a failure stops splitting.

    Only chunks that overlap a block are visited (the others would find nothing);
    splitting never creates a block, so that set is known up front.
    """
    chunk_bytes = kvm.arch_state["split_page_chunk_size"]
    if not chunk_bytes:
        return
    geo = kvm.geometry
    chunk = chunk_bytes >> geo.page_shift
    capacity = kvm_mmu_split_nr_page_tables(geo, chunk_bytes)
    origin = start & ~(chunk - 1)
    chunks: set[int] = set()
    for base, level in blocks_in_range(kvm, start, end):
        lo = max(base, start)
        hi = min(base + geo.level_pages(level), end)
        chunks.update(range((lo - origin) // chunk, (hi - 1 - origin) // chunk + 1))
    for i in sorted(chunks):
        cs = max(start, origin + i * chunk)
        ce = min(end, origin + (i + 1) * chunk)
        if not kvm_pgtable_stage2_split(kvm, cs, ce, [capacity]):
            return
