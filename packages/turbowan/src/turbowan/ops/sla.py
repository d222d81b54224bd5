"""Public SLA op: validation, backend choice, and the sum o = o_s + proj_l(o_l).

Inputs are (B, L, H, D), as the Wan attention hands them over (upstream's docstring says
(B, H, L, D), but the module transposes internally). Everything below works on (B, H, L, D)
views; the result comes back as (B, L, H, D) in the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from turbowan.ops.block_map import BlockSelection, select_blocks, tileable
from turbowan.ops.sla_linear import projected_linear_branch, rounder
from turbowan.ops.sla_torch import block_sparse_attention_torch

BACKENDS = ("auto", "torch", "triton")
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"sparse_linear_attention: {name} must be a 4-D (B, L, H, D) tensor, got {got}; "
                "pass q, k, v as (batch, tokens, heads, head_dim) before merging heads"
            )
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            "sparse_linear_attention: q, k and v must have the same (B, L, H, D) shape (SLA is "
            f"self-attention), got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
            "use dense_attention for cross-attention"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(
            f"sparse_linear_attention: q, k, v need one floating dtype, got {q.dtype}, {k.dtype}, "
            f"{v.dtype}; cast them to a common dtype first"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"sparse_linear_attention: q, k, v are on {q.device}, {k.device}, {v.device}; "
            "move them to one device"
        )
    if q.shape[1] == 0:
        raise ValueError(
            "sparse_linear_attention: the sequence is empty (L = 0); pass L >= 1 tokens"
        )


def _check_options(
    q: Tensor,
    topk: float,
    block_q: int,
    block_k: int,
    proj_weight: Tensor | None,
    proj_bias: Tensor | None,
    backend: str,
    compute_dtype: torch.dtype | None,
) -> None:
    dim = q.shape[-1]
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"sparse_linear_attention: {name} must be a positive int, got {value!r}; "
                "upstream uses block_q=128, block_k=64"
            )
    if not isinstance(topk, (int, float)) or isinstance(topk, bool) or not 0.0 < topk <= 1.0:
        raise ValueError(
            f"sparse_linear_attention: topk must be a ratio in (0, 1], got {topk!r}; "
            "it is the fraction of key blocks each query block attends to exactly (default 0.1)"
        )
    if proj_bias is not None and proj_weight is None:
        raise ValueError(
            "sparse_linear_attention: proj_bias given without proj_weight; pass both proj_l "
            "tensors, or neither for pure sparse attention"
        )
    if proj_weight is not None and tuple(proj_weight.shape) != (dim, dim):
        raise ValueError(
            f"sparse_linear_attention: proj_weight must be ({dim}, {dim}) (proj_l maps head_dim "
            f"to head_dim, shared by all heads), got {tuple(proj_weight.shape)}"
        )
    if proj_bias is not None and tuple(proj_bias.shape) != (dim,):
        raise ValueError(
            f"sparse_linear_attention: proj_bias must be ({dim},), got {tuple(proj_bias.shape)}"
        )
    if backend not in BACKENDS:
        raise ValueError(
            f"sparse_linear_attention: unknown backend {backend!r}; choose one of {BACKENDS}"
        )
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"sparse_linear_attention: compute_dtype must be one of {COMPUTE_DTYPES} or None "
            f"(= the input dtype), got {compute_dtype!r}"
        )


def resolve_backend(
    backend: str, device: torch.device, needs_grad: bool = False, tileable: bool = True
) -> str:
    """'auto' -> Triton kernels on CUDA when Triton imports, the PyTorch path otherwise.

    The kernels are forward-only and tile powers of two, so 'auto' takes the PyTorch path
    when gradients are wanted or the sizes do not tile; an explicit 'triton' then fails with
    the fix.
    """
    if backend == "triton" and needs_grad:
        raise RuntimeError(
            "sparse_linear_attention(backend='triton') has no backward pass (inference only), "
            "but an input requires grad; run under torch.no_grad() / torch.inference_mode(), "
            "or use backend='torch' (differentiable)"
        )
    if backend != "auto":
        return backend
    if device.type != "cuda" or needs_grad or not tileable:
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "torch"
    return "triton"


def sparse_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    topk: float,
    block_q: int = 128,
    block_k: int = 64,
    proj_weight: Tensor | None = None,
    proj_bias: Tensor | None = None,
    backend: str = "auto",
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """Sparse-Linear Attention (TurboDiffusion SLA) on (B, L, H, D) q, k, v.

    Each query block of ``block_q`` tokens attends exactly (softmax, scale 1/sqrt(D)) to its
    top ``max(1, floor(topk * Nb))`` key blocks of ``block_k`` tokens; a linear-attention branch
    over all tokens, projected by ``proj_l`` (``proj_weight`` (D, D), ``proj_bias`` (D,), shared
    by the heads), is added. With ``proj_weight=None`` the linear branch is skipped, which is
    what a layer with a zero ``proj_l`` (an untrained SLA layer) computes.

    ``compute_dtype`` (default: the input dtype) is the precision of the branch inputs and
    outputs: upstream runs them in bfloat16 even for float32 inputs; pass torch.bfloat16 to
    reproduce that, torch.float32 for exact math. ``backend``: "torch" (fast CPU path, float32
    arithmetic), "triton" (CUDA kernels; on CPU only under TRITON_INTERPRET=1), or "auto".
    """
    _check_qkv(q, k, v)
    _check_options(q, topk, block_q, block_k, proj_weight, proj_bias, backend, compute_dtype)
    return sla_forward(q, k, v, topk=topk, block_q=block_q, block_k=block_k,
                       proj_weight=proj_weight, proj_bias=proj_bias, backend=backend,
                       compute_dtype=compute_dtype)


def sla_forward(q: Tensor, k: Tensor, v: Tensor, *, topk: float, block_q: int, block_k: int,
                proj_weight: Tensor | None, proj_bias: Tensor | None, backend: str = "auto",
                compute_dtype: torch.dtype | None = None) -> Tensor:
    """:func:`sparse_linear_attention` without checking its arguments: for callers that
    checked them once when they were built (the DiT's attention, once per block per step)."""
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, proj_weight, proj_bias)
    )
    tileable_sizes = tileable(q.shape[-1], block_q, block_k)
    backend = resolve_backend(backend, q.device, needs_grad, tileable_sizes)
    cdtype = compute_dtype or q.dtype
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))

    if backend == "triton":
        from turbowan.ops import sla_triton

        sla_triton.check_usable(q, block_q=block_q, block_k=block_k)
        selection = select_blocks(
            qh, kh, topk=topk, block_q=block_q, block_k=block_k, pool=sla_triton.mean_pool_triton
        )
        arith = torch.float32 if sla_triton.INTERPRETED else cdtype
        rnd = rounder(cdtype, arith)
        o_sparse = rnd(
            sla_triton.block_sparse_attention_triton(
                rnd(qh.to(arith)),
                rnd(kh.to(arith)),
                rnd(vh.to(arith)),
                selection.lut,
                block_q=block_q,
                block_k=block_k,
                round_p_bf16=cdtype == torch.bfloat16,
            )
        )
    else:
        arith = torch.float32
        rnd = rounder(cdtype, arith)
        selection = select_blocks(qh, kh, topk=topk, block_q=block_q, block_k=block_k)
        o_sparse = rnd(
            block_sparse_attention_torch(
                rnd(qh.float()),
                rnd(kh.float()),
                rnd(vh.float()),
                selection.lut,
                block_q=block_q,
                block_k=block_k,
                round_to=None if cdtype == torch.float32 else cdtype,
            )
        )

    out = o_sparse
    if proj_weight is not None:
        projected = projected_linear_branch(
            qh, kh, vh, proj_weight, proj_bias, compute_dtype=cdtype, arith_dtype=arith
        )
        # o_sparse is a fresh buffer: add in place unless autograd needs it untouched.
        out = rnd(o_sparse + projected if needs_grad else o_sparse.add_(projected))
    # A (B, L, H, D) view, like SDPA's output; callers merge heads with flatten/reshape.
    return out.to(q.dtype).transpose(1, 2)


def block_selection(
    q: Tensor, k: Tensor, *, topk: float, block_q: int = 128, block_k: int = 64
) -> BlockSelection:
    """The key blocks SLA selects for (B, L, H, D) q and k (``.lut``, ``.sparse_map``)."""
    _check_qkv(q, k, k)
    return select_blocks(
        q.transpose(1, 2), k.transpose(1, 2), topk=topk, block_q=block_q, block_k=block_k
    )
