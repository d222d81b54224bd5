"""Attention ops for the Wan DiT, all on (B, L, H, D) tensors.

- `dense_attention`: PyTorch SDPA (the `original` backend).
- `sparse_linear_attention`: TurboDiffusion's SLA (the `sla` backend); fast PyTorch path on
  CPU, Triton kernels on CUDA.
- `sagesla_attention`: SLA with SpargeAttn kernels (CUDA + `pip install SpargeAttn` only).
- `block_selection` and friends: the block map SLA uses, for inspection and tests.
"""

from turbowan.ops.block_map import BlockSelection, kept_key_blocks, mean_pool_blocks, num_blocks
from turbowan.ops.dense import dense_attention
from turbowan.ops.sagesla import sagesla_attention, sagesla_available
from turbowan.ops.sla import block_selection, sparse_linear_attention

__all__ = [
    "BlockSelection",
    "block_selection",
    "dense_attention",
    "kept_key_blocks",
    "mean_pool_blocks",
    "num_blocks",
    "sagesla_attention",
    "sagesla_available",
    "sparse_linear_attention",
]
