"""Where each tensor of a block sits inside the block's one flat byte buffer.

Profile and packing share this one function, so the bytes a strategy plans with are exactly
the bytes the engine moves. Tensors of different dtypes (int8 weights, fp32 scales, bf16
bias) share the buffer; each starts on an ALIGN-byte boundary so ``.view(dtype)`` is legal
and vectorised kernels see aligned pointers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offloadkit.errors import OffloadError

ALIGN = 256  # bytes; cudaMalloc itself aligns to 256, so slot views keep that guarantee


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass(frozen=True)
class TensorRef:
    """One parameter or buffer slot of a module: where to re-point it."""

    module: torch.nn.Module
    attr: str
    kind: str  # "param" or "buffer"
    qualname: str  # dotted name inside the whole model

    def get(self) -> torch.Tensor:
        table = self.module._parameters if self.kind == "param" else self.module._buffers
        return table[self.attr]

    def set(self, tensor: torch.Tensor) -> None:
        """Point the slot at ``tensor``: a parameter keeps its Parameter object (so
        optimisers and user references stay valid), a buffer is replaced."""
        if self.kind == "param":
            self.module._parameters[self.attr].data = tensor
        else:
            self.module._buffers[self.attr] = tensor


def require_data(ref: TensorRef) -> torch.Tensor:
    """The tensor ``ref`` points at, refused if it is on ``meta``: there are no bytes to
    pack or move (the one check staging, packing and placement share)."""
    t = ref.get()
    if t.device.type == "meta":
        raise OffloadError(
            f"{ref.qualname!r} is on the meta device (no data). Load the weights "
            "(load_state_dict(..., assign=True)) before offloadkit.apply() or stage(); "
            "meta models can only be profiled and planned."
        )
    return t


@dataclass(frozen=True)
class TensorEntry:
    """A tensor's place in its block buffer plus what restoring it needs."""

    ref: TensorRef
    offset: int
    nbytes: int
    shape: torch.Size
    dtype: torch.dtype
    requires_grad: bool
    original_device: torch.device
    contiguous: bool
    #: the model's tensor is an inference tensor (built under torch.inference_mode()); a
    #: Parameter made so keeps a disabled version counter whatever ``.data`` it is given, so
    #: every tensor the engine binds in its place must be an inference tensor too
    inference: bool = False


@dataclass(frozen=True)
class BlockLayout:
    index: int
    name: str
    entries: tuple[TensorEntry, ...]
    nbytes: int  # aligned total: the size of the block's buffer


def module_tensor_refs(root: torch.nn.Module, prefix: str) -> list[TensorRef]:
    """Every parameter/buffer slot under ``root`` in a fixed order, shared slots included."""
    refs: list[TensorRef] = []
    for mod_name, module in root.named_modules(remove_duplicate=False):
        full = f"{prefix}.{mod_name}" if prefix and mod_name else (prefix or mod_name)
        for attr, tensor in module._parameters.items():
            if tensor is not None:
                refs.append(TensorRef(module, attr, "param", f"{full}.{attr}" if full else attr))
        for attr, tensor in module._buffers.items():
            if tensor is not None:
                refs.append(TensorRef(module, attr, "buffer", f"{full}.{attr}" if full else attr))
    return refs


def build_layout(index: int, name: str, refs: list[TensorRef]) -> BlockLayout:
    """Lay the tensors of ``refs`` out back to back on aligned offsets."""
    entries: list[TensorEntry] = []
    offset = 0
    for ref in refs:
        t = ref.get()
        n = tensor_nbytes(t)
        entries.append(
            TensorEntry(
                ref=ref,
                offset=offset,
                nbytes=n,
                shape=t.shape,
                dtype=t.dtype,
                requires_grad=bool(t.requires_grad),
                original_device=t.device,
                contiguous=t.is_contiguous(),
                inference=t.is_inference(),
            )
        )
        offset = align_up(offset + n)
    return BlockLayout(index, name, tuple(entries), offset)


def view_in(buffer: torch.Tensor, entry: TensorEntry, *, for_model: bool = False) -> torch.Tensor:
    """The tensor ``entry`` describes, over the bytes of the flat uint8 ``buffer``.

    A tensor of its own over the buffer's storage, not an autograd view: it has its own
    version counter, so an in-place write by the block's forward shows on this tensor alone
    (copies into the buffer do not). It is a normal tensor, which works in whatever mode the
    model runs (see :mod:`offloadkit.engine.modes`). ``for_model``: the tensor is bound to
    the model, and is an inference tensor where the model's own was one (see
    :attr:`TensorEntry.inference`)."""
    itemsize = torch.empty(0, dtype=entry.dtype).element_size()
    start = buffer.storage_offset() * buffer.element_size() + entry.offset
    if start % itemsize:
        raise OffloadError(f"{entry.ref.qualname!r}: misaligned offset {start} in its buffer")
    strides, step = [], 1
    for size in reversed(entry.shape):
        strides.append(step)
        step *= size
    with torch.inference_mode(for_model and entry.inference), torch.no_grad():
        out = torch.empty(0, dtype=entry.dtype, device=buffer.device)
        out.set_(buffer.untyped_storage(), start // itemsize, entry.shape, tuple(reversed(strides)))
    return out
