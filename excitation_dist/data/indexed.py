"""Megatron's indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``): written through
megatron-core's own ``IndexedDatasetBuilder``, and checked here without reading
the tokens, so that a bad corpus is refused before any rank starts.

Layout of ``PREFIX.idx`` (little-endian), as megatron-core writes and reads it:

    b"MMIDIDX\\x00\\x00" | uint64 version = 1 | uint8 dtype code
    uint64 sequence count S | uint64 document-index count D (documents + 1)
    int32[S] sequence lengths (tokens) | int64[S] byte offsets into .bin
    int64[D] document indices (sequence where each document starts; last = S)

``PREFIX.bin`` holds the tokens of all sequences back to back. Here, as in
Megatron-LM's ``preprocess_data`` without sentence splitting, every document is
one sequence.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from excitation_dist.data.errors import DataError

_MAGIC = b"MMIDIDX\x00\x00"
_LEGACY_MAGIC = b"TNTIDX\x00\x00"  # the pre-mmap IndexedDataset of old Megatron-LM / fairseq
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8
# megatron.core.datasets.indexed_dataset.DType codes
_CODE_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
                8: np.uint16}
_TOKEN_DTYPES = (np.uint8, np.uint16, np.int32, np.int64)
REWRITE = "write it again (excitation-dist prepare-data, or Megatron-LM's tools/preprocess_data.py)"


def token_dtype(vocab_size: int) -> type:
    """The dtype Megatron-LM's preprocess_data picks for this vocabulary
    (``DType.optimal_dtype``)."""
    return np.uint16 if vocab_size < 65500 else np.int32


class IndexedDatasetWriter:
    """Write ``{prefix}.bin`` / ``{prefix}.idx`` with megatron-core's
    ``IndexedDatasetBuilder``, atomically: both go to temporary names that are
    renamed only when the ``with`` block succeeds, so an interrupted run never
    leaves files that load as a valid dataset."""

    def __init__(self, prefix: str | Path, dtype: type = np.uint16) -> None:
        if dtype not in _TOKEN_DTYPES:
            raise ValueError(f"unsupported token dtype {dtype}; use one of {[d.__name__ for d in _TOKEN_DTYPES]}")
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self._limits = np.iinfo(self.dtype)
        self.documents = self.num_tokens = 0

    def __enter__(self) -> "IndexedDatasetWriter":
        try:
            from excitation_dist.megatron.deferred_import import dataset_modules

            IndexedDatasetBuilder = dataset_modules()["megatron.core.datasets.indexed_dataset"].IndexedDatasetBuilder
        except ImportError as exc:
            raise DataError(f"megatron-core does not import ({exc}); the indexed dataset is written through its "
                            "IndexedDatasetBuilder: pip install -e '.[recipe]'") from None

        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = self.prefix.with_name(f"{self.prefix.name}.bin.tmp{os.getpid()}")
        self._idx_tmp = self.prefix.with_name(f"{self.prefix.name}.idx.tmp{os.getpid()}")
        self._builder = IndexedDatasetBuilder(str(self._bin_tmp), dtype=self.dtype.type)
        return self

    def add_document(self, tokens) -> None:
        """One document (one sequence) of token ids."""
        array = np.asarray(tokens)
        if array.size and (array.min() < self._limits.min or array.max() > self._limits.max):
            raise ValueError(f"token ids outside the range of {self.dtype.name}; write with a wider dtype")
        self._builder.add_document(array, [int(array.size)])
        self.documents += 1
        self.num_tokens += int(array.size)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._builder.data_file.close()
            self._bin_tmp.unlink(missing_ok=True)
            return
        try:
            self._builder.finalize(str(self._idx_tmp))
            # .bin first: a dataset is only readable once its .idx exists
            os.replace(self._bin_tmp, f"{self.prefix}.bin")
            os.replace(self._idx_tmp, f"{self.prefix}.idx")
        finally:
            self._bin_tmp.unlink(missing_ok=True)
            self._idx_tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class IndexSummary:
    """What the ``.idx`` of a prefix says, checked against the files' sizes."""

    prefix: str
    dtype: np.dtype
    sequences: int
    documents: int
    tokens: int

    def tokens_of_sequences(self, begin: int, end: int) -> int:
        """Tokens in sequences [begin, end) (two reads of the memory-mapped index)."""
        if end <= begin:
            return 0
        lengths, pointers = _index_arrays(self)
        last = int(pointers[end - 1]) + int(lengths[end - 1]) * self.dtype.itemsize
        return (last - int(pointers[begin])) // self.dtype.itemsize

    def first_tokens(self, count: int) -> np.ndarray:
        """Up to ``count`` tokens from the start of ``.bin`` (a memory-mapped view)."""
        count = min(count, self.tokens)
        if count == 0:
            return np.zeros(0, self.dtype)
        return np.memmap(f"{self.prefix}.bin", mode="r", dtype=self.dtype, shape=(count,))


