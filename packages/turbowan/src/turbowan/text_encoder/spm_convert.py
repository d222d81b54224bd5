"""Build the Hugging Face tokenizer that upstream uses from a SentencePiece ``spiece.model``.

Upstream Wan tokenizes with ``AutoTokenizer`` (the fast umT5 tokenizer), i.e. the SentencePiece
model as Hugging Face's T5 conversion turns it into a ``tokenizers`` Unigram model. That
conversion has no byte fallback: characters outside the vocabulary become ``<unk>`` (a run of
them fused into one), where SentencePiece itself, for a model trained with byte fallback, emits
``<0xNN>`` byte pieces. Encoding ``spiece.model`` through this conversion makes both tokenizer
files give upstream's ids. The model file is read with a small protobuf wire reader, so no
``protobuf`` package is needed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

__all__ = ["SentencePieceSpec", "hf_tokenizer_from_spec", "hf_tokenizer_from_spiece", "parse_spiece"]

_CONTROL, _USER_DEFINED = 3, 4


@dataclass
class SentencePieceSpec:
    """The fields of a SentencePiece ``ModelProto`` the T5 conversion reads."""

    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type)
    model_type: int = 1  # 1 unigram, 2 bpe
    unk_id: int = 0
    byte_fallback: bool = False
    precompiled_charsmap: bytes = b""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(data: bytes):
    """Yield (field number, wire type, value) of one protobuf message."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated field")
        yield number, wire, value


def parse_spiece(data: bytes) -> SentencePieceSpec:
    """Read pieces, model type, unk id, byte fallback and the normalisation table."""
    spec = SentencePieceSpec()
    for number, wire, value in _fields(data):
        if number == 1 and wire == 2:  # ModelProto.pieces
            piece, score, kind = "", 0.0, 1
            for n, w, v in _fields(value):
                if n == 1 and w == 2:
                    piece = v.decode("utf-8")
                elif n == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif n == 3 and w == 0:
                    kind = v
            spec.pieces.append((piece, score, kind))
        elif number == 2 and wire == 2:  # TrainerSpec
            for n, w, v in _fields(value):
                if w == 0 and n == 3:
                    spec.model_type = v
                elif w == 0 and n == 35:
                    spec.byte_fallback = bool(v)
                elif w == 0 and n == 40:
                    spec.unk_id = v
        elif number == 3 and wire == 2:  # NormalizerSpec
            for n, w, v in _fields(value):
                if n == 2 and w == 2:
                    spec.precompiled_charsmap = bytes(v)
    if not spec.pieces:
        raise ValueError("no vocabulary pieces")
    return spec


def hf_tokenizer_from_spiece(data: bytes):
    """:func:`hf_tokenizer_from_spec` of the serialized model ``data``."""
    return hf_tokenizer_from_spec(parse_spiece(data))


def hf_tokenizer_from_spec(spec: SentencePieceSpec):
    """The ``tokenizers.Tokenizer`` Hugging Face's T5 conversion makes of this model.

    Facts of that conversion: Unigram over every piece with its score and no byte fallback;
    control and user-defined pieces as added tokens; normaliser = the precompiled charsmap, a
    right strip, runs of 2+ spaces to one "▁"; Metaspace pre-tokeniser prefixing "▁".
    (umT5's ``<extra_id_N>`` sentinels are not added: a prompt never holds them.)
    """
    from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import Unigram

    if spec.model_type != 1:
        raise ValueError(f"model type {spec.model_type} is not a Unigram model (umT5's is)")
    vocab = [(piece, score) for piece, score, _ in spec.pieces]
    tok = Tokenizer(Unigram(vocab, unk_id=spec.unk_id, byte_fallback=False))
    tok.add_tokens(
        [
            AddedToken(piece, normalized=False, special=kind == _CONTROL)
            for piece, _, kind in spec.pieces
            if kind in (_CONTROL, _USER_DEFINED)
        ]
    )
    steps = [normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), "▁")]
    if spec.precompiled_charsmap:
        steps.insert(0, normalizers.Precompiled(spec.precompiled_charsmap))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    return tok
