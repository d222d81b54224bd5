"""The umT5 tokenizer: SentencePiece or HF tokenizer.json, with the upstream prompt cleaning.

umT5 ids: pad 0, end-of-sequence 1. Every prompt becomes exactly ``text_len`` (512) ids: the
cleaned text's pieces, then EOS, then padding; longer prompts are cut to 511 pieces + EOS with a
warning saying how many tokens were dropped (the Wan pipeline truncates; it never feeds the
DiT more than 512 rows).
"""

from __future__ import annotations

import html
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from turbowan.text_encoder.tokenizer_file import check_sentencepiece_bytes, check_tokenizer_file

if TYPE_CHECKING:
    from turbowan.text_encoder.spm_convert import SentencePieceSpec

__all__ = [
    "EOS_ID",
    "PAD_ID",
    "TEXT_LEN",
    "MissingTokenizerError",
    "PromptTruncatedWarning",
    "UMT5Tokenizer",
    "clean_prompt",
    "demo_tokenizer",
]

PAD_ID = 0
EOS_ID = 1
TEXT_LEN = 512
DEMO_TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "demo_spiece.model"

DOWNLOAD_HINT = (
    "Download `spiece.model` (or `tokenizer.json`) from the Hugging Face repository "
    "google/umt5-xxl and pass its path: load_text_encoder(..., tokenizer='path/to/spiece.model') "
    "in Python, or `--tokenizer path/to/spiece.model` on the turbowan command line. "
    "Placing it next to the text-encoder file also works."
)


class MissingTokenizerError(FileNotFoundError):
    """No tokenizer could be found for a text encoder that has to encode prompts."""


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the encoder's 512 tokens; its tail was dropped."""


class _Backend(Protocol):
    def piece_ids(self, text: str) -> list[int]: ...

    def vocab_size(self) -> int: ...

    def special_ids(self) -> tuple[int | None, int | None]: ...  # (pad, eos)


try:  # optional, as upstream: repairs mojibake; the result differs only for broken text
    import ftfy as _ftfy
except ImportError:  # pragma: no cover - depends on the environment
    _ftfy = None

_WHITESPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """Upstream "whitespace" cleaning: ftfy (if installed), HTML-unescape twice, collapse spaces."""
    if _ftfy is not None:
        text = _ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


class _SentencePieceBackend:
    """``spiece.model`` encoded the way upstream's HF tokenizer does (see ``spm_convert``).

    SentencePiece loads the file (validating it, giving its special ids); the pieces come from
    the HF conversion of the same model, so a byte-fallback model yields ``<unk>`` where
    upstream does, not ``<0xNN>`` byte pieces.
    """

    def __init__(self, model_proto: bytes, spec: SentencePieceSpec) -> None:
        import sentencepiece

        from turbowan.text_encoder.spm_convert import hf_tokenizer_from_spec

        self._sp = sentencepiece.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(model_proto)
        self._hf = hf_tokenizer_from_spec(spec)  # ``spec``: model_proto, parsed once

    def piece_ids(self, text: str) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=False).ids)

    def vocab_size(self) -> int:
        return int(self._sp.GetPieceSize())

    def special_ids(self) -> tuple[int | None, int | None]:
        pad, eos = self._sp.pad_id(), self._sp.eos_id()
        return (pad if pad >= 0 else None, eos if eos >= 0 else None)


class _HFTokenizerBackend:
    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.no_truncation()

    def piece_ids(self, text: str) -> list[int]:
        # special tokens added by hand below, so a post-processor's `</s>` is never doubled
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def special_ids(self) -> tuple[int | None, int | None]:
        return self._tok.token_to_id("<pad>"), self._tok.token_to_id("</s>")


