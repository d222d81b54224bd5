"""The ComfyUI node pack, run the way ComfyUI runs it, against the STAND-IN in
tests/comfy_standin.py (ComfyUI cannot be installed in CI): nodes execute on a worker
thread inside torch.inference_mode(), with ComfyUI's interrupt check, progress bar and model
management mirrored from its v0.33 source. The models are the tiny demo checkpoints.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_standin import ComfyUI, InterruptProcessingException, interrupt_when

import offloadkit
from offloadkit.engine.core import Engine
from turbowan.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from turbowan.comfyui.conditioning import conditioning_to_context
from turbowan.comfyui.install import SHIM, install
from turbowan.pipeline.demo import (
    DEMO_PROMPT,
    DEMO_SLA_TOPK,
    demo_files,
    demo_image,
    write_demo_checkpoints,
)
from turbowan.pipeline.i2v import I2VPipeline
from turbowan.pipeline.settings import RunSettings
from turbowan.pipeline.video_io import read_video

RUN = dict(num_frames=5, num_steps=4, resolution="480p", aspect_ratio="16:9", boundary=0.9,
           sigma_max=200.0, seed=1, use_ode=False, width=16, height=16, resize="crop")
STRATEGIES = ["adaptive", "layerwise", "chunkwise", "comfy_native", "cpu_only", "manual"]
SAMPLER = NODE_CLASS_MAPPINGS["TurboDiffusionI2VSampler"]
LOADER = NODE_CLASS_MAPPINGS["TurboWanModelLoader"]
VAE_LOADER = NODE_CLASS_MAPPINGS["TurboWanVAELoader"]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("comfy_models")
    write_demo_checkpoints(directory)
    return directory


def make_comfy(models_dir, tmp_path, monkeypatch, **kwargs) -> ComfyUI:
    (tmp_path / "output").mkdir(exist_ok=True)
    kwargs.setdefault("vram_bytes", 256 * 2**20)
    kwargs.setdefault("reserve_bytes", 2**20)
    comfy = ComfyUI(models_dir=models_dir, output_dir=tmp_path / "output", **kwargs)
    return comfy.install(monkeypatch)


@pytest.fixture
def comfy(models_dir, tmp_path, monkeypatch):
    standin = make_comfy(models_dir, tmp_path, monkeypatch)
    yield standin
    standin.close()


@pytest.fixture(scope="module")
def reference(models_dir):
    """The same run through I2VPipeline directly, and the demo prompt's text states."""
    files = demo_files(models_dir)
    pipe = I2VPipeline(RunSettings(high=files.high, low=files.low, vae=files.vae,
                                   text_encoder=files.text_encoder, tokenizer="demo",
                                   device="cpu", dtype=torch.float32, sla_topk=DEMO_SLA_TOPK))
    context = pipe.encode_prompt(DEMO_PROMPT)
    result = pipe.generate(demo_image(), DEMO_PROMPT, frames=RUN["num_frames"], width=16,
                           height=16, steps=4, seed=1, sigma_max=200.0, boundary=0.9, ode=False)
    frames = ((result.video[0].permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1)
    return context, frames


def comfy_image(pil) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).unsqueeze(0)


#: the installed plugin needs its resident list: the loaders' strategy_options input
OPTIONS = {"manual": '{"resident": [0]}'}


def load_models(comfy: ComfyUI, strategy="adaptive", budget="auto", vae_strategy=None,
                vae_budget=None):
    """The two loader nodes and the VAE loader, each run by the executor."""
    def expert(name):
        return comfy.run_node(LOADER, model_name=name, attention_type="sla",
                              sla_topk=DEMO_SLA_TOPK, offload_strategy=strategy,
                              budget=budget, strategy_options=OPTIONS.get(strategy, ""))[0]
    vae = comfy.run_node(VAE_LOADER, vae_name="demo_vae.safetensors",
                         offload_strategy=vae_strategy or strategy,
                         budget=vae_budget or budget,
                         strategy_options=OPTIONS.get(vae_strategy or strategy, ""))[0]
    return expert("demo_dit_high.safetensors"), expert("demo_dit_low.safetensors"), vae


