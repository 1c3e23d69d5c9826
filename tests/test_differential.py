"""The model's x86 plugin held against the real kernel: same traces, same bitmaps, same errno."""

import pytest

import kvmcore
from kvmcore import difftest
from simple_arch import SimpleArch

pytestmark = pytest.mark.arch("x86")


@pytest.fixture
def kernel(kvm):
    return lambda: kvmcore.create_vm("x86", backend="kvm")


def model():
    return kvmcore.create_vm("x86")


@pytest.mark.parametrize("mode", ["classic", "manual"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_model_and_kernel_report_identical_bitmaps_every_round(kernel, mode, seed):
    trace = difftest.random_trace(seed, rounds=6, mode=mode)
    assert difftest.first_difference(trace, model, kernel) is None


def test_model_and_kernel_give_the_same_errno_for_every_bad_input(kernel):
    assert difftest.errno_table(model) == difftest.errno_table(kernel)


def test_the_comparison_can_fail(kernel):
    """A trace played on a model that loses pages must be reported, with the pages."""
    trace = difftest.random_trace(4, rounds=3)
    diff = difftest.first_difference(trace, lambda: kvmcore.create_vm(SimpleArch(flush=False)), kernel)
    assert diff is not None and diff.only_b and not diff.only_a
    assert "only in B" in str(diff)
