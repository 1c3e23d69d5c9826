"""What the guest does while it migrates: which pages it writes, and how fast.

The vocabulary is mig_mon's and the kernel selftests': a workload writes pages at a
``rate`` (the dirty rate, in pages per second), in one of these patterns:

* ``uniform``  every page equally likely;
* ``hotset``   a working set (``hot_fraction`` of the pages, scattered) takes
  ``hot_weight`` of the writes, the other pages the rest (80/20 by default);
* ``sweep``    page after page through all memory, round and round;
* ``once``     every page once, in order, then the guest idles;
* ``sparse``   a big guest that has used little of its memory: a scattered working
  set of ``working_set`` pages holds data and takes every write; the rest of memory
  was never written (zero pages, which the host has not even allocated);
* ``trace``    replay of recorded writes (``slot offset`` pairs, as a dirty-ring
  export writes them), once, in order, then the guest idles.

``write_fraction`` below 1 adds loads: the guest then also reads
``rate * (1 - f) / f`` pages per second (they never dirty a page, but take the
read-fault path).  ``device_fraction`` of the writes are done by the VMM, as
device emulation does, not by the vCPU: those pages reach the migration through
the VMM's side of the log (see :mod:`kvmcore.migration.vmmlog`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import attrs
import numpy as np

KINDS = ("uniform", "hotset", "sweep", "once", "sparse", "trace")
DEFAULT_WORKING_SET = 16384
"""Pages in the ``sparse`` working set: 64 MiB of 4K pages."""


@attrs.frozen(eq=False)
class Trace:
    """Recorded guest writes: parallel arrays of slot ids and page offsets in the slot."""

    slots: np.ndarray
    offsets: np.ndarray
    source: str = "<array>"

    def __attrs_post_init__(self) -> None:
        if self.slots.shape != self.offsets.shape or self.slots.ndim != 1:
            raise ValueError(f"trace {self.source}: slot and offset columns differ in shape")
        if not len(self.slots):
            raise ValueError(f"trace {self.source} has no entries")
        if (self.slots < 0).any() or (self.offsets < 0).any():
            raise ValueError(f"trace {self.source} has a negative slot or page offset")

    def __len__(self) -> int:
        return len(self.slots)


def load_trace(path: str | os.PathLike) -> Trace:
    """A trace from a text file (``slot gfn`` per line, ``#`` comments), a ``.npy``
    of shape (N, 2), or a ``.npz`` holding ``slot`` and ``gfn`` (or ``offset``) arrays.

    ``gfn`` is the page offset inside the slot, as a dirty-ring entry's ``offset`` is.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"trace file {path!r} does not exist")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as data:
                names = set(data.files)
                column = "gfn" if "gfn" in names else "offset" if "offset" in names else None
                if "slot" not in names or column is None:
                    raise ValueError(f"trace {path!r} needs arrays 'slot' and 'gfn' (has {sorted(names)})")
                slots, offsets = data["slot"], data[column]
        elif path.endswith(".npy"):
            array = np.load(path, allow_pickle=False)
            if array.ndim != 2 or array.shape[1] != 2:
                raise ValueError(f"trace {path!r} must be an (N, 2) array of slot, gfn; it is {array.shape}")
            slots, offsets = array[:, 0], array[:, 1]
        else:
            slots, offsets = _read_text_trace(path)
    except (OSError, EOFError) as exc:
        raise ValueError(f"cannot read trace {path!r}: {exc}") from None
    for name, column in (("slot", slots), ("gfn", offsets)):
        if not np.issubdtype(np.asarray(column).dtype, np.integer):
            raise ValueError(f"trace {path!r}: the {name} column is not integers")
    return Trace(np.asarray(slots, np.int64).ravel(), np.asarray(offsets, np.int64).ravel(), path)


def _read_text_trace(path: str) -> tuple[np.ndarray, np.ndarray]:
    slots: list[int] = []
    offsets: list[int] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split("#", 1)[0].replace(",", " ").split()
            if not fields:
                continue
            try:
                if len(fields) != 2:
                    raise ValueError
                slot, gfn = int(fields[0], 0), int(fields[1], 0)
            except ValueError:
                raise ValueError(f"trace {path!r} line {lineno}: expected 'slot gfn', got {line.strip()!r}") from None
            slots.append(slot)
            offsets.append(gfn)
    return np.array(slots, np.int64), np.array(offsets, np.int64)


def _fraction(low_open: bool):
    def check(instance, attribute, value) -> None:
        ok = isinstance(value, (int, float)) and (0 < value <= 1 if low_open else 0 <= value <= 1)
        if not ok:
            bounds = "(0, 1]" if low_open else "[0, 1]"
            raise ValueError(f"workload {attribute.name.replace('_', '-')} must be in {bounds}, not {value!r}")

    return check


@attrs.frozen(kw_only=True, eq=False)
class Workload:
    """A description of the guest's writes; :meth:`start` makes the page stream."""

    kind: str = attrs.field(default="hotset")
    rate: float = attrs.field(default=16384.0)
    write_fraction: float = attrs.field(default=1.0, validator=_fraction(low_open=True))
    device_fraction: float = attrs.field(default=0.0, validator=_fraction(low_open=False))
    hot_fraction: float = attrs.field(default=0.2, validator=_fraction(low_open=True))
    hot_weight: float = attrs.field(default=0.8, validator=_fraction(low_open=False))
    working_set: int = attrs.field(default=DEFAULT_WORKING_SET)
    trace: Trace | None = None

    @working_set.validator
    def _check_working_set(self, attribute, value) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"working set must be a whole number of pages, at least 1, not {value!r}")

    @kind.validator
    def _check_kind(self, attribute, value) -> None:
        if value not in KINDS:
            raise ValueError(f"unknown workload {value!r}; workloads are {', '.join(KINDS[:-1])}, trace:FILE")

    @rate.validator
    def _check_rate(self, attribute, value) -> None:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"dirty rate must be zero or more pages/s, not {value!r}")

    def __attrs_post_init__(self) -> None:
        if (self.kind == "trace") != (self.trace is not None):
            raise ValueError("a trace workload needs a trace, and only it takes one")

    @property
    def read_rate(self) -> float:
        """Pages the guest reads per second, besides the ``rate`` it writes."""
        return self.rate * (1 - self.write_fraction) / self.write_fraction

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"kind": self.kind, "dirty-rate": self.rate,
                                  "write-fraction": self.write_fraction, "device-fraction": self.device_fraction}
        if self.kind == "hotset":
            out.update({"hot-fraction": self.hot_fraction, "hot-weight": self.hot_weight})
        if self.kind == "sparse":
            out["working-set-pages"] = self.working_set
        if self.trace is not None:
            out.update({"trace": self.trace.source, "trace-writes": len(self.trace)})
        return out

    def start(self, slots: Sequence[tuple[int, int]], rng: np.random.Generator) -> PageStream:
        """The stream of pages this workload writes in a guest whose memory is ``slots``
        ((slot id, pages) in the order of the guest's page numbering)."""
        npages = sum(n for _, n in slots)
        if self.kind == "uniform":
            return UniformStream(npages, rng)
        if self.kind == "hotset":
            return HotSetStream.build(npages, rng, self.hot_fraction, self.hot_weight)
        if self.kind == "sweep":
            return SequenceStream(np.arange(npages, dtype=np.int64), repeat=True)
        if self.kind == "once":
            return SequenceStream(np.arange(npages, dtype=np.int64), repeat=False)
        if self.kind == "sparse":
            return SparseStream.build(npages, rng, self.working_set)
        return SequenceStream(trace_pages(self.trace, slots), repeat=False)


