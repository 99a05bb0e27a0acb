"""``excitation-dist prepare-data``: text/jsonl -> Megatron indexed dataset, with a sentencepiece
or Hugging Face tokenizer (existing) or a sentencepiece model trained on the inputs."""

from __future__ import annotations

import argparse
from pathlib import Path

from excitation_dist.data.tokenizers import KINDS

MIN_TRAINED_VOCAB = 300


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", type=Path,
                        help="jsonl files (.gz too), plain-text files, or directories of them")
    parser.add_argument("--embedded-corpus", action="store_true",
                        help="use the embedded default corpus (the Python standard library's sources)")
    parser.add_argument("--output-prefix", type=Path, required=True,
                        help="writes PREFIX_text_document.{bin,idx} (and PREFIX.model when it trains a tokenizer)")
    parser.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer", type=Path,
                        help="an existing tokenizer: a sentencepiece .model, or a Hugging Face tokenizer.json or "
                             "its directory (local files only); omit to train a sentencepiece model on the inputs")
    parser.add_argument("--tokenizer-kind", choices=KINDS, default="auto",
                        help="auto: a directory or .json is Hugging Face, anything else sentencepiece")
    parser.add_argument("--eod-token", help="Hugging Face: the end-of-document token, when tokenizer_config.json "
                                            "names no eos_token (e.g. '<|endoftext|>')")
    parser.add_argument("--vocab-size", type=int, default=8000, help="vocabulary of the trained tokenizer")
    parser.add_argument("--jsonl-key", default="text", help="field holding the text in jsonl records")
    parser.add_argument("--text-documents", choices=("file", "line", "paragraph"), default="file",
                        help="what one document is in a plain-text file")
    parser.add_argument("--max-documents", type=int, help="stop after this many documents")
    parser.add_argument("--workers", type=int, default=0,
                        help="tokenizer processes; 0: one for inputs under 32 MB, else one per CPU (at most 16)")


def run(args: argparse.Namespace) -> int:
    from excitation_dist.data.prepare import DataError, embedded_documents, prepare_data

    inputs = list(args.inputs)
    if args.embedded_corpus:
        inputs += embedded_documents()
    if args.tokenizer is None and args.vocab_size < MIN_TRAINED_VOCAB:
        raise SystemExit(f"excitation-dist prepare-data: --vocab-size must be at least {MIN_TRAINED_VOCAB} (the "
                         "trained tokenizer holds 256 byte pieces and its special tokens besides merges)")
    if args.workers < 0:
        raise SystemExit("excitation-dist prepare-data: --workers must be >= 0 (0: chosen by input size)")
    try:
        result = prepare_data(
            inputs, args.output_prefix, tokenizer=args.tokenizer, tokenizer_kind=args.tokenizer_kind,
            eod_token=args.eod_token, vocab_size=args.vocab_size, jsonl_key=args.jsonl_key,
            text_documents=args.text_documents, max_documents=args.max_documents, workers=args.workers,
        )
    except DataError as exc:
        raise SystemExit(f"excitation-dist prepare-data: {exc}") from None
    tokenizer = result.tokenizer
    print(f"tokenizer: {tokenizer.spec.path} ({tokenizer.spec.kind}, {tokenizer.vocab_size} tokens, "
          f"end of document {tokenizer.eod})")
    print(f"dataset:   {result.data_prefix}.bin/.idx ({result.documents} documents, {result.tokens:,} tokens)")
    print(f"train with: excitation-dist train {_example_config()} data.path={result.data_prefix} "
          f"data.tokenizer={tokenizer.spec.path} model.vocab_size=auto")
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