class UMT5Tokenizer:
    """Prompts -> (ids, mask), both (B, text_len) int64, in umT5's id convention."""

    def __init__(self, backend: _Backend, source: str, *, text_len: int = TEXT_LEN) -> None:
        pad, eos = backend.special_ids()
        if (pad, eos) != (PAD_ID, EOS_ID):
            raise ValueError(
                f"{source}: this tokenizer has pad id {pad} and end-of-sequence id {eos}; the "
                f"umT5 tokenizer has pad {PAD_ID} and EOS {EOS_ID}, so this is the wrong "
                f"tokenizer. {DOWNLOAD_HINT}"
            )
        if text_len < 1:
            raise ValueError(f"text_len must be at least 1 (room for the end token); got {text_len}")
        self._backend = backend
        self.source = source
        self.text_len = text_len

    # construction -------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **kwargs: int) -> UMT5Tokenizer:
        """``spiece.model``, ``tokenizer.json``, or a folder holding one of them."""
        path = Path(path)
        if path.is_dir():
            for name in ("spiece.model", "tokenizer.json"):
                if (path / name).is_file():
                    return cls.from_file(path / name, **kwargs)
            raise MissingTokenizerError(
                f"{path}: folder holds neither spiece.model nor tokenizer.json. {DOWNLOAD_HINT}"
            )
        if not path.is_file():
            raise MissingTokenizerError(f"{path}: no such tokenizer file. {DOWNLOAD_HINT}")
        check_tokenizer_file(path)  # size and magic first: SentencePiece can crash on others
        if path.suffix.lower() == ".json":
            try:
                backend: _Backend = _HFTokenizerBackend(path)
            except Exception as exc:
                raise ValueError(
                    f"{path}: not a readable HF tokenizer.json ({exc}). {DOWNLOAD_HINT}"
                ) from exc
        else:
            backend = _sentencepiece_or_error(path.read_bytes(), str(path))
        return cls(backend, str(path), **kwargs)

    @classmethod
    def from_sentencepiece_bytes(cls, data: bytes, source: str, **kwargs: int) -> UMT5Tokenizer:
        """A SentencePiece model held in memory (e.g. embedded in a text-encoder file)."""
        return cls(_sentencepiece_or_error(data, source), source, **kwargs)

    # use ------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size()

    def token_ids(self, prompt: str) -> list[int]:
        """Cleaned prompt -> piece ids followed by EOS, not truncated, not padded."""
        if not isinstance(prompt, str):
            raise TypeError(f"a prompt must be a string; got {type(prompt).__name__}")
        return self._backend.piece_ids(clean_prompt(prompt)) + [EOS_ID]

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = torch.full((len(prompts), self.text_len), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(prompts), self.text_len), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens = self.token_ids(prompt)
            if len(tokens) > self.text_len:
                dropped = len(tokens) - self.text_len
                warnings.warn(
                    f"prompt {row} is {len(tokens)} tokens long (end token included); the text "
                    f"encoder takes {self.text_len}, so the last {dropped} tokens were dropped. "
                    "Shorten the prompt to keep all of it.",
                    PromptTruncatedWarning,
                    stacklevel=2,
                )
                tokens = tokens[: self.text_len - 1] + [EOS_ID]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        return ids, mask

    def __repr__(self) -> str:
        return f"UMT5Tokenizer(source={self.source!r}, vocab={self.vocab_size}, text_len={self.text_len})"


def _sentencepiece_or_error(data: bytes, source: str) -> _SentencePieceBackend:
    check_sentencepiece_bytes(data, source)
    try:
        from turbowan.text_encoder.spm_convert import parse_spiece

        spec = parse_spiece(data)  # well-formed protobuf before SentencePiece's parser sees it
        return _SentencePieceBackend(data, spec)
    except Exception as exc:
        raise ValueError(
            f"{source}: not a SentencePiece model ({exc}). Pass the umT5 `spiece.model` or a "
            "`tokenizer.json`."
        ) from exc


def demo_tokenizer(*, text_len: int = TEXT_LEN) -> UMT5Tokenizer:
    """The tiny SentencePiece model shipped for the embedded demo (vocab <= 512, fits umt5-tiny)."""
    if not DEMO_TOKENIZER.is_file():
        raise MissingTokenizerError(
            f"{DEMO_TOKENIZER} is missing from the installation; regenerate it with "
            "`python -m turbowan.assets.make_demo_tokenizer`"
        )
    return UMT5Tokenizer.from_file(DEMO_TOKENIZER, text_len=text_len)
