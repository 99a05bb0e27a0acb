"""GPT training samples from Megatron indexed datasets, through megatron-core's own
dataset stack (``BlendedMegatronDatasetBuilder`` -> ``GPTDataset`` /
``BlendedDataset``): document-aware samples that run across document
boundaries, as many epochs as the requested samples need, a seeded shuffle,
weighted blends of several prefixes, and index files cached in ``cache_dir``.
Tokens stay memory-mapped; a sample reads only its own ``seq_length + 1`` tokens.

Blends use Megatron-LM's ``--data-path`` syntax: ``"PREFIX"``,
``"W1 PREFIX1 W2 PREFIX2 ..."`` (weights, normalized), or ``"PREFIX1 PREFIX2"``
(weighted by their tokens), as one string or as a list of the same items.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import numpy as np
import torch

from excitation_dist.data.blends import SPLIT_NAMES, Blend, parse_blend, parse_split, split_ranges
from excitation_dist.data.errors import DataError
from excitation_dist.data.tokenizers import Tokenizer

__all__ = ["SPLIT_NAMES", "Blend", "SampleReader", "build_gpt_datasets", "parse_blend", "parse_split", "split_ranges"]


class _MegatronTokenizer:
    """The view of a :class:`Tokenizer` that megatron-core's datasets read.
    ``pad`` is -1: samples are never padded (partial sequences are dropped), so
    no id in the data may be masked or rewritten as padding."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eod if tokenizer.eod is not None else -1  # read only for masks we switch off
        self.pad = -1
        self.unique_identifiers = tokenizer.unique_identifiers


@contextlib.contextmanager
def _process_group_for_builder():
    """megatron-core 0.16.1's BlendedDataset asks ``torch.distributed.get_rank()``
    on a cache miss even when no process group exists (0.19 checks first): give a
    lone process a one-rank gloo group while building."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def build_gpt_datasets(blend: Blend, *, split: str, seq_length: int, seed: int, num_samples: Sequence[int],
                       cache_dir: str, tokenizer: Tokenizer,
                       is_built_on_rank: Callable[[], bool] = lambda: True) -> list:
    """The training, validation and test datasets (None where ``split`` gives
    no share), each with at least ``num_samples[i]`` samples of
    ``seq_length + 1`` tokens.

    Call it on every rank of the default process group (or in a lone process):
    megatron-core builds the index files on global rank 0 first, then every other
    rank loads them, so ``cache_dir`` must be one directory all ranks see."""
    from excitation_dist.data.indexed import inspect_index
    from excitation_dist.megatron.deferred_import import dataset_modules, dataset_scope

    try:
        modules = dataset_modules()
    except ImportError as exc:
        raise DataError(f"megatron-core's dataset stack does not import ({exc}); the recipe reads its data through "
                        "it on every backend: pip install -e '.[recipe]'") from None
    builder_module = modules["megatron.core.datasets.blended_megatron_dataset_builder"]
    BlendedMegatronDatasetBuilder = builder_module.BlendedMegatronDatasetBuilder
    gpt_dataset = modules["megatron.core.datasets.gpt_dataset"]
    GPTDataset, GPTDatasetConfig = gpt_dataset.GPTDataset, gpt_dataset.GPTDatasetConfig

    prefixes, weights = blend.as_megatron()
    if weights is None and len(prefixes) > 1:
        # megatron builds one epoch of an unweighted blend, however many samples are asked:
        # weigh by tokens instead (the same proportions), so that epochs repeat as needed
        weights = [float(inspect_index(p).tokens) for p in prefixes]
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights), split=split,
        path_to_cache=cache_dir, tokenizer=_MegatronTokenizer(tokenizer), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        drop_last_partial_validation_sequence=True, mid_level_dataset_surplus=0.005,
    )
    def build() -> list:
        return BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), is_built_on_rank, config).build()

    with _process_group_for_builder(), dataset_scope():
        build()
        # The rank that built the index files keeps them in memory (8 bytes per sample of every epoch, for
        # the sample index alone), where a rank that found them cached maps them from disk. Every rank opens
        # them again from the cache, mapped (the same calls on every rank: megatron's builder synchronizes).
        return build()


def mapped_files(dataset, depth: int = 4) -> list:
    """The ``mmap.mmap`` objects behind a megatron-core dataset: its ``.bin`` and
    ``.idx`` maps and the cached index files it loaded mapped (numpy memmaps),
    found through the objects' attributes (and lists of datasets, for blends)."""
    import mmap

    found, seen = [], set()

    def walk(obj, level: int) -> None:
        if id(obj) in seen or level > depth:
            return
        seen.add(id(obj))
        if isinstance(obj, mmap.mmap):
            found.append(obj)
        elif isinstance(obj, np.memmap):
            if isinstance(getattr(obj, "_mmap", None), mmap.mmap):
                walk(obj._mmap, level)
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item, level + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (type, np.ndarray, torch.Tensor)):
            for value in vars(obj).values():
                walk(value, level + 1)

    walk(dataset, 0)
    return found


class SampleReader:
    """Samples of a megatron-core GPT (or blended) dataset by global index, as
    ``[n, seq_length + 1]`` int64 token windows (inputs and shifted targets).

    The tokens and megatron's index files are read through read-only memory maps,
    and every page a map touches stays in the process's resident set: the kernel
    maps whole page-cache folios (up to 2 MB each on file systems with large
    folios) at each fault, measured at about 1.5 MB of RSS per random sample of a
    2 GB corpus, so over a run a rank's RSS would grow toward the size of the
    corpus and its index files. Every ``release_every`` samples the reader drops
    its maps' pages from the process (``MADV_DONTNEED``: clean file pages that
    stay in the page cache, so the next read is a minor fault), which keeps a
    rank's RSS independent of the corpus size."""

    def __init__(self, dataset, name: str, release_every: int = 8) -> None:
        self.dataset, self.name, self.release_every = dataset, name, release_every
        self._maps = mapped_files(dataset)
        self._since_release = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self.dataset):
            raise IndexError(f"{self.name} sample {index} is outside the {len(self.dataset)} samples built; "
                             "the dataset was built for fewer steps than this run takes")
        item = self.dataset[index]
        self._since_release += 1
        if self._since_release >= self.release_every:
            self.release_pages()
        return torch.cat([item["tokens"], item["labels"][-1:]])

    def samples(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.stack([self.sample(int(i)) for i in indices])

    def release_pages(self) -> None:
        import mmap

        self._since_release = 0
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        for m in self._maps:
            if not m.closed:
                m.madvise(mmap.MADV_DONTNEED)
