"""The VAE placed through offloadkit: its blocks are found and outputs do not change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import offloadkit
import turbowan
from offloadkit.registry import get_plugin_manager
from turbowan.vae import offload as vae_offload_hooks

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden" / "vae_tiny.safetensors"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN))


@pytest.fixture()
def vae(golden, tmp_path):
    weights = {k[8:]: v for k, v in golden.items() if k.startswith("weights.")}
    torch.save(weights, tmp_path / "vae.pth")
    return turbowan.load_vae(tmp_path / "vae.pth")


def test_offload_blocks_cover_every_repeated_block(vae):
    blocks = vae.offload_blocks()
    assert len(blocks) == 32  # 11 encoder + 3 + 3 middle + 15 decoder
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    outside = [n for n, p in vae.named_parameters() if id(p) not in in_blocks]
    assert all(n.split(".")[0] in {"conv1", "conv2", "encoder", "decoder"} for n in outside)
    assert all(".downsamples." not in n and ".upsamples." not in n for n in outside)


def test_streamed_vae_gives_bitwise_identical_outputs(vae, golden):
    video, latents = golden["inputs.video"], golden["latent_mean_normalized"]
    ref_latents, ref_video = vae.encode(video), vae.decode(latents)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    handle = offloadkit.apply(vae, strategy="layerwise", device="cpu", blocks=vae.offload_blocks())
    try:
        assert torch.equal(vae.encode(video), ref_latents)
        assert torch.equal(vae.decode(latents), ref_video)
        stats = handle.stats()
        assert stats.streamed_blocks == 32 and stats.bytes_transferred > 0
    finally:
        handle.remove()
    after = vae.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_find_blocks_hook_lets_plain_apply_work(vae, golden):
    # turbowan registers the hook through the offloadkit entry-point group, like any plugin
    records = {
        name: plugin for name, plugin in get_plugin_manager().list_name_plugin() if plugin
    }
    assert vae_offload_hooks in records.values()
    latents = golden["latent_mean_normalized"]
    ref = vae.decode(latents)
    with offloadkit.offloaded(vae, strategy="layerwise", device="cpu") as handle:
        assert torch.equal(vae.decode(latents), ref)
        stats = handle.stats()
        assert stats.strategy == "layerwise"
        assert stats.streamed_blocks > 0  # found the VAE's blocks without blocks=
    assert vae_offload_hooks.offloadkit_find_blocks(model=torch.nn.Linear(2, 2)) is None
