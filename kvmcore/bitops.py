"""Bit operations on arrays of bitmap words: ``__ffs`` / ``__fls`` without a loop per word."""

import numpy as np


def ffs_fls(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``__ffs`` and ``__fls + 1`` of each non-zero word (uint32 or uint64): the bounds of
    the range from its lowest to its highest set bit."""
    m = np.asarray(masks).astype(np.uint64)
    first = np.bitwise_count((m & (~m + np.uint64(1))) - np.uint64(1)).astype(np.int64)
    smear = m.copy()
    for shift in (1, 2, 4, 8, 16, 32):
        smear |= smear >> np.uint64(shift)
    return first, np.bitwise_count(smear).astype(np.int64)


def contiguous(masks: np.ndarray) -> np.ndarray:
    """Whether each non-zero word's set bits form one run (so ``[ffs, fls]`` is exact)."""
    m = np.asarray(masks).astype(np.uint64)
    first, _ = ffs_fls(m)
    run = m >> first.astype(np.uint64)
    return (run & (run + np.uint64(1))) == 0


def bit_positions(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every set bit of 64-bit words, as (word index, bit) arrays in ascending order."""
    m = np.ascontiguousarray(np.asarray(masks).astype("<u8"))
    flat = np.flatnonzero(np.unpackbits(m.view(np.uint8), bitorder="little").view(bool))
    return flat >> 6, flat & 63
