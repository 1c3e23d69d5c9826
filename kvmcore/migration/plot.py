"""The picture of a migration: dirty pages and remaining memory, round by round.

Made with matplotlib's Agg canvas directly (no pyplot, no GUI backend), so it works
on a machine without a display and leaves no global state behind.
"""

from __future__ import annotations

import os

from kvmcore.migration.stats import MigrationReport

MIB = 1 << 20


def plot_report(report: MigrationReport, path: str | os.PathLike) -> None:
    """Write a PNG: top, pages each round sent and its sync found dirty; bottom,
    the memory left to send after each round against the switchover threshold."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rounds = report.rounds
    x = [r.iteration for r in rounds]
    fig = Figure(figsize=(8, 6.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)

    width = 0.4
    top.bar([i - width / 2 for i in x], [r.pages_sent for r in rounds], width, label="pages sent", color="#4878a8")
    top.bar([i + width / 2 for i in x], [r.dirty_pages for r in rounds], width, label="dirty pages found by the sync",
            color="#d9822b")
    top.set_ylabel("pages")
    top.set_title("Pages per round")
    top.legend(loc="upper right", fontsize="small")
    if any(r.throttle for r in rounds):
        twin = top.twinx()
        twin.step(x, [r.throttle for r in rounds], where="mid", color="#7a3e9d", label="throttle %")
        twin.set_ylabel("cpu throttle %")
        twin.set_ylim(0, 100)
        twin.legend(loc="upper center", fontsize="small")

    threshold = report.params.switchover_bytes / MIB
    bottom.plot([0] + x, [report.ram.total / MIB] + [r.remaining / MIB for r in rounds], marker="o",
                color="#2f7d32", label="left to send after each round")
    bottom.axhline(threshold, linestyle="--", color="#b22222",
                   label=f"switchover: bandwidth x downtime-limit = {threshold:.1f} MiB")
    bottom.set_ylabel("MiB")
    bottom.set_xlabel("round")
    bottom.set_title("Memory left to send")
    bottom.set_ylim(bottom=0)
    bottom.legend(loc="best", fontsize="small")
    bottom.set_xticks([0] + x, ["start"] + [str(i) for i in x[:-1]] + [f"{x[-1]}\nstop-copy"])

    g = report.guest
    verdict = "verified" if report.verified else f"NOT verified ({report.mismatched_pages} pages differ)"
    conv = "converged" if report.converged else f"did not converge ({report.switchover_reason})"
    fig.suptitle(f"{g.get('arch')} / {g.get('backend')}: {g.get('workload', {}).get('kind')} workload, "
                 f"{report.ram.total / MIB:.0f} MiB; downtime {report.downtime * 1000:.0f} ms, {conv}, {verdict}",
                 fontsize="medium")
    fig.savefig(os.fspath(path), format="png")
