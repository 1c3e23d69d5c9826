"""Which archs the tests run on.

The generic tests take the ``arch`` fixture and run once per selected arch.
``KVMCORE_ARCH`` (set by each tox env) selects them; without it, every installed
arch runs, plus ``simple``, the core's own stand-in.  Tests marked
``@pytest.mark.arch("x86")`` belong to one arch and are deselected when it is not
selected.
"""

import os
import sys

import pytest

import kvmcore

sys.path.insert(0, os.path.dirname(__file__))

from simple_arch import SimpleArch  # noqa: E402


def selected_archs() -> list[str]:
    env = os.environ.get("KVMCORE_ARCH")
    if env:
        return [name.strip() for name in env.split(",") if name.strip()]
    return ["simple"] + kvmcore.available_archs()


def arch_plugin(name: str):
    """What ``create_vm`` takes for an arch name of the test matrix."""
    return SimpleArch() if name == "simple" else name


def pytest_configure(config):
    config.addinivalue_line("markers", "arch(name): the test belongs to one arch")


def pytest_collection_modifyitems(config, items):
    chosen = set(selected_archs())
    keep, drop = [], []
    for item in items:
        marker = item.get_closest_marker("arch")
        (keep if marker is None or marker.args[0] in chosen else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(params=selected_archs())
def arch(request):
    """An arch of the test matrix, as ``create_vm`` takes it."""
    return arch_plugin(request.param)


@pytest.fixture(scope="session")
def kvm():
    """Skip, saying why, where the real kernel cannot be used (no /dev/kvm, not x86-64)."""
    from kvmcore.kvm import kvm_available

    ok, why = kvm_available()
    if not ok:
        pytest.skip(f"the real kernel is not usable here: {why}")
