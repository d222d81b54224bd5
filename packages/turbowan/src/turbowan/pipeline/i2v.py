"""`I2VPipeline`: start image + prompt -> video, every model placed by offloadkit.

Order of a run, chosen so the device never holds two large models at once:
1. text encoder: loaded, placed, run, released (handle removed, model dropped) before the DiT;
2. VAE encode of the whole [image, grey...] clip; the VAE's placement is released after;
3. dual-expert rCM sampling: the high-noise expert is placed and samples its steps while a
   background thread reads the low-noise expert and stages it with ``offloadkit.stage``
   (packed into the home tier: pinned host buffers on CUDA, or the disk tier); at the switch
   the high expert is removed and the staged low expert placed, so the switch waits neither
   on the checkpoint nor on packing, only on the device copies;
4. VAE decode. If decoding fails (out of memory, Ctrl-C) the latents are saved next to the
   output and the error says how to finish with `turbowan decode`.

Models are loaded when `generate` runs, not in the constructor: every input is checked
first (see :mod:`turbowan.pipeline.preflight`), so a bad argument costs no loading time.
"""

from __future__ import annotations

import gc
import inspect
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from turbowan.dtypes import parse_float_dtype
from turbowan.lora import check as lora_check
from turbowan.pipeline import preflight
from turbowan.pipeline.conditioning import (
    DEFAULT_RESIZE,
    build_clip,
    build_y,
    image_to_tensor,
    resize_image,
)
from turbowan.pipeline.latents_io import latents_path_for, save_latents
from turbowan.pipeline.timings import Stage, Timings
from turbowan.pipeline.video_io import DEFAULT_FPS, DEFAULT_QUALITY, to_uint8_frames, write_video
from turbowan.sampler.rcm import (
    DEFAULT_BOUNDARY,
    DEFAULT_SIGMA_MAX,
    StepInfo,
    rcm_sample,
    rcm_schedule,
)

DEFAULT_FRAMES = 81  # upstream default
HOME_CHOICES = ("host", "pinned", "disk")  # offloadkit home tiers for the DiT experts
#: tiled VAE decode: 256-pixel tiles with 64-pixel seams cut a 720p frame (1280x720) into
#: 7x4 tiles, so the decoder's activations are those of a 256x256 clip
DEFAULT_VAE_TILE = 256
DEFAULT_VAE_OVERLAP = 64


class DecodeFailedError(RuntimeError):
    """Sampling finished but decoding or writing failed; the latents were saved."""

    def __init__(self, message: str, latents_path: Path | None) -> None:
        super().__init__(message)
        self.latents_path = latents_path


class DecodeInterrupted(KeyboardInterrupt):
    """Ctrl-C during decoding; the latents were saved (still a KeyboardInterrupt)."""

    def __init__(self, message: str, latents_path: Path | None) -> None:
        super().__init__(message)
        self.latents_path = latents_path


@dataclass(frozen=True)
class ModelFiles:
    """Checkpoint paths of one pipeline (tokenizer: path, "demo", a tokenizer, or None)."""

    high: Path
    low: Path | None
    vae: Path
    text_encoder: Path
    tokenizer: Any = None


@dataclass
class GenerationResult:
    """What a run produced: float32 latents, the decoded video and where the time went."""

    latents: torch.Tensor
    video: torch.Tensor | None = None  # (1, 3, F, H, W) float32 in about [-1, 1]
    settings: dict[str, Any] = field(default_factory=dict)
    timings: Timings = field(default_factory=Timings)
    output: Path | None = None
    latents_path: Path | None = None

    @property
    def frames(self) -> np.ndarray | None:
        """uint8 (F, H, W, 3), what a video file stores."""
        return None if self.video is None else to_uint8_frames(self.video)

    def save(self, path: str | os.PathLike[str], *, fps: float = DEFAULT_FPS,
             quality: int = DEFAULT_QUALITY) -> Path:
        if self.video is None:
            raise ValueError("this result has no decoded video (decode=False); use turbowan decode")
        return write_video(self.frames, path, fps=fps, quality=quality)


