"""The guest being migrated: its memslots, its memory's contents, its vCPU.

Its memory is laid out as a PC's is: up to ``low_memory_limit`` (3 GiB) from guest
physical address 0 in slot 0, the rest from 4 GiB in slot 1, so a large guest
migrates two slots (multi-slot bugs are a classic).  Pages are numbered across the
slots in that order ("guest pages"), which is what workloads produce.

Before migration the guest's memory holds data (``prefill``: the host writes a
pattern, which KVM does not log) and the guest has touched its memory at a 2 MiB
stride (``warmup_stride``), so that memory backed by 2M or 1G host pages is mapped
with blocks when logging starts, as in a guest that has been running.

A guest may instead have *populated* only some pages (the ``sparse`` workload's
working set): then only those are filled and touched, and the rest of its memory
was never written, which host memory reserved lazily (``MAP_NORESERVE``) does not
even allocate.  :attr:`Guest.prewritten` says, per slot, which pages were written
before the migration (None: possibly all), so the engine can count the others as
zero pages without reading them.
"""

from __future__ import annotations

import attrs
import numpy as np

from kvmcore import uapi

GIB = 1 << 30
HOST_PAGE_SIZES = {"4K": 4096, "2M": 2 << 20, "1G": 1 << 30}
_FILL_CHUNK = 16 << 20
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_TOP_BIT = np.uint64(1 << 63)


def _memory(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"guest memory must be a positive number of bytes, not {value!r}")


@attrs.frozen(kw_only=True)
class GuestSpec:
    """The shape of the guest: how much memory, backed by which host pages."""

    memory: int = attrs.field(default=1 * GIB, validator=_memory)
    host_page_size: int | None = attrs.field(default=None)
    low_memory_limit: int = 3 * GIB
    high_memory_base: int = 4 * GIB
    prefill: float = attrs.field(default=1.0)
    warmup_stride: int = 2 << 20

    @host_page_size.validator
    def _check_hps(self, attribute, value) -> None:
        if value is not None and value not in HOST_PAGE_SIZES.values():
            raise ValueError(f"host page size must be one of {', '.join(HOST_PAGE_SIZES)}, not {value!r}")

    @prefill.validator
    def _check_prefill(self, attribute, value) -> None:
        if not (isinstance(value, (int, float)) and 0 <= value <= 1):
            raise ValueError(f"prefill must be a fraction in [0, 1], not {value!r}")


@attrs.frozen
class GuestSlot:
    """One memslot of the guest: its number, where it is, and its first guest page."""

    slot: int
    gpa: int
    npages: int
    first: int
    page_size: int

    @property
    def size(self) -> int:
        return self.npages * self.page_size


