"""What 32-bit arm and arm64 share: the stage-2 rules of ``arch/arm/kvm/mmu.c`` (v3.19,
which both built) that ``arch/arm64/kvm/mmu.c`` keeps today.

A helper package, not an arch: it registers no hooks.  :mod:`arch_plugins.arm` and
:mod:`arch_plugins.arm64` call these functions from their own hook implementations;
:mod:`arch_plugins.arm_common.fastpath` drives their batched fault hooks.
"""

from arch_plugins.arm_common.mmu import (
    blocks_in_range,
    commit_wants_write_protect,
    fault_supports_stage2_huge_mapping,
    huge_mapping_level,
    mask_range,
    mask_ranges,
    prepare_memory_region,
    stage2_wp_range,
    wp_memory_region,
)

__all__ = [
    "blocks_in_range", "commit_wants_write_protect", "fault_supports_stage2_huge_mapping",
    "huge_mapping_level", "mask_range", "mask_ranges", "prepare_memory_region", "stage2_wp_range",
    "wp_memory_region",
]
