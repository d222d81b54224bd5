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

Models are loaded when `generate` runs, not in the constructor: the constructor checks the
run's :class:`~turbowan.pipeline.settings.RunSettings` (see :mod:`turbowan.pipeline.preflight`),
every problem in one round, so a bad argument costs no loading time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from turbowan.finite import ensure_finite
from turbowan.pipeline import preflight
from turbowan.pipeline.cancel import checked
from turbowan.pipeline.checks import check_image
from turbowan.pipeline.conditioning import build_clip, build_y, image_to_tensor, resize_image
from turbowan.pipeline.experts import ExpertRunner
from turbowan.pipeline.placement import placed, release_device_cache, vae_blocks
from turbowan.pipeline.preflight import CheckedRun, PipelineFacts, Problems
from turbowan.pipeline.rescue import failure_text, rescue_latents
from turbowan.pipeline.results import (  # noqa: F401  (re-exported: the pipeline's public names)
    DecodeFailedError,
    DecodeInterrupted,
    GenerationResult,
    run_record,
    save_latents_file,
)
from turbowan.pipeline.settings import (  # noqa: F401  (re-exported)
    DEFAULT_FRAMES,
    DEFAULT_VAE_OVERLAP,
    DEFAULT_VAE_TILE,
    ROLES,
    ModelFiles,
    RunSettings,
    check_names,
    field_names,
    settings_from,
)
from turbowan.pipeline.timings import Stage, Timings
from turbowan.pipeline.video_io import write_video
from turbowan.sampler.rcm import StepInfo, rcm_sample, rcm_schedule


def _setting(name: str) -> property:
    return property(lambda self: getattr(self.settings, name), doc=f"``settings.{name}``")


