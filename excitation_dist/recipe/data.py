"""Training and validation batches for the recipe, on every backend.

Samples come from megatron-core's dataset stack over ``data.path`` (one prefix,
a weighted blend, or the embedded corpus written once as an indexed dataset):
see :mod:`excitation_dist.data.datasets`. A batch is a pure function of
(step, micro-batch, data-parallel rank), with no iterator state: step ``s``
(1-based) consumes global samples ``[(s - 1) * G, s * G)`` of the shuffled
dataset, G = ``schedule.global_batch_size``, micro-batch ``m`` of rank ``r``
the ``micro_batch_size`` samples from ``(s - 1) * G + (m * D + r) * B`` (D data-
parallel ranks, B = micro_batch_size), as Megatron-LM's pretraining sampler
orders them. A resumed run therefore reads exactly the samples the
uninterrupted run would have read. The sample order depends on ``seed``,
``model.seq_length``, ``data.split`` and the number of samples the run asks
for (``train_steps x global_batch_size``), as in Megatron-LM.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from excitation_dist.config import ConfigError
from excitation_dist.data.datasets import SPLIT_NAMES, SampleReader, build_gpt_datasets, parse_blend
from excitation_dist.data.errors import DataError
from excitation_dist.data.tokenizers import ByteTokenizer, Tokenizer, load_tokenizer
from excitation_dist.recipe.config import DataConfig, RunConfig


def data_cache_dir(cfg: RunConfig) -> Path:
    """Where megatron-core's index files (and the embedded corpus) go."""
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.logging.dir) / "data_cache"


def run_tokenizer(data: DataConfig) -> Tokenizer:
    """The run's tokenizer (bytes for the embedded corpus); ConfigError naming data.tokenizer."""
    if data.embedded:
        return ByteTokenizer()
    try:
        return load_tokenizer(str(data.tokenizer), data.tokenizer_kind)
    except DataError as exc:
        raise ConfigError(f"data.tokenizer: {exc}") from None


def sample_counts(cfg: RunConfig) -> list[int]:
    """Samples the run reads from each split: every step's global batch, one
    fixed set of ``eval_steps`` validation micro-batches per rank, no test."""
    s = cfg.schedule
    return [s.train_steps * s.global_batch_size, max(1, s.eval_steps) * s.micro_batch_size * cfg.parallel.data_parallel, 0]


class TokenSource:
    """The run's samples: ``train_batch(step, micro, rank)`` and
    ``validation_batch(index, rank)``, each ``[micro_batch_size, seq_length + 1]`` int64."""

    def __init__(self, train: SampleReader, validation: SampleReader | None, vocab_size: int, *,
                 micro_batch_size: int, data_parallel: int, global_batch_size: int) -> None:
        self.train, self.validation, self.vocab_size = train, validation, vocab_size
        self.micro_batch_size, self.data_parallel, self.global_batch_size = (
            micro_batch_size, data_parallel, global_batch_size)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "TokenSource":
        """Build (rank 0 first, then the others from its cached index files) on
        every rank of the default process group."""
        tokenizer = run_tokenizer(cfg.data)
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"vocabulary ({tokenizer.vocab_size}); raise it, or set auto")
        cache = data_cache_dir(cfg)
        if cfg.data.embedded:
            blend = parse_blend(_embedded_prefix(cache))
        else:
            blend = parse_blend(cfg.data.path)
        datasets = build_gpt_datasets(
            blend, split=cfg.data.split, seq_length=cfg.model.seq_length, seed=cfg.seed,
            num_samples=sample_counts(cfg), cache_dir=str(cache / "indices"), tokenizer=tokenizer)
        if datasets[0] is None:
            raise ConfigError(f"data.split: {cfg.data.split} gives the training split no documents")
        if datasets[1] is None and cfg.schedule.eval_interval:
            raise ConfigError(f"data.split: {cfg.data.split} gives the validation split no share; give it one "
                              "(e.g. 98,2,0) or set schedule.eval_interval=0")
        s = cfg.schedule
        return cls(SampleReader(datasets[0], SPLIT_NAMES[0]),
                   None if datasets[1] is None else SampleReader(datasets[1], SPLIT_NAMES[1]),
                   tokenizer.vocab_size, micro_batch_size=s.micro_batch_size,
                   data_parallel=cfg.parallel.data_parallel, global_batch_size=s.global_batch_size)

    def train_indices(self, step: int, micro: int, rank: int) -> range:
        """Global sample indices of (step (1-based), micro-batch, data-parallel rank)."""
        b = self.micro_batch_size
        start = (step - 1) * self.global_batch_size + (micro * self.data_parallel + rank) * b
        return range(start, start + b)

    def train_batch(self, step: int, micro: int, rank: int) -> torch.Tensor:
        return self.train.samples(self.train_indices(step, micro, rank))

    def validation_batch(self, index: int, rank: int) -> torch.Tensor:
        """Validation micro-batch ``index`` of ``rank``: the same samples at every evaluation."""
        if self.validation is None:
            raise ConfigError("data.split: the validation split is empty; give it a share or set "
                              "schedule.eval_interval=0")
        b = self.micro_batch_size
        start = (index * self.data_parallel + rank) * b
        return self.validation.samples(range(start, start + b))


def _embedded_prefix(cache: Path) -> str:
    """The embedded corpus as an indexed dataset in the cache, written by rank 0."""
    from excitation_dist.data.corpus import write_embedded_dataset

    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        prefix = write_embedded_dataset(cache)
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        prefix = write_embedded_dataset(cache)  # present now: only names it (rewrites if the cache is node-local)
    return prefix
