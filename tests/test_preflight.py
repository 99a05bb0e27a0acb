"""``excitation-dist train --dry-run`` (and the launcher) check what one process can
check before any rank starts: every bad input is one line naming the key, the
problem and the fix, with a non-zero exit code and no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from excitation_dist.cli import main
from excitation_dist.data.indexed import IndexedDatasetWriter
from excitation_dist.recipe.preflight import padded_vocab_size
from excitation_dist.recipe.run_lock import CheckpointLocked, RunLock, locked_by

ROOT = Path(__file__).resolve().parents[1]
TORCH_CONFIG = str(ROOT / "configs" / "tiny_cpu_torch.yaml")
VOCAB = 500


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A real prepare-data output (sentencepiece model of 500 tokens + indexed dataset)."""
    out = tmp_path_factory.mktemp("data")
    proc = subprocess.run([sys.executable, "-m", "excitation_dist.cli", "prepare-data", "--embedded-corpus",
                           "--max-documents", "60", "--vocab-size", str(VOCAB), "--output-prefix", str(out / "c")],
                          capture_output=True, text=True, timeout=300, cwd=out)
    assert proc.returncode == 0, proc.stderr
    hint = next(line for line in proc.stdout.splitlines() if line.startswith("train with: "))
    (out / "hint").write_text(hint[len("train with: "):])
    return out


def _dry_run(*overrides: str, config: str = TORCH_CONFIG) -> tuple[int, str]:
    """In-process ``train --dry-run``: (exit code, stdout or the error message)."""
    try:
        code = main(["train", config, "--dry-run", *overrides])
    except SystemExit as exc:
        return (exc.code if isinstance(exc.code, int) else 1), str(exc.code)
    return code, "ok"


def _data(prepared: Path, **paths: str) -> list[str]:
    values = {"path": str(prepared / "c_text_document"), "tokenizer": str(prepared / "c.model"), **paths}
    return [f"data.{k}={v}" for k, v in values.items()]


def test_vocab_padding_is_megatrons():
    assert [padded_vocab_size(v) for v in (1, 128, 129, 32000, 50257)] == [128, 128, 256, 32000, 50304]
    assert padded_vocab_size(32001, tensor_parallel=2) == 32256


def test_good_prepared_data_passes_and_auto_pads_the_vocabulary(prepared, capsys):
    code, _ = _dry_run(*_data(prepared), "model.vocab_size=auto")
    assert code == 0
    assert "model.vocab_size 512" in capsys.readouterr().out  # 500 padded to a multiple of 128


@pytest.mark.parametrize("bad, message", [
    ({"path": "missing/corpus_text_document"}, "data.path: missing/corpus_text_document.idx does not exist; give the prefix"),
    ({"path": "DATA/c_text_document.bin"}, "ends with .bin; give the prefix prepare-data printed"),
    ({"tokenizer": "missing.model"}, "data.tokenizer: missing.model does not exist; pass the .model file"),
    ({"tokenizer": "DATA/junk.model"}, "is not a sentencepiece model (INTERNAL: could not parse ModelProto"),
])
def test_bad_data_or_tokenizer_is_named(prepared, bad, message):
    (prepared / "junk.model").write_text("not a model")
    paths = {k: v.replace("DATA", str(prepared)) for k, v in bad.items()}
    code, err = _dry_run(*_data(prepared, **paths), "model.vocab_size=auto")
    assert code != 0 and message.replace("DATA", str(prepared)) in err, err


def test_vocabulary_larger_than_the_model_is_refused_with_the_fix(prepared):
    code, err = _dry_run(*_data(prepared), "model.vocab_size=256")
    assert code != 0
    assert ("model.vocab_size: 256 is smaller than the tokenizer's vocabulary of 500 tokens; set "
            "model.vocab_size=auto (pads it to 512) or at least 500") in err


