"""Random write traces on x86, in every tracking mode: GET and CLEAR must report exactly
the pages written since the last GET (classic) or since their bit was cleared (manual,
INITIALLY_SET), whatever the geometry, huge-page backing, MMU and protect hook.

The traces write only: a read may report a page on x86 (a writable host page is
mapped writable and marked dirty at once), which tests/test_x86.py covers.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvmcore
from arch_plugins.x86 import X86, X86Batched
from helpers import LOG, dirty_pages, page_gpas

pytestmark = pytest.mark.arch("x86")

PAGE, MIB2, GIB = 4096, 2 << 20, 1 << 30
MODES = {
    "classic": 0,
    "manual": kvmcore.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    "init_set": kvmcore.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | kvmcore.KVM_DIRTY_LOG_INITIALLY_SET,
}

hyp = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def ops(npages: int, manual: bool):
    offsets = st.lists(st.integers(0, npages - 1), min_size=1, max_size=40)
    write = st.tuples(st.just("write"), st.integers(0, 1), offsets)
    clear = st.tuples(st.just("clear"), st.integers(0, -(-npages // 64) - 1), st.integers(1, 8),
                      st.lists(st.sampled_from([0, (1 << 64) - 1, 0x5555_5555_5555_5555, 1 << 63, 1]),
                               min_size=8, max_size=8))
    simple = st.sampled_from([("get",), ("toggle",)])
    return st.lists(st.one_of(write, write, write, simple, *([clear, clear] if manual else [])), max_size=14)


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "split_on_fault"])
@pytest.mark.parametrize("tracking", ["wp", "pml"])
@hyp
@given(data=st.data())
def test_random_traces_report_exactly_the_written_pages(tracking, eager, data):
    levels = data.draw(st.sampled_from([4, 5]), label="levels")
    tdp_mmu = data.draw(st.booleans(), label="tdp_mmu")
    recovery = data.draw(st.sampled_from(["zap", "in_place"]), label="recovery")
    mode = data.draw(st.sampled_from(sorted(MODES)), label="mode")
    plugin = data.draw(st.sampled_from([X86, X86Batched]), label="plugin")()
    hps = data.draw(st.sampled_from([PAGE, MIB2, GIB]), label="host_page_size")
    small = st.integers(1, 1600)
    npages = data.draw(st.one_of(small, small, small, st.just(512 * 512 + 5)), label="npages")
    top = (1 << 49) if levels == 5 else 0
    base = data.draw(st.sampled_from([GIB, 3 * GIB - 7 * PAGE, 5 * MIB2, top + 2 * GIB]), label="base")
    premap = data.draw(st.sampled_from(["none", "all", "some"]), label="premap")

    vm = kvmcore.create_vm(plugin, levels=levels, dirty_tracking=tracking, eager_page_split=eager,
                           tdp_mmu=tdp_mmu, huge_page_recovery=recovery)
    if MODES[mode]:
        vm.enable_cap(kvmcore.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, MODES[mode])
    vcpus = [vm.create_vcpu(0), vm.create_vcpu(1)]
    size = npages * PAGE
    vm.set_user_memory_region(0, base, size, 0 if premap != "none" else LOG, host_page_size=hps)
    if premap != "none":
        pages = np.arange(0, npages, 1 if premap == "all" and npages < 4096 else 97)
        vcpus[1].write_many(page_gpas(vm, base, pages), 1)
        vm.set_user_memory_region(0, base, size, LOG)
    everything = set(range(npages))
    expected = set(everything) if mode == "init_set" else set()
    value = 2
    for op in data.draw(ops(npages, mode != "classic"), label="ops"):
        if op[0] == "write":
            _, v, offsets = op
            assert vcpus[v].write_many(page_gpas(vm, base, offsets, byte=8 * v), value) == len(offsets)
            expected |= set(offsets)
        elif op[0] == "get":
            assert dirty_pages(vm.get_dirty_log(0)) == expected
            if mode == "classic":
                expected = set()
        elif op[0] == "toggle":
            vm.set_user_memory_region(0, base, size, 0)
            vcpus[0].write_many(page_gpas(vm, base, [0, npages - 1]), value)  # not logged: logging is off
            vm.set_user_memory_region(0, base, size, LOG)
            expected = set(everything) if mode == "init_set" else set()
        else:
            _, first_word, nwords, words = op
            first = first_word * 64
            num = min(nwords * 64, npages - first)
            bits = np.array(words[:-(-num // 64)], np.uint64)
            vm.clear_dirty_log(0, first, num, bits)
            cleared = {first + w * 64 + b for w, word in enumerate(bits.tolist()) for b in range(64)
                       if word >> b & 1 and w * 64 + b < num}
            expected -= cleared
        value += 1
    assert dirty_pages(vm.get_dirty_log(0)) == expected
