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
    """

    name: str
    description: str
    bits_per_long: int = 64
    nr_address_spaces: int = 1
    user_mem_slots: int = 32767
    manual_dirty_log_caps: int = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    has_readonly_mem: bool = True
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=lambda m: dict(m))
