"""Every bad input is reported before any model is loaded (or any demo weight is written)."""

from __future__ import annotations

import shutil

import pytest

from turbowan.pipeline.demo import write_demo_checkpoints
from turbowan.pipeline.i2v import I2VPipeline
from turbowan.pipeline.preflight import PreflightError


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Real-format checkpoint files (the demo's) to point from_files at."""
    return write_demo_checkpoints(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any model loading, tensor reading or demo-weight writing fails the test."""
    import safetensors.torch

    import turbowan.checkpoint.io
    import turbowan.dit.loading
    import turbowan.pipeline.demo
    import turbowan.text_encoder.loading
    import turbowan.vae.loading

    calls: list[str] = []

    def forbid(name):
        def fail(*a, **k):
            calls.append(name)
            raise AssertionError(f"{name} was called during pre-flight")

        return fail

    for module, attr in [
        (turbowan.dit.loading, "load_dit"),
        (turbowan.vae.loading, "load_vae"),
        (turbowan.text_encoder.loading, "load_text_encoder"),
        (turbowan.checkpoint.io, "load_state_dict"),
        (turbowan.dit.loading, "load_state_dict"),
        (safetensors.torch, "load_file"),
        (turbowan.pipeline.demo, "write_demo_checkpoints"),
    ]:
        monkeypatch.setattr(module, attr, forbid(f"{module.__name__}.{attr}"))
    yield calls
    assert calls == []


@pytest.fixture
def demo_pipe(tmp_path):
    return I2VPipeline.demo(directory=tmp_path / "demo")


@pytest.fixture
def real_pipe(files):
    return I2VPipeline.from_files(high=files.high, low=files.low, vae=files.vae,
                                  text_encoder=files.text_encoder, tokenizer="demo", device="cpu")


def _bad_generate(pipe, nothing_loads, match, **kwargs):
    with pytest.raises(PreflightError, match=match) as err:
        pipe.generate(**kwargs)
    assert nothing_loads == []
    return err.value


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(frames=16), r"4n\+1.*try 13 or 17"),
        (dict(frames=0), r"4n\+1"),
        (dict(resolution="1080p"), r"unknown resolution '1080p'.*480p.*720p"),
        (dict(resolution="480p", aspect_ratio="21:9"), r"unknown aspect ratio '21:9'.*16:9"),
        (dict(width=100, height=64), r"width must be a positive multiple of 16.*try 96 or 112"),
        (dict(width=64), r"both --width and --height"),
        (dict(steps=5), r"1 to 4"),
        (dict(sigma_max=-1.0), r"sigma_max must be a positive"),
        (dict(boundary=1.5), r"boundary is an RF time in \[0, 1\]"),
        (dict(seed=-1), r"seed must be a non-negative integer"),
        (dict(resize="pad"), r"'crop'.*'stretch'"),
        (dict(fps=0), r"fps must be"),
        (dict(quality=11), r"quality must be an integer from 1 to 10"),
    ],
)
def test_bad_run_settings(demo_pipe, nothing_loads, kwargs, match):
    _bad_generate(demo_pipe, nothing_loads, match, **kwargs)
    assert not (demo_pipe._demo_dir).exists()  # not even the demo weights were written


def test_bad_output_names(demo_pipe, nothing_loads, tmp_path):
    _bad_generate(demo_pipe, nothing_loads, r"unknown video extension '\.avi'.*\.mp4",
                  output=tmp_path / "v.avi")
    (tmp_path / "file").write_text("x")
    _bad_generate(demo_pipe, nothing_loads, r"is a file, not a directory",
                  output=tmp_path / "file" / "v.mp4")


def test_unwritable_output_dir(demo_pipe, nothing_loads, tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(os, "access", lambda p, mode: False)
    _bad_generate(demo_pipe, nothing_loads, r"not writable", output=tmp_path / "v.mp4")


def test_bad_images(demo_pipe, nothing_loads, tmp_path):
    _bad_generate(demo_pipe, nothing_loads, r"start image .*missing\.png.* not found; pass an existing",
                  image=tmp_path / "missing.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\x00not an image")
    _bad_generate(demo_pipe, nothing_loads, r"cannot be read as an image.*PNG, JPEG", image=bad)


def test_every_problem_is_listed_at_once(demo_pipe, nothing_loads, tmp_path):
    err = _bad_generate(demo_pipe, nothing_loads, r"3 problems found before starting",
                        frames=10, resolution="4k", output=tmp_path / "v.mov")
    assert len(err.problems) == 3
    assert "4n+1" in str(err) and "'4k'" in str(err) and ".mov" in str(err)


def test_real_pipeline_needs_an_image_and_checks_it_first(real_pipe, nothing_loads):
    _bad_generate(real_pipe, nothing_loads, r"no start image: pass --image")


def test_low_expert_required_for_three_or_more_steps(files, nothing_loads, tmp_path):
    pipe = I2VPipeline.from_files(high=files.high, low=None, vae=files.vae,
                                  text_encoder=files.text_encoder, tokenizer="demo", device="cpu")
    img = tmp_path / "a.png"
    from turbowan.pipeline.demo import demo_image

    demo_image(32).save(img)
    _bad_generate(pipe, nothing_loads, r"4 steps reach the low-noise expert.*pass --low",
                  image=img, frames=5, width=32, height=32)


def _from_files(files, nothing_loads, match, **override):
    kw = dict(high=files.high, low=files.low, vae=files.vae, text_encoder=files.text_encoder,
              tokenizer="demo", device="cpu")
    kw.update(override)
    with pytest.raises(PreflightError, match=match) as err:
        I2VPipeline.from_files(**kw)
    assert nothing_loads == []
    return err.value


def test_missing_checkpoint(files, nothing_loads, tmp_path):
    _from_files(files, nothing_loads, r"--high .*nope\.pth' does not exist; pass the path of TurboWan2\.2",
                high=tmp_path / "nope.pth")


def test_required_checkpoint_not_given(files, nothing_loads):
    _from_files(files, nothing_loads, r"--vae is required with real checkpoints", vae=None)


def test_checkpoint_of_the_wrong_kind(files, nothing_loads):
    err = _from_files(files, nothing_loads, r"--high .*demo_vae\.safetensors.*Wan DiT", high=files.vae)
    assert "VAE" in str(err)
    _from_files(files, nothing_loads, r"--vae .*demo_umt5.*(VAE|Wan2\.1)", vae=files.text_encoder)
    _from_files(files, nothing_loads, r"--text-encoder .*demo_dit_high.*umT5", text_encoder=files.high)


def test_truncated_checkpoint(files, nothing_loads, tmp_path):
    cut = tmp_path / "cut.safetensors"
    shutil.copy(files.low, cut)
    with cut.open("r+b") as fh:
        fh.truncate(cut.stat().st_size - 1000)
    _from_files(files, nothing_loads, r"--low: .*truncated.*re-download", low=cut)


@pytest.mark.parametrize("role, key", [("vae", "decoder.head.2.bias"), ("text_encoder", "norm.weight"),
                                       ("low", "blocks.1.ffn.2.bias")])
def test_one_tensor_of_the_wrong_shape(files, role, key, tmp_path):
    """Caught from the header before loading (here, before the guard: the edit reads the file)."""
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(getattr(files, role)))
    assert key in state
    state[key] = torch.zeros(state[key].shape[0] + 1, dtype=state[key].dtype)
    edited = tmp_path / f"edited_{role}.safetensors"
    save_file(state, str(edited))
    flag = {"vae": "--vae", "text_encoder": "--text-encoder", "low": "--low"}[role]
    kw = dict(high=files.high, low=files.low, vae=files.vae, text_encoder=files.text_encoder,
              tokenizer="demo", device="cpu")
    kw[role] = edited
    with pytest.raises(PreflightError, match=f"{flag} .*does not match the model") as err:
        I2VPipeline.from_files(**kw)
    assert key in str(err.value)


def test_unknown_strategy_lists_the_known_ones(files, nothing_loads):
    err = _from_files(files, nothing_loads, r"fastest", strategy="fastest")
    assert "adaptive" in str(err) and "layerwise" in str(err)


def test_unparseable_budget(files, nothing_loads):
    _from_files(files, nothing_loads, r"12G", budget="12G")


def test_cuda_without_a_gpu(files, nothing_loads):
    import torch

    if torch.cuda.is_available():  # the rule under test is about machines without one
        pytest.skip("a CUDA GPU is present")
    _from_files(files, nothing_loads, r"CUDA", device="cuda")


def test_a_device_offloadkit_cannot_place_on_is_refused_before_loading(files, nothing_loads):
    # torch knows 'mps', but offloadkit (which places every model) does not stream to it
    _from_files(files, nothing_loads, r"--device mps: .*not 'mps'", device="mps")


def test_missing_tokenizer(files, nothing_loads, tmp_path):
    _from_files(files, nothing_loads, r"--tokenizer .* does not exist", tokenizer=tmp_path / "tok")


def test_no_tokenizer_anywhere(files, nothing_loads):
    # the demo text encoder embeds no tokenizer and none lies next to it
    _from_files(files, nothing_loads, r"no tokenizer for the text encoder .*pass --tokenizer",
                tokenizer=None)


def test_tokenizer_found_next_to_the_text_encoder(files, tmp_path):
    from turbowan.text_encoder.tokenizer import DEMO_TOKENIZER

    te = tmp_path / "umt5.safetensors"
    shutil.copy(files.text_encoder, te)
    shutil.copy(DEMO_TOKENIZER, tmp_path / "spiece.model")
    pipe = I2VPipeline.from_files(high=files.high, low=files.low, vae=files.vae,
                                  text_encoder=te, tokenizer=None, device="cpu")
    assert pipe.files.tokenizer is None


def test_bad_attention_settings(files, nothing_loads):
    _from_files(files, nothing_loads, r"sla_topk .* in \(0, 1\]", sla_topk=0.0)
    _from_files(files, nothing_loads, r"unknown attention 'flash'", attention="flash")


def test_demo_defaults_resolve_without_loading(demo_pipe, nothing_loads):
    s = demo_pipe.check_inputs()
    assert (s["frames"], s["width"], s["height"]) == (17, 128, 128)
    assert s["image"] == "built-in" and s["vae"] == "demo" and s["steps"] == 4


def test_real_defaults_follow_upstream(real_pipe, nothing_loads, tmp_path):
    from turbowan.pipeline.demo import demo_image

    img = tmp_path / "a.png"
    demo_image(32).save(img)
    s = real_pipe.check_inputs(img, "a prompt")
    assert (s["frames"], s["width"], s["height"]) == (81, 1280, 720)
    assert (s["sigma_max"], s["boundary"], s["fps"]) == (200.0, 0.9, 16)
    s = real_pipe.check_inputs(img, resolution="480p", aspect_ratio="9:16")
    assert (s["width"], s["height"]) == (480, 832)
