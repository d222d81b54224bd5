"""The ComfyUI node pack, run against a STAND-IN for the few ComfyUI modules it touches.

ComfyUI cannot be installed in CI, so `ComfyStandIn` below builds fake `folder_paths`,
`comfy.model_management` and `comfy.utils` modules in sys.modules with the same function
names and return shapes as ComfyUI's, recording the calls the nodes make. The models are
the tiny demo checkpoints, so a whole run takes a couple of seconds on a CPU.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import offloadkit
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


class ComfyStandIn:
    """Fake ComfyUI modules: model folders, output folder, device, memory calls, progress."""

    def __init__(self, models_dir: Path, output_dir: Path) -> None:
        self.models_dir = models_dir
        self.output_dir = output_dir
        self.free_memory_calls: list[tuple[int, torch.device]] = []
        self.progress: list[tuple[int, int]] = []
        self.empty_cache_calls = 0
        self.interrupt_after_checks: int | None = None
        self.interrupt_checks = 0

        fp = types.ModuleType("folder_paths")
        fp.get_filename_list = lambda folder: sorted(p.name for p in models_dir.glob("*.safetensors"))
        fp.get_full_path = lambda folder, name: (
            str(models_dir / name) if (models_dir / name).is_file() else None)
        fp.get_output_directory = lambda: str(output_dir)
        fp.get_save_image_path = self._save_image_path

        mm = types.ModuleType("comfy.model_management")
        mm.get_torch_device = lambda: torch.device("cpu")
        mm.free_memory = lambda nbytes, device, keep_loaded=(): self.free_memory_calls.append((nbytes, device))
        mm.soft_empty_cache = self._soft_empty_cache
        mm.throw_exception_if_processing_interrupted = self._check_interrupt

        utils = types.ModuleType("comfy.utils")
        standin = self

        class ProgressBar:
            def __init__(self, total: int) -> None:
                self.total = total

            def update_absolute(self, value: int, total: int | None = None, preview=None) -> None:
                standin.progress.append((value, total or self.total))

        utils.ProgressBar = ProgressBar

        # for offloadkit's comfy_native strategy: a patcher that loads the module whole
        self.full_loads: list[int] = []

        class ModelPatcher:
            def __init__(self, model, load_device, offload_device, size=0):
                self.model, self.load_device, self.offload_device, self.size = (
                    model, load_device, offload_device, size)
                model.model_loaded_weight_memory = 0

            def loaded_size(self):
                return self.model.model_loaded_weight_memory

            def unpatch_model(self, device_to=None, unpatch_weights=True):
                self.model.to(device_to)
                self.model.model_loaded_weight_memory = 0

        def load_models_gpu(models, memory_required=0, force_patch_weights=False,
                            minimum_memory_required=None, force_full_load=False):
            for patcher in models:
                assert force_full_load
                patcher.model.to(patcher.load_device)
                patcher.model.model_loaded_weight_memory = patcher.size
                self.full_loads.append(patcher.size)

        mm.unet_offload_device = lambda: torch.device("cpu")
        mm.load_models_gpu = load_models_gpu
        patcher_mod = types.ModuleType("comfy.model_patcher")
        patcher_mod.ModelPatcher = ModelPatcher
        comfy = types.ModuleType("comfy")
        comfy.model_management, comfy.utils, comfy.model_patcher = mm, utils, patcher_mod
        self.modules = {"folder_paths": fp, "comfy": comfy, "comfy.model_management": mm,
                        "comfy.utils": utils, "comfy.model_patcher": patcher_mod}

    def _soft_empty_cache(self, force: bool = False) -> None:
        self.empty_cache_calls += 1

    def _check_interrupt(self) -> None:
        self.interrupt_checks += 1
        if self.interrupt_after_checks is not None and self.interrupt_checks > self.interrupt_after_checks:
            raise InterruptedError("stand-in: processing interrupted")

    def _save_image_path(self, prefix, output_dir, width=0, height=0):
        folder = Path(output_dir)
        counter = 1 + len(list(folder.glob(f"{prefix}_*")))
        return str(folder), prefix, counter, "", prefix


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("comfy_models")
    write_demo_checkpoints(directory)
    return directory


@pytest.fixture
def comfy(models_dir, tmp_path, monkeypatch):
    standin = ComfyStandIn(models_dir, tmp_path / "output")
    (tmp_path / "output").mkdir()
    for name, module in standin.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return standin


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


def load_models(strategy="adaptive", budget="auto"):
    loader = NODE_CLASS_MAPPINGS["TurboWanModelLoader"]()
    (high,) = loader.load("demo_dit_high.safetensors", "sla", DEMO_SLA_TOPK, strategy, budget)
    (low,) = loader.load("demo_dit_low.safetensors", "sla", DEMO_SLA_TOPK, strategy, budget)
    (vae,) = NODE_CLASS_MAPPINGS["TurboWanVAELoader"]().load("demo_vae.safetensors")
    return high, low, vae


def test_input_types_match_the_original_nodes_without_their_bugs(comfy):
    assert set(NODE_CLASS_MAPPINGS) == {"TurboWanModelLoader", "TurboWanVAELoader",
                                        "TurboDiffusionI2VSampler", "TurboDiffusionSaveVideo",
                                        "TurboWanLoraLoader"}
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
    loader = NODE_CLASS_MAPPINGS["TurboWanModelLoader"].INPUT_TYPES()
    assert loader["required"]["model_name"][0] == ["demo_dit_high.safetensors", "demo_dit_low.safetensors",
                                                   "demo_umt5.safetensors", "demo_vae.safetensors"]
    opt = loader["optional"]
    assert opt["attention_type"][0] == ["sla", "original", "sagesla"] and opt["attention_type"][1]["default"] == "sla"
    assert opt["offload_strategy"][0] == offloadkit.list_strategies()
    assert opt["offload_strategy"][1]["default"] == "adaptive"
    assert opt["sla_topk"][1]["default"] == 0.1 and opt["budget"][1]["default"] == "auto"

    sampler = NODE_CLASS_MAPPINGS["TurboDiffusionI2VSampler"]
    req = sampler.INPUT_TYPES()["required"]
    assert list(req)[:5] == ["high_noise_model", "low_noise_model", "conditioning", "vae", "image"]
    assert req["conditioning"][0] == "CONDITIONING" and req["image"][0] == "IMAGE"
    assert req["high_noise_model"][0] == "TURBOWAN_MODEL" and req["vae"][0] == "TURBOWAN_VAE"
    frames = req["num_frames"][1]
    assert frames["step"] == 4 and (frames["default"] - frames["min"]) % 4 == 0 and frames["default"] % 4 == 1
    assert (req["num_steps"][1]["min"], req["num_steps"][1]["max"], req["num_steps"][1]["default"]) == (1, 4, 4)
    assert req["boundary"][1]["default"] == 0.9 and req["sigma_max"][1]["default"] == 200.0
    assert req["resolution"][0] == ["480", "480p", "512", "720", "720p"]
    assert sampler.RETURN_TYPES == ("IMAGE",)

    saver = NODE_CLASS_MAPPINGS["TurboDiffusionSaveVideo"]
    sreq = saver.INPUT_TYPES()["required"]
    assert sreq["fps"][1]["default"] == 16 and sreq["format"][0] == ["mp4", "webm", "gif"]
    assert saver.OUTPUT_NODE is True and saver.RETURN_TYPES == ()


def test_nodes_give_the_same_frames_as_the_pipeline(comfy, reference, monkeypatch):
    context, expected = reference
    high, low, vae = load_models()
    import turbowan.dit.loading

    loaded, real_load_dit = [], turbowan.dit.loading.load_dit
    monkeypatch.setattr(turbowan.dit.loading, "load_dit",
                        lambda path, **kw: loaded.append(Path(path).name) or real_load_dit(path, **kw))
    image = comfy_image(demo_image())
    # ComfyUI's umT5 rows: the prompt rows then zeros; hand over only the rows up to the last
    # non-zero one, so the node's padding back to 512 rows is exercised too
    rows = int((context[0].abs().amax(dim=1) > 0).nonzero().max()) + 1
    assert rows < 512
    conditioning = [[context[:, :rows].to(torch.bfloat16).float(), {"pooled_output": None}]]
    assert torch.equal(conditioning_to_context(conditioning, context.shape[-1]), context.to(torch.bfloat16).float())
    conditioning = [[context[:, :rows].clone(), {"pooled_output": None}]]
    (frames,) = NODE_CLASS_MAPPINGS["TurboDiffusionI2VSampler"]().sample(high, low, conditioning, vae, image, **RUN)
    assert frames.shape == (5, 16, 16, 3) and frames.dtype == torch.float32
    assert float(frames.min()) >= 0.0 and float(frames.max()) <= 1.0
    assert torch.equal(frames, expected) and float(frames.std()) > 0.01
    # 4 steps: t = 0.995, 0.934 (high expert), 0.853, 0.609 (low expert, t < boundary 0.9)
    assert sorted(loaded) == ["demo_dit_high.safetensors", "demo_dit_low.safetensors"]
    # ComfyUI saw the progress of every step and was asked to make room for the weights
    assert comfy.progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert len(comfy.free_memory_calls) == 1
    nbytes, device = comfy.free_memory_calls[0]
    assert device == torch.device("cpu") and nbytes > max(high.nbytes, low.nbytes, vae.nbytes)
    assert comfy.empty_cache_calls >= 1


def test_comfy_native_strategy_gives_the_same_frames(comfy, reference):
    context, expected = reference
    high, low, vae = load_models(strategy="comfy_native", budget="1GiB")
    (frames,) = NODE_CLASS_MAPPINGS["TurboDiffusionI2VSampler"]().sample(
        high, low, [[context, {}]], vae, comfy_image(demo_image()), **RUN)
    assert torch.equal(frames, expected)
    # ComfyUI loaded each model whole: VAE (encode), high, low, VAE (decode); on the CPU the
    # bf16 weights run in float32, so more bytes than the file holds
    assert len(comfy.full_loads) == 4
    assert comfy.full_loads[1] == comfy.full_loads[2] > high.nbytes
    assert comfy.full_loads[0] == comfy.full_loads[3] > 0


def test_cancel_button_stops_sampling_between_steps(comfy, reference):
    context, _ = reference
    high, low, vae = load_models()
    comfy.interrupt_after_checks = 2  # after the VAE encode check and the first step
    with pytest.raises(InterruptedError):
        NODE_CLASS_MAPPINGS["TurboDiffusionI2VSampler"]().sample(
            high, low, [[context, {}]], vae, comfy_image(demo_image()), **RUN)
    assert comfy.progress == [(1, 4), (2, 4)]


def test_wrong_frame_count_and_clip_conditioning_fail_before_loading(comfy, reference, monkeypatch):
    context, _ = reference
    high, low, vae = load_models()
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
    high, _low, vae = load_models()
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
    load_models()
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