def test_truncated_or_foreign_dataset_is_refused(prepared, tmp_path):
    for suffix in (".bin", ".idx"):
        (tmp_path / f"t_text_document{suffix}").write_bytes((prepared / f"c_text_document{suffix}").read_bytes())
    with open(tmp_path / "t_text_document.bin", "r+b") as f:
        f.truncate(1000)
    code, err = _dry_run(*_data(prepared, path=str(tmp_path / "t_text_document")), "model.vocab_size=auto")
    assert code != 0 and "t_text_document.bin has 1000 bytes but its .idx describes" in err, err

    with IndexedDatasetWriter(tmp_path / "foreign", np.uint16) as writer:  # ids of a bigger vocabulary
        writer.add_document(np.arange(5000) % 1000)
    code, err = _dry_run(*_data(prepared, path=str(tmp_path / "foreign")), "model.vocab_size=auto")
    assert code != 0 and "holds token id 999 but data.tokenizer has 500 tokens" in err, err

    with IndexedDatasetWriter(tmp_path / "short", np.uint16) as writer:
        writer.add_document([1, 2, 3])
    code, err = _dry_run(*_data(prepared, path=str(tmp_path / "short")), "model.vocab_size=auto")
    assert code != 0 and "holds 3 tokens; its training and validation splits" in err, err

    with IndexedDatasetWriter(tmp_path / "ten", np.uint16) as writer:  # a test share that rounds to no document
        for _ in range(10):
            writer.add_document(np.arange(50) % 100)
    code, err = _dry_run(*_data(prepared, path=str(tmp_path / "ten")), "model.vocab_size=auto", "data.split=80,20,1")
    assert code != 0 and ("its training, validation and test splits (data.split=80,20,1) each need at least one "
                          "non-empty document, and the test split gets none") in err, err


@pytest.mark.parametrize("damage, message", [
    ("no_idx", "data.path: TMP/d_text_document.idx does not exist; give the prefix prepare-data printed"),
    ("truncated_idx", "data.path: TMP/d_text_document.idx is truncated: its header describes"),
    ("foreign_idx", "data.path: TMP/d_text_document.idx is not a Megatron indexed-dataset index (it starts with "
                    "b'{\"text\": '"),
    ("legacy_idx", "data.path: TMP/d_text_document.idx is in the legacy (pre-mmap) indexed format"),
])
def test_missing_truncated_or_foreign_index_is_refused_with_the_fix(prepared, tmp_path, damage, message):
    for suffix in (".bin", ".idx"):
        (tmp_path / f"d_text_document{suffix}").write_bytes((prepared / f"c_text_document{suffix}").read_bytes())
    idx = tmp_path / "d_text_document.idx"
    if damage == "no_idx":
        idx.unlink()
    elif damage == "truncated_idx":
        idx.write_bytes(idx.read_bytes()[:-12])
    elif damage == "foreign_idx":
        idx.write_text('{"text": "a jsonl file, not an index"}\n')
    else:
        idx.write_bytes(b"TNTIDX\x00\x00" + bytes(64))
    code, err = _dry_run(*_data(prepared, path=str(tmp_path / "d_text_document")), "model.vocab_size=auto")
    assert code != 0 and message.replace("TMP", str(tmp_path)) in err, err
    assert "prepare-data" in err or "preprocess_data" in err  # the fix


@pytest.mark.parametrize("path, message", [
    ("0.3 DATA 0.7", "data.path: '0.3 DATA 0.7' mixes weights and prefixes but has 3 items; a weighted blend is "
                     "pairs 'W1 PREFIX1 W2 PREFIX2 ...'"),
    ("0.3 DATA half DATA", "data.path: weight 'half' (item 3) is not a number"),
    ("0 DATA 1 DATA", "data.path: weight '0' (item 1) must be a finite number > 0"),
    ("0.5 DATA 0.5 MISSING", "data.path: MISSING.idx does not exist; give the prefix"),
])
def test_blend_weights_that_do_not_parse_or_a_missing_prefix_are_named(prepared, tmp_path, path, message):
    prefix = str(prepared / "c_text_document")
    path = path.replace("DATA", prefix).replace("MISSING", str(tmp_path / "gone"))
    code, err = _dry_run(*_data(prepared, path=path), "model.vocab_size=auto")
    assert code != 0 and message.replace("DATA", prefix).replace("MISSING", str(tmp_path / "gone")) in err, err
    assert _dry_run(*_data(prepared, path=f"1 {prefix} 2.5 {prefix}"), "model.vocab_size=auto")[0] == 0


def test_hugging_face_tokenizer_larger_than_the_model_is_refused(prepared, tmp_path):
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(1000)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    (tmp_path / "hf").mkdir()
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    code, err = _dry_run(*_data(prepared, tokenizer=str(tmp_path / "hf")), "model.vocab_size=512")
    assert code != 0 and ("model.vocab_size: 512 is smaller than the tokenizer's vocabulary of 1000 tokens; set "
                          "model.vocab_size=auto (pads it to 1024) or at least 1000") in err, err
    code, err = _dry_run(*_data(prepared, tokenizer=str(tmp_path / "hf")), "model.vocab_size=auto")
    assert code == 0, err  # its ids hold the data's (a different tokenizer, but no id out of range)


