"""Migration parameters, by QEMU's names (``migrate-set-parameters``) and defaults."""

from __future__ import annotations

import math

import attrs

MIB = 1 << 20

DEFAULT_DOWNTIME_LIMIT_MS = 300
"""QEMU's ``downtime-limit`` default."""
DEFAULT_MAX_BANDWIDTH = 128 * MIB
"""QEMU's ``max-bandwidth`` default (``MAX_THROTTLE``): 128 MiB/s, a 1 Gbit/s link."""
DEFAULT_MAX_ITERATIONS = 30
"""The cap guestperf and CloudSimMig use; QEMU itself has none (libvirt decides)."""
DEFAULT_MAX_TIME_S = 300
"""guestperf's ``max_time``."""
DEFAULT_CLEAR_BITMAP_SHIFT = 18
"""QEMU's ``x-clear-bitmap-shift``: clear the log in chunks of 2**18 pages (1 GiB of 4K pages)."""
ZERO_PAGE_DETECTION = ("legacy", "none")


def _positive(instance, attribute, value) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{_qemu_name(attribute.name)} must be a positive number, not {value!r}")


def _non_negative(instance, attribute, value) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{_qemu_name(attribute.name)} must be zero or more, not {value!r}")


def _percent(top: int):
    """A whole percentage in 1..top (QEMU's ranges)."""

    def check(instance, attribute, value) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
            raise ValueError(f"{_qemu_name(attribute.name)} must be a whole percentage 1..{top}, not {value!r}")

    return check


def _whole(value):
    """Keep a whole float (128M parsed as a rate) an int, as QEMU prints it."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _qemu_name(name: str) -> str:
    return QEMU_NAMES.get(name, name.replace("_", "-"))


@attrs.frozen(kw_only=True)
class MigrationParameters:
    """What the user sets for one migration.

    Times are in the units QEMU uses (``downtime-limit`` in ms, ``max-bandwidth`` in
    bytes/s).  ``max_iterations`` and ``max_time_s`` are the caps a management layer
    adds (guestperf's defaults): past either, the migration stops and copies what is
    left however long that takes, and says that it did not converge.
    """

    downtime_limit_ms: float = attrs.field(default=DEFAULT_DOWNTIME_LIMIT_MS, converter=_whole,
                                            validator=_non_negative)
    max_bandwidth: float = attrs.field(default=DEFAULT_MAX_BANDWIDTH, converter=_whole, validator=_positive)
    max_iterations: int = attrs.field(default=DEFAULT_MAX_ITERATIONS)
    max_time_s: float = attrs.field(default=DEFAULT_MAX_TIME_S, converter=_whole, validator=_positive)
    auto_converge: bool = False
    cpu_throttle_initial: int = attrs.field(default=20, validator=_percent(99))
    cpu_throttle_increment: int = attrs.field(default=10, validator=_percent(99))
    max_cpu_throttle: int = attrs.field(default=99, validator=_percent(99))
    throttle_trigger_threshold: int = attrs.field(default=50, validator=_percent(100))
    manual_protect: bool = False
    clear_bitmap_shift: int = attrs.field(default=DEFAULT_CLEAR_BITMAP_SHIFT)
    zero_page_detection: str = attrs.field(default="legacy")
    dirty_ring: bool = False
    dirty_ring_size: int = attrs.field(default=65536)
    time_step_ms: float = attrs.field(default=10, converter=_whole, validator=_positive)

    @max_iterations.validator
    def _check_iterations(self, attribute, value) -> None:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"max-iterations must be a whole number of at least 1, not {value!r}")

    @clear_bitmap_shift.validator
    def _check_shift(self, attribute, value) -> None:
        if not isinstance(value, int) or not 6 <= value <= 31:
            raise ValueError(f"x-clear-bitmap-shift must be 6..31 (chunks of 64 pages or more), not {value!r}")

    @dirty_ring_size.validator
    def _check_ring(self, attribute, value) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"dirty ring size must be a positive whole number of bytes, not {value!r}")

    def __attrs_post_init__(self) -> None:
        if self.dirty_ring and self.manual_protect:
            raise ValueError("the dirty ring and manual protect are two dirty-log modes: choose one")

    @zero_page_detection.validator
    def _check_zero(self, attribute, value) -> None:
        if value not in ZERO_PAGE_DETECTION:
            raise ValueError(f"zero-page-detection must be one of {', '.join(ZERO_PAGE_DETECTION)}, not {value!r}")

    @property
    def switchover_bytes(self) -> float:
        """What may be left to send when the guest stops: bandwidth x downtime-limit."""
        return self.max_bandwidth * self.downtime_limit_ms / 1000.0

    def to_dict(self) -> dict[str, object]:
        """The parameters by QEMU's names (``query-migrate-parameters``)."""
        return {_qemu_name(a.name): getattr(self, a.name) for a in attrs.fields(type(self))}


QEMU_NAMES = {
    "downtime_limit_ms": "downtime-limit",
    "max_time_s": "max-time",
    "clear_bitmap_shift": "x-clear-bitmap-shift",
    "time_step_ms": "x-time-step",
    "dirty_ring": "x-dirty-ring",
    "dirty_ring_size": "x-dirty-ring-bytes",
}
