"""Safe checkpoint reading shared by every model loader (DiT, VAE, text encoder)."""

from turbowan.checkpoint.io import (
    CheckpointReadError,
    TensorSpec,
    load_state_dict,
    read_tensor_specs,
)

__all__ = ["CheckpointReadError", "TensorSpec", "load_state_dict", "read_tensor_specs"]
