"""Data: tokenizers, Megatron indexed datasets (written and read through
megatron-core), prepare-data, and the embedded default corpus (no downloads).

Modules: :mod:`.tokenizers` (one interface over sentencepiece, Hugging Face and
bytes), :mod:`.indexed` (the ``.bin/.idx`` writer and checks), :mod:`.datasets`
(megatron-core's GPT dataset stack: blends, splits, samples by index),
:mod:`.prepare` (text/jsonl -> indexed dataset), :mod:`.corpus` (embedded corpus).
"""

from excitation_dist.data.corpus import byte_batches, embedded_corpus_bytes
from excitation_dist.data.errors import DataError

__all__ = ["DataError", "byte_batches", "embedded_corpus_bytes"]
