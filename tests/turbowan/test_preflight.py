"""Every bad input is reported before any model is loaded (or any demo weight is written)."""

from __future__ import annotations

import shutil

import pytest

from turbowan.pipeline.demo import write_demo_checkpoints
from turbowan.pipeline.i2v import I2VPipeline
from turbowan.pipeline.placement import vae_blocks
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



# ---------------------------------------------------------------------- budget vs. strategy
def _minimums(models, strategy="adaptive"):
    """role -> offloadkit's least budget for ``strategy``; ``models``: role -> (model, blocks)."""
    import offloadkit
    from offloadkit.engine.profile import profile_model

    chosen = offloadkit.get_strategy(strategy)()
    return {role: chosen.min_device_bytes(profile_model(m, blocks)) for role, (m, blocks) in models.items()}


def _loaded_models(files, dtype):
    pipe = I2VPipeline.from_files(high=files.high, low=files.low, vae=files.vae, dtype=dtype,
                                  text_encoder=files.text_encoder, tokenizer="demo", device="cpu")
    te, vae = pipe._load_text_encoder(), pipe._get_vae()
    return {"text_encoder": (te, te.blocks), "vae": (vae, vae_blocks(vae)),
            "high": (pipe._load_expert(files.high), "blocks"),
            "low": (pipe._load_expert(files.low), "blocks")}


@pytest.fixture(scope="module")
def loaded_minimums(files):
    """Minimums of the models as the pipeline really loads and places them (CPU), by
    (dtype, strategy); "adaptive" alone is the float32 run the CPU defaults to."""
    out = {}
    for dtype in ("float32", "bfloat16"):
        models = _loaded_models(files, dtype)
        for strategy in ("adaptive", "layerwise"):
            out[dtype, strategy] = _minimums(models, strategy)
    out["adaptive"] = out["float32", "adaptive"]
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("strategy", ["adaptive", "layerwise"])
def test_meta_models_need_what_the_loaded_ones_need(files, loaded_minimums, strategy, dtype):
    """The pre-flight minimum (meta models from the headers, or the demo presets) is the one
    offloadkit computes for the loaded models: neither stricter nor looser."""
    import torch

    from turbowan.pipeline import preflight

    specs = preflight.inspect_model_files(
        {"high": files.high, "low": files.low, "vae": files.vae, "text_encoder": files.text_encoder})[1]
    run_dtype = getattr(torch, dtype)
    for placed in (preflight.placed_models_from_specs(specs, dtype=run_dtype, attention="sla",
                                                      sla_topk=0.5, home="host"),
                   preflight.demo_placed_models(dtype=run_dtype, attention="sla", sla_topk=0.5,
                                                home="host")):
        meta = _minimums({r: (p.model, p.blocks) for r, p in placed.items()}, strategy)
        assert meta == loaded_minimums[dtype, strategy]
        assert all(n > 0 for n in meta.values())
    # the dtype matters: bf16 weights take less than float32 ones
    assert all(loaded_minimums["bfloat16", strategy][r] < n
               for r, n in loaded_minimums["float32", strategy].items())


def test_budget_below_the_minimum_is_refused_before_loading(files, loaded_minimums, nothing_loads,
                                                            tmp_path):
    need = loaded_minimums["adaptive"]
    budget = need["vae"]  # holds the VAE and the text encoder, not the experts
    assert need["text_encoder"] <= budget < need["high"] == need["low"]
    err = _from_files(files, nothing_loads, rf"--budget {budget} is {budget} bytes", budget=budget)
    text = str(err)
    assert (f"the high-noise expert and the low-noise expert each need {need['high']} bytes "
            f"({need['high'] / 2**30:.3f} GiB)") in text
    assert "VAE" not in text and "text encoder" not in text  # those fit
    assert f"Pass --budget {-(-need['high'] // 2**20)}MiB or more" in text and "--offload" in text
    # the demo (what `turbowan generate --budget 123` runs) too, before writing its weights
    with pytest.raises(PreflightError, match=r"--budget 123 is 123 bytes") as demo_err:
        I2VPipeline.demo(budget=123, directory=tmp_path / "demo")
    assert f"the text encoder needs {need['text_encoder']} bytes" in str(demo_err.value)
    assert nothing_loads == [] and not (tmp_path / "demo").exists()


def test_budget_problem_is_listed_with_the_others(files, nothing_loads):
    # the budget is checked once the settings the models are built from are valid ...
    err = _from_files(files, nothing_loads, r"unknown home tier 'attic'", budget=123, home="attic")
    assert len(err.problems) == 1
    # ... and is reported together with the problems of the files
    err = _from_files(files, nothing_loads, r"--budget 123 is 123 bytes", budget=123,
                      tokenizer=files.high)
    assert len(err.problems) == 2 and "--tokenizer" in str(err)


def test_cpu_only_and_auto_pass_the_budget_check(files, nothing_loads):
    assert I2VPipeline.from_files(high=files.high, low=files.low, vae=files.vae, budget=0,
                                  text_encoder=files.text_encoder, tokenizer="demo", device="cpu",
                                  strategy="cpu_only").budget == 0
    I2VPipeline.from_files(high=files.high, low=files.low, vae=files.vae, budget="auto",
                           text_encoder=files.text_encoder, tokenizer="demo", device="cpu")
    assert nothing_loads == []


def test_demo_runs_at_exactly_the_minimum(loaded_minimums, tmp_path, one_torch_thread):
    """The pre-flight is not stricter than offloadkit: the least budget it lets through
    places every model the run uses."""
    least = max(loaded_minimums["adaptive"].values())
    with pytest.raises(PreflightError, match=r"each need"):
        I2VPipeline.demo(budget=least - 1, directory=tmp_path / "demo")
    pipe = I2VPipeline.demo(budget=least, directory=tmp_path / "demo")
    res = pipe.generate(frames=5, width=16, height=16, steps=3, seed=1)
    assert res.video is not None and res.video.shape == (1, 3, 5, 16, 16)
    assert max(s.peak_device_bytes or 0 for s in res.timings.stages) <= least


def test_decode_refuses_a_small_budget_before_loading_the_vae(loaded_minimums, nothing_loads, tmp_path):
    import torch

    from turbowan.pipeline.decode import decode_latents_file
    from turbowan.pipeline.latents_io import save_latents

    path = save_latents(tmp_path / "v.latents.safetensors", torch.zeros(1, 16, 2, 2, 2),
                        {"demo": True, "vae": "demo", "output": str(tmp_path / "v.mp4"),
                         "device": "cpu", "dtype": "float32"})
    need = loaded_minimums["adaptive"]["vae"]
    with pytest.raises(PreflightError, match=rf"the VAE needs {need} bytes"):
        decode_latents_file(path, budget=need - 1)
    assert nothing_loads == [] and not (tmp_path / "v.mp4").exists()
