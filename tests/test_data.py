"""prepare-data and the Megatron indexed dataset files: written through megatron-core's
``IndexedDatasetBuilder``, read back by megatron-core's ``IndexedDataset``, and
checked (:func:`inspect_index`) without reading the tokens."""

import gzip
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from excitation_dist.data import prepare as prepare_module
from excitation_dist.data.errors import DataError
from excitation_dist.data.indexed import IndexedDatasetWriter, inspect_index
from excitation_dist.data.prepare import Progress, prepare_data
from excitation_dist.data.tokenizers import load_tokenizer

indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")

DOCS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "Mixture-of-Experts layers route every token to a few experts.\nExcitation scales their updates. " * 15,
    "def f(x):\n    return x * 2  # code is text too\n" * 25,
]


def test_round_trip_through_megatron_core(tmp_path):
    docs = [np.arange(5), np.array([], dtype=np.int64), np.array([65000, 3, 7])]
    with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
        for d in docs:
            w.add_document(d)
    ds = indexed.IndexedDataset(str(tmp_path / "d"))
    assert len(ds) == 3 and ds.index.dtype == np.uint16
    assert [ds[i].tolist() for i in range(3)] == [d.tolist() for d in docs]
    assert ds.document_indices.tolist() == [0, 1, 2, 3]
    summary = inspect_index(tmp_path / "d")
    assert (summary.sequences, summary.documents, summary.tokens) == (3, 3, 8)
    assert summary.tokens_of_sequences(1, 3) == 3 and summary.first_tokens(6).tolist() == [0, 1, 2, 3, 4, 65000]


def test_write_is_atomic(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
            w.add_document([1, 2, 3])
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="wider dtype"):
        with IndexedDatasetWriter(tmp_path / "e", np.uint16) as w:
            w.add_document([70000])  # megatron's builder would silently wrap it to 4464
    assert list(tmp_path.iterdir()) == []


def _megatron_corpus(prefix, docs, dtype=np.int32):
    """A corpus written by megatron-core's own builder, as Megatron-LM's preprocess_data writes it."""
    builder = indexed.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(f"{prefix}.idx")


def test_inspect_refuses_missing_truncated_and_foreign_files(tmp_path):
    good = tmp_path / "good"
    _megatron_corpus(good, [list(range(10)), list(range(7))])
    assert inspect_index(good).tokens == 17
    idx, bin_ = (tmp_path / "good.idx").read_bytes(), (tmp_path / "good.bin").read_bytes()

    def case(name, idx_bytes=idx, bin_bytes=bin_):
        if idx_bytes is not None:
            (tmp_path / f"{name}.idx").write_bytes(idx_bytes)
        (tmp_path / f"{name}.bin").write_bytes(bin_bytes)
        with pytest.raises(DataError) as info:
            inspect_index(tmp_path / name)
        return str(info.value)

    assert case("noidx", None) == f"{tmp_path / 'noidx.idx'} does not exist"
    assert "noidx" not in case("trunc", idx[:-5]) and "trunc.idx is truncated: its header describes 2 sequences " \
        "and 2 documents" in case("trunc", idx[:-5])
    assert "shorter than its header" in case("tiny", idx[:20])
    assert "is not a Megatron indexed-dataset index (it starts with b'{\"text\": '" in case("json", b'{"text": "x"}\n')
    assert "legacy (pre-mmap) indexed format" in case("legacy", b"TNTIDX\x00\x00" + bytes(40))
    assert "has index version 2" in case("v2", idx[:9] + struct.pack("<Q", 2) + idx[17:])
    assert "not integer token ids" in case("float", idx[:17] + struct.pack("<B", 7) + idx[18:])
    assert "good.bin" not in case("shortbin", idx, bin_[:-4])
    assert "shortbin.bin has 64 bytes but its .idx describes 68 (17 int32 tokens)" in case("shortbin", idx, bin_[:-4])
    builder = indexed.IndexedDatasetBuilder(str(tmp_path / "mm.bin"), dtype=np.int32, multimodal=True)
    builder.add_item(torch.tensor([1, 2]), mode=1)
    builder.end_document()
    builder.finalize(str(tmp_path / "mm.idx"))
    with pytest.raises(DataError, match="multimodal index"):
        inspect_index(tmp_path / "mm")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "excitation_dist.cli", "prepare-data", *args],
                          capture_output=True, text=True, timeout=300)


