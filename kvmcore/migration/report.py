"""The report a person reads: a table of rounds and a summary, with rich."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from kvmcore.migration.stats import MigrationReport
from kvmcore.migration.units import format_size


def rounds_table(report: MigrationReport) -> Table:
    """One row per round: what it sent, what its sync found, what was left (80 columns)."""
    table = Table(title="Rounds", title_justify="left", box=None, pad_edge=False, header_style="bold")
    for name in ("round", "kind", "duration\nms", "pages\nsent", "dirty\npages", "dirty\npages/s", "left\nMiB",
                 "expected\ndowntime", "throttle\n%"):
        table.add_column(name, justify="left" if name == "kind" else "right", no_wrap=True)
    for r in report.rounds:
        table.add_row(str(r.iteration), r.kind, f"{r.duration * 1000:.1f}", f"{r.pages_sent:,}", f"{r.dirty_pages:,}",
                      f"{r.dirty_pages_rate:,.0f}" if r.kind != "stop-copy" else "-",
                      f"{r.remaining / (1 << 20):.1f}", f"{r.expected_downtime * 1000:.1f}", str(r.throttle))
    return table


def summary_lines(report: MigrationReport) -> list[str]:
    """The outcome in a few lines, QEMU's names in brackets."""
    ram = report.ram
    p = report.params
    g = report.guest
    wl = g.get("workload", {})
    lines = [
        f"guest       {g.get('arch')} on {g.get('backend')}, {format_size(ram.total)} in "
        f"{len(g.get('slots', []))} slot(s), {wl.get('kind')} at {wl.get('dirty-rate', 0):,.0f} pages/s",
        f"migration   {format_size(p.max_bandwidth)}/s link, {report.dirty_log}, {report.time_model} time",
        f"status      {report.status}, verified: {'yes' if report.verified else 'NO'}"
        + ("" if report.verified else f" ({report.mismatched_pages} pages differ)"),
        f"total-time  {report.total_time * 1000:.1f} ms",
        f"downtime    {report.downtime * 1000:.1f} ms (expected {report.expected_downtime * 1000:.1f} ms, "
        f"limit {p.downtime_limit_ms:g} ms)",
        f"ram         {format_size(ram.transferred)} transferred, {format_size(ram.total)} total, "
        f"{ram.mbps:.1f} mbps",
        f"pages       {ram.normal:,} normal, {ram.duplicate:,} duplicate (zero)",
        f"syncs       {ram.dirty_sync_count} (dirty-sync-count), last {ram.dirty_pages_rate:,.0f} dirty pages/s",
        f"throttle    {report.throttle}% (cpu-throttle-percentage)",
        f"guest work  {report.guest_writes:,} vCPU stores, {report.device_writes:,} device writes, "
        f"{report.guest_reads:,} loads",
    ]
    if report.dirty_ring:
        ring = report.dirty_ring
        lines.append(f"dirty ring  {ring.get('entries', 0):,} entries per vCPU, "
                     f"{ring.get('harvested', 0):,} harvested, {ring.get('ring-full-exits', 0):,} ring-full exits, "
                     f"{ring.get('resets', 0):,} resets")
    if report.converged:
        lines.append(f"converged   yes, after {len(report.rounds) - 1} live round(s)")
    else:
        cap = (f"{p.max_iterations} rounds (max-iterations)" if report.switchover_reason == "max-iterations"
               else f"{p.max_time_s:g} s (max-time)")
        lines.append(f"converged   NO: stop-and-copy forced after {cap}")
    return lines


def print_report(report: MigrationReport, console: Console) -> None:
    console.print(rounds_table(report))
    console.print()
    for line in summary_lines(report):
        console.print(line, highlight=False, markup=False)
