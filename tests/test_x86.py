"""The x86 plugin: EPT geometry, rmap write protection, huge pages around logging, the
fast page fault and MMU-writable, PML, TLB flush accounting, INITIALLY_SET, batched hook.

Broken variants (``X86(bugs=...)``) prove that the tests which guard a classic bug fail
when the bug is there.
"""

import errno

import numpy as np
import pytest

import kvmcore
from arch_plugins.x86 import X86, X86Batched
from arch_plugins.x86.mmu import HOST_WRITABLE, MMU_WRITABLE
from helpers import LOG, dirty_pages, page_gpas
from kvmcore.pgtable import PTE_D, PTE_W

pytestmark = pytest.mark.arch("x86")

PAGE, MIB2, GIB = 4096, 2 << 20, 1 << 30
MANUAL = kvmcore.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
INIT_SET = kvmcore.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | kvmcore.KVM_DIRTY_LOG_INITIALLY_SET


def premapped_vm(plugin="x86", npages=1024, base=GIB, hps=MIB2, manual=0, **options):
    """A VM whose slot 0 is written all over (so mapped, huge where it can be) before
    logging is turned on."""
    vm = kvmcore.create_vm(plugin, **options)
    if manual:
        vm.enable_cap(kvmcore.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, manual)
    vm.set_user_memory_region(0, base, npages * PAGE, 0, host_page_size=hps)
    vcpu = vm.create_vcpu(0)
    vcpu.write_many(page_gpas(vm, base, range(npages)), 1)
    vm.set_user_memory_region(0, base, npages * PAGE, LOG)
    return vm, vcpu


def leaf_pte(vm, gpa):
    return vm.pgtable.leaf(gpa >> 12).pte


# -- the arch, its options and geometry ------------------------------------------------------

def test_entry_point_loads_the_module_hooks():
    pm = kvmcore.get_plugin_manager("x86")
    for name in ("kvm_arch_info", "kvm_arch_handle_stage2_fault", "kvm_mmu_write_protect_pt_masked",
                 "kvm_mmu_write_protect_pt_masked_batch", "kvm_arch_hw_set_dirty", "kvm_arch_vcpu_exit",
                 "kvm_arch_sync_dirty_log", "kvm_flush_remote_tlbs_range", "kvm_cpu_dirty_log_size"):
        assert getattr(pm.hook, name).get_hookimpls(), name


def test_arch_constants():
    vm = kvmcore.create_vm("x86")
    assert (vm.arch, vm.page_size, vm.bits_per_long) == ("x86", 4096, 64)
    assert vm.check_extension(kvmcore.KVM_CAP_NR_MEMSLOTS) == 32764
    assert vm.check_extension(kvmcore.KVM_CAP_MULTI_ADDRESS_SPACE) == 2
    assert vm.check_extension(kvmcore.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) == kvmcore.KVM_DIRTY_LOG_MANUAL_CAPS
    vm.set_user_memory_region(1 << 16 | 3, 0, 16 * PAGE)        # the SMM address space
    with pytest.raises(kvmcore.KvmError) as err:
        vm.set_user_memory_region(2 << 16 | 3, 0, 16 * PAGE)
    assert err.value.errno == errno.EINVAL
    with pytest.raises(kvmcore.KvmError) as err:
        vm.set_user_memory_region(32764, 0, 16 * PAGE)
    assert err.value.errno == errno.EINVAL


@pytest.mark.parametrize(("levels", "bits", "start"), [(4, 48, 0), (5, 57, -1)])
def test_ept_geometry(levels, bits, start):
    g = kvmcore.create_vm("x86", levels=levels).geometry
    assert (g.ipa_bits, g.start_level, g.levels, g.concatenated_tables) == (bits, start, levels, 1)
    assert g.describe()["block_sizes"] == [GIB, MIB2]


def test_a_slot_beyond_the_ept_reach_is_einval():
    high = 1 << 50
    with pytest.raises(kvmcore.KvmError) as err:
        kvmcore.create_vm("x86").set_user_memory_region(0, high, 16 * PAGE, LOG)
    assert err.value.errno == errno.EINVAL and "48-bit" in str(err.value)
    vm = kvmcore.create_vm("x86", levels=5)
    vm.set_user_memory_region(0, high, 16 * PAGE, LOG)
    vcpu = vm.create_vcpu(0)
    vcpu.write_many(page_gpas(vm, high, [3, 9]), 1)
    assert dirty_pages(vm.get_dirty_log(0)) == {3, 9}