def default_dtype(device: torch.device | None) -> torch.dtype:
    """The compute dtype of a run that names none (also the ComfyUI sampler's)."""
    # bf16 is what the models were trained and distilled in, and what GPUs run fast;
    # on the CPU float32 is faster and exact, which the offload-equality tests rely on.
    # None: the device was refused (the preflight reports why); any answer will do.
    return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32


def _parse_dtype(dtype: torch.dtype | str | None, device: torch.device | None) -> torch.dtype:
    return parse_float_dtype(dtype, what="the pipeline") or default_dtype(device)


def _check_pipeline_settings(
    c: Any, *, strategy: str, budget: Any, device: Any, dtype: Any, attention: str,
    sla_topk: float, home: str, vae_tiling: bool, vae_tile: int, vae_overlap: int,
    strategy_options: dict[str, Any],
    placed_models: Callable[[torch.dtype], dict[str, preflight.PlacedModel]],
) -> tuple[torch.device, torch.dtype]:
    """The settings every pipeline checks (real or demo), collected into ``c``; raises
    ``PreflightError`` listing every problem, the caller's own ones included.

    ``placed_models(dtype)`` builds, on ``meta``, the models the run will place, so a budget
    below the strategy's minimum is refused here rather than after the text encoder loads."""
    known_before = len(c.problems)  # the caller's own (files, tokenizer) do not stop the budget check
    dev = preflight.check_placement(strategy, budget, device, collector=c)
    preflight.check_attention(attention, sla_topk, collector=c)
    preflight.check_home(home, collector=c)
    preflight.check_vae_tiling(vae_tiling, vae_tile, vae_overlap, collector=c)
    torch_dtype = c.check(lambda: _parse_dtype(dtype, dev))
    if len(c.problems) == known_before:  # the meta models need valid settings (dtype, home...)
        models = c.check(lambda: placed_models(torch_dtype))
        if models is not None:
            preflight.check_budget_fits(models, strategy=strategy, budget=budget, device=dev,
                                        strategy_options=strategy_options, collector=c)
    c.raise_if_any()
    return dev, torch_dtype


