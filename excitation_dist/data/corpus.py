"""The embedded default corpus: the Python standard library's own sources.

Present on every machine that runs this project, so the default job needs no
download. Files are read in sorted order, so the corpus is deterministic for a
given Python version.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch


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
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + rank)
    starts = torch.randint(0, corpus.numel() - seq_len - 1, (batch_size,), generator=g)
    return torch.stack([corpus[s : s + seq_len + 1] for s in starts.tolist()]).long()
