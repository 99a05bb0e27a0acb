"""Every shipped config loads and validates; bad configs fail naming the key."""

import json
from pathlib import Path

import pytest

from excitation_dist.config import ConfigError
from excitation_dist.recipe.config import RunConfig, load_run_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUN_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "models" and p.name != "gpu_base.yaml")


def test_configs_exist():
    names = {p.relative_to(CONFIGS).as_posix() for p in RUN_CONFIGS}
    assert "tiny_cpu.yaml" in names
    for model in ("olmoe-1b-7b", "mixtral-8x7b", "deepseek-v2-lite", "qwen3-30b-a3b", "deepseek-v3"):
        assert any(n.startswith(model + "/") for n in names), model


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_config_validates(path):
    cfg = load_run_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.gradient_accumulation_steps >= 1
    if not path.name.startswith("tiny_cpu"):  # the CPU defaults have no published counterpart
        assert cfg.model.source and cfg.device == "cuda" and cfg.parallel.world_size in (8, 64, 256)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_config_passes_its_backends_checks(path):
    """What `excitation-dist train` checks before launching: the backend can build this model."""
    from excitation_dist.recipe.backends import configs

    configs.validate(load_run_config(path))


@pytest.mark.parametrize("config, overrides", [("tiny_cpu_torch.yaml", []), ("tiny_cpu.yaml", []),
                                               ("tiny_cpu_fsdp2.yaml", []),
                                               ("tiny_cpu_torch.yaml", ["model.num_experts=3", "model.top_k=4"])])
def test_the_launching_process_checks_a_cpu_config_without_importing_torch(tmp_path, config, overrides):
    """`excitation-dist train CONFIG` checks everything before it execs torchrun; none of that needs torch
    (1.5 CPU-seconds per launch here), nor megatron-core or DeepSpeed: --dry-run, a refused config and
    --help all finish without importing them. (Not checked for backend megatron on CPU: reading the CPU
    patches' versions loads them, and they import torch.)"""
    import subprocess
    import sys

    probe = ("import sys, runpy\n"
             "sys.argv = ['excitation-dist', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('excitation_dist.cli', run_name='__main__')\n"
             "except SystemExit as exc:\n    code = exc.code\n"
             "heavy = [m for m in ('torch', 'megatron.core', 'deepspeed') if m in sys.modules]\n"
             "print('HEAVY', heavy)\n")
    for args in ([str(CONFIGS / config), *overrides, "--dry-run", f"logging.dir={tmp_path}/run"], ["train", "--help"]):
        argv = ["train", *args] if args[0] != "train" else args
        done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path)
        assert "HEAVY []" in done.stdout, (argv, done.stdout[-2000:], done.stderr[-2000:])


@pytest.mark.parametrize("name, run_config", [("tiny_cpu.json", "tiny_cpu.yaml"),
                                              ("gpu_zero1_bf16.json", "olmoe-1b-7b/deepspeed-8gpu.yaml")])
def test_deepspeed_json_configs_merge_with_their_run_config(name, run_config):
    from excitation_dist.recipe.backends.deepspeed import deepspeed_config

    json_path = CONFIGS / "deepspeed" / name
    stage = json.loads(json_path.read_text())["zero_optimization"]["stage"]
    cfg = load_run_config(CONFIGS / run_config, [f"deepspeed_config={json_path}", f"parallel.zero_stage={stage}"])
    merged = deepspeed_config(cfg)
    assert merged["zero_optimization"]["stage"] == stage and "optimizer" in merged
    assert merged["train_batch_size"] == cfg.schedule.global_batch_size


