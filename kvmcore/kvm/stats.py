"""The kernel's binary statistics (``KVM_GET_STATS_FD`` on a VM or vCPU fd).

The stats file is ``struct kvm_stats_header``, then ``num_desc`` descriptors
(``struct kvm_stats_desc`` each followed by a ``name_size``-byte name), then the
data block of ``__u64`` values.  Descriptors never change for an fd, so they are
parsed once; values are re-read with ``pread`` on every :meth:`StatsFile.read`.
"""

from __future__ import annotations

import ctypes
import os
import struct

import attrs

from kvmcore.kvm.ioctls import KVM_GET_STATS_FD, kvm_ioctl, kvm_stats_desc, kvm_stats_header


@attrs.frozen
class StatDesc:
    """One ``struct kvm_stats_desc``: ``size`` u64 values at ``offset`` of the data block."""

    name: str
    flags: int
    size: int
    offset: int


class StatsFile:
    """An open stats fd with its descriptors; the owner closes it with :meth:`close`."""

    def __init__(self, owner_fd: int, what: str) -> None:
        self.fd = kvm_ioctl(owner_fd, KVM_GET_STATS_FD, 0, "KVM_GET_STATS_FD", what)
        try:
            hsize = ctypes.sizeof(kvm_stats_header)
            header = kvm_stats_header.from_buffer_copy(os.pread(self.fd, hsize, 0))
            dsize = ctypes.sizeof(kvm_stats_desc) + header.name_size
            raw = os.pread(self.fd, dsize * header.num_desc, header.desc_offset)
            self.data_offset = header.data_offset
            self.descs: list[StatDesc] = []
            for i in range(header.num_desc):
                base = i * dsize
                desc = kvm_stats_desc.from_buffer_copy(raw, base)
                name_start = base + ctypes.sizeof(kvm_stats_desc)
                name = raw[name_start : base + dsize].split(b"\0", 1)[0].decode()
                self.descs.append(StatDesc(name, desc.flags, desc.size, desc.offset))
            self._data_size = max((d.offset + 8 * d.size for d in self.descs), default=0)
        except BaseException:
            os.close(self.fd)
            raise

    def read(self) -> dict[str, int]:
        """Every single-valued stat by its kernel name (histograms are left out)."""
        data = os.pread(self.fd, self._data_size, self.data_offset)
        return {
            d.name: struct.unpack_from("<Q", data, d.offset)[0] for d in self.descs if d.size == 1
        }

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