def test_unwritable_or_locked_checkpoint_directory(tmp_path):
    (tmp_path / "file").write_text("")
    code, err = _dry_run(f"checkpoint.dir={tmp_path / 'file' / 'ckpt'}")
    assert code != 0 and "checkpoint.dir: " in err and "is not writable by this user" in err, err
    code, err = _dry_run(f"checkpoint.dir={tmp_path / 'file'}")
    assert code != 0 and "exists and is not a directory" in err, err

    with RunLock(tmp_path / "ckpt"):
        code, err = _dry_run(f"checkpoint.dir={tmp_path / 'ckpt'}")
        assert code != 0
        assert f"is in use by another run, pid {os.getpid()} on host {socket.gethostname()}" in err, err
        assert f"stop it (kill {os.getpid()} on {socket.gethostname()})" in err
        with pytest.raises(CheckpointLocked, match=f"pid {os.getpid()}"):
            RunLock(tmp_path / "ckpt").acquire()
    assert locked_by(tmp_path / "ckpt") is None  # released with the holder
    assert _dry_run(f"checkpoint.dir={tmp_path / 'ckpt'}")[0] == 0


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_config_on_a_machine_without_gpu_falls_back_and_says_so(capsys):
    """Issue 14: a GPU config started on a CPU machine names each setting that falls back, and runs."""
    code, _ = _dry_run("device=cuda")
    out = capsys.readouterr()
    assert code == 0, out
    assert "fast paths: 1 setting(s) fall back" in out.out + out.err
    assert "device: cuda requested, but no CUDA device is visible: CPU ranks over gloo" in out.out + out.err


def test_the_real_launch_fails_before_starting_processes_and_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "excitation_dist.cli", "train", TORCH_CONFIG,
                           "data.path=nowhere/x_text_document", "data.tokenizer=nowhere/x.model"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1 and "launching" not in proc.stdout
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr  # one line per problem: the tokenizer and the data prefix
    assert "data.tokenizer: nowhere/x.model does not exist" in lines[0]
    assert "data.path: nowhere/x_text_document.idx does not exist" in lines[1]


