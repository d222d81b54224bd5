"""The disk home tier: a real safetensors file, read per block, and lower resident memory."""

from __future__ import annotations

import ctypes
import gc

import psutil
import pytest
import torch
from models import make_inputs, make_model
from safetensors import safe_open

import offloadkit
from offloadkit.engine import layout_model, profile_model
from offloadkit.engine.layout import view_in


def test_disk_file_is_valid_safetensors_holding_each_packed_block(tmp_path):
    model = make_model(seed=2)
    layout = layout_model(model)
    originals = {e.ref.qualname: e.ref.get().detach().clone()
                 for b in layout.blocks for e in b.entries}
    path = tmp_path / "home.safetensors"
    handle = offloadkit.apply(model, "layerwise", device="cpu", budget=10**9, home="disk",
                              disk_path=str(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            assert sorted(f.keys()) == sorted(f"block.{i}" for i in range(8))
            for block in layout.blocks:
                raw = f.get_tensor(f"block.{block.index}")
                assert raw.dtype == torch.uint8 and raw.numel() == block.nbytes
                for entry in block.entries:
                    assert torch.equal(view_in(raw, entry), originals[entry.ref.qualname])
        assert handle.stats().disk_bytes == sum(b.nbytes for b in layout.blocks)
    finally:
        handle.remove()
    assert path.exists()  # a file the user named is theirs: kept after remove()


def test_disk_path_that_exists_is_refused_before_anything_moves(tmp_path):
    model = make_model(seed=2)
    path = tmp_path / "taken.safetensors"
    path.write_bytes(b"user data")
    before = model.blocks[0].qkv.weight.detach().clone()
    with pytest.raises(FileExistsError, match="will not overwrite"):
        offloadkit.apply(model, "layerwise", device="cpu", budget=10**9, home="disk",
                         disk_path=str(path))
    assert path.read_bytes() == b"user data"
    assert torch.equal(model.blocks[0].qkv.weight, before)
    offloadkit.apply(model, "layerwise", device="cpu", budget=10**9).remove()  # not marked


def _rss_settled() -> int:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return psutil.Process().memory_info().rss


@pytest.mark.skipif(not hasattr(ctypes, "CDLL"), reason="needs ctypes")
def test_disk_tier_lowers_resident_memory_against_host_tier(tmp_path):
    # ~220 MB of weights in 4 blocks of ~55 MB
    model = make_model(seed=9, dim=1024, hidden=5120, heads=8, num_blocks=4)
    tokens, mask = make_inputs(length=4)
    profile = profile_model(model)
    assert 200e6 < profile.block_bytes < 300e6

    measured, outputs = {}, {}
    for home in ("host", "disk"):
        handle = offloadkit.apply(model, "layerwise", device="cpu", budget=profile.total_bytes,
                                  home=home, disk_path=str(tmp_path))
        try:
            with torch.no_grad():
                outputs[home] = model(tokens, mask=mask)
            measured[home] = _rss_settled()
        finally:
            handle.remove()
    assert torch.equal(outputs["host"], outputs["disk"])
    saved = measured["host"] - measured["disk"]
    # host keeps every block packed in RAM; disk keeps only the two slots' worth
    assert saved > 0.7 * profile.block_bytes, (measured, profile.block_bytes)
