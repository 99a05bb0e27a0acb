"""Device-aware fast paths (recipe/fast_paths.py): the settings resolved for each GPU config as on a CUDA
machine with Transformer Engine and apex (the machine passed in as data), the CPU fallbacks, and a GPU
config started on this CPU machine: it says which settings fall back, and runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from excitation_dist.cli import train
from excitation_dist.recipe import fast_paths
from excitation_dist.recipe.config import load_run_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
GPU_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name not in ("models",)
                     and p.name not in ("gpu_base.yaml",) and not p.name.startswith("tiny_cpu"))
GPU = fast_paths.Environment(cuda=True, transformer_engine=True, apex=True, apex_gradient_accumulation_fusion=True)
CPU = fast_paths.Environment()
FUSIONS = ("gradient_accumulation_fusion", "bias_dropout_fusion", "apply_rope_fusion", "masked_softmax_fusion",
           "bias_activation_fusion", "persist_layer_norm")


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_gpu_config_resolves_every_fast_path(path):
    cfg = load_run_config(path)
    fast = fast_paths.resolve(cfg, GPU)
    assert fast.fallbacks == [] and (fast.device, fast.precision) == ("cuda", "bf16")
    if cfg.backend == "megatron":
        assert fast.transformer_engine and fast.moe_grouped_gemm and fast.token_dispatcher == "alltoall"
        assert all(getattr(fast, name) for name in FUSIONS)
        assert fast.distributed_optimizer and fast.overlap_grad_reduce and fast.overlap_param_gather
        assert fast.fused_optimizer
        kwargs = fast.megatron_transformer_kwargs()
        assert kwargs["moe_grouped_gemm"] and all(kwargs[name] for name in FUSIONS)
    else:
        from excitation_dist.recipe.backends.deepspeed import deepspeed_config

        assert fast.deepspeed_optimizer == "FusedAdam"
        ds = deepspeed_config(cfg, fast)
        assert ds["optimizer"]["type"] == "AdamW" and ds["bf16"]["enabled"]


def test_megatron_transformer_config_and_spec_take_the_resolved_settings():
    pytest.importorskip("megatron.core")
    from excitation_dist.recipe.backends.megatron import transformer_config

    cfg = load_run_config(CONFIGS / "deepseek-v2-lite/megatron-8gpu.yaml")  # latent attention: no TE import check
    tc = transformer_config(cfg, fast_paths.resolve(cfg, GPU))
    assert tc.moe_grouped_gemm and tc.bf16 and tc.moe_token_dispatcher_type == "alltoall"
    assert all(getattr(tc, name) for name in FUSIONS) and not tc.use_cpu_initialization
    tc = transformer_config(cfg, fast_paths.resolve(cfg, CPU))
    assert not tc.moe_grouped_gemm and not any(getattr(tc, name) for name in FUSIONS)


def test_partial_gpu_stacks_fall_back_by_name():
    cfg = load_run_config(CONFIGS / "olmoe-1b-7b/megatron-8gpu.yaml")
    no_te = fast_paths.resolve(cfg, fast_paths.Environment(cuda=True))
    names = dict(no_te.fallbacks)
    assert no_te.device == "cuda" and not no_te.moe_grouped_gemm and "transformer_engine" in names
    assert no_te.bias_dropout_fusion and no_te.overlap_grad_reduce  # what needs CUDA only stays on
    apex_only = fast_paths.resolve(cfg, fast_paths.Environment(cuda=True, apex=True,
                                                                apex_gradient_accumulation_fusion=True))
    assert apex_only.gradient_accumulation_fusion and apex_only.persist_layer_norm and apex_only.fused_optimizer


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_gpu_config_on_a_cpu_machine_names_its_fallbacks(path):
    cfg = load_run_config(path)
    fast = fast_paths.resolve(cfg, CPU)
    names = [name for name, _ in fast.fallbacks]
    assert fast.device == "cpu" and names[0] == "device"
    if cfg.backend == "megatron":
        assert {"transformer_engine", "moe_grouped_gemm", *FUSIONS, "overlap_grad_reduce"} <= set(names)
    else:
        assert "deepspeed_optimizer" in names
    report = fast_paths.report(cfg, fast)
    assert f"{len(names)} setting(s) fall back" in report and "no CUDA device" in report
    assert fast_paths.apply_device(cfg, fast).device == "cpu"


def test_a_gpu_config_started_on_this_cpu_machine_says_what_falls_back_and_runs(tmp_path):
    pytest.importorskip("megatron.core")
    config = CONFIGS / "olmoe-1b-7b/megatron-8gpu.yaml"
    small = ["data.path=embedded", "data.tokenizer=null", "model.num_layers=2", "model.hidden_size=32",
             "model.num_attention_heads=4", "model.num_query_groups=2", "model.head_dim=8", "model.ffn_hidden_size=64",
             "model.vocab_size=256", "model.seq_length=16", "model.max_position_embeddings=16",
             "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_hidden_size=16", "parallel.gpus_per_node=2",
             "parallel.expert_parallel=2", "schedule.micro_batch_size=2", "schedule.global_batch_size=4",
             "schedule.train_steps=2", "schedule.warmup_steps=0", "schedule.eval_interval=100", "logging.interval=1",
             "logging.layer_interval=null", "checkpoint.dir=null", f"logging.dir={tmp_path / 'log'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop(train._FAST_PATHS_SAID, None)  # as a fresh shell has it: the fallbacks not yet said
    out = subprocess.run([sys.executable, "-m", "excitation_dist.cli", "train", str(config), *small], cwd=tmp_path,
                         capture_output=True, text=True, timeout=400, env=env)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "setting(s) fall back (megatron, cpu, bf16)" in text and "moe_grouped_gemm" in text, text[-4000:]
    assert text.count("setting(s) fall back") == 1 and "step      2/2 | loss" in text, text[-4000:]
