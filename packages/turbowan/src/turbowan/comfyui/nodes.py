"""The four TurboDiffusion nodes: two loaders, the I2V sampler and the video saver.

Same node names and inputs as the original TurboDiffusion node pack, without its bugs
(spec §9): the expert switch follows the RF time (t < boundary), not the step index; the
saver defaults to 16 fps (Wan's rate); offloading really streams weights (offloadkit), and
ComfyUI is asked to make room for them; num_frames is 4n+1 (the VAE's rule), not "8n+1";
and a non-umT5 conditioning is refused with a message instead of a matmul crash.
"""

from __future__ import annotations

from typing import Any

import torch

from turbowan.comfyui import comfy_env
from turbowan.comfyui.conditioning import conditioning_to_context
from turbowan.comfyui.images import comfy_frames_to_uint8, comfy_image_to_pil, video_to_comfy_frames
from turbowan.comfyui.lora_node import TurboWanLoraLoader, expert_loras
from turbowan.comfyui.models import TurboWanModel, TurboWanVAE, check_dit, check_vae
from turbowan.pipeline import preflight
from turbowan.pipeline.conditioning import DEFAULT_RESIZE, RESIZE_MODES
from turbowan.pipeline.resolution import ASPECT_RATIOS, RESOLUTIONS, check_frames
from turbowan.pipeline.video_io import (
    DEFAULT_FPS,
    DEFAULT_QUALITY,
    check_fps,
    check_frame_size,
    check_quality,
    write_video,
)
from turbowan.sampler.rcm import DEFAULT_BOUNDARY, DEFAULT_SIGMA_MAX, MAX_STEPS, rcm_schedule

CATEGORY = "TurboWan"
MODEL_TYPE = "TURBOWAN_MODEL"  # not ComfyUI's MODEL: stock KSampler/LoRA nodes cannot run it
VAE_TYPE = "TURBOWAN_VAE"  # not ComfyUI's VAE: it encodes the whole I2V clip inside the sampler
DEFAULT_STRATEGY = "adaptive"
DEFAULT_BUDGET = "auto"
DEFAULT_RESOLUTION = "480p"  # 832x480 at 16:9; the 14B model's 720p needs a large GPU
DEFAULT_NUM_FRAMES = 81  # upstream default (5 s at 16 fps)
ACTIVATION_RESERVE = 2 * 1024**3  # asked of ComfyUI on top of the weights (latents, attention)
VIDEO_FORMATS = ("mp4", "webm", "gif")
#: one name per size: the pipeline also accepts "480"/"720", the node lists only "480p"/"720p"
NODE_RESOLUTIONS = tuple(r for r in RESOLUTIONS if r + "p" not in RESOLUTIONS)
STRATEGY_TOOLTIP = (
    "adaptive (default): as many blocks on the GPU as the budget allows, the rest streamed "
    "ahead of use; layerwise: least GPU memory (every block streams); chunkwise: blocks "
    "stream in groups; comfy_native: ComfyUI decides how much GPU memory the model gets "
    "(it unloads its other models first and can take memory back), the rest streams; "
    "cpu_only: no GPU at all (very slow)")
OPTIONS_INPUT = {"default": "", "tooltip": 'options for the strategy as JSON, e.g. '
                 '{"resident": [0, 2]} for the manual plugin; empty for the built-ins'}
BUDGET_TOOLTIP = ("GPU memory for weights: auto (free memory less a reserve), 12GiB, 500MB "
                  "or 80%. With comfy_native it caps what ComfyUI grants")


def _strategy_choices() -> list[str]:
    import offloadkit

    return offloadkit.list_strategies()


def _default_strategy(choices: list[str]) -> str:
    return DEFAULT_STRATEGY if DEFAULT_STRATEGY in choices else choices[0]


