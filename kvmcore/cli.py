"""The ``kvmcore`` command: ``archs``, ``migrate``, ``conformance`` and ``difftest``.

Bad input of any kind (an unknown arch, a size that does not parse, an unusable
backend) is one line on stderr and a non-zero exit, never a traceback: errors are
caught at this boundary and printed click's way ("Error: ...").  Set
``KVMCORE_DEBUG=1`` to get the traceback of an unexpected error.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Any

import click

import kvmcore
from kvmcore.errors import KvmError

DEFAULT_ARCH = "x86"
EXIT_NOT_VERIFIED = 1
EXIT_BAD_INPUT = 2


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _Group(click.Group):
    """A group whose errors, usage errors included, are a single line on stderr."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            click.echo(f"Error: {_one_line(exc.format_message())}", err=True)
            code = exc.exit_code
        except click.Abort:
            click.echo("Aborted!", err=True)
            code = 1
        else:
            code = rv if isinstance(rv, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kvmcore")
def main() -> None:
    """kvmcore: a model of Linux KVM dirty-page logging, per architecture."""


def _fail(message: str) -> click.ClickException:
    exc = click.ClickException(_one_line(message))
    exc.exit_code = EXIT_BAD_INPUT
    return exc


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, KvmError):
        return str(exc)
    if isinstance(exc, (ValueError, OSError, RuntimeError)):
        return str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


class _Boundary:
    """Turns what a bad input raises into one line (and anything else, unless debugging)."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or isinstance(exc, (click.ClickException, click.exceptions.Exit, click.Abort)):
            return False
        if isinstance(exc, KeyboardInterrupt):
            raise click.Abort() from None
        if not isinstance(exc, Exception) or os.environ.get("KVMCORE_DEBUG"):
            return False
        known = isinstance(exc, (KvmError, ValueError, OSError, RuntimeError, ImportError, MemoryError))
        prefix = "" if known else f"{self.what}: internal error (KVMCORE_DEBUG=1 shows where): "
        raise _fail(prefix + _describe_error(exc)) from None


# -- archs -------------------------------------------------------------------------------


def _arch_entry(name: str) -> dict[str, Any]:
    """An installed arch's description, or why it cannot be loaded."""
    try:
        vm = kvmcore.create_vm(name)
    except Exception as exc:  # a plugin that does not load is reported, not fatal
        return {"name": name, "loadable": False, "error": _one_line(_describe_error(exc))}
    return {"name": name, "loadable": True, "description": vm.info.description,
            "geometry": vm.geometry.describe(), "options": dict(vm.info.options)}


def _kvm_backend_status() -> dict[str, Any]:
    try:
        from kvmcore.kvm import kvm_available
    except ImportError as exc:
        return {"available": False, "reason": f"kvmcore.kvm cannot be imported: {exc}"}
    ok, reason = kvm_available()
    return {"available": ok, "reason": reason}


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def archs(as_json: bool) -> None:
    """List the installed archs with their stage-2 geometries and options."""
    with _Boundary("archs"):
        entries = [_arch_entry(name) for name in kvmcore.available_archs()]
        backends = {"sim": {"available": True, "reason": "the model"}, "kvm": _kvm_backend_status()}
    if as_json:
        click.echo(json.dumps({"archs": entries, "backends": backends}, indent=2, sort_keys=False))
        return
    from rich.table import Table

    console = _console(sys.stdout)
    table = Table(title="Installed archs", title_justify="left")
    for column in ("arch", "description", "page", "IPA bits", "levels", "block sizes", "BITS_PER_LONG",
                   "options (defaults)"):
        table.add_column(column)
    for e in entries:
        if not e["loadable"]:
            table.add_row(e["name"], f"[red]not loadable:[/red] {e['error']}", "", "", "", "", "", "")
            continue
        g = e["geometry"]
        table.add_row(e["name"], e["description"], _size(g["page_size"]), str(g["ipa_bits"]), str(g["levels"]),
                      ", ".join(_size(b) for b in g["block_sizes"]) or "-", str(g["bits_per_long"]),
                      ", ".join(f"{k}={v}" for k, v in e["options"].items()) or "-")
    console.print(table)
    for name, status in backends.items():
        console.print(f"backend {name}: {'available' if status['available'] else 'unavailable'} "
                      f"({status['reason']})", highlight=False, markup=False)


