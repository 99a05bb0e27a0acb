"""``prepare-data``: text or jsonl files -> a Megatron indexed dataset
(``{prefix}_text_document.bin/.idx``, written by megatron-core's
``IndexedDatasetBuilder``), with an existing sentencepiece model, a Hugging Face
tokenizer, or a sentencepiece model trained here on the inputs.

Inputs stream through (a corpus never sits in memory whole); large inputs are
tokenized by a pool of worker processes, chunk by chunk, in input order.
"""

from __future__ import annotations

import collections
import gzip
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np

from excitation_dist.data.corpus import embedded_files
from excitation_dist.data.errors import DataError
from excitation_dist.data.indexed import IndexedDatasetWriter, token_dtype
from excitation_dist.data.tokenizers import Tokenizer, TokenizerSpec, load_tokenizer, train_sentencepiece

TextDocuments = Literal["file", "line", "paragraph"]
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
TEXT_SUFFIXES = (".txt", ".md", ".txt.gz")  # what a directory given as input contributes, besides jsonl
TRAIN_TEXT_BYTES = 256 << 20  # text a sentencepiece model is trained on, at most (the first of the inputs)
CHUNK_BYTES = 1 << 20  # text per task of a worker process
AUTO_WORKERS_FROM_BYTES = 32 << 20  # --workers 0 uses one process below this much input


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    data_prefix: Path  # pass as data.path
    documents: int
    tokens: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def embedded_documents() -> list[Path]:
    """The embedded default corpus: the running Python's standard-library sources."""
    try:
        return embedded_files()
    except RuntimeError as exc:
        raise DataError(f"{exc}: pass input files instead of --embedded-corpus") from None


def expand_inputs(paths: Iterable[Path]) -> list[Path]:
    """Files as given; a directory contributes its jsonl and text files (recursively, sorted)."""
    files = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(JSON_SUFFIXES + TEXT_SUFFIXES))
            if not found:
                raise DataError(f"input directory {path} holds no {', '.join(JSON_SUFFIXES + TEXT_SUFFIXES)} files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"input {path} does not exist or is not a file")
    return files


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _text_units(path: Path, text_documents: TextDocuments) -> Iterator[str]:
    try:
        with _open_text(path) as f:
            if text_documents == "file":
                yield f.read()
            elif text_documents == "line":
                yield from (line.rstrip("\n") for line in f)
            else:
                paragraph: list[str] = []
                for line in f:
                    if line.strip():
                        paragraph.append(line)
                    elif paragraph:
                        yield "".join(paragraph)
                        paragraph = []
                if paragraph:
                    yield "".join(paragraph)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); convert it or drop it") from None


def iter_documents(paths: list[Path], jsonl_key: str = "text", text_documents: TextDocuments = "file") -> Iterator[str]:
    """Non-empty documents: each ``.jsonl``/``.json`` line's ``jsonl_key`` field
    (``.gz`` read as gzip), or the plain-text files split as ``text_documents``
    says (the whole file, each line, or each blank-line-separated paragraph)."""
    for path in paths:
        if not path.is_file():
            raise DataError(f"input {path} does not exist or is not a file")
        if not path.name.endswith(JSON_SUFFIXES):
            yield from (doc for doc in _text_units(path, text_documents) if doc.strip())
            continue
        with _open_text(path) as f:
            lineno = 0
            try:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}); jsonl needs one object per "
                                        "line") from None
                    if not isinstance(record, dict) or jsonl_key not in record:
                        raise DataError(f"{path}:{lineno}: no '{jsonl_key}' field; choose the text field with "
                                        "--jsonl-key")
                    if not isinstance(record[jsonl_key], str):
                        raise DataError(f"{path}:{lineno}: field '{jsonl_key}' is not a string")
                    if record[jsonl_key].strip():
                        yield record[jsonl_key]
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno + 1}: not UTF-8 text ({exc.reason}); convert it or drop it") from None


class Progress:
    """One line on stderr: documents, tokens, tokens/s and, when the input size
    is known, megabytes read of the total."""

    def __init__(self, label: str, total_bytes: int | None = None, stream=sys.stderr, every: float = 0.5) -> None:
        self.label, self.total_bytes, self.stream = label, total_bytes, stream
        # a terminal redraws one line; a log file gets a line every 30 s at most
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.every = every if self.tty or every == 0 else max(every, 30.0)
        self.documents = self.tokens = self.bytes = 0
        self.start = self._last = time.monotonic()

    def update(self, documents: int, tokens: int, nbytes: int = 0) -> None:
        self.documents += documents
        self.tokens += tokens
        self.bytes += nbytes
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._draw(now)

    def _draw(self, now: float, end: str = "\r") -> None:
        elapsed = max(now - self.start, 1e-9)
        size = f" | {self.bytes / 1e6:,.1f}/{self.total_bytes / 1e6:,.1f} MB" if self.total_bytes else ""
        self.stream.write(f"{self.label}: {self.documents:,} documents | {self.tokens:,} tokens | "
                          f"{self.tokens / elapsed:,.0f} tokens/s{size} | {elapsed:,.0f} s"
                          f"{end if self.tty else chr(10)}")
        self.stream.flush()

    def close(self) -> None:
        self._draw(time.monotonic(), end="\n")


