"""Bit operations on arrays of bitmap words: ``__ffs`` / ``__fls`` without a loop per word."""

import numpy as np


def ffs_fls(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``__ffs`` and ``__fls + 1`` of each non-zero word (uint32 or uint64): the bounds of
    the range from its lowest to its highest set bit."""
    m = np.asarray(masks).astype(np.uint64)
    first = np.bitwise_count((m & (~m + np.uint64(1))) - np.uint64(1)).astype(np.int64)
    return first, np.bitwise_count(_smear(m)).astype(np.int64)


def _smear(m: np.ndarray) -> np.ndarray:
    """Every bit at or below each word's highest set bit (words of any unsigned dtype)."""
    smear = m.copy()
    shift = 1
    while shift < m.dtype.itemsize * 8:
        smear |= smear >> m.dtype.type(shift)
        shift *= 2
    return smear


def spans(masks: np.ndarray) -> np.ndarray:
    """Each word with every bit from its lowest to its highest set bit set: the
    ``[__ffs, __fls]`` range of a word as a mask of the same dtype (0 stays 0)."""
    m = np.asarray(masks)
    one = m.dtype.type(1)
    return _smear(m) & ~((m & (~m + one)) - one)


def bit_positions(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every set bit of words (any unsigned dtype), as (word index, bit) arrays in
    ascending order."""
    masks = np.asarray(masks)
    width = masks.dtype.itemsize * 8
    if (np.bitwise_count(masks) == 1).all():   # one bit per word: its index, no unpacking
        return np.arange(len(masks)), np.bitwise_count(masks - masks.dtype.type(1)).astype(np.int64)
    m = np.ascontiguousarray(masks.astype(masks.dtype.newbyteorder("<")))
    flat = np.flatnonzero(np.unpackbits(m.view(np.uint8), bitorder="little").view(bool))
    return flat // width, flat % width
