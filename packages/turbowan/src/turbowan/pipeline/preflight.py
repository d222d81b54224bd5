"""Every check that can fail, done before any model is loaded or any step is sampled.

A 14B run spends minutes loading and sampling; a typo in the frame count or a wrong file must
not be discovered at the end. All problems found are reported together, each with its fix.
Checkpoints are checked from their headers (shapes and dtypes), never loaded here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from turbowan.limits import reported
from turbowan.pipeline import resolution, video_io
from turbowan.pipeline.conditioning import check_resize_mode, open_image

# role -> (preset family expected, presets a file of that role may match, what to pass)
MODEL_ROLES: dict[str, tuple[str, str]] = {
    "high": ("dit", "TurboWan2.2-I2V-A14B-high-720P(-quant).pth"),
    "low": ("dit", "TurboWan2.2-I2V-A14B-low-720P(-quant).pth"),
    "vae": ("vae", "Wan2.1_VAE.pth (or wan_2.1_vae.safetensors)"),
    "text_encoder": ("text_encoder", "models_t5_umt5-xxl-enc-bf16.pth (or a umt5_xxl *.safetensors)"),
}
FLAG = {"high": "--high", "low": "--low", "vae": "--vae", "text_encoder": "--text-encoder"}
ATTENTION_CHOICES = ("sla", "original", "sagesla")


class PreflightError(ValueError):
    """One or more inputs are wrong; the message lists each problem and its fix."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        if len(problems) == 1:
            text = problems[0]
        else:
            text = f"{len(problems)} problems found before starting:\n" + "\n".join(f"  - {p}" for p in problems)
        super().__init__(text)


@dataclass(frozen=True)
class RunSettings:
    """The validated sampling settings of one generation."""

    frames: int
    width: int
    height: int
    steps: int
    sigma_max: float
    boundary: float
    seed: int
    ode: bool
    resize: str