class I2VPipeline:
    """TurboWan2.2 I2V: build with :meth:`from_files` (real checkpoints) or :meth:`demo`."""

    def __init__(
        self,
        files: ModelFiles,
        *,
        strategy: str = "adaptive",
        budget: int | str | None = "auto",
        device: torch.device,
        dtype: torch.dtype,
        attention: str = "sla",
        sla_topk: float = 0.1,
        strategy_options: dict[str, Any] | None = None,
        is_demo: bool = False,
        descriptions: dict[str, str] | None = None,
        home: str = "host",
        vae_tiling: bool = False,
        vae_tile: int = DEFAULT_VAE_TILE,
        vae_overlap: int = DEFAULT_VAE_OVERLAP,
        loras: Any = (),
    ) -> None:
        from turbowan.lora.check import coerce_loras

        self.files = files
        self.loras = coerce_loras(loras)  # LoraSpec list, attached whenever an expert loads
        self.strategy = strategy
        self.budget = budget
        self.device = device
        self.dtype = dtype
        self.attention = attention
        self.sla_topk = sla_topk
        self.strategy_options = dict(strategy_options or {})
        self.is_demo = is_demo
        self.descriptions = dict(descriptions or {})
        self.home = home
        self.vae_tiling = vae_tiling
        self.vae_tile = vae_tile
        self.vae_overlap = vae_overlap
        self._vae: Any = None
        self._demo_dir: Path | None = None
        self._demo_written = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_files(
        cls,
        *,
        high: str | os.PathLike[str],
        low: str | os.PathLike[str] | None,
        vae: str | os.PathLike[str],
        text_encoder: str | os.PathLike[str],
        tokenizer: Any = None,
        strategy: str = "adaptive",
        budget: int | str | None = "auto",
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        attention: str = "sla",
        sla_topk: float = 0.1,
        home: str = "host",
        vae_tiling: bool = False,
        vae_tile: int = DEFAULT_VAE_TILE,
        vae_overlap: int = DEFAULT_VAE_OVERLAP,
        loras: Any = None,
        **strategy_options: Any,
    ) -> I2VPipeline:
        """Check every file (header only), the placement and the attention settings; load
        nothing. ``loras``: LoRA files for the experts, each a path, ``"FILE:STRENGTH"``,
        ``(path, strength[, expert])`` or a :class:`turbowan.lora.LoraSpec`. ``low`` may be None only for runs of 1-2 steps (which never use it).

        ``home`` is the offloadkit home tier of the DiT experts ("host", "pinned" or "disk":
        disk keeps the streamed weights in a temporary file instead of host RAM);
        ``vae_tiling`` decodes in overlapping spatial tiles of ``vae_tile`` pixels."""
        c = preflight.new_collector()
        for role, path in (("high", high), ("vae", vae), ("text_encoder", text_encoder)):
            if path is None:
                c.add(f"{preflight.FLAG[role]} is required with real checkpoints: pass "
                      f"{preflight.MODEL_ROLES[role][1]} (or give no paths at all for the demo)")
        paths = {"high": high, "low": low, "vae": vae, "text_encoder": text_encoder}
        descriptions, specs = preflight.inspect_model_files(paths, collector=c, tokenizer=tokenizer)
        preflight.check_tokenizer(tokenizer, collector=c)
        lora_list, checked = _check_loras(loras, c, lambda: lora_check.meta_experts(specs))
        dev, torch_dtype = _check_pipeline_settings(
            c, strategy=strategy, budget=budget, device=device, dtype=dtype, attention=attention,
            sla_topk=sla_topk, home=home, vae_tiling=vae_tiling, vae_tile=vae_tile,
            vae_overlap=vae_overlap, strategy_options=strategy_options,
            placed_models=lambda run_dtype: lora_check.with_meta_loras(
                preflight.placed_models_from_specs(
                    specs, dtype=run_dtype, attention=attention, sla_topk=sla_topk, home=home),
                checked))
        files = ModelFiles(
            high=Path(high), low=Path(low) if low is not None else None, vae=Path(vae),
            text_encoder=Path(text_encoder), tokenizer=tokenizer,
        )
        return cls(files, strategy=strategy, budget=budget, device=dev, dtype=torch_dtype,
                   attention=attention, sla_topk=sla_topk, strategy_options=strategy_options,
                   descriptions=descriptions, home=home, vae_tiling=vae_tiling,
                   vae_tile=vae_tile, vae_overlap=vae_overlap, loras=lora_list)

    @classmethod
    def demo(
        cls,
        *,
        strategy: str = "adaptive",
        budget: int | str | None = "auto",
        device: str | torch.device | None = "cpu",
        dtype: torch.dtype | str | None = None,
        attention: str = "sla",
        sla_topk: float | None = None,
        directory: str | os.PathLike[str] | None = None,
        home: str = "host",
        vae_tiling: bool = False,
        vae_tile: int = DEFAULT_VAE_TILE,
        vae_overlap: int = DEFAULT_VAE_OVERLAP,
        loras: Any = None,
        **strategy_options: Any,
    ) -> I2VPipeline:
        """The embedded demo: tiny models with deterministic random weights (noise video).

        The demo checkpoints are written to ``directory`` (default: a temporary directory
        removed with the pipeline) when the first run starts, after its inputs are checked,
        and then loaded like real ones.
        """
        from turbowan.pipeline import demo as demo_mod

        c = preflight.new_collector()
        topk = demo_mod.DEMO_SLA_TOPK if sla_topk is None else sla_topk
        lora_list, checked = _check_loras(loras, c, lora_check.demo_meta_experts)
        dev, torch_dtype = _check_pipeline_settings(
            c, strategy=strategy, budget=budget, device=device, dtype=dtype, attention=attention,
            sla_topk=topk, home=home, vae_tiling=vae_tiling, vae_tile=vae_tile,
            vae_overlap=vae_overlap, strategy_options=strategy_options,
            placed_models=lambda run_dtype: lora_check.with_meta_loras(
                preflight.demo_placed_models(
                    dtype=run_dtype, attention=attention, sla_topk=topk, home=home), checked))
        owned = directory is None
        where = Path(tempfile.mkdtemp(prefix="turbowan-demo-")) if owned else Path(directory)
        files = demo_mod.demo_files(where)
        pipe = cls(
            ModelFiles(high=files.high, low=files.low, vae=files.vae,
                       text_encoder=files.text_encoder, tokenizer="demo"),
            strategy=strategy, budget=budget, device=dev, dtype=torch_dtype, attention=attention,
            sla_topk=topk, strategy_options=strategy_options, is_demo=True, home=home,
            vae_tiling=vae_tiling, vae_tile=vae_tile, vae_overlap=vae_overlap, loras=lora_list,
        )
        pipe._demo_dir = where
        if owned:
            weakref.finalize(pipe, shutil.rmtree, where, True)
        return pipe

    def _ensure_demo_files(self) -> None:
        if self.is_demo and not self._demo_written:
            from turbowan.pipeline.demo import write_demo_checkpoints

            write_demo_checkpoints(self._demo_dir)
            self._demo_written = True

    # ------------------------------------------------------------------ placement
    @contextmanager
    def _placed(self, model: torch.nn.Module, stage: Stage | None, *, restore: bool = True,
                **extra: Any):
        """Place ``model`` with offloadkit for the duration of the block; record its peak.
        ``restore=False`` for a model dropped after the block (no copy of its weights back)."""
        import offloadkit

        handle = offloadkit.apply(
            model, self.strategy, device=self.device, budget=self.budget,
            **{**self.strategy_options, **extra},
        )
        try:
            yield handle
        finally:
            _remove_recording_peak(handle, stage, restore=restore)

    def _release_device_cache(self) -> None:
        # between models only, never inside a model's run; on the CPU dropping the last
        # reference already frees the memory, and a full gc pass costs more than it saves
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ stages
    def _load_text_encoder(self):
        from turbowan.text_encoder.loading import load_text_encoder

        self._ensure_demo_files()
        return load_text_encoder(self.files.text_encoder, self.files.tokenizer, device="cpu",
                                 dtype=self.dtype)

    def encode_prompt(self, prompt: str, timings: Timings | None = None) -> torch.Tensor:
        """(1, 512, D) text states; the encoder is released before this returns."""
        timings = timings or Timings()
        with timings.stage("text encoder") as stage:
            encoder = self._load_text_encoder()
            try:
                with self._placed(encoder, stage, restore=False, blocks=encoder.blocks):
                    context = encoder.encode([prompt]).to("cpu", torch.float32)
            finally:
                del encoder
                self._release_device_cache()
        return context

    def _get_vae(self):
        if self._vae is None:
            from turbowan.vae.loading import load_vae

            self._ensure_demo_files()
            self._vae = load_vae(self.files.vae, device="cpu", dtype=self.dtype)
        return self._vae

    def _vae_blocks(self, vae: torch.nn.Module) -> list[torch.nn.Module]:
        # the encoder and the decoder are the two streamable blocks; the small 1x1x1 convs
        # around them stay on the device while the VAE is placed
        return [vae.encoder, vae.decoder]

    def encode_image(self, image: Any, frames: int, width: int, height: int, resize: str,
                     timings: Timings | None = None) -> torch.Tensor:
        """y = [mask | VAE latents of the F-frame clip [image, grey...]], (1, 20, T, H/8, W/8)."""
        timings = timings or Timings()
        pil = preflight.check_image(image)
        with timings.stage("VAE encode") as stage:
            vae = self._get_vae()
            pixels = image_to_tensor(resize_image(pil, width, height, resize))
            clip = build_clip(pixels, frames)
            with self._placed(vae, stage, blocks=self._vae_blocks(vae)):
                vae.compute_device = self.device
                try:
                    latents = vae.encode(clip)
                finally:
                    vae.compute_device = None
            self._release_device_cache()
        return build_y(latents.to("cpu", torch.float32))

    def decode(self, latents: torch.Tensor, timings: Timings | None = None) -> torch.Tensor:
        """Latents (1, 16, T, h, w) -> video (1, 3, 4T-3, 8h, 8w) float32 on the CPU."""
        timings = timings or Timings()
        with timings.stage("VAE decode") as stage:
            vae = self._get_vae()
            with self._placed(vae, stage, blocks=self._vae_blocks(vae)):
                vae.compute_device = self.device
                try:
                    video = vae.decode(latents, output_device="cpu", tiled=self.vae_tiling,
                                       tile=self.vae_tile, overlap=self.vae_overlap)
                finally:
                    vae.compute_device = None
            self._release_device_cache()
        return video

    def _load_expert(self, path: Path):
        from turbowan.dit.loading import load_dit

        self._ensure_demo_files()
        model = load_dit(path, attention=self.attention, sla_topk=self.sla_topk, device="cpu",
                         dtype=self.dtype)
        if self.loras:  # before offloadkit stages it: the LoRA tensors stream with their blocks
            lora_check.attach_for_expert(model, self.loras, "high" if path == self.files.high
                                         else "low")
        return model

    def set_lora_strength(self, name: str, strength: float, *, expert: str | None = None) -> None:
        """Change the strength of a LoRA (by file stem, or path) for the next run; ``expert``
        ("high"/"low") limits it to the LoRAs given for that expert."""
        from turbowan.lora import LoraError, LoraSpec

        hits = [i for i, s in enumerate(self.loras) if name in (s.name, str(s.path))
                and (expert is None or s.expert == expert)]
        if not hits:
            have = ", ".join(f"{s.name} ({s.expert})" for s in self.loras) or "none"
            raise LoraError(f"no LoRA named {name!r} in this pipeline (LoRAs: {have})")
        for i in hits:
            s = self.loras[i]
            self.loras[i] = LoraSpec(s.path, strength, s.expert, s.name)

    def sample(
        self,
        y: torch.Tensor,
        context: torch.Tensor,
        *,
        steps: int,
        sigma_max: float,
        boundary: float,
        seed: int,
        ode: bool,
        callback: Callable[[StepInfo], None] | None = None,
        timings: Timings | None = None,
    ) -> torch.Tensor:
        """Dual-expert rCM sampling with one expert on the device at a time."""
        timings = timings or Timings()
        schedule = rcm_schedule(steps, sigma_max, boundary)
        needs_low = "low" in schedule.experts
        if needs_low and self.files.low is None:
            raise ValueError(f"{steps} steps reach the low-noise expert; pass --low (the -low- checkpoint)")
        runner = _ExpertRunner(self, timings, stage_low=needs_low)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        try:
            latents = rcm_sample(
                runner.expert("high"), runner.expert("low") if needs_low else None,
                y=y.to(self.device), context=context.to(self.device), steps=steps,
                sigma_max=sigma_max, boundary=boundary, ode=ode, generator=generator,
                net_dtype=self.dtype, timestep_dtype=torch.bfloat16, callback=callback,
            ).cpu()
        except BaseException:
            runner.close(wait=False)  # Ctrl-C must not wait for the staging read to finish
            raise
        runner.close()
        return latents

    # ------------------------------------------------------------------ the whole run
    def generate(
        self,
        image: Any = None,
        prompt: str | None = None,
        *,
        frames: int | None = None,
        resolution: str | None = None,
        aspect_ratio: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int = 4,
        sigma_max: float = DEFAULT_SIGMA_MAX,
        boundary: float = DEFAULT_BOUNDARY,
        seed: int = 0,
        ode: bool = False,
        resize: str = DEFAULT_RESIZE,
        callback: Callable[[StepInfo], None] | None = None,
        output: str | os.PathLike[str] | None = None,
        fps: float = DEFAULT_FPS,
        quality: int = DEFAULT_QUALITY,
        save_latents: bool = False,
        decode: bool = True,
        timings: Timings | None = None,
    ) -> GenerationResult:
        """Generate one clip. With ``output`` the video is written there (atomically); if
        decoding fails the latents are saved as ``<output>.latents.safetensors``.

        ``callback`` gets a :class:`StepInfo` after every sampling step; ``timings`` (e.g.
        ``Timings(on_start=print)``) collects the stages and can announce each one."""
        if save_latents and output is None:
            raise preflight.PreflightError(
                ["save_latents=True needs output= (the latents go next to the video)"])
        settings, pil = self._check_inputs(
            image, prompt, frames, resolution, aspect_ratio, width, height, steps, sigma_max,
            boundary, seed, ode, resize, output, fps, quality,
        )
        timings = timings if timings is not None else Timings()
        self._ensure_demo_files()
        context = self.encode_prompt(settings["prompt"], timings)
        y = self.encode_image(pil, settings["frames"], settings["width"], settings["height"],
                              settings["resize"], timings)
        latents = self.sample(
            y, context, steps=steps, sigma_max=float(sigma_max), boundary=float(boundary),
            seed=seed, ode=ode, callback=callback, timings=timings,
        )
        result = GenerationResult(latents=latents, settings=settings, timings=timings)
        out_path = Path(output) if output is not None else None
        if out_path is not None and save_latents:
            result.latents_path = save_latents_file(out_path, latents, settings)
        if not decode:
            return result
        try:
            result.video = self.decode(latents, timings)
            if out_path is not None:
                with timings.stage("write video"):
                    result.output = write_video(result.frames, out_path, fps=fps, quality=quality)
        except BaseException as exc:
            if out_path is None or isinstance(exc, GeneratorExit):
                raise
            rescued = result.latents_path or save_latents_file(out_path, latents, settings)
            how = (f"the sampled latents are saved in {rescued}; finish with:\n"
                   f"  turbowan decode {rescued} -o {out_path}")
            if isinstance(exc, KeyboardInterrupt):
                raise DecodeInterrupted(f"interrupted while decoding; {how}", rescued) from exc
            raise DecodeFailedError(
                f"sampling finished but decoding failed ({type(exc).__name__}: {exc}); {how}"
                + ("  --budget <smaller> or --offload layerwise uses less device memory"
                   if isinstance(exc, torch.OutOfMemoryError) else ""),
                rescued,
            ) from exc
        return result

    __call__ = generate

    def check_inputs(self, image: Any = None, prompt: str | None = None, **options: Any) -> dict[str, Any]:
        """Validate and resolve a run's settings (defaults filled in) without running it.

        Takes the keyword arguments of :meth:`generate`; raises ``PreflightError`` listing
        every problem. Loads nothing.
        """
        names = ("frames", "resolution", "aspect_ratio", "width", "height", "steps", "sigma_max",
                 "boundary", "seed", "ode", "resize", "output", "fps", "quality")
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; generate() takes {', '.join(names)}")
        # generate()'s own defaults, so the two cannot drift apart
        params = inspect.signature(self.generate).parameters
        merged = {**{n: params[n].default for n in names}, **options}
        settings, _ = self._check_inputs(image, prompt, **merged)
        return settings

    def _check_inputs(self, image, prompt, frames, resolution, aspect_ratio, width, height,
                        steps, sigma_max, boundary, seed, ode, resize, output, fps, quality):
        from turbowan.pipeline import demo as demo_mod

        if self.is_demo:
            if image is None:
                image = demo_mod.demo_image()
            if prompt is None:
                prompt = demo_mod.DEMO_PROMPT
            if frames is None:
                frames = demo_mod.DEMO_FRAMES
            if width is None and height is None and resolution is None and aspect_ratio is None:
                width, height = demo_mod.DEMO_WIDTH, demo_mod.DEMO_HEIGHT
        c = preflight.new_collector()
        if image is None:
            c.add("no start image: pass --image PATH (PNG/JPEG), or give no model paths to run the demo")
        if prompt is None:
            prompt = ""
        if not isinstance(prompt, str):
            c.add(f"prompt must be a string, got {type(prompt).__name__}")
        run = preflight.check_run_settings(
            frames=DEFAULT_FRAMES if frames is None else frames, resolution_key=resolution,
            aspect_ratio=aspect_ratio, width=width, height=height, steps=steps,
            sigma_max=sigma_max, boundary=boundary, seed=seed, ode=ode, resize=resize, collector=c,
        )
        if "low" in _experts_or_empty(steps, sigma_max, boundary) and self.files.low is None:
            c.add(f"{steps} steps reach the low-noise expert (t < {boundary}); pass --low, or use "
                  "--steps 2 (the high expert only)")
        preflight.check_output(output, fps=fps, quality=quality, collector=c)
        pil = preflight.check_image(image, collector=c) if image is not None else None
        c.raise_if_any()
        assert run is not None and pil is not None
        settings = {
            "prompt": prompt, "frames": run.frames, "width": run.width, "height": run.height,
            "steps": run.steps, "sigma_max": run.sigma_max, "boundary": run.boundary,
            "seed": run.seed, "ode": run.ode, "resize": run.resize, "fps": fps,
            "quality": quality, "demo": self.is_demo,
            "image": str(image) if isinstance(image, (str, os.PathLike)) else ("built-in" if self.is_demo else "in-memory"),
            "vae": "demo" if self.is_demo else str(self.files.vae),
            "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device),
            "strategy": self.strategy, "attention": self.attention, "sla_topk": self.sla_topk,
            "home": self.home, "vae_tiling": self.vae_tiling, "vae_tile": self.vae_tile,
            "vae_overlap": self.vae_overlap,
            "loras": [f"{s.path}:{s.strength:g} ({s.expert})" for s in self.loras],
            "output": str(output) if output is not None else None,
        }
        return settings, pil