@attrs.define(eq=False)
class Guest:
    """A VM set up as a guest to migrate (any backend: only the public API is used)."""

    vm: object
    vcpu: object
    spec: GuestSpec
    slots: tuple[GuestSlot, ...]
    page_size: int
    prewritten: list = attrs.field(factory=list)

    @staticmethod
    def plan(vm, spec: GuestSpec) -> list[tuple[int, int, int]]:
        """(slot id, gpa, bytes) of each memslot ``spec`` asks for on ``vm``; ValueError
        if the sizes do not fit the arch's page or its guest physical address space."""
        ps = int(vm.page_size)
        for name, value in (("memory", spec.memory), ("low memory limit", spec.low_memory_limit),
                            ("high memory base", spec.high_memory_base)):
            if value % ps:
                raise ValueError(f"guest {name} {value} is not a multiple of the {ps}-byte page of arch "
                                 f"{vm.arch!r}")
        low = min(spec.memory, spec.low_memory_limit)
        layout = [(0, 0, low)]
        if spec.memory > low:
            layout.append((1, spec.high_memory_base, spec.memory - low))
        top = layout[-1][1] + layout[-1][2]
        bits = _ipa_bits(vm)
        if bits is not None and top > 1 << bits:
            most = (1 << bits) - spec.high_memory_base + low if (1 << bits) > spec.high_memory_base else low
            raise ValueError(f"guest memory of {_size(spec.memory)} reaches guest physical address {top:#x}, beyond "
                             f"the {bits}-bit IPA space of arch {vm.arch!r}: at most {_size(most)} fits")
        return layout

    @classmethod
    def create(cls, vm, spec: GuestSpec, rng: np.random.Generator, populated: np.ndarray | None = None) -> Guest:
        """Make the memslots, fill them, create vCPU 0 and let it touch its memory.

        With ``populated`` (guest page numbers), only those pages are filled and
        touched; the rest of memory is left never written."""
        ps = int(vm.page_size)
        slots, first = [], 0
        for slot, gpa, size in cls.plan(vm, spec):
            vm.set_user_memory_region(slot, gpa, size, 0, host_page_size=spec.host_page_size)
            slots.append(GuestSlot(slot, gpa, size // ps, first, ps))
            first += size // ps
        guest = cls(vm, vm.create_vcpu(0), spec, tuple(slots), ps)
        if populated is None:
            guest._fill(rng)
            guest._warm_up()
        else:
            guest._populate(np.asarray(populated, np.int64), rng)
        return guest

    @property
    def npages(self) -> int:
        return sum(s.npages for s in self.slots)

    @property
    def memory_bytes(self) -> int:
        return self.npages * self.page_size

    def layout(self) -> list[tuple[int, int]]:
        """(slot id, pages) in guest-page order, as workloads take it."""
        return [(s.slot, s.npages) for s in self.slots]

    def locate(self, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For guest pages: the index of their slot in :attr:`slots`, and the page offset in it."""
        firsts = np.array([s.first for s in self.slots], np.int64)
        index = np.searchsorted(firsts, pages, side="right") - 1
        return index, pages - firsts[index]

    def gpas(self, pages: np.ndarray, words: np.ndarray | None = None) -> np.ndarray:
        """Guest physical addresses of ``pages`` (plus 8-byte ``words`` into each)."""
        index, offsets = self.locate(pages)
        bases = np.array([s.gpa for s in self.slots], np.int64)
        gpas = bases[index] + offsets * self.page_size
        return gpas if words is None else gpas + words * 8

    def set_logging(self, on: bool) -> None:
        """Turn dirty logging on or off in every slot (a flags-only memslot change)."""
        flags = uapi.KVM_MEM_LOG_DIRTY_PAGES if on else 0
        for s in self.slots:
            self.vm.set_user_memory_region(s.slot, s.gpa, s.size, flags)

    def _fill(self, rng: np.random.Generator) -> None:
        """Write a pattern (a hash of the address) to ``prefill`` of the pages, from the host."""
        self.prewritten = [None if self.spec.prefill >= 1 else np.zeros(0, np.int64) for _ in self.slots]
        if self.spec.prefill <= 0:
            return
        salt = np.uint64(int(rng.integers(0, 1 << 62)))
        for i, s in enumerate(self.slots):
            memory = self.vm.memory(s.slot).view(np.uint64)
            if self.spec.prefill >= 1:
                for start in range(0, len(memory), _FILL_CHUNK // 8):
                    end = min(len(memory), start + _FILL_CHUNK // 8)
                    _fill_words(memory[start:end], s.gpa + start * 8, salt)
            else:
                chosen = np.flatnonzero(rng.random(s.npages) < self.spec.prefill)
                self._fill_pages(s, chosen, salt)
                self.prewritten[i] = chosen

    def _fill_pages(self, s: GuestSlot, chosen: np.ndarray, salt: np.uint64) -> None:
        """The pattern in pages ``chosen`` (offsets) of slot ``s``."""
        words_per_page = self.page_size // 8
        pages = self.vm.memory(s.slot).view(np.uint64).reshape(s.npages, words_per_page)
        for part in np.array_split(chosen, max(1, len(chosen) * self.page_size // _FILL_CHUNK)):
            words = part[:, None] * words_per_page + np.arange(words_per_page)
            pages[part] = (_hash(np.uint64(s.gpa) + words.astype(np.uint64) * np.uint64(8), salt))

    def _populate(self, populated: np.ndarray, rng: np.random.Generator) -> None:
        """Fill (if ``prefill``) and touch only the ``populated`` guest pages."""
        salt = np.uint64(int(rng.integers(0, 1 << 62)))
        index, offsets = self.locate(populated)
        self.prewritten = [np.unique(offsets[index == i]) for i in range(len(self.slots))]
        if self.spec.prefill > 0:
            for s, chosen in zip(self.slots, self.prewritten, strict=True):
                if len(chosen):
                    self._fill_pages(s, chosen, salt)
        self._store_once(np.unique(populated), "touch")

    def _warm_up(self) -> None:
        """The guest stores one word every ``warmup_stride`` bytes, before logging starts."""
        stride = self.spec.warmup_stride
        if stride <= 0:
            return
        step = max(1, stride // self.page_size)
        pages = np.arange(0, self.npages, step, dtype=np.int64)
        index, offsets = self.locate(pages)
        for i, pre in enumerate(self.prewritten):
            if pre is not None:
                self.prewritten[i] = np.union1d(pre, offsets[index == i])
        self._store_once(pages, "warm-up")

    def _store_once(self, pages: np.ndarray, what: str) -> None:
        """The guest stores 1 to the first word of each of ``pages`` (logging is off)."""
        gpas = self.gpas(pages)
        done = self.vcpu.write_many(gpas, 1)
        if done != len(gpas):
            raise RuntimeError(f"the guest's {what} store to gpa {int(gpas[done]):#x} did not complete "
                               f"(exit reason {self.vcpu.exit_reason})")


def _ipa_bits(vm) -> int | None:
    geometry = getattr(vm, "geometry", None)
    if geometry is None:
        return None
    bits = getattr(geometry, "ipa_bits", None)
    if bits is None:
        try:
            bits = geometry.describe().get("ipa_bits")
        except Exception:
            return None
    return int(bits) if bits else None


def _size(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} bytes"


def _hash(addresses: np.ndarray, salt: np.uint64) -> np.ndarray:
    """A word no workload writes (the top bit is set; workloads write small counters)."""
    return (addresses * _GOLDEN + salt) | _TOP_BIT


def _fill_words(out: np.ndarray, first_address: int, salt: np.uint64) -> None:
    """``out[k]`` = the pattern of the word at ``first_address + 8 k``, in place."""
    out[:] = np.arange(len(out), dtype=np.uint64)
    out *= np.uint64(8)
    out += np.uint64(first_address)
    out *= _GOLDEN
    out += salt
    out |= _TOP_BIT