@pytest.mark.parametrize(("option", "value", "allowed"), [
    ("levels", 3, "4, 5"),
    ("levels", True, "4, 5"),
    ("dirty_tracking", "d-bits", "'wp', 'pml'"),
    ("eager_page_split", 1, "True, False"),
    ("tdp_mmu", "yes", "True, False"),
    ("huge_page_recovery", "collapse", "'zap', 'in_place'"),
])
def test_unknown_option_values_are_einval_naming_the_allowed_ones(option, value, allowed):
    with pytest.raises(kvmcore.KvmError) as err:
        kvmcore.create_vm("x86", **{option: value})
    assert err.value.errno == errno.EINVAL
    assert option in str(err.value) and allowed in str(err.value)


# -- huge pages -----------------------------------------------------------------------------

@pytest.mark.parametrize(("hps", "size"), [(PAGE, PAGE), (MIB2, MIB2), (GIB, GIB)])
def test_mapped_as_large_as_the_host_backing_allows_when_not_logging(hps, size):
    vm = kvmcore.create_vm("x86")
    vm.set_user_memory_region(0, GIB, GIB, 0, host_page_size=hps)
    vcpu = vm.create_vcpu(0)
    vcpu.write_many(np.array([GIB + 5 * MIB2 + 8]), 1)
    assert vm.translate(GIB + 5 * MIB2).size == size
    assert vm.translate(GIB + 5 * MIB2).writable


def test_huge_pages_must_lie_inside_the_slot():
    """lpage_info: the partial 2 MiB regions at the head and tail of a slot map 4K."""
    vm = kvmcore.create_vm("x86")
    base = 2 * MIB2
    npages = 3 * 512 + 7
    vm.set_user_memory_region(0, base, npages * PAGE, 0, host_page_size=GIB)
    vcpu = vm.create_vcpu(0)
    vcpu.write_many(page_gpas(vm, base, [0, 600, 3 * 512 + 3]), 1)
    assert vm.translate(base).size == MIB2
    assert vm.translate(base + 600 * PAGE).size == MIB2           # 1 GiB backing, but the slot is 6 MiB
    assert vm.translate(base + (3 * 512 + 3) * PAGE).size == PAGE  # the tail region is partial


def test_gpa_and_hva_must_be_congruent():
    """A slot at an unaligned gpa (the model's hva is aligned) gets no huge page at all."""
    vm = kvmcore.create_vm("x86")
    base = 2 * MIB2 + 64 * PAGE
    vm.set_user_memory_region(0, base, 4 * MIB2, 0, host_page_size=MIB2)
    vcpu = vm.create_vcpu(0)
    vcpu.write_many(page_gpas(vm, base, [1000]), 1)
    assert vm.translate(base + 1000 * PAGE).size == PAGE


@pytest.mark.parametrize(("hps", "splits"), [(MIB2, 4), (GIB, 1 + 512)])
def test_eager_split_when_logging_starts(hps, splits):
    npages = 4 * 512 if hps == MIB2 else 512 * 512
    vm, vcpu = premapped_vm(npages=npages, hps=hps)
    assert vm.stats["huge_pages_split"] == splits
    for off in (0, 511, 512, npages - 1):
        t = vm.translate(GIB + off * PAGE)
        assert t.size == PAGE and not t.writable
    vcpu.write_many(page_gpas(vm, GIB, [5, 700]), 2)
    assert dirty_pages(vm.get_dirty_log(0)) == {5, 700}


def test_without_eager_split_a_write_fault_splits_the_huge_page():
    """TDP MMU: the huge SPTE is write-protected at enable; a write inside it splits it
    (children inherit read-only) and installs one writable 4K SPTE."""
    vm, vcpu = premapped_vm(npages=4 * 512, eager_page_split=False)
    t = vm.translate(GIB)
    assert (t.size, t.writable) == (MIB2, False)
    assert leaf_pte(vm, GIB) & MMU_WRITABLE, "dirty logging keeps MMU-writable"
    vcpu.write_many(page_gpas(vm, GIB, [5]), 2)
    assert vm.stats["huge_pages_split"] == 1
    assert (vm.translate(GIB + 5 * PAGE).size, vm.translate(GIB + 5 * PAGE).writable) == (PAGE, True)
    assert (vm.translate(GIB + 6 * PAGE).size, vm.translate(GIB + 6 * PAGE).writable) == (PAGE, False)
    assert vm.translate(GIB + 512 * PAGE).size == MIB2
    vcpu.write_many(page_gpas(vm, GIB, [6, 513]), 3)
    assert dirty_pages(vm.get_dirty_log(0)) == {5, 6, 513}


