"""Load entry-point plugins one at a time, so one broken plugin cannot take the rest down.

pluggy's ``load_setuptools_entrypoints`` stops at the first plugin that fails to import; a
user with one stale plugin installed would lose every strategy. Here each entry point is
imported and registered on its own; a failure is recorded, warned about with the plugin's
name and distribution, and skipped. Hook implementations whose name matches no hook
specification (a typo such as ``offloadkit_register_strategy``) are caught per plugin too.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points

import pluggy

from offloadkit.errors import PluginError

STRICT_HINT = "set OFFLOADKIT_STRICT_PLUGINS=1 to raise instead, with the full traceback"


class PluginLoadWarning(UserWarning):
    """A plugin was found but skipped (it failed to import or to register)."""


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that was skipped, and why."""

    plugin: str
    distribution: str
    error: BaseException

    def message(self) -> str:
        if self.distribution == "offloadkit":
            fix = "offloadkit's own installation is broken: reinstall it (pip install offloadkit)"
        else:
            fix = f"Fix or update it, or uninstall it (pip uninstall {self.distribution})"
        return (
            f"offloadkit plugin {self.plugin!r} from distribution {self.distribution!r} was "
            f"skipped: {type(self.error).__name__}: {self.error}. {fix}; {STRICT_HINT}."
        )


@dataclass
class LoadedPlugins:
    #: pluggy plugin name -> (entry-point name, distribution name)
    plugins: dict[str, tuple[str, str]] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)


def load_entry_point_plugins(
    pm: pluggy.PluginManager,
    *,
    group: str,
    allow: Callable[[str], bool],
    strict: bool,
) -> LoadedPlugins:
    """Register every entry point of ``group`` whose distribution ``allow`` accepts."""
    loaded = LoadedPlugins()
    for ep in sorted(entry_points(group=group), key=_load_order):
        dist = _distribution(ep)
        if not allow(dist):
            continue
        try:
            _register_one(pm, ep, dist, loaded)
        except Exception as exc:  # import errors, bad hook signatures, typos: skip this one
            failure = PluginFailure(ep.name, dist, exc)
            if strict:
                raise PluginError(failure.message()) from exc
            loaded.failures.append(failure)
            warnings.warn(failure.message(), PluginLoadWarning, stacklevel=2)
    try:
        pm.check_pending()  # safety net; _register_one already checked each plugin
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"{exc}. Fix the hook name (see offloadkit.hookspecs).") from exc
    return loaded


def _register_one(
    pm: pluggy.PluginManager, ep: EntryPoint, dist: str, loaded: LoadedPlugins
) -> None:
    plugin = ep.load()
    if pm.is_registered(plugin):
        return  # a second entry point naming the same module adds nothing
    name = ep.name if pm.get_plugin(ep.name) is None else f"{dist}:{ep.name}"
    pm.register(plugin, name=name)  # raises PluginValidationError on a wrong hook signature
    unknown = [caller.name for caller in pm.get_hookcallers(plugin) or [] if caller.spec is None]
    if unknown:
        pm.unregister(plugin)
        raise pluggy.PluginValidationError(plugin, _unknown_hook_message(pm, unknown))
    _warn_unmarked_hooks(plugin, ep.name, pm)
    loaded.plugins[name] = (ep.name, dist)


def _unknown_hook_message(pm: pluggy.PluginManager, unknown: list[str]) -> str:
    known = sorted(name for name, caller in vars(pm.hook).items() if caller.spec is not None)
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        parts.append(f"{name!r}{hint}")
    return f"implements unknown hook {', '.join(parts)}; the hooks are {', '.join(known)}"


def _warn_unmarked_hooks(plugin: object, plugin_name: str, pm: pluggy.PluginManager) -> None:
    """A hook-named function without @hookimpl is silently ignored by pluggy; say so."""
    registered = {caller.name for caller in pm.get_hookcallers(plugin) or []}
    for attr in dir(plugin):
        if attr.startswith("offloadkit_") and attr not in registered:
            if callable(getattr(plugin, attr, None)):
                warnings.warn(
                    f"offloadkit plugin {plugin_name!r} defines {attr}() without the "
                    "@offloadkit.hookspecs.hookimpl decorator, so it is ignored. Decorate it.",
                    PluginLoadWarning,
                    stacklevel=4,
                )


def _distribution(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else "<unknown distribution>"


def _load_order(ep: EntryPoint) -> tuple[bool, str, str]:
    """offloadkit's own plugins first, then the rest, each by name: deterministic output."""
    dist = _distribution(ep)
    return (dist.lower() != "offloadkit", dist.lower(), ep.name)
