"""Collecting the problems of a run, so that all of them are reported together.

Every check adds what it finds to one :class:`Problems`; pre-flight raises one
:class:`PreflightError` listing them all, each with its fix, before anything loads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class PreflightError(ValueError):
    """One or more inputs are wrong; the message lists each problem and its fix."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        if len(problems) == 1:
            text = problems[0]
        else:
            text = f"{len(problems)} problems found before starting:\n" + "\n".join(f"  - {p}" for p in problems)
        super().__init__(text)


class Problems:
    """The problems found so far; a check's error becomes one entry instead of a crash."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def check(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, or None with its error recorded (ValueError, TypeError, KeyError, OSError)."""
        try:
            return fn()
        except (ValueError, TypeError, KeyError, OSError) as exc:
            message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            self.problems.append(message)
            return None

    def add(self, problem: str) -> None:
        self.problems.append(problem)

    def raise_if_any(self) -> None:
        if self.problems:
            raise PreflightError(self.problems)


@contextmanager
def collecting(problems: Problems | None) -> Iterator[Problems]:
    """The checks in the block add to ``problems``; with none, to a fresh collector that
    raises :class:`PreflightError` (every problem of the block) when the block ends."""
    c = problems if problems is not None else Problems()
    yield c
    if problems is None:
        c.raise_if_any()