def sample(comfy: ComfyUI, high, low, vae, context, **overrides):
    return comfy.run_node(SAMPLER, high_noise_model=high, low_noise_model=low,
                          conditioning=[[context, {}]], vae=vae,
                          image=comfy_image(demo_image()), **{**RUN, **overrides})[0]


def live_engines() -> list[Engine]:
    """Engines still holding device or home-tier memory (placed and not removed, or staged)."""
    gc.collect()
    return [e for e in gc.get_objects() if type(e) is Engine and not e._removed]


def assert_nothing_left(comfy: ComfyUI) -> None:
    for thread in threading.enumerate():
        if thread.name == "turbowan-stage-low":
            thread.join(timeout=30)
            assert not thread.is_alive(), "the staging thread did not stop"
    assert comfy.current_loaded_models == []
    assert live_engines() == []


def test_input_types_match_the_original_nodes_without_their_bugs(comfy):
    assert set(NODE_CLASS_MAPPINGS) == {"TurboWanModelLoader", "TurboWanVAELoader",
                                        "TurboDiffusionI2VSampler", "TurboDiffusionSaveVideo",
                                        "TurboWanLoraLoader"}
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
    loader = LOADER.INPUT_TYPES()
    assert loader["required"]["model_name"][0] == ["demo_dit_high.safetensors", "demo_dit_low.safetensors",
                                                   "demo_umt5.safetensors", "demo_vae.safetensors"]
    opt = loader["optional"]
    assert opt["attention_type"][0] == ["sla", "original", "sagesla"] and opt["attention_type"][1]["default"] == "sla"
    assert opt["offload_strategy"][0] == offloadkit.list_strategies()
    assert opt["offload_strategy"][1]["default"] == "adaptive"
    assert opt["sla_topk"][1]["default"] == 0.1 and opt["budget"][1]["default"] == "auto"
    # the tooltip describes comfy_native as what it is now (a shim that streams), and every
    # strategy it names is one the list offers
    tip = opt["offload_strategy"][1]["tooltip"]
    assert "whole" not in tip and "streams" in tip
    assert all(name in tip for name in ("adaptive", "layerwise", "comfy_native", "cpu_only"))
    # the VAE loader has its own placement
    vae_opt = VAE_LOADER.INPUT_TYPES()["optional"]
    assert vae_opt["offload_strategy"][0] == offloadkit.list_strategies()
    assert vae_opt["budget"][1]["default"] == "auto"

    req = SAMPLER.INPUT_TYPES()["required"]
    assert list(req)[:5] == ["high_noise_model", "low_noise_model", "conditioning", "vae", "image"]
    assert req["conditioning"][0] == "CONDITIONING" and req["image"][0] == "IMAGE"
    assert req["high_noise_model"][0] == "TURBOWAN_MODEL" and req["vae"][0] == "TURBOWAN_VAE"
    frames = req["num_frames"][1]
    assert frames["step"] == 4 and (frames["default"] - frames["min"]) % 4 == 0 and frames["default"] % 4 == 1
    assert (req["num_steps"][1]["min"], req["num_steps"][1]["max"], req["num_steps"][1]["default"]) == (1, 4, 4)
    assert req["boundary"][1]["default"] == 0.9 and req["sigma_max"][1]["default"] == 200.0
    assert req["resolution"][0] == ["480p", "512", "720p"]  # one name per size
    assert req["resolution"][1]["default"] in req["resolution"][0]
    # IMAGE (frames, H, W, 3) float in [0, 1]: what ComfyUI's CreateVideo, SaveAnimatedWEBP
    # and PreviewImage take (comfy_extras/nodes_video.py: CreateVideo's "images" is IMAGE)
    assert SAMPLER.RETURN_TYPES == ("IMAGE",)

    saver = NODE_CLASS_MAPPINGS["TurboDiffusionSaveVideo"]
    sreq = saver.INPUT_TYPES()["required"]
    assert sreq["fps"][1]["default"] == 16 and sreq["format"][0] == ["mp4", "webm", "gif"]
    assert saver.OUTPUT_NODE is True and saver.RETURN_TYPES == ()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_gives_the_pipelines_frames_through_the_executor(
        comfy, reference, strategy, monkeypatch):
    """ComfyUI runs nodes on its prompt worker thread inside torch.inference_mode()."""
    context, expected = reference
    high, low, vae = load_models(comfy, strategy, "1GiB" if strategy != "cpu_only" else "auto")
    import turbowan.dit.loading

    loaded, real_load_dit = [], turbowan.dit.loading.load_dit
    monkeypatch.setattr(turbowan.dit.loading, "load_dit",
                        lambda path, **kw: loaded.append(Path(path).name) or real_load_dit(path, **kw))
    # ComfyUI's umT5 rows: the prompt rows then zeros; hand over only the rows up to the last
    # non-zero one, so the node's padding back to 512 rows is exercised too
    rows = int((context[0].abs().amax(dim=1) > 0).nonzero().max()) + 1
    assert rows < 512
    frames = sample(comfy, high, low, vae, context[:, :rows].clone())
    assert comfy.node_threads and comfy.import_thread not in comfy.node_threads
    assert frames.shape == (5, 16, 16, 3) and frames.dtype == torch.float32
    assert float(frames.min()) >= 0.0 and float(frames.max()) <= 1.0
    assert torch.equal(frames, expected) and float(frames.std()) > 0.01
    # 4 steps: t = 0.995, 0.934 (high expert), 0.853, 0.609 (low expert, t < boundary 0.9)
    assert sorted(loaded) == ["demo_dit_high.safetensors", "demo_dit_low.safetensors"]
    assert [(v, t) for v, t, _ in comfy.progress] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    if strategy == "comfy_native":  # each model asked ComfyUI for room: VAE, high, low, VAE
        assert len(comfy.load_calls) == 4
    else:  # ComfyUI was asked once to make room for the largest model
        assert len(comfy.free_memory_calls) == 1
        assert comfy.free_memory_calls[0][0] > max(high.nbytes, low.nbytes, vae.nbytes)
    assert_nothing_left(comfy)