def _index_arrays(summary: IndexSummary) -> tuple[np.ndarray, np.ndarray]:
    n = summary.sequences
    index = np.memmap(f"{summary.prefix}.idx", mode="r", dtype=np.uint8)
    return (np.frombuffer(index, np.int32, n, _HEADER_BYTES),
            np.frombuffer(index, np.int64, n, _HEADER_BYTES + 4 * n))


def inspect_index(prefix: str | Path) -> IndexSummary:
    """Check that ``{prefix}.idx`` is a Megatron text-dataset index of the right
    size and that ``{prefix}.bin`` holds exactly the tokens it describes; reads
    the header and three entries, never the tokens. Raises :class:`DataError`
    naming the file, what is wrong and the fix."""
    prefix = str(prefix)
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for path in (idx, bin_):
        if not path.is_file():
            raise DataError(f"{path} does not exist")
    idx_bytes = idx.stat().st_size
    with open(idx, "rb") as f:
        header = f.read(_HEADER_BYTES)
    if header.startswith(_LEGACY_MAGIC):
        raise DataError(f"{idx} is in the legacy (pre-mmap) indexed format of old Megatron-LM/fairseq, which "
                        f"megatron-core no longer reads; {REWRITE}")
    if not header.startswith(_MAGIC):
        raise DataError(f"{idx} is not a Megatron indexed-dataset index (it starts with {header[:9]!r}, not "
                        f"{_MAGIC!r}); pass the prefix of a .bin/.idx pair, or {REWRITE}")
    if len(header) < _HEADER_BYTES:
        raise DataError(f"{idx} is truncated ({idx_bytes} bytes, shorter than its header); {REWRITE}")
    version, code, sequences, doc_entries = struct.unpack("<QBQQ", header[9:])
    if version != 1:
        raise DataError(f"{idx} has index version {version}; megatron-core reads version 1: {REWRITE}")
    if code not in _CODE_DTYPES or _CODE_DTYPES[code] not in _TOKEN_DTYPES:
        raise DataError(f"{idx} stores tokens as dtype code {code}, not integer token ids; {REWRITE}")
    expected = _HEADER_BYTES + 12 * sequences + 8 * doc_entries
    if idx_bytes == expected + sequences and sequences:
        raise DataError(f"{idx} is a multimodal index (one mode byte per sequence), not a text dataset; {REWRITE}")
    if idx_bytes != expected:
        state = "truncated" if idx_bytes < expected else "longer than its header says"
        raise DataError(f"{idx} is {state}: its header describes {sequences} sequences and {doc_entries - 1} "
                        f"documents ({expected} bytes) but the file has {idx_bytes} bytes; {REWRITE}")
    dtype = np.dtype(_CODE_DTYPES[code])
    summary = IndexSummary(prefix, dtype, int(sequences), max(int(doc_entries) - 1, 0), 0)
    index = np.memmap(idx, mode="r", dtype=np.uint8)
    documents = np.frombuffer(index, np.int64, doc_entries, _HEADER_BYTES + 12 * sequences)
    if doc_entries < 1 or documents[0] != 0 or documents[-1] != sequences:
        raise DataError(f"{idx}: its document index does not span its {sequences} sequences; {REWRITE}")
    tokens = summary.tokens_of_sequences(0, sequences)
    if sequences:
        lengths, pointers = _index_arrays(summary)
        if pointers[0] != 0:
            raise DataError(f"{idx}: the first sequence starts at byte {pointers[0]}, not 0; {REWRITE}")
    bin_bytes = bin_.stat().st_size
    if bin_bytes != tokens * dtype.itemsize:
        raise DataError(f"{bin_} has {bin_bytes} bytes but its .idx describes {tokens * dtype.itemsize} "
                        f"({tokens} {dtype.name} tokens); the files do not belong together (or one is "
                        f"truncated): {REWRITE}")
    return IndexSummary(prefix, dtype, int(sequences), summary.documents, tokens)
