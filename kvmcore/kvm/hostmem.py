"""Anonymous host memory behind a memslot (the ``userspace_addr`` of a region).

Mirrors what a VMM does before ``KVM_SET_USER_MEMORY_REGION``: ``mmap`` private
anonymous memory with ``MAP_NORESERVE`` (only touched pages cost anything), and
ask for the host page size the slot should be backed with:

* ``None`` - whatever the host does by default;
* 4 KiB   - ``madvise(MADV_NOHUGEPAGE)``, so THP never backs the slot;
* 2 MiB   - a 2 MiB aligned mapping with ``madvise(MADV_HUGEPAGE)`` (THP);
* 1 GiB   - ``MAP_HUGETLB | MAP_HUGE_1GB`` (without ``MAP_NORESERVE``, so the
  pages are reserved at ``mmap`` time): needs 1 GiB pages in
  ``/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages``.

The mapping is a Python :class:`mmap.mmap`, so numpy views keep it alive: if a view
still exists when the slot is deleted, the memory is unmapped when the last view
goes instead of leaving a dangling pointer.
"""

from __future__ import annotations

import ctypes
import errno
import mmap

import numpy as np

from kvmcore.errors import KvmError

PAGE_4K = 4096
PAGE_2M = 2 << 20
PAGE_1G = 1 << 30

# <asm-generic/mman-common.h>, <asm-generic/mman.h>, <linux/mman.h> (x86-64 values)
MAP_NORESERVE = 0x4000
MAP_HUGETLB = 0x40000
MAP_HUGE_SHIFT = 26
MAP_HUGE_1GB = 30 << MAP_HUGE_SHIFT
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15

_HUGETLB_1G_POOL = "/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages"


def _address(mm: mmap.mmap) -> int:
    """Start address of ``mm`` (a writable mapping) without keeping an export."""
    anchor = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


def _read_pool(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "unknown"


class HostMemory:
    """``size`` bytes of anonymous memory at :attr:`addr`, backed as ``host_page_size`` asks."""

    def __init__(self, size: int, host_page_size: int | None = None) -> None:
        self.size = size
        self.host_page_size = host_page_size
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        length = max(size, PAGE_4K)
        align = PAGE_4K
        if host_page_size == PAGE_1G:
            # No MAP_NORESERVE here: it would skip the hugetlb reservation, and a
            # later touch with an empty pool is a SIGBUS instead of ENOMEM now.
            flags = (flags & ~MAP_NORESERVE) | MAP_HUGETLB | MAP_HUGE_1GB
            length = -(-length // PAGE_1G) * PAGE_1G
        elif host_page_size == PAGE_2M:
            align = PAGE_2M
            length += PAGE_2M  # room to start the slot on a 2 MiB boundary
        elif host_page_size not in (None, PAGE_4K):
            raise KvmError(
                errno.EINVAL,
                f"host_page_size {host_page_size!r}: the kvm backend backs slots with "
                "None (host default), 4096, 2 MiB (THP) or 1 GiB (hugetlb) pages",
            )
        try:
            self._mm: mmap.mmap | None = mmap.mmap(-1, length, flags=flags, prot=prot)
        except OSError as exc:
            if host_page_size == PAGE_1G:
                raise KvmError(
                    exc.errno,
                    f"mmap(MAP_HUGETLB|MAP_HUGE_1GB) of {length} bytes failed ({exc.strerror}): "
                    f"1 GiB hugetlb pages are unavailable ({_HUGETLB_1G_POOL} = "
                    f"{_read_pool(_HUGETLB_1G_POOL)}); reserve them or use host_page_size=2 MiB",
                ) from None
            raise KvmError(exc.errno, f"mmap of {length} bytes of guest memory: {exc.strerror}") from None
        base = _address(self._mm)
        self.offset = (-base) % align
        self.addr = base + self.offset
        if host_page_size == PAGE_2M:
            self._mm.madvise(MADV_HUGEPAGE, self.offset, -(-size // PAGE_2M) * PAGE_2M)
        elif host_page_size == PAGE_4K:
            self._mm.madvise(MADV_NOHUGEPAGE, 0, length)

    @property
    def closed(self) -> bool:
        return self._mm is None

    def view(self) -> np.ndarray:
        """A writable ``uint8`` numpy view of the ``size`` bytes (host accesses, never logged)."""
        return np.frombuffer(self._live(), dtype=np.uint8, count=self.size, offset=self.offset)

    def write(self, offset: int, data) -> None:
        """Copy bytes-like ``data`` (a contiguous numpy array works) to ``offset``."""
        start = self.offset + offset
        self._live()[start : start + memoryview(data).nbytes] = data

    def read(self, offset: int, size: int) -> bytes:
        start = self.offset + offset
        return self._live()[start : start + size]

    def _live(self) -> mmap.mmap:
        if self._mm is None:
            raise ValueError("host memory already released")
        return self._mm

    def close(self) -> None:
        """Unmap now, or, while numpy views exist, when the last of them is gone."""
        mm, self._mm = self._mm, None
        if mm is None:
            return
        try:
            mm.close()
        except BufferError:
            pass  # views still exported: the mapping goes with the last of them
