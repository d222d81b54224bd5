"""Linear branch of SLA and the shared ``proj_l`` projection.

The released upstream code runs the linear branch over ALL tokens (not only the unselected
blocks the paper describes) and lets ``proj_l`` learn the correction, so we do the same:
phi(x) = softmax over the head dim, o_l = phi(q) (phi(k)^T v) / (1e-5 + phi(q) . sum phi(k)).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

LINEAR_EPS = 1e-5


def rounder(compute_dtype: torch.dtype, arith_dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """Return a function that rounds arith-dtype values to ``compute_dtype`` precision.

    On CPU we do the arithmetic in float32 (fast GEMMs) while reproducing where a bf16/fp16 run
    rounds; when both dtypes agree this is the identity.
    """
    if compute_dtype == arith_dtype:
        return lambda x: x
    return lambda x: x.to(compute_dtype).to(arith_dtype)


def linear_branch(
    q: Tensor, k: Tensor, v: Tensor, *, compute_dtype: torch.dtype, arith_dtype: torch.dtype
) -> Tensor:
    """o_l for (B, H, L, D) q, k, v; returns arith_dtype values rounded like compute_dtype."""
    rnd = rounder(compute_dtype, arith_dtype)
    phi_q = rnd(torch.softmax(rnd(q.to(arith_dtype)), dim=-1))
    phi_k = rnd(torch.softmax(rnd(k.to(arith_dtype)), dim=-1))
    values = rnd(v.to(arith_dtype))
    kv = rnd(phi_k.transpose(-1, -2) @ values)  # (B, H, D, D)
    k_sum = rnd(phi_k.sum(dim=-2, keepdim=True))  # (B, H, 1, D)
    numerator = rnd(phi_q @ kv)
    denominator = rnd(LINEAR_EPS + rnd((phi_q * k_sum).sum(dim=-1, keepdim=True)))
    return rnd(numerator / denominator)


def project_linear_branch(
    o_linear: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    compute_dtype: torch.dtype,
    arith_dtype: torch.dtype,
) -> Tensor:
    """proj_l (one D x D Linear shared by every head), cast explicitly to a common dtype.

    Upstream relies on CUDA bf16 autocast here, which does nothing on CPU; we cast the weights
    to the compute precision ourselves so CPU and GPU agree.
    """
    rnd = rounder(compute_dtype, arith_dtype)
    w = rnd(weight.to(arith_dtype))
    out = o_linear @ w.t()
    if bias is not None:
        out = out + rnd(bias.to(arith_dtype))
    return rnd(out)


def projected_linear_branch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    compute_dtype: torch.dtype,
    arith_dtype: torch.dtype,
) -> Tensor:
    """proj_l(o_l) for (B, H, L, D) q, k, v.

    In float32 the projection is folded into the D x D state, (phi_q kv / den) W^T + b =
    phi_q (kv W^T) / den + b, which saves an L x D x D GEMM and two passes over L x D tensors.
    Reduced precision keeps upstream's order (o_l is rounded before it is projected).
    """
    if compute_dtype != torch.float32 or arith_dtype != torch.float32:
        o_linear = linear_branch(q, k, v, compute_dtype=compute_dtype, arith_dtype=arith_dtype)
        return project_linear_branch(
            o_linear, weight, bias, compute_dtype=compute_dtype, arith_dtype=arith_dtype
        )
    phi_q = torch.softmax(q.float(), dim=-1)
    phi_k = torch.softmax(k.float(), dim=-1)
    kv = phi_k.transpose(-1, -2) @ v.float()  # (B, H, D, D)
    k_sum = phi_k.sum(dim=-2).unsqueeze(-1)  # (B, H, D, 1)
    numerator = phi_q @ (kv @ weight.float().t())
    denominator = (phi_q @ k_sum).add_(LINEAR_EPS)
    out = numerator.div_(denominator)
    return out if bias is None else out.add_(bias.float())
