"""Live migration on the dirty log: a pre-copy engine, workloads, reports and plots.

``migrate(vm, guest=GuestSpec(...), workload=Workload(...), params=MigrationParameters(...))``
builds a guest on any VM (the model or ``/dev/kvm``), runs the workload in it and
migrates it with QEMU's algorithm and names; see docs/migration.md.
"""

from kvmcore.migration.dirtylog import BitmapSource, DirtyLogSource, ManualProtectSource, RingSource
from kvmcore.migration.engine import Precopy, build, migrate
from kvmcore.migration.guest import HOST_PAGE_SIZES, Guest, GuestSpec
from kvmcore.migration.params import MigrationParameters
from kvmcore.migration.stats import MigrationReport, RamStats, RoundRecord
from kvmcore.migration.workloads import KINDS as WORKLOADS
from kvmcore.migration.workloads import Trace, Workload, load_trace

__all__ = [
    "BitmapSource", "DirtyLogSource", "Guest", "GuestSpec", "HOST_PAGE_SIZES", "ManualProtectSource",
    "MigrationParameters", "MigrationReport", "Precopy", "RamStats", "RingSource", "RoundRecord", "Trace", "WORKLOADS",
    "Workload", "build", "load_trace", "migrate",
]
