"""Triton kernels for SLA: block mean-pooling and block-sparse flash attention (forward).

They run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests check
them). The interpreter mishandles bfloat16 (it stores it as raw 16-bit integers and ``tl.dot``
multiplies those), so callers feed float32 or float16 there; the public op does this for you.
Masked loads pass ``other=0.0``: the language leaves masked-out lanes undefined, and the pooled
sums rely on them being zero.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from turbowan.ops.block_map import num_blocks, tileable

# Triton decides interpreted vs compiled when a kernel is decorated, i.e. at this import.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _block_mean_pool_kernel(
    x_ptr,
    out_ptr,
    length,
    heads,
    stride_xb,
    stride_xh,
    stride_xl,
    stride_ob,
    stride_oh,
    stride_on,
    BLOCK: tl.constexpr,
    DIM: tl.constexpr,
):
    block_id = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    rows = block_id * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, DIM)
    ptrs = (
        x_ptr
        + b * stride_xb
        + h * stride_xh
        + rows[:, None].to(tl.int64) * stride_xl
        + cols[None, :]
    )
    x = tl.load(ptrs, mask=(rows < length)[:, None], other=0.0).to(tl.float32)
    count = tl.minimum(length - block_id * BLOCK, BLOCK).to(tl.float32)
    mean = tl.sum(x, axis=0) / count
    tl.store(out_ptr + b * stride_ob + h * stride_oh + block_id * stride_on + cols, mean)


@triton.jit
def _block_sparse_attn_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    lut_ptr,
    o_ptr,
    length,
    heads,
    kk,
    qk_scale_log2,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_ob,
    stride_oh,
    stride_ol,
    stride_lb,
    stride_lh,
    stride_lm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DIM: tl.constexpr,
    EXACT_FP32: tl.constexpr,
    ROUND_P_BF16: tl.constexpr,
):
    m_block = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DIM)
    row_ok = offs_m < length

    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    q = tl.load(
        q_base + offs_m[:, None].to(tl.int64) * stride_ql + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM], tl.float32)
    lut_row = lut_ptr + b * stride_lb + h * stride_lh + m_block * stride_lm
    for t in range(0, kk):
        n_block = tl.load(lut_row + t)
        keys = n_block * BLOCK_N + offs_n
        key_ok = keys < length
        k_t = tl.load(
            k_base + keys[None, :].to(tl.int64) * stride_kl + offs_d[:, None],
            mask=key_ok[None, :],
            other=0.0,
        )
        if EXACT_FP32:
            s = tl.dot(q, k_t, input_precision="ieee")
        else:
            s = tl.dot(q, k_t)
        s = tl.where(key_ok[None, :], s * qk_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if ROUND_P_BF16:
            # Emulate the GPU's bf16 P (round to nearest even) in float32 bits, for the
            # interpreter, which cannot hold bf16 itself.
            bits = p.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            p = bits.to(tl.float32, bitcast=True)
        vals = tl.load(
            v_base + keys[:, None].to(tl.int64) * stride_vl + offs_d[None, :],
            mask=key_ok[:, None],
            other=0.0,
        )
        if EXACT_FP32:
            pv = tl.dot(p.to(vals.dtype), vals, input_precision="ieee")
        else:
            pv = tl.dot(p.to(vals.dtype), vals)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    acc = acc / l_i[:, None]
    o_base = o_ptr + b * stride_ob + h * stride_oh
    tl.store(
        o_base + offs_m[:, None].to(tl.int64) * stride_ol + offs_d[None, :],
        acc.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )


def check_usable(q: Tensor, *, block_q: int, block_k: int) -> None:
    """Fail early, with the fix, where the kernels cannot run these inputs."""
    if q.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            f"sparse_linear_attention(backend='triton') needs CUDA tensors, got {q.device}; use "
            "backend='torch' (the fast CPU path), or set TRITON_INTERPRET=1 before importing "
            "turbowan to run the kernels in Triton's (slow) interpreter"
        )
    dim = q.shape[-1]
    for name, value in (("head_dim", dim), ("block_q", block_q), ("block_k", block_k)):
        if not tileable(value):
            raise ValueError(
                f"sparse_linear_attention(backend='triton'): {name} must be a power of two >= 16, "
                f"got {value}; use backend='torch' for other sizes"
            )


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def mean_pool_triton(x: Tensor, block: int) -> Tensor:
    """Block means of (B, H, L, D) x -> float32 (B, H, nb, D); partial last block over its count."""
    if INTERPRETED and x.dtype == torch.bfloat16:
        x = x.float()  # the interpreter cannot load bf16
    x = _last_dim_contiguous(x)
    batch, heads, length, dim = x.shape
    n = num_blocks(length, block)
    out = torch.empty(batch, heads, n, dim, dtype=torch.float32, device=x.device)
    _block_mean_pool_kernel[(n, batch * heads)](
        x,
        out,
        length,
        heads,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        BLOCK=block,
        DIM=dim,
    )
    return out


def block_sparse_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lut: Tensor,
    *,
    block_q: int,
    block_k: int,
    round_p_bf16: bool = False,
) -> Tensor:
    """Block-sparse softmax attention of (B, H, L, D) q, k, v over ``lut``; output in q.dtype.

    ``round_p_bf16`` rounds the probabilities to bf16 precision inside a float32 kernel, so the
    interpreter reproduces a bf16 GPU run (which rounds P when it casts it to v's dtype).
    """
    if INTERPRETED and q.dtype == torch.bfloat16:
        raise ValueError(
            "bfloat16 cannot run in the Triton interpreter (it multiplies raw bit patterns); "
            "pass float32 or float16 tensors"
        )
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    lut = lut.contiguous()
    batch, heads, length, dim = q.shape
    n_query_blocks, kk = lut.shape[2], lut.shape[3]
    out = torch.empty(batch, heads, length, dim, dtype=q.dtype, device=q.device)
    big_dim = dim >= 128
    _block_sparse_attn_fwd_kernel[(n_query_blocks, batch * heads)](
        q,
        k,
        v,
        lut,
        out,
        length,
        heads,
        kk,
        (1.0 / math.sqrt(dim)) * math.log2(math.e),
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        lut.stride(0),
        lut.stride(1),
        lut.stride(2),
        BLOCK_M=block_q,
        BLOCK_N=block_k,
        DIM=dim,
        EXACT_FP32=q.dtype == torch.float32,
        ROUND_P_BF16=round_p_bf16 and q.dtype == torch.float32,
        num_warps=8 if big_dim else 4,
        # fp32 tiles with 3 stages would exceed shared memory at D=128
        num_stages=3 if q.element_size() == 2 else 1,
    )
    return out
