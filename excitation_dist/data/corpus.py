"""The embedded default corpus: the Python standard library's own sources.

Present on every machine that runs this project, so the default job needs no
download. Files are read in sorted order, so the corpus is deterministic for a
given Python version. The recipe trains on it through the same indexed-dataset
path as on any corpus (:func:`write_embedded_dataset`, byte-level tokens).
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

EMBEDDED_BYTES = 4_000_000


def embedded_files(max_bytes: int = EMBEDDED_BYTES) -> list[Path]:
    """The top-level ``*.py`` files of the running Python's standard library, in
    name order, until they hold ``max_bytes``."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        files.append(path)
        total += path.stat().st_size
        if total >= max_bytes:
            break
    if not files:
        raise RuntimeError(f"no Python sources found under {stdlib}; pass a corpus explicitly")
    return files


def write_embedded_dataset(directory: str | Path, max_bytes: int = EMBEDDED_BYTES) -> str:
    """The embedded corpus as a Megatron indexed dataset of bytes under
    ``directory`` (written once per Python version; atomic, so concurrent
    writers are safe): one document per source file, each ended by byte 0,
    the byte tokenizer's end-of-document id. Returns the prefix."""
    from excitation_dist.data.indexed import IndexedDatasetWriter

    version = "".join(map(str, sys.version_info[:3]))
    prefix = Path(directory) / f"embedded_py{version}_{max_bytes}_bytes_document"
    if not (Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()):
        with IndexedDatasetWriter(prefix, np.uint8) as writer:
            for path in embedded_files(max_bytes):
                writer.add_document(np.frombuffer(path.read_bytes() + b"\0", dtype=np.uint8))
    return str(prefix)


def embedded_corpus_bytes(max_bytes: int = 4_000_000) -> bytes:
    """Up to ``max_bytes`` of text: the top-level ``*.py`` files of the running
    Python's standard library, concatenated in name order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise RuntimeError(f"no Python sources found under {stdlib}; pass a corpus explicitly")
    return b"".join(chunks)[:max_bytes]


def byte_batches(
    corpus: torch.Tensor, batch_size: int, seq_len: int, step: int, rank: int = 0, seed: int = 0
) -> torch.Tensor:
    """A deterministic batch [batch_size, seq_len + 1] of byte windows for
    (seed, step, rank): every rank draws distinct windows."""
    import torch  # here, not at the top: the command line reads the corpus module without torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + rank)
    starts = torch.randint(0, corpus.numel() - seq_len - 1, (batch_size,), generator=g)
    return torch.stack([corpus[s : s + seq_len + 1] for s in starts.tolist()]).long()