def test_without_eager_split_a_1g_page_splits_one_level_at_a_time():
    vm, vcpu = premapped_vm(npages=512 * 512, hps=GIB, eager_page_split=False)
    assert vm.translate(GIB).size == GIB
    vcpu.write_many(page_gpas(vm, GIB, [700]), 2)
    assert vm.stats["huge_pages_split"] == 2
    assert vm.translate(GIB + 700 * PAGE).size == PAGE
    assert vm.translate(GIB + 5 * PAGE).size == MIB2
    assert dirty_pages(vm.get_dirty_log(0)) == {700}


def test_legacy_mmu_zaps_the_huge_page_with_a_flush_instead_of_splitting():
    vm, vcpu = premapped_vm(npages=4 * 512, tdp_mmu=False)
    assert vm.translate(GIB).size == MIB2, "no eager split without the TDP MMU"
    flushes = vm.stats["tlb_flushes_full"]
    vcpu.write_many(page_gpas(vm, GIB, [5]), 2)
    assert vm.stats["tlb_flushes_full"] == flushes + 1
    assert vm.translate(GIB + 5 * PAGE).size == PAGE
    assert vm.translate(GIB + 6 * PAGE) is None
    vcpu.write_many(page_gpas(vm, GIB, [6]), 3)
    assert dirty_pages(vm.get_dirty_log(0)) == {5, 6}


@pytest.mark.parametrize("tdp_mmu", [True, False])
def test_zap_recovery_lets_huge_pages_come_back_on_later_faults(tdp_mmu):
    vm, vcpu = premapped_vm(npages=4 * 512, tdp_mmu=tdp_mmu)
    vcpu.write_many(page_gpas(vm, GIB, range(0, 4 * 512, 3)), 2)
    flushes = vm.stats["tlb_flushes_full"]
    vm.set_user_memory_region(0, GIB, 4 * MIB2, 0)
    if tdp_mmu:   # 6.12: one zap, and one flush, per collapsible table
        assert vm.stats["collapsible_sptes_zapped"] == 4
        assert vm.stats["tlb_flushes_full"] == flushes + 4
    else:         # legacy: the leaves are zapped, one memslot flush
        assert vm.stats["tlb_flushes_full"] == flushes + 1
    assert vm.translate(GIB + 3 * PAGE) is None
    vcpu.write_many(page_gpas(vm, GIB, [3, 1500]), 4)
    assert vm.translate(GIB + 3 * PAGE).size == MIB2
    assert vm.translate(GIB + 1500 * PAGE).size == MIB2


def test_in_place_recovery_restores_huge_pages_at_once():
    vm, vcpu = premapped_vm(npages=512 * 512, hps=GIB, huge_page_recovery="in_place")
    flushes = vm.stats["tlb_flushes_full"]
    vm.set_user_memory_region(0, GIB, GIB, 0)
    assert vm.stats["huge_pages_recovered"] == 1
    assert vm.stats["tlb_flushes_full"] == flushes + 1
    t = vm.translate(GIB + 12345 * PAGE)
    assert (t.size, t.writable) == (GIB, False)   # made from the first leaf, write-protected at enable
    faults = vm.stats["write_faults"]
    vcpu.write_many(page_gpas(vm, GIB, [7, 99999]), 2)
    assert vm.stats["write_faults"] == faults + 1  # the fast path makes the 1G SPTE writable
    assert vm.translate(GIB).writable


def test_no_recovery_where_the_host_backing_is_small():
    vm, vcpu = premapped_vm(npages=1024, hps=PAGE)
    vm.set_user_memory_region(0, GIB, 1024 * PAGE, 0)
    assert vm.stats["collapsible_sptes_zapped"] == 0
    assert vm.translate(GIB).size == PAGE


@pytest.mark.parametrize("bugs", [(), ("fix_w_on_large_spte",)])
def test_a_large_spte_is_never_made_writable_while_logging(bugs):
    """Classic bug #8: making the huge SPTE writable and marking one gfn hides the
    writes to the other 511 pages."""
    vm, vcpu = premapped_vm(X86(bugs=bugs), npages=512, eager_page_split=False)
    vcpu.write_many(page_gpas(vm, GIB, [1]), 2)
    vcpu.write_many(page_gpas(vm, GIB, [2]), 2)
    got = dirty_pages(vm.get_dirty_log(0))
    assert (got == {1, 2}) is (not bugs)


# -- faults: what x86 reports dirty, and when -------------------------------------------------

