"""Tokenizers for prepare-data and the recipe, behind one interface.

- ``sentencepiece``: a ``.model`` file, existing or trained here
  (:func:`train_sentencepiece`: byte-fallback BPE that decodes to the exact text).
- ``huggingface``: a ``tokenizer.json``, or a model directory holding one (and
  usually ``tokenizer_config.json``, which names the end-of-document token), read
  with the ``tokenizers`` package from local files only.
- ``bytes``: the byte-level tokenizer of the embedded corpus (ids 0..255, 0 ends
  a document: the standard library's sources hold no NUL byte).

Every tokenizer offers what megatron-core's datasets ask of one
(``vocab_size``, ``eod``, ``pad``, ``unique_identifiers``) and
``encode(text) -> list[int]`` without special tokens: prepare-data appends
``eod`` to each document itself, as Megatron-LM's ``preprocess_data --append-eod``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

from excitation_dist.data.errors import DataError

TokenizerKind = Literal["auto", "sentencepiece", "huggingface", "bytes"]
KINDS = ("auto", "sentencepiece", "huggingface")  # the kinds a user names (bytes is the embedded corpus's)
# End-of-document tokens of published tokenizers, tried in order when tokenizer_config.json names none.
_EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|end▁of▁sentence|>")


@dataclass(frozen=True)
class TokenizerSpec:
    """What names a tokenizer: picklable, so worker processes load their own copy."""

    kind: Literal["sentencepiece", "huggingface", "bytes"]
    path: str | None = None
    eod_token: str | None = None  # huggingface: the end-of-document token, when tokenizer_config.json lacks it


class Tokenizer:
    """The interface. ``pad`` is -1 when the tokenizer has no padding token;
    ``eod`` is None when it has no end-of-document token (prepare-data refuses
    such a tokenizer unless one is named)."""

    spec: TokenizerSpec
    vocab_size: int
    eod: int | None
    pad: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    @property
    def unique_identifiers(self) -> dict:
        """What identifies this tokenizer in megatron-core's index-cache names."""
        return {"class": type(self).__name__, "vocab_size": self.vocab_size, "eod": self.eod}

    def describe(self) -> str:
        where = f" {self.spec.path}" if self.spec.path else ""
        return f"{self.spec.kind}{where} ({self.vocab_size} tokens)"


class ByteTokenizer(Tokenizer):
    def __init__(self) -> None:
        self.spec = TokenizerSpec("bytes")
        self.vocab_size, self.eod, self.pad = 256, 0, -1

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path} does not exist" if not path.exists() else
                            f"{path} is not a file (a sentencepiece .model is one file)")
        try:
            import sentencepiece as spm
        except ImportError:
            raise DataError("the sentencepiece package is missing; pip install sentencepiece") from None
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"{path} is not a sentencepiece model ({reason})") from None
        self.spec = TokenizerSpec("sentencepiece", str(path))
        self.vocab_size = int(self._sp.vocab_size())
        self.eod = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self.pad = int(self._sp.pad_id())

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)


