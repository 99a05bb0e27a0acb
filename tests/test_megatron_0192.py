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
from tests.batch_support import result, run_batch, runs
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


# The backend checks of one world size share one process group (tests/batch_support.py): the ranks import
# megatron-core once. Megatron-LM's pretrain (global arguments, one run per process) keeps its own groups.
@pytest.fixture(scope="module")
def world2(request, megatron_0192):
    jobs = []
    if runs(request, "test_single_grouped_weight_map_matches_megatron_checkpoint_slices"):
        jobs.append(("grouped", _single_grouped_weight_checkpoint_slices, (megatron_0192,)))
    if runs(request, "test_backend_on_megatron_0192"):
        jobs.append(("cases", run_cases, (WORLD2, megatron_0192)))  # resets megatron's parallel state first
    return run_batch(2, jobs, env=ENV, timeout=400 * len(jobs))


@pytest.fixture(scope="module")
def world4(request, megatron_0192):
    jobs = []
    if runs(request, "test_backend_on_megatron_0192_four_ranks"):
        jobs.append(("cases", run_cases, (WORLD4, megatron_0192)))
    if runs(request, "test_backend_on_megatron_0192_pipeline_stage_with_dense_layers_only"):
        jobs.append(("dense_first", run_dense_first_stage, (DENSE_FIRST, megatron_0192)))
    return run_batch(4, jobs, env=ENV, timeout=500 * len(jobs))


def test_backend_on_megatron_0192(world2):
    results = result(world2, "cases")
    for rank_results in results:
        assert [r["case"] for r in rank_results] == [c.name for c in WORLD2]
        assert rank_results[0]["megatron_core"] == "0.19.2"


def test_backend_on_megatron_0192_four_ranks(world4):
    results = result(world4, "cases")
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


def test_backend_on_megatron_0192_pipeline_stage_with_dense_layers_only(world4):
    """As tests/test_megatron_backend.py's dense-first-stage case, on 0.19.2: stage 0 (one dense
    layer) gets no controller and no collective, stage 1 counts and scales as usual."""
    results = result(world4, "dense_first")
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


