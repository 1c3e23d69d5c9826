"""What a migration reports: one record per round and the final statistics.

Names follow QEMU's ``query-migrate`` (``MigrationInfo`` / ``MigrationStats``) so a
report can sit beside QEMU's: times in milliseconds, ``ram`` in bytes and pages.
Times are virtual on the model (same seed, same report) and measured on the wall
clock in real time.
"""

from __future__ import annotations

from typing import Any

import attrs

from kvmcore.migration.params import MigrationParameters

ROUND_KINDS = ("full", "iterate", "stop-copy")


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


@attrs.frozen(kw_only=True)
class RoundRecord:
    """One pass over the pages that were pending, and the sync that ended it.

    A live round sends what the last sync found (round 1: everything) while the
    guest runs, then syncs: ``dirty_pages`` is what that sync found, ``remaining``
    its bytes.  The stop-and-copy round stops the guest, syncs once more
    (``dirty_pages`` is what that final sync added) and sends everything left.
    """

    iteration: int
    kind: str
    start_time: float           # s since the migration started
    duration: float             # s
    pages_sent: int
    zero_pages: int
    bytes_sent: int
    dirty_pages: int
    remaining: int              # bytes pending after this round
    expected_downtime: float    # s: remaining / bandwidth
    throttle: int               # cpu-throttle-percentage during the round
    guest_writes: int           # stores by the vCPU and the VMM during the round

    @property
    def dirty_pages_rate(self) -> float:
        """Pages dirtied per second during the round (what its sync found)."""
        return self.dirty_pages / self.duration if self.duration > 0 and self.kind != "stop-copy" else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "kind": self.kind,
            "start-time": _ms(self.start_time),
            "duration": _ms(self.duration),
            "pages-sent": self.pages_sent,
            "zero-pages": self.zero_pages,
            "bytes-sent": self.bytes_sent,
            "dirty-pages": self.dirty_pages,
            "dirty-pages-rate": round(self.dirty_pages_rate, 3),
            "remaining": self.remaining,
            "expected-downtime": _ms(self.expected_downtime),
            "cpu-throttle-percentage": self.throttle,
            "guest-writes": self.guest_writes,
        }


@attrs.frozen(kw_only=True)
class RamStats:
    """QEMU's ``MigrationStats`` (the ``ram`` member of ``query-migrate``)."""

    transferred: int
    remaining: int
    total: int
    duplicate: int
    normal: int
    normal_bytes: int
    dirty_sync_count: int
    dirty_pages_rate: float
    mbps: float
    pages_per_second: float
    page_size: int
    precopy_bytes: int
    downtime_bytes: int

    def to_dict(self) -> dict[str, Any]:
        out = {a.name.replace("_", "-"): getattr(self, a.name) for a in attrs.fields(type(self))}
        out["dirty-pages-rate"] = round(self.dirty_pages_rate, 3)
        out["mbps"] = round(self.mbps, 3)
        out["pages-per-second"] = round(self.pages_per_second, 3)
        return out


@attrs.frozen(kw_only=True)
class MigrationReport:
    """The outcome of one migration.

    ``converged`` is False when the iteration or time cap forced the switchover
    (``switchover_reason`` "max-iterations" or "max-time") rather than the
    downtime test ("downtime-limit"); the migration still completes, as QEMU's does
    when a management layer forces it, with a downtime above the limit.
    """

    status: str
    verified: bool
    mismatched_pages: int
    converged: bool
    switchover_reason: str
    total_time: float
    downtime: float
    expected_downtime: float
    setup_time: float
    throttle: int
    ram: RamStats
    rounds: tuple[RoundRecord, ...]
    params: MigrationParameters
    guest: dict[str, Any]
    time_model: str
    dirty_log: str
    guest_writes: int
    device_writes: int
    guest_reads: int
    kvm_stats: dict[str, int]
    checked_pages: int = 0
    dirty_ring: dict[str, int] = attrs.field(factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data, QEMU's names first."""
        return {
            "status": self.status,
            "verified": self.verified,
            "converged": self.converged,
            "switchover-reason": self.switchover_reason,
            "total-time": _ms(self.total_time),
            "downtime": _ms(self.downtime),
            "expected-downtime": _ms(self.expected_downtime),
            "setup-time": _ms(self.setup_time),
            "cpu-throttle-percentage": self.throttle,
            "ram": self.ram.to_dict(),
            "mismatched-pages": self.mismatched_pages,
            "time-model": self.time_model,
            "dirty-log": self.dirty_log,
            "guest-writes": self.guest_writes,
            "device-writes": self.device_writes,
            "guest-reads": self.guest_reads,
            "parameters": self.params.to_dict(),
            "guest": self.guest,
            "kvm-stats": self.kvm_stats,
            "checked-pages": self.checked_pages,
            **({"dirty-ring": dict(self.dirty_ring)} if self.dirty_ring else {}),
            "rounds": [r.to_dict() for r in self.rounds],
        }
