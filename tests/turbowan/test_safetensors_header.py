"""Hostile safetensors headers: one clear error naming the file and tensor, from the loaders
and from `turbowan check` (exit 2, never "matches")."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from turbowan.checkpoint.io import CheckpointReadError, load_state_dict, read_tensor_specs
from turbowan.cli.main import main


def write(path: Path, header: object | bytes, data: bytes) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def entry(offsets, shape=(2,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


CASES = {
    # name: (header, data bytes, words the message must hold)
    "list": ([entry((0, 8))], bytes(8), ["JSON list"]),
    "number": (7, bytes(8), ["JSON int"]),
    "no_offsets": ({"w": {"dtype": "F32", "shape": [2]}}, bytes(8), ["'w'", "data_offsets"]),
    "unhashable_dtype": ({"w": entry((0, 8), dtype=["F32"])}, bytes(8), ["'w'", "dtype"]),
    "entry_not_object": ({"w": [1, 2]}, bytes(8), ["'w'", "not an object"]),
    "bool_shape": ({"w": entry((0, 8), shape=(True, 2))}, bytes(8), ["'w'", "shape"]),
    "non_utf8": (b'{"w\xff": 1}', bytes(8), ["UTF-8"]),
    "duplicate": (b'{"w": 1, "w": 2}', bytes(8), ["'w'", "twice"]),
    "overlap": ({"a": entry((0, 8)), "b": entry((4, 12))}, bytes(12), ["'b'", "overlaps", "'a'"]),
    "gap": ({"a": entry((0, 8)), "b": entry((12, 20))}, bytes(20), ["'b'", "unclaimed"]),
    "size_mismatch": ({"w": entry((0, 8), shape=(3,))}, bytes(8), ["'w'", "12 bytes", "holds 8"]),
    "past_data": ({"w": entry((0, 16), shape=(4,))}, bytes(8), ["'w'", "truncated", "re-download"]),
    "trailing": ({"w": entry((0, 8))}, bytes(12), ["4 bytes after the last tensor"]),
    "reversed": ({"w": entry((8, 0))}, bytes(8), ["'w'", "increasing"]),
    "huge_shape": ({"w": entry((0, 8), shape=(2**40, 2**40))}, bytes(8), ["'w'", "shape"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_header_gives_one_clear_error(tmp_path, name, capsys):
    header, data, words = CASES[name]
    path = write(tmp_path / f"{name}.safetensors", header, data)
    for reader in (read_tensor_specs, load_state_dict):
        with pytest.raises(CheckpointReadError) as info:
            reader(path)
        message = str(info.value)
        assert str(path) in message
        for word in words:
            assert word in message, (word, message)
    assert main(["check", str(path)]) == 2
    out = capsys.readouterr().out
    assert "matches" not in out and str(path) in out


def test_valid_file_still_reads(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.ones(2, 3), "b": torch.zeros(0), "c": torch.arange(4, dtype=torch.int8)},
              str(path), metadata={"format": "pt"})
    specs = read_tensor_specs(path)
    assert {k: (v.shape, v.dtype) for k, v in specs.items()} == {
        "a": ((2, 3), torch.float32), "b": ((0,), torch.float32), "c": ((4,), torch.int8)}
    assert torch.equal(load_state_dict(path)["a"], torch.ones(2, 3))
