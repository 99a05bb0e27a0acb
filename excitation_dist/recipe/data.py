"""Training and validation batches for the recipe.

Batches are a pure function of (seed, step, micro-batch, data-parallel rank):
no iterator state, so a resumed run sees exactly the batches the uninterrupted
run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from excitation_dist.config import ConfigError
from excitation_dist.data.corpus import embedded_corpus_bytes
from excitation_dist.recipe.config import DataConfig

EMBEDDED_VOCAB = 256  # byte-level


@dataclass
class TokenSource:
    train: torch.Tensor  # 1-D int64 view of the training tokens
    validation: torch.Tensor
    vocab_size: int

    @classmethod
    def from_config(cls, data: DataConfig, model_vocab_size: int, seq_length: int) -> "TokenSource":
        if data.path == "embedded":
            tokens = torch.frombuffer(bytearray(embedded_corpus_bytes(4_000_000)), dtype=torch.uint8).long()
            vocab = EMBEDDED_VOCAB
        else:
            import sentencepiece as spm

            from excitation_dist.data.indexed import IndexedDataset

            dataset = IndexedDataset(data.path)
            tokens = torch.from_numpy(np.asarray(dataset.tokens(), dtype=np.int64))
            vocab = spm.SentencePieceProcessor(model_file=str(data.tokenizer)).vocab_size()
        if vocab > model_vocab_size:
            raise ConfigError(
                f"model.vocab_size: {model_vocab_size} is smaller than the data's vocabulary ({vocab}); raise it"
            )
        split = int(tokens.numel() * (1 - data.validation_fraction))
        train, validation = tokens[:split], tokens[split:]
        for name, part in (("training", train), ("validation", validation)):
            if part.numel() <= seq_length + 1:
                raise ConfigError(f"data.path: the {name} split has {part.numel()} tokens, fewer than one sequence "
                                  f"of model.seq_length={seq_length}; use more data or a shorter sequence")
        return cls(train, validation, vocab)


def batch(tokens: torch.Tensor, batch_size: int, seq_length: int, *, seed: int, step: int, micro: int, rank: int,
          split: int = 0) -> torch.Tensor:
    """``[batch_size, seq_length + 1]`` windows of ``tokens`` drawn for
    (seed, step, micro, rank, split)."""
    g = torch.Generator().manual_seed(hash((seed, step, micro, rank, split)) & 0x7FFF_FFFF_FFFF_FFFF)
    starts = torch.randint(0, tokens.numel() - seq_length - 1, (batch_size,), generator=g)
    offsets = torch.arange(seq_length + 1)
    return tokens[starts[:, None] + offsets]