def test_prepare_data_from_jsonl_and_text(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS[:2])) + "\n")
    extra = tmp_path / "extra.txt"
    extra.write_text(DOCS[2])
    proc = _cli(str(corpus), str(extra), "--output-prefix", str(tmp_path / "out" / "c"), "--vocab-size", "300")
    assert proc.returncode == 0, proc.stderr
    assert "tokenize (1 process): 3 documents |" in proc.stderr and "tokens/s" in proc.stderr and "3 documents" in proc.stdout
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "c.model"))
    ds = indexed.IndexedDataset(str(tmp_path / "out" / "c_text_document"))
    assert len(ds) == 3
    for i, doc in enumerate(DOCS):
        ids = ds[i].tolist()
        assert ids[-1] == sp.eos_id()
        assert sp.decode(ids[:-1]) == doc

    # an existing tokenizer is reused, not retrained (--tokenizer-model is the older spelling of --tokenizer)
    proc = _cli(str(extra), "--output-prefix", str(tmp_path / "again"), "--tokenizer-model", str(tmp_path / "out" / "c.model"))
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "again.model").exists()
    again = indexed.IndexedDataset(str(tmp_path / "again_text_document"))  # held: its __del__ unmaps the tokens
    assert again[0].tolist() == ds[2].tolist()


def test_plain_text_units_directories_gzip_and_max_documents(tmp_path):
    tok = tmp_path / "tok"
    (tmp_path / "seed.txt").write_text("\n".join(DOCS))
    prepare_data([tmp_path / "seed.txt"], tok, vocab_size=300, quiet=True)
    sp = load_tokenizer(f"{tok}.model")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("first line\nsecond line\n\nthird paragraph\n")
    with gzip.open(src / "sub" / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "from gzip"}) + "\n")
    (src / "ignored.bin").write_bytes(b"\x00\x01")

    def decoded(prefix, **kw):
        result = prepare_data([src], tmp_path / prefix, tokenizer=f"{tok}.model", jsonl_key="body", quiet=True, **kw)
        ds = indexed.IndexedDataset(str(result.data_prefix))
        return [sp.decode(ds[i].tolist()[:-1]) for i in range(len(ds))]

    assert decoded("lines", text_documents="line") == ["first line", "second line", "third paragraph", "from gzip"]
    assert decoded("paras", text_documents="paragraph") == ["first line\nsecond line\n", "third paragraph\n",
                                                            "from gzip"]
    assert decoded("files") == ["first line\nsecond line\n\nthird paragraph\n", "from gzip"]
    assert decoded("two", text_documents="line", max_documents=2) == ["first line", "second line"]


def test_worker_processes_write_the_same_dataset_in_input_order(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "CHUNK_BYTES", 200)  # many small tasks, so order matters
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}: " + DOCS[i % 3][: 50 + i]}) + "\n"
                              for i in range(120)))
    one = prepare_data([corpus], tmp_path / "one", vocab_size=320, workers=1, quiet=True)
    many = prepare_data([corpus], tmp_path / "many", tokenizer=one.tokenizer.spec.path, workers=2, quiet=True)
    assert (tmp_path / "one_text_document.bin").read_bytes() == (tmp_path / "many_text_document.bin").read_bytes()
    assert (tmp_path / "one_text_document.idx").read_bytes() == (tmp_path / "many_text_document.idx").read_bytes()
    assert many.documents == 120


