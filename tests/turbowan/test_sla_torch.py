"""SLA PyTorch path: exact special cases, an independent dense-mask reference, edge cases."""

from __future__ import annotations

import math
import sys

import pytest
import torch

import turbowan.ops.sla_torch as sla_torch
from turbowan.ops import (
    block_selection,
    dense_attention,
    kept_key_blocks,
    mean_pool_blocks,
    sagesla_attention,
    sagesla_available,
    sparse_linear_attention,
)
from turbowan.ops.sla_reference import sparse_attention_reference


def _qkv(batch: int, length: int, heads: int, dim: int, seed: int = 0, offset: float = 0.0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, length, heads, dim, generator=gen) for _ in range(3))
    if offset:  # a per-64-token-block offset spreads the block scores apart
        blocks = -(-length // 64)
        shift = torch.randn(batch, blocks, heads, dim, generator=gen) * offset
        shift = shift.repeat_interleave(64, dim=1)[:, :length]
        q, k = q + shift, k + shift
    return q, k, v


def _softmax_attention(q, k, v):
    """Plain float64 softmax attention on (B, L, H, D)."""
    qh, kh, vh = (x.double().transpose(1, 2) for x in (q, k, v))
    probs = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (probs @ vh).transpose(1, 2)


@pytest.mark.parametrize("length", [256, 300])
def test_all_blocks_selected_and_zero_proj_l_is_dense_attention(length):
    q, k, v = _qkv(2, length, 2, 64)
    zero_w, zero_b = torch.zeros(64, 64), torch.zeros(64)
    out = sparse_linear_attention(
        q, k, v, topk=1.0, proj_weight=zero_w, proj_bias=zero_b, backend="torch"
    )
    expected = _softmax_attention(q, k, v)
    assert (out.double() - expected).abs().max().item() < 1e-5
    sdpa = dense_attention(q, k, v)
    assert (out - sdpa).abs().max().item() < 1e-5
    no_proj = sparse_linear_attention(q, k, v, topk=1.0, backend="torch")
    assert (no_proj - out).abs().max().item() < 1e-6


@pytest.mark.parametrize(
    ("length", "topk", "block_q", "block_k"),
    [(333, 0.3, 128, 64), (333, 0.5, 64, 64), (520, 0.2, 128, 64), (97, 0.6, 32, 16)],
)
def test_sparse_branch_matches_dense_mask_reference(length, topk, block_q, block_k):
    q, k, v = _qkv(2, length, 3, 32, seed=length, offset=1.0)
    out = sparse_linear_attention(
        q, k, v, topk=topk, block_q=block_q, block_k=block_k, backend="torch"
    )
    ref = sparse_attention_reference(q, k, v, topk=topk, block_q=block_q, block_k=block_k)
    assert out.shape == q.shape
    assert (out.double() - ref).abs().max().item() < 1e-5
    # It really is sparse: the dense answer differs by far more than the tolerance.
    assert (ref - _softmax_attention(q, k, v)).abs().max().item() > 1e-2


def test_gradients_match_dense_mask_reference():
    # The torch path is differentiable (out-of-place steps when an input requires grad).
    q, k, v = (x.requires_grad_() for x in _qkv(1, 150, 2, 16, seed=12, offset=1.0))
    kwargs = dict(topk=0.5, block_q=32, block_k=16)
    out = sparse_linear_attention(q, k, v, backend="torch", **kwargs)
    upstream_grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * upstream_grad).sum().backward()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = sparse_attention_reference(q64, k64, v64, **kwargs)
    (ref * upstream_grad.double()).sum().backward()
    for ours, theirs in ((q, q64), (k, k64), (v, v64)):
        assert (ours.grad.double() - theirs.grad).abs().max().item() < 1e-5
    with torch.no_grad():  # the buffered inference path gives the same forward result
        assert (sparse_linear_attention(q, k, v, **kwargs) - out).abs().max().item() < 1e-6


