"""Fixtures shared by the offloadkit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from offloadkit import registry


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test sees the installed plugins as a fresh process would, with no plugin switch set."""
    monkeypatch.delenv(registry.DISABLE_ENV, raising=False)
    monkeypatch.delenv(registry.STRICT_ENV, raising=False)
    registry.reset_registry()
    yield
    registry.reset_registry()