def _check_loras(loras: Any, c: Any, experts: Callable[[], dict[str, torch.nn.Module]]
                 ) -> tuple[list[Any], dict[str, list[Any]]]:
    """The run's LoRAs, each checked from its header against the experts it changes."""
    lora_list = c.check(lambda: lora_check.coerce_loras(loras)) or []
    if not lora_list:
        return lora_list, {}
    models = c.check(experts)
    return lora_list, ({} if models is None else lora_check.check_loras(lora_list, models, c))


def _remove_recording_peak(handle: Any, stage: Stage | None, *, restore: bool) -> None:
    """Remove an offloadkit placement; its peak device bytes go to ``stage`` (the larger
    of what the stage already holds and this placement's peak)."""
    try:
        if stage is not None:
            stage.peak_device_bytes = max(stage.peak_device_bytes or 0,
                                          handle.stats().peak_device_bytes)
    finally:
        handle.remove(restore=restore)


def _experts_or_empty(steps: Any, sigma_max: Any, boundary: Any) -> tuple[str, ...]:
    try:
        return rcm_schedule(steps, float(sigma_max), float(boundary)).experts
    except (TypeError, ValueError):
        return ()


def save_latents_file(output: Path, latents: torch.Tensor, settings: dict[str, Any]) -> Path:
    return save_latents(latents_path_for(output), latents, settings)


