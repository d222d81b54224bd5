"""Triton int8 GEMM with the upstream block-wise numerics (``Int8Linear(mode="triton")``).

Each program computes one 128x128 output tile. For K tile kb it multiplies the int8
activation tile by the int8 weight tile with int32 accumulation (exact), then adds
``float(int_acc) * (sx * sw)`` to an fp32 accumulator with one explicit ``tl.fma`` (a single
rounding, upstream's order), where sx and sw are the single scales
of that activation tile (128 tokens x 128 channels) and weight tile (128 outputs x 128
channels); tiles and scales line up because both use 128x128 blocks. This is the reference
path's arithmetic, so under ``TRITON_INTERPRET=1`` (whose fma rounds once) the two agree bit
for bit (the tests); compiled for a GPU the explicit fma is a hardware FFMA, so the order
cannot be changed by the compiler's contraction choices.

Activations are quantised with torch ops (``quantize_blockwise``) before the kernel.
Opt-in: it has been checked in the interpreter, not yet timed on a GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from turbowan.quant.blockwise import TILE, w8a8_linear

# Triton decides interpreted vs compiled when a kernel is decorated, i.e. at this import.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _int8_tile_gemm_kernel(
    x_ptr,
    w_ptr,
    sx_ptr,
    sw_ptr,
    out_ptr,
    m_size,
    n_size,
    k_size,
    k_tiles,
    stride_xm,
    stride_wn,
    stride_om,
    TILE_SIZE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * TILE_SIZE + tl.arange(0, TILE_SIZE)
    cols = pid_n * TILE_SIZE + tl.arange(0, TILE_SIZE)
    ks = tl.arange(0, TILE_SIZE)
    acc = tl.zeros((TILE_SIZE, TILE_SIZE), dtype=tl.float32)
    for kb in range(0, k_tiles):
        k = kb * TILE_SIZE + ks
        a = tl.load(
            x_ptr + rows[:, None] * stride_xm + k[None, :],
            mask=(rows[:, None] < m_size) & (k[None, :] < k_size),
            other=0,
        )
        b = tl.load(
            w_ptr + cols[:, None] * stride_wn + k[None, :],
            mask=(cols[:, None] < n_size) & (k[None, :] < k_size),
            other=0,
        )
        part = tl.dot(a, tl.trans(b), out_dtype=tl.int32)
        sx = tl.load(sx_ptr + pid_m * k_tiles + kb)
        sw = tl.load(sw_ptr + pid_n * k_tiles + kb)
        acc = tl.fma(part.to(tl.float32), sx * sw, acc)
    tl.store(
        out_ptr + rows[:, None] * stride_om + cols[None, :],
        acc,
        mask=(rows[:, None] < m_size) & (cols[None, :] < n_size),
    )


def check_runnable(device: torch.device) -> None:
    """Fail, with the fix, where the kernel cannot run on ``device``."""
    if device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            f"Int8Linear mode 'triton' needs CUDA tensors, got {device}; use mode='fast' "
            "(or 'reference'), or set TRITON_INTERPRET=1 before importing turbowan"
        )


def _tile_gemm_triton(
    q_x: torch.Tensor, s_x: torch.Tensor, q_weight: torch.Tensor, w_scale: torch.Tensor
) -> torch.Tensor:
    m_dim, k_dim = q_x.shape
    n_dim = q_weight.shape[0]
    q_w = q_weight if q_weight.stride(-1) == 1 else q_weight.contiguous()
    out = torch.empty(m_dim, n_dim, dtype=torch.float32, device=q_x.device)
    k_tiles = triton.cdiv(k_dim, TILE)
    grid = (triton.cdiv(m_dim, TILE), triton.cdiv(n_dim, TILE))
    _int8_tile_gemm_kernel[grid](
        q_x,
        q_w,
        s_x.contiguous(),
        w_scale.float().contiguous(),
        out,
        m_dim,
        n_dim,
        k_dim,
        k_tiles,
        q_x.stride(0),
        q_w.stride(0),
        out.stride(0),
        TILE_SIZE=TILE,
        **({} if INTERPRETED else {"num_warps": 8, "num_stages": 3}),
    )
    return out


def int8_linear_triton(
    x: torch.Tensor, q_weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Same contract and numerics as ``int8_linear_reference``, on the Triton kernel."""
    check_runnable(x.device)
    return w8a8_linear(x, q_weight, w_scale, bias, _tile_gemm_triton)
