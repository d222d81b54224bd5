"""Checks `turbowan-bench` makes before measuring anything.

A sweep can run for an hour; an output path that cannot be written, or a strategy named on the
command line that cannot be built with the options given, must fail in the first second, not
after the measurements (or, worse, be skipped with exit status 0).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["check_named_strategies", "check_output_file"]


class BenchCheckError(ValueError):
    """A bench argument that cannot work; the message names the flag and the fix."""


def check_output_file(flag: str, path: str | os.PathLike[str] | None) -> None:
    """The file can be created: its nearest existing ancestor is a writable directory."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise BenchCheckError(f"{flag} {str(path)!r} is a directory; give a file name")
    probe = path.parent if str(path.parent) else Path(".")
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise BenchCheckError(f"{flag} {str(path)!r}: {str(probe)!r} is a file, not a directory; "
                              "choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BenchCheckError(f"{flag} {str(path)!r}: directory {str(probe)!r} is not writable; "
                              "choose a path you can write to")


def check_named_strategies(strategies_arg: str, options: dict[str, dict]) -> None:
    """Every strategy named explicitly in ``--strategies`` (not through ``all``) can be built
    with its ``--option`` values; a plugin's own refusal says what it needs."""
    import offloadkit

    for item in (part.strip() for part in strategies_arg.split(",")):
        name = item.split("@", 1)[0]
        if not name or name == "all":
            continue
        try:
            offloadkit.get_strategy(name)(**options.get(name, {}))
        except Exception as exc:  # noqa: BLE001 - the plugin's own message is the explanation
            raise BenchCheckError(
                f"--strategies {name}: {exc} Pass its options with --option {name}.KEY=VALUE "
                f"(one --option per key), e.g. --option manual.resident=0,3"
            ) from None
