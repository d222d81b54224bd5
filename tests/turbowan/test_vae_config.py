"""The full-size Wan2.1 VAE on `meta`: exact key names, shapes (spec §6.2) and size."""

from __future__ import annotations

import pytest
import torch

from turbowan.presets import family_module
from turbowan.vae.config import PRESETS, VAEConfig, config_from_state_dict
from turbowan.vae.meta import build_manifest_model


@pytest.fixture(scope="module")
def full_state() -> dict[str, torch.Tensor]:
    model = build_manifest_model("wan2.1-vae")
    assert all(p.is_meta for p in model.parameters())
    return model.state_dict()


def test_full_preset_has_194_tensors_and_126_892_531_params(full_state):
    assert len(full_state) == 194
    assert sum(v.numel() for v in full_state.values()) == 126_892_531
    assert {v.dtype for v in full_state.values()} == {torch.float32}  # the file is fp32


SPEC_SHAPES = {
    "encoder.conv1.weight": (96, 3, 3, 3, 3),
    "encoder.downsamples.3.residual.0.gamma": (96, 1, 1, 1),
    "encoder.downsamples.3.residual.2.weight": (192, 96, 3, 3, 3),
    "encoder.downsamples.3.residual.3.gamma": (192, 1, 1, 1),
    "encoder.downsamples.3.residual.6.weight": (192, 192, 3, 3, 3),
    "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
    "encoder.downsamples.6.shortcut.weight": (384, 192, 1, 1, 1),
    "encoder.downsamples.2.resample.1.weight": (96, 96, 3, 3),
    "encoder.downsamples.5.resample.1.weight": (192, 192, 3, 3),
    "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
    "encoder.downsamples.8.time_conv.weight": (384, 384, 3, 1, 1),
    "encoder.middle.1.norm.gamma": (384, 1, 1),
    "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
    "encoder.middle.1.proj.weight": (384, 384, 1, 1),
    "encoder.head.0.gamma": (384, 1, 1, 1),
    "encoder.head.2.weight": (32, 384, 3, 3, 3),
    "conv1.weight": (32, 32, 1, 1, 1),
    "conv2.weight": (16, 16, 1, 1, 1),
    "decoder.conv1.weight": (384, 16, 3, 3, 3),
    "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
    "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
    "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
    "decoder.upsamples.7.resample.1.weight": (192, 384, 3, 3),
    "decoder.upsamples.7.time_conv.weight": (768, 384, 3, 1, 1),
    "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
    "decoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
    "decoder.head.0.gamma": (96, 1, 1, 1),
    "decoder.head.2.weight": (3, 96, 3, 3, 3),
}


@pytest.mark.parametrize("key", sorted(SPEC_SHAPES))
def test_spec_shapes(full_state, key):
    assert tuple(full_state[key].shape) == SPEC_SHAPES[key]


def test_block_layout_matches_spec(full_state):
    def indices(prefix: str, part: str) -> set[int]:
        return {
            int(k[len(prefix) :].split(".")[0])
            for k in full_state
            if k.startswith(prefix) and f".{part}." in k
        }

    assert indices("encoder.downsamples.", "residual") == {0, 1, 3, 4, 6, 7, 9, 10}
    assert indices("encoder.downsamples.", "resample") == {2, 5, 8}
    assert indices("encoder.downsamples.", "time_conv") == {5, 8}
    assert indices("encoder.downsamples.", "shortcut") == {3, 6}
    assert indices("decoder.upsamples.", "residual") == {0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14}
    assert indices("decoder.upsamples.", "resample") == {3, 7, 11}
    assert indices("decoder.upsamples.", "time_conv") == {3, 7}
    assert indices("decoder.upsamples.", "shortcut") == {4}


def test_tiny_preset_is_the_golden_size_and_presets_are_registered():
    tiny = build_manifest_model("wan2.1-vae-tiny")
    assert sum(p.numel() for p in tiny.parameters()) == 924_491  # fixture index.json n_params
    assert set(PRESETS) == {"wan2.1-vae", "wan2.1-vae-tiny"}
    for name in PRESETS:
        assert family_module(name).build_manifest_model is build_manifest_model


def test_config_inferred_from_shapes(full_state):
    assert config_from_state_dict(full_state) == VAEConfig()
    tiny = build_manifest_model("wan2.1-vae-tiny").state_dict()
    config = config_from_state_dict(tiny)
    assert (config.dim, config.z_dim) == (8, 16)
    assert (config.temporal_factor, config.spatial_factor) == (4, 8)


def test_manifest_rejects_unknown_preset_and_options():
    with pytest.raises(ValueError, match="known: wan2.1-vae, wan2.1-vae-tiny"):
        build_manifest_model("wan2.2-vae")
    with pytest.raises(ValueError, match=r"take no options, got \['quant'\]"):
        build_manifest_model("wan2.1-vae", quant="int8")
    assert build_manifest_model("wan2.1-vae", quant=None) is not None  # unset CLI flags pass


def test_prefix_stripping_and_inference_work_on_header_specs(tmp_path):
    """`turbowan check` reads only the header: the same helpers must accept TensorSpecs."""
    from safetensors.torch import save_file

    from turbowan.checkpoint import read_tensor_specs
    from turbowan.vae.config import strip_prefix

    tiny = build_manifest_model("wan2.1-vae-tiny").state_dict()
    state = {f"first_stage_model.{k}": torch.zeros(v.shape) for k, v in tiny.items()}
    state["model.diffusion_model.x.weight"] = torch.zeros(2)  # the rest of a full checkpoint
    path = tmp_path / "full_checkpoint.safetensors"
    save_file(state, str(path))
    specs = strip_prefix(read_tensor_specs(path))
    assert set(specs) == set(tiny)
    assert config_from_state_dict(specs).dim == 8
    assert strip_prefix(tiny).keys() == tiny.keys()  # unprefixed files are left alone
