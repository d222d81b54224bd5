"""``--home shared`` in the pipeline: the experts' blocks in one node-wide copy, the default
when torchrun starts several processes on a node, and /dev/shm's room checked before any
weight loads. (The several-process memory itself: tests/offloadkit/test_home_shared.py; the
torchrun demo runs with it by default: tests/turbowan/test_distributed_generate.py.)"""

from __future__ import annotations

import argparse
import os
import threading

import pytest
import torch

import offloadkit
from offloadkit.engine import shared as shared_home
from turbowan.cli.generate import add_parser, settings_from_args
from turbowan.pipeline.i2v import I2VPipeline
from turbowan.pipeline.preflight import PreflightError

RUN = dict(frames=5, width=32, height=32, steps=4, seed=2)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("demo_weights")


def shm_names() -> set[str]:
    return {n for n in os.listdir(shared_home.default_dir()) if n.startswith(shared_home.PREFIX)}


def test_shared_home_gives_the_host_latents_from_one_mapped_copy(demo_dir, monkeypatch):
    host = I2VPipeline.demo(directory=demo_dir).generate(decode=False, **RUN)
    before = shm_names()
    staged = []
    real_stage = offloadkit.stage

    def stage(model, *a, **k):
        result = real_stage(model, *a, **k)
        staged.append((threading.current_thread().name, k, result.stats(), result.profile))
        return result

    monkeypatch.setattr(offloadkit, "stage", stage)
    res = I2VPipeline.demo(directory=demo_dir, home="shared").generate(decode=False, **RUN)
    assert torch.equal(res.latents, host.latents)
    [(thread, kwargs, stats, profile)] = [s for s in staged if s[0] == "turbowan-stage-low"]
    assert kwargs["home"] == "shared" and kwargs["shared_users"] == 1
    assert (stats.host_shared_bytes, stats.host_pageable_bytes) == (profile.block_bytes, 0)
    assert "packed (shared)" in res.timings.get("sampling (low expert)").note
    assert shm_names() == before  # one process: the names went as soon as it mapped them


def test_no_room_in_dev_shm_is_a_preflight_problem(demo_dir, monkeypatch):
    """A docker /dev/shm of 64 MB: said before any weight loads, with the other problems."""
    monkeypatch.setattr(shared_home, "free_bytes", lambda directory: 1 << 20)
    with pytest.raises(PreflightError) as caught:
        I2VPipeline.demo(directory=demo_dir, home="shared", budget="1KiB")
    problems = caught.value.problems
    assert len(problems) == 2
    [room] = [p for p in problems if "shared copy" in p]
    assert any("below the minimum" in p for p in problems)  # the budget, in the same round
    assert "has 1048576 bytes (0.001 GiB) free" in room and "--shm-size" in room
    assert "home='host'" in room
    I2VPipeline.demo(directory=demo_dir, home="host")  # other homes do not ask


@pytest.mark.parametrize("argv,env,home", [
    ([], {}, "host"),
    ([], {"LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8"}, "shared"),
    ([], {"LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": "2"}, "host"),  # one process per node
    (["--home", "pinned"], {"LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "4"}, "pinned"),
])
def test_home_defaults_to_shared_with_several_processes_per_node(argv, env, home, monkeypatch):
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["generate", "-o", "x.mp4", *argv])
    assert settings_from_args(args).home == home


def test_home_defaults_to_host_where_the_shared_tier_cannot_work(monkeypatch):
    """Windows (no fcntl): several processes per node still get a home that works."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setattr(shared_home, "fcntl", None)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["generate", "-o", "x.mp4"])
    assert settings_from_args(args).home == "host"

