"""kvmcore's x86 arch: KVM's x86 MMU with EPT (4- and 5-level, 2M/1G pages), rmap
write protection, PML, eager page splitting; see docs/arch-x86.md.

The entry point ``x86 = "arch_plugins.x86"`` registers this module; its hooks are the
bound methods of one :class:`X86Batched` below.  Tests build variants directly:
``kvmcore.create_vm(X86(bugs={"no_flush"}))``.
"""

from arch_plugins.x86.plugin import BUGS, X86, X86Batched

_plugin = X86Batched()

kvm_arch_info = _plugin.kvm_arch_info
kvm_arch_geometry = _plugin.kvm_arch_geometry
kvm_arch_init_vm = _plugin.kvm_arch_init_vm
kvm_arch_prepare_memory_region = _plugin.kvm_arch_prepare_memory_region
kvm_arch_commit_memory_region = _plugin.kvm_arch_commit_memory_region
kvm_arch_handle_stage2_fault = _plugin.kvm_arch_handle_stage2_fault
kvm_arch_handle_stage2_faults_batch = _plugin.kvm_arch_handle_stage2_faults_batch
kvm_mmu_wp_memory_region = _plugin.kvm_mmu_wp_memory_region
kvm_mmu_write_protect_pt_masked = _plugin.kvm_mmu_write_protect_pt_masked
kvm_mmu_write_protect_pt_masked_batch = _plugin.kvm_mmu_write_protect_pt_masked_batch
kvm_flush_remote_tlbs = _plugin.kvm_flush_remote_tlbs
kvm_flush_remote_tlbs_range = _plugin.kvm_flush_remote_tlbs_range
kvm_arch_sync_dirty_log = _plugin.kvm_arch_sync_dirty_log
kvm_arch_hw_set_dirty = _plugin.kvm_arch_hw_set_dirty
kvm_cpu_dirty_log_size = _plugin.kvm_cpu_dirty_log_size
kvm_arch_vcpu_exit = _plugin.kvm_arch_vcpu_exit

__all__ = ["BUGS", "X86", "X86Batched"]
