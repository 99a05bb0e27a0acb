"""prepare-data and the Megatron indexed dataset format."""

import json
import subprocess
import sys

import numpy as np
import pytest

from excitation_dist.data.indexed import IndexedDataset, IndexedDatasetWriter

DOCS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "Mixture-of-Experts layers route every token to a few experts.\nExcitation scales their updates. " * 15,
    "def f(x):\n    return x * 2  # code is text too\n" * 25,
]


def test_indexed_round_trip(tmp_path):
    docs = [np.arange(5), np.array([], dtype=np.int64), np.array([65000, 3, 7])]
    with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
        for d in docs:
            w.add_document(d)
    ds = IndexedDataset(tmp_path / "d")
    assert len(ds) == 3 and ds.num_tokens == 8 and ds.dtype == np.uint16
    for want, got in zip(docs, (ds[i] for i in range(3))):
        assert got.tolist() == want.tolist()
    assert ds.document_indices.tolist() == [0, 1, 2, 3]


def test_indexed_write_is_atomic(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
            w.add_document([1, 2, 3])
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="wider dtype"):
        with IndexedDatasetWriter(tmp_path / "e", np.uint16) as w:
            w.add_document([70000])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="prefix without .bin/.idx"):
        IndexedDataset(tmp_path / "e")


def test_megatron_reads_our_files(tmp_path):
    indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
        w.add_document([5, 6, 7])
        w.add_document([9, 10])
    ds = indexed.IndexedDataset(str(tmp_path / "d"))
    assert len(ds) == 2 and ds[0].tolist() == [5, 6, 7] and ds[1].tolist() == [9, 10]
    assert ds.document_indices.tolist() == [0, 1, 2]


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
    assert "tokenize:" in proc.stderr and "3 documents" in proc.stdout
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "c.model"))
    ds = IndexedDataset(tmp_path / "out" / "c_text_document")
    assert len(ds) == 3
    for i, doc in enumerate(DOCS):
        ids = ds[i].tolist()
        assert ids[-1] == sp.eos_id()
        assert sp.decode(ids[:-1]) == doc

    # an existing tokenizer is reused, not retrained
    proc = _cli(str(extra), "--output-prefix", str(tmp_path / "again"), "--tokenizer-model", str(tmp_path / "out" / "c.model"))
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "again.model").exists()
    assert IndexedDataset(tmp_path / "again_text_document")[0].tolist() == ds[2].tolist()


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
