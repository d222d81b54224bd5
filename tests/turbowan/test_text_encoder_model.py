"""umT5 encoder math against the upstream golden fixture, and the full-size layout on meta."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from turbowan.text_encoder.config import (
    PRESETS,
    TextEncoderMismatchError,
    config_from_state_dict,
)
from turbowan.text_encoder.meta import build_manifest_model
from turbowan.text_encoder.model import UMT5Encoder, relative_position_buckets, zero_padding
from turbowan.text_encoder.naming import (
    comfy_to_wan_key,
    detect_naming,
    to_wan_names,
    wan_to_comfy,
    wan_to_comfy_key,
)

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden" / "umt5_tiny.safetensors"
TOL = dict(atol=1e-5, rtol=1e-5)
XXL_PARAMS = 5_680_910_336


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN))


@pytest.fixture(scope="module")
def tiny_model(golden) -> UMT5Encoder:
    weights = {k[len("weights."):]: v for k, v in golden.items() if k.startswith("weights.")}
    with torch.device("meta"):
        model = UMT5Encoder(PRESETS["umt5-tiny"])
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()


def test_golden_output_with_mask_and_zeroed_rows(golden, tiny_model):
    ids, mask = golden["inputs.ids"], golden["inputs.mask"]
    with torch.no_grad():
        hidden = tiny_model(ids, mask)
    torch.testing.assert_close(hidden, golden["output"], **TOL)
    zeroed = zero_padding(hidden, mask)
    torch.testing.assert_close(zeroed, golden["output_pipeline_zeroed"], **TOL)
    assert int(mask.sum()) == 11
    assert torch.count_nonzero(zeroed[0, 11:]) == 0
    assert torch.count_nonzero(zeroed[0, :11].abs().sum(-1)) == 11


def test_golden_output_without_mask(golden, tiny_model):
    with torch.no_grad():
        hidden = tiny_model(golden["inputs.ids"])
    torch.testing.assert_close(hidden, golden["output_without_mask"], **TOL)
    # padding changes the real rows only through the mask: they must differ from the masked run
    assert (hidden[0, :11] - golden["output"][0, :11]).abs().max() > 1e-3


def test_golden_relative_buckets_and_per_layer_bias(golden, tiny_model):
    buckets = relative_position_buckets(16, 16, num_buckets=32, max_distance=128)
    assert torch.equal(buckets, golden["intermediates.rel_bucket_LxL"])
    for i, block in enumerate(tiny_model.blocks):
        torch.testing.assert_close(
            block.pos_embedding(buckets), golden[f"intermediates.block{i}_pos_bias"], **TOL
        )


def _bucket_by_spec(rel: int, num_buckets: int = 32, max_distance: int = 128) -> int:
    """Spec §7.1 steps written out with Python scalars, as an independent check."""
    half = num_buckets // 2
    offset = half if rel > 0 else 0
    a = abs(rel)
    exact = half // 2
    if a < exact:
        return offset + a
    return offset + min(half - 1, exact + int(math.log(a / exact) / math.log(max_distance / exact) * (half - exact)))


def test_relative_buckets_match_spec_rule_over_512_tokens():
    buckets = relative_position_buckets(512, 512)
    q = [0, 1, 7, 100, 255, 511]
    for i in q:
        expected = torch.tensor([_bucket_by_spec(j - i) for j in range(512)])
        assert torch.equal(buckets[i], expected), f"query row {i}"
    assert buckets.min() == 0 and buckets.max() == 31
    assert buckets[0, 511] == 31 and buckets[511, 0] == 15  # far right / far left saturate


def test_zero_padding_per_sample_lengths():
    hidden = torch.randn(3, 6, 4)
    mask = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1] * 6])
    out = zero_padding(hidden, mask)
    for row, n in enumerate((1, 3, 6)):
        assert torch.equal(out[row, :n], hidden[row, :n])
        assert torch.count_nonzero(out[row, n:]) == 0


@pytest.mark.parametrize("naming", ["wan", "comfy"])
def test_full_size_preset_on_meta(naming):
    model = build_manifest_model("umt5-xxl", naming=naming)
    state = model.state_dict()
    assert len(state) == 242
    assert sum(t.numel() for t in state.values()) == XXL_PARAMS
    assert all(t.device.type == "meta" for t in state.values())
    if naming == "wan":
        expected = {
            "token_embedding.weight": (256384, 4096),
            "blocks.23.attn.o.weight": (4096, 4096),
            "blocks.0.ffn.gate.0.weight": (10240, 4096),
            "blocks.5.ffn.fc1.weight": (10240, 4096),
            "blocks.5.ffn.fc2.weight": (4096, 10240),
            "blocks.17.pos_embedding.embedding.weight": (32, 64),
            "blocks.0.norm1.weight": (4096,),
            "norm.weight": (4096,),
        }
    else:
        expected = {
            "shared.weight": (256384, 4096),
            "encoder.block.23.layer.0.SelfAttention.o.weight": (4096, 4096),
            "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": (10240, 4096),
            "encoder.block.5.layer.1.DenseReluDense.wi_1.weight": (10240, 4096),
            "encoder.block.5.layer.1.DenseReluDense.wo.weight": (4096, 10240),
            "encoder.block.17.layer.0.SelfAttention.relative_attention_bias.weight": (32, 64),
            "encoder.block.0.layer.0.layer_norm.weight": (4096,),
            "encoder.final_layer_norm.weight": (4096,),
        }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert detect_naming(list(state)) == naming


def test_full_size_fp8_scaled_manifest():
    state = build_manifest_model("umt5-xxl", naming="comfy", fp8="scaled").state_dict()
    scales = [k for k in state if k.endswith(".scale_weight")]
    assert len(scales) == 24 * 7 and len(state) == 242 + 168 + 1
    assert state["scaled_fp8"].dtype == torch.float8_e4m3fn and state["scaled_fp8"].numel() == 0
    assert state["encoder.block.9.layer.1.DenseReluDense.wo.weight"].dtype == torch.float8_e4m3fn
    assert state["encoder.block.9.layer.1.DenseReluDense.wo.scale_weight"].shape == ()
    assert state["shared.weight"].dtype == torch.bfloat16  # the embedding is not a Linear
    weights = {k: v for k, v in state.items() if not k.endswith(".scale_weight") and k != "scaled_fp8"}
    assert sum(v.numel() for v in weights.values()) == XXL_PARAMS


def test_full_size_config_inferred_from_both_namings():
    wan = {k: tuple(v.shape) for k, v in build_manifest_model("umt5-xxl").state_dict().items()}
    assert config_from_state_dict(wan) == PRESETS["umt5-xxl"]
    comfy = wan_to_comfy(wan)
    renamed, naming = to_wan_names(comfy, comfy)
    assert naming == "comfy" and renamed == wan
    model = build_manifest_model("umt5-xxl")
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 24


def test_key_mapping_round_trip_and_scale_companions():
    wan_keys = list(build_manifest_model("umt5-tiny").state_dict())
    for key in wan_keys:
        assert comfy_to_wan_key(wan_to_comfy_key(key)) == key
    assert comfy_to_wan_key("encoder.block.3.layer.1.DenseReluDense.wi_0.scale_weight") == (
        "blocks.3.ffn.gate.0.scale_weight"
    )
    assert comfy_to_wan_key("encoder.embed_tokens.weight") == "token_embedding.weight"
    with pytest.raises(KeyError, match="not a umT5"):
        wan_to_comfy_key("blocks.0.attn.qkv.weight")


def test_unknown_preset_and_naming_are_refused():
    with pytest.raises(ValueError, match="known: umt5-tiny, umt5-xxl"):
        build_manifest_model("umt5-base")
    with pytest.raises(ValueError, match="'wan'.*'comfy'"):
        build_manifest_model("umt5-tiny", naming="hf")


def test_t5_xxl_v1_1_with_shared_position_table_is_refused_from_shapes():
    """Flux/SD3's t5xxl has width 4096 too; only its single position table gives it away."""
    shapes = {k: tuple(v.shape) for k, v in build_manifest_model("umt5-xxl").state_dict().items()}
    shapes["token_embedding.weight"] = (32128, 4096)
    shapes = {k: v for k, v in shapes.items()
              if not (k.endswith("pos_embedding.embedding.weight") and not k.startswith("blocks.0."))}
    with pytest.raises(TextEncoderMismatchError, match="only block 0 .*vocabulary 32128.*T5 v1.1"):
        config_from_state_dict(shapes)


