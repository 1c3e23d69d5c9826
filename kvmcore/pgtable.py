"""A generic stage-2 page-table engine, in the manner of arm64's ``kvm_pgtable``.

One geometry drives it; tables are allocated on demand, one numpy row per table, so
memory grows with what is mapped, not with the IPA space.  There is one walker
(:meth:`PageTable.walk`, level by level with clamped ``addr_end`` steps) that calls
visitors on leaf / table-pre / table-post entries, and vectorised counterparts for the
hot paths (:meth:`PageTable.lookup`, :meth:`PageTable.clear_bits_ranges`).

The engine does no TLB maintenance of its own: it tells its owner (the VM) whenever
a mapping loses a permission (``on_restrict``) or gains one (``on_grant``), and
break-before-make callers pass the
TLB invalidation they want to pay for (``tlbi``).  An arch plugin that forgets to flush
therefore leaves stale TLB entries behind, which is what the model is for.
"""

import sys
from collections.abc import Callable
from typing import Protocol

import attrs
import numpy as np

from kvmcore import ranges
from kvmcore.bitops import bit_positions
from kvmcore.geometry import LAST_LEVEL, Geometry
from kvmcore.hostmem import lazy_zeros

# Entry bits.  Bits 4..11 are the arch's own software bits (x86's MMU-writable, ...).
PTE_VALID = 1 << 0
PTE_TABLE = 1 << 1
PTE_W = 1 << 2
PTE_D = 1 << 3
PTE_SW0 = 1 << 4
PTE_ADDR_SHIFT = 12
PTE_PERM_MASK = PTE_VALID | PTE_W | PTE_D

# Walk flags (KVM_PGTABLE_WALK_LEAF / _TABLE_PRE / _TABLE_POST).
WALK_LEAF = 1 << 0
WALK_TABLE_PRE = 1 << 1
WALK_TABLE_POST = 1 << 2

NO_LEVEL = -128

# The byte of a little- or big-endian entry that holds bits 0..7 (VALID, W, D, SW).
_LOW_BYTE = 0 if sys.byteorder == "little" else 7

Tlbi = Callable[[int, int], None]
"""``tlbi(gfn, level)``: invalidate the TLB entry at ``level`` that maps ``gfn``."""

Report = Callable[[int | np.ndarray, int | np.ndarray], None]
"""``report(start_gfn, end_gfn)``: leaves in ``[start, end)`` changed.  Ints for one
range, or equal-length int64 arrays for many (a vectorised change reports once)."""


class Visitor(Protocol):
    def __call__(self, ctx: "WalkContext") -> int | None:
        """Return a new entry value to store, or None to leave the entry as it is."""


@attrs.frozen
class WalkContext:
    """What a visitor sees: one entry, where it is, and the walk it belongs to."""

    level: int
    addr: int
    end: int
    pte: int
    flag: int
    li: int
    row: int
    idx: int

    @property
    def valid(self) -> bool:
        return bool(self.pte & PTE_VALID)

    @property
    def is_table(self) -> bool:
        return bool(self.pte & PTE_VALID and self.pte & PTE_TABLE and self.level < LAST_LEVEL)


@attrs.frozen
class Leaf:
    """One translation: the leaf that maps a gfn, or ``level == NO_LEVEL`` if none does."""

    level: int
    pte: int
    base_gfn: int
    pages: int
    li: int
    row: int
    idx: int

    @property
    def valid(self) -> bool:
        return bool(self.pte & PTE_VALID)

    @property
    def writable(self) -> bool:
        return bool(self.pte & PTE_VALID and self.pte & PTE_W)

    @property
    def dirty(self) -> bool:
        return bool(self.pte & PTE_D)


@attrs.define
class Leaves:
    """Vectorised :class:`Leaf`: one element per looked-up gfn.

    ``li``/``row``/``idx`` locate the deepest entry the walk reached (the leaf, or the
    invalid entry where it stopped), so callers can update entries in place.
    """

    level: np.ndarray
    pte: np.ndarray
    li: np.ndarray
    row: np.ndarray
    idx: np.ndarray

    @property
    def valid(self) -> np.ndarray:
        return (self.pte & PTE_VALID) != 0

    @property
    def writable(self) -> np.ndarray:
        return (self.pte & (PTE_VALID | PTE_W)) == (PTE_VALID | PTE_W)

    @property
    def dirty(self) -> np.ndarray:
        return (self.pte & PTE_D) != 0

    def take(self, sel) -> "Leaves":
        """The leaves of ``sel`` (a mask, indices or a slice)."""
        return Leaves(self.level[sel], self.pte[sel], self.li[sel], self.row[sel], self.idx[sel])


