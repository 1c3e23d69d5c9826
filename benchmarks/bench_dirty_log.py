"""The model against the real kernel, side by side in one process, printed as ratios.

    python benchmarks/bench_dirty_log.py                # x86 model vs /dev/kvm, and arm/arm64
    python benchmarks/bench_dirty_log.py --quick        # smaller, for a smoke run
    python benchmarks/bench_dirty_log.py --json out.json

A ratio is model time / kernel time (below 1.0: the model is faster), or for
throughputs model rate / kernel rate.  Where ``/dev/kvm`` cannot be used, the kernel
column is empty and the figures recorded in docs/benchmarks.md are the reference.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

import kvmcore
from kvmcore.uapi import (KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                          KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES)

GIB = 1 << 30
BASE = 1 << 32
RING_ENTRIES = 65536   # KVM_DIRTY_RING_MAX_ENTRIES


def median_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def kernel_available() -> tuple[bool, str]:
    try:
        from kvmcore.kvm import kvm_available
    except ImportError as exc:
        return False, f"no real backend: {exc}"
    return kvm_available()


def make(arch: str, backend: str, manual: bool, size: int, ring: int = 0):
    """A VM with one logging slot at BASE and a vCPU; ``ring``: a dirty ring of that
    many entries instead of the bitmap."""
    vm = kvmcore.create_vm(arch, backend=backend) if backend == "kvm" else kvmcore.create_vm(arch)
    if manual:
        vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    if ring:
        vm.enable_cap(KVM_CAP_DIRTY_LOG_RING_ACQ_REL, ring * 16)
    vm.set_user_memory_region(0, BASE, size, KVM_MEM_LOG_DIRTY_PAGES)
    return vm, vm.create_vcpu(0)


def dirty_pages(npages: int, fraction: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(npages, size=max(1, int(npages * fraction)), replace=False))


def bench_get(arch: str, backend: str, size: int, fraction: float, repeat: int) -> float:
    """Median seconds of KVM_GET_DIRTY_LOG (classic) with ``fraction`` of the slot dirty."""
    return _bench_collect(arch, backend, size, fraction, repeat, manual=False)


def bench_clear(arch: str, backend: str, size: int, fraction: float, repeat: int) -> float:
    """Median seconds of one KVM_CLEAR_DIRTY_LOG of the whole slot (manual protect)."""
    return _bench_collect(arch, backend, size, fraction, repeat, manual=True)


def _bench_collect(arch: str, backend: str, size: int, fraction: float, repeat: int, manual: bool) -> float:
    """Dirty ``fraction`` of a slot, then time the GET (classic) or the CLEAR (manual)."""
    vm, vcpu = make(arch, backend, manual, size)
    npages = size // vm.page_size
    gpas = BASE + dirty_pages(npages, fraction, 1 + manual) * vm.page_size
    times = []
    try:
        for _ in range(repeat):
            vcpu.write_many(gpas, 1)
            if manual:
                bitmap = vm.get_dirty_log(0)
            t = time.perf_counter()
            if manual:
                vm.clear_dirty_log(0, 0, npages, bitmap)
            else:
                vm.get_dirty_log(0)
            times.append(time.perf_counter() - t)
    finally:
        vm.close()
    return statistics.median(times)


def bench_faulting_writes(arch: str, backend: str, pages: int, scattered: bool = False) -> float:
    """Guest stores per second to write-protected pages (each one faults and is logged):
    a sweep of ``pages`` consecutive pages, or ``pages`` scattered at random over a
    slot ten times larger; the median of three rounds."""
    spread = 10 if scattered else 2
    vm, vcpu = make(arch, backend, False, pages * 4096 * spread)
    if scattered:
        gpas = BASE + dirty_pages(pages * spread, 1 / spread, 4) * vm.page_size
    else:
        gpas = BASE + np.arange(pages, dtype=np.int64) * vm.page_size
    rates = []
    try:
        vcpu.write_many(gpas, 1)       # map everything
        for value in range(2, 5):      # the median of three rounds
            vm.get_dirty_log(0)        # write-protect it again
            t = time.perf_counter()
            done = vcpu.write_many(gpas, value)
            rates.append(done / (time.perf_counter() - t))
        return statistics.median(rates)
    finally:
        vm.close()


def bench_ring_writes(arch: str, backend: str, pages: int) -> float:
    """Guest stores per second to pages never touched, in a VM with a dirty ring large
    enough for all of them: each one faults, maps its page and pushes an entry."""
    vm, vcpu = make(arch, backend, False, pages * 4096 * 2, ring=RING_ENTRIES)
    gpas = BASE + np.arange(0, 2 * pages, 2, dtype=np.int64) * vm.page_size
    try:
        t = time.perf_counter()
        done = vcpu.write_many(gpas, 1)
        return done / (time.perf_counter() - t)
    finally:
        vm.close()


def bench_per_word_hook(arch: str, calls: int = 2000) -> float:
    """Microseconds per call of the per-word protect hook (the faithful path), on a slot
    whose pages are mapped and writable, each call one full word."""
    vm, vcpu = make(arch, "sim", False, 64 << 20)
    ms = vm.memslots[0]
    npages = ms.npages
    vcpu.write_many(BASE + np.arange(npages, dtype=np.int64) * vm.page_size, 1)
    mask = (1 << vm.bits_per_long) - 1
    offsets = [(i * vm.bits_per_long) % (npages - vm.bits_per_long) for i in range(calls)]
    t = time.perf_counter()
    with vm.mmu_lock:
        for off in offsets:
            vm.hook.kvm_mmu_write_protect_pt_masked(kvm=vm, slot=ms, gfn_offset=off, mask=mask)
    return (time.perf_counter() - t) / calls * 1e6


def rate_row(title: str, fn: Callable[[str, str], float], archs: list[str], have_kernel: bool) -> dict:
    """Measure and print one rate for the kernel (x86) and each model arch, with ratios."""
    print(f"\n{title}")
    row = {"kernel": fn("x86", "kvm") if have_kernel else None}
    for arch in archs:
        row[arch] = fn(arch, "sim")
    for k, v in row.items():
        ratio = f"  ratio {v / row['kernel']:.2f}" if row["kernel"] and k != "kernel" else ""
        print(f"  {k:>8}: {v:>12,.0f}{ratio}" if v else f"  {k:>8}: -")
    return row


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 256 MiB slot and fewer repeats")
    parser.add_argument("--archs", default="x86,arm64,arm,riscv", help="model archs to measure")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--scale", action="store_true",
                        help="first, a 64 GiB slot with 1%% dirty: GET time and the process's resident memory")
    args = parser.parse_args(argv)
    size = (256 << 20) if args.quick else 2 * GIB
    repeat = 3 if args.quick else 5
    archs = [a for a in args.archs.split(",") if a in kvmcore.available_archs()]
    have_kernel, why = kernel_available()
    print(f"kernel: {'/dev/kvm' if have_kernel else 'unavailable: ' + why}; slot {size >> 20} MiB; "
          f"median of {repeat}", file=sys.stderr)
    results: dict[str, dict] = {}
    if args.scale:
        arch = archs[0]
        vm, vcpu = make(arch, "sim", False, 64 * GIB)
        npages = 64 * GIB // vm.page_size
        vcpu.write_many(BASE + dirty_pages(npages, 0.01, 3) * vm.page_size, 1)
        t = median_time(lambda: vm.get_dirty_log(0), 1)
        results["scale_64g_get_1pct_s"] = t
        results["scale_64g_max_rss_mib"] = rss_mib()
        print(f"\n64 GiB slot, 1% dirty ({arch}): get {t * 1e3:.1f} ms, max RSS {rss_mib():.0f} MiB")
        vm.close()
    for what, fn in (("get_dirty_log", bench_get), ("clear_dirty_log", bench_clear)):
        print(f"\n{what} (ms)     " + "".join(f"{'kernel' if a == 'kernel' else a:>10}" for a in
                                            ["kernel"] + archs) + "   ratio (model/kernel)")
        for fraction in (0.01, 0.10, 1.0):
            row = {"kernel": fn("x86", "kvm", size, fraction, repeat) if have_kernel else None}
            for arch in archs:
                row[arch] = fn(arch, "sim", size, fraction, repeat)
            results[f"{what}@{fraction:.0%}"] = row
            ratios = " ".join(f"{a}={row[a] / row['kernel']:.2f}" for a in archs) if row["kernel"] else "-"
            cells = "".join(f"{(row[k] * 1e3 if row[k] is not None else float('nan')):>10.3f}"
                            for k in ["kernel"] + archs)
            print(f"  {fraction:>5.0%} dirty      {cells}   {ratios}")
    pages = 4096 if args.quick else 32768
    for scattered in (False, True):
        how = "scattered over 10x the pages" if scattered else "a sweep"
        results["faulting_writes_per_s" + ("_scattered" if scattered else "")] = rate_row(
            f"faulting guest writes ({pages} write-protected pages, {how}), writes/s",
            lambda arch, backend: bench_faulting_writes(arch, backend, pages, scattered), archs, have_kernel)
    ring_archs = [a for a in archs if kvmcore.create_vm(a).check_extension(KVM_CAP_DIRTY_LOG_RING_ACQ_REL)]
    pages //= 2
    results["ring_writes_per_s"] = rate_row(
        f"first guest writes with a dirty ring ({pages} pages, each faults and pushes), writes/s",
        lambda arch, backend: bench_ring_writes(arch, backend, pages), ring_archs, have_kernel)
    print("\nper-word protect hook (kvm_mmu_write_protect_pt_masked), µs per call of a full word")
    results["per_word_hook_us"] = {arch: bench_per_word_hook(arch) for arch in archs}
    for arch, us in results["per_word_hook_us"].items():
        print(f"  {arch:>8}: {us:8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
