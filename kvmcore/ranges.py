"""Arrays of half-open ranges ``[starts[i], ends[i])``: expanded, split and tested
without a loop per range (page runs, bitmap-word ranges, change events)."""

from __future__ import annotations

import numpy as np


def expand(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Every integer of every range, range after range (ranges may be empty)."""
    starts = np.asarray(starts, np.int64)
    if len(starts) == 1:  # the common case of one range, without the bookkeeping
        return np.arange(starts[0], max(int(starts[0]), int(ends[0])), dtype=np.int64)
    lens = np.maximum(np.asarray(ends, np.int64) - starts, 0)
    total = int(lens.sum())
    return np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(total, dtype=np.int64)


def split_at(starts: np.ndarray, ends: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut non-empty ranges at multiples of ``size``, keeping their order."""
    pieces = (ends - 1) // size - starts // size + 1
    if (pieces == 1).all():
        return starts, ends
    first = np.repeat(starts, pieces)
    k = np.arange(int(pieces.sum())) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    lo = np.where(k == 0, first, (first // size + k) * size)
    return lo, np.minimum(np.repeat(ends, pieces), (lo // size + 1) * size)


def covered(points: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Whether each of ``points`` lies in at least one of the ranges (which may overlap):
    more ranges have started at or before it than have ended at or before it."""
    points = np.asarray(points, np.int64)
    began = np.searchsorted(np.sort(np.asarray(starts, np.int64)), points, side="right")
    ended = np.searchsorted(np.sort(np.asarray(ends, np.int64)), points, side="right")
    return began > ended


def runs(first: np.ndarray, step: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, distinct values ``first`` (each standing for ``[v, v + step)``) merged
    into maximal contiguous ranges."""
    if not len(first):
        return first, first
    breaks = np.flatnonzero(np.diff(first) != step)
    return first[np.r_[0, breaks + 1]], first[np.r_[breaks, len(first) - 1]] + step