def test_explicit_triton_backend_refuses_gradients():
    q, k, v = (x.requires_grad_() for x in _qkv(1, 128, 2, 64))
    with pytest.raises(RuntimeError, match="no backward"):
        sparse_linear_attention(q, k, v, topk=0.5, backend="triton")


def test_chunking_does_not_change_the_result(monkeypatch):
    q, k, v = _qkv(1, 700, 2, 32, seed=3, offset=1.0)
    whole = sparse_linear_attention(q, k, v, topk=0.4, block_q=64, backend="torch")
    monkeypatch.setattr(sla_torch, "_CHUNK_BYTES", 1)  # one query block per chunk
    chunked = sparse_linear_attention(q, k, v, topk=0.4, block_q=64, backend="torch")
    assert (whole - chunked).abs().max().item() < 1e-6


@pytest.mark.parametrize("length", [1, 50, 200, 577])
def test_short_inputs_keep_one_key_block_and_stay_finite(length):
    # topk 0.1 of < 10 key blocks is 0 upstream (NaN output); we keep at least one block.
    q, k, v = _qkv(1, length, 2, 64, seed=length)
    selection = block_selection(q, k, topk=0.1)
    assert selection.kk == max(1, -(-length // 64) // 10)
    out = sparse_linear_attention(q, k, v, topk=0.1, backend="torch")
    assert torch.isfinite(out).all()
    ref = sparse_attention_reference(q, k, v, topk=0.1)
    assert (out.double() - ref).abs().max().item() < 1e-5
    if length <= 64:  # a single key block: sparse attention is dense attention
        assert (out.double() - _softmax_attention(q, k, v)).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    ("topk", "n_blocks", "kept"),
    [
        (0.1, 9, 1),
        (0.1, 10, 1),
        (0.1, 30, 3),
        (0.1, 1182, 118),
        (0.1, 512, 51),
        (0.25, 6, 1),
        (0.5, 4, 2),
        (1.0, 7, 7),
        (0.01, 3, 1),
    ],
)
def test_kept_key_blocks(topk, n_blocks, kept):
    assert kept_key_blocks(topk, n_blocks) == kept


def test_mean_pool_averages_partial_block_over_real_count():
    x = torch.arange(5 * 2, dtype=torch.float32).view(1, 1, 5, 2)
    pooled = mean_pool_blocks(x, 2)
    expected = torch.tensor([[[[1.0, 2.0], [5.0, 6.0], [8.0, 9.0]]]])
    assert torch.equal(pooled, expected)


def test_selection_ignores_a_shared_key_offset_smooth_k():
    q, k, _ = _qkv(1, 384, 2, 64, seed=5, offset=1.0)
    shifted = k + 50.0 * torch.randn(64)  # same offset on every token
    a = block_selection(q, k, topk=0.5, block_q=64)
    b = block_selection(q, shifted, topk=0.5, block_q=64)
    assert torch.equal(a.lut, b.lut)
    # Without smoothing the offset would dominate: every query block would pick the same keys.
    assert a.lut.unique(dim=2).shape[2] > 1


def test_linear_branch_matches_independent_formula():
    q, k, v = _qkv(1, 150, 2, 16, seed=9)
    eye, zero = torch.eye(16), torch.zeros(16)
    with_linear = sparse_linear_attention(
        q,
        k,
        v,
        topk=0.5,
        block_q=32,
        block_k=16,
        proj_weight=eye,
        proj_bias=zero,
        backend="torch",
    )
    sparse_only = sparse_linear_attention(q, k, v, topk=0.5, block_q=32, block_k=16)
    phi_q = torch.softmax(q.double(), dim=-1)  # (B, L, H, D), feature map over head_dim
    phi_k = torch.softmax(k.double(), dim=-1)
    expected = torch.empty_like(phi_q)
    for i in range(q.shape[1]):
        weights = (phi_q[:, i : i + 1] * phi_k).sum(-1, keepdim=True)  # (B, L, H, 1)
        numer = (weights * v.double()).sum(1)
        denom = 1e-5 + weights.sum(1)
        expected[:, i] = numer / denom
    assert ((with_linear - sparse_only).double() - expected).abs().max().item() < 1e-5


def test_proj_l_is_one_linear_shared_by_all_heads():
    q, k, v = _qkv(1, 130, 3, 16, seed=11)
    gen = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(16, 16, generator=gen), torch.randn(16, generator=gen)
    kwargs = dict(topk=0.5, block_q=32, block_k=16, backend="torch")
    eye = sparse_linear_attention(q, k, v, proj_weight=torch.eye(16), **kwargs)
    base = sparse_linear_attention(q, k, v, **kwargs)
    proj = sparse_linear_attention(q, k, v, proj_weight=weight, proj_bias=bias, **kwargs)
    o_linear = eye - base  # (B, L, H, D)
    expected = base + o_linear @ weight.t() + bias
    assert (proj - expected).abs().max().item() < 1e-4


def test_bf16_inputs_return_bf16_close_to_fp32():
    q, k, v = _qkv(1, 300, 2, 64, seed=4, offset=1.0)
    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(1)) / 8
    kwargs = dict(topk=0.5, block_q=64, proj_weight=weight, backend="torch")
    ref = sparse_linear_attention(q, k, v, **kwargs)
    out = sparse_linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), **kwargs)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max().item() < 5e-2
    emulated = sparse_linear_attention(q, k, v, compute_dtype=torch.bfloat16, **kwargs)
    assert emulated.dtype == torch.float32
    assert 0 < (emulated - ref).abs().max().item() < 5e-2


