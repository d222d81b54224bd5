"""The `sagesla` backend: SLA with SpargeAttn's int8/fp8 CUDA kernels for the sparse branch.

Upstream's default attention. It exists only where SpargeAttn (``spas_sage_attn``) imports,
which needs a CUDA GPU; everywhere else it fails with a message that says what to use instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from turbowan.ops.block_map import select_blocks
from turbowan.ops.sla_linear import linear_branch, project_linear_branch

SAGESLA_MISSING = (
    "attention='sagesla' needs SpargeAttn (the `spas_sage_attn` module), which is not "
    "importable here{why}. It only builds and runs with a CUDA GPU: install it with "
    "`pip install SpargeAttn` (or from github.com/thu-ml/SpargeAttn) on a CUDA machine, or use "
    "attention='sla' (Triton on CUDA, fast PyTorch path on CPU), which computes the same "
    "sparse-linear attention without it."
)


def _import_sparge():
    try:
        from spas_sage_attn import block_sparse_sage2_attn_cuda
    except Exception as exc:  # ImportError, or a CUDA-extension load failure
        raise RuntimeError(SAGESLA_MISSING.format(why=f" ({type(exc).__name__}: {exc})")) from exc
    return block_sparse_sage2_attn_cuda


def sagesla_available() -> bool:
    """True where SpargeAttn imports and a CUDA device is present."""
    try:
        _import_sparge()
    except RuntimeError:
        return False
    return torch.cuda.is_available()


def _sparge_blocks(device: torch.device) -> tuple[int, int]:
    """SpargeAttn's block sizes: 64 x 128 on sm90 (H100/H200), 128 x 64 elsewhere."""
    major, _ = torch.cuda.get_device_capability(device)
    return (64, 128) if major == 9 else (128, 64)


def sagesla_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    topk: float,
    proj_weight: Tensor | None = None,
    proj_bias: Tensor | None = None,
) -> Tensor:
    """SLA on (B, L, H, D) CUDA tensors with SpargeAttn's quantised block-sparse kernel.

    Not exercised by this project's CI (no GPU, no SpargeAttn); the linear branch and proj_l
    are the ones the `sla` backend uses.
    """
    sparse_kernel = _import_sparge()
    if q.device.type != "cuda":
        raise RuntimeError(SAGESLA_MISSING.format(why=f" for tensors on {q.device}"))
    dtype = q.dtype
    cdtype = torch.bfloat16 if dtype in (torch.float32, torch.bfloat16) else torch.float16
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    block_q, block_k = _sparge_blocks(q.device)
    selection = select_blocks(qh, kh, topk=topk, block_q=block_q, block_k=block_k)
    o_sparse = sparse_kernel(
        qh.to(cdtype),
        kh.to(cdtype),
        vh.to(cdtype),
        mask_id=selection.sparse_map,
        tensor_layout="HND",
        output_dtype=cdtype,
    )
    out = o_sparse
    if proj_weight is not None:
        o_linear = linear_branch(qh, kh, vh, compute_dtype=cdtype, arith_dtype=cdtype)
        out = out + project_linear_branch(
            o_linear, proj_weight, proj_bias, compute_dtype=cdtype, arith_dtype=cdtype
        )
    return out.to(dtype).transpose(1, 2).contiguous()
