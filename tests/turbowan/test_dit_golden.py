"""Golden: the tiny DiT reproduces upstream TurboDiffusion outputs (fp32, `original`)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from turbowan import load_dit
from turbowan.dit.model import patchify
from turbowan.dit.rope import rope_angles

GOLDEN_DIT = Path(__file__).parents[1] / "data" / "golden" / "dit_tiny_i2v.safetensors"
TOL = 1e-4


@pytest.fixture(scope="module")
def golden():
    return load_file(str(GOLDEN_DIT))


@pytest.fixture(scope="module")
def model():
    # the fixture stores weights under "weights." next to inputs/outputs; load_dit finds them
    return load_dit(GOLDEN_DIT, attention="original", dtype=torch.float32)


def _inputs(g):
    return (
        g["inputs.x_B_C_T_H_W"],
        g["inputs.timesteps_B_T"],
        g["inputs.crossattn_emb"],
        g["inputs.y_B_C_T_H_W"],
    )


def test_config_inferred_from_shapes(model):
    cfg = model.config
    assert (cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.num_layers) == (256, 512, 2, 3)
    assert (cfg.in_dim, cfg.out_dim, cfg.text_dim, cfg.freq_dim) == (36, 16, 4096, 256)
    assert model.quant == "none" and model.compute_dtype == torch.float32


def test_output_matches_upstream(model, golden):
    x, t, ctx, y = _inputs(golden)
    assert t.item() == pytest.approx(933.78107, abs=1e-4)
    with torch.no_grad():
        out = model(x, t, ctx, y)
    assert out.shape == (1, 16, 3, 8, 12) and out.dtype == torch.float32
    ref = golden["output"]
    assert ref.abs().max() > 1.0  # a real signal, not zeros
    torch.testing.assert_close(out, ref, atol=TOL, rtol=TOL)


def test_intermediates(model, golden):
    x, t, ctx, y = _inputs(golden)
    xy = torch.cat([x, y], 1)
    tokens = patchify(xy)
    # token (t=1, h=2, w=5), vector index c*4 + kh*2 + kw (channel outermost)
    token = tokens[0, 1 * 24 + 2 * 6 + 5]
    assert token[7 * 4 + 1 * 2 + 0] == xy[0, 7, 1, 2 * 2 + 1, 5 * 2 + 0]
    assert token[30 * 4 + 0 * 2 + 1] == xy[0, 30, 1, 2 * 2 + 0, 5 * 2 + 1]
    with torch.no_grad():
        h = model.patch_embedding(tokens)
        torch.testing.assert_close(h, golden["intermediates.patch_tokens"], atol=TOL, rtol=TOL)
        e, e0 = model.time_embed(t)
        torch.testing.assert_close(e, golden["intermediates.time_embedding"], atol=TOL, rtol=TOL)
        torch.testing.assert_close(
            e0.flatten(1), golden["intermediates.time_projection"], atol=TOL, rtol=TOL
        )
        ctx_e = model.text_embedding(ctx)
        torch.testing.assert_close(
            ctx_e, golden["intermediates.context_embedding"], atol=TOL, rtol=TOL
        )
        from turbowan.dit.rope import rope_cos_sin

        cos, sin = rope_cos_sin((3, 4, 6))
        for i, block in enumerate(model.blocks):
            h = block(h, e0, ctx_e, cos, sin)
            torch.testing.assert_close(h, golden[f"intermediates.block{i}_out"], atol=TOL, rtol=TOL)
        torch.testing.assert_close(
            model.head(h, e), golden["intermediates.head_out"], atol=TOL, rtol=TOL
        )


def test_rope_angles_match(golden):
    ref = golden["intermediates.rope_freqs_L_64"]
    torch.testing.assert_close(rope_angles((3, 4, 6)), ref, atol=1e-6, rtol=1e-6)


def test_wrong_inputs_are_refused_with_the_fix(model, golden):
    x, t, ctx, y = _inputs(golden)
    with pytest.raises(ValueError, match="36 together"):
        model(x, t, ctx, y[:, :4])
    with pytest.raises(ValueError, match="multiple of 16"):
        model(x[..., :7], t, ctx, y[..., :7])
    with pytest.raises(ValueError, match="one timestep per sample"):
        model(x, torch.tensor([1.0, 2.0]), ctx, y)


def test_rope_tables_are_taken_of_float64_angles():
    # w reaches 79 at 720p: cos of an angle first rounded to float32 is off by ~2e-6 there
    from turbowan.dit.rope import rope_cos_sin

    grid = (2, 8, 80)
    cos, sin = rope_cos_sin(grid)
    w = torch.arange(80, dtype=torch.float64).repeat(2 * 8)  # token order is t, h, w
    freqs = 1.0 / 10000.0 ** (torch.arange(0, 42, 2, dtype=torch.float64) / 42)
    exact = w[:, None] * freqs  # the w pairs are the last 21 columns
    assert exact.max() > 70
    assert (cos[:, -21:].double() - exact.cos()).abs().max() < 1e-7
    assert (sin[:, -21:].double() - exact.sin()).abs().max() < 1e-7


def test_rope_tables_are_built_once_per_grid(model):
    from turbowan.dit.rope import rope_cos_sin

    cpu = torch.device("cpu")
    with torch.inference_mode():
        first = model.rope_tables((3, 4, 6), cpu)
    assert model.rope_tables((3, 4, 6), cpu) is first  # the second forward reuses them
    assert not first[0].is_inference()  # usable by a later forward with autograd on
    other = model.rope_tables((2, 4, 6), cpu)
    assert other is not first and other[0].shape == (2 * 4 * 6, 64)
    torch.testing.assert_close(other[0], rope_cos_sin((2, 4, 6))[0], atol=0, rtol=0)