def test_published_numbers():
    olmoe = load_run_config(CONFIGS / "olmoe-1b-7b/megatron-8gpu.yaml").model
    assert (olmoe.num_layers, olmoe.hidden_size, olmoe.moe.num_experts, olmoe.moe.top_k) == (16, 2048, 64, 8)
    mixtral = load_run_config(CONFIGS / "mixtral-8x7b/megatron-64gpu.yaml").model
    assert (mixtral.num_layers, mixtral.moe.num_experts, mixtral.moe.top_k, mixtral.moe.ffn_hidden_size) == (32, 8, 2, 14336)
    qwen = load_run_config(CONFIGS / "qwen3-30b-a3b/megatron-8gpu.yaml").model
    assert (qwen.num_layers, qwen.moe.num_experts, qwen.moe.top_k, qwen.moe.ffn_hidden_size) == (48, 128, 8, 768)
    ds = load_run_config(CONFIGS / "deepseek-v2-lite/megatron-8gpu.yaml").model
    assert (ds.num_layers, ds.moe.num_experts, ds.moe.top_k, ds.moe.first_dense_layers) == (27, 64, 6, 1)


def test_overrides_and_inherit():
    cfg = load_run_config(CONFIGS / "tiny_cpu.yaml", ["excitation.strategy=positivesum", "schedule.train_steps=50"])
    assert cfg.excitation.strategy == "positivesum" and cfg.schedule.train_steps == 50


@pytest.mark.parametrize("override, message", [
    ("model.moe.num_expert=4", "unknown key(s) model.moe.num_expert (did you mean model.moe.num_experts?); "
                               "allowed under model.moe: "),
    ("model.num_expert=4", "unknown key(s) model.num_expert (did you mean model.moe.num_experts?)"),  # nested keys
    ("train_step=4", "unknown key(s) train_step (did you mean schedule.train_steps?)"),
    ("schedule.warmup_steps=500", "schedule.warmup_steps: must be in [0, train_steps=200], got 500"),  # the values
    ("model.num_layers=0", "model.num_layers: must be >= 1, got 0"),
    ("parallel.expert_parallel=3", "parallel.expert_parallel: 3 must divide model.moe.num_experts=8"),
    ("excitation.strategy=bogus", "excitation.strategy: must be one of none, zerosum"),
    ("schedule.global_batch_size=10", "schedule.global_batch_size: must be a multiple"),
    ("model.moe.top_k=0", "model.moe.top_k: must be in [1, num_experts=8], got 0"),
    ("optimizer.lr=-1", "optimizer.lr: need lr > 0 and 0 <= min_lr <= lr, got lr=-1.0"),
    ("checkpoint.interval=0", "checkpoint.interval: must be an integer >= 1 (steps between checkpoints"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last: must be an integer >= 1"),
    ("precision=fp8", "precision: must be one of 'fp32', 'bf16', 'fp16'"),
    ("parallel.tensor_parallel=2", "the deepspeed backend supports data and expert parallelism only"),
    ("data.path=/data/x", "data.tokenizer"),
    ("schedule", "must look like key.subkey=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_run_config(CONFIGS / "tiny_cpu.yaml", [override])
    assert message in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")
    loop = tmp_path / "loop.yaml"
    loop.write_text("inherit: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_run_config(loop)
    typo = tmp_path / "typo.yaml"
    typo.write_text("modle: {num_layers: 2}\n")
    with pytest.raises(ConfigError, match="unknown key.*modle"):
        load_run_config(typo)


def test_megatron_refuses_latent_attention_on_cpu():
    """DeepSeek's MLA needs Transformer Engine's attention: refused before launch on CPU, accepted for GPUs."""
    from excitation_dist.recipe.backends.megatron import validate

    mla = ["backend=megatron", "model.attention=mla", "model.kv_lora_rank=16", "model.qk_rope_head_dim=8"]
    with pytest.raises(ConfigError, match="model.attention: mla needs Transformer Engine"):
        validate(load_run_config(CONFIGS / "tiny_cpu.yaml", mla))
    validate(load_run_config(CONFIGS / "tiny_cpu.yaml", [*mla, "device=cuda"]))


@pytest.mark.parametrize("path", sorted((CONFIGS / "models").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_model_config_loads_on_its_own_default_backend(path):
    """A model file run as it is (`excitation-dist train configs/models/X.yaml`) is not refused by
    the backend it names (or the default one): its router options are ones that backend expresses."""
    cfg = load_run_config(path)
    assert cfg.model.moe.num_experts > 1
