"""Recognise a tokenizer file by size and first bytes before any parser reads it.

SentencePiece reads a whole file into memory and can crash the process (not raise) on one
that is not a model, e.g. a 2 GiB text-encoder checkpoint given as ``--tokenizer`` by mistake.
umT5's ``spiece.model`` is about 4.5 MB and ``tokenizer.json`` about 16 MB; anything far larger,
or starting like a checkpoint, is refused with the likely mix-up named.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["MAX_TOKENIZER_BYTES", "check_sentencepiece_bytes", "check_tokenizer_file"]

MAX_TOKENIZER_BYTES = 64 << 20  # 64 MiB: ten times umT5's spiece.model, four times its tokenizer.json

MIXUP = ("pass the text encoder with --text-encoder and the tokenizer (spiece.model or "
         "tokenizer.json from google/umt5-xxl) with --tokenizer")


def _looks_like_checkpoint(head: bytes) -> str | None:
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a PyTorch .pth checkpoint)"
    if head[:1] == b"\x80":
        return "a pickle (a PyTorch checkpoint)"
    if len(head) >= 10 and head[8:10] == b'{"':
        return "a safetensors checkpoint"
    return None


def check_tokenizer_file(path: str | os.PathLike[str]) -> None:
    """Size and first bytes of a ``spiece.model``/``tokenizer.json`` candidate; ValueError
    naming the mix-up, before anything parses the file."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(16)
    kind = _looks_like_checkpoint(head)
    if kind is not None:
        raise ValueError(f"{path} is {kind}, not a tokenizer; {MIXUP}")
    if size > MAX_TOKENIZER_BYTES:
        raise ValueError(
            f"{path} is {size / 2**20:.0f} MiB, too large for a tokenizer (umT5's spiece.model is "
            f"about 4.5 MB; at most {MAX_TOKENIZER_BYTES >> 20} MiB is accepted); {MIXUP}")
    if path.suffix.lower() == ".json":
        if not head.lstrip()[:1] == b"{":
            raise ValueError(f"{path} is not a JSON tokenizer file; {MIXUP}")
    else:
        check_sentencepiece_bytes(head, str(path), size=size)


def check_sentencepiece_bytes(data: bytes, source: str, *, size: int | None = None) -> None:
    """A SentencePiece model is a protobuf whose first field is a vocabulary piece (0x0A)."""
    size = len(data) if size is None else size
    if size > MAX_TOKENIZER_BYTES:
        raise ValueError(f"{source}: {size} bytes is too large for a SentencePiece model; {MIXUP}")
    if not data[:1] == b"\x0a":
        raise ValueError(f"{source}: not a SentencePiece model (it does not start like one); {MIXUP}")
