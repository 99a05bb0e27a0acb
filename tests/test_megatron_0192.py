"""megatron-core 0.19.2 (Megatron-LM's training loop) over gloo on CPU.

0.19.2 ships only a Python 3.12 wheel; ``make setup`` (target ``megatron-0.19.2``)
unpacks it into ``.megatron-0.19.2/``, and these tests' workers put that folder
first on ``sys.path`` (with a ``typing.override`` backfill for Python 3.11). If
the folder is missing, the tests download it themselves and skip only if that
is impossible.

- the backend checks of tests/test_megatron_backend.py (counts vs. the experts'
  inputs, per-expert learning-rate reference, phi = 0 expert unchanged, one
  count collective, a skipped step) on three cases: EP 2 alltoall FP32Optimizer with
  accumulation and a skipped step; DistributedOptimizer fp32 shards splitting experts;
  TP 2 + sequence parallel, EP 2, allgather, bf16 Float16Optimizer; and on 4 ranks
  the 4-rank matrix of tests/test_megatron_backend.py (TP 2 + SP, EP 2 x expert-DP 2,
  DistributedOptimizer bf16; EP 4 allgather with accumulation; PP 2 with virtual
  stages and full recompute);
- a pipeline stage with dense layers only (PP 2 x DP 2 x EP 2, 4 ranks): no controller there;
- ``python -m excitation_dist.recipe.pretrain_gpt`` (Megatron-LM's ``pretrain``,
  GPT-MoE, EP 2, mock data) for 3 iterations with ``--excitation-strategy``: the
  controller stepped 3 times, counted every (token, expert) assignment of the
  global batch, and its metrics reached Megatron's TensorBoard writer.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from excitation_dist.testing import run_distributed
from tests.megatron_support import DENSE_FIRST, ENV, STEPS, WORLD2, WORLD4, run_cases, run_dense_first_stage

ROOT = Path(__file__).resolve().parents[1]
MEGATRON_0192 = ROOT / ".megatron-0.19.2"


@pytest.fixture(scope="module")
def megatron_0192() -> str:
    if not (MEGATRON_0192 / "megatron" / "training").is_dir():
        wheels = MEGATRON_0192 / ".wheel"
        download = [sys.executable, "-m", "pip", "download", "-q", "megatron-core==0.19.2", "--python-version", "3.12",
                    "--only-binary=:all:", "--no-deps", "-d", str(wheels)]
        if subprocess.run(download, capture_output=True).returncode != 0:
            pytest.skip("megatron-core 0.19.2 is not unpacked in .megatron-0.19.2/ and cannot be downloaded "
                        "(run `make megatron-0.19.2` where PyPI is reachable)")
        with zipfile.ZipFile(next(wheels.glob("megatron_core-0.19.2-*.whl"))) as wheel:
            wheel.extractall(MEGATRON_0192)
    return str(MEGATRON_0192)


def test_backend_on_megatron_0192(megatron_0192):
    results = run_distributed(run_cases, 2, WORLD2, megatron_0192, env=ENV, timeout=400)
    for rank_results in results:
        assert [r["case"] for r in rank_results] == [c.name for c in WORLD2]
        assert rank_results[0]["megatron_core"] == "0.19.2"


def test_backend_on_megatron_0192_four_ranks(megatron_0192):
    results = run_distributed(run_cases, 4, WORLD4, megatron_0192, env=ENV, timeout=500)
    for rank_results in results:
        assert [r["case"] for r in rank_results] == [c.name for c in WORLD4]
        assert rank_results[0]["megatron_core"] == "0.19.2"


SEQ, GLOBAL_BATCH, TOPK, ITERS = 16, 8, 2, 3
PRETRAIN_ARGS = [
    "--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--ffn-hidden-size", "32",
    "--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ), "--micro-batch-size", "2",
    "--global-batch-size", str(GLOBAL_BATCH), "--train-iters", str(ITERS), "--lr", "1e-3",
    "--num-experts", "4", "--moe-router-topk", str(TOPK), "--moe-ffn-hidden-size", "12",
    "--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "64", "--num-workers", "0",
    "--distributed-backend", "gloo", "--transformer-impl", "local", "--use-cpu-initialization",
    "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-dropout-fusion",
    "--no-bias-swiglu-fusion", "--no-rope-fusion", "--no-persist-layer-norm", "--disable-bias-linear",
    "--position-embedding-type", "learned_absolute", "--eval-iters", "0", "--eval-interval", "1000",
    "--log-interval", "1",
    "--excitation-strategy", "positivesum", "--excitation-gamma", "1.0",
]


def _pretrain(megatron_path: str, argv: list[str]):
    sys.path.insert(0, megatron_path)
    from excitation_dist.recipe import pretrain_gpt

    pretrain_gpt.main(argv, cpu=True)
    excitation = pretrain_gpt.excitation()
    return excitation.step, excitation.last_counts_LE.tolist(), excitation.config.strategy


def test_pretrain_gpt_with_excitation(megatron_0192, tmp_path):
    argv = PRETRAIN_ARGS + ["--tensorboard-dir", str(tmp_path / "tb")]
    results = run_distributed(_pretrain, 2, megatron_0192, argv, env=ENV, timeout=400)
    for step, counts_LE, strategy in results:
        assert step == ITERS and strategy == "positivesum"
        assert [sum(layer) for layer in counts_LE] == [GLOBAL_BATCH * SEQ * TOPK] * 2  # every assignment, once
    assert results[0][1] == results[1][1]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    tags = events.Tags()["scalars"]
    assert any(t.startswith("excitation/") for t in tags), tags
    steps = [e.step for e in events.Scalars(next(t for t in tags if t.startswith("excitation/")))]
    assert steps == list(range(1, ITERS + 1))


def test_backend_on_megatron_0192_pipeline_stage_with_dense_layers_only(megatron_0192):
    """As tests/test_megatron_backend.py's dense-first-stage case, on 0.19.2: stage 0 (one dense
    layer) gets no controller and no collective, stage 1 counts and scales as usual."""
    results = run_distributed(run_dense_first_stage, 4, DENSE_FIRST, megatron_0192, env=ENV, timeout=400)
    assert [r["dense_stage"] for r in results] == [True, True, False, False]  # pipeline rank = global rank // 2
    assert [r["phi_step"] for r in results] == [None, None, STEPS, STEPS]


def _model_args(num_layers: int) -> list[str]:
    """A tiny GPT-MoE with Megatron-LM's defaults: linear biases, GeLU; no CPU flag (pretrain_gpt adds them)."""
    return [
        "--num-layers", str(num_layers), "--hidden-size", "16", "--num-attention-heads", "2", "--ffn-hidden-size", "32",
        "--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ), "--micro-batch-size", "2",
        "--global-batch-size", str(GLOBAL_BATCH), "--train-iters", str(ITERS), "--lr", "1e-3",
        "--num-experts", "4", "--moe-router-topk", str(TOPK), "--moe-ffn-hidden-size", "12",
        "--moe-token-dispatcher-type", "alltoall", "--mock-data", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", "64", "--position-embedding-type", "learned_absolute", "--eval-iters", "0",
        "--eval-interval", "1000", "--log-interval", "1",
        "--excitation-strategy", "zerosum",
    ]