class HuggingFaceTokenizer(Tokenizer):
    """A ``tokenizer.json`` (fast tokenizer) through the ``tokenizers`` package.
    Truncation and padding stored in the file are switched off: documents are
    encoded whole."""

    def __init__(self, path: str | Path, eod_token: str | None = None) -> None:
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not path.exists():
            raise DataError(f"{path} does not exist")
        if not file.is_file():
            raise DataError(f"{path} holds no tokenizer.json; pass a Hugging Face tokenizer directory with a "
                            "tokenizer.json (a slow tokenizer can be converted with transformers: "
                            "AutoTokenizer.from_pretrained(dir).save_pretrained(dir))")
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise DataError("the tokenizers package is missing; pip install tokenizers") from None
        try:
            self._tok = HFTokenizer.from_file(str(file))
        except Exception as exc:  # the Rust side raises a bare Exception on parse errors
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"{file} is not a Hugging Face tokenizer.json ({reason})") from None
        self._tok.no_truncation()
        self._tok.no_padding()
        self.spec = TokenizerSpec("huggingface", str(path), eod_token)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        config = _read_tokenizer_config(file.parent / "tokenizer_config.json")
        self.eod = self._eod_id(file, vocab, eod_token, _token_content(config.get("eos_token")))
        pad = _token_content(config.get("pad_token"))
        self.pad = vocab.get(pad, -1) if pad is not None else -1

    def _eod_id(self, file: Path, vocab: dict[str, int], named: str | None, configured: str | None) -> int | None:
        if named is not None:
            if named not in vocab:
                specials = [t.content for t in self._tok.get_added_tokens_decoder().values() if t.special]
                raise DataError(f"{file} has no token {named!r} (its special tokens: {', '.join(specials[:20]) or 'none'}); "
                                "name its end-of-document token")
            return vocab[named]
        for token in (configured, *_EOD_CANDIDATES):
            if token is not None and token in vocab:
                return vocab[token]
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


def _read_tokenizer_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); fix or remove it") from None
    return config if isinstance(config, dict) else {}


def _token_content(token) -> str | None:
    """tokenizer_config.json writes special tokens as a string or {"content": ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def resolve_kind(path: str | Path, kind: TokenizerKind = "auto") -> Literal["sentencepiece", "huggingface", "bytes"]:
    """``auto``: a directory or ``.json`` file is a Hugging Face tokenizer, anything else sentencepiece."""
    if kind != "auto":
        return kind
    path = Path(path)
    return "huggingface" if path.is_dir() or path.suffix == ".json" else "sentencepiece"


def load_tokenizer(spec: TokenizerSpec | str | Path, kind: TokenizerKind = "auto",
                   eod_token: str | None = None) -> Tokenizer:
    """The tokenizer named by ``spec`` (or by a path and kind). Raises
    :class:`DataError` naming the file when it is missing or unreadable."""
    if not isinstance(spec, TokenizerSpec):
        spec = TokenizerSpec(resolve_kind(spec, kind), str(spec), eod_token)
    if spec.kind == "bytes":
        return ByteTokenizer()
    if spec.kind == "sentencepiece":
        return SentencePieceTokenizer(spec.path)
    if spec.kind == "huggingface":
        return HuggingFaceTokenizer(spec.path, spec.eod_token)
    raise DataError(f"unknown tokenizer kind {spec.kind!r}; use one of {', '.join(KINDS)}")


def train_sentencepiece(lines: Iterable[str], model_prefix: Path, vocab_size: int) -> SentencePieceTokenizer:
    """Train ``{model_prefix}.model``: byte-fallback BPE on ``lines`` that decodes
    back to the exact text (no normalization, whitespace kept)."""
    import sentencepiece as spm

    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=str(model_prefix),
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=1.0,
            max_sentence_length=16384,
            split_digits=True,
            normalization_rule_name="identity",  # keep text (and code indentation) byte-exact
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            num_threads=min(16, os.cpu_count() or 1),
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise DataError(f"sentencepiece could not train a {vocab_size}-token vocabulary: {_training_fix(exc)}") from None
    return SentencePieceTokenizer(f"{model_prefix}.model")


def _training_fix(exc: RuntimeError) -> str:
    """sentencepiece's training error as the fix: a vocabulary too small for the
    byte pieces and characters of the text, or too large for the text."""
    import re

    text = str(exc)
    small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", text)
    if small:
        return (f"the inputs need at least {small.group(2)} tokens (256 byte pieces, the special tokens and one per "
                f"distinct character); use --vocab-size {small.group(2)} or more")
    if "Vocabulary size too high" in text:
        return "the inputs are too small for so many pieces; use a smaller --vocab-size or more text"
    return f"{text.strip().splitlines()[-1]}; check --vocab-size and the inputs"
