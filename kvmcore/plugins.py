"""Finding and loading arch plugins (the ``kvmcore.arch`` entry points)."""

import functools
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType
from typing import Any

import pluggy

from kvmcore import hookspecs

hookimpl = pluggy.HookimplMarker("kvmcore")
ENTRY_POINT_GROUP = "kvmcore.arch"


@functools.cache
def _arch_entry_points() -> dict[str, EntryPoint]:
    """The ``kvmcore.arch`` entry points, read once per process (a scan of every
    installed distribution costs a fifth of a second)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_archs() -> list[str]:
    """Names of the installed archs, from their entry points."""
    return sorted(_arch_entry_points())


def get_plugin_manager(arch: str | ModuleType | Any) -> pluggy.PluginManager:
    """A plugin manager holding exactly one arch.

    ``arch`` is an entry-point name, or a plugin object (a module or instance with
    hookimpls) for an arch that is not installed, such as one a test builds.  The
    manager is checked: a misspelled hook (``check_pending``) or a missing required
    hook is an error that names it.
    """
    pm = pluggy.PluginManager("kvmcore")
    pm.add_hookspecs(hookspecs)
    if isinstance(arch, str):
        if arch not in available_archs():
            raise ValueError(f"unknown arch {arch!r}; available: {', '.join(available_archs()) or 'none'}")
        try:
            pm.register(_arch_entry_points()[arch].load(), name=arch)
        except ImportError as exc:
            raise ValueError(f"arch {arch!r} is installed but its plugin does not import: {exc}") from exc
    else:
        pm.register(arch)
    pm.check_pending()
    missing = [name for name in hookspecs.REQUIRED_HOOKS if not getattr(pm.hook, name).get_hookimpls()]
    if missing:
        raise ValueError(f"arch {arch_name(arch)!r} does not implement required hook(s): {', '.join(missing)}")
    return pm


def arch_name(arch: str | Any) -> str:
    return arch if isinstance(arch, str) else getattr(arch, "__name__", type(arch).__name__)