@pytest.mark.parametrize("mode", ["cpu", "lowvram", "novram", "highvram"])
def test_comfy_native_in_every_comfyui_memory_mode(models_dir, tmp_path, monkeypatch,
                                                   reference, mode):
    context, expected = reference
    comfy = make_comfy(models_dir, tmp_path, monkeypatch, mode=mode, vram_bytes=8 * 2**20,
                       reserve_bytes=2**20)
    from comfy_standin import load_other_model

    encoder = load_other_model(comfy, 6 * 2**20)  # CLIPTextEncode left the encoder loaded
    high, low, vae = load_models(comfy, "comfy_native", "1GiB")
    frames = sample(comfy, high, low, vae, context)
    assert torch.equal(frames, expected)
    if mode != "cpu":  # ComfyUI unloaded the text encoder to make room
        assert encoder.loaded_size() < 6 * 2**20
    assert [m.model for m in comfy.current_loaded_models] in ([], [encoder])
    assert_nothing_left_but(comfy, encoder)
    comfy.close()


def assert_nothing_left_but(comfy: ComfyUI, *others) -> None:
    assert [m.model for m in comfy.current_loaded_models if m.model not in others] == []
    assert live_engines() == []


def _phase_tracker(monkeypatch) -> dict:
    """Marks which long stage is running: VAE encode/decode, expert loading, sampling."""
    import turbowan.pipeline.i2v as i2v
    import turbowan.vae.model as vae_model

    phase = {"now": None}

    def wrap(owner, name, label):
        real = getattr(owner, name)

        def wrapped(*args, **kwargs):
            if threading.current_thread().name == "turbowan-stage-low":
                return real(*args, **kwargs)  # the phase is the node thread's
            before, phase["now"] = phase["now"], label
            try:
                return real(*args, **kwargs)
            finally:
                phase["now"] = before
        monkeypatch.setattr(owner, name, wrapped)

    wrap(vae_model.WanVAE, "encode", "encode")
    wrap(vae_model.WanVAE, "decode", "decode")
    wrap(i2v.I2VPipeline, "_load_expert_checked", "loading")
    wrap(offloadkit, "apply", "placing")  # offloadkit packs and places block by block
    wrap(i2v, "rcm_sample", "sampling")
    return phase