def test_prepare_data_hint_trains_as_printed(prepared):
    """The printed command, run as printed (plus a few steps' worth of overrides), trains."""
    command = (prepared / "hint").read_text().split()
    assert command[:2] == ["excitation-dist", "train"] and "model.vocab_size=auto" in command
    tiny = ["schedule.train_steps=2", "schedule.warmup_steps=1", "schedule.eval_interval=0", "logging.interval=1",
            f"logging.dir={prepared / 'log'}"]
    exe = Path(sys.executable).with_name("excitation-dist")
    proc = subprocess.run([str(exe), *command[1:], *tiny], capture_output=True, text=True, timeout=300, cwd=prepared,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "step      2/2 | loss" in proc.stdout


@pytest.mark.parametrize("override, message", [
    ("parallel.zero_stage=3", "parallel.zero_stage: 3 is not available in the recipe: Excitation with ZeRO-3 needs "
                              "DeepSpeed AutoEP"),
    ("parallel.timeout_minutes=0", "parallel.timeout_minutes: must be > 0"),
    ("model.vocab_size=big", "model.vocab_size: must be an integer or one of 'auto', got 'big'"),
])
def test_config_refusals_say_what_to_do(override, message):
    code, err = _dry_run(override, config=str(ROOT / "configs" / "tiny_cpu.yaml"))
    assert code != 0 and message in err, err


# ------------------------------------------------------------ resuming a checkpoint written by another run
def _checkpoint(root: Path, *overrides: str, config: str = TORCH_CONFIG, metadata: dict | None = None) -> Path:
    """A checkpoint directory whose step-10 COMPLETE record is what a run of ``config`` + ``overrides`` writes."""
    from excitation_dist.recipe.checkpoint import CheckpointManager, resume_metadata
    from excitation_dist.recipe.config import load_run_config

    manager = CheckpointManager(root)
    (manager.prepare(10) / "state.pt").write_bytes(b"weights")
    if metadata is None:
        metadata = resume_metadata(load_run_config(config, list(overrides)), excitation_state=True)
    return manager.publish(10, metadata) / "COMPLETE"


def _tree(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*"))
            if p.is_file()}


DS_CONFIG = str(ROOT / "configs" / "tiny_cpu.yaml")


@pytest.mark.parametrize("saved, config, overrides, message", [
    ((), TORCH_CONFIG, ["model.hidden_size=32"],
     "model: FILE holds another model shape: model.hidden_size 64 -> 32 (checkpoint -> this run); resume with the "
     "configuration that wrote it, or set checkpoint.dir to a new directory"),
    ((), TORCH_CONFIG, ["model.moe.num_experts=4", "model.num_layers=3"],
     "model.moe.num_experts 8 -> 4, model.num_layers 2 -> 3 (checkpoint -> this run)"),
    ((), TORCH_CONFIG, ["excitation.strategy=random"],
     "excitation.strategy: FILE was trained with Excitation strategy 'zerosum', this run asks for 'random' "
     "(excitation.strategy 'zerosum' -> 'random'); resume with excitation.strategy=zerosum, or set checkpoint.dir "
     "to a new directory"),
    ((), TORCH_CONFIG, ["excitation.strategy=none"], "(excitation.strategy 'zerosum' -> 'none')"),
    (("DS",), TORCH_CONFIG, [],
     "backend: FILE was written by backend 'deepspeed', this run is 'torch' (backend 'deepspeed' -> 'torch')"),
    (("DS",), DS_CONFIG, ["parallel.gpus_per_node=1", "parallel.expert_parallel=1"],
     "parallel: FILE was written on another layout: parallel.data_parallel 2 -> 1, parallel.expert_parallel 2 -> 1, "
     "parallel.world_size 2 -> 1 (checkpoint -> this run); DeepSpeed's ZeRO checkpoints hold the optimizer state per "
     "data-parallel rank"),
    (("DS",), DS_CONFIG, ["parallel.zero_stage=2", "precision=bf16"],
     "parallel.zero_stage 1 -> 2, precision 'fp32' -> 'bf16' (checkpoint -> this run)"),
    (("excitation.strategy=none",), TORCH_CONFIG, ["checkpoint.require_excitation_state=true"],
     "checkpoint.require_excitation_state: FILE was written with Excitation off (excitation.strategy 'none'), and "
     "this run requires Excitation's state to resume; resume from a checkpoint written with Excitation 'zerosum', "
     "or set checkpoint.require_excitation_state=false to start Excitation fresh"),
])
def test_checkpoint_of_another_run_is_refused_before_launch(tmp_path, saved, config, overrides, message):
    if config == DS_CONFIG:
        pytest.importorskip("deepspeed")
    ds = saved[:1] == ("DS",)
    record = _checkpoint(tmp_path / "ckpt", *saved[1:] if ds else saved, config=DS_CONFIG if ds else TORCH_CONFIG)
    before = _tree(tmp_path / "ckpt")
    code, err = _dry_run(f"checkpoint.dir={tmp_path / 'ckpt'}", *overrides, config=config)
    assert code != 0 and message.replace("FILE", str(record)) in err, err
    if "layout" in message:
        assert "python -m deepspeed.checkpoint.ds_to_universal" in err
    assert _tree(tmp_path / "ckpt") == before
    # the same configuration resumes; checkpoint.resume=false does not look at it
    assert _dry_run(f"checkpoint.dir={tmp_path / 'ckpt'}", *saved[1:], config=DS_CONFIG if ds else TORCH_CONFIG)[0] == 0
    assert _dry_run(f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.resume=false", *overrides, config=config)[0] == 0


def test_resume_notes_fresh_excitation_other_torch_world_size_and_old_checkpoints(tmp_path, capsys):
    record = _checkpoint(tmp_path / "off", "excitation.strategy=none")
    assert _dry_run(f"checkpoint.dir={tmp_path / 'off'}")[0] == 0
    out = capsys.readouterr().out
    assert (f"checkpoint {record.parent} was written with Excitation off (excitation.strategy 'none'): Excitation "
            "starts fresh (step 0, no EMA); set checkpoint.require_excitation_state=true to refuse this instead") in out

    record = _checkpoint(tmp_path / "two")
    assert _dry_run(f"checkpoint.dir={tmp_path / 'two'}", "parallel.gpus_per_node=1", "excitation.gamma=0.5")[0] == 0
    out = capsys.readouterr().out
    assert f"checkpoint {record.parent} was written by 2 ranks, this run has 1: fine for backend torch" in out
    assert f"checkpoint {record.parent}: excitation.gamma 1.0 -> 0.5 (checkpoint -> this run)" in out

    record = _checkpoint(tmp_path / "old", metadata={"world_size": 2})
    assert _dry_run(f"checkpoint.dir={tmp_path / 'old'}", "model.hidden_size=32")[0] == 0
    assert (f"checkpoint {record.parent} was written before checkpoints recorded their configuration: resuming "
            "without checking") in capsys.readouterr().out


def test_refused_resume_starts_no_process_and_writes_nothing(tmp_path):
    record = _checkpoint(tmp_path / "ckpt")
    before = _tree(tmp_path / "ckpt")
    proc = subprocess.run([sys.executable, "-m", "excitation_dist.cli", "train", TORCH_CONFIG,
                           f"checkpoint.dir={tmp_path / 'ckpt'}", "excitation.strategy=expdiff"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1 and "launching" not in proc.stdout and "Traceback" not in proc.stderr
    assert f"excitation.strategy: {record} was trained with Excitation strategy 'zerosum'" in proc.stderr
    assert _tree(tmp_path / "ckpt") == before and not (tmp_path / "ckpt" / ".lock").exists()


# ------------------------------------------------------------ resuming with another sample order
TINY = ["schedule.train_steps=2", "schedule.warmup_steps=1", "schedule.eval_interval=0", "checkpoint.interval=2",
        "model.hidden_size=32", "model.moe.ffn_hidden_size=32", "model.seq_length=32"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A directory whose ckpt/ holds the step-2 checkpoint of a real tiny torch run (global batch 16)."""
    root = tmp_path_factory.mktemp("trained")
    proc = subprocess.run([sys.executable, "-m", "excitation_dist.cli", "train", TORCH_CONFIG, *TINY,
                           f"checkpoint.dir={root / 'ckpt'}", f"logging.dir={root / 'log'}"],
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


@pytest.mark.parametrize("overrides, message", [
    (["seed=5"], "seed 1234 -> 5 (checkpoint -> this run)"),
    (["data.split=90,10,0"], "data.split '98,2,0' -> '90,10,0' (checkpoint -> this run)"),
    (["seed=7", "data.split=99,1,0"], "data.split '98,2,0' -> '99,1,0', seed 1234 -> 7 (checkpoint -> this run)"),
])
def test_resume_that_would_reshuffle_the_data_is_refused_and_writes_nothing(trained, overrides, message):
    """Another seed or data.split reorders the samples (megatron-core's shuffle): refused before launch,
    naming the key, old -> new and the fix; the checkpoint directory is left as it was."""
    record = trained / "ckpt" / "step_00000002" / "COMPLETE"
    run = [*TINY, f"checkpoint.dir={trained / 'ckpt'}", f"logging.dir={trained / 'log'}"]
    before = _tree(trained / "ckpt")
    code, err = _dry_run(*run, *overrides)
    assert code != 0, err
    assert f"data: {record} was written by a run that read its samples in another order: {message}" in err, err
    assert "resume with " in err and "or set checkpoint.dir to a new directory" in err
    fix = err.split("resume with ", 1)[1]
    assert ("seed=1234" in fix) == any(o.startswith("seed") for o in overrides), err
    assert _tree(trained / "ckpt") == before


def test_resume_with_another_batch_size_or_length_checks_the_epochs(trained, capsys):
    """A larger global batch or more steps reads on from the samples consumed; refused only where megatron-core
    would build the dataset over another number of epochs (its shuffle depends on it), naming the keys."""
    run = [*TINY, f"checkpoint.dir={trained / 'ckpt'}", f"logging.dir={trained / 'log'}"]
    before = _tree(trained / "ckpt")
    assert _dry_run(*run, "schedule.global_batch_size=32", "schedule.train_steps=50")[0] == 0
    code, err = _dry_run(*run, "schedule.train_steps=200000")  # ~3.2M samples of 33 tokens: many epochs
    assert code != 0, err
    assert "schedule.train_steps 2 -> 200000" in err and "epoch" in err, err
    assert "set checkpoint.dir to a new directory" in err
    assert _tree(trained / "ckpt") == before
