"""Both tokenizer files give upstream's ids, also for a SentencePiece model with byte fallback.

Upstream Wan tokenizes through the Hugging Face fast tokenizer, which Hugging Face's T5
conversion builds from ``spiece.model`` without byte fallback. The reference below is that
conversion, assembled here from SentencePiece's own API (Unigram over every piece and score,
byte fallback off, control pieces as special added tokens, right strip + space-run replace,
Metaspace "always"); it was checked against transformers' ``T5Converter`` on these prompts.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import Unigram

from turbowan.text_encoder.tokenizer import EOS_ID, UMT5Tokenizer, clean_prompt

CORPUS = [
    f"{a} {b} {c} in the {d}."
    for a in ("A tall", "The small", "One old", "Two bright", "Some quiet")
    for b in ("cat", "ship", "tree", "dancer", "river", "lantern")
    for c in ("walks", "floats", "glows", "waits")
    for d in ("rain", "morning light", "desert wind", "harbour")
]
PROMPTS = [
    "A café in 東京 🐱🐱 glows",
    "<b>tall</b> &amp;lt;i&amp;gt; cat",
    "x </s> <s> <unk> <0x41> <pad> y",
    "Ünïcödé — “quoted” ship…",
]
UNK = 2


def train(rule: str) -> bytes:
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buffer, vocab_size=400,
        hard_vocab_limit=False, num_threads=1, minloglevel=2, pad_id=0, eos_id=1, unk_id=UNK,
        bos_id=-1, byte_fallback=True, normalization_rule_name=rule,
    )
    return buffer.getvalue()


def hf_reference(sp: spm.SentencePieceProcessor) -> Tokenizer:
    n = sp.get_piece_size()
    tok = Tokenizer(Unigram([(sp.id_to_piece(i), sp.get_score(i)) for i in range(n)],
                            unk_id=sp.unk_id(), byte_fallback=False))
    tok.add_tokens([AddedToken(sp.id_to_piece(i), normalized=False, special=True)
                    for i in range(n) if sp.is_control(i)])
    tok.normalizer = normalizers.Sequence(
        [normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), "▁")]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    return tok


@pytest.fixture(scope="module")
def identity_model(tmp_path_factory) -> tuple[Path, Tokenizer, spm.SentencePieceProcessor]:
    folder = tmp_path_factory.mktemp("both")
    data = train("identity")
    (folder / "spiece.model").write_bytes(data)
    sp = spm.SentencePieceProcessor(model_proto=data)
    reference = hf_reference(sp)
    reference.save(str(folder / "tokenizer.json"))
    return folder, reference, sp


def test_byte_fallback_model_gives_upstream_unk_ids_not_byte_pieces(identity_model):
    folder, reference, sp = identity_model
    tokenizer = UMT5Tokenizer.from_file(folder / "spiece.model")
    for prompt in PROMPTS:
        expected = reference.encode(clean_prompt(prompt), add_special_tokens=False).ids + [EOS_ID]
        got = tokenizer.token_ids(prompt)
        assert got == expected, prompt
        assert UNK in got
        if "<0x" not in prompt:  # HF matches a literal "<0x41>" against that vocabulary piece
            assert not any(sp.is_byte(i) for i in got)
    # the model really falls back to bytes in SentencePiece itself
    assert any(sp.is_byte(i) for i in sp.encode(PROMPTS[0]))
    # a run of unknown characters is one <unk>, as HF fuses them
    emoji = tokenizer.token_ids("🐱🐱🐱")
    assert emoji.count(UNK) == 1


def test_choice_of_file_in_a_folder_does_not_change_ids(identity_model):
    folder, _, _ = identity_model
    from_folder = UMT5Tokenizer.from_file(folder)
    from_sp = UMT5Tokenizer.from_file(folder / "spiece.model")
    from_json = UMT5Tokenizer.from_file(folder / "tokenizer.json")
    for prompt in PROMPTS:
        ids = from_sp.token_ids(prompt)
        assert from_json.token_ids(prompt) == ids
        assert from_folder.token_ids(prompt) == ids


def test_sentencepiece_normalisation_table_is_applied(tmp_path):
    path = tmp_path / "spiece.model"
    path.write_bytes(train("nmt_nfkc"))
    tokenizer = UMT5Tokenizer.from_file(path)
    # NFKC folds full-width letters to ASCII before the pieces are looked up
    assert tokenizer.token_ids("ＴＡＬＬ ship") == tokenizer.token_ids("TALL ship")