def test_write_to_a_write_protected_page_takes_the_fast_path_and_marks_it_dirty():
    vm, vcpu = premapped_vm(npages=64, hps=PAGE)
    vm.get_dirty_log(0)
    pte = leaf_pte(vm, GIB + 9 * PAGE)
    assert not pte & PTE_W and pte & MMU_WRITABLE and pte & PTE_D
    fast = vm.stats["fast_page_faults"]
    vcpu.write_many(page_gpas(vm, GIB, [9]), 2)
    assert vm.stats["fast_page_faults"] == fast + 1
    assert leaf_pte(vm, GIB + 9 * PAGE) & PTE_W
    assert dirty_pages(vm.get_dirty_log(0)) == {9}


def test_a_read_fault_maps_writable_and_dirty_when_the_host_page_is_writable():
    """make_spte: with a writable host page even a read fault installs a writable SPTE,
    and in a logging slot that marks the page dirty at once.  An untouched host page
    is the zero page: read-only, not dirty, until the guest writes it."""
    vm = kvmcore.create_vm("x86")
    vm.set_user_memory_region(0, 0, 64 * PAGE, LOG)
    vcpu = vm.create_vcpu(0)
    vm.memory(0)[5 * PAGE + 100] = 0x5A          # the VMM loaded data into page 5
    assert vcpu.read(5 * PAGE + 100, 1) == b"\x5a"
    assert vcpu.read(6 * PAGE, 8) == bytes(8)
    assert vm.translate(5 * PAGE).writable and not vm.translate(6 * PAGE).writable
    assert dirty_pages(vm.get_dirty_log(0)) == {5}
    vcpu.write_many(page_gpas(vm, 0, [6]), 1)     # the zero page: a slow write fault
    assert dirty_pages(vm.get_dirty_log(0)) == {6}
    vcpu.write_many(page_gpas(vm, 0, [7]), 1)
    vm.get_dirty_log(0)
    vm.set_user_memory_region(0, 0, 64 * PAGE, 0)  # zap nothing (4K backing), logging off
    vm.set_user_memory_region(0, 2 * GIB, 64 * PAGE, LOG)   # move: every SPTE is gone
    vcpu.read(2 * GIB + 7 * PAGE, 8)              # written before: the host page is writable
    assert dirty_pages(vm.get_dirty_log(0)) == {7}


def test_read_only_slots_are_never_mapped_writable():
    vm = kvmcore.create_vm("x86")
    vm.set_user_memory_region(0, 0, 16 * PAGE, LOG | kvmcore.KVM_MEM_READONLY)
    vm.memory(0)[PAGE] = 1
    vcpu = vm.create_vcpu(0)
    vcpu.read(PAGE, 8)
    assert not vm.translate(PAGE).writable
    assert not leaf_pte(vm, PAGE) & (PTE_W | MMU_WRITABLE | HOST_WRITABLE)
    assert dirty_pages(vm.get_dirty_log(0)) == set()


# -- TLB flushes ----------------------------------------------------------------------------

def test_get_and_clear_flush_the_memslot_which_is_a_full_flush():
    vm = kvmcore.create_vm("x86")
    vm.enable_cap(kvmcore.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, MANUAL)
    vm.set_user_memory_region(0, 0, 128 * PAGE, LOG)
    vcpu = vm.create_vcpu(0)
    vcpu.write_many(page_gpas(vm, 0, [1, 100]), 1)
    before = dict(vm.stats)
    vm.clear_dirty_log(0, 0, 128, vm.get_dirty_log(0))
    assert vm.stats["tlb_range_flush_fallbacks"] == before["tlb_range_flush_fallbacks"] + 1
    assert vm.stats["tlb_flushes_full"] == before["tlb_flushes_full"] + 1
    assert vm.stats["tlb_flushes_range"] == before["tlb_flushes_range"] == 0


def test_enabling_logging_ends_with_an_unconditional_memslot_flush():
    vm = kvmcore.create_vm("x86")
    vm.set_user_memory_region(0, 0, 16 * PAGE, 0)
    flushes = vm.stats["tlb_flushes_full"]
    vm.set_user_memory_region(0, 0, 16 * PAGE, LOG)    # nothing is mapped, it still flushes
    assert vm.stats["tlb_flushes_full"] == flushes + 1


class FlushLater(X86Batched):
    """Runs ``before`` when the memslot flush of a GET is about to happen, i.e. after the
    MMU lock is dropped (``kvm_get_dirty_log_protect`` step 4)."""

    def __init__(self, before, bugs=()):
        super().__init__(bugs)
        self.before = before

    @kvmcore.hookimpl
    def kvm_flush_remote_tlbs(self, kvm):
        before, self.before = self.before, None
        if before:
            before()
        super().kvm_flush_remote_tlbs(kvm)