def _chunks(documents: Iterable[str], max_documents: int | None) -> Iterator[list[str]]:
    """Documents grouped into about CHUNK_BYTES of text each."""
    chunk, size, count = [], 0, 0
    for doc in documents:
        if max_documents is not None and count >= max_documents:
            break
        chunk.append(doc)
        size += len(doc)
        count += 1
        if size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(spec: TokenizerSpec) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    _WORKER_TOKENIZER = load_tokenizer(spec)


def _encode_chunk(texts: list[str], tokenizer: Tokenizer | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Token ids of ``texts`` with the end-of-document id after each, back to
    back (int64), their lengths, and the UTF-8 size of the text."""
    tokenizer = tokenizer or _WORKER_TOKENIZER
    ids = tokenizer.encode_batch(texts)
    lengths = np.fromiter((len(d) + 1 for d in ids), np.int64, len(ids))
    flat = np.empty(int(lengths.sum()), np.int64)
    ends = np.cumsum(lengths)
    for doc, end in zip(ids, ends):
        flat[end - len(doc) - 1 : end - 1] = doc
    flat[ends - 1] = tokenizer.eod
    return flat, lengths, sum(len(t.encode("utf-8")) for t in texts)


def _ordered_map(pool, fn, items: Iterable, window: int) -> Iterator:
    """``fn`` over ``items`` in the pool, results in input order, with at most
    ``window`` tasks in flight (Pool.imap reads its whole input ahead)."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _training_lines(documents: Iterable[str], max_documents: int | None) -> list[str]:
    """Non-empty lines of the first documents, up to TRAIN_TEXT_BYTES of text."""
    lines, size = [], 0
    for count, doc in enumerate(documents):
        if (max_documents is not None and count >= max_documents) or size >= TRAIN_TEXT_BYTES:
            break
        for line in doc.splitlines():
            if line.strip():
                lines.append(line)
                size += len(line)
    return lines


def resolve_workers(workers: int, inputs: list[Path]) -> int:
    """``workers`` > 0 as given; 0: one process for small inputs, else one per CPU (at most 16)."""
    if workers > 0:
        return workers
    size = sum(p.stat().st_size for p in inputs)
    return 1 if size < AUTO_WORKERS_FROM_BYTES else max(1, min(16, os.cpu_count() or 1))


def prepare_data(
    inputs: list[Path],
    output_prefix: Path,
    *,
    tokenizer: str | Path | None = None,
    tokenizer_kind: Literal["auto", "sentencepiece", "huggingface"] = "auto",
    eod_token: str | None = None,
    vocab_size: int = 8000,
    jsonl_key: str = "text",
    text_documents: TextDocuments = "file",
    max_documents: int | None = None,
    workers: int = 0,
    quiet: bool = False,
) -> PreparedData:
    """Tokenize ``inputs`` into ``{output_prefix}_text_document.bin/.idx``.
    Without ``tokenizer``, trains ``{output_prefix}.model`` (sentencepiece) on
    the inputs first. Every document ends with the tokenizer's end-of-document id."""
    if not inputs:
        raise DataError("no input files: pass text/jsonl files or directories, or --embedded-corpus")
    inputs = expand_inputs(inputs)
    trained = None
    if tokenizer is None:
        lines = _training_lines(iter_documents(inputs, jsonl_key, text_documents), max_documents)
        if not lines:
            raise DataError("the inputs hold no non-empty document")
        tok = trained = train_sentencepiece(lines, Path(output_prefix), vocab_size)
        del lines
    else:
        tok = load_tokenizer(tokenizer, tokenizer_kind, eod_token)
    if tok.eod is None:
        raise DataError(f"tokenizer {tok.spec.path} has no end-of-document token (no eos in tokenizer_config.json "
                        "and none of the usual names); name it with --eod-token")

    data_prefix = Path(f"{output_prefix}_text_document")
    workers = resolve_workers(workers, inputs)
    chunks = _chunks(iter_documents(inputs, jsonl_key, text_documents), max_documents)
    try:
        with IndexedDatasetWriter(data_prefix, token_dtype(tok.vocab_size)) as writer, \
                _pool(workers, tok.spec) as pool:
            progress = Progress(f"tokenize ({workers} process{'es' if workers > 1 else ''})",
                                sum(p.stat().st_size for p in inputs), stream=_Null() if quiet else sys.stderr)
            encoded = (map(lambda c: _encode_chunk(c, tok), chunks) if pool is None
                       else _ordered_map(pool, _encode_chunk, chunks, window=4 * workers))
            for flat, lengths, nbytes in encoded:
                for doc in np.split(flat, np.cumsum(lengths)[:-1]):
                    writer.add_document(doc)
                progress.update(len(lengths), len(flat), nbytes)
            if writer.documents == 0:
                raise DataError("the inputs hold no non-empty document")
    except BaseException:
        if trained is not None:  # a failed run leaves nothing behind
            for suffix in (".model", ".vocab"):
                Path(f"{output_prefix}{suffix}").unlink(missing_ok=True)
        raise
    progress.close()
    return PreparedData(tok, data_prefix, writer.documents, writer.num_tokens)


class _pool:
    """A fork pool whose workers each load the tokenizer, or None for one process."""

    def __init__(self, workers: int, spec: TokenizerSpec) -> None:
        self.workers, self.spec, self.pool = workers, spec, None

    def __enter__(self):
        if self.workers > 1:
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            self.pool = mp.get_context(method).Pool(self.workers, initializer=_init_worker, initargs=(self.spec,))
        return self.pool

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate() if exc[0] is not None else self.pool.close()
            self.pool.join()


class _Null:
    def write(self, _: str) -> None: ...

    def flush(self) -> None: ...
