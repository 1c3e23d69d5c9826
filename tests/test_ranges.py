"""The range helpers against their one-range-at-a-time definitions."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmcore import ranges

spans = st.lists(st.tuples(st.integers(0, 300), st.integers(0, 40)), max_size=12)


@settings(max_examples=200, deadline=None)
@given(spans)
def test_expand_lists_every_integer_of_every_range_in_order(pairs):
    starts = np.array([s for s, _ in pairs], np.int64)
    ends = np.array([s + n for s, n in pairs], np.int64)
    assert ranges.expand(starts, ends).tolist() == [x for s, n in pairs for x in range(s, s + n)]


@settings(max_examples=200, deadline=None)
@given(spans, st.lists(st.integers(-5, 350), max_size=30))
def test_covered_is_membership_in_any_range(pairs, points):
    starts = np.array([s for s, _ in pairs], np.int64)
    ends = np.array([s + n for s, n in pairs], np.int64)
    got = ranges.covered(np.array(points, np.int64), starts, ends).tolist()
    assert got == [any(s <= p < s + n for s, n in pairs) for p in points]


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(0, 200)), st.sampled_from([1, 8]))
def test_runs_merge_exactly_the_adjacent_values(values, step):
    first = np.array(sorted(v * step for v in values), np.int64)
    lo, hi = ranges.runs(first, step)
    assert ranges.expand(lo // step, hi // step).tolist() == sorted(values)
    assert (lo[1:] > hi[:-1]).all()     # maximal: no two runs touch


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(1, 40)), max_size=12), st.sampled_from([1, 4, 16]))
def test_split_at_cuts_at_multiples_and_keeps_every_integer(pairs, size):
    starts = np.array([s for s, _ in pairs], np.int64)
    ends = np.array([s + n for s, n in pairs], np.int64)
    lo, hi = ranges.split_at(starts, ends, size)
    assert ranges.expand(lo, hi).tolist() == ranges.expand(starts, ends).tolist()
    assert ((lo // size) == ((hi - 1) // size)).all()

