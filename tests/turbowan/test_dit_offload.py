"""The int8 DiT streamed block by block by offloadkit (CPU device) gives the same bits:
blocks keep no derived state, so swapping their int8/scale buffers for slot views is safe."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import offloadkit
from turbowan.dit.config import PRESETS
from turbowan.dit.model import WanDiT
from turbowan.quant.quantize import quantize_state_dict

GOLDEN = Path(__file__).parents[1] / "data" / "golden" / "dit_tiny_i2v.safetensors"


@pytest.fixture(scope="module")
def model_and_args():
    g = load_file(str(GOLDEN))
    sd = quantize_state_dict({k[8:]: v.float() for k, v in g.items() if k.startswith("weights.")})
    with torch.device("meta"):
        model = WanDiT(PRESETS["tiny"], quant="int8", dtype=torch.float32)
    model.load_state_dict(sd, assign=True)
    model.requires_grad_(False)
    args = (
        g["inputs.x_B_C_T_H_W"],
        g["inputs.timesteps_B_T"],
        g["inputs.crossattn_emb"],
        g["inputs.y_B_C_T_H_W"],
    )
    return model, args


@pytest.mark.parametrize("strategy,budget", [("layerwise", "9MB"), ("adaptive", "8MB")])
def test_streamed_int8_dit_is_bitwise_identical(model_and_args, strategy, budget):
    model, args = model_and_args
    with torch.no_grad():
        ref = model(*args)
        with offloadkit.offloaded(model, strategy=strategy, device="cpu", budget=budget) as h:
            out = model(*args)
            stats = h.stats()
        after = model(*args)
    assert stats.streamed_blocks == 3  # the budget forces every block to stream
    assert torch.equal(out, ref)
    assert torch.equal(after, ref)
