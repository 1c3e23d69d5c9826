"""The x86 plugin's VM options, its per-VM state, and its constants (``kvm_host.h``)."""

from __future__ import annotations

import errno
from collections.abc import Mapping
from typing import Any

import attrs
import numpy as np

from kvmcore.errors import KvmError
from kvmcore.geometry import LAST_LEVEL, Geometry

# Levels as kvmcore numbers them (the last level maps 4 KiB pages).
PG_LEVEL_4K = LAST_LEVEL
PG_LEVEL_2M = LAST_LEVEL - 1
PG_LEVEL_1G = LAST_LEVEL - 2
HUGE_LEVELS = (PG_LEVEL_1G, PG_LEVEL_2M)  # largest first; KVM_MAX_HUGEPAGE_LEVEL is 1G

KVM_USER_MEM_SLOTS = 32764   # KVM_MEM_SLOTS_NUM (SHRT_MAX) - KVM_PRIVATE_MEM_SLOTS (3)
KVM_ADDRESS_SPACE_NUM = 2    # normal and SMM
PML_LOG_NR_ENTRIES = 512     # one 4 KiB page of GPAs per vCPU

STAT_NAMES = (
    "fast_page_faults",            # write faults fixed by fast_page_fault (W restored, page marked dirty)
    "spurious_page_faults",        # faults that found the access already allowed
    "tlb_range_flush_fallbacks",   # range flushes done as full flushes (no Hyper-V range flush)
    "collapsible_sptes_zapped",    # logging off: SPTEs zapped so huge pages can come back
    "huge_pages_recovered",        # logging off: tables replaced in place by a huge SPTE (6.13+)
    "pml_entries_logged",          # GPAs the CPU wrote to a PML log
    "pml_buffer_flushes",          # non-empty PML logs emptied into the dirty log
    "pml_full_exits",              # PML-full VM exits
)

DEFAULTS: dict[str, Any] = {
    "levels": 4,                   # EPT page-walk length: 4 (48-bit GPA) or 5 (57-bit)
    "dirty_tracking": "wp",        # "wp": write protection; "pml": D bits + Page Modification Logging
    "eager_page_split": True,      # the kvm.eager_page_split module parameter
    "tdp_mmu": True,               # the kvm.tdp_mmu module parameter (False: the legacy direct MMU)
    "huge_page_recovery": "zap",   # logging off: "zap" collapsible SPTEs (<= 6.12), "in_place" (6.13+)
}

ALLOWED: dict[str, tuple[Any, ...]] = {
    "levels": (4, 5),
    "dirty_tracking": ("wp", "pml"),
    "eager_page_split": (True, False),
    "tdp_mmu": (True, False),
    "huge_page_recovery": ("zap", "in_place"),
}


def check_options(options: Mapping[str, Any]) -> None:
    """Refuse an option value the model does not know, naming the allowed ones."""
    for name, allowed in ALLOWED.items():
        value = options[name]
        if not any(type(value) is type(a) and value == a for a in allowed):
            raise KvmError(errno.EINVAL, f"x86 option {name}={value!r} is not allowed; "
                                         f"allowed values: {', '.join(repr(a) for a in allowed)}")


def ept_geometry(options: Mapping[str, Any]) -> Geometry:
    """``kvm_mmu_get_tdp_level`` / ``vmx_get_max_ept_level``: 4-level EPT translates 48
    GPA bits (walk starts at level 0), 5-level 57 bits (level -1); 512 entries per
    table; 2 MiB and 1 GiB leaves (``ept_caps_to_lpage_level``)."""
    check_options(options)
    levels = options["levels"]
    return Geometry(page_shift=12, ipa_bits=12 + 9 * levels, start_level=LAST_LEVEL + 1 - levels,
                    block_levels=set(HUGE_LEVELS), bits_per_long=64)


@attrs.define(eq=False)
class X86State:
    """``kvm->arch`` of one VM, as much of it as dirty logging needs.

    ``host_writable`` stands for the host's page tables: per userspace mapping, one
    flag per host page saying it is mapped writable (``hva_to_pfn`` would give KVM a
    writable pfn for a read fault).
    """

    pml: bool
    eager_page_split: bool
    tdp_mmu: bool
    recovery: str
    bugs: frozenset[str]
    nr_memslots_dirty_logging: int = 0
    host_writable: dict[int, np.ndarray] = attrs.field(factory=dict)


def state(kvm) -> X86State:
    return kvm.arch_state["x86"]