def _call(**overrides):
    q, k, v = _qkv(1, 64, 2, 16)
    kwargs = dict(q=q, k=k, v=v, topk=0.5)
    kwargs.update(overrides)
    return sparse_linear_attention(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"), **kwargs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"q": torch.zeros(64, 2, 16)}, "4-D"),
        ({"k": torch.zeros(1, 32, 2, 16)}, "same"),
        ({"v": torch.zeros(1, 64, 2, 16, dtype=torch.float64)}, "one floating dtype"),
        ({"topk": 0.0}, "topk"),
        ({"topk": 1.5}, "topk"),
        ({"block_q": 0}, "block_q"),
        ({"proj_bias": torch.zeros(16)}, "without proj_weight"),
        ({"proj_weight": torch.zeros(8, 8)}, r"\(16, 16\)"),
        ({"backend": "cuda"}, "unknown backend"),
        ({"compute_dtype": torch.float64}, "compute_dtype"),
    ],
)
def test_bad_input_names_problem_and_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        _call(**overrides)


def test_triton_backend_on_cpu_without_interpreter_says_what_to_do(monkeypatch):
    import turbowan.ops.sla_triton as sla_triton

    monkeypatch.setattr(sla_triton, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="backend='torch'"):
        _call(backend="triton")


def test_dense_attention_is_softmax_attention():
    q, k, v = _qkv(2, 70, 2, 32, seed=8)
    out = dense_attention(q, k[:, :50], v[:, :50])
    assert out.shape == (2, 70, 2, 32)
    assert (out.double() - _softmax_attention(q, k[:, :50], v[:, :50])).abs().max() < 1e-5


def test_sagesla_without_spargeattn_explains_install_and_alternative(monkeypatch):
    monkeypatch.setitem(sys.modules, "spas_sage_attn", None)  # makes the import fail
    assert not sagesla_available()
    q, k, v = _qkv(1, 128, 2, 64)
    with pytest.raises(RuntimeError) as info:
        sagesla_attention(q, k, v, topk=0.1)
    text = str(info.value)
    assert "pip install SpargeAttn" in text and "CUDA" in text and "attention='sla'" in text


def test_auto_backend_choice():
    from turbowan.ops.sla import resolve_backend

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("auto", cuda) == "triton"  # triton is a dependency on Linux
    assert resolve_backend("auto", cuda, needs_grad=True) == "torch"  # kernels: forward only
    assert resolve_backend("auto", cuda, tileable=False) == "torch"  # e.g. head_dim 48
    assert resolve_backend("torch", cuda) == "torch"
