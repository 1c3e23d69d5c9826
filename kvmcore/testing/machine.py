"""The stateful trace: a hypothesis ``RuleBasedStateMachine`` that drives one VM (two for
the batched-hook check) through guest stores and loads, GET/CLEAR, logging on and off
and slot moves, and holds one check after every step.

It keeps its own model of the dirty log (a bool per page of each logging slot: stored
to since the last GET, or since CLEAR took the bit away), which is what
``exact-dirty-set`` compares each GET with.  Every step is also recorded as source
(:class:`kvmcore.testing.trace.Trace`), so a failure carries a reproducer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import numpy as np
from hypothesis import assume
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import kvmcore
from kvmcore import uapi
from kvmcore.errors import KvmError
from kvmcore.geometry import Geometry
from kvmcore.memslot import pages_from_bitmap, word_dtype
from kvmcore.testing import invariants as inv
from kvmcore.testing.checks import ConformanceFailure, DirtySetFailure, StepFailure
from kvmcore.testing.layouts import masks, page_offsets, placement, vm_layouts
from kvmcore.testing.unbatched import unbatched_vm
from kvmcore.testing.trace import Trace

LOG = uapi.KVM_MEM_LOG_DIRTY_PAGES
MAX_VCPUS = 3


@attrs.frozen
class MachineConfig:
    """What one run needs to know about the arch, found once before the run."""

    arch: Any
    options: dict
    check: str
    geometry: Geometry
    manual_modes: tuple[int, ...]
    has_batch: bool  # the batched protect hook, which protect_directly may call


class DirtyLogMachine(RuleBasedStateMachine):
    """One trace against one arch, holding ``config.check`` after every step."""

    def __init__(self, config: MachineConfig) -> None:
        super().__init__()
        self.config = config
        self.twin = config.check == "batched-hook"
        self.trace = Trace(config.arch, config.options, twin=self.twin)
        self.vms: list = []
        self.ready = False

    # -- running steps -------------------------------------------------------------

    def _fail(self, failure: ConformanceFailure, final: list[str], before_last: list[str] = ()) -> None:
        raise type(failure)(failure.message, self.trace.render(final, before_last)) from None

    def _step(self, lines: list[str], act: Callable[[Any, list], Any]) -> list[Any]:
        """Record a step and run it on every VM; an exception is the arch's failure."""
        self.trace.add(*lines)
        results = []
        for vm in self.vms:
            try:
                results.append(act(vm, vm.vcpus))
            except Exception as exc:  # the arch (or the core on its behalf) broke
                self._fail(StepFailure(f"{' / '.join(lines)} raised {type(exc).__name__}: {exc}"),
                           ["# the last step raises"])
        return results

    def _check(self, fn: Callable[..., None], *args: Any, final: str, before_last: list[str] = ()) -> None:
        try:
            fn(*args)
        except ConformanceFailure as failure:
            self._fail(failure, [final], before_last)

    # -- setup ---------------------------------------------------------------------

    @initialize(data=st.data())
    def setup(self, data: st.DataObject) -> None:
        cfg = self.config
        self.manual = data.draw(st.sampled_from(cfg.manual_modes), label="manual protect")
        self.layouts = data.draw(vm_layouts(cfg.geometry), label="layout")
        self.bases = [lay.base_gfn for lay in self.layouts]
        self.anchors = [lay.anchor for lay in self.layouts]
        self.touched: list[list[int]] = [[] for _ in self.layouts]
        starts = [data.draw(st.sampled_from(["logs", "mapped, then logs", "off"]), label=f"slot {lay.slot}")
                  for lay in self.layouts]
        nvcpus = data.draw(st.integers(1, MAX_VCPUS), label="vCPUs")
        self.vms = [kvmcore.create_vm(cfg.arch, **cfg.options)]
        if self.twin:
            self.vms.append(unbatched_vm(cfg.arch, **cfg.options))
        if self.manual:
            self._step([f"vm.enable_cap(kvmcore.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, {self.manual})"],
                       lambda vm, _: vm.enable_cap(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, self.manual))
        ps = cfg.geometry.page_size
        self.model: list[np.ndarray | None] = []
        self.loaded: list[np.ndarray | None] = []  # loaded since the harvest: may be reported (x86)
        for lay, start in zip(self.layouts, starts):
            flags = LOG if start == "logs" else 0
            try:
                for vm in self.vms:
                    vm.set_user_memory_region(lay.slot, lay.base_gfn * ps, lay.npages * ps, flags,
                                              host_page_size=lay.host_page_size)
            except KvmError:
                assume(False)  # the arch refuses this layout (its IPA limits); try another
            self.trace.add(f"vm.set_user_memory_region({lay.slot}, {lay.base_gfn * ps:#x}, {lay.npages * ps:#x}, "
                           f"{flags}, host_page_size={lay.host_page_size})")
            self.model.append(self._fresh_log(lay.npages) if flags else None)
            self.loaded.append(np.zeros(lay.npages, bool) if flags else None)
        self._step([f"for i in range({nvcpus}):", "    vm.create_vcpu(i)"],
                   lambda vm, _: [vm.create_vcpu(i) for i in range(nvcpus)])
        self.ready = True
        for lay, start in zip(self.layouts, starts):
            if start == "mapped, then logs":  # the guest ran (maybe on huge pages) before migration
                self._store(lay.slot, 0, data.draw(st.lists(self._offsets(lay.slot), min_size=1, max_size=8),
                                                   label="pages stored before logging"))
                self._set_logging(lay.slot, True)
        self._snapshot()

    def _fresh_log(self, npages: int) -> np.ndarray:
        """A new bitmap: all set with INITIALLY_SET (``kvm_dirty_log_manual_protect_and_init_set``)."""
        return np.full(npages, bool(self.manual & uapi.KVM_DIRTY_LOG_INITIALLY_SET))

    def _snapshot(self) -> None:
        """What the next rule's huge-page check compares with (taken after every check)."""
        vm = self.vms[0]
        self.blocks_before = inv.block_snapshot(vm)
        self.logging_before = {s.slot for s in vm.memslots if s.dirty_bitmap is not None}
        self.trace.begin_rule()

    # -- helpers for rules -----------------------------------------------------------

    def _logging(self) -> list[int]:
        return [i for i, m in enumerate(self.model) if m is not None]

    def _slot_args(self, i: int) -> tuple[int, int]:
        ps = self.config.geometry.page_size
        return self.bases[i] * ps, self.layouts[i].npages * ps

    def _offsets(self, i: int) -> st.SearchStrategy[int]:
        return page_offsets(self.bases[i], self.layouts[i].npages, self.anchors[i], self.config.geometry,
                            self.touched[i])

    # -- the rules -------------------------------------------------------------------

    def _store(self, i: int, v: int, offs: list[int]) -> None:
        """Guest stores (``vcpu.write_many``) to pages ``offs`` of slot ``i``, in order."""
        ps = self.config.geometry.page_size
        gpas = [(self.bases[i] + off) * ps for off in offs]
        value = len(self.trace.steps)
        if len(offs) > 8 and offs == list(range(offs[0], offs[0] + len(offs))):
            source = f"{gpas[0]:#x} + {ps} * np.arange({len(offs)})"
        else:
            source = f"np.array([{', '.join(hex(g) for g in gpas)}])"
        done = self._step([f"vm.vcpus[{v}].write_many({source}, {value})"],
                          lambda vm, vcpus: vcpus[v].write_many(np.array(gpas, np.int64), value))
        if any(n != len(gpas) for n in done):
            self._fail(StepFailure(f"write_many completed {done} of {len(gpas)} stores"),
                       ["# the last step stops early"])
        if self.model[i] is not None:
            self.model[i][offs] = True
        self.touched[i] = (self.touched[i] + offs)[-16:]

    def _slot_and_vcpu(self, data: st.DataObject) -> tuple[int, int]:
        i = data.draw(st.integers(0, len(self.layouts) - 1), label="slot")
        return i, data.draw(st.integers(0, len(self.vms[0].vcpus) - 1), label="vCPU")

    @precondition(lambda self: self.ready)
    @rule(data=st.data())
    def store(self, data: st.DataObject) -> None:
        """Stores to a few scattered pages of one slot."""
        i, v = self._slot_and_vcpu(data)
        self._store(i, v, data.draw(st.lists(self._offsets(i), min_size=1, max_size=8), label="pages"))

    @precondition(lambda self: self.ready)
    @rule(data=st.data())
    def store_run(self, data: st.DataObject) -> None:
        """Stores to a run of consecutive pages (a guest memcpy), across word and block edges."""
        i, v = self._slot_and_vcpu(data)
        start = data.draw(self._offsets(i), label="first page")
        n = data.draw(st.integers(1, 2 * self.config.geometry.bits_per_long + 2), label="pages")
        self._store(i, v, list(range(start, min(start + n, self.layouts[i].npages))))

    @precondition(lambda self: self.ready and any(self.touched))
    @rule(data=st.data())
    def store_again(self, data: st.DataObject) -> None:
        """Stores again to the pages touched last (the guest's working set): a page the
        previous GET left writable, or a stale TLB entry, lets these through unlogged."""
        i = data.draw(st.sampled_from([k for k, t in enumerate(self.touched) if t]), label="slot")
        v = data.draw(st.integers(0, len(self.vms[0].vcpus) - 1), label="vCPU")
        self._store(i, v, list(dict.fromkeys(self.touched[i])))

    @precondition(lambda self: self.ready)
    @rule(data=st.data())
    def load(self, data: st.DataObject) -> None:
        """A guest load (``vcpu.read``): it must never make a page writable unlogged."""
        i, v = self._slot_and_vcpu(data)
        self._load(i, v, data.draw(self._offsets(i), label="page loaded"))

    def _load(self, i: int, v: int, off: int) -> None:
        gpa = (self.bases[i] + off) * self.config.geometry.page_size
        self._step([f"vm.vcpus[{v}].read({gpa:#x}, 8)"], lambda vm, vcpus: vcpus[v].read(gpa, 8))
        if self.loaded[i] is not None:
            self.loaded[i][off] = True
        self.touched[i] = (self.touched[i] + [off])[-16:]

    @precondition(lambda self: self.ready and self._logging())
    @rule(data=st.data())
    def get_dirty_log(self, data: st.DataObject) -> None:
        """``KVM_GET_DIRTY_LOG``; compared with the model of what was stored to."""
        self._get(data.draw(st.sampled_from(self._logging()), label="slot"))

    def _get(self, i: int) -> None:
        bitmaps = self._step([self.trace.get_line(i)], lambda vm, _: vm.get_dirty_log(i))
        if self.twin:
            self._check(inv.check_bitmaps_equal, bitmaps[0], bitmaps[1], f"get_dirty_log({i})",
                        final="assert all((a == b).all() for a, b in zip(bitmaps, twin_bitmaps))")
        expected = np.nonzero(self.model[i])[0].tolist()
        if self.config.check == "exact-dirty-set":
            self._check_dirty_set(bitmaps[0], i, expected)
        if not self.manual:
            self.model[i][:] = False
            self.loaded[i][:] = False

    def _clear_all(self, i: int) -> None:
        """CLEAR what the log holds, as a VMM does right after a GET in manual mode."""
        npages = self.layouts[i].npages
        self._step([f"vm.clear_dirty_log({i}, 0, {npages}, vm.get_dirty_log({i}))"],
                   lambda vm, _: vm.clear_dirty_log(i, 0, npages, vm.get_dirty_log(i)))
        self.model[i][:] = False
        self.loaded[i][:] = False

    @precondition(lambda self: self.ready and self._logging())
    @rule(data=st.data())
    def copy_round(self, data: st.DataObject) -> None:
        """One round of a migration's copy phase: the guest stores, the VMM harvests (GET,
        and CLEAR in manual mode), the guest stores to the same pages again.  The next
        harvest must report them: a page the harvest left writable would be lost.

        (Hypothesis tries rules in name order in its simplest traces; this name sorts
        first among the rules a classic-mode trace can run, so even a run of a few
        examples does rounds.)"""
        i = data.draw(st.sampled_from(self._logging()), label="slot")
        v = data.draw(st.integers(0, len(self.vms[0].vcpus) - 1), label="vCPU")
        start = data.draw(self._offsets(i), label="first page of a run")
        n = data.draw(st.integers(1, 2 * self.config.geometry.bits_per_long + 2), label="run")
        pages = list(range(start, min(start + n, self.layouts[i].npages)))
        pages += data.draw(st.lists(self._offsets(i), max_size=6), label="more pages")
        for off in data.draw(st.lists(self._offsets(i), max_size=2), label="pages loaded first"):
            self._load(i, v, off)
        self._store(i, v, pages)
        self._get(i)
        if self.manual:
            self._clear_all(i)
        self._store(i, v, pages)

    def _check_dirty_set(self, bitmap: np.ndarray, i: int, expected: list[int]) -> None:
        """Every page stored to is reported; a page reported was stored to, or at least
        loaded (an arch may map a loaded page writable and mark it dirty at once, as x86
        does: over-reporting, never a loss)."""
        npages, bpl = self.layouts[i].npages, self.config.geometry.bits_per_long
        got = set(pages_from_bitmap(bitmap).tolist())
        allowed = set(expected) | set(np.nonzero(self.loaded[i])[0].tolist())
        final = ["pages = set(pages_from_bitmap(bitmap).tolist())",
                 f"assert pages >= set({expected}), 'stored to but not reported'",
                 f"assert pages <= set({sorted(allowed)}), 'reported but neither stored to nor loaded'"]
        if bitmap.dtype != word_dtype(bpl) or len(bitmap) != -(-npages // bpl):
            self._fail(DirtySetFailure(f"get_dirty_log({i}) returned {len(bitmap)} words of {bitmap.dtype}; "
                                       f"expected {-(-npages // bpl)} of {np.dtype(word_dtype(bpl))}"), final)
        lost, extra = sorted(set(expected) - got), sorted(got - allowed)
        what = []
        if lost:
            what.append(f"lost {len(lost)} page(s) stored to since the last GET/CLEAR: {lost[:inv.SHOWN]}")
        if extra:
            what.append(f"reported {len(extra)} page(s) neither stored to nor loaded since then: "
                        f"{extra[:inv.SHOWN]}")
        if what:
            self._fail(DirtySetFailure(f"get_dirty_log({i}) " + "; ".join(what)), final)

    @precondition(lambda self: self.ready and self.manual and self._logging())
    @rule(data=st.data())
    def clear_dirty_log(self, data: st.DataObject) -> None:
        """``KVM_CLEAR_DIRTY_LOG`` of whole 64-page chunks (or up to the slot's end)."""
        i = data.draw(st.sampled_from(self._logging()), label="slot")
        npages, bpl = self.layouts[i].npages, self.config.geometry.bits_per_long
        first = 64 * data.draw(st.integers(0, (npages - 1) // 64), label="first 64-page chunk")
        rest = npages - first
        num = data.draw(st.one_of(st.just(rest), st.integers(1, max(1, rest // 64)).map(lambda k: 64 * k)),
                        label="num_pages")
        num = min(num, rest)
        nwords = -(-num // bpl)
        fw = first // bpl
        kind = data.draw(st.sampled_from(["as reported", "all", "some words"]), label="bitmap")
        dtype = word_dtype(bpl)
        if kind == "as reported":  # what a VMM does: clear what GET just reported
            source = f"vm.get_dirty_log({i})[{fw}:{fw + nwords}]"
            words = self.vms[0].memslot(i).dirty_bitmap[fw:fw + nwords].copy()
            make = lambda vm: vm.get_dirty_log(i)[fw:fw + nwords]
            lines = []
        else:
            words = np.full(nwords, (1 << bpl) - 1 if kind == "all" else 0, dtype)
            lines = [f"words = np.full({nwords}, {int(words[0]):#x}, np.uint{bpl})"]
            if kind == "some words":
                picks = data.draw(st.dictionaries(st.integers(0, nwords - 1), masks(bpl), min_size=1, max_size=3),
                                  label="words")
                for k, w in sorted(picks.items()):
                    words[k] = w
                    lines.append(f"words[{k}] = {w:#x}")
            source = "words"
            make = lambda vm: words
        self._step(lines + [f"vm.clear_dirty_log({i}, {first}, {num}, {source})"],
                   lambda vm, _: vm.clear_dirty_log(i, first, num, make(vm)))
        bits = pages_from_bitmap(np.array(words, dtype)) + first
        self.model[i][bits[bits < npages]] = False
        self.loaded[i][bits[bits < npages]] = False

    @precondition(lambda self: self.ready)
    @rule(data=st.data())
    def toggle_logging(self, data: st.DataObject) -> None:
        """``KVM_MEM_LOG_DIRTY_PAGES`` on or off (a flags-only change)."""
        i = data.draw(st.integers(0, len(self.layouts) - 1), label="slot")
        self._set_logging(i, self.model[i] is None)

    def _set_logging(self, i: int, on: bool) -> None:
        flags = LOG if on else 0
        gpa, size = self._slot_args(i)
        self._step([f"vm.set_user_memory_region({i}, {gpa:#x}, {size:#x}, {flags})"],
                   lambda vm, _: vm.set_user_memory_region(i, gpa, size, flags))
        self.model[i] = self._fresh_log(self.layouts[i].npages) if flags else None
        self.loaded[i] = np.zeros(self.layouts[i].npages, bool) if flags else None

    @precondition(lambda self: self.ready)
    @rule(data=st.data())
    def move(self, data: st.DataObject) -> None:
        """Move a slot (its mappings go; a logging slot keeps its bitmap)."""
        i = data.draw(st.integers(0, len(self.layouts) - 1), label="slot")
        lay = self.layouts[i]
        base, _, anchor = data.draw(placement(self.config.geometry, lay.region, lay.npages), label="new place")
        if base == self.bases[i]:
            return
        ps = self.config.geometry.page_size
        flags = LOG if self.model[i] is not None else 0
        try:
            self.vms[0].set_user_memory_region(i, base * ps, lay.npages * ps, flags)
        except KvmError:
            return  # the arch refuses the new place (its IPA limits): nothing changed
        self.trace.add(f"vm.set_user_memory_region({i}, {base * ps:#x}, {lay.npages * ps:#x}, {flags})")
        for vm in self.vms[1:]:
            vm.set_user_memory_region(i, base * ps, lay.npages * ps, flags)
        self.bases[i], self.anchors[i] = base, anchor

    @precondition(lambda self: self.ready and self.config.check in ("protect-hook", "batched-hook")
                  and self._logging())
    @rule(data=st.data())
    def protect_directly(self, data: st.DataObject) -> None:
        """The protect hook called straight, with any offset (a dirty-ring reset passes
        arbitrary ones) and any mask, then the flush; every masked page must trap."""
        i = data.draw(st.sampled_from(self._logging()), label="slot")
        npages, bpl = self.layouts[i].npages, self.config.geometry.bits_per_long
        pairs, targets = [], []
        for _ in range(data.draw(st.integers(1, 3), label="words")):
            page = data.draw(self._offsets(i), label="a page to re-arm")
            bit = data.draw(st.one_of(st.sampled_from([bpl - 1, 0, bpl // 2]), st.integers(0, bpl - 1)),
                            label="its bit")
            bit = min(bit, page)
            off = page - bit
            mask = data.draw(masks(bpl), label="mask") | 1 << bit
            if npages - off < bpl:
                mask &= (1 << (npages - off)) - 1
            pairs.append((off, mask))
            targets.append(page)
        # make the pages writable first (a store maps them), so that a missed one shows
        self._store(i, data.draw(st.integers(0, len(self.vms[0].vcpus) - 1), label="vCPU"), targets)
        offs, msks = [p[0] for p in pairs], [p[1] for p in pairs]
        hexes = "[" + ", ".join(hex(m) for m in msks) + "]"
        if self.twin:  # the batched hook on one VM, the per-word hook on the other
            batched = "has_batched_hook(vm)"
        else:
            batched = str(self.config.has_batch and data.draw(st.booleans(), label="batched"))
        self._step([f"protect_masked(vm, {i}, {offs}, {hexes}, batched={batched})"],
                   lambda vm, _: inv.protect_masked(vm, i, offs, msks, batched=inv.has_batched_hook(vm)
                                                    if self.twin else batched == "True"))
        if self.config.check == "protect-hook":
            self._check(inv.check_protected, self.vms[0], i, offs, msks,
                        final=f"check_protected(vm, {i}, {offs}, {hexes})")

    # -- the check after every step ----------------------------------------------------

    @invariant()
    def holds(self) -> None:
        if not self.ready:
            return
        vm, check = self.vms[0], self.config.check
        if check == "mst-invariant":
            self._check(inv.check_mst_invariant, vm, final="check_mst_invariant(vm)")
        elif check == "huge-pages":
            self._check(inv.check_huge_pages, vm, self.blocks_before, self.logging_before,
                        final="check_huge_pages(vm, blocks, logging)",
                        before_last=["blocks = block_snapshot(vm)",
                                     "logging = {s.slot for s in vm.memslots if s.dirty_bitmap is not None}"])
        elif check == "batched-hook":
            self._check(inv.check_same_effects, *self.vms, final="check_same_effects(vm, twin)")
        self._snapshot()

    def teardown(self) -> None:
        for vm in self.vms:
            vm.close()

