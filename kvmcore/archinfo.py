"""What an arch tells the core about itself (its ``kvm_host.h`` constants)."""

from collections.abc import Mapping
from typing import Any

import attrs

from kvmcore.uapi import KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE


@attrs.frozen
class ArchInfo:
    """:param options: the VM options the arch accepts, with their defaults.
    :param manual_dirty_log_caps: ``KVM_DIRTY_LOG_MANUAL_CAPS`` (INITIALLY_SET or not).
    :param user_mem_slots: ``KVM_USER_MEM_SLOTS``.
    :param nr_address_spaces: ``kvm_arch_nr_memslot_as_ids`` (2 on x86: normal + SMM).
    :param dirty_ring_caps: the dirty-ring capabilities the arch offers, from
        ``KVM_CAP_DIRTY_LOG_RING`` (``CONFIG_HAVE_KVM_DIRTY_RING_TSO``: x86),
        ``KVM_CAP_DIRTY_LOG_RING_ACQ_REL`` (``..._ACQ_REL``: x86 and arm64) and
        ``KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP`` (``CONFIG_NEED_KVM_DIRTY_RING_WITH_BITMAP``:
        arm64).  Empty (the default) means no ring, as 32-bit arm
        (no ``KVM_DIRTY_LOG_PAGE_OFFSET``).
    :param batched_faults_with_ring: the arch's ``kvm_arch_handle_stage2_faults_batch``
        may be given runs of faults in a VM with a dirty ring: it pushes the entries of
        the faults it resolves in the order of ``gfns``.  The core then gives it no more
        faults than the ring has room for before its soft limit, so a soft-full exit can
        only follow the last of them.  False (the default): one fault at a time.
    """

    name: str
    description: str
    bits_per_long: int = 64
    nr_address_spaces: int = 1
    user_mem_slots: int = 32767
    manual_dirty_log_caps: int = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    has_readonly_mem: bool = True
    dirty_ring_caps: frozenset[int] = attrs.field(factory=frozenset, converter=frozenset)
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=lambda m: dict(m))
    batched_faults_with_ring: bool = False
