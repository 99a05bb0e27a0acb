"""The recipe's samples (every backend reads them through ``TokenSource``) come from
megatron-core's own dataset stack, on a corpus prepared by this project and on one
written by megatron-core's builder (as Megatron-LM's preprocess_data writes it):
document-aware windows, weighted blends, cached index files, and a sample order that
is a pure function of the step, so that a resumed run reads exactly the samples the
uninterrupted run would have read."""

import json

import numpy as np
import pytest
import torch

from excitation_dist.data.prepare import prepare_data
from excitation_dist.data.tokenizers import load_tokenizer
from excitation_dist.recipe.config import load_run_config
from excitation_dist.recipe.data import TokenSource

indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")

CONFIG = "configs/tiny_cpu_torch.yaml"  # 2 data-parallel ranks, micro-batch 8, global batch 16
SEQ = 16
FILLER = 7  # every token of the megatron-written corpus


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """(project corpus prefix, megatron-written corpus prefix, tokenizer directory)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("corpora")
    texts = [f"document {i} says " + " ".join(f"w{(i * 7 + j) % 97}" for j in range(5 + i % 23)) for i in range(300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    (root / "hf").mkdir()
    tok.save(str(root / "hf" / "tokenizer.json"))
    (root / "hf" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    (root / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ours = prepare_data([root / "c.jsonl"], root / "ours", tokenizer=root / "hf", quiet=True).data_prefix

    builder = indexed.IndexedDatasetBuilder(str(root / "megatron.bin"), dtype=np.int32)
    for i in range(200):
        builder.add_document(torch.full((10 + i % 13,), FILLER, dtype=torch.int32), [10 + i % 13])
    builder.finalize(str(root / "megatron.idx"))
    return str(ours), str(root / "megatron"), root / "hf"


def _source(corpora, tmp_path, path, *extra):
    cfg = load_run_config(CONFIG, [f"data.path={path}", f"data.tokenizer={corpora[2]}", "model.vocab_size=512",
                                   f"model.seq_length={SEQ}", "schedule.train_steps=60", "schedule.eval_steps=2",
                                   f"data.cache_dir={tmp_path / 'cache'}", *extra])
    return TokenSource.from_config(cfg)


def _documents(prefix):
    ds = indexed.IndexedDataset(prefix)
    return ds, [ds[i].tolist() for i in range(len(ds))]


def _is_window_of_documents(sample, documents, eod):
    """A sample read across document boundaries: a suffix of one document, whole
    documents, then a prefix of one, each piece ending at the end-of-document id."""
    pieces, start = [], 0
    for i, token in enumerate(sample):
        if token == eod:
            pieces.append(sample[start:i + 1])
            start = i + 1
    pieces.append(sample[start:])
    if len(pieces) == 1:  # inside one document
        text = ",".join(map(str, sample))
        return any(f",{text}," in f",{','.join(map(str, d))}," for d in documents)
    whole = {tuple(d) for d in documents}
    first, *middle, last = pieces
    return (all(tuple(p) in whole for p in middle)
            and any(tuple(d[len(d) - len(first):]) == tuple(first) for d in documents)
            and (not last or any(tuple(d[:len(last)]) == tuple(last) for d in documents)))


def test_project_corpus_samples_are_document_aware_windows(corpora, tmp_path):
    source = _source(corpora, tmp_path, corpora[0])
    _keep, docs = _documents(corpora[0])
    eod = load_tokenizer(corpora[2]).eod
    batch = source.train_batch(step=3, micro=0, rank=1)
    assert batch.shape == (8, SEQ + 1) and batch.dtype == torch.int64
    samples = [source.train.sample(i).tolist() for i in range(0, 60 * 16, 37)]
    assert all(_is_window_of_documents(s, docs, eod) for s in samples)
    # epochs: 60 steps x 16 samples of 17 tokens are more than the training split holds once
    assert len(source.train) >= 60 * 16 > sum(map(len, docs)) // SEQ
    # megatron-core cached its index files in data.cache_dir
    assert list((tmp_path / "cache" / "indices").glob("*-GPTDataset-train-shuffle_index.npy"))
    assert source.validation_batch(0, 0).shape == (8, SEQ + 1)
    # the reader found the maps behind the samples (.bin, .idx, document/sample/shuffle index) and
    # drops their pages from the process now and then; the tokens read are the same afterwards
    assert len(source.train._maps) >= 5
    source.train.release_pages()
    assert torch.equal(source.train_batch(step=3, micro=0, rank=1), batch)


def test_a_test_share_gives_held_out_samples_from_the_last_documents_only(corpora, tmp_path):
    """data.split's test share (Megatron's --split): test samples are windows of the last documents, none of
    which the training or validation split reads; without a share there is no test split, and asking for its
    batches names data.split."""
    from excitation_dist.config import ConfigError
    from excitation_dist.data.blends import split_ranges

    source = _source(corpora, tmp_path, corpora[0], "data.split=80,10,10")
    _keep, docs = _documents(corpora[0])
    eod = load_tokenizer(corpora[2]).eod
    (t0, t1), (v0, v1), (s0, s1) = split_ranges("80,10,10", len(docs))
    assert 0 < t1 == v0 < v1 == s0 < s1 == len(docs)
    test = source.test_batch(1, 0)
    assert test.shape == (8, SEQ + 1)
    assert all(_is_window_of_documents(s, docs[s0:s1], eod) for s in test.tolist())
    # megatron-core's own record of the documents behind each split (one prefix: no blend around it)
    assert sorted(source.test.dataset.indices) == list(range(s0, s1))
    assert sorted(source.validation.dataset.indices) == list(range(v0, v1))
    assert sorted(source.train.dataset.indices) == list(range(t0, t1))
    validation = source.validation_batch(1, 0).tolist()
    assert all(_is_window_of_documents(s, docs[v0:v1], eod) for s in validation)
    assert not torch.equal(test, source.validation_batch(1, 0))

    without = _source(corpora, tmp_path, corpora[0])  # the config's 98,2,0
    assert without.test is None
    with pytest.raises(ConfigError, match="data.split: the test split is empty; give it a share"):
        without.test_batch(0, 0)


def test_megatron_written_corpus_and_a_weighted_blend(corpora, tmp_path):
    alone = _source(corpora, tmp_path, corpora[1])
    assert bool((alone.train_batch(1, 0, 0) == FILLER).all())  # int32 tokens, as preprocess_data writes them

    blend = _source(corpora, tmp_path, f"1 {corpora[0]} 3 {corpora[1]}")
    samples = blend.train.samples(range(640))
    share = float((samples == FILLER).all(dim=1).float().mean())
    assert abs(share - 0.75) < 0.03, share  # megatron's BlendedDataset draws by weight
    listed = _source(corpora, tmp_path, json.dumps([1, corpora[0], 3, corpora[1]]))  # the YAML-list spelling
    assert torch.equal(listed.train.samples(range(64)), samples[:64])


def test_resumed_run_reads_exactly_the_samples_it_stopped_at(corpora, tmp_path):
    """Step s, micro-batch m, rank r reads global samples [(s-1)G + (mD + r)B, ... + B): the
    ranks of one step share no sample, the steps walk the shuffled dataset in order, and a
    second process (here: a second build, from the cached index files) reads the same tokens."""
    first = _source(corpora, tmp_path, corpora[0])
    seen = []
    for step in (1, 2, 3):
        for micro in range(first.global_batch_size // (first.micro_batch_size * first.data_parallel)):
            for rank in range(first.data_parallel):
                seen += list(first.train_indices(step, micro, rank))
    assert seen == list(range(3 * 16))  # G = 16, every sample once, in order

    resumed = _source(corpora, tmp_path, corpora[0])
    for step in (1, 21, 60):  # the first, a middle and the last step
        for rank in (0, 1):
            assert torch.equal(first.train_batch(step, 0, rank), resumed.train_batch(step, 0, rank))
    assert not torch.equal(first.train_batch(21, 0, 0), first.train_batch(22, 0, 0))
    assert torch.equal(first.validation_batch(1, 1), resumed.validation_batch(1, 1))

    reseeded = _source(corpora, tmp_path, corpora[0], "seed=5")
    assert not torch.equal(first.train_batch(1, 0, 0), reseeded.train_batch(1, 0, 0))


def _cfg(corpora, tmp_path, path, *extra):
    return load_run_config(CONFIG, [f"data.path={path}", f"data.tokenizer={corpora[2]}", "model.vocab_size=512",
                                    f"model.seq_length={SEQ}", "schedule.train_steps=60", "schedule.eval_steps=2",
                                    f"data.cache_dir={tmp_path / 'cache'}", *extra])


def _megatron_epochs(dataset) -> int:
    return dataset._get_num_epochs(dataset._get_num_tokens_per_epoch())


def test_resume_with_a_larger_global_batch_reads_on_from_the_consumed_samples(corpora, tmp_path):
    """10 steps of 16 samples, resumed with global batch 32 for 30 more steps: the resumed reader's samples
    (indices and token ids) are exactly those the uninterrupted reader had not read yet, in its order, even
    though the resumed run builds its dataset for more samples (the same epochs: the same order)."""
    from excitation_dist.recipe.data import resume_order_check, train_position

    cfg16 = _cfg(corpora, tmp_path, corpora[0])  # 60 x 16 = 960 samples: 2 epochs of 671
    first = TokenSource.from_config(cfg16)
    read = [i for step in range(1, 11) for m in range(1) for r in range(2) for i in first.train_indices(step, m, r)]
    assert sorted(read) == list(range(160))
    saved = {"step": 10, "data": first.record(cfg16, 10)}
    assert saved["data"]["consumed_samples"] == 160 and saved["data"]["num_samples"] == 960

    cfg32 = _cfg(corpora, tmp_path, corpora[0], "schedule.global_batch_size=32", "schedule.train_steps=40")
    position, notes = train_position(cfg32, saved)
    assert (position.step, position.consumed, position.num_samples) == (10, 160, 160 + 30 * 32) and not notes
    assert resume_order_check(cfg32, saved, tmp_path / "COMPLETE") == ([], [])
    resumed = TokenSource.from_config(cfg32, position)
    assert resumed.plan[0]["epochs"] == first.plan[0]["epochs"] == 2
    indices = [list(resumed.train_indices(step, m, r)) for step in range(11, 41) for m in range(2) for r in range(2)]
    assert sorted(i for batch in indices for i in batch) == list(range(160, 1120))  # none skipped, none twice
    for step in (11, 12):  # token ids: the uninterrupted reader's next samples
        for m in range(2):
            for r in range(2):
                start = 160 + (step - 11) * 32 + (m * 2 + r) * 8
                assert torch.equal(resumed.train_batch(step, m, r), first.train.samples(range(start, start + 8)))
    with pytest.raises(ValueError, match="before the checkpoint"):
        resumed.train_indices(10, 0, 0)


def test_epoch_plan_is_megatrons_and_a_reshuffle_is_refused(corpora, tmp_path):
    """epoch_plan mirrors megatron-core's GPTDataset (epochs, samples per blended prefix), and a resume whose
    dataset megatron would shuffle differently (here the final epoch no longer shuffled apart) is refused."""
    from excitation_dist.recipe.data import resume_order_check, train_position

    cfg16 = _cfg(corpora, tmp_path, corpora[0])
    first = TokenSource.from_config(cfg16)
    assert first.plan[0]["separate_final_epoch"] and first.plan[0]["epochs"] == _megatron_epochs(first.train.dataset)
    saved = {"step": 10, "data": first.record(cfg16, 10)}
    longer = _cfg(corpora, tmp_path, corpora[0], "schedule.train_steps=78")  # 1248 samples: 2 epochs, not apart
    position, _ = train_position(longer, saved)
    problems, _ = resume_order_check(longer, saved, tmp_path / "COMPLETE")
    assert len(problems) == 1 and "schedule.train_steps 60 -> 78" in problems[0], problems
    assert "2 -> 2 epoch(s)" in problems[0] and "set schedule.train_steps<=60" in problems[0], problems[0]
    other = TokenSource.from_config(longer, position)
    assert not torch.equal(other.train.samples(range(160, 200)), first.train.samples(range(160, 200)))

    blend_cfg = _cfg(corpora, tmp_path, f"1 {corpora[0]} 3 {corpora[1]}")
    blend = TokenSource.from_config(blend_cfg)
    for dataset, planned in zip(blend.train.dataset.datasets, blend.plan):
        assert (dataset.num_samples, _megatron_epochs(dataset)) == (planned["samples"], planned["epochs"])
