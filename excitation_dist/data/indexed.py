"""Megatron's indexed dataset format (``.bin`` + ``.idx``), written and read here
without megatron installed, so that both backends train from the same files.

Layout of ``PREFIX.idx`` (little-endian), as megatron-core's
``IndexedDataset`` reads it:

    b"MMIDIDX\\x00\\x00"  | uint64 version = 1 | uint8 dtype code
    uint64 sequence count S | uint64 document-index count D (documents + 1)
    int32[S] sequence lengths (tokens) | int64[S] byte offsets into .bin
    int64[D] document indices (sequence index where each document starts; last = S)

``PREFIX.bin`` holds the tokens of all sequences back to back. Here every
document is one sequence (Megatron's preprocess_data without sentence splitting).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Iterable

import numpy as np

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
_DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7, np.uint16: 8}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> type:
    """The smallest dtype Megatron uses for a vocabulary of this size."""
    return np.uint16 if vocab_size < 65500 else np.int32


class IndexedDatasetWriter:
    """Write ``{prefix}.bin`` / ``{prefix}.idx`` atomically: both are written to
    temporary names and renamed only when the ``with`` block succeeds, so an
    interrupted run never leaves files that load as a valid dataset."""

    def __init__(self, prefix: str | Path, dtype: type = np.uint16) -> None:
        if dtype not in _DTYPE_CODES:
            raise ValueError(f"unsupported token dtype {dtype}; use one of {[d.__name__ for d in _DTYPE_CODES]}")
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self._lengths: list[int] = []
        self.num_tokens = 0

    def __enter__(self) -> "IndexedDatasetWriter":
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = self.prefix.with_name(self.prefix.name + f".bin.tmp{os.getpid()}")
        self._bin = open(self._bin_tmp, "wb")
        return self

    def add_document(self, tokens: Iterable[int]) -> None:
        array = np.asarray(list(tokens) if not isinstance(tokens, np.ndarray) else tokens)
        if array.size and (array.min() < np.iinfo(self.dtype).min or array.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token ids outside the range of {self.dtype.name}; write with a wider dtype")
        self._bin.write(array.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(int(array.size))
        self.num_tokens += int(array.size)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._bin.close()
        if exc_type is not None:
            self._bin_tmp.unlink(missing_ok=True)
            return
        idx_tmp = self.prefix.with_name(self.prefix.name + f".idx.tmp{os.getpid()}")
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths):
            pointers[1:] = np.cumsum(lengths[:-1].astype(np.int64)) * self.dtype.itemsize
        documents = np.arange(len(lengths) + 1, dtype=np.int64)
        with open(idx_tmp, "wb") as f:
            f.write(_MAGIC)
            f.write(struct.pack("<Q", _VERSION))
            f.write(struct.pack("<B", _DTYPE_CODES[self.dtype.type]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(documents)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(documents.tobytes(order="C"))
            f.flush()
            os.fsync(f.fileno())
        # .bin first: a dataset is only readable once its .idx exists
        os.replace(self._bin_tmp, f"{self.prefix}.bin")
        os.replace(idx_tmp, f"{self.prefix}.idx")


class IndexedDataset:
    """Read-only, memory-mapped view of ``{prefix}.bin`` / ``{prefix}.idx``."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
        for path in (idx_path, bin_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} not found: pass the dataset prefix without .bin/.idx (as written by "
                    "`excitation-dist prepare-data`)"
                )
        with open(idx_path, "rb") as f:
            if f.read(9) != _MAGIC:
                raise ValueError(f"{idx_path} is not a Megatron indexed dataset index (bad header)")
            (version,) = struct.unpack("<Q", f.read(8))
            if version != _VERSION:
                raise ValueError(f"{idx_path}: unsupported index version {version}")
            (code,) = struct.unpack("<B", f.read(1))
            count, doc_count = struct.unpack("<QQ", f.read(16))
            offset = f.tell()
        if code not in _CODE_DTYPES:
            raise ValueError(f"{idx_path}: unknown token dtype code {code}")
        self.dtype = np.dtype(_CODE_DTYPES[code])
        index = np.memmap(idx_path, mode="r", dtype=np.uint8)
        self.sequence_lengths = np.frombuffer(index, np.int32, count, offset)
        self.sequence_pointers = np.frombuffer(index, np.int64, count, offset + 4 * count)
        self.document_indices = np.frombuffer(index, np.int64, doc_count, offset + 12 * count)
        self._bin = np.memmap(bin_path, mode="r", dtype=self.dtype)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return np.asarray(self._bin[start : start + int(self.sequence_lengths[i])])

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def tokens(self) -> np.ndarray:
        """All tokens back to back (a memory-mapped view)."""
        return self._bin