@pytest.mark.parametrize("where", ["placing", "encode", "loading", "sampling", "decode"])
@pytest.mark.parametrize("strategy", ["adaptive", "comfy_native"])
def test_cancel_takes_effect_at_the_next_check_and_the_next_run_works(
        comfy, reference, monkeypatch, where, strategy):
    context, expected = reference
    high, low, vae = load_models(comfy, strategy, "1GiB")
    phase = _phase_tracker(monkeypatch)
    pressed = {}

    def press(count: int) -> bool:
        if phase["now"] == where and not pressed:
            pressed.update(at=count)
            return True
        return False

    with interrupt_when(comfy, press):
        with pytest.raises(InterruptProcessingException):
            sample(comfy, high, low, vae, context)
    # the interrupt was honoured by the very next check: one block, VAE stage or load later
    assert pressed and comfy.interrupt_checks == pressed["at"] + 1
    assert len(comfy.progress) < 4 or where == "decode"
    assert_nothing_left(comfy)
    # the next queued run works and gives the same frames
    comfy.progress.clear()
    frames = sample(comfy, high, low, vae, context)
    assert torch.equal(frames, expected)
    assert_nothing_left(comfy)


def test_a_cancel_stops_the_background_staging_thread(comfy, reference, monkeypatch):
    """The low expert's staging thread is still reading when the user cancels: it stops at
    its next check instead of packing the expert, and nothing stays staged."""
    context, expected = reference
    high, low, vae = load_models(comfy, "adaptive", "1GiB")
    from turbowan.pipeline.i2v import I2VPipeline as Pipeline

    release = threading.Event()
    real_load = Pipeline._load_expert

    def slow_low_read(self, path):
        if threading.current_thread().name == "turbowan-stage-low":
            while not release.wait(0.05):  # the read is still going when Cancel is pressed
                pass
        return real_load(self, path)

    staged_on: list[str] = []
    real_stage = offloadkit.stage

    def spy_stage(*args, **kwargs):
        staged_on.append(threading.current_thread().name)
        return real_stage(*args, **kwargs)

    monkeypatch.setattr(Pipeline, "_load_expert", slow_low_read)
    monkeypatch.setattr(offloadkit, "stage", spy_stage)
    phase = _phase_tracker(monkeypatch)
    with interrupt_when(comfy, lambda count: phase["now"] == "sampling"):
        with pytest.raises(InterruptProcessingException):
            sample(comfy, high, low, vae, context)
    release.set()  # (the thread was stopped before: its read never finished)
    assert_nothing_left(comfy)  # joins the staging thread
    assert staged_on == []  # it stopped before packing the low expert
    # without a Cancel the same thread does stage it
    frames = sample(comfy, high, low, vae, context)
    assert torch.equal(frames, expected) and staged_on == ["turbowan-stage-low"]
    assert_nothing_left(comfy)


def test_an_error_mid_run_leaves_comfyui_clean(comfy, reference, monkeypatch):
    context, _ = reference
    high, low, vae = load_models(comfy, "comfy_native", "1GiB")
    import turbowan.dit.model as dit_model

    calls = {"n": 0}
    real = dit_model.WanDiT.forward

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the first low-noise step
            raise RuntimeError("boom")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(dit_model.WanDiT, "forward", failing)
    with pytest.raises(RuntimeError, match="boom"):
        sample(comfy, high, low, vae, context)
    assert_nothing_left(comfy)


def test_the_vae_is_placed_with_its_own_loaders_settings(comfy, reference):
    context, expected = reference
    high, low, vae = load_models(comfy, "adaptive", "1GiB", vae_strategy="comfy_native")
    assert (vae.strategy, high.strategy) == ("comfy_native", "adaptive")
    frames = sample(comfy, high, low, vae, context)
    assert torch.equal(frames, expected)
    assert len(comfy.load_calls) == 2  # only the VAE (encode, decode) went through ComfyUI
    assert_nothing_left(comfy)


