"""Validate a whole safetensors header before any size or offset in it is used.

A header is untrusted JSON: the file may be damaged or written to mislead. Every rule the
format has is checked here (an object; per tensor a known dtype, a shape of non-negative
integers, two in-range offsets whose span is shape x itemsize; byte ranges that tile the data
exactly, without overlap or gap), so a bad file fails with one message naming the file and the
tensor instead of a KeyError later or a wrong tensor after the text encoder and VAE ran.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["SAFETENSORS_DTYPES", "HeaderError", "parse_header", "validate_header"]

# safetensors dtype names, for reading headers and (inverted) for writing them
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

_ITEMSIZE = {name: dtype.itemsize for name, dtype in SAFETENSORS_DTYPES.items()}
# bigger than any real tensor (2**50 bytes = 1 PiB): refuse before multiplying further
_MAX_DIM = 2**50


class HeaderError(ValueError):
    """A safetensors header breaks the format; the message names the file and tensor."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise HeaderError(f"tensor {key!r} appears twice in the header")
        out[key] = value
    return out


def parse_header(raw: bytes, path: Path) -> object:
    """JSON-decode the header bytes (UTF-8 required, duplicate keys refused)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(f"{path}: safetensors header is not UTF-8 text ({exc})") from exc
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except HeaderError as exc:
        raise HeaderError(f"{path}: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise HeaderError(f"{path}: safetensors header is not valid JSON ({exc})") from exc


def _entry(path: Path, key: str, info: object, data_len: int) -> tuple[tuple[int, ...], str, int, int]:
    def bad(what: str) -> HeaderError:
        return HeaderError(f"{path}: tensor {key!r}: {what}")

    if not isinstance(info, dict):
        raise bad(f"entry is a JSON {type(info).__name__}, not an object")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in info:
            raise bad(f"no {field!r}")
    dtype = info["dtype"]
    if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
        raise bad(f"unknown dtype {dtype!r} (known: {', '.join(_ITEMSIZE)})")
    shape = info["shape"]
    if not isinstance(shape, list) or not all(_is_int(s) and 0 <= s <= _MAX_DIM for s in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    offsets = info["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise bad(f"data_offsets {offsets!r} is not a pair of integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise bad(f"data_offsets [{begin}, {end}] is not an increasing byte range")
    nbytes = _ITEMSIZE[dtype]
    for s in shape:
        nbytes *= s
        if nbytes > data_len + 1:  # already bigger than the data; stop multiplying
            break
    if nbytes != end - begin:
        raise bad(
            f"shape {shape} x {_ITEMSIZE[dtype]} bytes ({dtype}) is {nbytes} bytes but its byte "
            f"range [{begin}, {end}] holds {end - begin}"
        )
    return tuple(shape), dtype, begin, end


def validate_header(
    header: object, path: Path, data_len: int, *, truncated_hint: str = ""
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Check every rule of the format; returns key -> (shape, torch dtype).

    ``data_len`` is the number of bytes after the header. A range past the end of the data
    reads as truncation (``truncated_hint`` says what to do); any other break is corruption.
    """
    if not isinstance(header, dict):
        raise HeaderError(
            f"{path}: safetensors header is a JSON {type(header).__name__}, not an object "
            "mapping tensor names to entries"
        )
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise HeaderError(f"{path}: __metadata__ must map names to strings")
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    ranges: list[tuple[int, int, str]] = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        shape, dtype, begin, end = _entry(path, key, info, data_len)
        if end > data_len:
            raise HeaderError(
                f"{path}: truncated: tensor {key!r} ends at byte {end} but only {data_len} "
                f"data bytes are present{'; ' + truncated_hint if truncated_hint else ''}"
            )
        ranges.append((begin, end, key))
        out[key] = (shape, SAFETENSORS_DTYPES[dtype])
    position, previous = 0, None
    for begin, end, key in sorted(ranges):
        if begin < position:
            raise HeaderError(
                f"{path}: tensor {key!r} (bytes [{begin}, {end}]) overlaps tensor {previous!r} "
                f"(which ends at byte {position})"
            )
        if begin > position:
            where = f"after tensor {previous!r}" if previous else "at the start of the data"
            raise HeaderError(
                f"{path}: {begin - position} unclaimed bytes {where} (before tensor {key!r}); "
                "safetensors ranges must cover the data without gaps"
            )
        position, previous = end, key
    if position != data_len:
        raise HeaderError(
            f"{path}: {data_len - position} bytes after the last tensor belong to no tensor; "
            "the header does not describe this file's data"
        )
    return out
