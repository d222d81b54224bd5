"""Configuration of the Wan2.1 VAE, its presets, and inference of the config from a checkpoint.

The architecture is fixed by the public ``Wan2.1_VAE.pth`` (spec §6.1); only the base width
and the latent width vary between the real file and the tiny test fixture, so those two are
read from tensor shapes and everything else is checked against the model built from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

# Per-channel statistics of the Wan2.1 latent space (spec §6.3): encode returns (mu - mean)/std.
LATENT_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENT_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# Wrappers that store the VAE inside a bigger state dict (ComfyUI checkpoints, other tools).
KNOWN_PREFIXES = ("first_stage_model.", "vae.")

WAN21_Z_DIM = 16
WAN22_Z_DIM = 48

T = TypeVar("T")


class VAECheckpointError(ValueError):
    """The checkpoint is not a Wan2.1 VAE (wrong family, wrong version, or damaged)."""


@dataclass(frozen=True)
class VAEConfig:
    """Hyper-parameters of the Wan2.1 causal VAE (defaults are the real model's)."""

    dim: int = 96
    z_dim: int = WAN21_Z_DIM
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0

    @property
    def temporal_upsample(self) -> tuple[bool, ...]:
        """The decoder mirrors the encoder, so its time upsampling flags are reversed."""
        return tuple(reversed(self.temporal_downsample))

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


PRESETS: dict[str, VAEConfig] = {
    "wan2.1-vae": VAEConfig(),
    "wan2.1-vae-tiny": VAEConfig(dim=8),
}


def strip_prefix(state: Mapping[str, T]) -> dict[str, T]:
    """Drop a ComfyUI/other wrapper prefix (``first_stage_model.``, ``vae.``) from VAE keys.

    Works on tensors or TensorSpecs, so `turbowan check` can apply it to a header.
    """
    for prefix in KNOWN_PREFIXES:
        if "encoder.conv1.weight" not in state and f"{prefix}encoder.conv1.weight" in state:
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


normalize_checkpoint_keys = strip_prefix  # the hook `turbowan check` applies to a header


def _shape(value: Any) -> tuple[int, ...]:
    """Shape of a tensor or of a TensorSpec (both have ``.shape``)."""
    return tuple(int(s) for s in value.shape)


def check_not_wan22(shapes: Mapping[str, Any]) -> None:
    """Refuse the 48-channel Wan2.2 VAE, the most common wrong download (spec §6, trap 12)."""
    z_dim = None
    if "conv2.weight" in shapes:
        z_dim = _shape(shapes["conv2.weight"])[0]
    elif "conv1.weight" in shapes:
        z_dim = _shape(shapes["conv1.weight"])[0] // 2
    if z_dim == WAN22_Z_DIM:
        raise VAECheckpointError(
            f"this is the Wan2.2 VAE (z_dim {WAN22_Z_DIM}, Wan2.2_VAE.pth), which belongs to the "
            "Wan2.2 TI2V-5B model; Wan2.2-I2V-A14B (and TurboWan2.2-I2V-A14B) uses the Wan2.1 "
            "VAE with z_dim 16: download Wan2.1_VAE.pth (or ComfyUI's wan_2.1_vae.safetensors) "
            "and pass that file instead"
        )


def config_from_state_dict(shapes: Mapping[str, Any]) -> VAEConfig:
    """Infer ``dim`` and ``z_dim`` from the stored shapes (tensors or TensorSpecs).

    Keys must already be stripped of any wrapper prefix. The remaining hyper-parameters are
    those of the real model; a file that differs in them fails the later shape comparison.
    """
    check_not_wan22(shapes)
    required = ("encoder.conv1.weight", "conv2.weight", "decoder.conv1.weight")
    missing = [k for k in required if k not in shapes]
    if missing:
        sample = ", ".join(sorted(shapes)[:5]) or "(no tensors)"
        hint = ""
        if any(k.startswith(("encoder.conv_in.", "decoder.conv_in.")) for k in shapes):
            hint = (
                " It looks like a diffusers-format VAE (conv_in/conv_out names); turbowan reads "
                "the original layout: use Wan2.1_VAE.pth or ComfyUI's wan_2.1_vae.safetensors."
            )
        raise VAECheckpointError(
            f"not a Wan2.1 VAE checkpoint: missing {', '.join(missing)} (first keys found: "
            f"{sample}).{hint} Pass Wan2.1_VAE.pth or wan_2.1_vae.safetensors."
        )
    enc_in = _shape(shapes["encoder.conv1.weight"])
    if len(enc_in) != 5 or enc_in[1] != 3:
        raise VAECheckpointError(
            f"encoder.conv1.weight has shape {enc_in}; the Wan2.1 VAE takes 3 RGB channels and "
            "expects (dim, 3, 3, 3, 3). A 12-channel input belongs to the Wan2.2 VAE "
            "(TI2V-5B); Wan2.2-I2V-A14B needs Wan2.1_VAE.pth."
        )
    z_dim = _shape(shapes["conv2.weight"])[0]
    if z_dim != WAN21_Z_DIM:
        raise VAECheckpointError(
            f"conv2.weight has {z_dim} latent channels; the Wan2.1 VAE has {WAN21_Z_DIM}. "
            "Pass Wan2.1_VAE.pth or wan_2.1_vae.safetensors."
        )
    from turbowan.limits import VAE_LIMITS, check_bounds

    check_bounds({"dim": enc_in[0]}, VAE_LIMITS, "VAE checkpoint")
    return VAEConfig(dim=enc_in[0], z_dim=z_dim)