def unique(values: np.ndarray) -> np.ndarray:
    """``np.unique`` of integers by sorting (numpy's hash-based unique is several
    times slower on large arrays), with no work when they are already ascending."""
    if len(values) < 2 or (values[1:] > values[:-1]).all():
        return values
    values = np.sort(values)
    return values[np.r_[True, values[1:] != values[:-1]]]


def distinct(values: np.ndarray) -> list[int]:
    """The distinct values of a small-range array (levels, slot indices), ascending:
    ``np.unique`` without its sort in the common case of one value."""
    if not len(values):
        return []
    lo, hi = int(values.min()), int(values.max())
    return [lo] if lo == hi else unique(values).tolist()


def _pte_leaf(gfn: int, prot: int) -> int:
    return (gfn << PTE_ADDR_SHIFT) | (prot & ((1 << PTE_ADDR_SHIFT) - 1)) | PTE_VALID


class PageTable:
    """The stage-2 tables of one VM.

    :param geometry: the shape of the tables.
    :param on_restrict: a :data:`Report` of leaves that lost VALID, W or D, or were
        replaced; the VM uses it to know which cached translations a vCPU may no
        longer trust.
    :param on_grant: a :data:`Report` of leaves that gained VALID, W or D: accesses
        that needed KVM may no longer need it.
    :param stats: a counter the engine adds ``page_tables`` and friends to.
    """

    def __init__(self, geometry: Geometry, on_restrict: Report | None = None,
                 stats: dict | None = None, on_grant: Report | None = None) -> None:
        self.geometry = geometry
        self.on_restrict = on_restrict or (lambda start, end: None)
        self.on_grant = on_grant or (lambda start, end: None)
        self.reporting = True  # the owner turns reports off while nobody listens
        self.stats = stats if stats is not None else {}
        g = geometry
        self._levels = list(range(g.start_level, LAST_LEVEL + 1))
        self._gshift = [g.level_shift(lv) - g.page_shift for lv in self._levels]
        self._nent = [g.entries(lv) for lv in self._levels]
        self._tabs = [np.zeros((1 if li == 0 else 16, n), np.uint64) for li, n in enumerate(self._nent)]
        self._base = [np.zeros(len(t), np.int64) for t in self._tabs]
        self._nrows = [1] + [0] * (len(self._levels) - 1)
        self._free: list[list[int]] = [[] for _ in self._levels]
        # Which last-level table (row + 1, 0 for none) maps each last-level span: the
        # lookups' shortcut past the upper levels.  Lazily reserved, like host memory.
        self._last_row = lazy_zeros(g.max_gfn // self._nent[-1] or 1, np.int32)
        self._bump("page_tables", g.concatenated_tables)

    # -- storage -------------------------------------------------------------------

    def _bump(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    @property
    def nr_tables(self) -> int:
        """Table pages in use, the concatenated start-level pages included."""
        return self.geometry.concatenated_tables + sum(
            self._nrows[li] - len(self._free[li]) for li in range(1, len(self._levels)))

    def _alloc_table(self, li: int, base_gfn: int) -> int:
        if self._free[li]:
            row = self._free[li].pop()
        else:
            row = self._nrows[li]
            if row == len(self._tabs[li]):
                grow = np.zeros((2 * row, self._nent[li]), np.uint64)
                grow[:row] = self._tabs[li]
                self._tabs[li] = grow
                base = np.zeros(2 * row, np.int64)
                base[:row] = self._base[li]
                self._base[li] = base
            self._nrows[li] = row + 1
        self._tabs[li][row] = 0
        self._base[li][row] = base_gfn
        if li == len(self._levels) - 1:
            self._last_row[base_gfn // self._nent[li]] = row + 1
        self._bump("page_tables")
        return row

    def _free_table(self, li: int, row: int) -> None:
        """Free a table and everything below it."""
        if li + 1 < len(self._levels):
            ptes = self._tabs[li][row]
            children = ptes[(ptes & (PTE_VALID | PTE_TABLE)) == (PTE_VALID | PTE_TABLE)]
            for child in (children >> PTE_ADDR_SHIFT).astype(np.int64).tolist():
                self._free_table(li + 1, child)
        self._tabs[li][row] = 0
        if li == len(self._levels) - 1:
            self._last_row[self._base[li][row] // self._nent[li]] = 0
        self._free[li].append(row)
        self._bump("page_tables", -1)

    def entry_gfn(self, li: int, row: int, idx: int) -> int:
        """The first gfn the entry at (li, row, idx) maps."""
        return int(self._base[li][row]) + (idx << self._gshift[li])

    def get_entry(self, li: int, row: int, idx: int) -> int:
        return int(self._tabs[li][row, idx])

    def set_entry(self, li: int, row: int, idx: int, new: int) -> None:
        """Store an entry, telling the owner if a translation lost a permission.

        For leaves: a table entry is replaced through :meth:`map`, :meth:`split` or
        :meth:`unmap_range`, which also free the table below it.
        """
        tab = self._tabs[li]
        old = int(tab[row, idx])
        if old == new:
            return
        tab[row, idx] = new
        level = self._levels[li]
        if new & PTE_VALID and not (new & PTE_TABLE and level < LAST_LEVEL) and \
                (~old & new & PTE_PERM_MASK or old >> PTE_ADDR_SHIFT != new >> PTE_ADDR_SHIFT):
            start = self.entry_gfn(li, row, idx)
            self.on_grant(start, start + (1 << self._gshift[li]))
        if not old & PTE_VALID:
            return
        old_table = bool(old & PTE_TABLE) and level < LAST_LEVEL
        new_table = bool(new & PTE_TABLE) and level < LAST_LEVEL and bool(new & PTE_VALID)
        same_output = (old >> PTE_ADDR_SHIFT) == (new >> PTE_ADDR_SHIFT) and old_table == new_table
        lost = old & ~new & PTE_PERM_MASK
        if not same_output or (not old_table and lost):
            start = self.entry_gfn(li, row, idx)
            self.on_restrict(start, start + (1 << self._gshift[li]))
        if not old_table and old & PTE_W and new & PTE_VALID and not new_table and not new & PTE_W:
            self._bump("leaves_write_protected")
            self._bump("pages_write_protected", 1 << self._gshift[li])

    # -- lookups -------------------------------------------------------------------

    def leaf(self, gfn: int) -> Leaf:
        """The leaf mapping ``gfn`` (a scalar walk, for the slow paths)."""
        li, row = 0, 0
        if not 0 <= gfn < self.geometry.max_gfn:
            return Leaf(NO_LEVEL, 0, gfn, 1, -1, -1, -1)
        for li, (sh, n) in enumerate(zip(self._gshift, self._nent)):
            idx = (gfn >> sh) & (n - 1)
            pte = int(self._tabs[li][row, idx])
            level = self._levels[li]
            if pte & PTE_VALID and pte & PTE_TABLE and level < LAST_LEVEL:
                row = pte >> PTE_ADDR_SHIFT
                continue
            base = (gfn >> sh) << sh
            return Leaf(level if pte & PTE_VALID else NO_LEVEL, pte, base, 1 << sh, li, row, idx)
        raise AssertionError("walk fell off the last level")

    def lookup(self, gfns: np.ndarray) -> Leaves:
        """Vectorised walk: the leaf mapping each of ``gfns``."""
        gfns = np.asarray(gfns, dtype=np.int64)
        n = len(gfns)
        last, nlast = len(self._levels) - 1, self._nent[-1]
        pos, short = self._last_level_positions(gfns)
        if short.all():  # the common case on hot paths: every page under a last-level table
            e = self._tabs[last].reshape(-1)[pos]
            level = np.where((e & np.uint64(PTE_VALID)) != 0, LAST_LEVEL, NO_LEVEL).astype(np.int16)
            return Leaves(level, e, np.full(n, last, np.int64), pos // nlast, pos % nlast)
        out = Leaves(np.full(n, NO_LEVEL, np.int16), np.zeros(n, np.uint64),
                     np.full(n, -1, np.int64), np.full(n, -1, np.int64), np.full(n, -1, np.int64))
        inside = (gfns >= 0) & (gfns < self.geometry.max_gfn)
        rows = self._last_row[np.where(inside, gfns, 0) // nlast].astype(np.int64) - 1
        short = inside & (rows >= 0)    # a last-level table maps it: no walk from the top
        if short.any():
            at = np.flatnonzero(short)
            idx = gfns[at] % nlast
            e = self._tabs[last].reshape(-1)[rows[at] * nlast + idx]
            out.level[at] = np.where((e & np.uint64(PTE_VALID)) != 0, LAST_LEVEL, NO_LEVEL)
            out.pte[at], out.li[at], out.row[at], out.idx[at] = e, last, rows[at], idx
            inside &= ~short
        act = None if inside.all() else np.flatnonzero(inside)   # None: every gfn
        g = gfns if act is None else gfns[act]
        rows = np.zeros(len(g), np.int64)
        both = np.uint64(PTE_VALID | PTE_TABLE)
        for li, (sh, nent) in enumerate(zip(self._gshift, self._nent)):
            if not len(g):
                break
            idx = (g >> sh) & (nent - 1)
            e = self._tabs[li].reshape(-1)[rows * nent + idx]
            level = self._levels[li]
            table = (e & both) == both if level < LAST_LEVEL else np.zeros(len(e), bool)
            if table.all():
                rows = (e >> np.uint64(PTE_ADDR_SHIFT)).astype(np.int64)
                continue
            stop = ~table
            where = np.flatnonzero(stop) if act is None else act[stop]
            es = e[stop]
            out.level[where] = np.where((es & np.uint64(PTE_VALID)) != 0, level, NO_LEVEL)
            out.pte[where] = es
            out.li[where] = li
            out.row[where] = rows[stop]
            out.idx[where] = idx[stop]
            act = np.flatnonzero(table) if act is None else act[table]
            g = g[table]
            rows = (e[table] >> np.uint64(PTE_ADDR_SHIFT)).astype(np.int64)
        return out

    # -- the walker ----------------------------------------------------------------

    def walk(self, start: int, end: int, visitor: Visitor, flags: int = WALK_LEAF) -> None:
        """Visit the entries mapping IPA range ``[start, end)`` (bytes), level by level.

        Mirrors ``kvm_pgtable_walk``: each level steps with the clamped ``addr_end``
        of that level, so a range starting at the last page of a block, or ending in
        the middle of one, visits exactly the entries it overlaps.
        """
        end = min(end, 1 << self.geometry.ipa_bits)
        if start < end:
            self._walk(0, 0, start, end, visitor, flags)

    def _walk(self, li: int, row: int, addr: int, end: int, visitor: Visitor, flags: int) -> None:
        g = self.geometry
        level = self._levels[li]
        shift = g.level_shift(level)
        nent = self._nent[li]
        while True:
            idx = (addr >> shift) & (nent - 1)
            nxt = g.addr_end(addr, end, level)
            pte = int(self._tabs[li][row, idx])
            table = bool(pte & PTE_VALID and pte & PTE_TABLE) and level < LAST_LEVEL
            if table:
                if flags & WALK_TABLE_PRE:
                    self._visit(visitor, level, addr, end, pte, WALK_TABLE_PRE, li, row, idx)
                    pte = int(self._tabs[li][row, idx])
                    table = bool(pte & PTE_VALID and pte & PTE_TABLE)
            if table:
                self._walk(li + 1, pte >> PTE_ADDR_SHIFT, addr, nxt, visitor, flags)
                if flags & WALK_TABLE_POST:
                    self._visit(visitor, level, addr, end, pte, WALK_TABLE_POST, li, row, idx)
            elif flags & WALK_LEAF:
                self._visit(visitor, level, addr, end, pte, WALK_LEAF, li, row, idx)
            addr = nxt
            if addr == end:
                return

    def _visit(self, visitor: Visitor, level: int, addr: int, end: int, pte: int, flag: int,
               li: int, row: int, idx: int) -> None:
        new = visitor(WalkContext(level, addr, end, pte, flag, li, row, idx))
        if new is not None:
            self.set_entry(li, row, idx, new)

    # -- building and breaking mappings ----------------------------------------------

    def map(self, gfn: int, level: int, prot: int, tlbi: Tlbi) -> list[tuple[int, int]]:
        """Install a leaf at ``level`` for the entry holding ``gfn`` (``kvm_pgtable_stage2_map``).

        ``prot`` is W/D and software bits.  A valid block above ``level`` is broken
        with break-before-make: made invalid, ``tlbi`` called for it, and replaced by a
        table that holds only the new mapping (the rest faults back in lazily).  A
        table or a different leaf at ``level`` is replaced likewise.  Returns the
        ``(gfn, level)`` of every entry it broke.
        """
        target = self._levels.index(level)
        broken: list[tuple[int, int]] = []
        row = 0
        for li in range(target):
            sh, nent = self._gshift[li], self._nent[li]
            idx = (gfn >> sh) & (nent - 1)
            pte = int(self._tabs[li][row, idx])
            if pte & PTE_VALID and pte & PTE_TABLE:
                row = pte >> PTE_ADDR_SHIFT
                continue
            if pte & PTE_VALID:
                base = (gfn >> sh) << sh
                self.set_entry(li, row, idx, 0)
                tlbi(base, self._levels[li])
                broken.append((base, self._levels[li]))
            child = self._alloc_table(li + 1, (gfn >> sh) << sh)
            self.set_entry(li, row, idx, (child << PTE_ADDR_SHIFT) | PTE_TABLE | PTE_VALID)
            row = child
        sh = self._gshift[target]
        base = (gfn >> sh) << sh
        idx = (gfn >> sh) & (self._nent[target] - 1)
        old = int(self._tabs[target][row, idx])
        new = _pte_leaf(base, prot)
        if old & PTE_VALID and (old >> PTE_ADDR_SHIFT != new >> PTE_ADDR_SHIFT
                                or bool(old & PTE_TABLE) and level < LAST_LEVEL):
            self.set_entry(target, row, idx, 0)
            if old & PTE_TABLE and level < LAST_LEVEL:
                self._free_table(target + 1, old >> PTE_ADDR_SHIFT)
            tlbi(base, level)
            broken.append((base, level))
        self.set_entry(target, row, idx, new)
        self._bump("pages_mapped" if level == LAST_LEVEL else "blocks_mapped")
        return broken

    def map_pages(self, gfns: np.ndarray, prot: int, tlbi: Tlbi) -> None:
        """:meth:`map` at the last level for many distinct gfns at once, leaving the
        tables exactly as calling :meth:`map` for each gfn in turn would.

        Where no last-level table maps a gfn's span yet (or a block does), the first
        gfn of that span in the given order goes through :meth:`map`: it allocates the
        tables (or breaks the block) in the order one-at-a-time calls would.  Every
        other gfn is then one vectorised store.
        """
        gfns = np.asarray(gfns, np.int64)
        last = len(self._levels) - 1
        leaves = self.lookup(gfns)
        above = np.flatnonzero(leaves.li < last)
        if len(above):
            _, first = np.unique(gfns[above] // self._nent[last], return_index=True)
            firsts = above[np.sort(first)]
            for gfn in gfns[firsts].tolist():
                self.map(gfn, LAST_LEVEL, prot, tlbi)
            rest = np.ones(len(gfns), bool)
            rest[firsts] = False
            gfns = gfns[rest]
            leaves = self.lookup(gfns)
        if not len(gfns):
            return
        tab = self._tabs[last]
        old = tab[leaves.row, leaves.idx]
        new = (gfns.astype(np.uint64) << np.uint64(PTE_ADDR_SHIFT)) | np.uint64((prot & 0xFFF) | PTE_VALID)
        tab[leaves.row, leaves.idx] = new
        self._bump("pages_mapped", len(gfns))
        self._report_runs(gfns, 1, self.on_grant)
        valid = (old & np.uint64(PTE_VALID)) != 0
        lost = valid & (((old & ~new & np.uint64(PTE_PERM_MASK)) != 0) |
                        ((old >> np.uint64(PTE_ADDR_SHIFT)) != (new >> np.uint64(PTE_ADDR_SHIFT))))
        if lost.any():
            self._report_runs(gfns[lost], 1)
        unprotected = valid & ((old & np.uint64(PTE_W)) != 0) & ((new & np.uint64(PTE_W)) == 0)
        self._bump("leaves_write_protected", int(unprotected.sum()))
        self._bump("pages_write_protected", int(unprotected.sum()))

    def split(self, gfn: int, tlbi: Tlbi, to_level: int = LAST_LEVEL, bbm: bool = True) -> int:
        """Split the block holding ``gfn`` into leaves of ``to_level`` (``kvm_pgtable_stage2_split``).

        The new leaves keep the block's permissions.  With ``bbm`` the block entry is
        replaced with break-before-make (invalid, ``tlbi`` on the old block, then the
        table), as ARM requires; without it the table replaces the block in one step,
        as x86's ``tdp_mmu_split_huge_page`` does.  Returns how many blocks were split
        (0 if ``gfn`` is not under a block above ``to_level``).
        """
        leaf = self.leaf(gfn)
        if leaf.level == NO_LEVEL or leaf.level >= to_level:
            return 0
        li, row, idx = leaf.li, leaf.row, leaf.idx
        prot = leaf.pte & ((1 << PTE_ADDR_SHIFT) - 1) & ~PTE_TABLE
        if bbm:
            self.set_entry(li, row, idx, 0)
            tlbi(leaf.base_gfn, leaf.level)
        table = self._build(li + 1, leaf.base_gfn, prot, self._levels.index(to_level))
        self.on_grant(leaf.base_gfn, leaf.base_gfn + leaf.pages)
        self.set_entry(li, row, idx, (table << PTE_ADDR_SHIFT) | PTE_TABLE | PTE_VALID)
        self._bump("huge_pages_split")
        return 1

    def _build(self, li: int, base_gfn: int, prot: int, leaf_li: int) -> int:
        """A new table at ``li`` mapping its whole range with leaves at ``leaf_li``."""
        row = self._alloc_table(li, base_gfn)
        sh = self._gshift[li]
        gfns = base_gfn + (np.arange(self._nent[li], dtype=np.int64) << sh)
        if li == leaf_li:
            self._tabs[li][row] = (gfns.astype(np.uint64) << np.uint64(PTE_ADDR_SHIFT)) | np.uint64(prot | PTE_VALID)
            self._bump("pages_mapped" if self._levels[li] == LAST_LEVEL else "blocks_mapped", self._nent[li])
            return row
        for i, child_base in enumerate(gfns.tolist()):
            child = self._build(li + 1, child_base, prot, leaf_li)
            self._tabs[li][row, i] = (child << PTE_ADDR_SHIFT) | PTE_TABLE | PTE_VALID
        return row

    def unmap_range(self, start_gfn: int, end_gfn: int) -> None:
        """Remove every mapping that overlaps ``[start_gfn, end_gfn)`` and free the tables
        left empty (``kvm_pgtable_stage2_unmap``, whose refcounts free empty tables)."""
        def visit(ctx: WalkContext) -> int | None:
            if ctx.flag == WALK_LEAF:
                return 0 if ctx.valid else None
            child = ctx.pte >> PTE_ADDR_SHIFT
            lo = self.entry_gfn(ctx.li, ctx.row, ctx.idx)
            inside = start_gfn <= lo and lo + (1 << self._gshift[ctx.li]) <= end_gfn
            if inside or (ctx.flag == WALK_TABLE_POST and not (self._tabs[ctx.li + 1][child] & PTE_VALID).any()):
                self.set_entry(ctx.li, ctx.row, ctx.idx, 0)
                self._free_table(ctx.li + 1, child)
            return None

        shift = self.geometry.page_shift
        self.walk(start_gfn << shift, end_gfn << shift, visit, WALK_LEAF | WALK_TABLE_PRE | WALK_TABLE_POST)

    # -- vectorised permission changes ------------------------------------------------

    def clear_bits_ranges(self, starts: np.ndarray, ends: np.ndarray, bits: int,
                          min_level: int | None = None, max_level: int = LAST_LEVEL) -> int:
        """Clear ``bits`` on every valid leaf overlapping any ``[starts[i], ends[i])``.

        The vectorised form of a leaf-visitor walk over many small ranges (the
        batched write-protect and D-bit clearing).  A block overlapping a range loses
        the bits as a whole, as ``kvm_pgtable_stage2_wrprotect`` does.  Only leaves at
        levels in ``[min_level, max_level]`` are touched.  Returns the leaves changed.
        """
        starts = np.asarray(starts, np.int64)
        ends = np.asarray(ends, np.int64)
        keep = ends > starts
        starts, ends = starts[keep], ends[keep]
        if not len(starts):
            return 0
        changed = 0
        lo = self.geometry.start_level if min_level is None else min_level
        if lo <= LAST_LEVEL <= max_level:
            starts, ends = ranges.split_at(starts, ends, self._nent[-1])
            changed, done = self._clear_bits_in_last_tables(starts, ends, bits)
            if lo == LAST_LEVEL:  # what no last-level table maps has no page leaves
                return changed
            starts, ends = starts[~done], ends[~done]
        if not len(starts):
            return changed
        return changed + self.clear_bits(ranges.expand(starts, ends), bits, min_level, max_level)

    def _clear_bits_in_last_tables(self, starts: np.ndarray, ends: np.ndarray, bits: int) -> tuple[int, np.ndarray]:
        """The fast case of :meth:`clear_bits_ranges`: ranges that each lie in one
        last-level table span are cleared, where that table exists, as runs of its
        row: no walk at all.  Returns the leaves changed and which ranges it took."""
        first, reached = self._last_level_positions(starts)  # the table covers the range
        which = np.flatnonzero(reached)
        done = np.zeros(len(starts), bool)
        done[which] = True
        if not len(which):
            return 0, done
        pos = ranges.expand(first[which], first[which] + (ends - starts)[which])
        s, e = starts[which], ends[which]
        if len(s) > 1 and not (s[1:] >= e[:-1]).all():
            pos = unique(pos)          # ranges that overlap (a ring reset's runs may)
        return self._clear_last_level(pos, bits), done

    def clear_bits_masked(self, first_gfns: np.ndarray, masks: np.ndarray, bits: int,
                          min_level: int | None = None, max_level: int = LAST_LEVEL) -> int:
        """Clear ``bits`` on the valid leaves mapping ``first_gfns[i] + b`` for each set
        bit ``b`` of ``masks[i]`` (bitmap words, uint32 or uint64): the dirty-log protect
        paths, one word per ``kvm_arch_mmu_enable_log_dirty_pt_masked`` call.

        Where a word is aligned and an existing last-level table maps it (a word never
        straddles a table), its entries are found without a walk: when the words are
        dense (a sixteenth of their bits set, on average), each such word of two bits
        or more is done as one run of the table's row, the others bit by bit.  What
        only blocks map, or nothing, goes through :meth:`clear_bits`.  ``bits`` beyond
        an entry's low byte take the general path.  Returns the leaves changed.
        """
        first_gfns = np.asarray(first_gfns, np.int64)
        masks = np.asarray(masks)
        width = masks.dtype.itemsize * 8
        changed = 0
        lo = self.geometry.start_level if min_level is None else min_level
        if lo <= LAST_LEVEL <= max_level and bits < 0x100 and self._nent[-1] % width == 0 and len(masks):
            pos, inside = self._last_level_positions(first_gfns)
            inside &= (first_gfns & (width - 1)) == 0
            pop = np.bitwise_count(masks)
            dense = pop.sum(dtype=np.int64) * 16 >= len(masks) * width
            runs = inside & (pop > 1) if dense else np.zeros(len(masks), bool)
            if runs.any():
                changed += self._clear_last_level_words(pos[runs] >> (width.bit_length() - 1), masks[runs], bits, width)
            few = inside & ~runs
            if few.any():
                one = few & (pop == 1)     # the common sparse word: its bit is its trailing zeros
                word, bit = bit_positions(masks[few & ~one])
                at = np.concatenate((pos[one] + np.bitwise_count(masks[one] - masks.dtype.type(1)),
                                     pos[few & ~one][word] + bit))
                if len(first_gfns) > 1 and not (first_gfns[1:] > first_gfns[:-1]).all():
                    at = unique(at)        # a word twice (a ring reset may)
                changed += self._clear_last_level(at, bits)
            first_gfns, masks = first_gfns[~inside], masks[~inside]
        if not len(masks):
            return changed
        word, bit = bit_positions(masks)
        return changed + self.clear_bits(first_gfns[word] + bit, bits, min_level, max_level)

    def _clear_last_level_words(self, blocks: np.ndarray, masks: np.ndarray, bits: int, width: int) -> int:
        """:meth:`_clear_last_level` for the set bits of ``masks[i]`` in the ``blocks[i]``-th
        run of ``width`` last-level entries: one gather and one scatter of whole runs.

        Only the entries' low bytes, where VALID and the permission bits live, are
        read and written: an eighth of the memory of whole entries."""
        if len(blocks) > 1 and not (blocks[1:] > blocks[:-1]).all():
            # The same word twice (a ring reset may): merge them, or one write loses the other.
            order = np.argsort(blocks, kind="stable")
            blocks, masks = blocks[order], masks[order]
            heads = np.flatnonzero(np.r_[True, blocks[1:] != blocks[:-1]])
            blocks, masks = blocks[heads], np.bitwise_or.reduceat(masks, heads)
        if not len(blocks):
            return 0
        low = self._tabs[-1].view(np.uint8).reshape(-1, width, 8)[:, :, _LOW_BYTE]
        old = low[blocks]
        sel = np.unpackbits(masks.astype(masks.dtype.newbyteorder("<")).view(np.uint8),
                            bitorder="little").reshape(len(blocks), width).view(bool)
        hit = (old & np.uint8(bits)) != 0
        hit &= sel
        hit &= (old & np.uint8(PTE_VALID)).view(bool)
        changed = int(np.count_nonzero(hit))
        if not changed:
            return 0
        if bits & PTE_W:
            nw = changed if bits == PTE_W else int(np.count_nonzero(hit & ((old & np.uint8(PTE_W)) != 0)))
            self._bump("leaves_write_protected", nw)
            self._bump("pages_write_protected", nw)
        if self.reporting:
            r, c = np.nonzero(hit)
            nent = self._nent[-1]
            pos = blocks[r] * width + c
            self._report_runs(self._base[-1][pos // nent] + pos % nent, 1)
        clear = hit.view(np.uint8) * np.uint8(bits)
        old &= ~clear
        low[blocks] = old
        return changed

    def _last_level_positions(self, gfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where each gfn's last-level entry is in the flat last-level storage, and
        whether a last-level table maps its span at all."""
        shift = self._nent[-1].bit_length() - 1      # tables hold a power of two of entries
        inside = (gfns >= 0) & (gfns < self.geometry.max_gfn)
        rows = self._last_row[np.where(inside, gfns, 0) >> shift].astype(np.int64) - 1
        return (rows << shift) + (gfns & (self._nent[-1] - 1)), (rows >= 0) & inside

    def _clear_last_level(self, pos: np.ndarray, bits: int) -> int:
        """Clear ``bits`` on the last-level entries at flat positions ``pos`` (distinct):
        one gather and one scatter; an invalid entry, or one without the bits, stays."""
        nent = self._nent[-1]
        flat = self._tabs[-1].reshape(-1)
        old = flat[pos]
        hit = ((old & np.uint64(PTE_VALID)) != 0) & ((old & np.uint64(bits)) != 0)
        flat[pos] = np.where(hit, old & ~np.uint64(bits), old)
        changed = int(np.count_nonzero(hit))
        if bits & PTE_W:
            nw = int(np.count_nonzero(hit & ((old & np.uint64(PTE_W)) != 0)))
            self._bump("leaves_write_protected", nw)
            self._bump("pages_write_protected", nw)
        if self.reporting and changed:
            pos = pos[hit]
            self._report_runs(self._base[-1][pos // nent] + (pos % nent), 1)
        return changed

    def clear_bits(self, gfns: np.ndarray, bits: int, min_level: int | None = None,
                   max_level: int = LAST_LEVEL) -> int:
        """Clear ``bits`` on the valid leaves mapping ``gfns``; returns the leaves changed."""
        lo = self.geometry.start_level if min_level is None else min_level
        if lo == max_level == LAST_LEVEL:   # pages only (x86's rmap walk): no walk needed
            gfns = unique(np.asarray(gfns, np.int64))
            pos, mapped = self._last_level_positions(gfns)
            return self._clear_last_level(pos[mapped], bits)
        leaves = self.lookup(gfns)
        sel = leaves.valid & ((leaves.pte & np.uint64(bits)) != 0) & (leaves.level >= lo) & (leaves.level <= max_level)
        if not sel.any():
            return 0
        changed = 0
        for li in distinct(leaves.li[sel]):
            m = sel & (leaves.li == li)
            key = unique(leaves.row[m] * self._nent[li] + leaves.idx[m])
            rows, idx = key // self._nent[li], key % self._nent[li]
            tab = self._tabs[li]
            old = tab[rows, idx]
            tab[rows, idx] = old & ~np.uint64(bits)
            changed += len(key)
            pages = 1 << self._gshift[li]
            first = self._base[li][rows] + (idx << self._gshift[li])
            if bits & PTE_W:
                nw = int(((old & PTE_W) != 0).sum())
                self._bump("leaves_write_protected", nw)
                self._bump("pages_write_protected", nw * pages)
            self._report_runs(first, pages)
        return changed

    def _report_runs(self, first: np.ndarray, pages: int, report: Report | None = None) -> None:
        """Tell the owner about changed leaves (restricted, unless ``report`` says
        otherwise), merged into contiguous runs and reported in one call."""
        if not self.reporting or not len(first):
            return
        report = report or self.on_restrict
        if len(first) > 1 and not (first[1:] >= first[:-1]).all():
            first = np.sort(first)
        report(*ranges.runs(first, pages))

    def wrprotect_range(self, start_gfn: int, end_gfn: int) -> int:
        """Write-protect every leaf overlapping ``[start_gfn, end_gfn)``, scanning only
        the tables that exist (``kvm_pgtable_stage2_wrprotect`` over a whole slot)."""
        changed = 0
        for li, level in enumerate(self._levels):
            if level != LAST_LEVEL and level not in self.geometry.block_levels:
                continue
            span = self._nent[li] << self._gshift[li]
            nrows = self._nrows[li]
            base = self._base[li][:nrows]
            rows = np.nonzero((base < end_gfn) & (base + span > start_gfn))[0]
            if not len(rows):
                continue
            ents = self._tabs[li][rows]
            first = base[rows, None] + (np.arange(self._nent[li], dtype=np.int64) << self._gshift[li])[None, :]
            pages = 1 << self._gshift[li]
            leafw = (ents & np.uint64(PTE_VALID | PTE_W)) == (PTE_VALID | PTE_W)
            if level < LAST_LEVEL:
                leafw &= (ents & np.uint64(PTE_TABLE)) == 0
            sel = leafw & (first < end_gfn) & (first + pages > start_gfn)
            r, i = np.nonzero(sel)
            if not len(r):
                continue
            self._tabs[li][rows[r], i] = ents[r, i] & ~np.uint64(PTE_W)
            changed += len(r)
            self._bump("leaves_write_protected", len(r))
            self._bump("pages_write_protected", len(r) * pages)
            self._report_runs(first[r, i], pages)
        return changed

    def set_bits(self, gfns: np.ndarray, bits: int) -> None:
        """Set ``bits`` on the valid leaves mapping ``gfns`` (hardware setting D/A bits)."""
        leaves = self.lookup(gfns)
        for li in distinct(leaves.li[leaves.valid]):
            m = leaves.valid & (leaves.li == li)
            self._tabs[li][leaves.row[m], leaves.idx[m]] |= np.uint64(bits)
            first = self._base[li][leaves.row[m]] + (leaves.idx[m] << self._gshift[li])
            self._report_runs(unique(first), 1 << self._gshift[li], self.on_grant)

    def mapped_leaves(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every valid leaf as ``(first_gfn, level, pte)`` arrays: for checks and reports."""
        firsts, levels, ptes = [], [], []
        for li, level in enumerate(self._levels):
            nrows = self._nrows[li]
            ents = self._tabs[li][:nrows]
            valid = (ents & np.uint64(PTE_VALID)) != 0
            if level < LAST_LEVEL:
                valid &= (ents & np.uint64(PTE_TABLE)) == 0
            r, i = np.nonzero(valid)
            firsts.append(self._base[li][r] + (i.astype(np.int64) << self._gshift[li]))
            levels.append(np.full(len(r), level, np.int16))
            ptes.append(ents[r, i])
        return np.concatenate(firsts), np.concatenate(levels), np.concatenate(ptes)

