"""``kvmcore conformance``: the kit from the command line; exit status 0 iff the arch passes.

The lead wires it into the ``kvmcore`` group (``main.add_command(conformance)``); it
also runs on its own as ``python -m kvmcore.testing.command --arch NAME``.
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any

import click

from kvmcore.plugins import available_archs
from kvmcore.testing.checks import CHECK_NAMES, get_check
from kvmcore.testing.runner import DEFAULT_MAX_EXAMPLES, DEFAULT_STEPS, parse_option, run_conformance


def resolve_arch(text: str) -> Any:
    """An installed arch's name as is; ``module:attr`` imports a plugin that is not installed
    (a class is instantiated with no arguments)."""
    if text in available_archs():
        return text
    if ":" in text:
        module, _, attr = text.partition(":")
        obj = getattr(importlib.import_module(module), attr)
        return obj() if isinstance(obj, type) else obj
    raise ValueError(f"unknown arch {text!r}; installed: {', '.join(available_archs()) or 'none'} "
                     "(or give module:attribute of a plugin object)")


def _fail(message: str) -> None:
    click.echo(f"kvmcore conformance: {message}", err=True)
    sys.exit(2)


@click.command("conformance")
@click.option("--arch", metavar="NAME",
              help="an installed arch (see `kvmcore archs`), or module:attribute of a plugin object")
@click.option("--max-examples", type=click.IntRange(min=1), default=DEFAULT_MAX_EXAMPLES, show_default=True,
              help="traces tried per stateful check")
@click.option("--seed", type=int, default=None, help="repeat a run (the report prints the seed it used)")
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object")
@click.option("--option", "--opt", "options", multiple=True, metavar="KEY=VALUE",
              help="a VM option of the arch, e.g. --option granule=16384 (repeatable)")
@click.option("--check", "checks", multiple=True, metavar="NAME",
              help=f"run only these checks (repeatable; default all: {', '.join(CHECK_NAMES)})")
@click.option("--steps", type=click.IntRange(min=1), default=DEFAULT_STEPS, show_default=True,
              help="the most steps in one trace")
@click.option("--no-shrink", is_flag=True, help="report the first failing trace without shrinking it")
def conformance(arch: str | None, max_examples: int, seed: int | None, as_json: bool, options: tuple[str, ...],
                checks: tuple[str, ...], steps: int, no_shrink: bool) -> None:
    """Hold an arch plugin to the conformance kit: exit status 0 iff it passes."""
    if not arch:
        _fail("--arch NAME is required (an installed arch, or module:attribute of a plugin object)")
    try:
        plugin = resolve_arch(arch)
        opts = dict(parse_option(o) for o in options)
        checks = tuple(get_check(c).name for c in checks)
    except (ValueError, ImportError, AttributeError) as exc:
        _fail(str(exc))
    report = run_conformance(plugin, options=opts, checks=checks or None, max_examples=max_examples, seed=seed,
                             steps=steps, shrink=not no_shrink)
    click.echo(json.dumps(report.to_dict()) if as_json else report.format())
    sys.exit(0 if report.passed else 1)


if __name__ == "__main__":
    conformance()