def trace_pages(trace: Trace, slots: Sequence[tuple[int, int]]) -> np.ndarray:
    """The trace's writes as guest page numbers; ValueError for a page the guest lacks."""
    first: dict[int, int] = {}
    sizes: dict[int, int] = {}
    base = 0
    for slot, n in slots:
        first[slot], sizes[slot] = base, n
        base += n
    known = np.array(sorted(first), np.int64)
    bad = ~np.isin(trace.slots, known)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"trace {trace.source} entry {i + 1} names slot {int(trace.slots[i])}, but the guest "
                         f"has slot(s) {', '.join(map(str, known.tolist()))}")
    size = np.zeros(int(known.max()) + 1, np.int64)
    start = np.zeros(int(known.max()) + 1, np.int64)
    size[known] = [sizes[s] for s in known.tolist()]
    start[known] = [first[s] for s in known.tolist()]
    outside = trace.offsets >= size[trace.slots]
    if outside.any():
        i = int(np.argmax(outside))
        slot = int(trace.slots[i])
        raise ValueError(f"trace {trace.source} entry {i + 1} names page {int(trace.offsets[i])} of slot {slot}, "
                         f"which has {sizes[slot]} pages: outside the guest")
    return start[trace.slots] + trace.offsets


class PageStream:
    """Pages to write next, as guest page numbers (0 .. pages of all slots)."""

    finished = False

    def take(self, n: int) -> np.ndarray:
        raise NotImplementedError