def _pretrain_counts(megatron_path: str, argv: list[str]):
    """(controller steps, counts per MoE layer) of this rank, or None on a stage without MoE layers."""
    sys.path.insert(0, megatron_path)
    from excitation_dist.recipe import pretrain_gpt

    pretrain_gpt.main(argv, cpu=True)
    excitation = pretrain_gpt.excitation()
    return None if excitation is None else (excitation.step, [sum(layer) for layer in excitation.last_counts_LE.tolist()])


def test_pretrain_gpt_on_cpu_with_megatron_lm_defaults(megatron_0192):
    """Linear biases and GeLU (no --disable-bias-linear, no --swiglu): pretrain_gpt's CPU flags
    turn the bias-GeLU fusion off, which megatron-core's expert MLP refuses with per-token scales."""
    results = run_distributed(_pretrain_counts, 2, megatron_0192,
                              _model_args(2) + ["--expert-model-parallel-size", "2"], env=ENV, timeout=400)
    assert results == [(ITERS, [GLOBAL_BATCH * SEQ * TOPK] * 2)] * 2


def test_pretrain_gpt_on_cpu_swiglu_biases_pp2_dense_first_stage(megatron_0192):
    """SwiGLU with biases at EP 1 (megatron-core 0.19.2's in-place view error, patched:
    patches/megatron_cpu/expert_bias_inplace.py), and PP 2 split unevenly DeepSeek-V3 style:
    stage 0 holds one dense layer (no MoE layer: Excitation has nothing there, and no rank
    hangs), stage 1 two MoE layers."""
    argv = _model_args(3) + ["--swiglu", "--pipeline-model-parallel-size", "2",
                             "--decoder-first-pipeline-num-layers", "1", "--moe-layer-freq", "[0,1,1]"]
    results = run_distributed(_pretrain_counts, 2, megatron_0192, argv, env=ENV, timeout=400)
    assert results == [None, (ITERS, [GLOBAL_BATCH * SEQ * TOPK] * 2)]
