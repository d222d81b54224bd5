"""The umT5 encoder streamed by offloadkit on CPU gives bit-identical prompt embeddings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import offloadkit
from turbowan.text_encoder.loading import load_text_encoder

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden" / "umt5_tiny.safetensors"
PROMPTS = ["A red fox runs across a frozen lake at dawn.", ""]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    golden = load_file(str(GOLDEN))
    weights = {k[len("weights."):]: v for k, v in golden.items() if k.startswith("weights.")}
    path = tmp_path_factory.mktemp("umt5") / "te.pth"
    torch.save(weights, path)
    return load_text_encoder(path, tokenizer="demo", text_len=48)


@pytest.mark.parametrize("home", ["host", "disk"])
def test_streamed_blocks_match_resident_run(encoder, home):
    reference = encoder.encode(PROMPTS)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with offloadkit.offloaded(encoder, "layerwise", device="cpu", budget="1MB", home=home) as handle:
        streamed = encoder.encode(PROMPTS)
        stats = handle.stats()
    assert stats.streamed_blocks == len(encoder.blocks) == 2
    assert stats.bytes_transferred > 0
    assert torch.equal(streamed, reference)
    after = encoder.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
