"""Host ("userspace") memory: reserved lazily, so an untouched 64 GiB slot costs nothing."""

import mmap

import numpy as np

# <sys/mman.h>; the mmap module exports it only from Python 3.13.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


def lazy_zeros(count: int, dtype: type = np.uint8) -> np.ndarray:
    """A zero-filled array whose pages the host allocates only when first written.

    An anonymous ``MAP_NORESERVE`` mapping: the kernel neither commits swap for it nor
    refuses it under heuristic overcommit, which ``np.zeros`` of tens of GiB might be.
    """
    nbytes = max(count * np.dtype(dtype).itemsize, 1)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    return np.frombuffer(buf, dtype=dtype, count=count)
