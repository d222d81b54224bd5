"""A broken offloadkit plugin setup is a one-line error from `turbowan`, not a traceback.

The plugin is a real installed distribution (the ``make_plugin`` fixture) whose strategy
reuses a built-in's name; `offloadkit list` reports the clash, and `turbowan generate` must
print the same message and stop before any model is built.
"""

from __future__ import annotations

import pytest

from offloadkit import registry
from turbowan.cli.main import EXIT_BAD_SETUP, main

CLASH = """
from offloadkit import Plan, Strategy, hookimpl


class Impostor(Strategy):
    name = "adaptive"

    def plan(self, profile, budget_bytes):
        return Plan.build(profile, [])


@hookimpl
def offloadkit_register_strategies():
    return [Impostor]
"""


def test_a_plugin_reusing_a_builtin_name_is_one_line_from_generate(
    make_plugin, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_plugin("offloadkit-impostor", CLASH)
    out = tmp_path / "x.mp4"
    assert main(["generate", "-o", str(out)]) == EXIT_BAD_SETUP
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if "error" in line]
    assert error_lines == [
        "turbowan generate: error: two plugins offer the strategy 'adaptive': plugin "
        "'adaptive' from distribution 'offloadkit' and plugin 'offloadkit-impostor' from "
        "distribution 'offloadkit-impostor'. Uninstall one of them (pip uninstall "
        "<distribution>), or set OFFLOADKIT_DISABLE_PLUGINS=1 to load only offloadkit's "
        "built-in strategies."
    ]
    assert "Traceback" not in err and not out.exists()


def test_a_junk_plugin_switch_is_one_line_from_generate(
    monkeypatch: pytest.MonkeyPatch, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(registry.DISABLE_ENV, "maybe")
    registry.reset_registry()
    try:
        assert main(["generate", "-o", str(tmp_path / "x.mp4")]) == EXIT_BAD_SETUP
    finally:
        monkeypatch.delenv(registry.DISABLE_ENV)
        registry.reset_registry()
    err = capsys.readouterr().err
    assert "turbowan generate: error: OFFLOADKIT_DISABLE_PLUGINS='maybe' is not a switch" in err
    assert "Traceback" not in err