def test_a_budget_below_the_minimum_fails_at_the_loader(comfy):
    with pytest.raises(ValueError) as err:
        comfy.run_node(LOADER, model_name="demo_dit_high.safetensors", offload_strategy="adaptive",
                       budget="64KB")
    message = str(err.value)
    assert message.startswith("TurboWanModelLoader:") and "demo_dit_high.safetensors" in message
    assert "strategy 'adaptive'" in message and "budget '64KB' = 64000 bytes (0.000 GiB)" in message
    need = int(message.split("demo_dit_high.safetensors: ")[1].split(" bytes")[0])
    assert need > 64000 and f"{need} bytes ({need / 2**30:.3f} GiB)" in message
    assert f"set budget to {-(-need // 2**20)}MiB or more" in message
    with pytest.raises(ValueError, match=r"TurboWanVAELoader:.*'layerwise'.*demo_vae.safetensors.*set budget"):
        comfy.run_node(VAE_LOADER, vae_name="demo_vae.safetensors", offload_strategy="layerwise",
                       budget="64KB")
    # cpu_only places nothing on the device: any budget is fine
    comfy.run_node(LOADER, model_name="demo_dit_high.safetensors", offload_strategy="cpu_only",
                   budget="64KB")


def test_wrong_frame_count_and_clip_conditioning_fail_before_loading(comfy, reference, monkeypatch):
    context, _ = reference
    high, low, vae = load_models(comfy)
    import turbowan.dit.loading
    import turbowan.vae.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded although the inputs were wrong")

    monkeypatch.setattr(turbowan.dit.loading, "load_dit", no_loading)
    monkeypatch.setattr(turbowan.vae.loading, "load_vae", no_loading)
    sampler = NODE_CLASS_MAPPINGS["TurboDiffusionI2VSampler"]()
    image = comfy_image(demo_image())
    with pytest.raises(ValueError, match=r"num_frames.*4n\+1.*try 5 or 9") as err:
        sampler.sample(high, low, [[context, {}]], vae, image, **{**RUN, "num_frames": 8})
    assert "CLIP" not in str(err.value)  # only the problem there is
    clip_l = [[torch.randn(1, 77, 768), {"pooled_output": torch.randn(1, 768)}]]
    with pytest.raises(ValueError) as err:
        sampler.sample(high, low, clip_l, vae, image, **RUN)
    message = str(err.value)
    assert "768 (768 is CLIP-L)" in message and "umT5-xxl" in message and "width 4096" in message
    assert "CLIPLoader, type 'wan'" in message
    # both problems at once are reported together
    with pytest.raises(ValueError, match=r"(?s)2 problems.*num_frames.*CLIP-L"):
        sampler.sample(high, low, clip_l, vae, image, **{**RUN, "num_frames": 80})
    assert comfy.free_memory_calls == [] and comfy.progress == []


def test_mismatched_loaders_and_bad_images_are_refused(comfy, reference):
    context, _ = reference
    high, _low, vae = load_models(comfy)
    (low_other,) = NODE_CLASS_MAPPINGS["TurboWanModelLoader"]().load(
        "demo_dit_low.safetensors", "sla", DEMO_SLA_TOPK, "layerwise", "auto")
    sampler = NODE_CLASS_MAPPINGS["TurboDiffusionI2VSampler"]()
    image = comfy_image(demo_image())
    with pytest.raises(ValueError, match="differ in attention_type/sla_topk/offload_strategy/budget"):
        sampler.sample(high, low_other, [[context, {}]], vae, image, **RUN)
    with pytest.raises(ValueError, match="same file"):
        sampler.sample(high, high, [[context, {}]], vae, image, **RUN)
    with pytest.raises(ValueError, match=r"image must be a ComfyUI IMAGE"):
        sampler.sample(high, _low, [[context, {}]], vae, torch.rand(3, 32, 32, 5), **RUN)
    with pytest.raises(ValueError, match="must come from TurboWanVAELoader"):
        sampler.sample(high, _low, [[context, {}]], "not a vae", image, **RUN)
    # two steps never reach the low expert: a mismatched low loader does not matter then
    (frames,) = sampler.sample(high, low_other, [[context, {}]], vae, image,
                               **{**RUN, "num_steps": 1})
    assert frames.shape == (5, 16, 16, 3)