class TurboWanModelLoader:
    """Picks one TurboWan2.2 expert (high- or low-noise) and how it is placed on the GPU."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    DESCRIPTION = ("A TurboWan2.2 I2V expert (TurboWan2.2-I2V-A14B-high/low-720P-quant.pth) from "
                   "models/diffusion_models. The file header is checked now; the weights are read "
                   "and streamed to the GPU by offloadkit when the sampler runs.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        strategies = _strategy_choices()
        return {
            "required": {
                "model_name": (comfy_env.file_choices("diffusion_models"), {
                    "tooltip": "TurboWan2.2-I2V-A14B-high-720P-quant.pth or the -low- one"}),
            },
            "optional": {
                "attention_type": (list(preflight.ATTENTION_CHOICES), {
                    "default": "sla",
                    "tooltip": "sla: sparse-linear attention the Turbo models were distilled with; "
                               "sagesla: the same with SpargeAttn kernels (if installed); "
                               "original: dense attention (ignores the SLA weights)"}),
                "sla_topk": ("FLOAT", {"default": 0.1, "min": 0.01, "max": 1.0, "step": 0.01,
                                       "tooltip": "share of key blocks SLA keeps (0.1; 0.15 is sharper)"}),
                "offload_strategy": (strategies, {
                    "default": _default_strategy(strategies), "tooltip": STRATEGY_TOOLTIP}),
                "budget": ("STRING", {"default": DEFAULT_BUDGET, "tooltip": BUDGET_TOOLTIP}),
                "strategy_options": ("STRING", OPTIONS_INPUT),
            },
        }

    def load(self, model_name: str, attention_type: str = "sla", sla_topk: float = 0.1,
             offload_strategy: str = DEFAULT_STRATEGY, budget: str = DEFAULT_BUDGET,
             strategy_options: str = "") -> tuple[TurboWanModel]:
        path = comfy_env.full_path("diffusion_models", model_name)
        model = check_dit(path, attention=attention_type, sla_topk=sla_topk,
                          strategy=offload_strategy, budget=budget.strip(),
                          device=comfy_env.compute_device(), strategy_options=strategy_options)
        return (model,)


class TurboWanVAELoader:
    """Picks the Wan2.1 VAE (Wan2.1_VAE.pth or wan_2.1_vae.safetensors) from models/vae."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (VAE_TYPE,)
    RETURN_NAMES = ("vae",)
    FUNCTION = "load"
    DESCRIPTION = ("The Wan2.1 VAE used by Wan2.2 A14B (not the 48-channel Wan2.2 VAE), from "
                   "models/vae, with its own offload strategy and budget.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        strategies = _strategy_choices()
        return {
            "required": {"vae_name": (comfy_env.file_choices("vae"), {
                "tooltip": "Wan2.1_VAE.pth or wan_2.1_vae.safetensors"})},
            "optional": {
                "offload_strategy": (strategies, {"default": _default_strategy(strategies),
                                                  "tooltip": STRATEGY_TOOLTIP}),
                "budget": ("STRING", {"default": DEFAULT_BUDGET, "tooltip": BUDGET_TOOLTIP}),
                "strategy_options": ("STRING", OPTIONS_INPUT),
            },
        }

    def load(self, vae_name: str, offload_strategy: str = DEFAULT_STRATEGY,
             budget: str = DEFAULT_BUDGET, strategy_options: str = "") -> tuple[TurboWanVAE]:
        path = comfy_env.full_path("vae", vae_name)
        return (check_vae(path, strategy=offload_strategy, budget=budget.strip(),
                          device=comfy_env.compute_device(),
                          strategy_options=strategy_options),)


def _frames_problem(num_frames: Any) -> str | None:
    try:
        check_frames(num_frames)
    except ValueError as exc:
        return (f"num_frames: {exc}. The causal VAE packs the first frame alone and then 4 frames "
                "per latent, so the count must be 4n+1 (e.g. 33, 49, 77, 81)")
    return None


class TurboDiffusionI2VSampler:
    """Start image + umT5 conditioning -> video frames, with the two TurboWan experts."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    FUNCTION = "sample"
    DESCRIPTION = ("rCM sampling in 1-4 steps: the high-noise expert while t >= boundary, then the "
                   "low-noise one; one expert on the GPU at a time. Returns the decoded frames.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "high_noise_model": (MODEL_TYPE,),
                "low_noise_model": (MODEL_TYPE,),
                "conditioning": ("CONDITIONING", {
                    "tooltip": "CLIPTextEncode output of a CLIPLoader with type 'wan' (umT5-xxl)"}),
                "vae": (VAE_TYPE,),
                "image": ("IMAGE", {"tooltip": "start frame (the first image of a batch)"}),
                "num_frames": ("INT", {"default": DEFAULT_NUM_FRAMES, "min": 1, "max": 241, "step": 4,
                                       "tooltip": "4n+1 frames (81 = 5 s at 16 fps)"}),
                "num_steps": ("INT", {"default": MAX_STEPS, "min": 1, "max": MAX_STEPS,
                                      "tooltip": "rCM steps; 1-2 never reach the low-noise expert"}),
                "resolution": (list(NODE_RESOLUTIONS), {"default": DEFAULT_RESOLUTION}),
                "aspect_ratio": (list(ASPECT_RATIOS), {"default": "16:9", "tooltip": "width:height"}),
                "boundary": ("FLOAT", {"default": DEFAULT_BOUNDARY, "min": 0.0, "max": 1.0, "step": 0.01,
                                       "tooltip": "switch to the low-noise expert once the RF time "
                                                  "t < boundary (4 steps: high, high, low, low)"}),
                "sigma_max": ("FLOAT", {"default": DEFAULT_SIGMA_MAX, "min": 1.0, "max": 1000.0, "step": 1.0}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**63 - 1}),
                "use_ode": ("BOOLEAN", {"default": False,
                                        "tooltip": "deterministic ODE steps instead of SDE re-noising"}),
            },
            "optional": {
                "width": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 16,
                                  "tooltip": "0: use resolution/aspect_ratio; else a multiple of 16"}),
                "height": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 16,
                                   "tooltip": "0: use resolution/aspect_ratio; else a multiple of 16"}),
                "resize": (list(RESIZE_MODES), {"default": DEFAULT_RESIZE,
                                                "tooltip": "crop: centre-crop to the aspect, no "
                                                           "distortion; stretch: as upstream"}),
            },
        }

    def sample(self, high_noise_model: TurboWanModel, low_noise_model: TurboWanModel,
               conditioning: Any, vae: TurboWanVAE, image: torch.Tensor, num_frames: int,
               num_steps: int, resolution: str, aspect_ratio: str, boundary: float,
               sigma_max: float, seed: int, use_ode: bool, width: int = 0, height: int = 0,
               resize: str = DEFAULT_RESIZE) -> tuple[torch.Tensor]:
        plan = _check_sampler_inputs(high_noise_model, low_noise_model, conditioning, vae, image,
                                     num_frames, num_steps, resolution, aspect_ratio, boundary,
                                     sigma_max, seed, use_ode, width, height, resize)
        video = _run(plan)
        return (video_to_comfy_frames(video),)


def _check_sampler_inputs(high, low, conditioning, vae, image, num_frames, num_steps, resolution,
                          aspect_ratio, boundary, sigma_max, seed, use_ode, width, height,
                          resize) -> dict[str, Any]:
    """Every input checked before anything loads; all problems reported together."""
    c = preflight.new_collector()
    for name, value, kind in (("high_noise_model", high, TurboWanModel),
                              ("low_noise_model", low, TurboWanModel), ("vae", vae, TurboWanVAE)):
        if not isinstance(value, kind):
            loader = "TurboWanVAELoader" if kind is TurboWanVAE else "TurboWanModelLoader"
            c.add(f"{name} must come from {loader}, got {type(value).__name__}")
    frames_problem = _frames_problem(num_frames)
    if frames_problem:
        c.add(frames_problem)
    custom = bool(width) or bool(height)
    run = preflight.check_run_settings(
        frames=num_frames if frames_problem is None else 1, resolution_key=resolution,
        aspect_ratio=aspect_ratio, width=width if custom else None,
        height=height if custom else None, steps=num_steps, sigma_max=sigma_max,
        boundary=boundary, seed=seed, ode=bool(use_ode), resize=resize, collector=c,
    )
    context = None
    needs_low = False
    if isinstance(high, TurboWanModel):
        context = c.check(lambda: conditioning_to_context(conditioning, high.text_dim))
        schedule = c.check(lambda: rcm_schedule(num_steps, float(sigma_max), float(boundary)))
        needs_low = schedule is not None and "low" in schedule.experts
        if needs_low and isinstance(low, TurboWanModel):
            if low.placement() != high.placement():
                c.add("the two TurboWanModelLoader nodes differ in attention_type/sla_topk/"
                      f"offload_strategy/budget (high {high.placement()}, low {low.placement()}); "
                      "set them the same on both loaders")
            if low.text_dim != high.text_dim:
                c.add(f"the experts do not match: text width {high.text_dim} (high) vs "
                      f"{low.text_dim} (low); load the high and low files of one model")
            if low.path == high.path:
                c.add(f"high_noise_model and low_noise_model are the same file ({high.path.name}); "
                      "load the -low- checkpoint in the second loader")
    pil = c.check(lambda: comfy_image_to_pil(image))
    try:
        c.raise_if_any()
    except preflight.PreflightError as exc:
        raise ValueError(f"TurboDiffusionI2VSampler: {exc}") from None
    return {"high": high, "low": low if needs_low else None, "vae": vae, "context": context,
            "image": pil, "run": run}


def _run(plan: dict[str, Any]) -> torch.Tensor:
    """VAE encode -> dual-expert rCM -> VAE decode, with I2VPipeline's own stages."""
    from turbowan.pipeline.i2v import I2VPipeline
    from turbowan.pipeline.settings import RunSettings

    high: TurboWanModel = plan["high"]
    low: TurboWanModel | None = plan["low"]
    vae: TurboWanVAE = plan["vae"]
    run = plan["run"]
    device = comfy_env.compute_device()
    # ComfyUI brings the text conditioning: the pipeline places the experts and the VAE only
    pipe = I2VPipeline(RunSettings(
        high=high.path, low=low.path if low is not None else None, vae=vae.path,
        strategy=high.strategy, strategy_options=high.options(), budget=high.budget,
        device=device, attention=high.attention, sla_topk=high.sla_topk,
        vae_strategy=vae.strategy, vae_budget=vae.budget, vae_strategy_options=vae.options(),
        frames=run.frames, width=run.width, height=run.height, resize=run.resize,
        steps=run.steps, sigma_max=run.sigma_max, boundary=run.boundary, seed=run.seed,
        ode=run.ode, loras=tuple(expert_loras(high, low)),
    ), roles=("high", "low", "vae"))
    pipe.interrupt_check = comfy_env.raise_if_interrupted  # Cancel: within one block or stage
    if "comfy_native" not in (high.strategy, vae.strategy):  # comfy_native asks for itself
        largest = max(high.nbytes, low.nbytes if low is not None else 0, vae.nbytes)
        comfy_env.free_device_memory(largest + ACTIVATION_RESERVE, device)
    bar = comfy_env.progress_bar(run.steps)

    def on_step(info) -> None:
        if bar is not None:
            bar.update_absolute(info.step + 1, info.steps)

    try:
        y = pipe.encode_image(plan["image"], run.frames, run.width, run.height, run.resize)
        latents = pipe.sample(y, plan["context"], steps=run.steps, sigma_max=run.sigma_max,
                              boundary=run.boundary, seed=run.seed, ode=run.ode, callback=on_step)
        return pipe.decode(latents)
    finally:
        comfy_env.empty_cache()


class TurboDiffusionSaveVideo:
    """Writes frames as mp4/webm/gif into ComfyUI's output folder (atomically)."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    DESCRIPTION = ("Saves the frames as a video in ComfyUI's output folder. 16 fps is Wan's native "
                   "rate; 24 fps plays 1.5x too fast.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "frames": ("IMAGE",),
                "filename_prefix": ("STRING", {"default": "turbowan"}),
                "fps": ("INT", {"default": DEFAULT_FPS, "min": 1, "max": 120,
                                "tooltip": "Wan models are trained at 16 fps"}),
                "format": (list(VIDEO_FORMATS), {"default": "mp4"}),
            },
            "optional": {
                "quality": ("INT", {"default": DEFAULT_QUALITY, "min": 1, "max": 10,
                                    "tooltip": "1 smallest file .. 10 near lossless (mp4/webm)"}),
            },
        }

    def save(self, frames: torch.Tensor, filename_prefix: str = "turbowan", fps: int = DEFAULT_FPS,
             format: str = "mp4", quality: int = DEFAULT_QUALITY) -> dict[str, Any]:
        if format not in VIDEO_FORMATS:
            raise ValueError(f"TurboDiffusionSaveVideo: unknown format {format!r}; choose "
                             f"{', '.join(VIDEO_FORMATS)}")
        try:
            check_fps(fps)
            check_quality(quality)
            pixels = comfy_frames_to_uint8(frames)
            height, width = pixels.shape[1:3]
            check_frame_size(format, width, height)  # before save_path takes a file number
        except ValueError as exc:
            raise ValueError(f"TurboDiffusionSaveVideo: {exc}") from None
        folder, stem, counter, subfolder = comfy_env.save_path(filename_prefix, width, height)
        name = f"{stem}_{counter:05}_.{format}"
        write_video(pixels, folder / name, fps=fps, quality=quality)
        return {"ui": {"images": [{"filename": name, "subfolder": subfolder, "type": "output"}],
                       "animated": (True,)}}


NODE_CLASS_MAPPINGS = {
    "TurboWanModelLoader": TurboWanModelLoader,
    "TurboWanLoraLoader": TurboWanLoraLoader,
    "TurboWanVAELoader": TurboWanVAELoader,
    "TurboDiffusionI2VSampler": TurboDiffusionI2VSampler,
    "TurboDiffusionSaveVideo": TurboDiffusionSaveVideo,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "TurboWanModelLoader": "TurboWan Model Loader",
    "TurboWanLoraLoader": "TurboWan LoRA Loader",
    "TurboWanVAELoader": "TurboWan VAE Loader",
    "TurboDiffusionI2VSampler": "TurboDiffusion I2V Sampler",
    "TurboDiffusionSaveVideo": "TurboDiffusion Save Video",
}
