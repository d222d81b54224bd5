"""The expert switch uses the low expert staged by ``offloadkit.stage`` in the background;
``--home`` and ``--vae-tiling`` of `turbowan generate` (embedded demo, CPU, tiny sizes)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import offloadkit
from turbowan.cli.main import main
from turbowan.pipeline.i2v import I2VPipeline
from turbowan.pipeline.latents_io import load_latents
from turbowan.pipeline.preflight import PreflightError
from turbowan.pipeline.video_io import read_video

RUN = dict(frames=5, width=32, height=32, steps=4, seed=2)
SMALL = ["--frames", "5", "--width", "32", "--height", "16", "--steps", "4", "--seed", "4"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("demo_weights")


@pytest.fixture(scope="module")
def host_run(demo_dir):
    return I2VPipeline.demo(directory=demo_dir).generate(decode=False, **RUN)


def _spy_staging(monkeypatch):
    """Record every offloadkit.stage (thread, packed bytes when done) and place (time)."""
    staged, placed = [], []
    real_stage, real_place = offloadkit.stage, offloadkit.StagedModel.place

    def stage(model, *a, **k):
        result = real_stage(model, *a, **k)
        staged.append({"staged": result, "thread": threading.current_thread().name,
                       "stats": result.stats(), "home": k.get("home")})
        return result

    def place(self):
        placed.append({"staged": self, "at": time.perf_counter(), "stats": self.stats()})
        return real_place(self)

    monkeypatch.setattr(offloadkit, "stage", stage)
    monkeypatch.setattr(offloadkit.StagedModel, "place", place)
    return staged, placed


def test_switch_places_the_expert_packed_in_the_background_and_measures_the_wait(
        demo_dir, host_run, monkeypatch):
    pipe = I2VPipeline.demo(directory=demo_dir)
    staged, placed = _spy_staging(monkeypatch)
    # the low expert's read is held until 0.3 s after the last high step, so the switch
    # must really wait for the staging thread, and the summary must say how long
    release = threading.Event()
    real_load = pipe._load_expert

    def load_expert(path):
        if "low" in path.name:
            release.wait(10)
        return real_load(path)

    def on_step(info):
        if info.expert == "high" and info.step == 1:
            threading.Timer(0.3, release.set).start()

    from offloadkit.engine.core import Engine

    restored = []
    real_restore = Engine._restore_block

    def restore_block(self, block):
        restored.append(type(self.model).__name__)
        return real_restore(self, block)

    monkeypatch.setattr(Engine, "_restore_block", restore_block)
    monkeypatch.setattr(pipe, "_load_expert", load_expert)
    res = pipe.generate(decode=False, callback=on_step, **RUN)
    assert torch.equal(res.latents, host_run.latents)
    # experts and text encoder are dropped after use: their weights are not copied back
    # (a full copy of a 14B expert at the switch otherwise); the cached VAE is restored
    assert set(restored) == {"WanVAE"}

    pipeline_stages = [s for s in staged if s["thread"] == "turbowan-stage-low"]
    assert len(pipeline_stages) == 1
    low = pipeline_stages[0]["staged"]
    # the one placed at the switch is the one the thread packed, and it was fully packed
    # (every block in host memory) before the switch placed it
    switch = [p for p in placed if p["staged"] is low]
    assert len(switch) == 1
    packed = pipeline_stages[0]["stats"]
    assert packed.host_pageable_bytes == low.profile.block_bytes > 0
    assert packed.stage_seconds > 0 and packed.current_device_bytes == 0
    assert switch[0]["stats"].host_pageable_bytes == low.profile.block_bytes
    assert low.staged_at < switch[0]["at"]
    assert low.state == "placed" and low.handle.removed  # released after sampling
    stage = res.timings.get("sampling (low expert)")
    info = stage.switch
    assert info["staged_by"] == "turbowan-stage-low"
    assert info["switch_at"] < info["staged_at"] < switch[0]["at"]  # the switch waited ...
    assert 0.2 < info["waited_seconds"] < 5  # ... for the held read, measured
    assert f"waited {info['waited_seconds']:.2f} s at the switch" in stage.note


def test_boundary_1_runs_the_low_expert_alone_staged_at_the_switch(demo_dir, monkeypatch):
    """t_rf starts below 1, so boundary=1 gives only low steps: no high step starts the
    background staging, and the first low step stages the expert itself."""
    loaded = []
    pipe = I2VPipeline.demo(directory=demo_dir)
    real_load = pipe._load_expert
    monkeypatch.setattr(pipe, "_load_expert", lambda path: loaded.append(path) or real_load(path))
    staged, placed = _spy_staging(monkeypatch)
    steps = []
    res = pipe.generate(decode=False, boundary=1.0, callback=steps.append,
                        **{**RUN, "steps": 2})
    assert [s.expert for s in steps] == ["low", "low"]
    assert loaded == [pipe.files.low]
    assert [s["thread"] for s in staged] == [threading.main_thread().name]
    assert [p["staged"] for p in placed].count(staged[0]["staged"]) == 1
    assert "staged at the switch" in res.timings.get("sampling (low expert)").note
    assert torch.isfinite(res.latents).all() and res.latents.shape == (1, 16, 2, 4, 4)


def test_home_disk_gives_identical_latents_and_keeps_the_experts_in_a_file(
        demo_dir, host_run, tmp_path, monkeypatch):
    staged, _ = _spy_staging(monkeypatch)
    applied = []
    real_apply = offloadkit.apply

    def apply(model, *a, **k):
        handle = real_apply(model, *a, **k)
        applied.append((type(model).__name__, k.get("home"), handle.stats().disk_bytes))
        return handle

    monkeypatch.setattr(offloadkit, "apply", apply)
    pipe = I2VPipeline.demo(directory=demo_dir, home="disk", disk_path=str(tmp_path))
    res = pipe.generate(decode=False, **RUN)
    assert torch.equal(res.latents, host_run.latents)
    low = next(s for s in staged if s["thread"] == "turbowan-stage-low")
    assert low["home"] == "disk"
    assert low["stats"].disk_bytes == low["staged"].profile.block_bytes
    assert low["stats"].host_pageable_bytes == 0
    high = [a for a in applied if a[0] == "WanDiT"]
    assert len(high) == 1 and high[0][1] == "disk" and high[0][2] > 0
    # text encoder and VAE keep the default home; the experts' temporary files are gone
    assert all(home is None for name, home, _ in applied if name != "WanDiT")
    assert list(tmp_path.iterdir()) == []


def test_bad_home_and_tiling_are_refused_before_loading(demo_dir):
    with pytest.raises(PreflightError, match="unknown home tier 'ssd'.*pinned, host, disk"):
        I2VPipeline.demo(directory=demo_dir, home="ssd")
    with pytest.raises(PreflightError, match=r"multiples of 8.*--vae-tile"):
        I2VPipeline.demo(directory=demo_dir, vae_tiling=True, vae_tile=100)
    with pytest.raises(PreflightError, match="smaller than tile"):
        I2VPipeline.demo(directory=demo_dir, vae_tiling=True, vae_tile=64, vae_overlap=64)
    I2VPipeline.demo(directory=demo_dir, vae_tile=100)  # ignored without vae_tiling


def test_cli_home_disk_and_vae_tiling(tmp_path, capsys, monkeypatch):
    import turbowan.vae.tiling

    tiles = []
    real_tiles = turbowan.vae.tiling.decode_tiles_stream

    def counting(decoder, z, *, tile, overlap):
        tiles.append((tile, overlap))
        return real_tiles(decoder, z, tile=tile, overlap=overlap)

    monkeypatch.setattr(turbowan.vae.tiling, "decode_tiles_stream", counting)
    host, disk, tiled = tmp_path / "host.mp4", tmp_path / "disk.mp4", tmp_path / "tiled.mp4"
    assert main(["generate", "-o", str(host), *SMALL]) == 0
    assert main(["generate", "-o", str(disk), "--home", "disk", *SMALL]) == 0
    assert tiles == []
    assert main(["generate", "-o", str(tiled), "--vae-tiling", "--vae-tile", "16",
                 "--vae-overlap", "8", "--save-latents", *SMALL]) == 0
    assert tiles == [(16, 8)]
    capsys.readouterr()
    host_video, disk_video, tiled_video = (read_video(p) for p in (host, disk, tiled))
    for video in (host_video, disk_video, tiled_video):
        assert (video.num_frames, video.height, video.width) == (5, 16, 32)
    # the disk tier holds the same bytes: identical frames, identical file
    assert np.array_equal(disk_video.frames, host_video.frames)
    assert disk.read_bytes() == host.read_bytes()
    # tiles decode the clip with other borders: a real video, not the untiled pixels
    assert not np.array_equal(tiled_video.frames, host_video.frames)
    # the latents remember the tiling, so `turbowan decode` finishes with the same tiles
    latents_file = tmp_path / "tiled.latents.safetensors"
    _, settings = load_latents(latents_file)
    assert (settings["vae_tiling"], settings["vae_tile"], settings["vae_overlap"]) == (True, 16, 8)
    assert settings["home"] == "host"
    again = tmp_path / "again.mp4"
    assert main(["decode", str(latents_file), "-o", str(again)]) == 0
    assert tiles == [(16, 8), (16, 8)]
    assert again.read_bytes() == tiled.read_bytes()


def test_cli_bad_vae_tile_exits_2_before_any_work(tmp_path, capsys, monkeypatch):
    import turbowan.pipeline.demo

    def forbidden(*a, **k):
        raise AssertionError("demo weights written despite bad input")

    monkeypatch.setattr(turbowan.pipeline.demo, "write_demo_checkpoints", forbidden)
    assert main(["generate", "-o", str(tmp_path / "v.mp4"), "--vae-tiling",
                 "--vae-tile", "20"]) == 2
    assert "must be multiples of 8 pixels" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
