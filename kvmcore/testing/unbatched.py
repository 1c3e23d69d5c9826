"""The same arch without its batched hooks, to hold them against the one-at-a-time hooks.

The plugin objects are registered unchanged in a second plugin manager that simply
does not see the batched hooks (pluggy's documented ``parse_hookimpl_opts``
override), so the core falls back to one ``kvm_mmu_write_protect_pt_masked`` call per
bitmap word and one ``kvm_arch_handle_stage2_fault`` call per fault, as it does for
an arch that never had the batched ones.
"""

from typing import Any

import pluggy

from kvmcore import hookspecs
from kvmcore.plugins import get_plugin_manager
from kvmcore.vm import Vm

BATCHED_HOOKS = ("kvm_mmu_write_protect_pt_masked_batch", "kvm_arch_handle_stage2_faults_batch")


class _UnbatchedPluginManager(pluggy.PluginManager):
    def parse_hookimpl_opts(self, plugin: Any, name: str):
        if name in BATCHED_HOOKS:
            return None
        return super().parse_hookimpl_opts(plugin, name)


def batched_hooks(arch: Any) -> list[str]:
    """The batched hooks the arch (a name or a plugin object) implements."""
    hook = get_plugin_manager(arch).hook
    return [name for name in BATCHED_HOOKS if hasattr(hook, name) and getattr(hook, name).get_hookimpls()]


def unbatched_vm(arch: Any, **options: Any) -> Vm:
    """A VM of ``arch`` (a name or a plugin object) whose core calls only the
    one-at-a-time hooks: per bitmap word, per fault."""
    pm = _UnbatchedPluginManager("kvmcore")
    pm.add_hookspecs(hookspecs)
    for plugin in get_plugin_manager(arch).get_plugins():
        pm.register(plugin)
    pm.check_pending()
    return Vm(pm, options)