def test_loaders_check_files_and_settings(comfy):
    loader = NODE_CLASS_MAPPINGS["TurboWanModelLoader"]()
    with pytest.raises(ValueError, match=r"not in ComfyUI's diffusion_models/ folder.*models/diffusion_models"):
        loader.load("missing.pth")
    with pytest.raises(ValueError, match="TurboWanModelLoader:.*"):
        loader.load("demo_vae.safetensors")  # a VAE is not a DiT
    with pytest.raises(ValueError, match=r"unknown attention 'flash'"):
        loader.load("demo_dit_high.safetensors", "flash")
    with pytest.raises(ValueError, match=r"(?s)Unknown strategy|unknown strategy|adaptive"):
        loader.load("demo_dit_high.safetensors", "sla", 0.1, "no_such_strategy")
    with pytest.raises(ValueError, match="TurboWanVAELoader:"):
        NODE_CLASS_MAPPINGS["TurboWanVAELoader"]().load("demo_dit_high.safetensors")
    (model,) = loader.load("demo_dit_high.safetensors")
    assert model.text_dim == 64 and model.strategy == "adaptive" and model.budget == "auto"
    assert model.nbytes == sum(
        t.numel() * t.element_size() for t in __import__("safetensors.torch").torch.load_file(
            comfy.models_dir / "demo_dit_high.safetensors").values())


def test_loaders_read_each_header_once(comfy, monkeypatch):
    import turbowan.checkpoint.io as ckpt_io

    reads = []
    real = ckpt_io.read_tensor_specs
    monkeypatch.setattr(ckpt_io, "read_tensor_specs", lambda path: reads.append(path) or real(path))
    load_models(comfy)
    assert sorted(p.name for p in reads) == ["demo_dit_high.safetensors", "demo_dit_low.safetensors",
                                            "demo_vae.safetensors"]


def test_conditioning_padding_truncation_and_batches():
    states = torch.randn(1, 7, 64)
    context = conditioning_to_context([[states, {}]], 64)
    assert context.shape == (1, 512, 64)
    assert torch.equal(context[:, :7], states) and not context[:, 7:].any()
    long = torch.randn(1, 600, 64)
    with pytest.warns(UserWarning, match="600 tokens.*dropped"):
        cut = conditioning_to_context([[long, {}]], 64)
    assert torch.equal(cut, long[:, :512])
    with pytest.raises(ValueError, match="2 prompts"):
        conditioning_to_context([[torch.randn(2, 512, 64), {}]], 64)
    with pytest.raises(ValueError, match="Conditioning Combine"):
        conditioning_to_context([[states, {}], [states, {}]], 64)


@pytest.mark.parametrize("fmt", ["mp4", "gif"])
def test_save_video_writes_into_the_output_folder_at_16_fps(comfy, fmt):
    saver = NODE_CLASS_MAPPINGS["TurboDiffusionSaveVideo"]()
    frames = torch.linspace(0, 1, 9 * 16 * 24 * 3).reshape(9, 16, 24, 3)
    kwargs = saver.INPUT_TYPES()
    assert kwargs["required"]["fps"][1]["default"] == 16
    out = saver.save(frames, "clip", 16, fmt)
    (entry,) = out["ui"]["images"]
    path = comfy.output_dir / entry["subfolder"] / entry["filename"]
    assert entry["type"] == "output" and entry["filename"] == f"clip_00001_.{fmt}"
    video = read_video(path)
    assert (video.num_frames, video.height, video.width) == (9, 16, 24)
    if fmt == "mp4":
        assert video.fps == pytest.approx(16)
    assert sorted(os.listdir(comfy.output_dir)) == [entry["filename"]]  # no partial file left
    second = saver.save(frames, "clip", 16, fmt)
    assert second["ui"]["images"][0]["filename"] == f"clip_00002_.{fmt}"


