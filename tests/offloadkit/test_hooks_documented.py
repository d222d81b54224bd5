"""Every hook a plugin may implement is documented for plugin authors and has its own test.

A hook added to ``offloadkit.hookspecs`` without a line in the README's plugin section, or
without a ``test_hook_<name>`` test, fails here: the contract cannot drift silently.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from offloadkit import hookspecs

REPO = Path(__file__).resolve().parents[2]
PLUGIN_SECTION = "Write a strategy plugin"


def hook_signatures() -> dict[str, str]:
    """``{"offloadkit_find_blocks": "offloadkit_find_blocks(model)", ...}`` from the specs."""
    signatures = {}
    for name, function in inspect.getmembers(hookspecs, inspect.isfunction):
        if name.startswith("offloadkit_") and hasattr(function, "offloadkit_spec"):
            params = ", ".join(inspect.signature(function).parameters)
            signatures[name] = f"{name}({params})"
    return signatures


def readme_plugin_section() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(rf"^(#+) {PLUGIN_SECTION}\s*$(.*?)(?=^\1 |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {PLUGIN_SECTION}' section for plugin authors"
    return match.group(2)


def test_hookspecs_are_found() -> None:
    assert set(hook_signatures()) == {"offloadkit_register_strategies", "offloadkit_find_blocks"}


@pytest.mark.parametrize("hook", sorted(hook_signatures()))
def test_hook_is_documented_in_the_readme(hook: str) -> None:
    assert hook_signatures()[hook] in readme_plugin_section()


@pytest.mark.parametrize("hook", sorted(hook_signatures()))
def test_hook_has_a_test(hook: str) -> None:
    wanted = f"test_hook_{hook}"
    defined = {
        node.name
        for path in (REPO / "tests").rglob("test_*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef)
    }
    assert wanted in defined, f"no test named {wanted}() under tests/"
