"""Memslots: a range of guest frames backed by host memory, and its dirty bitmap."""

import enum

import attrs
import numpy as np

from kvmcore.uapi import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY


class MemslotChange(enum.Enum):
    """``enum kvm_mr_change``."""

    CREATE = "create"
    DELETE = "delete"
    MOVE = "move"
    FLAGS_ONLY = "flags_only"


@attrs.define(eq=False)
class Memslot:
    """``struct kvm_memory_slot``: identity, placement, flags, host memory, bitmap.

    The bitmap is words of the arch's BITS_PER_LONG; bit ``i % BPL`` of word
    ``i // BPL`` is page ``base_gfn + i``.  It exists only while the slot logs
    (and the VM uses bitmaps).  ``userspace_addr`` is the host virtual address the
    model pretends the memory is at (it decides huge-page congruence).
    """

    id: int
    as_id: int
    base_gfn: int
    npages: int
    flags: int
    userspace_addr: int
    host_page_size: int
    memory: np.ndarray = attrs.field(repr=False)
    dirty_bitmap: np.ndarray | None = attrs.field(default=None, repr=False)

    @property
    def slot(self) -> int:
        """The userspace slot number: ``as_id << 16 | id``."""
        return self.as_id << 16 | self.id

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.npages

    @property
    def dirty_track_enabled(self) -> bool:
        """``kvm_slot_dirty_track_enabled``: the slot has LOG_DIRTY_PAGES."""
        return bool(self.flags & KVM_MEM_LOG_DIRTY_PAGES)

    @property
    def readonly(self) -> bool:
        return bool(self.flags & KVM_MEM_READONLY)

    @property
    def is_logging(self) -> bool:
        """``memslot_is_logging`` (arm/arm64): a bitmap and not read-only."""
        return self.dirty_bitmap is not None and not self.readonly

    def contains(self, gfn: int) -> bool:
        return self.base_gfn <= gfn < self.end_gfn


def bitmap_words(npages: int, bits_per_long: int) -> int:
    """``kvm_dirty_bitmap_bytes`` in words: ``ALIGN(npages, BITS_PER_LONG) / BITS_PER_LONG``."""
    return -(-npages // bits_per_long)


def word_dtype(bits_per_long: int) -> type:
    return {32: np.uint32, 64: np.uint64}[bits_per_long]


def bitmap_from_pages(offsets: np.ndarray, npages: int, bits_per_long: int) -> np.ndarray:
    """A dirty bitmap with the given page offsets set (little-endian words, as the kernel)."""
    bits = np.zeros(bitmap_words(npages, bits_per_long) * bits_per_long, np.uint8)
    bits[np.asarray(offsets, np.int64)] = 1
    return np.packbits(bits, bitorder="little").view(f"<u{bits_per_long // 8}").astype(word_dtype(bits_per_long))


def pages_from_bitmap(bitmap: np.ndarray) -> np.ndarray:
    """The page offsets set in a bitmap, ascending."""
    bitmap = np.asarray(bitmap)
    le = bitmap.astype(bitmap.dtype.newbyteorder("<"), copy=False)
    return np.nonzero(np.unpackbits(le.view(np.uint8), bitorder="little"))[0]