def test_save_video_refuses_bad_input_before_writing(comfy):
    saver = NODE_CLASS_MAPPINGS["TurboDiffusionSaveVideo"]()
    with pytest.raises(ValueError, match="mp4 needs an even width and height.*webm or gif"):
        saver.save(torch.rand(3, 15, 16, 3), "odd", 16, "mp4")
    with pytest.raises(ValueError, match="fps"):
        saver.save(torch.rand(3, 16, 16, 3), "x", 0, "mp4")
    with pytest.raises(ValueError, match="frames must be a ComfyUI IMAGE"):
        saver.save(torch.rand(16, 16, 3), "x", 16, "mp4")
    assert os.listdir(comfy.output_dir) == []


def test_nodes_outside_comfyui_say_so(monkeypatch):
    for name in ("folder_paths", "comfy", "comfy.model_management", "comfy.utils"):
        monkeypatch.setitem(sys.modules, name, None)  # import of these now fails
    assert NODE_CLASS_MAPPINGS["TurboWanModelLoader"].INPUT_TYPES()["required"]["model_name"][0] == []
    with pytest.raises(RuntimeError, match="run them inside ComfyUI"):
        NODE_CLASS_MAPPINGS["TurboWanModelLoader"]().load("x.pth")


def test_install_writes_the_two_line_shim(tmp_path):
    with pytest.raises(ValueError, match="not a ComfyUI install"):
        install(tmp_path)
    (tmp_path / "custom_nodes").mkdir()
    target = install(tmp_path)
    assert target == tmp_path / "custom_nodes" / "turbowan" / "__init__.py"
    assert target.read_text() == SHIM
    namespace: dict = {}
    exec(compile(SHIM, str(target), "exec"), namespace)
    assert namespace["NODE_CLASS_MAPPINGS"] is NODE_CLASS_MAPPINGS
    assert install(tmp_path) == target  # idempotent
    # what ComfyUI serves under /api/workflow_templates/turbowan, and the registry metadata
    pack = target.parent
    assert [p.name for p in (pack / "example_workflows").iterdir()] == ["turbowan_i2v_480p.json"]
    import tomllib

    meta = tomllib.loads((pack / "pyproject.toml").read_text())
    comfy_meta = meta["tool"]["comfy"]
    assert comfy_meta["PublisherId"] and comfy_meta["DisplayName"] and "Icon" in comfy_meta
    assert meta["project"]["name"] and meta["project"]["version"]


def test_example_workflow_is_a_ui_workflow_of_real_nodes_with_valid_widgets(tmp_path):
    """UI format (nodes + links), every TurboWan widget value a valid choice for its input."""
    import json
    from importlib import resources

    text = (resources.files("turbowan.comfyui") / "pack" / "example_workflows"
            / "turbowan_i2v_480p.json").read_text()
    workflow = json.loads(text)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    core = {"LoadImage", "CLIPLoader", "CLIPTextEncode"}
    assert {n["type"] for n in nodes.values()} <= set(NODE_CLASS_MAPPINGS) | core
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        assert nodes[src]["outputs"][src_slot]["type"] == kind
        assert nodes[dst]["inputs"][dst_slot]["type"] == kind
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
    clip = next(n for n in nodes.values() if n["type"] == "CLIPLoader")
    assert clip["widgets_values"][1] == "wan"
    for n in nodes.values():
        if n["type"] not in NODE_CLASS_MAPPINGS:
            continue
        spec = NODE_CLASS_MAPPINGS[n["type"]].INPUT_TYPES()
        widgets = [(name, s) for part in ("required", "optional")
                   for name, s in spec.get(part, {}).items()
                   if isinstance(s[0], list) or s[0] in ("INT", "FLOAT", "STRING", "BOOLEAN")]
        values = [v for v in n["widgets_values"] if v != "fixed"]  # seed's control widget
        assert len(values) == len(widgets), n["type"]
        for (name, s), value in zip(widgets, values, strict=True):
            if isinstance(s[0], list) and s[0]:  # a combo with known choices
                assert value in s[0], (n["type"], name, value)
    sampler = next(n for n in nodes.values() if n["type"] == "TurboDiffusionI2VSampler")
    assert sampler["widgets_values"][2] == "480p"
