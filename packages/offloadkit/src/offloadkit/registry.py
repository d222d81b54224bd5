"""Which strategies exist: every plugin in the ``offloadkit`` entry-point group, built-ins too.

The built-in strategies are found through offloadkit's own entry points, the same path a
third-party plugin takes, so the plugin machinery is exercised on every run. Plugins load
lazily, once, on the first question (``list_strategies``, ``get_strategy``...).

Environment:

Each switch takes 1/true/yes/on or 0/false/no/off (or is unset); any other value is a
:class:`PluginError` naming the accepted ones, so a typo never silently means "off".

- ``OFFLOADKIT_DISABLE_PLUGINS=1`` loads only offloadkit's own entry points.
- ``OFFLOADKIT_STRICT_PLUGINS=1`` turns a plugin that fails to load into an error instead of a
  warning (for plugin authors and CI).
- ``OFFLOADKIT_TRACE_PLUGINS=1`` prints every hook call, its arguments and its result to
  stderr (answers "why did my plugin's hook not win?").
"""

from __future__ import annotations

import difflib
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

from offloadkit import hookspecs
from offloadkit._plugins import PluginFailure, PluginLoadWarning, load_entry_point_plugins
from offloadkit.errors import OffloadError, PluginError, UnknownStrategyError
from offloadkit.strategy import Strategy

if TYPE_CHECKING:
    import torch

__all__ = [
    "PluginFailure",
    "PluginLoadWarning",
    "StrategyRecord",
    "get_plugin_manager",
    "get_strategy",
    "list_strategies",
    "plugin_blocks",
    "plugin_failures",
    "reset_registry",
    "strategy_origin",
    "strategy_records",
]

DISABLE_ENV = "OFFLOADKIT_DISABLE_PLUGINS"
STRICT_ENV = "OFFLOADKIT_STRICT_PLUGINS"
TRACE_ENV = "OFFLOADKIT_TRACE_PLUGINS"
ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME
OWN_DISTRIBUTION = "offloadkit"


@dataclass(frozen=True)
class StrategyRecord:
    """One strategy and where it came from (the plugin's entry-point name and distribution)."""

    name: str
    plugin: str
    distribution: str
    description: str
    cls: type[Strategy]

    @property
    def builtin(self) -> bool:
        return self.distribution == OWN_DISTRIBUTION


class _Registry:
    """A loaded plugin manager plus the strategy records its plugins contributed."""

    def __init__(self, *, third_party: bool, strict: bool) -> None:
        self.third_party = third_party
        self.plugin_manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.plugin_manager.add_hookspecs(hookspecs)
        if _env_flag(TRACE_ENV):  # every hook call, its arguments and result, on stderr
            self.plugin_manager.trace.root.setwriter(lambda text: sys.stderr.write(text))
            self.plugin_manager.enable_tracing()
        loaded = load_entry_point_plugins(
            self.plugin_manager,
            group=ENTRY_POINT_GROUP,
            allow=lambda dist: third_party or _normalise(dist) == OWN_DISTRIBUTION,
            strict=strict,
        )
        self.plugins = loaded.plugins  # pluggy plugin name -> (entry-point name, distribution)
        self.failures = loaded.failures
        self.records = self._collect_records(strict)

    def _collect_records(self, strict: bool) -> dict[str, StrategyRecord]:
        records: dict[str, StrategyRecord] = {}
        hook = self.plugin_manager.hook.offloadkit_register_strategies
        for impl in hook.get_hookimpls():  # registration order
            if impl.hookwrapper or impl.wrapper:
                continue  # wrappers contribute no strategies of their own
            plugin, dist = self.plugins[impl.plugin_name]
            try:
                classes = _validated_classes(impl.function(), plugin)
            except Exception as exc:  # a plugin bug must not hide every other strategy
                failure = PluginFailure(plugin, dist, exc)
                if strict:
                    raise PluginError(failure.message()) from exc
                self.failures.append(failure)
                warnings.warn(failure.message(), PluginLoadWarning, stacklevel=4)
                self.plugin_manager.unregister(name=impl.plugin_name)  # none of its hooks run
                continue
            for cls in classes:
                record = StrategyRecord(cls.name, plugin, dist, _one_line(cls), cls)
                clash = records.get(record.name)
                if clash is not None and clash.cls is not cls:
                    raise PluginError(
                        f"two plugins offer the strategy {record.name!r}: "
                        f"{_origin(clash)} and {_origin(record)}. Uninstall one of them "
                        f"(pip uninstall <distribution>), or set {DISABLE_ENV}=1 to load only "
                        "offloadkit's built-in strategies."
                    )
                records[record.name] = record
        return records


