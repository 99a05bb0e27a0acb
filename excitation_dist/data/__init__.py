"""Data: the embedded default corpus (no downloads)."""

from excitation_dist.data.corpus import embedded_corpus_bytes, byte_batches

__all__ = ["embedded_corpus_bytes", "byte_batches"]