def test_progress_line_shows_documents_tokens_and_throughput():
    import io

    stream = io.StringIO()
    progress = Progress("tokenize", total_bytes=2_000_000, stream=stream, every=0)
    progress.update(3, 1200, 1_000_000)
    progress.close()
    last = stream.getvalue().split("\r")[-1]
    assert last.startswith("tokenize: 3 documents | 1,200 tokens | ") and "tokens/s | 1.0/2.0 MB | 0 s\n" in last


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": broken}\n', "bad.jsonl:2: not valid JSON"),
    ('{"body": "no text field"}\n', "bad.jsonl:1: no 'text' field; choose the text field with --jsonl-key"),
    ('\n\n', "no non-empty document"),
])
def test_prepare_data_bad_input_names_the_problem_and_writes_nothing(tmp_path, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    proc = _cli(str(bad), "--output-prefix", str(tmp_path / "out" / "x"), "--vocab-size", "300")
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_prepare_data_missing_inputs(tmp_path):
    proc = _cli(str(tmp_path / "nope.txt"), "--output-prefix", str(tmp_path / "x"))
    assert proc.returncode != 0 and "nope.txt does not exist" in proc.stderr
    proc = _cli("--output-prefix", str(tmp_path / "x"))
    assert proc.returncode != 0 and "no input files" in proc.stderr


def _hf_tokenizer(directory, eos="<|endoftext|>", config=True):
    """A byte-level BPE tokenizer trained here with the ``tokenizers`` library and saved
    as a Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[eos, "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(DOCS * 5, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    if config:
        (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos, "pad_token": "<pad>"}))
    return tok


def test_hugging_face_tokenizer_directory_jsonl_key_and_workers(tmp_path):
    hf = _hf_tokenizer(tmp_path / "hf")
    texts = [f"record {i}: {DOCS[i % 3][:40 + i]} ünïcödé 日本語" for i in range(40)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"body": t, "text": 0}) + "\n" for t in texts))
    proc = _cli(str(corpus), "--jsonl-key", "body", "--tokenizer", str(tmp_path / "hf"), "--workers", "2",
                "--output-prefix", str(tmp_path / "out" / "hf"))
    assert proc.returncode == 0, proc.stderr
    assert "tokenize (2 processes): 40 documents |" in proc.stderr and "tokens/s" in proc.stderr
    eod = hf.token_to_id("<|endoftext|>")
    assert f"(huggingface, {hf.get_vocab_size()} tokens, end of document {eod})" in proc.stdout
    assert not (tmp_path / "out" / "hf.model").exists()  # nothing trained
    ds = indexed.IndexedDataset(str(tmp_path / "out" / "hf_text_document"))
    assert len(ds) == 40 and ds.index.dtype == np.uint16
    for i, text in enumerate(texts):
        ids = ds[i].tolist()
        assert ids[-1] == eod and ids[:-1] == hf.encode(text, add_special_tokens=False).ids
        assert hf.decode(ids[:-1]) == text

    # the tokenizer.json file itself; without tokenizer_config.json the usual end-of-text name is found
    (tmp_path / "hf" / "tokenizer_config.json").unlink()
    loaded = load_tokenizer(tmp_path / "hf" / "tokenizer.json")
    assert (loaded.spec.kind, loaded.eod, loaded.vocab_size) == ("huggingface", eod, hf.get_vocab_size())


def test_hugging_face_tokenizer_refusals_name_the_file_and_the_fix(tmp_path):
    _hf_tokenizer(tmp_path / "odd", eos="<stop>", config=False)
    text = tmp_path / "a.txt"
    text.write_text(DOCS[0])
    proc = _cli(str(text), "--tokenizer", str(tmp_path / "odd"), "--output-prefix", str(tmp_path / "x"))
    assert proc.returncode != 0 and "has no end-of-document token" in proc.stderr and "--eod-token" in proc.stderr
    assert not any(p.name.startswith("x") for p in tmp_path.iterdir())
    proc = _cli(str(text), "--tokenizer", str(tmp_path / "odd"), "--eod-token", "<eos>", "--output-prefix",
                str(tmp_path / "x"))
    assert proc.returncode != 0 and "has no token '<eos>' (its special tokens: <stop>, <pad>)" in proc.stderr
    proc = _cli(str(text), "--tokenizer", str(tmp_path / "odd"), "--eod-token", "<stop>", "--output-prefix",
                str(tmp_path / "x"))
    assert proc.returncode == 0, proc.stderr

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty holds no tokenizer.json; pass a Hugging Face tokenizer directory"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "broken.json").write_text('{"model": 1}')
    with pytest.raises(DataError, match="broken.json is not a Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path / "broken.json")
    with pytest.raises(DataError, match=r"need at least \d+ tokens \(256 byte pieces"):
        prepare_data([text], tmp_path / "small", vocab_size=260, quiet=True)


def test_dataset_stack_imports_without_megatron_core_init_and_megatron_imports_whole_afterwards(tmp_path):
    """deferred_import.dataset_modules() loads megatron-core's dataset modules without the package __init__
    (its model-parallel stack, Transformer Engine extension and inductor: most of a torch/DeepSpeed/FSDP2
    rank's start-up) and leaves nothing of it behind: megatron code imported afterwards in the same process
    imports the whole package, in its own order (the recipe's data tests compare the samples themselves)."""
    probe = """
import sys
import numpy as np
from excitation_dist.megatron.deferred_import import dataset_modules
from excitation_dist.data.indexed import IndexedDatasetWriter
modules = dataset_modules()
with IndexedDatasetWriter(sys.argv[1], np.uint16) as w:
    w.add_document(np.arange(7))
ds = modules["megatron.core.datasets.indexed_dataset"].IndexedDataset(sys.argv[1])
assert ds[0].tolist() == list(range(7))
heavy = [m for m in ("megatron.core.tensor_parallel", "megatron.core.transformer", "torch._inductor.compile_fx")
         if m in sys.modules]
print("BEFORE", heavy, [m for m in sys.modules if m.startswith("megatron.core")])
# building GPT datasets of a weighted blend (index files built here: megatron imports its C++ helpers inside
# the functions that build them) loads nothing more of megatron-core either
from excitation_dist.data.blends import Blend
from excitation_dist.data.datasets import build_gpt_datasets
from excitation_dist.data.tokenizers import ByteTokenizer
for name in "ab":
    with IndexedDatasetWriter(sys.argv[1] + name, np.uint16) as w:
        for i in range(40):
            w.add_document(np.arange(5 + i % 7))
train, valid, test = build_gpt_datasets(Blend([sys.argv[1] + "a", sys.argv[1] + "b"], [0.3, 0.7]), split="90,10,0",
                                        seq_length=4, seed=1, num_samples=[20, 4, 0], cache_dir=sys.argv[1] + "c",
                                        tokenizer=ByteTokenizer())
assert len(train) >= 20 and len(valid) >= 4 and test is None and len(train[0]["tokens"]) == 4
heavy = [m for m in ("megatron.core.tensor_parallel", "megatron.core.transformer", "torch._inductor.compile_fx",
                     "wandb") if m in sys.modules]
print("BUILT", heavy, [m for m in sys.modules if m.startswith("megatron.core")])
from megatron.core.tensor_parallel import random   # a submodule first: the circular-import order megatron's
from megatron.core import ModelParallelConfig, mpu, parallel_state   # own __init__ avoids
import megatron.core
assert mpu is parallel_state and megatron.core.tensor_parallel.layers.ColumnParallelLinear and megatron.core.__version__
assert dataset_modules()["megatron.core.datasets.gpt_dataset"] is sys.modules["megatron.core.datasets.gpt_dataset"]
print("COMPLETE")
"""
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "d")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "BEFORE [] []" in done.stdout and "BUILT [] []" in done.stdout and "COMPLETE" in done.stdout, done.stdout