@attrs.define
class UniformStream(PageStream):
    npages: int
    rng: np.random.Generator

    def take(self, n: int) -> np.ndarray:
        return self.rng.integers(0, self.npages, n, dtype=np.int64)


@attrs.define
class HotSetStream(PageStream):
    hot: np.ndarray
    cold: np.ndarray
    hot_weight: float
    rng: np.random.Generator

    @classmethod
    def build(cls, npages: int, rng: np.random.Generator, hot_fraction: float, hot_weight: float) -> HotSetStream:
        """A scattered working set of ``hot_fraction`` of the pages (at least one)."""
        order = rng.permutation(npages).astype(np.int64)
        nhot = min(npages, max(1, round(npages * hot_fraction)))
        return cls(np.sort(order[:nhot]), np.sort(order[nhot:]), hot_weight, rng)

    def take(self, n: int) -> np.ndarray:
        to_hot = self.rng.random(n) < self.hot_weight
        if not len(self.cold):
            to_hot[:] = True
        out = np.empty(n, np.int64)
        k = int(to_hot.sum())
        out[to_hot] = self.hot[self.rng.integers(0, len(self.hot), k)]
        if n - k:
            out[~to_hot] = self.cold[self.rng.integers(0, len(self.cold), n - k)]
        return out


@attrs.define
class SparseStream(PageStream):
    """Uniform writes to a scattered working set; :attr:`populated` is that set (the
    only pages that hold data before the migration)."""

    populated: np.ndarray
    rng: np.random.Generator

    @classmethod
    def build(cls, npages: int, rng: np.random.Generator, working_set: int) -> SparseStream:
        """``working_set`` pages (at most all of them) drawn without a permutation of
        all pages, so a 1 TiB guest costs what its working set does."""
        k = min(npages, working_set)
        return cls(np.sort(rng.choice(npages, k, replace=False).astype(np.int64)), rng)

    def take(self, n: int) -> np.ndarray:
        return self.populated[self.rng.integers(0, len(self.populated), n)]


@attrs.define
class SequenceStream(PageStream):
    """A fixed sequence of pages, played once or round and round."""

    pages: np.ndarray
    repeat: bool
    pos: int = 0

    @property
    def finished(self) -> bool:  # type: ignore[override]
        return not self.repeat and self.pos >= len(self.pages)

    def take(self, n: int) -> np.ndarray:
        if not self.repeat:
            out = self.pages[self.pos:self.pos + n]
            self.pos += len(out)
            return out
        idx = (self.pos + np.arange(n, dtype=np.int64)) % len(self.pages)
        self.pos = (self.pos + n) % len(self.pages)
        return self.pages[idx]