def test_incomplete_block_numbering_is_refused():
    shapes = {k: tuple(v.shape) for k, v in build_manifest_model("umt5-tiny").state_dict().items()}
    shapes = {k.replace("blocks.1.", "blocks.2."): v for k, v in shapes.items()}
    with pytest.raises(TextEncoderMismatchError, match="not numbered 0..N-1"):
        config_from_state_dict(shapes)


def test_nothing_is_drawn_on_meta_and_a_real_build_is_initialised(monkeypatch):
    """A meta build draws no random table: torch's ``normal_`` on meta imports torch._dynamo,
    about 2 s of every `turbowan` command (its budget check builds the encoder on meta)."""
    from turbowan.text_encoder.meta import build_meta

    drawn: list[str] = []
    normal_ = torch.Tensor.normal_

    def recording(self, *args, **kwargs):
        drawn.append(self.device.type)
        return normal_(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "normal_", recording)
    config = PRESETS["umt5-tiny"]
    meta = build_meta(config, dtype=torch.float32)
    assert drawn == [] and meta.token_embedding.weight.is_meta
    real = UMT5Encoder(config)  # the token table and every layer's position table are drawn
    assert drawn == ["cpu"] * (1 + config.num_layers)
    assert 0.9 < real.token_embedding.weight.std().item() < 1.1
