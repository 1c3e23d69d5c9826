"""A vCPU's dirty ring as the kernel shares it: ``mmap`` of the vCPU fd.

``KVM_CAP_DIRTY_LOG_RING`` makes the kernel allocate one ring of ``struct
kvm_dirty_gfn`` per vCPU at ``KVM_CREATE_VCPU``; userspace maps it at page
``KVM_DIRTY_LOG_PAGE_OFFSET`` of the vCPU fd, ``MAP_SHARED`` and readable and
writable (``kvm_vcpu_mmap`` refuses a private or executable mapping of it).  The
entries are read and written in place through a numpy structured view, with the
same harvest as the model (:func:`kvmcore.dirty_ring.harvest`): on x86, which is
TSO, plain loads and stores in program order are the acquire/release the ring
protocol asks for.
"""

from __future__ import annotations

import mmap

import numpy as np

from kvmcore import dirty_ring, uapi
from kvmcore.errors import KvmError


class MappedDirtyRing:
    """The kernel's ring of one vCPU; :attr:`entries` is the live mapping.

    ``fetch_index`` is this process's harvest index (the kernel's dirty and reset
    indexes are not in the mapping).
    """

    def __init__(self, vcpu_fd: int, size_bytes: int, page_size: int) -> None:
        try:
            self._mm: mmap.mmap | None = mmap.mmap(
                vcpu_fd,
                size_bytes,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=uapi.KVM_DIRTY_LOG_PAGE_OFFSET * page_size,
            )
        except OSError as exc:
            raise KvmError(exc.errno, f"mmap of the dirty ring ({size_bytes} bytes): {exc.strerror}") from None
        self.entries = np.frombuffer(self._mm, dtype=dirty_ring.DIRTY_GFN_DTYPE)
        self.size = len(self.entries)
        self.fetch_index = 0

    def harvest(self) -> np.ndarray:
        """Collect the dirty entries from ``fetch_index`` in order and mark them RESET."""
        if self._mm is None:
            raise ValueError("the dirty ring is unmapped (vCPU closed)")
        out, self.fetch_index = dirty_ring.harvest(self.entries, self.fetch_index)
        return out

    def close(self) -> None:
        """Unmap now, or, while other numpy views of it exist, when the last goes."""
        mm, self._mm = self._mm, None
        if mm is None:
            return
        del self.entries
        try:
            mm.close()
        except BufferError:
            pass  # views still exported: the mapping goes with the last of them