class I2VPipeline:
    """TurboWan2.2 I2V from a :class:`RunSettings`, or with :meth:`from_files` (real
    checkpoints) or :meth:`demo` (the embedded tiny models), which build one.

    The constructor checks every setting it is given (run settings too: frames, size, output...)
    and raises one ``PreflightError`` listing every problem; it loads nothing. ``roles`` are the
    checkpoints the pipeline cannot do without; ``whole_run=True`` says the settings describe the
    whole run (the CLI), so a missing start image is reported now, with the rest.
    """

    strategy = _setting("strategy")
    budget = _setting("budget")
    attention = _setting("attention")
    home = _setting("home")
    is_demo = _setting("is_demo")

    def __init__(self, settings: RunSettings | None = None, *,
                 roles: tuple[str, ...] = preflight.PIPELINE_ROLES, whole_run: bool = False,
                 demo_dir: str | os.PathLike[str] | None = None,
                 facts: PipelineFacts | None = None) -> None:
        """``facts``: the result of :func:`preflight.check_pipeline` for these settings, from a
        caller that ran the checks itself (with problems of its own); nothing is checked again."""
        settings = settings if settings is not None else RunSettings()
        run = None
        if facts is None:
            problems = Problems()
            facts = preflight.check_pipeline(settings, roles=roles, collector=problems)
            run = preflight.check_run(settings, complete=whole_run, collector=problems)
            problems.raise_if_any()
        assert facts is not None
        self.settings = settings
        self.facts: PipelineFacts = facts
        self.loras = list(facts.loras)  # LoraSpec list, attached whenever an expert loads
        # a run checked complete is not checked again by generate() without changes
        self._run: CheckedRun | None = run if whole_run or settings.is_demo else None
        self._vae: Any = None
        #: a host's Cancel (ComfyUI): raises to stop; see turbowan.pipeline.cancel
        self.interrupt_check: Callable[[], None] | None = None
        #: a turbowan.distributed.ParallelContext in a multi-process run (set by the launcher)
        self.parallel: Any = None
        self._demo_dir: Path | None = None
        self._demo_written = False
        self._cleanup: Any = None
        if settings.is_demo:
            from turbowan.pipeline.demo import demo_files

            owned = demo_dir is None
            self._demo_dir = Path(tempfile.mkdtemp(prefix="turbowan-demo-")) if owned else Path(demo_dir)
            if owned:
                self._cleanup = weakref.finalize(self, shutil.rmtree, self._demo_dir, True)
            d = demo_files(self._demo_dir)
            self.files = ModelFiles(high=d.high, low=d.low, vae=d.vae, text_encoder=d.text_encoder,
                                    tokenizer="demo")
        else:
            def path(p: Any) -> Path | None:
                return Path(p) if p is not None else None

            self.files = ModelFiles(high=path(settings.high), low=path(settings.low),
                                    vae=path(settings.vae), text_encoder=path(settings.text_encoder),
                                    tokenizer=settings.tokenizer)

    def close(self) -> None:
        """Drop the loaded VAE and the demo's temporary checkpoints (also done when the
        pipeline is garbage-collected)."""
        self._vae = None
        if self._cleanup is not None:
            self._cleanup()

    @property
    def device(self) -> torch.device:
        return self.facts.device

    @property
    def dtype(self) -> torch.dtype:
        return self.facts.dtype

    @property
    def sla_topk(self) -> float:
        return self.facts.sla_topk

    @property
    def strategy_options(self) -> dict[str, Any]:
        return dict(self.settings.strategy_options)

    @property
    def descriptions(self) -> dict[str, str]:
        return dict(self.facts.descriptions)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_files(cls, *, high: str | os.PathLike[str], low: str | os.PathLike[str] | None,
                   vae: str | os.PathLike[str], text_encoder: str | os.PathLike[str],
                   **settings: Any) -> I2VPipeline:
        """Check every file (header only) and every other setting; load nothing. ``low`` may
        be None only for runs of 1-2 steps (which never use it).

        ``settings`` are :class:`RunSettings` fields (``tokenizer``, ``strategy``, ``budget``,
        ``device``, ``dtype``, ``attention``, ``sla_topk``, ``home`` ("host", "pinned" or
        "disk": a temporary file instead of host RAM), ``vae_tiling``..., and run fields such
        as ``frames`` or ``output`` that become this pipeline's defaults); any other keyword
        is an option of the offload strategy."""
        return cls(settings_from(settings, high=high, low=low, vae=vae, text_encoder=text_encoder,
                                 demo=False))

    @classmethod
    def demo(cls, *, directory: str | os.PathLike[str] | None = None, **settings: Any) -> I2VPipeline:
        """The embedded demo: tiny models with deterministic random weights (noise video).

        ``settings`` as for :meth:`from_files`, without checkpoints. The demo checkpoints are
        written to ``directory`` (default: a temporary directory removed with the pipeline)
        when the first run starts, after its inputs are checked, and then loaded like real ones.
        """
        s = settings_from(settings, demo=True)
        if any(getattr(s, role) is not None for role in ROLES):
            raise TypeError("demo() takes no checkpoint paths; use I2VPipeline.from_files")
        return cls(s, demo_dir=directory)

    def _ensure_demo_files(self) -> None:
        if self.is_demo and not self._demo_written:
            from turbowan.pipeline.demo import write_demo_checkpoints

            write_demo_checkpoints(self._demo_dir)
            self._demo_written = True

    @contextmanager
    def _placed(self, model: torch.nn.Module, stage: Stage | None, *, restore: bool = True,
                own: tuple[str | None, Any, Any] = (None, None, None),
                **extra: Any) -> Iterator[Any]:
        """``own``: (strategy, budget, options) of a model placed by its own settings (the
        VAE); None parts fall back to the pipeline's."""
        strategy = own[0] or self.strategy
        options = own[2] if own[2] is not None else (
            self.settings.strategy_options if strategy == self.strategy else {})
        if self.interrupt_check is not None:
            options = {**options, "interrupt_check": self.interrupt_check}
        with placed(model, strategy, device=self.device,
                    budget=self.budget if own[1] is None else own[1], options=options,
                    stage=stage, restore=restore, **extra) as handle, \
                checked(model, self.interrupt_check):
            yield handle

    def _vae_placement(self) -> tuple[str | None, Any, Any]:
        s = self.settings
        return s.vae_strategy, s.vae_budget, s.vae_strategy_options

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
                release_device_cache(self.device)
        return context

    def _get_vae(self):
        if self._vae is None:
            from turbowan.pipeline.demo import write_demo_vae
            from turbowan.vae.loading import load_vae

            if self.is_demo and not self._demo_written:  # `turbowan decode` needs the VAE only
                write_demo_vae(self._demo_dir)
            self._vae = load_vae(self.files.vae, device="cpu", dtype=self.dtype)
        return self._vae

    def encode_image(self, image: Any, frames: int, width: int, height: int, resize: str,
                     timings: Timings | None = None) -> torch.Tensor:
        """y = [mask | VAE latents of the F-frame clip [image, grey...]], (1, 20, T, H/8, W/8)."""
        timings = timings or Timings()
        pil = check_image(image)
        with timings.stage("VAE encode") as stage:
            vae = self._get_vae()
            pixels = image_to_tensor(resize_image(pil, width, height, resize))
            clip = build_clip(pixels, frames)
            with self._placed(vae, stage, blocks=vae_blocks(vae), own=self._vae_placement()):
                vae.compute_device = self.device
                try:
                    latents = vae.encode(clip)
                finally:
                    vae.compute_device = None
            release_device_cache(self.device)
        return build_y(latents.to("cpu", torch.float32))

    def decode(self, latents: torch.Tensor, timings: Timings | None = None) -> torch.Tensor:
        """Latents (1, 16, T, h, w) -> video (1, 3, 4T-3, 8h, 8w) float32 on the CPU."""
        timings = timings or Timings()
        with timings.stage("VAE decode") as stage:
            vae = self._get_vae()
            with self._placed(vae, stage, blocks=vae_blocks(vae), own=self._vae_placement()):
                vae.compute_device = self.device
                try:
                    if self.parallel is not None and self.parallel.vae_parallel:
                        from turbowan.distributed.vae import decode_tiles_parallel

                        video = decode_tiles_parallel(vae, latents, tile=self.settings.vae_tile,
                                                      overlap=self.settings.vae_overlap,
                                                      parallel=self.parallel)
                    else:
                        video = vae.decode(latents, output_device="cpu",
                                           tiled=self.settings.vae_tiling,
                                           tile=self.settings.vae_tile,
                                           overlap=self.settings.vae_overlap)
                finally:
                    vae.compute_device = None
            release_device_cache(self.device)
        return video

    def _load_expert(self, path: Path):
        from turbowan.dit.loading import load_dit

        self._ensure_demo_files()
        model = load_dit(path, attention=self.attention, sla_topk=self.sla_topk, device="cpu",
                         dtype=self.dtype)
        if self.loras:  # before offloadkit stages it: the LoRA tensors stream with their blocks
            from turbowan.lora.check import attach_for_expert

            attach_for_expert(model, self.loras, "high" if path == self.files.high else "low")
        if self.parallel is not None:
            from turbowan.distributed import enable_sequence_parallel

            enable_sequence_parallel(model, self.parallel.sp)
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
        self.settings = self.settings.replace(loras=tuple(self.loras))

    def _load_expert_checked(self, path: Path, check: Callable[[], None] | None):
        """:meth:`_load_expert` with a cancel point before and after the read."""
        if check is not None:
            check()
        model = self._load_expert(path)
        if check is not None:
            check()
        return model

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
        finished: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Dual-expert rCM sampling with one expert on the device at a time."""
        timings = timings or Timings()
        schedule = rcm_schedule(steps, sigma_max, boundary)
        needs_low = "low" in schedule.experts
        if needs_low and self.files.low is None:
            raise ValueError(f"{steps} steps reach the low-noise expert; pass --low (the -low- checkpoint)")
        runner = ExpertRunner(self, timings, stage_low=needs_low)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        try:
            latents = rcm_sample(
                runner.expert("high"), runner.expert("low") if needs_low else None,
                y=y.to(self.device), context=context.to(self.device), steps=steps,
                sigma_max=sigma_max, boundary=boundary, ode=ode, generator=generator,
                net_dtype=self.dtype, timestep_dtype=torch.bfloat16, callback=callback,
            ).cpu()
            if finished is not None:  # at once: a Ctrl-C from here on finds them kept
                finished["latents"] = latents
        except BaseException:
            runner.close(wait=False)  # Ctrl-C must not wait for the staging read to finish
            raise
        runner.close()
        return latents

    # ------------------------------------------------------------------ the whole run
    def generate(self, image: Any = None, prompt: str | None = None, *,
                 callback: Callable[[StepInfo], None] | None = None, decode: bool = True,
                 timings: Timings | None = None, **run: Any) -> GenerationResult:
        """Generate one clip. ``run`` are the run fields of :class:`RunSettings` (``frames``,
        ``resolution``, ``aspect_ratio``, ``width``, ``height``, ``resize``, ``steps``,
        ``sigma_max``, ``boundary``, ``seed``, ``ode``, ``output``, ``fps``, ``quality``,
        ``save_latents``), over this pipeline's own. With ``output`` the video is written there
        (atomically); if decoding fails the latents are saved as ``<output>.latents.safetensors``.

        ``callback`` gets a :class:`StepInfo` after every sampling step; ``timings`` (e.g.
        ``Timings(on_start=print)``) collects the stages and can announce each one."""
        settings, checked = self._check_run(image, prompt, run)
        clip = checked.clip
        timings = timings if timings is not None else Timings()
        self._ensure_demo_files()
        from turbowan.distributed.pipeline import from_leader  # the identity in one process

        context = from_leader(self.parallel, lambda: self.encode_prompt(checked.prompt, timings))
        y = from_leader(self.parallel, lambda: self.encode_image(
            checked.image, clip.frames, clip.width, clip.height, clip.resize, timings))
        record = run_record(settings, self.facts, checked, vae=self.files.vae)
        out_path = Path(settings.output) if settings.output is not None else None
        rescue_here = out_path is not None and (self.parallel is None or self.parallel.is_leader)
        finished: dict[str, torch.Tensor] = {}
        result: GenerationResult | None = None
        try:
            # one protected stretch from the moment the latents exist (closing the expert
            # runner, the bookkeeping, decode, writing): an interrupt anywhere in it keeps them
            latents = self.sample(y, context, steps=clip.steps, sigma_max=clip.sigma_max,
                                  boundary=clip.boundary, seed=clip.seed, ode=clip.ode,
                                  callback=callback, timings=timings, finished=finished)
            result = GenerationResult(latents=latents, settings=record, timings=timings)
            if self.parallel is not None and not self.parallel.is_leader:
                if decode and self.parallel.vae_parallel:
                    self.decode(latents, timings)  # this rank's tiles, sent to the leader
                return result  # the group's leader writes
            if out_path is not None and settings.save_latents:
                result.latents_path = save_latents_file(out_path, latents, record)
            ensure_finite(latents, "sampling")  # kept (below) for inspection
            if not decode:
                return result
            result.video = self.decode(latents, timings)
            ensure_finite(result.video, "VAE decode")
            if out_path is not None:
                with timings.stage("write video"):
                    result.output = write_video(result.frames, out_path, fps=settings.fps,
                                                quality=settings.quality)
        except BaseException as exc:
            latents = finished.get("latents")
            if latents is None or not rescue_here or isinstance(exc, GeneratorExit):
                raise
            saved = result.latents_path if result is not None else None
            rescued, how = rescue_latents(out_path, latents, record, saved)
            if isinstance(exc, KeyboardInterrupt):
                raise DecodeInterrupted(f"interrupted after sampling; {how}", rescued) from exc
            raise DecodeFailedError(f"sampling finished but {failure_text(exc, timings)}; {how}",
                                    rescued) from exc
        return result

    __call__ = generate

    def check_inputs(self, image: Any = None, prompt: str | None = None, **run: Any) -> dict[str, Any]:
        """Validate and resolve a run's settings (defaults filled in) without running it.

        Takes the run keywords of :meth:`generate`; raises ``PreflightError`` listing every
        problem. Loads nothing.
        """
        settings, checked = self._check_run(image, prompt, run)
        return run_record(settings, self.facts, checked, vae=self.files.vae)

    def _check_run(self, image: Any, prompt: str | None, run: dict[str, Any]
                   ) -> tuple[RunSettings, CheckedRun]:
        """This pipeline's settings with ``run`` over them, checked (once: a run checked
        complete at construction is not checked again)."""
        changes = {**run, **{k: v for k, v in (("image", image), ("prompt", prompt)) if v is not None}}
        check_names(changes, field_names("run"), where="generate()")
        if not changes and self._run is not None:
            return self.settings, self._run
        settings = self.settings.replace(**changes)
        checked = preflight.check_run(settings)
        if checked is None:  # pragma: no cover - check_run raises when it has no collector
            raise AssertionError("check_run returned no run")
        return settings, checked
