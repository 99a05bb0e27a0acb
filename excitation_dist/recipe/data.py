"""Training, validation and test batches for the recipe, on every backend.

Samples come from megatron-core's dataset stack over ``data.path`` (one prefix,
a weighted blend, or the embedded corpus written once as an indexed dataset):
see :mod:`excitation_dist.data.datasets`. A batch is a pure function of
(step, micro-batch, data-parallel rank) and the run's :class:`TrainPosition`,
with no iterator state: a fresh run's step ``s`` (1-based) consumes global
samples ``[(s - 1) * G, s * G)`` of the shuffled dataset, G =
``schedule.global_batch_size``, micro-batch ``m`` of rank ``r`` the
``micro_batch_size`` samples from ``(s - 1) * G + (m * D + r) * B`` (D data-
parallel ranks, B = micro_batch_size), as Megatron-LM's pretraining sampler
orders them. A resumed run continues at the samples the checkpoint consumed
(Megatron-LM's ``consumed_samples``), not at ``step * G``: resumed with another
global batch size it still reads every sample once, none skipped.

The sample order is a function of ``seed``, ``data.path`` (prefixes and blend
weights), ``data.split``, ``model.seq_length`` (:func:`order_inputs`) and, through
megatron-core's ``GPTDataset``, of the number of epochs each prefix is built over
for the samples the run asks for (:func:`epoch_plan`): megatron shuffles the
documents of all epochs together, so the same seed over 2 or 3 epochs gives two
unrelated orders, while within an unchanged number of epochs the number of
samples asked for changes nothing (a blend's mixing order is prefix-stable).
Checkpoints record all of it (:func:`data_record`); :func:`resume_order_check`
refuses a resume that would read another order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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


MID_LEVEL_SURPLUS = 0.005  # build_gpt_datasets' mid_level_dataset_surplus: a blend's per-prefix margin
_FINAL_EPOCH_THRESHOLD = 0.80  # megatron-core GPTDataset: a final epoch below this share is shuffled apart


@dataclass(frozen=True)
class TrainPosition:
    """Where a run's training samples start: after ``step`` steps, ``consumed``
    samples were read; the training dataset is built for ``num_samples``."""

    step: int
    consumed: int
    num_samples: int

    @classmethod
    def fresh(cls, cfg: RunConfig) -> "TrainPosition":
        """A run from step 0: its dataset holds every step's global batch (as Megatron-LM's train_samples)."""
        return cls(0, 0, cfg.schedule.train_steps * cfg.schedule.global_batch_size)

    def consumed_at(self, step: int, global_batch_size: int) -> int:
        return self.consumed + (step - self.step) * global_batch_size


def sample_counts(cfg: RunConfig, position: TrainPosition | None = None) -> list[int]:
    """Samples the run reads from each split: the training samples of ``position``
    (default: a fresh run's), one fixed set of ``eval_steps`` validation micro-batches
    per rank, and as many test micro-batches where ``data.split`` gives the test split
    a share (read once, after the last step, as Megatron-LM's ``do_test``)."""
    from excitation_dist.data.blends import parse_split

    s = cfg.schedule
    train = (position or TrainPosition.fresh(cfg)).num_samples
    held_out = max(1, s.eval_steps) * s.micro_batch_size * cfg.parallel.data_parallel
    return [train, held_out, held_out if parse_split(cfg.data.split)[2] > 0 else 0]


def order_inputs(cfg: RunConfig) -> dict[str, Any]:
    """What the training sample order depends on besides the epochs (keys named as in the config).
    ``data.path`` is recorded parsed (prefixes, weights normalized as megatron normalizes them), so
    ``"0.3 A 0.7 B"`` and ``"3 A 7 B"`` are one order."""
    from excitation_dist.data.blends import parse_blend

    if cfg.data.embedded:
        path: Any = "embedded"
    else:
        blend = parse_blend(cfg.data.path)
        weights = None if blend.weights is None else (np.array(blend.weights, np.float64)
                                                      / np.sum(blend.weights)).tolist()
        path = {"prefixes": list(blend.prefixes), "weights": weights}
    return {"seed": cfg.seed, "data.path": path, "data.split": cfg.data.split,
            "model.seq_length": cfg.model.seq_length}


def _train_prefixes(cfg: RunConfig) -> list[str] | None:
    """The prefixes the training dataset reads; None when the embedded corpus is not written yet
    (preflight writes nothing: the ranks check again once it exists)."""
    from excitation_dist.data.corpus import EMBEDDED_BYTES
    from excitation_dist.data.blends import parse_blend

    if not cfg.data.embedded:
        return list(parse_blend(cfg.data.path).prefixes)
    import sys

    version = "".join(map(str, sys.version_info[:3]))  # write_embedded_dataset's name for it
    prefix = data_cache_dir(cfg) / f"embedded_py{version}_{EMBEDDED_BYTES}_bytes_document"
    return [str(prefix)] if Path(f"{prefix}.idx").is_file() else None


def epoch_plan(cfg: RunConfig, num_samples: int) -> list[dict[str, Any]] | None:
    """For each prefix of the training data: the tokens of its training split and the number of epochs
    megatron-core's ``GPTDataset`` builds it over when the run asks for ``num_samples`` training
    samples, and whether the final epoch is shuffled apart (below 80% of an epoch). The order of the
    samples changes with these, not with ``num_samples`` itself; this mirrors
    ``GPTDataset._get_num_epochs`` and ``_get_size_per_split_per_dataset`` (a test compares it with the
    datasets megatron-core builds). Reads index headers only; None if the data is not there yet."""
    from excitation_dist.data.blends import parse_blend, split_ranges
    from excitation_dist.data.indexed import inspect_index

    prefixes = _train_prefixes(cfg)
    if prefixes is None:
        return None
    indexes = [inspect_index(p) for p in prefixes]
    weights = None if cfg.data.embedded else parse_blend(cfg.data.path).weights
    if weights is None and len(prefixes) > 1:
        weights = [float(index.tokens) for index in indexes]  # as build_gpt_datasets weighs an unweighted blend
    if weights is None:
        sizes = [num_samples]
    else:
        normalized = (np.array(weights, np.float64) / np.sum(weights)).tolist()
        sizes = [int(math.ceil(math.ceil(num_samples * w) * (1 + MID_LEVEL_SURPLUS))) for w in normalized]
    seq, plan = cfg.model.seq_length, []
    for prefix, index, size in zip(prefixes, indexes, sizes):
        tokens = index.tokens_of_sequences(*split_ranges(cfg.data.split, index.sequences)[0])
        epochs, separate = 1, False
        if tokens > 0:
            epochs = max(1, -(-(size * seq + 1) // tokens))  # add_extra_token_to_sequence: one more token
            if epochs > 1:
                final = size - ((epochs - 1) * tokens - 1) // seq
                separate = final < int(_FINAL_EPOCH_THRESHOLD * ((tokens - 1) // seq))
        plan.append({"prefix": prefix, "samples": size, "tokens": int(tokens), "epochs": epochs,
                     "separate_final_epoch": separate})
    return plan


def train_position(cfg: RunConfig, saved: dict[str, Any] | None) -> tuple[TrainPosition, list[str]]:
    """Where a run resumed from a checkpoint whose ``COMPLETE`` record is ``saved`` reads on (None: a
    fresh run), and notes. The dataset is built for the checkpoint's own number of samples when the
    rest of the run fits in it (the very same dataset), else for what the run needs
    (:func:`resume_order_check` has made sure the order is the same). A checkpoint without a data
    record resumes at ``step x global_batch_size``, as before these records, with a note."""
    if saved is None:
        return TrainPosition.fresh(cfg), []
    s, step = cfg.schedule, int(saved["step"])
    record = saved.get("data")
    if record is None:
        consumed = step * s.global_batch_size
        return TrainPosition(step, consumed, max(consumed, s.train_steps * s.global_batch_size)), [
            f"records no data position (written before checkpoints recorded it): resuming at sample {step} x "
            f"schedule.global_batch_size = {consumed}, which assumes the seed, data and global batch size of the "
            "run that wrote it"]
    consumed = int(record["consumed_samples"])
    need = consumed + max(0, s.train_steps - step) * s.global_batch_size
    return TrainPosition(step, consumed, max(need, int(record["num_samples"]))), []


def data_record(cfg: RunConfig, position: TrainPosition, step: int,
                plan: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The ``data`` entry of a checkpoint's ``COMPLETE`` record at ``step``: the samples consumed, the
    sampler's inputs (:func:`order_inputs`), the number of samples the dataset was built for and its
    :func:`epoch_plan`, and the schedule that read them (for messages)."""
    s = cfg.schedule
    return {"consumed_samples": position.consumed_at(step, s.global_batch_size), **order_inputs(cfg),
            "num_samples": position.num_samples, "epochs": plan,
            "global_batch_size": s.global_batch_size, "train_steps": s.train_steps}


def resume_order_check(cfg: RunConfig, saved: dict[str, Any], record_path: Path) -> tuple[list[str], list[str]]:
    """(problems, notes) of reading on from the checkpoint whose ``COMPLETE`` record is ``saved``: another
    seed, data.path or data.split reorders every sample; a global batch size or train_steps that makes
    megatron-core build the data over another number of epochs reshuffles it; the data's training split
    changed size. ``model.seq_length`` is not compared here: the model check refuses it already."""
    record = saved.get("data")
    if record is None:
        return [], train_position(cfg, saved)[1]
    now = order_inputs(cfg)
    changed = [key for key in sorted(now) if key != "model.seq_length" and key in record and record[key] != now[key]]
    if changed:
        diffs = ", ".join(f"{key} {record[key]!r} -> {now[key]!r}" for key in changed)
        fix = " ".join(f"{key}={_spelled(record[key])}" for key in changed)
        return [f"data: {record_path} was written by a run that read its samples in another order: {diffs} "
                "(checkpoint -> this run); the order is a function of seed, data.path, data.split and "
                "model.seq_length, so the resumed run would read some samples twice and others never: resume "
                f"with {fix}, or set checkpoint.dir to a new directory to start another run"], []
    position, _ = train_position(cfg, saved)
    try:
        plan = epoch_plan(cfg, position.num_samples)
    except (DataError, OSError):  # unreadable data: preflight's data check names it
        plan = None
    before = record.get("epochs")
    if plan is None or before is None or _shape(plan) == _shape(before):
        return [], []
    s = cfg.schedule
    if [p["tokens"] for p in plan] != [p["tokens"] for p in before]:
        return [f"data.path: {record_path} was written by a run whose training split held "
                f"{[p['tokens'] for p in before]} tokens per prefix, this run's holds {[p['tokens'] for p in plan]}: "
                "the data changed, and so did its order; resume with the data that wrote it, or set checkpoint.dir "
                "to a new directory"], []
    keys = [f"schedule.{k} {record[k]} -> {getattr(s, k)}" for k in ("global_batch_size", "train_steps")
            if record.get(k) not in (None, getattr(s, k))]
    epochs = "; ".join(f"{p['prefix']}: {a['epochs']} -> {p['epochs']} epoch(s)"
                       + (", final epoch shuffled apart" if p["separate_final_epoch"] else "")
                       for a, p in zip(before, plan) if a["epochs"] != p["epochs"]
                       or a["separate_final_epoch"] != p["separate_final_epoch"])
    longest = position.step + (int(record["num_samples"]) - position.consumed) // s.global_batch_size
    shorter = (f"set schedule.train_steps<={longest} (the samples the checkpoint's dataset holds), "
               if longest > position.step else "")
    return [f"schedule: {record_path} read a dataset built for {record['num_samples']} samples; this run "
            f"({', '.join(keys) or 'same schedule'}, checkpoint -> this run) needs {position.num_samples}, and "
            f"megatron-core's GPTDataset would build it over another number of epochs ({epochs}), shuffling every "
            f"sample into another order: resume with the schedule that wrote it, {shorter}or set checkpoint.dir "
            "to a new directory"], []


def _shape(plan: list[dict[str, Any]]) -> list[tuple]:
    """What of an epoch plan decides the order: not the prefix (the embedded corpus's cache may move), nor
    the samples asked for."""
    return [(p["tokens"], p["epochs"], p["separate_final_epoch"]) for p in plan]


def _spelled(value: Any) -> str:
    """A recorded value as a ``key=value`` override would spell it."""
    if isinstance(value, dict):  # a parsed blend
        if value["weights"] is None:
            return "'" + " ".join(value["prefixes"]) + "'"
        return "'" + " ".join(f"{w:g} {p}" for w, p in zip(value["weights"], value["prefixes"])) + "'"
    return str(value)


class TokenSource:
    """The run's samples: ``train_batch(step, micro, rank)``, ``validation_batch(index, rank)``
    and ``test_batch(index, rank)``, each ``[micro_batch_size, seq_length + 1]`` int64."""

    def __init__(self, train: SampleReader, validation: SampleReader | None, vocab_size: int, *,
                 micro_batch_size: int, data_parallel: int, global_batch_size: int,
                 position: TrainPosition | None = None, plan: list[dict[str, Any]] | None = None,
                 test: SampleReader | None = None) -> None:
        self.train, self.validation, self.test, self.vocab_size = train, validation, test, vocab_size
        self.micro_batch_size, self.data_parallel, self.global_batch_size = (
            micro_batch_size, data_parallel, global_batch_size)
        self.position = position or TrainPosition(0, 0, len(train))
        self.plan = plan  # epoch_plan of the training dataset, for the checkpoint record

    @classmethod
    def from_config(cls, cfg: RunConfig, position: TrainPosition | None = None) -> "TokenSource":
        """Build (rank 0 first, then the others from its cached index files) on
        every rank of the default process group, for a run that reads on from
        ``position`` (default: a fresh run; :func:`train_position` for a resume)."""
        position = position or TrainPosition.fresh(cfg)
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
            num_samples=sample_counts(cfg, position), cache_dir=str(cache / "indices"), tokenizer=tokenizer)
        if datasets[0] is None:
            raise ConfigError(f"data.split: {cfg.data.split} gives the training split no documents")
        if datasets[1] is None and cfg.schedule.eval_interval:
            raise ConfigError(f"data.split: {cfg.data.split} gives the validation split no share; give it one "
                              "(e.g. 98,2,0) or set schedule.eval_interval=0")
        s = cfg.schedule
        readers = [None if d is None else SampleReader(d, name) for d, name in zip(datasets, SPLIT_NAMES)]
        return cls(readers[0], readers[1], tokenizer.vocab_size, micro_batch_size=s.micro_batch_size,
                   data_parallel=cfg.parallel.data_parallel, global_batch_size=s.global_batch_size,
                   position=position, plan=epoch_plan(cfg, position.num_samples), test=readers[2])

    def train_indices(self, step: int, micro: int, rank: int) -> range:
        """Global sample indices of (step (1-based, after the position's step), micro-batch, data-parallel
        rank): the step's global batch starts where the previous step's ended."""
        if step <= self.position.step:
            raise ValueError(f"step {step} was trained before the checkpoint this run resumed (step "
                             f"{self.position.step})")
        b = self.micro_batch_size
        start = self.position.consumed_at(step - 1, self.global_batch_size) + (micro * self.data_parallel + rank) * b
        return range(start, start + b)

    def record(self, cfg: RunConfig, step: int) -> dict[str, Any]:
        """The checkpoint's data record after ``step`` (:func:`data_record`)."""
        return data_record(cfg, self.position, step, self.plan)

    def train_batch(self, step: int, micro: int, rank: int) -> torch.Tensor:
        return self.train.samples(self.train_indices(step, micro, rank))

    def validation_batch(self, index: int, rank: int) -> torch.Tensor:
        """Validation micro-batch ``index`` of ``rank``: the same samples at every evaluation."""
        if self.validation is None:
            raise ConfigError("data.split: the validation split is empty; give it a share or set "
                              "schedule.eval_interval=0")
        return self._held_out(self.validation, index, rank)

    def test_batch(self, index: int, rank: int) -> torch.Tensor:
        """Test micro-batch ``index`` of ``rank`` (read once, after the last step)."""
        if self.test is None:
            raise ConfigError("data.split: the test split is empty; give it a share (e.g. 96,2,2)")
        return self._held_out(self.test, index, rank)

    def _held_out(self, reader: SampleReader, index: int, rank: int) -> torch.Tensor:
        b = self.micro_batch_size
        start = (index * self.data_parallel + rank) * b
        return reader.samples(range(start, start + b))


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