@pytest.mark.parametrize("bugs", [(), ("fast_path_no_dirty",)])
def test_mmu_writable_lets_the_flush_follow_the_lock(bugs):
    """Between GET's write protection and its flush, another vCPU writes a page it just
    protected: the fault takes the fast path (the SPTE kept MMU-writable) and makes the
    page writable again, but marks it dirty as it does, so the page is reported by the
    next GET.  That is why x86 may flush after dropping the MMU lock (classic bug #3):
    no path can make a page writable without marking it dirty."""
    other = {}

    def concurrent_write():
        other["vcpu"].write_many(page_gpas(vm, 0, [4]), 3)

    vm = kvmcore.create_vm(FlushLater(concurrent_write, bugs))
    vm.set_user_memory_region(0, 0, 64 * PAGE, LOG)
    vcpu, other["vcpu"] = vm.create_vcpu(0), vm.create_vcpu(1)
    vcpu.write_many(page_gpas(vm, 0, [4, 5]), 1)
    fast = vm.stats["fast_page_faults"]
    assert dirty_pages(vm.get_dirty_log(0)) == {4, 5}     # the concurrent write ran in here
    assert vm.stats["fast_page_faults"] == fast + 1
    assert vm.translate(4 * PAGE).writable
    vcpu.write_many(page_gpas(vm, 0, [4]), 4)             # no fault now: W is back
    reported = dirty_pages(vm.get_dirty_log(0))
    assert (reported == {4}) is (not bugs)


# -- INITIALLY_SET --------------------------------------------------------------------------

