"""A wrong --tokenizer file is refused by size and first bytes, before SentencePiece reads it."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import save_file

from turbowan.pipeline.demo import write_demo_checkpoints
from turbowan.pipeline.i2v import I2VPipeline
from turbowan.pipeline.preflight import PreflightError
from turbowan.text_encoder.tokenizer import UMT5Tokenizer


def test_two_gib_file_is_refused_without_reading_it(tmp_path):
    big = tmp_path / "spiece.model"
    with big.open("wb") as fh:  # sparse: 2 GiB claimed, nothing written
        fh.write(b"\x0a")
        fh.truncate(2 << 30)
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"2048 MiB, too large for a tokenizer.*--text-encoder"):
        UMT5Tokenizer.from_file(big)
    assert time.monotonic() - start < 5  # refused from its size, not after reading 2 GiB


@pytest.mark.parametrize("kind, write", [
    ("safetensors checkpoint", lambda p: save_file({"w": torch.zeros(4)}, str(p))),
    ("zip archive", lambda p: torch.save({"w": torch.zeros(4)}, p)),
    ("not a SentencePiece model", lambda p: p.write_bytes(b"hello, I am text\n" * 10)),
])
def test_checkpoints_and_junk_are_named(tmp_path, kind, write):
    path = tmp_path / "spiece.model"
    write(path)
    with pytest.raises(ValueError, match=kind) as err:
        UMT5Tokenizer.from_file(path)
    assert "--text-encoder" in str(err.value)


def test_text_encoder_given_as_tokenizer_is_a_preflight_problem(tmp_path):
    files = write_demo_checkpoints(tmp_path / "ckpt")
    with pytest.raises(PreflightError) as err:
        I2VPipeline.from_files(high=files.high, low=files.low, vae=files.vae,
                               text_encoder=files.text_encoder, tokenizer=files.text_encoder,
                               device="cpu")
    message = str(err.value)
    assert "--tokenizer" in message and "safetensors checkpoint, not a tokenizer" in message
    assert "pass the text encoder with --text-encoder" in message
