"""The full-size A14B expert on `meta`: key set, counts and bytes of the real checkpoints."""

import math

import pytest
import torch

from turbowan.dit.config import BLOCK_LINEARS, PRESETS
from turbowan.dit.meta import build_manifest_model

A14B = "wan2.2-i2v-a14b"


@pytest.fixture(scope="module")
def int8_sd():
    return build_manifest_model(A14B, quant="int8", attention="sla").state_dict()


@pytest.fixture(scope="module")
def bf16_sd():
    return build_manifest_model(A14B, quant="none", attention="sla").state_dict()


def _numel(sd, prefix=""):
    return sum(math.prod(t.shape) for k, t in sd.items() if k.startswith(prefix))


def _bytes(sd, prefix=""):
    return sum(math.prod(t.shape) * t.element_size() for k, t in sd.items() if k.startswith(prefix))


def test_tensor_counts(int8_sd, bf16_sd):
    assert len(int8_sd) == 1575
    assert len(bf16_sd) == 1175
    original = build_manifest_model(A14B, quant="none", attention="original").state_dict()
    assert len(original) == 1175 - 80  # 1,095 base tensors without proj_l
    assert all(t.device.type == "meta" for t in int8_sd.values())


def test_parameter_count_bf16_layout(bf16_sd):
    assert _numel(bf16_sd) == 14_289_561_664
    original = build_manifest_model(A14B, quant="none", attention="original").state_dict()
    assert _numel(original) == 14_288_901_184  # spec §1.1 without the SLA proj_l


def test_bytes_per_block(int8_sd, bf16_sd):
    assert _bytes(int8_sd, "blocks.0.") == 351_695_872
    # 702,821,632 is every block element at 2 bytes; the real file keeps the 6 norm vectors
    # (30,720 elements) in fp32, which adds 61,440 bytes
    assert 2 * _numel(bf16_sd, "blocks.0.") == 702_821_632
    assert _bytes(bf16_sd, "blocks.0.") == 702_821_632 + 30_720 * 2
    for i in (1, 39):
        assert _bytes(int8_sd, f"blocks.{i}.") == 351_695_872


def test_key_shapes_and_dtypes(int8_sd, bf16_sd):
    expect = {
        "patch_embedding.weight": ((5120, 144), torch.bfloat16),
        "text_embedding.0.weight": ((5120, 4096), torch.bfloat16),
        "time_embedding.0.weight": ((5120, 256), torch.bfloat16),
        "time_projection.1.weight": ((30720, 5120), torch.bfloat16),
        "head.modulation": ((1, 2, 5120), torch.bfloat16),
        "head.head.weight": ((64, 5120), torch.bfloat16),
        "blocks.7.modulation": ((1, 6, 5120), torch.bfloat16),
        "blocks.7.self_attn.norm_q.weight": ((5120,), torch.float32),
        "blocks.7.norm3.bias": ((5120,), torch.float32),
        "blocks.7.self_attn.attn_op.local_attn.proj_l.weight": ((128, 128), torch.bfloat16),
        "blocks.7.self_attn.attn_op.local_attn.proj_l.bias": ((128,), torch.bfloat16),
        "blocks.7.self_attn.q.int8_weight": ((5120, 5120), torch.int8),
        "blocks.7.self_attn.q.scale": ((40, 40), torch.float32),
        "blocks.7.ffn.0.int8_weight": ((13824, 5120), torch.int8),
        "blocks.7.ffn.0.scale": ((108, 40), torch.float32),
        "blocks.7.ffn.2.int8_weight": ((5120, 13824), torch.int8),
        "blocks.7.ffn.2.scale": ((40, 108), torch.float32),
        "blocks.7.ffn.2.bias": ((5120,), torch.bfloat16),
    }
    for key, (shape, dtype) in expect.items():
        assert tuple(int8_sd[key].shape) == shape, key
        assert int8_sd[key].dtype == dtype, key
    assert tuple(bf16_sd["blocks.0.ffn.0.weight"].shape) == (13824, 5120)
    # quantised: exactly the 10 block linears, never proj_l or top-level layers
    int8_keys = {k for k, t in int8_sd.items() if t.dtype == torch.int8}
    assert len(int8_keys) == 400
    assert {k.split(".", 2)[2].rsplit(".", 1)[0] for k in int8_keys} == set(BLOCK_LINEARS)
    assert not any(
        k.endswith(".weight")
        and k.split(".")[0] == "blocks"
        and k.split(".", 2)[2][: -len(".weight")] in BLOCK_LINEARS
        for k in int8_sd
    )


def test_presets_keep_head_dim_128():
    for name, cfg in PRESETS.items():
        assert cfg.head_dim == 128, name
    assert PRESETS["tiny"].dim == 256 and PRESETS["tiny"].num_layers == 3
