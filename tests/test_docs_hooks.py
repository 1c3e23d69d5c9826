"""docs/hooks.md documents every hook of kvmcore/hookspecs.py, and nothing else."""

import re
from pathlib import Path

from kvmcore import hookspecs

DOC = Path(__file__).resolve().parent.parent / "docs" / "hooks.md"


def hookspec_names() -> list[str]:
    return [name for name, obj in vars(hookspecs).items() if callable(obj) and hasattr(obj, "kvmcore_spec")]


def documented() -> dict[str, str]:
    """Each ``## `name` `` section of the doc, by hook name."""
    sections = re.split(r"^## `(\w+)`\s*$", DOC.read_text(), flags=re.M)
    return dict(zip(sections[1::2], sections[2::2]))


def test_every_hookspec_has_a_section():
    missing = sorted(set(hookspec_names()) - set(documented()))
    assert not missing, f"docs/hooks.md lacks a section for: {', '.join(missing)}"


def test_no_section_for_a_hook_that_is_gone():
    stale = sorted(set(documented()) - set(hookspec_names()))
    assert not stale, f"docs/hooks.md documents hooks hookspecs.py no longer has: {', '.join(stale)}"


def test_required_and_first_result_are_stated_as_the_specs_say():
    for name, text in documented().items():
        spec = getattr(hookspecs, name).kvmcore_spec
        head = text.strip().split("\n", 1)[0]
        assert head.startswith("**Required**") == (name in hookspecs.REQUIRED_HOOKS), name
        assert ("first result" in head) == spec["firstresult"], name
        assert f"`{name}(" in text, f"{name}: the section shows no signature"