def _single_grouped_weight_checkpoint_slices(megatron_path: str) -> list[dict]:
    """Worker (EP 2 on 2 gloo ranks): a TEGroupedMLP whose linear_fc1 / linear_fc2 hold one stacked
    ``weight`` ``[2, 6, 4]`` / ``[2, 4, 3]`` and ``bias`` ``[2, out]`` (moe_single_grouped_weight /
    _bias), saved through megatron-core 0.19.2's own TEGroupedLinear checkpoint methods. Per range of
    ``compat.local_expert_ranges``: its expert and elements, and what megatron saves for that local
    expert (``{name}{i}``): the global expert (the ShardedTensor's offset on the expert axis), the
    slice, whether the slice is a view of exactly the range's elements, and its replica id."""
    import ast
    import copy
    from pathlib import Path

    sys.path.insert(0, megatron_path)
    from excitation_dist.megatron import compat, cpu_patches

    compat.backfill_typing_override()
    cpu_patches.apply()  # before megatron.core's first import
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.extensions import transformer_engine as te_ext
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.experts import TEGroupedMLP
    from megatron.core.transformer.moe.moe_layer import BaseMoELayer
    from megatron.core.transformer.transformer_config import TransformerConfig

    # Transformer Engine is not installed (te_ext.TEGroupedLinear is None): compile megatron's own
    # TEGroupedLinear checkpoint methods and the column / row parallel sharded_state_dict, as written
    # in transformer_engine.py, onto a stand-in for TE's GroupedLinear
    source = ast.parse(Path(te_ext.__file__).read_text())
    classes = {n.name: n for n in ast.walk(source) if isinstance(n, ast.ClassDef)}

    def borrowed(name: str, methods: tuple[str, ...], base: str | None = None) -> ast.ClassDef:
        cls = copy.deepcopy(classes[name])
        cls.body = [f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name in methods]
        assert sorted(f.name for f in cls.body) == sorted(methods), (name, methods)
        if base is not None:
            cls.bases = [ast.Name(base, ast.Load())]
        return cls

    module = ast.Module(body=[
        borrowed("TEGroupedLinear", ("_sharded_state_dict_grouped", "_split_grouped_checkpoint_tensor",
                                     "_split_extra_state"), base="GroupedLinearStandIn"),
        borrowed("TEColumnParallelGroupedLinear", ("sharded_state_dict",)),  # subclasses of the one above
        borrowed("TERowParallelGroupedLinear", ("sharded_state_dict",)),
    ], type_ignores=[])

    class GroupedLinearStandIn(torch.nn.Module):
        """What TE's GroupedLinear (>= 2.14 with single_grouped_weight / single_grouped_bias, no FP8)
        and TEGroupedLinear.__init__ leave on the module: one weight [num_gemms, out, in], one bias
        [num_gemms, out], every element distinct."""

        def __init__(self, num_gemms: int, in_features: int, out_features: int, first_value: int, pgs):
            super().__init__()
            self.num_gemms, self.in_features, self.out_features = num_gemms, in_features, out_features
            self.use_bias = self.single_grouped_weight = self.single_grouped_bias = True
            self._pg_collection, self._tp_group = pgs, pgs.expt_tp
            self.fp8_meta, self.fp8, self.fp8_calibration = {"fp8_checkpoint": False}, False, False
            w, b = num_gemms * out_features * in_features, num_gemms * out_features
            values = torch.arange(first_value, first_value + w + b, dtype=torch.float32)
            self.weight = torch.nn.Parameter(values[:w].reshape(num_gemms, out_features, in_features).clone())
            self.bias = torch.nn.Parameter(values[w:].reshape(num_gemms, out_features).clone())

        def get_extra_state(self):
            return torch.empty(0, dtype=torch.uint8)  # TE's extra state without FP8

        def set_extra_state(self, state):
            pass

    namespace = {**vars(te_ext), "GroupedLinearStandIn": GroupedLinearStandIn}
    exec(compile(ast.fix_missing_locations(module), te_ext.__file__, "exec"), namespace)

    ps.initialize_model_parallel(expert_model_parallel_size=2)  # EP 2, expert-DP 1
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1, num_moe_experts=4,
                               moe_ffn_hidden_size=6, expert_model_parallel_size=2, add_bias_linear=True,
                               use_cpu_initialization=True)

    class MoELayerStandIn(BaseMoELayer):  # megatron's BaseMoELayer.__init__ sets local_expert_indices
        def forward(self, hidden_states):
            raise NotImplementedError

    layer = MoELayerStandIn(config, layer_number=1, pg_collection=pgs)
    experts = TEGroupedMLP.__new__(TEGroupedMLP)  # its __init__ needs TE: set what sharded_state_dict reads
    torch.nn.Module.__init__(experts)
    experts.config, experts.num_local_experts = config, layer.num_local_experts
    experts.ep_group, experts.tp_group = pgs.ep, pgs.expt_tp
    experts.linear_fc1 = namespace["TEColumnParallelGroupedLinear"](2, 4, 6, 0, pgs)  # weight [2, 6, 4]
    experts.linear_fc2 = namespace["TERowParallelGroupedLinear"](2, 3, 4, 1000, pgs)  # weight [2, 4, 3]
    layer.experts = experts

    saved = experts.sharded_state_dict(prefix="decoder.layers.0.mlp.")  # what dist_checkpointing.save writes
    out = []
    for p, ranges in compat.local_expert_ranges(layer):
        linear_name, name = next((ln, n) for ln in ("linear_fc1", "linear_fc2")
                                 for n, q in getattr(experts, ln).named_parameters(recurse=False) if q is p)
        flat = p.detach().reshape(-1)
        for i, r in enumerate(ranges):  # range i: local expert i, which megatron saves as {name}{i}
            sh = saved[f"decoder.layers.0.mlp.{linear_name}.{name}{i}"]
            assert isinstance(sh, ShardedTensor), type(sh)
            out.append({
                "tensor": f"{linear_name}.{name}{i}", "shape": tuple(p.shape), "key": sh.key,
                "expert": r.expert, "megatron_expert": sh.global_offset[0], "global_shape": tuple(sh.global_shape),
                "elements": flat[r.start:r.end].tolist(), "megatron_slice": sh.data.reshape(-1).tolist(),
                "same_memory": (sh.data.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
                                and sh.data.storage_offset() == p.storage_offset() + r.start
                                and sh.data.numel() == r.end - r.start),
                "replica_id": tuple(sh.replica_id),
            })
    return out


def test_single_grouped_weight_map_matches_megatron_checkpoint_slices(world2):
    """compat.local_expert_ranges on a TEGroupedMLP with one stacked ``weight`` / ``bias`` per linear
    layer (moe_single_grouped_weight / _bias, 0.19.x with TE >= 2.14) against megatron-core 0.19.2's
    own checkpoint sharding of it (TEGroupedLinear._sharded_state_dict_grouped): every range is the
    slice megatron saves for that local expert, under the global expert megatron assigns."""
    results = result(world2, "grouped")
    for ep_rank, rows in enumerate(results):
        tensors = [f"linear_fc{j}.{n}{i}" for j in (1, 2) for n in ("weight", "bias") for i in (0, 1)]
        assert [row["tensor"] for row in rows] == tensors  # 8 expert tensors: 2 local experts x 4 params
        for row in rows:
            name = row["tensor"].rstrip("01")
            assert row["key"] == f"decoder.layers.0.mlp.experts.{name}", row  # one key per param, all experts
            assert row["global_shape"] == (4, *row["shape"][1:]), row  # the 4 global experts stacked
            local = int(row["tensor"][-1])
            assert row["expert"] == row["megatron_expert"] == 2 * ep_rank + local, row
            assert row["elements"] == row["megatron_slice"], row
            assert row["same_memory"], row
            assert row["replica_id"] == (0, 0, 0), row  # expert-DP 1: this rank writes it
    assert [row["expert"] for row in results[1]] == [2, 3] * 4  # EP rank 1 of 2: global experts 2 and 3
