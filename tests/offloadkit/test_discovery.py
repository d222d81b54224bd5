"""Finding the blocks: every outermost block list (several lists, nn.Sequential too), a
warning when they hold little of the model, errors that list where the weights are, and
``blocks=`` as modules or dotted paths. Real diffusers models where the old search (the
largest same-typed ModuleList) picked a fraction of the weights."""

from __future__ import annotations

import warnings

import pytest
import torch
from third_party import build
from torch import nn

import offloadkit
from offloadkit import BlockProfile, ModelProfile
from offloadkit.engine import find_blocks, layout_model
from offloadkit.errors import BlockCoverageWarning, BlockDiscoveryError


@pytest.fixture(autouse=True)
def own_rng():
    """Models here are built from seeds; the global RNG is left as it was for later tests."""
    with torch.random.fork_rng():
        yield


def names(model: nn.Module, blocks=None) -> list[str]:
    return [name for name, _ in find_blocks(model, blocks)]


def coverage(model: nn.Module) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("error", BlockCoverageWarning)  # discovery must not warn here
        layout = layout_model(model)
    streamed = sum(e.nbytes for b in layout.blocks for e in b.entries)
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return streamed / total


def test_flux_streams_both_block_lists():
    model, _ = build("flux")
    assert names(model) == ["transformer_blocks.0", "transformer_blocks.1",
                            "single_transformer_blocks.0", "single_transformer_blocks.1"]
    assert coverage(model) > 0.85  # the double-stream list alone is 62 %
    # the same lists given by path, or as modules
    paths = ["transformer_blocks", "single_transformer_blocks"]
    assert names(model, paths) == names(model)
    assert names(model, [model.transformer_blocks, model.single_transformer_blocks]) \
        == names(model)


def test_unet_streams_down_up_and_mid_blocks():
    """Mixed block types (CrossAttnDownBlock2D beside DownBlock2D) are one list; the old
    search took up_blocks.0.resnets alone (about a third of this UNet)."""
    model, _ = build("unet")
    assert names(model) == ["down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.1",
                            "mid_block.resnets.0", "mid_block.resnets.1"]
    assert coverage(model) > 0.85


def test_autoencoder_streams_encoder_and_decoder_exactly():
    """Registration order is not execution order in the decoder (up_blocks is registered
    before mid_block): the output is still exact, the engine loads those blocks on demand."""
    model, run = build("autoencoder_kl")
    found = names(model)
    assert found[:2] == ["encoder.down_blocks.0", "encoder.down_blocks.1"]
    assert "decoder.up_blocks.0" in found and "decoder.mid_block.resnets.0" in found
    assert coverage(model) > 0.85  # the decoder alone is under half
    with torch.no_grad():
        expected = run(model)
        with offloadkit.offloaded(model, "layerwise", device="cpu", budget=10**9) as handle:
            assert torch.equal(run(model), expected)
            assert handle.stats().mispredicted_loads > 0


class VitBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class TimmStyleViT(nn.Module):
    """Stand-in with timm's VisionTransformer layout (timm pulls torchvision, kept out of the
    test env): patch_embed, cls_token, pos_embed, ``blocks = nn.Sequential(*blocks)``, head."""

    def __init__(self, dim: int = 32, depth: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, 4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim))
        self.blocks = nn.Sequential(*[VitBlock(dim) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(image).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def test_sequential_of_blocks_and_of_layers_are_found():
    torch.manual_seed(0)
    vit = TimmStyleViT().eval()
    assert names(vit) == [f"blocks.{i}" for i in range(4)]
    image = torch.randn(2, 3, 16, 16)
    expected = vit(image)
    with offloadkit.offloaded(vit, "layerwise", device="cpu", budget=10**9) as handle, \
            torch.no_grad():
        assert torch.equal(vit(image), expected)
        assert handle.stats().streamed_blocks == 4
    layers = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                           nn.Linear(16, 4))
    assert names(layers) == ["0", "2", "4"]  # the model itself is the list; ReLUs hold nothing


def test_module_registered_twice_is_not_a_block():
    """A ModuleList holding one module twice shares its weights: no block to stream, and the
    error says so (it used to blame a blocks= argument the user never passed)."""
    shared = nn.Linear(8, 8)
    model = nn.Module()
    model.layers = nn.ModuleList([shared, shared])
    with pytest.raises(BlockDiscoveryError) as info:
        find_blocks(model)
    message = str(info.value)
    assert "layers holds a module registered more than once" in message
    assert "'layers' (ModuleList, " in message and "blocks=" in message
    assert "lists the same module twice" not in message
    # beside distinct blocks, the shared one stays resident and the others stream
    model.layers.append(nn.Linear(8, 8))
    model.layers.append(nn.Linear(8, 8))
    assert names(model) == ["layers.2", "layers.3"]


class BigTable(nn.Module):
    """Most of the weights in an embedding, a little in the block list."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(4096, 64)
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(3))
        self.head = nn.Linear(64, 512)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_low_coverage_warns_naming_what_is_left_outside():
    model = BigTable()
    with pytest.warns(BlockCoverageWarning) as record:
        offloadkit.apply(model, "layerwise", device="cpu", budget=10**9).remove()
    message = str(record[0].message)
    assert "3 blocks holding only 4% of BigTable's weights" in message
    assert message.index("'embed' (Embedding, 1.00 MiB)") < message.index("'head' (Linear")
    assert record[0].filename == __file__  # points at the caller, not into offloadkit
    with warnings.catch_warnings():  # blocks chosen by the user: no warning
        warnings.simplefilter("error", BlockCoverageWarning)
        offloadkit.apply(model, "layerwise", device="cpu", budget=10**9, blocks="layers").remove()


def test_blocks_argument_forms_and_nesting():
    model, _ = build("flux")
    mixed = [model.transformer_blocks[0], "transformer_blocks.1", "single_transformer_blocks"]
    assert names(model, mixed) == names(model)
    with pytest.raises(BlockDiscoveryError, match="'transformer_blocks.0.attn' lies inside "
                                                  "block 'transformer_blocks.0'"):
        find_blocks(model, ["transformer_blocks", "transformer_blocks.0.attn"])
    with pytest.raises(BlockDiscoveryError, match="blocks= lists the same module twice"):
        find_blocks(model, ["transformer_blocks", model.transformer_blocks[1]])
    with pytest.raises(BlockDiscoveryError, match="names no submodule.*single_transformer"):
        find_blocks(model, ["transformer_blocks", "single_blocks"])


def test_adaptive_sizes_slots_for_the_streamed_blocks():
    """One large block and six small ones, a budget just under the whole model: the large
    block stays resident and small ones stream through small slots. Sizing the slots for the
    largest block left no room, and streamed the large block every forward."""
    sizes = [1000] + [100] * 6
    profile = ModelProfile(blocks=tuple(BlockProfile(i, f"b.{i}", n, 1)
                                        for i, n in enumerate(sizes)),
                           non_block_bytes=0, device="cpu")
    plan = offloadkit.make_plan(offloadkit.get_strategy("adaptive")(), profile, sum(sizes) - 50)
    assert 0 in plan.resident and plan.prefetch_depth == 1
    assert profile.bytes_of(plan.streamed) == 300
    assert plan.predicted_peak_device_bytes == 1000 + 300 + 2 * 100


def test_adaptive_uses_the_budget_on_a_unet():
    """At 100 % of its weight bytes (a little under the aligned packed size) the UNet keeps
    its three largest blocks resident and streams the three smallest through two small slots
    (slots sized for its largest block left room for none: all six streamed)."""
    model, run = build("unet")
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with torch.no_grad():
        expected = run(model)
        with offloadkit.offloaded(model, "adaptive", device="cpu", budget=weights,
                                  prefetch_depth=1) as handle:
            assert torch.equal(run(model), expected)
            stats, plan = handle.stats(), handle.plan
    assert stats.resident_blocks == 3 and stats.streamed_blocks == 3
    # blocks given in execution order (the README's example): no block is loaded late
    with torch.no_grad(), offloadkit.offloaded(
            model, "layerwise", device="cpu", budget=10**9,
            blocks=[model.down_blocks, model.mid_block, model.up_blocks]) as handle:
        assert torch.equal(run(model), expected) and torch.equal(run(model), expected)
        assert handle.stats().streamed_blocks == 5
        assert handle.stats().mispredicted_loads == 0
    assert stats.peak_device_bytes <= weights
    profile = offloadkit.profile_model(model)
    smallest = sorted(profile.blocks, key=lambda b: b.nbytes)[:3]
    assert set(plan.streamed) == {b.index for b in smallest}