class _Collector:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def check(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (ValueError, TypeError, KeyError, OSError) as exc:
            message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            self.problems.append(message)
            return None

    def add(self, problem: str) -> None:
        self.problems.append(problem)

    def raise_if_any(self) -> None:
        if self.problems:
            raise PreflightError(self.problems)


@contextmanager
def _collecting(collector: _Collector | None) -> Iterator[_Collector]:
    """The checks in the block add to ``collector``; with none, to a fresh one that raises
    :class:`PreflightError` (every problem of the block) when the block ends."""
    c = collector if collector is not None else _Collector()
    yield c
    if collector is None:
        c.raise_if_any()


def check_run_settings(
    *,
    frames: int,
    resolution_key: str | None,
    aspect_ratio: str | None,
    width: int | None,
    height: int | None,
    steps: int,
    sigma_max: float,
    boundary: float,
    seed: int,
    ode: bool,
    resize: str,
    collector: _Collector | None = None,
) -> RunSettings | None:
    """Frame count, output size, schedule parameters and resize mode."""
    from turbowan.sampler.rcm import rcm_schedule

    with _collecting(collector) as c:
        c.check(lambda: resolution.check_frames(frames))
        size = c.check(lambda: resolution.resolve_size(resolution_key, aspect_ratio, width, height))
        c.check(lambda: rcm_schedule(steps, float(sigma_max), float(boundary)))
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            c.add(f"seed must be a non-negative integer below 2**63, got {seed!r}")
        c.check(lambda: check_resize_mode(resize))
    if size is None or c.problems:
        return None
    return RunSettings(frames, size[0], size[1], steps, float(sigma_max), float(boundary), seed, bool(ode), resize)


def check_output(output: str | os.PathLike[str] | None, *, fps: float, quality: int,
                 collector: _Collector | None = None) -> None:
    with _collecting(collector) as c:
        if output is not None:
            c.check(lambda: video_io.check_output_path(output))
        c.check(lambda: video_io.check_fps(fps))
        c.check(lambda: video_io.check_quality(quality))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> cuda if present, else cpu. offloadkit places every model, so it decides which
    devices work; its refusal (no CUDA, a missing cuda:N, mps) becomes a preflight problem."""
    from offloadkit.api import resolve_device as placement_device
    from offloadkit.errors import DeviceUnavailableError

    try:
        return placement_device(device)
    except DeviceUnavailableError as exc:
        raise ValueError(f"--device {device}: {exc}") from None


def check_placement(strategy: str, budget: Any, device: str | torch.device | None,
                    collector: _Collector | None = None) -> torch.device | None:
    """The offload strategy exists (built-in or plugin) and the budget parses for the device."""
    import offloadkit

    with _collecting(collector) as c:
        dev = c.check(lambda: resolve_device(device))
        c.check(lambda: offloadkit.get_strategy(strategy))
        if dev is not None:
            c.check(lambda: offloadkit.parse_budget(budget, str(dev)))
    return dev


def check_attention(attention: str, sla_topk: float, collector: _Collector | None = None) -> None:
    with _collecting(collector) as c:
        if attention not in ATTENTION_CHOICES:
            c.add(f"unknown attention {attention!r}; choose one of {', '.join(ATTENTION_CHOICES)} (default sla)")
        if not (isinstance(sla_topk, (int, float)) and 0 < sla_topk <= 1 and math.isfinite(sla_topk)):
            c.add(f"sla_topk is the kept share of key blocks, in (0, 1] (default 0.1), got {sla_topk!r}")


def check_home(home: str, collector: _Collector | None = None) -> None:
    """The offloadkit home tier for the DiT experts."""
    from offloadkit.strategy import HOME_TIERS

    with _collecting(collector) as c:
        if home not in HOME_TIERS:
            c.add(f"unknown home tier {home!r} for the experts; choose one of {', '.join(HOME_TIERS)} "
                  "(host: RAM; pinned: page-locked RAM, fastest uploads; disk: a temporary file, "
                  "least RAM)")


def check_vae_tiling(tiled: bool, tile: int, overlap: int,
                     collector: _Collector | None = None) -> None:
    """Tile and overlap of a tiled VAE decode: multiples of 8 pixels, overlap < tile."""
    from turbowan.vae.tiling import _check_tiling

    with _collecting(collector) as c:
        if tiled:
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (tile, overlap)):
                c.add(f"VAE tile and overlap must be whole pixels, got {tile!r} and {overlap!r}")
            else:
                try:
                    _check_tiling(tile, overlap)
                except ValueError as exc:
                    c.add(f"VAE tiling: {exc} (--vae-tile/--vae-overlap)")


# where the text-encoder loader looks for a tokenizer when none is given
TOKENIZER_BESIDE = ("spiece.model", "tokenizer.json", "google/umt5-xxl/spiece.model",
                    "google/umt5-xxl/tokenizer.json")
EMBEDDED_TOKENIZER_SUFFIX = "spiece_model"


def _check_tokenizer_found(p: Path, specs: dict[str, Any]) -> None:
    """No --tokenizer: the text encoder must embed one or have one next to it."""
    if any(k.rpartition(".")[2] == EMBEDDED_TOKENIZER_SUFFIX for k in specs):
        return
    if any((p.parent / name).is_file() for name in TOKENIZER_BESIDE):
        return
    raise ValueError(
        f"no tokenizer for the text encoder {str(p)!r}: it embeds none and there is no "
        "spiece.model or tokenizer.json next to it; pass --tokenizer PATH (the umT5 tokenizer, "
        "e.g. spiece.model or tokenizer.json from google/umt5-xxl)"
    )


def check_model_file(role: str, path: str | os.PathLike[str], *, tokenizer: Any = "given") -> str:
    """Header check of one checkpoint against the family its role needs; returns a summary.

    For the text encoder with ``tokenizer=None`` it also checks that a tokenizer will be found."""
    return inspect_model_file(role, path, tokenizer=tokenizer)[0]


def inspect_model_file(role: str, path: str | os.PathLike[str], *, tokenizer: Any = "given"
                       ) -> tuple[str, dict[str, Any]]:
    """:func:`check_model_file`, also returning the header it read (key -> TensorSpec), so
    a caller that needs more from the header does not read the file again."""
    family, expected = MODEL_ROLES[role]
    flag = FLAG[role]
    p = Path(path)
    if not p.is_file():
        where = "is a directory" if p.is_dir() else "does not exist"
        raise ValueError(f"{flag} {str(p)!r} {where}; pass the path of {expected}")
    from turbowan.checkpoint.io import read_tensor_specs

    try:
        specs = read_tensor_specs(p)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from exc
    summary, report = _family_summary(family, specs, p, flag)
    if report is not None and not report.ok:
        raise ValueError(
            f"{flag} {str(p)!r} does not match the model it claims to be "
            f"(`turbowan check {p}` prints the full comparison):\n{report.format(limit=6)}"
        )
    if role == "text_encoder" and tokenizer is None:
        _check_tokenizer_found(p, specs)
    return summary, specs


def _compare_with_preset(family_module: str, preset: str, specs: dict[str, Any], source: str,
                         **options: str):
    """Key/shape/dtype comparison with one known preset (header data only)."""
    import importlib

    from turbowan.checkpoint.report import compare_specs, module_specs

    module = importlib.import_module(family_module)
    expected = module_specs(module.build_manifest_model(preset, **options))
    return compare_specs(expected, specs, source=source, expected_label=f"preset {preset}")


def _family_summary(family: str, specs: dict[str, Any], p: Path, flag: str) -> tuple[str, Any]:
    """The file is of the family its role needs (a DiT, the Wan2.1 VAE, a umT5 encoder), and
    every key/shape/dtype matches the model of that family it describes."""
    try:
        if family == "dit":
            from turbowan.checkpoint.report import check_specs
            from turbowan.dit.config import config_from_state_dict
            from turbowan.dit.keys import normalize_dit_keys

            layout = config_from_state_dict(normalize_dit_keys(specs)[0])
            if layout.config.in_dim != 36:
                raise ValueError(
                    f"this DiT takes {layout.config.in_dim} input channels; the I2V experts take 36 "
                    "(noise 16 + mask 4 + image latents 16): a T2V or TI2V checkpoint will not work"
                )
            return layout.describe(), check_specs(specs, source=str(p))
        if family == "vae":
            from turbowan.vae.config import PRESETS as VAE_PRESETS
            from turbowan.vae.config import config_from_state_dict as vae_config
            from turbowan.vae.loading import strip_prefix

            cfg = vae_config(specs)
            preset = next((n for n, c in VAE_PRESETS.items() if c == cfg), None)
            report = None
            if preset is not None:  # another width is checked key by key when it loads
                report = _compare_with_preset("turbowan.vae.config", preset, strip_prefix(specs), str(p))
            return f"Wan2.1 VAE (dim {cfg.dim})", report
        from turbowan.text_encoder.config import PRESETS as TE_PRESETS
        from turbowan.text_encoder.config import config_from_state_dict as te_config
        from turbowan.text_encoder.naming import to_wan_names

        all_shapes = {k: v.shape for k, v in specs.items()}
        renamed, naming = to_wan_names(all_shapes, all_shapes, source=str(p))
        cfg = te_config(renamed, source=str(p))
        preset = next((n for n, c in TE_PRESETS.items() if c == cfg), None)
        report = None
        if preset is not None:
            fp8 = "scaled" if any(k.endswith("scale_weight") for k in specs) else "none"
            report = _compare_with_preset(
                "turbowan.text_encoder.config", preset, specs, str(p), naming=naming, fp8=fp8,
            )
        return f"umT5 encoder (dim {cfg.dim}, {cfg.num_layers} layers, {naming} names)", report
    except ValueError as exc:
        raise ValueError(f"{flag} {str(p)!r}: {exc}") from exc


def check_model_files(paths: dict[str, str | os.PathLike[str] | None],
                      collector: _Collector | None = None, *, tokenizer: Any = "given"
                      ) -> dict[str, str]:
    """Check every given checkpoint; returns role -> one-line description. Pass the
    ``tokenizer`` argument of the run to also check that one will be found."""
    return inspect_model_files(paths, collector, tokenizer=tokenizer)[0]


def inspect_model_files(paths: dict[str, str | os.PathLike[str] | None],
                        collector: _Collector | None = None, *, tokenizer: Any = "given"
                        ) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """:func:`check_model_files`, also returning role -> header (key -> TensorSpec) of each
    file that passed, for the budget check (:func:`placed_models_from_specs`)."""
    with _collecting(collector) as c:
        found: dict[str, str] = {}
        headers: dict[str, dict[str, Any]] = {}
        for role, path in paths.items():
            if path is None:
                continue
            checked = c.check(lambda role=role, path=path: inspect_model_file(role, path, tokenizer=tokenizer))
            if checked is not None:
                found[role], headers[role] = checked
    return found, headers


def check_image(image: Any, collector: _Collector | None = None) -> Any:
    with _collecting(collector) as c:
        img = c.check(lambda: open_image(image))
    return img


def check_tokenizer(tokenizer: Any, collector: _Collector | None = None) -> None:
    """A tokenizer path must exist and be a umT5 tokenizer (pad 0, EOS 1); it is small, so
    it is opened here. None (found next to the text encoder) and "demo" pass through."""
    if tokenizer is None or tokenizer == "demo" or not isinstance(tokenizer, (str, os.PathLike)):
        return
    p = Path(tokenizer)
    with _collecting(collector) as c:
        if not p.exists():
            c.add(
                f"--tokenizer {str(p)!r} does not exist; pass the umT5 tokenizer (spiece.model, "
                "tokenizer.json or a folder holding one, e.g. from google/umt5-xxl) or leave it "
                "out to use the one stored with the text encoder"
            )
        else:
            from turbowan.text_encoder.tokenizer import UMT5Tokenizer

            def load() -> None:
                try:
                    UMT5Tokenizer.from_file(p)
                except (ValueError, OSError) as exc:
                    raise ValueError(f"--tokenizer: {exc}") from exc

            c.check(load)


new_collector = _Collector


# ---------------------------------------------------------------------- budget vs. strategy
#: what a budget problem calls each model the pipeline places
MODEL_LABELS = {"text_encoder": "text encoder", "vae": "VAE", "high": "high-noise expert",
                "low": "low-noise expert"}


@dataclass(frozen=True)
class PlacedModel:
    """A model as the pipeline will place it, built on ``meta`` (no weights): what offloadkit
    needs to state the least budget a strategy can run it in."""

    model: torch.nn.Module
    blocks: Any  # offloadkit's ``blocks=`` argument, the same the pipeline passes
    home: str = "host"


def _cast_floats(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Float tensors to the compute dtype (what the loaders assign); int8/fp8 stay as they are."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point() and tensor.dtype.itemsize > 1:
            tensor.data = tensor.data.to(dtype)
    return model


def meta_dit(config: Any, *, quant: str, attention: str, sla_topk: float, dtype: torch.dtype,
             home: str = "host") -> PlacedModel:
    """The expert as ``load_dit`` builds it (same constructor arguments, so fp32 norms and
    int8 weights keep their dtypes), placed with ``blocks="blocks"`` like the pipeline does."""
    from turbowan.dit.model import WanDiT

    with torch.device("meta"):
        model = WanDiT(config, quant=quant, attention=attention, sla_topk=sla_topk, dtype=dtype)
    return PlacedModel(model, "blocks", home)


def meta_vae(config: Any, *, dtype: torch.dtype) -> PlacedModel:
    """The VAE as ``load_vae`` leaves it (every tensor cast to the compute dtype); the
    encoder and decoder are its streamed blocks, as in ``I2VPipeline._vae_blocks``."""
    from turbowan.vae.model import WanVAE

    with torch.device("meta"):
        model = _cast_floats(WanVAE(config), dtype)
    return PlacedModel(model, [model.encoder, model.decoder])


def meta_text_encoder(config: Any, *, dtype: torch.dtype) -> PlacedModel:
    """The umT5 encoder as ``load_text_encoder`` leaves it (fp8 dequantised, all floats in
    the compute dtype), streamed by its ``blocks`` like the pipeline places it."""
    from turbowan.text_encoder.loading import TextEncoder
    from turbowan.text_encoder.model import UMT5Encoder

    with torch.device("meta"):
        model = TextEncoder(UMT5Encoder(config, dtype=dtype), None)
    return PlacedModel(model, model.blocks)


@reported("building the models on meta from their checkpoint headers")
def placed_models_from_specs(specs: dict[str, dict[str, Any]], *, dtype: torch.dtype,
                             attention: str, sla_topk: float, home: str) -> dict[str, PlacedModel]:
    """role -> meta model, configured from the headers :func:`inspect_model_file` read (no
    second read of any file). Roles missing from ``specs`` (not given, or already reported
    as bad) are left out."""
    out: dict[str, PlacedModel] = {}
    for role, role_specs in specs.items():
        family = MODEL_ROLES[role][0]
        if family == "dit":
            from turbowan.dit.config import config_from_state_dict
            from turbowan.dit.keys import normalize_dit_keys

            layout = config_from_state_dict(normalize_dit_keys(role_specs)[0])
            out[role] = meta_dit(layout.config, quant=layout.quant, attention=attention,
                                 sla_topk=sla_topk, dtype=dtype, home=home)
        elif family == "vae":
            from turbowan.vae.config import config_from_state_dict as vae_config
            from turbowan.vae.loading import strip_prefix

            out[role] = meta_vae(vae_config(strip_prefix(role_specs)), dtype=dtype)
        else:
            from turbowan.text_encoder.config import config_from_state_dict as te_config
            from turbowan.text_encoder.naming import to_wan_names

            shapes = {k: v.shape for k, v in role_specs.items()}
            renamed, _ = to_wan_names(shapes, shapes, source=role)
            out[role] = meta_text_encoder(te_config(renamed, source=role), dtype=dtype)
    return out


def _budget_bytes_for_check(budget: Any, device: torch.device) -> int:
    """The budget as bytes. ``"auto"`` is read at placement from the memory free then (the
    text encoder, released by then, may hold some now), so it is checked against the most
    it can ever be: the device's total less the activation reserve, as ``offloadkit.stage``
    does. Sizes and percentages of the total do not change, so they are resolved now."""
    from offloadkit.budget import auto_reserve_bytes, parse_budget
    from offloadkit.probe import probe

    if budget is None or (isinstance(budget, str) and budget.strip().lower() == "auto"):
        total = probe(device).total_bytes
        return max(0, total - auto_reserve_bytes(total))
    return parse_budget(budget, str(device))


def check_budget_fits(models: dict[str, PlacedModel], *, strategy: str, budget: Any,
                      device: torch.device, strategy_options: dict[str, Any] | None = None,
                      collector: _Collector | None = None) -> None:
    """The budget holds the least the strategy needs for every model it will place.

    offloadkit refuses a too-small budget too, but only when a model is placed, after the
    text encoder (or a 14B expert) has been read; this asks the same question of ``meta``
    models before anything loads."""
    import offloadkit
    from offloadkit.engine.options import ENGINE_OPTIONS
    from offloadkit.engine.profile import profile_model, with_device_memory
    from offloadkit.strategy import describe_bytes

    with _collecting(collector) as c:
        options = {k: v for k, v in (strategy_options or {}).items() if k not in ENGINE_OPTIONS}

        def make_strategy() -> Any:
            return offloadkit.get_strategy(strategy)(**options)

        chosen = c.check(make_strategy)
        if chosen is None or not getattr(chosen, "uses_budget", True):
            return  # cpu_only places nothing on the device: any budget will do
        budget_bytes = c.check(lambda: _budget_bytes_for_check(budget, device))
        if budget_bytes is None:
            return
        layerwise = offloadkit.get_strategy("layerwise")()
        short: dict[int, list[str]] = {}  # need -> labels of the models that need it
        layerwise_need = 0
        for role, placed in models.items():
            profile = with_device_memory(
                profile_model(placed.model, placed.blocks, device=device, home=placed.home), device)
            need = chosen.min_device_bytes(profile)
            layerwise_need = max(layerwise_need, layerwise.min_device_bytes(profile))
            if budget_bytes < need:
                short.setdefault(need, []).append(MODEL_LABELS.get(role, role))
        if short:
            most = max(short)
            what = "; ".join(f"the {' and the '.join(labels)} {'needs' if len(labels) == 1 else 'each need'} "
                             f"{describe_bytes(need)}" for need, labels in short.items())
            # layerwise streams everything, but with prefetch it holds two blocks, more than
            # adaptive's least: suggest it only where it really needs less
            alternative = (f"--offload layerwise (needs {describe_bytes(layerwise_need)})"
                           if layerwise_need < most else
                           "--offload cpu_only (no device memory, slow)")
            c.add(f"--budget {budget!r} is {describe_bytes(budget_bytes)}, below the minimum of "
                  f"strategy {strategy!r}: {what}. Pass --budget {math.ceil(most / 2**20)}MiB or "
                  f"more, or use {alternative}")


@reported("building the demo models on meta")
def demo_placed_models(*, dtype: torch.dtype, attention: str, sla_topk: float,
                       home: str) -> dict[str, PlacedModel]:
    """The demo's models on ``meta``, from the presets its checkpoints are written from
    (the files do not exist yet when the demo pipeline is checked)."""
    from turbowan.pipeline import demo
    from turbowan.text_encoder.config import preset_config
    from turbowan.vae.config import PRESETS as VAE_PRESETS

    expert = meta_dit(demo.demo_dit_config(), quant=demo.DEMO_DIT_QUANT, attention=attention,
                      sla_topk=sla_topk, dtype=dtype, home=home)
    return {"text_encoder": meta_text_encoder(preset_config(demo.DEMO_TEXT_PRESET), dtype=dtype),
            "vae": meta_vae(VAE_PRESETS[demo.DEMO_VAE_PRESET], dtype=dtype),
            "high": expert, "low": expert}
