"""The DiT with the real SLA op (turbowan.ops): proj_l keys load, and with every key block
kept and a zero proj_l the model equals the `original` (dense SDPA) model."""

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from turbowan import load_dit

GOLDEN = Path(__file__).parents[1] / "data" / "golden" / "dit_tiny_i2v.safetensors"
PROJ_L = "self_attn.attn_op.local_attn.proj_l"


@pytest.fixture(scope="module")
def golden():
    return load_file(str(GOLDEN))


def _write(tmp_path, golden, proj_scale: float) -> Path:
    sd = {k[8:]: v.float() for k, v in golden.items() if k.startswith("weights.")}
    gen = torch.Generator().manual_seed(2)
    for i in range(3):
        sd[f"blocks.{i}.{PROJ_L}.weight"] = torch.randn(128, 128, generator=gen) * proj_scale
        sd[f"blocks.{i}.{PROJ_L}.bias"] = torch.randn(128, generator=gen) * proj_scale
    path = tmp_path / f"sla_{proj_scale}.safetensors"
    save_file(sd, str(path))
    return path


def _run(model, g):
    with torch.no_grad():
        return model(
            g["inputs.x_B_C_T_H_W"],
            g["inputs.timesteps_B_T"],
            g["inputs.crossattn_emb"],
            g["inputs.y_B_C_T_H_W"],
        )


def test_all_blocks_and_zero_proj_l_equals_dense(tmp_path, golden):
    path = _write(tmp_path, golden, proj_scale=0.0)
    sla = load_dit(path, attention="sla", sla_topk=1.0, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = load_dit(path, attention="original", dtype=torch.float32)
    out = _run(sla, golden)
    torch.testing.assert_close(out, _run(dense, golden), atol=2e-5, rtol=2e-5)
    # and so it reproduces the upstream golden output too
    torch.testing.assert_close(out, golden["output"], atol=1e-4, rtol=1e-4)


def test_sparse_selection_and_proj_l_change_the_output(tmp_path, golden):
    path = _write(tmp_path, golden, proj_scale=0.05)
    sparse = load_dit(path, attention="sla", sla_topk=0.1, dtype=torch.float32)
    out = _run(sparse, golden)
    assert torch.isfinite(out).all()  # 72 tokens: 2 key blocks, at least one is always kept
    diff = (out - golden["output"]).abs().max().item()
    assert diff > 1e-2  # sparse attention + linear branch is not dense attention
    layer = sparse.blocks[0].self_attn.attn_op.local_attn
    assert layer.topk == 0.1 and layer.proj_l.weight.abs().sum() > 0


def test_sagesla_without_spargeattn_says_so(tmp_path, golden):
    from turbowan.ops import sagesla_available

    path = _write(tmp_path, golden, proj_scale=0.0)
    model = load_dit(path, attention="sagesla", dtype=torch.float32)
    if sagesla_available():  # pragma: no cover - CUDA machines with SpargeAttn
        assert torch.isfinite(_run(model, golden)).all()
    else:
        with pytest.raises(Exception, match="SpargeAttn"):
            _run(model, golden)
