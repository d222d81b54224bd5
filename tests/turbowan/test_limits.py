"""Sizes from headers and flags are bounded by the model family before they are used."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from turbowan.cli.main import main
from turbowan.limits import MAX_FRAMES, MAX_PIXELS, MAX_SIDE
from turbowan.pipeline.demo import write_demo_checkpoints
from turbowan.pipeline.i2v import I2VPipeline
from turbowan.pipeline.preflight import PreflightError


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_demo_checkpoints(tmp_path_factory.mktemp("ckpt"))


def _from_files(files, **override):
    kw = dict(high=files.high, low=files.low, vae=files.vae, text_encoder=files.text_encoder,
              tokenizer="demo", device="cpu")
    kw.update(override)
    with pytest.raises(PreflightError) as err:
        I2VPipeline.from_files(**kw)
    return str(err.value)


def test_huge_frames_and_sizes_are_refused_in_one_round(tmp_path):
    pipe = I2VPipeline.demo(directory=tmp_path / "demo")
    with pytest.raises(PreflightError) as err:
        pipe.generate(frames=1000000001, width=16384, height=16384)
    message = str(err.value)
    assert "2 problems" in message
    assert f"at most {MAX_FRAMES}" in message and "1000000001" in message
    assert f"each side at most {MAX_SIDE}" in message and str(MAX_PIXELS) in message
    assert not (tmp_path / "demo").exists()
    with pytest.raises(PreflightError, match="pixels per frame"):
        pipe.generate(width=4096, height=4096)  # each side allowed, the area is not


def test_block_index_of_a_billion_is_refused_quickly(files, tmp_path):
    state = load_file(str(files.low))
    state["blocks.1000000000.x.weight"] = torch.zeros(1)
    hostile = tmp_path / "hostile.safetensors"
    save_file(state, str(hostile))
    message = _from_files(files, low=hostile)
    assert "--low" in message and "1000000001" in message and "1..128" in message
    assert main(["check", str(hostile)]) == 2


def test_width_of_2_pow_40_in_a_pth_is_refused(files, tmp_path, capsys):
    state = {k: v.clone() for k, v in load_file(str(files.high)).items()}
    row = state["patch_embedding.weight"][:1]
    # a stride-0 view: a tiny storage claiming 2**40 rows, as a crafted .pth can
    state["patch_embedding.weight"] = row.expand(2**40, row.shape[1])
    hostile = tmp_path / "wide.pth"
    torch.save(state, hostile)
    message = _from_files(files, high=hostile)
    assert "--high" in message and f"dim = {2**40}" in message and "1..16384" in message
    assert main(["check", str(hostile)]) == 2
    assert "16384" in capsys.readouterr().out


def test_any_exception_from_a_meta_build_is_reported(files, monkeypatch):
    import turbowan.dit.meta

    def overflow(*args, **kwargs):
        raise RuntimeError("Storage size calculation overflowed")

    monkeypatch.setattr(turbowan.dit.meta, "WanDiT", overflow)
    message = _from_files(files)
    assert "building the DiT on meta" in message and "RuntimeError" in message
