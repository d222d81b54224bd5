"""umT5 tokenizer: a SentencePiece model and a tokenizer.json trained here, cleaning, limits."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from turbowan.text_encoder.tokenizer import (
    EOS_ID,
    MissingTokenizerError,
    PromptTruncatedWarning,
    UMT5Tokenizer,
    clean_prompt,
    demo_tokenizer,
)

CORPUS = [
    f"{a} {b} {c} in the {d}."
    for a in ("A tall", "The small", "One old", "Two bright", "Some quiet", "Every green")
    for b in ("cat", "ship", "tree", "dancer", "river", "lantern", "mountain")
    for c in ("walks", "floats", "glows", "waits", "spins")
    for d in ("rain", "morning light", "desert wind", "harbour", "night market")
]


def train_spiece(path: Path, *, umt5_ids: bool = True, vocab_size: int = 200) -> Path:
    buffer = io.BytesIO()
    ids = dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1) if umt5_ids else {}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buffer, vocab_size=vocab_size,
        hard_vocab_limit=False, num_threads=1, minloglevel=2, **ids,
    )
    path.write_bytes(buffer.getvalue())
    return path


def build_tokenizer_json(path: Path) -> Path:
    """A T5-style tokenizer.json (Unigram + Metaspace, post-processor appending </s>)."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=150, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def spiece_path(tmp_path_factory) -> Path:
    return train_spiece(tmp_path_factory.mktemp("sp") / "spiece.model")


def test_clean_prompt_unescapes_twice_and_collapses_whitespace():
    assert clean_prompt("  cats &amp;amp; dogs \n\t under   the&nbsp;rain  ") == "cats & dogs under the rain"
    assert clean_prompt("&lt;b&gt;") == "<b>"
    assert clean_prompt("") == ""


def test_sentencepiece_ids_eos_padding_and_mask(spiece_path):
    tok = UMT5Tokenizer.from_file(spiece_path)
    sp = spm.SentencePieceProcessor(model_file=str(spiece_path))
    prompts = ["The small  cat walks in the rain.", ""]
    ids, mask = tok(prompts)
    assert ids.shape == mask.shape == (2, 512)
    pieces = sp.encode("The small cat walks in the rain.")
    n = len(pieces) + 1
    assert ids[0, :n].tolist() == pieces + [EOS_ID]
    assert ids[0, n:].eq(0).all() and mask[0].sum() == n and mask[0, :n].eq(1).all()
    # empty prompt: the end token alone
    assert ids[1, 0] == EOS_ID and mask[1].sum() == 1 and ids[1, 1:].eq(0).all()


def test_over_long_prompt_warns_with_dropped_count_and_truncates(spiece_path):
    tok = UMT5Tokenizer.from_file(spiece_path)
    prompt = " ".join(["lantern glows"] * 400)
    n_tokens = len(tok.token_ids(prompt))
    assert n_tokens > 512
    with pytest.warns(PromptTruncatedWarning, match=f"last {n_tokens - 512} tokens were dropped"):
        ids, mask = tok([prompt])
    assert mask.sum() == 512 and ids[0, -1] == EOS_ID
    assert ids[0, :511].tolist() == tok.token_ids(prompt)[:511]


def test_exactly_512_tokens_is_not_truncated(spiece_path):
    tok = UMT5Tokenizer.from_file(spiece_path, text_len=8)
    prompt = "cat cat cat"
    n = len(tok.token_ids(prompt))
    tok.text_len = n
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids, mask = tok([prompt])
    assert mask.sum() == n and ids[0, -1] == EOS_ID


def test_tokenizer_json_path_matches_its_own_encoding_without_double_eos(tmp_path):
    path = build_tokenizer_json(tmp_path / "tokenizer.json")
    hf = Tokenizer.from_file(str(path))
    tok = UMT5Tokenizer.from_file(path)
    ids, mask = tok(["Two bright lantern glows in the harbour."])
    expected = hf.encode("Two bright lantern glows in the harbour.").ids  # post-processor adds </s>
    assert expected[-1] == EOS_ID and expected.count(EOS_ID) == 1
    assert ids[0, : len(expected)].tolist() == expected
    assert mask.sum() == len(expected)
    # a folder holding tokenizer.json is accepted too
    assert UMT5Tokenizer.from_file(tmp_path)(["cat"])[0].tolist() == tok(["cat"])[0].tolist()


def test_tokenizer_with_other_special_ids_is_refused(tmp_path):
    path = train_spiece(tmp_path / "other.model", umt5_ids=False)  # sentencepiece defaults
    with pytest.raises(ValueError, match="pad id None and end-of-sequence id 2.*wrong tokenizer"):
        UMT5Tokenizer.from_file(path)


def test_missing_or_unreadable_tokenizer_files(tmp_path):
    with pytest.raises(MissingTokenizerError, match="google/umt5-xxl"):
        UMT5Tokenizer.from_file(tmp_path / "nope.model")
    with pytest.raises(MissingTokenizerError, match="neither spiece.model nor tokenizer.json"):
        UMT5Tokenizer.from_file(tmp_path)
    bad = tmp_path / "spiece.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        UMT5Tokenizer.from_file(bad)


def test_demo_tokenizer_fits_tiny_vocab_and_encodes():
    tok = demo_tokenizer()
    assert 100 < tok.vocab_size <= 512
    assert Path(tok.source).stat().st_size < 300_000
    ids, mask = tok(["A red fox runs across a frozen lake at dawn, cinematic lighting."])
    n = int(mask.sum())
    assert 5 < n < 40 and ids[0, n - 1] == EOS_ID and int(ids.max()) < 512
    assert ids[0, : n - 1].ne(2).all()  # every piece known: no <unk>


def test_prompts_must_be_strings(spiece_path):
    tok = UMT5Tokenizer.from_file(spiece_path)
    with pytest.raises(TypeError, match="must be a string"):
        tok([None])


def test_ftfy_is_applied_when_installed(monkeypatch):
    from types import SimpleNamespace

    from turbowan.text_encoder import tokenizer as tokenizer_module

    calls = []

    def fix_text(text: str) -> str:
        calls.append(text)
        return text.replace("cafÃ©", "café")

    monkeypatch.setattr(tokenizer_module, "_ftfy", SimpleNamespace(fix_text=fix_text))
    assert clean_prompt(" a cafÃ©  at night ") == "a café at night"
    assert calls == [" a cafÃ©  at night "]
    monkeypatch.setattr(tokenizer_module, "_ftfy", None)
    assert clean_prompt(" a cafÃ©  at night ") == "a cafÃ© at night"
