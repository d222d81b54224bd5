"""Several processes, one video: Ulysses sequence parallel on torch.distributed."""

from turbowan.distributed.dit import (
    UlyssesShard,
    disable_sequence_parallel,
    enable_sequence_parallel,
    token_align,
    valid_sp_sizes,
)
from turbowan.distributed.ulysses import (
    INT8_TOKEN_TILE,
    SequenceParallel,
    gather_sequence,
    head_to_seq,
    seq_to_head,
    split_sizes,
)

__all__ = [
    "INT8_TOKEN_TILE",
    "SequenceParallel",
    "UlyssesShard",
    "disable_sequence_parallel",
    "enable_sequence_parallel",
    "gather_sequence",
    "head_to_seq",
    "seq_to_head",
    "split_sizes",
    "token_align",
    "valid_sp_sizes",
]
