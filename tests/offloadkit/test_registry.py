"""The strategy registry: entry points loaded one by one, built-ins through the same path.

Broken, duplicate and misspelt plugins are real installed distributions: a ``*.dist-info``
folder with ``METADATA`` and ``entry_points.txt`` next to the plugin module, put on
``sys.path``. importlib.metadata finds them exactly as it finds a pip-installed plugin.
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import offloadkit
from offloadkit import registry
from offloadkit.errors import PluginError, UnknownStrategyError
from offloadkit.registry import PluginLoadWarning

BUILTINS = ("adaptive", "chunkwise", "comfy_native", "cpu_only", "layerwise")
REPO = Path(__file__).resolve().parents[2]

MakePlugin = Callable[..., str]  # the make_plugin fixture (tests/conftest.py)


def strategy_module(*names: str, hook: str = "offloadkit_register_strategies") -> str:
    """Source of a plugin module offering one trivial strategy class per name."""
    classes = "\n".join(
        f"class S{i}(Strategy):\n    name = {name!r}\n    description = 'test strategy {name}'\n"
        for i, name in enumerate(names)
    )
    listed = ", ".join(f"S{i}" for i in range(len(names)))
    return (
        "from offloadkit.hookspecs import hookimpl\n"
        "from offloadkit.strategy import Strategy\n\n"
        f"{classes}\n"
        f"@hookimpl\ndef {hook}():\n    return [{listed}]\n"
    )


pytestmark = pytest.mark.usefixtures("fresh_registry")


def test_builtins_come_from_offloadkits_own_entry_points() -> None:
    records = {r.name: r for r in registry.strategy_records()}
    declared = {
        ep.name: ep.value
        for ep in importlib.metadata.entry_points(group="offloadkit")
        if ep.dist is not None and ep.dist.name == "offloadkit"
    }
    assert set(declared) == set(BUILTINS)
    for name in BUILTINS:
        record = records[name]
        assert (record.plugin, record.distribution, record.builtin) == (name, "offloadkit", True)
        assert record.cls.__module__ == declared[name]
        assert record.cls.name == name
        assert record.description  # shown by `offloadkit list`
        assert offloadkit.get_strategy(name) is record.cls


def test_list_strategies_is_sorted_and_matches_records() -> None:
    names = offloadkit.list_strategies()
    assert names == sorted(names)
    assert names == [r.name for r in registry.strategy_records()]
    assert set(BUILTINS) <= set(names)


def test_manual_plugin_is_found_as_a_pip_installed_distribution() -> None:
    record = {r.name: r for r in registry.strategy_records()}.get("manual")
    assert record is not None, (
        "strategy 'manual' missing: install the example plugin as a user would, "
        "`pip install ./plugins/offloadkit-manual` (nox -s tests does this)"
    )
    assert (record.plugin, record.distribution, record.builtin) == (
        "manual",
        "offloadkit-manual",
        False,
    )
    module = sys.modules[record.cls.__module__]
    # Installed into site-packages, not imported from the source tree by a path trick.
    assert REPO / "plugins" not in Path(module.__file__).resolve().parents


def test_broken_plugin_is_skipped_with_a_warning_and_the_rest_still_load(
    make_plugin: MakePlugin,
) -> None:
    # "aaa" sorts first: a bulk loader stopping at the first failure would lose "good_one".
    make_plugin("aaa-broken", "raise ImportError('needs libfrobnicate.so')\n")
    make_plugin("offloadkit-good", strategy_module("good_one"))
    with pytest.warns(PluginLoadWarning) as caught:
        names = offloadkit.list_strategies()
    assert "good_one" in names and set(BUILTINS) <= set(names)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert "'aaa-broken'" in messages[0]  # the entry-point name ...
    assert "distribution 'aaa-broken'" in messages[0]  # ... and the distribution
    assert "ImportError: needs libfrobnicate.so" in messages[0]
    assert "pip uninstall aaa-broken" in messages[0]  # the fix
    [failure] = registry.plugin_failures()
    assert (failure.plugin, failure.distribution) == ("aaa-broken", "aaa-broken")
    assert isinstance(failure.error, ImportError)


def test_unknown_name_mentions_a_plugin_that_failed_to_load(make_plugin: MakePlugin) -> None:
    make_plugin("offloadkit-fancy", "import no_such_module_xyz\n", entry_name="fancy")
    with pytest.warns(PluginLoadWarning):
        with pytest.raises(UnknownStrategyError) as info:
            offloadkit.get_strategy("fancy")
    assert "Plugin 'fancy' (offloadkit-fancy) failed to load" in str(info.value)
    assert "No module named 'no_such_module_xyz'" in str(info.value)


def test_strict_mode_turns_a_broken_plugin_into_an_error(
    make_plugin: MakePlugin, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_plugin("offloadkit-broken", "raise RuntimeError('boom at import')\n")
    monkeypatch.setenv(registry.STRICT_ENV, "1")
    with pytest.raises(PluginError, match="'offloadkit-broken'.*RuntimeError: boom at import"):
        offloadkit.list_strategies()


def test_two_plugins_offering_one_name_is_an_error_naming_both(make_plugin: MakePlugin) -> None:
    make_plugin("offloadkit-first", strategy_module("twin"))
    make_plugin("offloadkit-second", strategy_module("twin"))
    with pytest.raises(PluginError) as info:
        offloadkit.list_strategies()
    message = str(info.value)
    assert "'twin'" in message
    assert "plugin 'offloadkit-first' from distribution 'offloadkit-first'" in message
    assert "plugin 'offloadkit-second' from distribution 'offloadkit-second'" in message


def test_plugin_reusing_a_builtin_name_is_an_error_naming_both(make_plugin: MakePlugin) -> None:
    make_plugin("offloadkit-impostor", strategy_module("adaptive"))
    with pytest.raises(PluginError, match="'adaptive'.*distribution 'offloadkit'.*impostor"):
        offloadkit.get_strategy("adaptive")


def test_misspelt_hook_is_caught_and_names_the_right_hook(make_plugin: MakePlugin) -> None:
    make_plugin("offloadkit-typo", strategy_module("typo_one", hook="offloadkit_register_strategy"))
    make_plugin("offloadkit-good", strategy_module("good_one"))
    with pytest.warns(PluginLoadWarning) as caught:
        names = offloadkit.list_strategies()
    assert "good_one" in names and "typo_one" not in names
    [message] = [str(w.message) for w in caught]
    assert "'offloadkit-typo'" in message
    assert "unknown hook 'offloadkit_register_strategy'" in message
    assert "did you mean 'offloadkit_register_strategies'?" in message
    registry.get_plugin_manager().check_pending()  # nothing unvalidated was left registered


def test_hook_without_the_hookimpl_marker_is_reported(make_plugin: MakePlugin) -> None:
    source = strategy_module("unmarked_one").replace("@hookimpl\n", "")
    make_plugin("offloadkit-unmarked", source)
    with pytest.warns(PluginLoadWarning, match="without the @offloadkit.hookspecs.hookimpl"):
        names = offloadkit.list_strategies()
    assert "unmarked_one" not in names


def test_plugin_returning_a_non_strategy_is_skipped(make_plugin: MakePlugin) -> None:
    source = """
        from offloadkit.hookspecs import hookimpl

        @hookimpl
        def offloadkit_register_strategies():
            return [dict]
    """
    make_plugin("offloadkit-odd", source)
    with pytest.warns(
        PluginLoadWarning, match="'offloadkit-odd'.*not a subclass of offloadkit.Strategy"
    ):
        names = offloadkit.list_strategies()
    assert set(BUILTINS) <= set(names)
    assert registry.get_plugin_manager().get_plugin("offloadkit-odd") is None  # fully skipped


def test_disable_plugins_keeps_third_party_out_without_importing_them(
    make_plugin: MakePlugin, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = make_plugin("offloadkit-good", strategy_module("good_one"))
    broken = make_plugin("offloadkit-broken", "raise ImportError('must not be imported')\n")
    monkeypatch.setenv(registry.DISABLE_ENV, "1")
    names = offloadkit.list_strategies()  # no warning: the broken one is never imported
    assert names == sorted(BUILTINS)
    assert good not in sys.modules and broken not in sys.modules
    with pytest.raises(UnknownStrategyError, match="OFFLOADKIT_DISABLE_PLUGINS is set"):
        offloadkit.get_strategy("good_one")


def test_unknown_strategy_lists_the_known_ones_and_suggests_a_close_match() -> None:
    with pytest.raises(UnknownStrategyError) as info:
        offloadkit.get_strategy("adaptiv")
    message = str(info.value)
    assert "unknown strategy 'adaptiv'" in message
    assert "Did you mean 'adaptive'?" in message
    assert f"Installed strategies: {', '.join(offloadkit.list_strategies())}." in message
    assert isinstance(info.value, KeyError)  # callers may catch it as a lookup failure


def test_reset_registry_picks_up_a_newly_installed_plugin(make_plugin: MakePlugin) -> None:
    assert "late_one" not in offloadkit.list_strategies()
    make_plugin("offloadkit-late", strategy_module("late_one"))  # resets the registry
    record = {r.name: r for r in registry.strategy_records()}["late_one"]
    assert (record.plugin, record.distribution) == ("offloadkit-late", "offloadkit-late")
    assert record.description == "test strategy late_one"


def test_hook_offloadkit_register_strategies(make_plugin: MakePlugin) -> None:
    """One plugin may register several strategies; each record names that plugin."""
    make_plugin("offloadkit-pair", strategy_module("pair_a", "pair_b"), entry_name="pair")
    records = {r.name: r for r in registry.strategy_records()}
    assert {records["pair_a"].plugin, records["pair_b"].plugin} == {"pair"}
    assert records["pair_a"].cls is not records["pair_b"].cls
    assert offloadkit.get_strategy("pair_b") is records["pair_b"].cls


def test_hook_offloadkit_find_blocks(
    make_plugin: MakePlugin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plugin teaches offloadkit where a model's blocks are, overriding the generic search."""
    source = """
        import torch
        from offloadkit.hookspecs import hookimpl

        class Tower(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.floors = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
                # larger, so the generic search (largest repeated ModuleList) would pick it
                self.decoys = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(2))

        @hookimpl
        def offloadkit_find_blocks(model):
            return model.floors if isinstance(model, Tower) else None
    """
    from offloadkit.engine import find_blocks

    module = make_plugin("offloadkit-tower", source)
    hook = registry.get_plugin_manager().hook.offloadkit_find_blocks  # loads the plugins
    tower = sys.modules[module].Tower()
    assert hook(model=tower) is tower.floors
    assert [name for name, _ in find_blocks(tower)] == ["floors.0", "floors.1", "floors.2"]

    monkeypatch.setenv(registry.DISABLE_ENV, "1")  # plugin out: the generic search answers
    registry.reset_registry()
    assert [name for name, _ in find_blocks(tower)] == ["decoys.0", "decoys.1"]


def test_plugin_querying_the_registry_at_import_is_skipped_not_hung(
    make_plugin: MakePlugin,
) -> None:
    make_plugin("offloadkit-eager", "import offloadkit\noffloadkit.list_strategies()\n")
    with pytest.warns(PluginLoadWarning, match="'offloadkit-eager'.*while plugins were still"):
        names = offloadkit.list_strategies()
    assert set(BUILTINS) <= set(names)


def test_trace_env_prints_hook_calls(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(registry.TRACE_ENV, "1")
    registry.reset_registry()
    hook = registry.get_plugin_manager().hook
    assert hook.offloadkit_find_blocks(model="not a model") is None
    err = capsys.readouterr().err
    assert "offloadkit_find_blocks [hook]" in err and "model: 'not a model'" in err
    assert "finish offloadkit_find_blocks --> None" in err


@pytest.mark.parametrize("value", ["0", "", "false", "no"])
def test_disable_plugins_only_takes_a_yes(
    make_plugin: MakePlugin, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    make_plugin("offloadkit-good", strategy_module("good_one"))
    monkeypatch.setenv(registry.DISABLE_ENV, value)
    assert "good_one" in offloadkit.list_strategies()