def _size(nbytes: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return str(nbytes)


def _console(stream):
    from rich.console import Console

    return Console(file=stream, width=None if stream.isatty() else 132, highlight=False)


# -- migrate -----------------------------------------------------------------------------


def _default_arch(backend: str) -> str:
    names = kvmcore.available_archs()
    if backend == "kvm" or DEFAULT_ARCH in names:
        return DEFAULT_ARCH
    if not names:
        raise _fail("no arch is installed (entry-point group 'kvmcore.arch'); pass --arch MODULE:OBJECT")
    return names[0]


def _resolve_arch(arch: str | None, backend: str) -> Any:
    """An installed arch's name, or a plugin object named ``module:attribute`` (a class
    is instantiated), for an arch that is not installed (plugin authors, tests)."""
    arch = arch or _default_arch(backend)
    if ":" not in arch or backend != "sim":
        if backend == "sim" and arch not in kvmcore.available_archs():
            raise _fail(f"unknown arch {arch!r}; available: {', '.join(kvmcore.available_archs()) or 'none'} "
                        "(or MODULE:OBJECT for a plugin that is not installed)")
        return arch
    module_name, _, attr = arch.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise _fail(f"cannot load arch plugin {arch!r}: {exc}") from None
    return obj() if isinstance(obj, type) else obj


def _parse_opts(pairs: tuple[str, ...]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise _fail(f"--opt takes KEY=VALUE, not {pair!r}")
        options[key.strip().replace("-", "_")] = _literal(value.strip())
    return options


def _literal(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    for kind in (lambda t: int(t, 0), float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _ring_size(text: str | None, dirty_ring: bool) -> int:
    from kvmcore.migration.dirtylog import DEFAULT_RING_BYTES
    from kvmcore.migration.units import parse_size

    if text is None:
        return DEFAULT_RING_BYTES
    if not dirty_ring:
        raise _fail("--ring-size sizes the dirty ring: it needs --dirty-ring")
    return parse_size(text)


def _working_set_pages(text: str, page_size: int) -> int:
    from kvmcore.migration.units import parse_size

    size = parse_size(text)
    if size < page_size:
        raise ValueError(f"--working-set {text!r} is less than one {page_size}-byte page")
    return size // page_size


def _parse_workload(text: str, rate: float, write_fraction: float, device_fraction: float,
                    hot_fraction: float, working_set: int = 16384):
    from kvmcore.migration import WORKLOADS, Workload, load_trace

    kind, _, path = text.partition(":")
    if kind == "trace":
        if not path:
            raise ValueError("the trace workload needs a file: trace:FILE")
        return Workload(kind="trace", rate=rate, write_fraction=write_fraction, device_fraction=device_fraction,
                        trace=load_trace(path))
    if path or kind not in WORKLOADS:
        raise ValueError(f"unknown workload {text!r}; workloads are {', '.join(WORKLOADS[:-1])}, trace:FILE")
    return Workload(kind=kind, rate=rate, write_fraction=write_fraction, device_fraction=device_fraction,
                    hot_fraction=hot_fraction, working_set=working_set)


class _RichProgress:
    """A bar per round on stderr (the engine's Progress)."""

    def __init__(self, console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("pages"), TimeElapsedColumn(), console=console)
        self._task = None

    def __enter__(self) -> _RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def round_started(self, iteration: int, kind: str, pages: int) -> None:
        self._task = self._progress.add_task(f"round {iteration:>2} {kind:<9}", total=max(pages, 1))
        if not pages:
            self._progress.update(self._task, completed=1)

    def advance(self, pages: int) -> None:
        self._progress.advance(self._task, pages)

    def round_finished(self, record) -> None:
        self._progress.update(self._task, description=f"round {record.iteration:>2} {record.kind:<9} "
                                                      f"found {record.dirty_pages:,} dirty")


class _NoProgress:
    def __enter__(self):
        return None

    def __exit__(self, *exc) -> None:
        return None


@main.command()
@click.option("--arch", default=None, metavar="NAME",
              help=f"Installed arch (default {DEFAULT_ARCH!r} if installed, else the first), "
                   "or MODULE:OBJECT for a plugin that is not installed.")
@click.option("--memory", default="512M", show_default=True, help="Guest memory (e.g. 64M, 4G).")
@click.option("--backend", type=click.Choice(kvmcore.BACKENDS), default="sim", show_default=True,
              help="The model, or the real kernel through /dev/kvm.")
@click.option("--workload", default="hotset", show_default=True,
              help="uniform, hotset, sweep, once, sparse, or trace:FILE.")
@click.option("--dirty-rate", default="64M", show_default=True,
              help="How fast the guest writes: pages/s (20000) or bytes/s (64M, 64MiB/s).")
@click.option("--write-fraction", type=float, default=1.0, show_default=True,
              help="Fraction of the guest's accesses that are writes (the rest are reads).")
@click.option("--device-fraction", type=float, default=0.01, show_default=True,
              help="Fraction of the writes done by the VMM (device emulation), not the vCPU.")
@click.option("--hot-fraction", type=float, default=0.2, show_default=True,
              help="hotset: share of the pages in the working set (it takes 80% of the writes).")
@click.option("--working-set", default="64M", show_default=True,
              help="sparse: the memory the guest has used (scattered pages); the rest was never written.")
@click.option("--bandwidth", default="128M", show_default=True,
              help="max-bandwidth of the link in bytes/s (QEMU's default: 128M).")
@click.option("--downtime-limit", default="300", show_default=True, help="downtime-limit in ms (or 0.3s).")
@click.option("--manual-protect", is_flag=True,
              help="KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: GET, then CLEAR each chunk right before sending it.")
@click.option("--clear-bitmap-shift", type=int, default=18, show_default=True,
              help="Chunks of 2**N pages for --manual-protect (QEMU's x-clear-bitmap-shift).")
@click.option("--dirty-ring", is_flag=True,
              help="KVM_CAP_DIRTY_LOG_RING (x86) or _ACQ_REL (arm64): harvest the vCPUs' rings, not the bitmap.")
@click.option("--ring-size", default=None, metavar="BYTES",
              help="Bytes per vCPU ring for --dirty-ring: a power of two up to 1M  [default: 64K, 4096 entries]")
@click.option("--auto-converge", is_flag=True, help="Throttle the guest as QEMU does (20%, +10%, up to 99%).")
@click.option("--host-page-size", type=click.Choice(["4K", "2M", "1G"]), default=None,
              help="Host pages behind guest memory [default: 4K on the model, the host's on kvm].")
@click.option("--max-iterations", type=int, default=30, show_default=True,
              help="Stop and copy after this many live rounds even if not converged.")
@click.option("--max-time", default="300s", show_default=True,
              help="Stop and copy after this long even if not converged.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the guest's data and workload.")
@click.option("--time", "time_model", type=click.Choice(["virtual", "real"]), default=None,
              help="Virtual time (reproducible) or a vCPU thread on the wall clock "
                   "[default: virtual on the model, real on kvm].")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout, nothing else.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, metavar="FILE.png",
              help="Draw dirty pages and remaining memory per round.")
@click.option("--opt", "opts", multiple=True, metavar="KEY=VALUE", help="An arch option (see kvmcore archs).")
@click.pass_context
def migrate(ctx: click.Context, arch, memory, backend, workload, dirty_rate, write_fraction, device_fraction,
            hot_fraction, working_set, bandwidth, downtime_limit, manual_protect, clear_bitmap_shift, dirty_ring,
            ring_size, auto_converge, host_page_size, max_iterations, max_time, seed, time_model, as_json, plot,
            opts) -> None:
    """Migrate a guest live over the dirty log, and check the copy byte for byte.

    Exit status: 0 if the destination's memory equals the source's, 1 if it does
    not, 2 for bad input.
    """
    from kvmcore.migration import HOST_PAGE_SIZES, GuestSpec, MigrationParameters, build
    from kvmcore.migration.units import parse_bandwidth, parse_duration_ms, parse_rate, parse_size

    with _Boundary("migrate"):
        spec = GuestSpec(memory=parse_size(memory),
                         host_page_size=HOST_PAGE_SIZES[host_page_size] if host_page_size else None)
        params = MigrationParameters(
            downtime_limit_ms=parse_duration_ms(downtime_limit), max_bandwidth=parse_bandwidth(bandwidth),
            max_iterations=max_iterations, max_time_s=parse_duration_ms(max_time) / 1000.0,
            auto_converge=auto_converge, manual_protect=manual_protect, clear_bitmap_shift=clear_bitmap_shift,
            dirty_ring=dirty_ring, dirty_ring_size=_ring_size(ring_size, dirty_ring))
        plugin = _resolve_arch(arch, backend)
        options = _parse_opts(opts)
        if plot and not plot.lower().endswith(".png"):
            raise _fail(f"--plot writes a PNG: give a FILE.png, not {plot!r}")
        try:
            vm = kvmcore.create_vm(plugin, backend=backend, **options)
        except ImportError as exc:
            raise _fail(f"arch {arch or plugin!r} is installed but its plugin cannot be loaded: {exc}") from None
    try:
        with _Boundary("migrate"):
            wl = _parse_workload(workload, parse_rate(dirty_rate, vm.page_size), write_fraction, device_fraction,
                                 hot_fraction, _working_set_pages(working_set, vm.page_size))
            err = _console(sys.stderr)
            show = not as_json and sys.stderr.isatty()
            with (_RichProgress(err) if show else _NoProgress()) as progress:
                engine = build(vm, guest=spec, workload=wl, params=params, seed=seed, time=time_model,
                               progress=progress)
                report = engine.run()
            if plot:
                from kvmcore.migration.plot import plot_report

                plot_report(report, plot)
    finally:
        close = getattr(vm, "close", None)
        if close is not None:
            close()
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        from kvmcore.migration.report import print_report

        print_report(report, _console(sys.stdout))
        if plot:
            click.echo(f"plot: {plot}")
    if not report.verified:
        click.echo(f"Error: verification failed: {report.mismatched_pages} page(s) differ between source and "
                   "destination", err=True)
        ctx.exit(EXIT_NOT_VERIFIED)


# -- conformance: the kit's own command (kvmcore.testing.command) -----------------------

from kvmcore.testing.command import conformance  # noqa: E402

main.add_command(conformance)


# -- difftest ------------------------------------------------------------------------------


@main.command()
@click.option("--arch", default=None, metavar="NAME", help="The model's arch (default x86), or MODULE:OBJECT.")
@click.option("--opt", "opts", multiple=True, metavar="KEY=VALUE", help="An option of the model's arch.")
@click.option("--against", type=click.Choice(["kvm", "sim"]), default="kvm", show_default=True,
              help="What to hold the model against: the real kernel, or the model of --against-arch.")
@click.option("--against-arch", default="x86", show_default=True, metavar="NAME",
              help="With --against sim: the other arch.")
@click.option("--mode", type=click.Choice(["classic", "manual"]), default="classic", show_default=True,
              help="GET only, or GET then CLEAR in 64-page chunks (manual protect).")
@click.option("--seed", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True, help="How many seeds, from --seed.")
@click.option("--rounds", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--writes", type=click.IntRange(min=1), default=400, show_default=True, help="Stores per round.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def difftest(ctx: click.Context, arch, opts, against, against_arch, mode, seed, seeds, rounds, writes,
             as_json) -> None:
    """Play seeded traces on the model and on the kernel; print where they first differ.

    Exit 0 if every bitmap of every round agreed, 1 at the first difference."""
    from kvmcore import difftest as dt

    with _Boundary("difftest"):
        plugin = _resolve_arch(arch, "sim")
        options = _parse_opts(opts)
        model = lambda: kvmcore.create_vm(plugin, **options)  # noqa: E731
        other = (lambda: kvmcore.create_vm(against_arch, backend="kvm")) if against == "kvm" else \
            (lambda: kvmcore.create_vm(_resolve_arch(against_arch, "sim")))
        other().close()  # an unusable backend is bad input, said before any trace runs
        results = []
        for s in range(seed, seed + seeds):
            trace = dt.random_trace(s, rounds=rounds, mode=mode, writes_per_round=writes)
            diff = dt.first_difference(trace, model, other)
            results.append({"seed": s, "agree": diff is None, "difference": None if diff is None else str(diff)})
            if diff is not None:
                break
    if as_json:
        click.echo(json.dumps({"mode": mode, "rounds": rounds, "against": against, "results": results}))
    else:
        for r in results:
            click.echo(f"seed {r['seed']}: " + ("every round agreed" if r["agree"] else r["difference"]))
    if not results[-1]["agree"]:
        ctx.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