_lock = threading.RLock()  # re-entrant, so a plugin calling back in gets an error, not a hang
_registry: _Registry | None = None
_loading = False


def _get() -> _Registry:
    global _registry, _loading
    with _lock:
        if _registry is None:
            if _loading:
                raise PluginError(
                    "a plugin asked the strategy registry a question while plugins were still "
                    "loading (e.g. offloadkit.list_strategies() at import time). Move that call "
                    "into a function that runs later."
                )
            _loading = True
            try:
                _registry = _Registry(
                    third_party=not _env_flag(DISABLE_ENV), strict=_env_flag(STRICT_ENV)
                )
            finally:
                _loading = False
        return _registry


def reset_registry() -> None:
    """Forget the loaded plugins; the next question reloads them (tests, after pip install)."""
    global _registry
    with _lock:
        _registry = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The loaded pluggy manager, e.g. to call ``hook.offloadkit_find_blocks(model=...)``."""
    return _get().plugin_manager


def strategy_records() -> list[StrategyRecord]:
    """Every installed strategy with its plugin and distribution, sorted by name."""
    records = _get().records
    return [records[name] for name in sorted(records)]


def list_strategies() -> list[str]:
    """Sorted names of every installed strategy, built-in and third-party."""
    return sorted(_get().records)


def plugin_failures() -> list[PluginFailure]:
    """Plugins that were found but skipped because they failed to load."""
    return list(_get().failures)


def get_strategy(name: str) -> type[Strategy]:
    """The strategy class called ``name``; an unknown name lists the installed ones."""
    if not isinstance(name, str):
        raise TypeError(f"strategy name must be a str, not {type(name).__name__}")
    registry = _get()
    record = registry.records.get(name)
    if record is not None:
        return record.cls
    raise UnknownStrategyError(_unknown_message(name, registry))


def _unknown_message(name: str, registry: _Registry) -> str:
    known = sorted(registry.records)
    parts = [f"unknown strategy {name!r}."]
    close = difflib.get_close_matches(name, known, n=1) or [
        k for k in known if k.lower() == name.lower()
    ]
    if close:
        parts.append(f"Did you mean {close[0]!r}?")
    if known:
        parts.append(f"Installed strategies: {', '.join(known)}.")
    else:
        parts.append(
            "No strategies are installed at all: offloadkit's own entry points are missing. "
            "Install the package (pip install offloadkit, or pip install -e packages/offloadkit "
            "in a checkout) instead of putting its source on sys.path."
        )
    for failure in registry.failures:
        parts.append(
            f"Plugin {failure.plugin!r} ({failure.distribution}) failed to load: "
            f"{type(failure.error).__name__}: {failure.error}."
        )
    if not registry.third_party:
        parts.append(f"{DISABLE_ENV} is set, so third-party plugins were not loaded.")
    parts.append(
        "A strategy from a plugin needs that plugin pip-installed; "
        "`offloadkit list` shows what is installed."
    )
    return " ".join(parts)


def strategy_origin(cls: type[Strategy]) -> str:
    """``"strategy 'x' (plugin 'p' from distribution 'd')"``: who to blame in a message
    about a strategy's bug."""
    label = f"strategy {getattr(cls, 'name', '') or cls.__qualname__!r}"
    try:
        records = list(_get().records.values())
    except OffloadError:  # the registry itself cannot load: name the class instead
        records = []
    for record in records:
        if record.cls is cls:
            return f"{label} (plugin {record.plugin!r} from distribution {record.distribution!r})"
    return f"{label} (class {cls.__module__}.{cls.__qualname__}, not registered as a plugin)"


