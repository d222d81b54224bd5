"""Fixtures shared by the turbowan tests."""

from __future__ import annotations

import pytest
import torch
from process_server import start_server


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny convolutions and the demo run faster on one thread, far faster on a shared CPU.

    `turbowan generate` uses one thread for the demo too, so generate and decode give the
    same pixels as these tests.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One process that imported torch, turbowan and turbowan-bench; each
    ``process_server.run_cli(server, ...)`` is a fork of it (a real process of its own)."""
    yield from start_server(tmp_path_factory.mktemp("server"))