class _ExpertRunner:
    """Hands the sampler one callable per expert; places each on first use, releases the
    previous one, and stages the low expert (read and packed by ``offloadkit.stage``) in a
    background thread while the high one samples."""

    def __init__(self, pipe: I2VPipeline, timings: Timings, *, stage_low: bool) -> None:
        self.pipe = pipe
        self.timings = timings
        self.active: str | None = None
        self.model: torch.nn.Module | None = None
        self.handle: Any = None
        self.stage: Stage | None = None
        self._stage_cm: Any = None
        self._staged: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._cancelled = False
        self._thread: threading.Thread | None = None
        if stage_low:
            self._thread = threading.Thread(target=self._stage_low, name="turbowan-stage-low", daemon=True)

    def _offload_kwargs(self) -> dict[str, Any]:
        pipe = self.pipe
        return dict(device=pipe.device, budget=pipe.budget, blocks="blocks", home=pipe.home,
                    **pipe.strategy_options)

    def _stage_low(self) -> None:
        """Background thread: read the low expert and pack it into the home tier now, so the
        switch only has to place it."""
        import offloadkit

        try:
            model = self.pipe._load_expert(self.pipe.files.low)
            staged = offloadkit.stage(model, self.pipe.strategy, **self._offload_kwargs())
        except BaseException as exc:  # re-raised in the sampling thread at the switch
            self._staged["error"] = exc
            return
        with self._lock:
            if self._cancelled:  # the run ended first: give the memory (or temp file) back
                staged.discard(restore=False)
            else:
                self._staged["staged"] = staged

    def expert(self, name: str) -> Callable[..., torch.Tensor]:
        def run(x, t, context, y):
            if self.active != name:
                self._activate(name)
            return self.model(x, t, context, y)

        return run

    def _activate(self, name: str) -> None:
        self._deactivate()
        import offloadkit

        self._stage_cm = self.timings.stage(f"sampling ({name} expert)")
        self.stage = self._stage_cm.__enter__()
        home = self.pipe.home
        if name == "high":
            start = time.perf_counter()
            model = self.pipe._load_expert(self.pipe.files.high)
            loaded = time.perf_counter() - start
            if self._thread is not None:
                self._thread.start()  # stage the low expert while the high one samples
            self.handle = offloadkit.apply(model, self.pipe.strategy, **self._offload_kwargs())
            stats = self.handle.stats()
            self.stage.note = (f"loaded in {loaded:.2f} s, packed ({home}) in "
                               f"{stats.stage_seconds:.2f} s, placed in {stats.place_seconds:.2f} s")
        else:
            model, self.handle = self._place_staged_low()
        self.model = model
        self.active = name

    def _place_staged_low(self) -> tuple[torch.nn.Module, Any]:
        """At the switch: wait for the staging thread (measured), then place its result."""
        import offloadkit

        assert self.stage is not None
        switch_at = time.perf_counter()
        if self._thread is not None:
            if self._thread.ident is not None:  # started by the high expert's first step
                self._thread.join()
            self._thread = None  # boundary 1: no high step, so the low expert is staged here
        waited = time.perf_counter() - switch_at
        if "error" in self._staged:
            raise self._staged.pop("error")
        staged = self._staged.pop("staged", None)
        background = staged is not None
        if staged is None:  # not staged ahead (no thread): stage now, on this thread
            model = self.pipe._load_expert(self.pipe.files.low)
            staged = offloadkit.stage(model, self.pipe.strategy, **self._offload_kwargs())
        start = time.perf_counter()
        handle = staged.place()
        placed = time.perf_counter() - start
        self.stage.switch = {
            "staged_by": staged.staged_by, "staged_at": staged.staged_at,
            "switch_at": switch_at, "waited_seconds": waited,
            "stage_seconds": staged.stage_seconds, "place_seconds": placed,
        }
        where = ("staged in the background while the high expert sampled" if background
                 else "staged at the switch")
        self.stage.note = (f"{where} (packed ({self.pipe.home}) in {staged.stage_seconds:.2f} s); "
                           f"waited {waited:.2f} s at the switch, placed in {placed:.2f} s")
        return staged.model, handle

    def _deactivate(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            _remove_recording_peak(handle, self.stage, restore=False)  # dropped: no copy back
        self.model = None
        self.active = None
        if self._stage_cm is not None:
            cm, self._stage_cm = self._stage_cm, None
            cm.__exit__(None, None, None)
            self.pipe._release_device_cache()

    def close(self, wait: bool = True) -> None:
        """Release the placed expert and any staged one; ``wait=False`` leaves a staging
        thread running (a daemon; it discards its result when it finishes)."""
        self._deactivate()
        if wait and self._thread is not None and self._thread.is_alive():
            self._thread.join()
        with self._lock:
            self._cancelled = True
            staged = self._staged.pop("staged", None)
        if staged is not None:
            staged.discard(restore=False)
        self._staged.clear()
