"""Turn text or jsonl files into a sentencepiece tokenizer and a Megatron
indexed dataset (``{prefix}_text_document.bin/.idx``)."""

from __future__ import annotations

import json
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from excitation_dist.data.indexed import IndexedDatasetWriter, token_dtype


class DataError(ValueError):
    """Bad input data; the message names the file (and line) and the fix."""


@dataclass
class PreparedData:
    tokenizer_model: Path
    data_prefix: Path  # pass as --data-path / data.path
    documents: int
    tokens: int
    vocab_size: int


def embedded_documents() -> list[Path]:
    """The embedded default corpus: the running Python's standard-library sources."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))
    if not files:
        raise DataError(f"no Python sources under {stdlib}: pass input files instead of --embedded-corpus")
    return files


def iter_documents(paths: list[Path], jsonl_key: str = "text") -> Iterator[str]:
    """Yield documents: each ``.jsonl``/``.json`` line's ``jsonl_key`` field, or
    each other file's whole text."""
    for path in paths:
        if not path.is_file():
            raise DataError(f"input {path} does not exist or is not a file")
        if path.suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}); jsonl needs one object per line") from None
                    if not isinstance(record, dict) or jsonl_key not in record:
                        raise DataError(f"{path}:{lineno}: no '{jsonl_key}' field; choose the text field with --jsonl-key")
                    if not isinstance(record[jsonl_key], str):
                        raise DataError(f"{path}:{lineno}: field '{jsonl_key}' is not a string")
                    yield record[jsonl_key]
        else:
            try:
                yield path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); convert it or drop it") from None


class Progress:
    """A one-line progress bar on stderr (items, tokens, rate)."""

    def __init__(self, label: str, total: int | None = None, stream=sys.stderr, every: float = 0.5) -> None:
        self.label, self.total, self.stream, self.every = label, total, stream, every
        self.count = self.tokens = 0
        self.start = self._last = time.monotonic()

    def update(self, items: int = 1, tokens: int = 0) -> None:
        self.count += items
        self.tokens += tokens
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._draw(now)

    def _draw(self, now: float, end: str = "\r") -> None:
        rate = self.count / max(now - self.start, 1e-9)
        if self.total:
            filled = int(30 * self.count / self.total)
            bar = f"[{'#' * filled}{'.' * (30 - filled)}] {self.count}/{self.total}"
        else:
            bar = f"{self.count}"
        self.stream.write(f"{self.label}: {bar} docs, {self.tokens:,} tokens, {rate:.0f} docs/s{end}")
        self.stream.flush()

    def close(self) -> None:
        self._draw(time.monotonic(), end="\n")


def train_tokenizer(documents: list[str], model_prefix: Path, vocab_size: int) -> Path:
    """Train a byte-fallback BPE sentencepiece model on ``documents`` that
    decodes back to the exact text (no normalization, whitespace kept)."""
    import sentencepiece as spm

    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    lines = (line for doc in documents for line in doc.splitlines() if line.strip())
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines,
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
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise DataError(f"sentencepiece could not train a {vocab_size}-token vocabulary: {exc}. "
                        "Use a smaller --vocab-size or more text") from None
    return Path(f"{model_prefix}.model")


def prepare_data(
    inputs: list[Path],
    output_prefix: Path,
    *,
    tokenizer_model: Path | None = None,
    vocab_size: int = 8000,
    jsonl_key: str = "text",
    max_documents: int | None = None,
    quiet: bool = False,
) -> PreparedData:
    """Tokenize ``inputs`` into ``{output_prefix}_text_document.bin/.idx``,
    training ``{output_prefix}.model`` first unless ``tokenizer_model`` is given.
    Every document ends with the tokenizer's end-of-document id."""
    import sentencepiece as spm

    if not inputs:
        raise DataError("no input files: pass text/jsonl files, or --embedded-corpus")
    documents = []
    for doc in iter_documents(inputs, jsonl_key):
        if doc.strip():
            documents.append(doc)
        if max_documents is not None and len(documents) >= max_documents:
            break
    if not documents:
        raise DataError("the inputs hold no non-empty document")

    if tokenizer_model is None:
        tokenizer_model = train_tokenizer(documents, output_prefix, vocab_size)
    elif not Path(tokenizer_model).is_file():
        raise DataError(f"tokenizer model {tokenizer_model} does not exist; omit --tokenizer-model to train one")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    eod = sp.eos_id()
    if eod < 0:
        raise DataError(f"tokenizer {tokenizer_model} has no end-of-sentence id; train it with an eos piece")

    data_prefix = Path(f"{output_prefix}_text_document")
    progress = Progress("tokenize", total=len(documents), stream=sys.stderr if not quiet else _Null())
    with IndexedDatasetWriter(data_prefix, token_dtype(sp.vocab_size())) as writer:
        for doc in documents:
            ids = sp.encode(doc) + [eod]
            writer.add_document(ids)
            progress.update(1, len(ids))
    progress.close()
    return PreparedData(Path(tokenizer_model), data_prefix, len(documents), writer.num_tokens, sp.vocab_size())


class _Null:
    def write(self, _: str) -> None: ...

    def flush(self) -> None: ...
