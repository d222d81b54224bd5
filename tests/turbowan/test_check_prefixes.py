"""`turbowan check` accepts the wrapper prefixes the loaders accept (ComfyUI-style files)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from turbowan.checkpoint.report import check_against_preset
from turbowan.presets import family_module


def _materialise(preset: str, **options: str) -> dict[str, torch.Tensor]:
    model = family_module(preset).build_manifest_model(preset, **options)
    return {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("prefix", ["first_stage_model.", "vae."])
def test_vae_with_comfy_prefix_matches_its_preset(tmp_path, prefix):
    state = {prefix + k: v for k, v in _materialise("wan2.1-vae-tiny").items()}
    path = tmp_path / "vae.safetensors"
    save_file(state, str(path))

    explicit = check_against_preset(path, "wan2.1-vae-tiny")
    detected = check_against_preset(path)

    assert explicit.ok, explicit.format()
    assert detected.ok, detected.format()
    assert "wan2.1-vae-tiny" in detected.looks_like


@pytest.mark.parametrize("prefix", ["first_stage_model.", "vae."])
def test_preflight_accepts_the_vae_prefix_the_loader_accepts(tmp_path, prefix):
    from turbowan.pipeline.model_files import inspect_model_file

    path = tmp_path / "vae.safetensors"
    save_file({prefix + k: v for k, v in _materialise("wan2.1-vae-tiny").items()}, str(path))

    summary, specs = inspect_model_file("vae", path)

    assert summary.startswith("Wan2.1 VAE (dim ") and f"{prefix}conv2.weight" in specs


def test_umt5_with_wrapper_prefix_matches_its_preset(tmp_path):
    prefix = "text_encoders.umt5xxl.transformer."
    state = {prefix + k: v for k, v in _materialise("umt5-tiny", naming="comfy").items()}
    path = tmp_path / "umt5.safetensors"
    save_file(state, str(path))

    report = check_against_preset(path, "umt5-tiny", naming="comfy")

    assert report.ok, report.format()


def test_prefix_does_not_hide_a_wrong_shape(tmp_path):
    state = _materialise("wan2.1-vae-tiny")
    state["conv2.weight"] = torch.zeros(16, 16, 1, 1, 2)
    path = tmp_path / "vae.safetensors"
    save_file({"vae." + k: v for k, v in state.items()}, str(path))

    report = check_against_preset(path, "wan2.1-vae-tiny")

    assert not report.ok
    assert "conv2.weight" in report.format()
