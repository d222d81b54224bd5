"""Checkpoint files checked from their headers: the right family, every key/shape/dtype.

A wrong or truncated file is found here in a second, from the header alone (no tensor is
read); the header is handed back so the budget check builds its ``meta`` models from it
without a second read.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from turbowan.pipeline.problems import Problems, collecting

# role -> (model family, what to pass)
MODEL_ROLES: dict[str, tuple[str, str]] = {
    "high": ("dit", "TurboWan2.2-I2V-A14B-high-720P(-quant).pth"),
    "low": ("dit", "TurboWan2.2-I2V-A14B-low-720P(-quant).pth"),
    "vae": ("vae", "Wan2.1_VAE.pth (or wan_2.1_vae.safetensors)"),
    "text_encoder": ("text_encoder", "models_t5_umt5-xxl-enc-bf16.pth (or a umt5_xxl *.safetensors)"),
}
FLAG = {"high": "--high", "low": "--low", "vae": "--vae", "text_encoder": "--text-encoder"}

# where the text-encoder loader looks for a tokenizer when none is given
TOKENIZER_BESIDE = ("spiece.model", "tokenizer.json", "google/umt5-xxl/spiece.model",
                    "google/umt5-xxl/tokenizer.json")
EMBEDDED_TOKENIZER_SUFFIX = "spiece_model"


def required_problem(role: str) -> str:
    """The message for a checkpoint a real run cannot do without."""
    return (f"{FLAG[role]} is required with real checkpoints: pass {MODEL_ROLES[role][1]} "
            "(or give no paths at all for the demo)")


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


def inspect_model_file(role: str, path: str | os.PathLike[str], *, tokenizer: Any = "given"
                       ) -> tuple[str, dict[str, Any]]:
    """Header check of one checkpoint against the family its role needs; returns a one-line
    summary and the header it read (key -> TensorSpec).

    For the text encoder with ``tokenizer=None`` it also checks that a tokenizer will be found."""
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


def inspect_model_files(paths: dict[str, str | os.PathLike[str] | None],
                        collector: Problems | None = None, *, tokenizer: Any = "given"
                        ) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Check every given checkpoint; returns role -> one-line description and role -> header
    of each file that passed. Pass the run's ``tokenizer`` to also check one will be found."""
    with collecting(collector) as c:
        found: dict[str, str] = {}
        headers: dict[str, dict[str, Any]] = {}
        for role, path in paths.items():
            if path is None:
                continue
            checked = c.check(lambda role=role, path=path: inspect_model_file(role, path, tokenizer=tokenizer))
            if checked is not None:
                found[role], headers[role] = checked
    return found, headers


def _compare_with_preset(family_module: str, preset: str, specs: dict[str, Any], source: str,
                         **options: str):
    """Key/shape/dtype comparison with one known preset (header data only)."""
    from turbowan.checkpoint.report import compare_specs, module_specs

    module = importlib.import_module(family_module)
    expected = module_specs(module.build_manifest_model(preset, **options))
    return compare_specs(expected, specs, source=source, expected_label=f"preset {preset}")


@dataclass(frozen=True)
class HeaderConfig:
    """The model a checkpoint header describes, read the way its loader reads it."""

    config: Any            # DiT: its layout (config + quant); VAE / umT5: the config
    specs: dict[str, Any]  # the header as the loader sees it (a VAE wrapper prefix stripped)
    naming: str | None = None  # umT5: "wan" or "comfy"


def header_config(family: str, specs: dict[str, Any], source: str) -> HeaderConfig:
    """One reading of a header per family, for the file check and the budget check alike
    (two copies of it drifted once: the VAE prefix was stripped in one and not the other)."""
    if family == "dit":
        from turbowan.dit.config import config_from_state_dict
        from turbowan.dit.keys import normalize_dit_keys

        return HeaderConfig(config_from_state_dict(normalize_dit_keys(specs)[0]), specs)
    if family == "vae":
        from turbowan.vae.config import config_from_state_dict as vae_config
        from turbowan.vae.config import strip_prefix

        stripped = strip_prefix(specs)  # a ComfyUI-style wrapper prefix, as load_vae drops it
        return HeaderConfig(vae_config(stripped), stripped)
    from turbowan.text_encoder.config import config_from_state_dict as te_config
    from turbowan.text_encoder.naming import to_wan_names

    all_shapes = {k: v.shape for k, v in specs.items()}
    renamed, naming = to_wan_names(all_shapes, all_shapes, source=source)
    return HeaderConfig(te_config(renamed, source=source), specs, naming)


def _family_summary(family: str, specs: dict[str, Any], p: Path, flag: str) -> tuple[str, Any]:
    """The file is of the family its role needs (a DiT, the Wan2.1 VAE, a umT5 encoder), and
    every key/shape/dtype matches the model of that family it describes."""
    try:
        read = header_config(family, specs, str(p))
        if family == "dit":
            from turbowan.checkpoint.report import check_specs

            layout = read.config
            if layout.config.in_dim != 36:
                raise ValueError(
                    f"this DiT takes {layout.config.in_dim} input channels; the I2V experts take 36 "
                    "(noise 16 + mask 4 + image latents 16): a T2V or TI2V checkpoint will not work"
                )
            return layout.describe(), check_specs(specs, source=str(p))
        if family == "vae":
            from turbowan.vae.config import PRESETS as VAE_PRESETS

            cfg = read.config
            preset = next((n for n, c in VAE_PRESETS.items() if c == cfg), None)
            report = None
            if preset is not None:  # another width is checked key by key when it loads
                report = _compare_with_preset("turbowan.vae.meta", preset, read.specs, str(p))
            return f"Wan2.1 VAE (dim {cfg.dim})", report
        from turbowan.text_encoder.config import PRESETS as TE_PRESETS

        cfg, naming = read.config, read.naming
        preset = next((n for n, c in TE_PRESETS.items() if c == cfg), None)
        report = None
        if preset is not None:
            fp8 = "scaled" if any(k.endswith("scale_weight") for k in specs) else "none"
            report = _compare_with_preset(
                "turbowan.text_encoder.meta", preset, specs, str(p), naming=naming, fp8=fp8,
            )
        return f"umT5 encoder (dim {cfg.dim}, {cfg.num_layers} layers, {naming} names)", report
    except ValueError as exc:
        raise ValueError(f"{flag} {str(p)!r}: {exc}") from exc
