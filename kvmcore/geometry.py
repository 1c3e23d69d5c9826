"""Stage-2 page-table geometry as arithmetic, in the manner of arm64's ``kvm_pgtable``.

Levels are numbered as arm64 numbers them: the last level, which maps pages, is 3;
a walk starts at ``start_level`` (0 for a 4-level table, -1 for a 5-level one).  The
start level may be a run of concatenated tables that resolves extra address bits.
"""

import attrs

LAST_LEVEL = 3


@attrs.frozen
class Geometry:
    """The shape of one VM's stage-2 tables.

    :param page_shift: log2 of the page (granule) size.
    :param ipa_bits: guest-physical address bits the tables translate.
    :param start_level: the level a walk starts at (``LAST_LEVEL + 1 - levels``).
    :param block_levels: the levels above the last that may hold block mappings.
    :param bits_per_long: the host's BITS_PER_LONG: the width of a dirty-bitmap word.
    """

    page_shift: int
    ipa_bits: int
    start_level: int
    block_levels: frozenset[int] = attrs.field(converter=frozenset, factory=frozenset)
    bits_per_long: int = 64

    def __attrs_post_init__(self) -> None:
        if self.ipa_bits <= self.level_shift(self.start_level) - self.bits_per_level:
            raise ValueError(f"{self.ipa_bits}-bit IPA needs no level {self.start_level}")
        if self.ipa_bits > self.level_shift(self.start_level) + self.bits_per_level + 4:
            raise ValueError(f"{self.ipa_bits}-bit IPA needs more than 16 concatenated tables")
        bad = {lv for lv in self.block_levels if not self.start_level <= lv < LAST_LEVEL}
        if bad:
            raise ValueError(f"block levels {sorted(bad)} are not table levels")

    @property
    def page_size(self) -> int:
        return 1 << self.page_shift

    @property
    def bits_per_level(self) -> int:
        """Index bits resolved by one table: a table is one page of 8-byte entries."""
        return self.page_shift - 3

    @property
    def levels(self) -> int:
        return LAST_LEVEL + 1 - self.start_level

    def level_shift(self, level: int) -> int:
        """log2 of the bytes one entry at ``level`` maps (ARM64_HW_PGTABLE_LEVEL_SHIFT)."""
        return self.bits_per_level * (LAST_LEVEL - level) + self.page_shift

    def level_size(self, level: int) -> int:
        return 1 << self.level_shift(level)

    def level_pages(self, level: int) -> int:
        """Pages one entry at ``level`` maps."""
        return 1 << (self.level_shift(level) - self.page_shift)

    def entries(self, level: int) -> int:
        """Entries of one table at ``level``; at the start level, of all concatenated tables."""
        if level == self.start_level:
            return 1 << (self.ipa_bits - self.level_shift(level))
        return 1 << self.bits_per_level

    @property
    def concatenated_tables(self) -> int:
        """Tables concatenated at the start level (``kvm_pgd_pages``)."""
        return max(1, self.entries(self.start_level) >> self.bits_per_level)

    @property
    def max_gfn(self) -> int:
        """One past the last guest frame the tables can map."""
        return 1 << (self.ipa_bits - self.page_shift)

    @property
    def leaf_levels(self) -> tuple[int, ...]:
        """Levels that can hold a leaf, largest first."""
        return tuple(sorted(self.block_levels)) + (LAST_LEVEL,)

    def addr_end(self, addr: int, end: int, level: int) -> int:
        """The clamped end of the entry at ``level`` holding ``addr`` (``p*d_addr_end``).

        The ``- 1`` comparison is the kernel's: it stays right when ``end`` is the
        top of the address space.
        """
        boundary = (addr + self.level_size(level)) & ~(self.level_size(level) - 1)
        return boundary if boundary - 1 < end - 1 else end

    def describe(self) -> dict[str, object]:
        """A plain summary, for ``kvmcore archs`` and the docs."""
        return {
            "page_size": self.page_size,
            "ipa_bits": self.ipa_bits,
            "levels": self.levels,
            "start_level": self.start_level,
            "concatenated_tables": self.concatenated_tables,
            "block_sizes": [self.level_size(lv) for lv in sorted(self.block_levels)],
            "bits_per_long": self.bits_per_long,
        }
