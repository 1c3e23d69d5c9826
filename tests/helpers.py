"""Small tools the tests share."""

import numpy as np

import kvmcore
from kvmcore.memslot import pages_from_bitmap

LOG = kvmcore.KVM_MEM_LOG_DIRTY_PAGES


def dirty_pages(bitmap) -> set[int]:
    """The page offsets a dirty bitmap reports."""
    return set(pages_from_bitmap(bitmap).tolist())


def page_gpas(vm, slot_base_gpa: int, offsets, byte: int = 0) -> np.ndarray:
    """One 8-byte aligned gpa in each page offset of a slot."""
    offsets = np.asarray(offsets, np.int64)
    return slot_base_gpa + offsets * vm.page_size + (byte & ~7)


def full_mask(vm) -> int:
    return (1 << vm.bits_per_long) - 1
