"""End to end on the embedded demo (tiny models, CPU): files, determinism, placement, rescue.

Runs are tiny (5 frames at 32x32, 2 latent frames) so the whole module stays fast; one demo
pipeline (one set of demo checkpoint files) is shared by every test.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from turbowan.cli.main import main as turbowan_main
from turbowan.pipeline.i2v import DecodeFailedError, DecodeInterrupted, I2VPipeline
from turbowan.pipeline.latents_io import latents_path_for, load_latents
from turbowan.pipeline.video_io import read_video

RUN = dict(frames=5, width=32, height=32, steps=4, seed=1)
TINY = dict(frames=5, width=16, height=16, steps=1, seed=1)  # for runs that only test plumbing

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("demo_weights")


@pytest.fixture(scope="module")
def pipe(demo_dir):
    return I2VPipeline.demo(directory=demo_dir)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("videos")


@pytest.fixture(scope="module")
def first(pipe, out_dir):
    return pipe.generate(output=out_dir / "first.mp4", **RUN)


def test_mp4_has_the_asked_frame_count_and_size(first, out_dir):
    video = read_video(out_dir / "first.mp4")
    assert (video.num_frames, video.height, video.width) == (5, 32, 32)
    assert video.fps == pytest.approx(16)
    assert first.latents.shape == (1, 16, 2, 4, 4)
    assert first.latents.dtype == torch.float32 and torch.isfinite(first.latents).all()
    assert first.frames.shape == (5, 32, 32, 3)
    # the file holds the frames the pipeline made. The codec is lossy and yuv420p halves the
    # colour resolution, which random demo pixels feel most: compare brightness.
    luma = np.array([0.299, 0.587, 0.114])
    assert np.abs(video.frames @ luma - first.frames @ luma).mean() < 8


def test_non_square_webm_one_step_high_expert_only_and_latents_kept(pipe, out_dir, monkeypatch):
    loaded = []
    real_load = pipe._load_expert
    monkeypatch.setattr(pipe, "_load_expert", lambda p: loaded.append(p.name) or real_load(p))
    res = pipe.generate(output=out_dir / "wide.webm", frames=9, width=48, height=32, steps=1,
                        seed=3, save_latents=True)
    video = read_video(out_dir / "wide.webm")
    assert (video.num_frames, video.height, video.width) == (9, 32, 48)
    assert res.latents.shape == (1, 16, 3, 4, 6)
    # one step never reaches the boundary: the low expert is not even read
    assert len(loaded) == 1 and "high" in loaded[0]
    assert [s.name for s in res.timings.stages].count("sampling (low expert)") == 0
    # --save-latents keeps them although decoding succeeded
    assert res.latents_path == out_dir / "wide.latents.safetensors"
    latents, settings = load_latents(res.latents_path)
    assert torch.equal(latents, res.latents)
    assert (settings["frames"], settings["width"], settings["height"]) == (9, 48, 32)
    assert settings["steps"] == 1 and settings["output"].endswith("wide.webm")


def test_other_offload_strategy_gives_identical_frames(demo_dir, first):
    other = I2VPipeline.demo(directory=demo_dir, strategy="layerwise")
    res = other.generate(**RUN)
    assert torch.equal(res.latents, first.latents)
    assert np.array_equal(res.frames, first.frames)


def test_stage_summary_has_every_stage_with_memory(first):
    names = [s.name for s in first.timings.stages]
    assert names == ["text encoder", "VAE encode", "sampling (high expert)",
                     "sampling (low expert)", "VAE decode", "write video"]
    for stage in first.timings.stages[:-1]:
        assert stage.seconds > 0
        assert stage.peak_device_bytes is not None and stage.peak_device_bytes > 0
    low = first.timings.get("sampling (low expert)")
    assert "staged in the background" in low.note and "waited" in low.note
    assert low.switch["staged_by"] == "turbowan-stage-low"
    assert low.switch["staged_at"] < low.switch["switch_at"]  # packed before the switch
    text = first.timings.summary(device="cpu")
    assert "sampling (low expert)" in text and "KiB" in text


def test_same_seed_same_frames_one_model_at_a_time_and_background_staging(pipe, first, monkeypatch):
    """A second run with the same seed gives identical frames. During it: the text encoder is
    released before any DiT is placed; never two experts are placed at once; the low expert
    is read and staged in another thread while the high one samples, and placed at the switch."""
    import offloadkit

    events: list[str] = []
    live: list[str] = []
    peak_live = [0]
    real_apply = offloadkit.apply

    def kind(model):
        name = type(model).__name__
        return {"WanDiT": "dit", "TextEncoder": "text", "WanVAE": "vae"}.get(name, name)

    tracked: set[int] = set()

    def track(model, handle):
        if id(handle) in tracked:  # apply() is stage() + place(): count the handle once
            return handle
        tracked.add(id(handle))
        what = kind(model)
        events.append(f"apply {what}")
        live.append(what)
        peak_live[0] = max(peak_live[0], live.count("dit"))
        real_remove = handle.remove

        def remove(**kwargs):
            events.append(f"remove {what}")
            live.remove(what)
            real_remove(**kwargs)

        handle.remove = remove
        return handle

    def apply(model, *a, **k):
        return track(model, real_apply(model, *a, **k))

    real_place = offloadkit.StagedModel.place
    staged_in: list[str] = []
    real_stage = offloadkit.stage

    def stage(model, *a, **k):
        staged_in.append(threading.current_thread().name)
        return real_stage(model, *a, **k)

    def place(staged):
        return track(staged.model, real_place(staged))

    loads: list[tuple[str, str]] = []
    real_load = pipe._load_expert

    def load_expert(path):
        loads.append((path.name, threading.current_thread().name))
        return real_load(path)

    monkeypatch.setattr(offloadkit, "apply", apply)
    monkeypatch.setattr(offloadkit, "stage", stage)
    monkeypatch.setattr(offloadkit.StagedModel, "place", place)
    monkeypatch.setattr(pipe, "_load_expert", load_expert)
    again = pipe.generate(**RUN)
    assert torch.equal(again.latents, first.latents)
    assert np.array_equal(again.frames, first.frames)
    assert events[:2] == ["apply text", "remove text"]
    assert events.index("remove text") < events.index("apply dit")
    assert events.count("apply dit") == 2 and peak_live[0] == 1
    assert live == []
    (high_name, high_thread), (low_name, low_thread) = loads
    assert "high" in high_name and "low" in low_name
    assert high_thread == threading.main_thread().name
    assert low_thread == "turbowan-stage-low"
    assert staged_in == ["turbowan-stage-low"]  # packed there too, not at the switch


def test_decode_failure_keeps_latents_and_decode_cli_finishes(pipe, first, out_dir, monkeypatch):
    target = out_dir / "rescued.mp4"

    def broken(latents, timings=None):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(pipe, "decode", broken)
    with pytest.raises(DecodeFailedError) as err:
        pipe.generate(output=target, **RUN)
    monkeypatch.undo()
    rescued = latents_path_for(target)
    assert err.value.latents_path == rescued and rescued.is_file()
    assert f"turbowan decode {rescued} -o {target}" in str(err.value)
    assert "--budget" in str(err.value)
    assert not target.exists()
    latents, settings = load_latents(rescued)
    assert torch.equal(latents, first.latents)
    assert settings["vae"] == "demo" and settings["seed"] == 1
    # finish the job; the result is the video the uninterrupted run wrote
    assert turbowan_main(["decode", str(rescued), "-o", str(out_dir / "finished.mp4")]) == 0
    finished = read_video(out_dir / "finished.mp4")
    original = read_video(out_dir / "first.mp4")
    assert np.array_equal(finished.frames, original.frames)
    assert (out_dir / "finished.mp4").read_bytes() == (out_dir / "first.mp4").read_bytes()


def test_interrupt_during_decode_saves_latents(pipe, tmp_path, monkeypatch):
    target = tmp_path / "v.mp4"

    def interrupted(latents, timings=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipe, "decode", interrupted)
    assert latents_path_for(target).name == "v.latents.safetensors"
    with pytest.raises(KeyboardInterrupt) as err:
        pipe.generate(output=target, **TINY)
    assert isinstance(err.value, DecodeInterrupted)
    assert latents_path_for(target).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["v.latents.safetensors"]


def test_interrupt_right_after_sampling_keeps_the_latents(pipe, tmp_path, monkeypatch):
    """Ctrl-C while the expert runner closes (the staging thread joined), before decode
    starts: the latents exist, so they are kept; this stretch once lost them."""
    from turbowan.pipeline.experts import ExpertRunner

    expected = pipe.generate(decode=False, **TINY).latents
    real_close = ExpertRunner.close

    def close(self, wait=True):
        real_close(self, wait=wait)
        if wait:  # the close after a finished sampling (an interrupted one passes False)
            raise KeyboardInterrupt

    monkeypatch.setattr(ExpertRunner, "close", close)
    target = tmp_path / "v.mp4"
    with pytest.raises(DecodeInterrupted, match="interrupted after sampling"):
        pipe.generate(output=target, **TINY)
    latents, _ = load_latents(latents_path_for(target))
    assert torch.equal(latents, expected)
    assert [p.name for p in tmp_path.iterdir()] == ["v.latents.safetensors"]


def test_interrupt_while_writing_leaves_no_video(pipe, tmp_path, monkeypatch):
    from turbowan.pipeline import video_io

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(video_io, "_write_av", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipe.generate(output=tmp_path / "v.mp4", **TINY)
    # only the rescued latents remain; no partial or temporary video file
    assert [p.name for p in tmp_path.iterdir()] == ["v.latents.safetensors"]
