"""The ``geometry`` check: what an arch says about its tables and itself must add up.

Mirrors the arithmetic of ``kvm_init_stage2_mmu`` / ``kvm_pgd_pages`` (arm64) and the
bitmap layout of ``kvm_get_dirty_log_protect``: a root of up to 16 concatenated tables
covers exactly the IPA space, blocks sit on table levels, and a GET hands back words
of the arch's BITS_PER_LONG.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

import kvmcore
from kvmcore import uapi
from kvmcore.errors import KvmError
from kvmcore.geometry import LAST_LEVEL
from kvmcore.memslot import word_dtype
from kvmcore.testing.checks import GeometryFailure

PAGE_SIZES = (4096, 16384, 65536)


def geometry_problems(vm) -> list[str]:
    """Every inconsistency between the VM's geometry, its arch info and its options
    (those given and the defaults)."""
    g, info, options = vm.geometry, vm.info, vm.options
    out = []
    if g.bits_per_long not in (32, 64):
        out.append(f"bits_per_long is {g.bits_per_long}, not 32 or 64")
    if info.bits_per_long != g.bits_per_long:
        out.append(f"ArchInfo says BITS_PER_LONG {info.bits_per_long}, the geometry {g.bits_per_long}")
    if g.page_size not in PAGE_SIZES:
        out.append(f"page size {g.page_size} is not a granule (4K, 16K, 64K)")
    if "granule" in options and g.page_size != options["granule"]:
        out.append(f"option granule={options['granule']} but the page size is {g.page_size}")
    if "ipa_bits" in options and g.ipa_bits != options["ipa_bits"]:
        out.append(f"option ipa_bits={options['ipa_bits']} but the geometry has {g.ipa_bits}")
    if g.entries(g.start_level) * g.level_size(g.start_level) != 1 << g.ipa_bits:
        out.append(f"{g.entries(g.start_level)} root entries x {g.level_size(g.start_level)} bytes do not "
                   f"cover the {g.ipa_bits}-bit IPA space")
    tables = g.concatenated_tables
    if not 1 <= tables <= 16 or tables & (tables - 1):
        out.append(f"{tables} concatenated root tables (must be a power of two, at most 16)")
    bad = sorted(lv for lv in g.block_levels if not g.start_level <= lv < LAST_LEVEL)
    if bad:
        out.append(f"block levels {bad} are not table levels {g.start_level}..{LAST_LEVEL - 1}")
    again = vm.hook.kvm_arch_geometry(options=vm.options)
    if again != g:
        out.append("kvm_arch_geometry gives a different geometry for the same options")
    caps = info.manual_dirty_log_caps
    if not caps & uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE or caps & ~uapi.KVM_DIRTY_LOG_MANUAL_CAPS:
        out.append(f"manual_dirty_log_caps {caps:#x} must include PROTECT_ENABLE and nothing beyond "
                   f"{uapi.KVM_DIRTY_LOG_MANUAL_CAPS:#x}")
    if info.nr_address_spaces < 1 or info.user_mem_slots < 1:
        out.append("an arch needs at least one address space and one memslot")
    return out


def bitmap_problems(arch: Any, options: Mapping[str, Any]) -> list[str]:
    """GET on a fresh logging slot returns ceil(npages / BPL) words of the arch's long."""
    vm = kvmcore.create_vm(arch, **options)
    bpl = vm.bits_per_long
    npages = 3 * bpl + 5
    for gfn in (0, 1 << 9, 1 << 18):  # the first place the arch accepts
        if gfn + npages >= vm.geometry.max_gfn:
            break
        try:
            vm.set_user_memory_region(0, gfn * vm.page_size, npages * vm.page_size, uapi.KVM_MEM_LOG_DIRTY_PAGES)
        except KvmError:
            continue
        bitmap = vm.get_dirty_log(0)
        want = np.dtype(word_dtype(bpl)) if bpl in (32, 64) else None
        if bitmap.dtype != want or len(bitmap) != -(-npages // bpl):
            return [f"GET on a {npages}-page slot returned {len(bitmap)} words of {bitmap.dtype}, "
                    f"not {-(-npages // bpl)} of {want}"]
        return []
    return ["no logging slot of a few pages could be created near gfn 0"]


def check_geometry(arch: Any, options: Mapping[str, Any]) -> None:
    """Raise :class:`GeometryFailure` naming every problem found."""
    vm = kvmcore.create_vm(arch, **options)
    problems = geometry_problems(vm) + bitmap_problems(arch, options)
    if problems:
        raise GeometryFailure("; ".join(problems))
