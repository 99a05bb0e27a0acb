"""What each backend of ``excitation-dist train`` builds from a run config, as plain data, and the
checks that refuse what it cannot build: no torch and no framework import, so that the command line
checks a config (and ``--dry-run`` answers) before it launches any rank, in a fraction of a second.

:func:`validate` raises :class:`~excitation_dist.config.ConfigError` naming the key and the fix. The
backend modules (:mod:`excitation_dist.recipe.backends`) build their models and DeepSpeed engines from
:func:`gpt_moe_config` and :func:`deepspeed_config`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from excitation_dist.config import ConfigError
from excitation_dist.models.config import GPTMoEConfig
from excitation_dist.recipe import fast_paths
from excitation_dist.recipe.config import RunConfig
from excitation_dist.recipe.fast_paths import FastPaths
from excitation_dist.recipe.model_options import gpt_moe_options

# The recipe owns these; a deepspeed_config JSON may repeat them only with the same value.
_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "gradient_clipping")


def gpt_moe_config(cfg: RunConfig, experts: Literal["torch", "deepspeed"]) -> GPTMoEConfig:
    """The :class:`GPTMoEConfig` for ``cfg.model`` with ``experts`` (torch: backends torch and fsdp2; deepspeed:
    ``deepspeed.moe`` experts over ``parallel.expert_parallel`` ranks); refuses what it cannot build."""
    m = cfg.model
    if m.attention != "standard":
        raise ConfigError(f"model.attention: multi-head latent attention (mla) is not built by backend {cfg.backend}; "
                          "use backend: megatron")
    parallel: dict[str, Any] = {}
    if experts == "deepspeed":
        if m.moe.router_dtype != "fp32":
            raise ConfigError("model.moe.router_dtype: DeepSpeed's TopKGate always routes in fp32; set fp32")
        parallel["ep_size"] = cfg.parallel.expert_parallel
    try:
        return GPTMoEConfig(**gpt_moe_options(m), experts=experts, **parallel)
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None


def _fused_optimizer(cfg: RunConfig) -> dict[str, Any]:
    """DeepSpeed's optimizer block for ``optimizer.*``: on CUDA DeepSpeed builds its FusedAdam from it.

    ``adam_w_mode`` is always explicit: DeepSpeed's ``{"type": "Adam"}`` defaults to ``adam_w_mode: true``
    (decoupled weight decay, i.e. AdamW), while ``optimizer.name: adam`` means coupled L2 decay on the CPU
    path (``torch.optim.Adam``) and on the Megatron backend; without it a GPU and a CPU run of one config
    would train different optimizers."""
    o = cfg.optimizer
    decoupled = o.name == "adamw"
    return {"type": "AdamW" if decoupled else "Adam",
            "params": {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay,
                       "adam_w_mode": decoupled}}


def deepspeed_config(cfg: RunConfig, fast: FastPaths | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON config for ``cfg`` (``cfg.deepspeed_config`` merged under it). With the fast
    paths on (CUDA, Adam/AdamW: :func:`excitation_dist.recipe.fast_paths.resolve`) it carries an
    ``optimizer`` block, so DeepSpeed builds FusedAdam; on CPU the recipe passes a torch optimizer."""
    fast = fast_paths.resolve(cfg) if fast is None else fast
    s, o = cfg.schedule, cfg.optimizer
    generated: dict[str, Any] = {
        "train_batch_size": s.global_batch_size,
        "train_micro_batch_size_per_gpu": s.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": o.clip_grad,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16"},
    }
    if fast.deepspeed_optimizer == "FusedAdam":
        generated["optimizer"] = _fused_optimizer(cfg)
    if not cfg.deepspeed_config:
        return generated
    path = Path(cfg.deepspeed_config)
    try:
        user = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"deepspeed_config: cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed_config: {path} is not valid JSON: {exc}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"deepspeed_config: {path} must hold a JSON object")
    if "scheduler" in user:
        raise ConfigError(f"deepspeed_config: {path} has a 'scheduler'; the recipe sets the learning rate every step "
                          "from schedule.* and optimizer.lr/min_lr: remove it")
    for key in _OWNED_KEYS:
        if key in user and user[key] != generated[key]:
            raise ConfigError(f"deepspeed_config: {path} sets {key}={user[key]!r} but the run config gives "
                              f"{generated[key]!r} (from schedule.* / optimizer.clip_grad): remove it from the JSON")
    stage = user.get("zero_optimization", {}).get("stage", cfg.parallel.zero_stage)
    if stage != cfg.parallel.zero_stage:
        raise ConfigError(f"deepspeed_config: {path} sets zero_optimization.stage={stage} but parallel.zero_stage is "
                          f"{cfg.parallel.zero_stage}: set it in one place")
    if "optimizer" in user:  # the JSON's optimizer block wins over the generated one
        generated.pop("optimizer", None)
    merged = dict(user)
    for key, value in generated.items():
        merged[key] = {**user[key], **value} if isinstance(value, dict) and isinstance(user.get(key), dict) else value
    return merged


def _megatron(cfg: RunConfig) -> None:
    m, p = cfg.model, cfg.parallel
    unsupported = {
        "parallel.context_parallel > 1": p.context_parallel != 1,
    }
    bad = [key for key, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: not wired into the megatron recipe yet; "
                          "use Megatron-LM (python -m excitation_dist.recipe.pretrain_gpt)")
    if m.attention == "mla" and cfg.device == "cpu":
        raise ConfigError("model.attention: mla needs Transformer Engine's attention (megatron-core's local "
                          "DotProductAttention cannot run latent attention); use device: cuda with Transformer Engine")
    if cfg.device == "cpu" and p.expert_tensor_parallel != 1:
        raise ConfigError("parallel.expert_tensor_parallel: must be 1 on CPU (gloo cannot all-gather unevenly)")
    if p.tensor_parallel > 1 and p.expert_parallel == 1 and p.expert_tensor_parallel != p.tensor_parallel:
        raise ConfigError(
            "parallel.expert_parallel: with tensor_parallel > 1 and expert_tensor_parallel != tensor_parallel, "
            "megatron-core only synchronizes expert gradients when expert_parallel > 1; raise expert_parallel "
            "or set expert_tensor_parallel = tensor_parallel"
        )


def validate(cfg: RunConfig) -> None:
    """Refuse, with :class:`ConfigError`, what ``cfg.backend`` cannot build."""
    if cfg.backend in ("torch", "fsdp2"):  # fsdp2: the same model (torch experts) and precision as backend torch
        gpt_moe_config(cfg, "torch")
        if cfg.precision != "fp32":
            raise ConfigError(f"precision: backend {cfg.backend} trains in fp32; use deepspeed or megatron for "
                              "bf16/fp16")
    elif cfg.backend == "deepspeed":
        gpt_moe_config(cfg, "deepspeed")
        deepspeed_config(cfg)
    elif cfg.backend == "megatron":
        _megatron(cfg)
