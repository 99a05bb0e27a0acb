"""``excitation-dist prepare-data``: sentencepiece tokenizer + Megatron indexed dataset."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", type=Path, help="text files (one document each) or .jsonl files")
    parser.add_argument("--embedded-corpus", action="store_true",
                        help="use the embedded default corpus (the Python standard library's sources)")
    parser.add_argument("--output-prefix", type=Path, required=True,
                        help="writes PREFIX.model and PREFIX_text_document.{bin,idx}")
    parser.add_argument("--tokenizer-model", type=Path, help="an existing sentencepiece model (skip training)")
    parser.add_argument("--vocab-size", type=int, default=8000, help="vocabulary of the trained tokenizer")
    parser.add_argument("--jsonl-key", default="text", help="field holding the text in jsonl records")
    parser.add_argument("--max-documents", type=int, help="stop after this many documents")


def run(args: argparse.Namespace) -> int:
    from excitation_dist.data.prepare import DataError, embedded_documents, prepare_data

    inputs = list(args.inputs)
    if args.embedded_corpus:
        inputs += embedded_documents()
    if args.vocab_size < 100:
        raise SystemExit("excitation-dist prepare-data: --vocab-size must be at least 100")
    try:
        result = prepare_data(
            inputs, args.output_prefix, tokenizer_model=args.tokenizer_model, vocab_size=args.vocab_size,
            jsonl_key=args.jsonl_key, max_documents=args.max_documents,
        )
    except DataError as exc:
        raise SystemExit(f"excitation-dist prepare-data: {exc}") from None
    print(f"tokenizer: {result.tokenizer_model} ({result.vocab_size} tokens)")
    print(f"dataset:   {result.data_prefix}.bin/.idx ({result.documents} documents, {result.tokens:,} tokens)")
    print(f"train with: excitation-dist train {_example_config()} data.path={result.data_prefix} "
          f"data.tokenizer={result.tokenizer_model} model.vocab_size=auto")
    return 0


def _example_config() -> str:
    """The tiny CPU config of this checkout, as a path the user can type from here."""
    config = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"
    if not config.is_file():
        return "CONFIG.yaml"
    try:
        return str(config.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(config)