@pytest.mark.parametrize("eager", [True, False])
def test_initially_set_protects_huge_pages_on_the_first_clear(eager):
    vm, vcpu = premapped_vm(npages=4 * 512, manual=INIT_SET, eager_page_split=eager)
    assert vm.translate(GIB).size == MIB2 and vm.translate(GIB).writable, "nothing protected at enable"
    request = np.zeros(4 * 512 // 64, np.uint64)
    request[[0, 9]] = 0b1010                         # pages 1, 3 and 577, 579
    vm.clear_dirty_log(0, 0, 4 * 512, request)
    if eager:
        assert vm.translate(GIB + 1 * PAGE).size == PAGE
        assert vm.translate(GIB + 1100 * PAGE).size == MIB2, "only huge pages under a mask are split"
    else:
        assert vm.translate(GIB).size == MIB2 and not vm.translate(GIB).writable
        assert not leaf_pte(vm, GIB) & MMU_WRITABLE, "pt_protect: no fast path for the huge page"
    assert vm.translate(GIB + 1024 * PAGE).writable, "a huge page outside every mask stays writable"
    vcpu.write_many(page_gpas(vm, GIB, [1, 3, 577, 2]), 2)
    assert dirty_pages(vm.get_dirty_log(0)) == set(range(4 * 512)) - {1, 3, 577, 579} | {1, 3, 577}


@pytest.mark.parametrize("bugs", [(), ("no_cross_two_large_pages",)])
def test_a_mask_crossing_two_large_pages_protects_both(bugs):
    """Classic bug #6.  GET/CLEAR words of a slot never cross 2 MiB in the model (its hva
    is always aligned, so only aligned slots get huge pages), but a dirty-ring reset
    passes any offset: call the hook as a reset would, over pages 500..520.  Every page
    of the mask must then trap on its next write."""
    vm, vcpu = premapped_vm(X86(bugs=bugs), npages=2 * 512, manual=INIT_SET, eager_page_split=False)
    with vm.mmu_lock:
        vm.hook.kvm_mmu_write_protect_pt_masked(kvm=vm, slot=vm.memslot(0), gfn_offset=500, mask=(1 << 21) - 1)
    vm.flush_remote_tlbs()
    assert not vm.translate(GIB + 505 * PAGE).writable
    assert vm.translate(GIB + 515 * PAGE).writable is bool(bugs)
    faults = vm.stats["write_faults"]
    vcpu.write_many(page_gpas(vm, GIB, [515]), 2)
    assert vm.stats["write_faults"] == faults + (not bugs)


# -- PML ------------------------------------------------------------------------------------

def test_pml_logs_writes_through_d_bits_without_faults():
    vm, vcpu = premapped_vm(npages=256, hps=PAGE, dirty_tracking="pml")
    pte = leaf_pte(vm, GIB)
    assert pte & PTE_W and not pte & PTE_D, "PML: logging starts by clearing D, W stays"
    faults = vm.stats["write_faults"]
    vcpu.write_many(page_gpas(vm, GIB, [3, 200, 3]), 2)
    assert vm.stats["write_faults"] == faults
    assert vm.stats["hw_dirty_bits_set"] == 2 and vm.stats["pml_entries_logged"] == 2
    assert dirty_pages(vm.get_dirty_log(0)) == {3, 200}
    assert leaf_pte(vm, GIB + 3 * PAGE) & (PTE_W | PTE_D) == PTE_W, "GET re-arms by clearing D"
    vcpu.write_many(page_gpas(vm, GIB, [200]), 3)
    assert dirty_pages(vm.get_dirty_log(0)) == {200}
    assert vm.stats["write_faults"] == faults


def test_pml_new_writable_sptes_have_d_set_and_are_dirty_at_once():
    """make_spte pre-sets D on writable SPTEs with PML too: the fault marks the page."""
    vm = kvmcore.create_vm("x86", dirty_tracking="pml")
    vm.set_user_memory_region(0, 0, 64 * PAGE, LOG)
    vcpu = vm.create_vcpu(0)
    vcpu.write_many(page_gpas(vm, 0, [8]), 1)
    assert leaf_pte(vm, 8 * PAGE) & PTE_D
    assert vm.stats["pml_entries_logged"] == 0
    assert dirty_pages(vm.get_dirty_log(0)) == {8}


def test_pml_huge_pages_are_write_protected_and_split_on_write():
    vm, vcpu = premapped_vm(npages=2 * 512, dirty_tracking="pml", eager_page_split=False)
    t = vm.translate(GIB)
    assert (t.size, t.writable, t.dirty) == (MIB2, False, False)
    vcpu.write_many(page_gpas(vm, GIB, [10, 11]), 2)
    assert vm.translate(GIB + 10 * PAGE).size == PAGE
    assert dirty_pages(vm.get_dirty_log(0)) == {10, 11}


def test_pml_full_exits_are_counted_and_lose_nothing():
    vm, vcpu = premapped_vm(npages=2048, hps=PAGE, dirty_tracking="pml")
    pages = np.arange(0, 1300)
    vcpu.write_many(page_gpas(vm, GIB, pages), 2)
    assert vm.stats["pml_full_exits"] == 2          # the 513th and the 1025th write
    assert dirty_pages(vm.get_dirty_log(0)) == set(pages.tolist())


def test_pml_log_is_flushed_at_every_exit_and_by_the_kick_before_get():
    vm, vcpu = premapped_vm(npages=128, hps=PAGE, dirty_tracking="pml", manual=MANUAL)
    vcpu.write_many(page_gpas(vm, GIB, [1]), 2)
    assert not vcpu.arch_state["pml"].gfns, "the exit to userspace flushed the log"
    assert dirty_pages(vm.memslot(0).dirty_bitmap) == {1}
    vm.hook.kvm_arch_hw_set_dirty(kvm=vm, vcpu=vcpu, slot=vm.memslot(0), gfns=np.array([(GIB >> 12) + 7]))
    assert dirty_pages(vm.memslot(0).dirty_bitmap) == {1}
    assert dirty_pages(vm.get_dirty_log(0)) == {1, 7}, "kvm_arch_sync_dirty_log kicked the vCPU"


@pytest.mark.parametrize("bugs", [(), ("no_flush",)])
def test_pml_d_bit_clear_without_a_flush_loses_pages(bugs):
    """The TLB caches D: clearing D bits (at enable, at GET) without invalidating it lets
    writes through without setting D, so PML never logs them."""
    vm, vcpu = premapped_vm(X86(bugs=bugs), npages=64, hps=PAGE, dirty_tracking="pml")
    reports = []
    for value in (2, 3):
        vcpu.write_many(page_gpas(vm, GIB, [5]), value)
        reports.append(dirty_pages(vm.get_dirty_log(0)))
    assert (reports == [{5}, {5}]) is (not bugs)


def test_pml_drained_gfns_of_a_slot_no_longer_logging_are_dropped():
    vm, vcpu = premapped_vm(npages=64, hps=PAGE, dirty_tracking="pml")
    vm.hook.kvm_arch_hw_set_dirty(kvm=vm, vcpu=vcpu, slot=vm.memslot(0), gfns=np.array([(GIB >> 12) + 3]))
    vm.set_user_memory_region(0, GIB, 64 * PAGE, 0)
    vm.hook.kvm_arch_vcpu_exit(kvm=vm, vcpu=vcpu)
    vm.set_user_memory_region(0, GIB, 64 * PAGE, LOG)
    assert dirty_pages(vm.get_dirty_log(0)) == set()


# -- the batched hook -----------------------------------------------------------------------

@pytest.mark.parametrize("options", [
    {},
    {"dirty_tracking": "pml"},
    {"eager_page_split": False},
    {"tdp_mmu": False, "dirty_tracking": "pml"},
])
@pytest.mark.parametrize("manual", [0, INIT_SET])
def test_batched_and_per_word_hooks_give_the_same_tables_faults_and_flushes(options, manual):
    results = []
    base = 3 * GIB - 5 * MIB2
    npages = 6 * 512 + 37
    for plugin in (X86(), X86Batched()):
        vm, vcpu = premapped_vm(plugin, npages=npages, base=base, hps=GIB, manual=manual, **options)
        rng = np.random.default_rng(11)
        bitmaps = []
        for value in range(2, 6):
            vcpu.write_many(page_gpas(vm, base, rng.integers(0, npages, 400)), value)
            bitmap = vm.get_dirty_log(0)
            if manual:
                request = bitmap & rng.integers(0, 1 << 63, len(bitmap), dtype=np.uint64)
                vm.clear_dirty_log(0, 0, npages, request)
            bitmaps.append(bitmap)
        results.append((vm.pgtable.mapped_leaves(), dict(vm.stats), bitmaps))
    (l0, s0, b0), (l1, s1, b1) = results
    assert s0 == s1
    assert all((x == y).all() for x, y in zip(b0, b1))
    assert all((x == y).all() for x, y in zip(l0, l1))


def test_pml_flushes_gfns_of_several_slots_into_each_slot():
    vm = kvmcore.create_vm("x86", dirty_tracking="pml")
    vm.set_user_memory_region(0, 0, 100 * PAGE, 0)
    vm.set_user_memory_region(1, 100 * PAGE, 50 * PAGE, 0)   # shares a 2 MiB region with slot 0
    vcpu = vm.create_vcpu(0)
    vcpu.write_many(page_gpas(vm, 0, range(150)), 1)
    vm.set_user_memory_region(0, 0, 100 * PAGE, LOG)
    vm.set_user_memory_region(1, 100 * PAGE, 50 * PAGE, LOG)
    faults = vm.stats["write_faults"]
    vcpu.write_many(page_gpas(vm, 0, [3, 120, 99, 100, 4]), 2)
    assert vm.stats["write_faults"] == faults and vm.stats["pml_entries_logged"] == 5
    assert dirty_pages(vm.get_dirty_log(0)) == {3, 4, 99}
    assert dirty_pages(vm.get_dirty_log(1)) == {0, 20}


# -- the dirty ring -------------------------------------------------------------------------

def test_dirty_ring_reserves_the_pml_log_and_receives_it_in_write_order():
    vm = kvmcore.create_vm("x86", dirty_tracking="pml")
    with pytest.raises(kvmcore.KvmError) as err:     # 64 + 512 reserved entries need 9216 bytes
        vm.enable_cap(kvmcore.KVM_CAP_DIRTY_LOG_RING, 8192)
    assert err.value.errno == errno.EINVAL
    vm.enable_cap(kvmcore.KVM_CAP_DIRTY_LOG_RING, 1 << 16)
    vm.set_user_memory_region(0, GIB, 2048 * PAGE, 0)
    vcpu = vm.create_vcpu(0)
    vcpu.write_many(page_gpas(vm, GIB, range(2048)), 1)
    vm.set_user_memory_region(0, GIB, 2048 * PAGE, LOG)
    pages = np.random.default_rng(5).permutation(2048)[:1300]
    assert vcpu.write_many(page_gpas(vm, GIB, pages), 2) == len(pages)
    assert vm.stats["pml_full_exits"] == 2
    entries = vcpu.harvest_dirty_ring()
    assert (entries["offset"] == pages).all() and (entries["slot"] == 0).all()
    assert vm.reset_dirty_rings() == len(pages)
    vcpu.write_many(page_gpas(vm, GIB, pages[:3]), 3)
    assert (vcpu.harvest_dirty_ring()["offset"] == pages[:3]).all()


def test_dirty_ring_reset_reprotects_with_write_protection():
    vm = kvmcore.create_vm("x86")
    vm.enable_cap(kvmcore.KVM_CAP_DIRTY_LOG_RING, 1 << 12)
    vm.set_user_memory_region(0, 0, 256 * PAGE, LOG)
    vcpu = vm.create_vcpu(0)
    vcpu.write_many(page_gpas(vm, 0, [10, 11, 200]), 1)
    assert vcpu.harvest_dirty_ring()["offset"].tolist() == [10, 11, 200]
    flushes = vm.stats["tlb_flushes_full"]
    assert vm.reset_dirty_rings() == 3
    assert vm.stats["tlb_flushes_full"] == flushes + 1
    assert not vm.translate(10 * PAGE).writable
    vcpu.write_many(page_gpas(vm, 0, [11, 12]), 2)
    assert vcpu.harvest_dirty_ring()["offset"].tolist() == [11, 12]


class FaultsBatchedOnly(X86):
    """The per-word protect hook with the batched fault hook."""

    kvm_arch_handle_stage2_faults_batch = X86Batched.kvm_arch_handle_stage2_faults_batch


@pytest.mark.parametrize("options", [
    {},
    {"eager_page_split": False},
    {"tdp_mmu": False},
    {"dirty_tracking": "pml", "eager_page_split": False},
    {"huge_page_recovery": "in_place"},
])
def test_batched_faults_give_the_same_tables_dirty_log_and_counts_as_one_by_one(options):
    results = []
    base, npages = 2 * GIB, 5 * 512 + 77
    for plugin in (X86(), FaultsBatchedOnly()):
        vm = kvmcore.create_vm(plugin, **options)
        vm.set_user_memory_region(0, base, npages * PAGE, 0, host_page_size=MIB2)
        vcpu = vm.create_vcpu(0)
        rng = np.random.default_rng(2)
        vm.memory(0)[7 * PAGE] = 1                           # a host-written page
        vcpu.read(base, 40 * PAGE)                           # read faults, some map writable
        vcpu.write_many(page_gpas(vm, base, rng.integers(0, npages, 300)), 1)
        vm.set_user_memory_region(0, base, npages * PAGE, LOG)
        bitmaps = []
        for value in range(2, 5):
            vcpu.write_many(page_gpas(vm, base, rng.integers(0, npages, 500)), value)
            vcpu.read(base + 1000 * PAGE, 300 * PAGE)
            bitmaps.append(vm.get_dirty_log(0))
        vm.set_user_memory_region(0, base, npages * PAGE, 0)
        vcpu.write_many(page_gpas(vm, base, rng.integers(0, npages, 300)), 9)
        results.append((vm.pgtable.mapped_leaves(), dict(vm.stats), bitmaps, vm.memory(0).copy()))
    (l0, s0, b0, m0), (l1, s1, b1, m1) = results
    assert s1["fast_page_faults"] > 0
    assert s0 == s1
    assert all((x == y).all() for x, y in zip(b0, b1))
    assert all((x == y).all() for x, y in zip(l0, l1))
    assert (m0 == m1).all()


def test_batched_first_writes_leave_their_host_pages_writable_as_single_faults_do():
    """A write fault gets its host page writable (FOLL_WRITE): once logging is off and
    the 4K SPTEs are zapped for huge pages, a read fault maps writable exactly the 2 MiB
    host pages that were written, all-zero as they are, whether the writes faulted in
    bulk or one by one."""
    seen = []
    for plugin in (X86(), FaultsBatchedOnly()):
        vm = kvmcore.create_vm(plugin, huge_page_recovery="zap")
        vm.set_user_memory_region(0, GIB, 4 * MIB2, LOG, host_page_size=MIB2)
        vcpu = vm.create_vcpu(0)
        vcpu.write_many(page_gpas(vm, GIB, range(0, 300, 3)), 0)     # the first 2 MiB only
        vm.set_user_memory_region(0, GIB, 4 * MIB2, 0, host_page_size=MIB2)
        vcpu.read(GIB, 4 * MIB2)
        seen.append([(t.size, t.writable) for t in (vm.translate(GIB + i * MIB2) for i in range(4))])
    assert seen[0] == seen[1] == [(MIB2, True)] + [(MIB2, False)] * 3


def test_the_kit_catches_a_ring_batch_that_pushes_out_of_order():
    """A run mixing fast-path fixes (marked together) and installs (one by one) pushes
    its ring entries out of fault order: only the ring check can see it."""
    from kvmcore.testing import run_conformance

    checks = ["ring-batched-faults", "batched-hook"]
    bad = {r.check: r for r in run_conformance(X86Batched(bugs={"ring_mixed_batch"}), checks=checks,
                                                 max_examples=20, seed=1).results}
    assert bad["batched-hook"].status == "passed"           # without a ring the order cannot be seen
    assert bad["ring-batched-faults"].status == "failed", bad["ring-batched-faults"].message
    assert "replay(" in bad["ring-batched-faults"].reproducer
    good = run_conformance("x86", checks=["ring-batched-faults"], max_examples=20, seed=1).results[0]
    assert good.status == "passed", good.message