def plugin_blocks(model: torch.nn.Module) -> Any:
    """The blocks a plugin's ``offloadkit_find_blocks`` hook names for ``model``, or None
    when every plugin passes. An answer that is not a list of modules is a PluginError
    naming the plugin that gave it."""
    import torch

    hook = get_plugin_manager().hook.offloadkit_find_blocks
    result = hook(model=model)
    if result is None or isinstance(result, torch.nn.ModuleList | torch.nn.Sequential) or (
            isinstance(result, list | tuple)
            and all(isinstance(m, torch.nn.Module) for m in result)):
        return result
    culprit = "?"
    for impl in reversed(hook.get_hookimpls()):  # pluggy's call order
        if impl.hookwrapper or impl.wrapper:
            continue
        try:
            answer = impl.function(model=model)
        except Exception:  # noqa: BLE001 - only looking for who answered
            continue
        if answer is result or type(answer) is type(result) and answer == result:
            culprit = _get().plugins.get(impl.plugin_name, (impl.plugin_name, ""))[0]
            break
    raise PluginError(
        f"offloadkit_find_blocks() of plugin {culprit!r} returned {type(result).__name__} "
        f"{result!r:.60}; it must return the model's torch.nn.ModuleList of blocks (or a list "
        "of its submodules), or None to let other plugins and the generic search answer."
    )


def _validated_classes(result: object, plugin: str) -> list[type[Strategy]]:
    if result is None:
        return []
    if not isinstance(result, list | tuple):
        raise TypeError(
            f"offloadkit_register_strategies() of plugin {plugin!r} returned "
            f"{type(result).__name__}; it must return a list of Strategy subclasses"
        )
    for cls in result:
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise TypeError(
                f"plugin {plugin!r} registered {cls!r}, which is not a subclass of "
                "offloadkit.Strategy"
            )
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name.strip():
            raise TypeError(
                f"strategy class {cls.__qualname__} of plugin {plugin!r} has no `name`; "
                "set the class attribute name = '<what users pass as strategy=>'"
            )
        problem = _declaration_problem(cls)
        if problem:
            raise TypeError(f"strategy {name!r} of plugin {plugin!r}: {problem}")
    return list(result)


def _declaration_problem(cls: type[Strategy]) -> str | None:
    """The declared class attributes have the types the planner relies on."""
    from offloadkit.placement import Placement

    for flag in ("uses_budget", "uses_device"):
        if not isinstance(getattr(cls, flag), bool):
            return f"{flag} = {getattr(cls, flag)!r} must be True or False"
    if not isinstance(cls.budget_hint, str):
        return f"budget_hint = {cls.budget_hint!r} must be a str (the fix, in one sentence)"
    if not isinstance(cls.option_defaults, dict):
        return f"option_defaults = {cls.option_defaults!r} must be a dict of name -> default"
    placement = cls.placement
    if placement is not None and not (isinstance(placement, type)
                                      and issubclass(placement, Placement)):
        return (f"placement = {placement!r} must be None (offloadkit's engine) or a subclass "
                "of offloadkit.Placement")
    return None


def _one_line(cls: type) -> str:
    text = getattr(cls, "description", "") or (cls.__doc__ or "")
    return text.strip().splitlines()[0] if text.strip() else ""


def _origin(record: StrategyRecord) -> str:
    return f"plugin {record.plugin!r} from distribution {record.distribution!r}"


def _normalise(distribution: str) -> str:
    return distribution.lower().replace("_", "-").replace(".", "-")


_YES = ("1", "true", "yes", "on")
_NO = ("0", "false", "no", "off")


def _env_flag(name: str) -> bool:
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if value in _YES:
        return True
    if value in ("", *_NO):
        return False
    raise PluginError(
        f"{name}={raw!r} is not a switch value: set it to one of {', '.join(_YES)} to turn it "
        f"on, or {', '.join(_NO)} (or unset it) to turn it off."
    )
