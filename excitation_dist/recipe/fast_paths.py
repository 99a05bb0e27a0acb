"""Device-aware fast paths: the one place where the recipe decides, from the machine it runs on, which
fused kernels, layers, dispatcher, precision and optimizer each backend uses.

:func:`resolve` takes the run config and an :class:`Environment` (what the machine offers: a CUDA device,
Transformer Engine, NVIDIA apex and its fused kernels) as plain data, and returns :class:`FastPaths`: the
settings the backends apply, and ``fallbacks``, each (setting, reason) that is not on the fast path. The
backends never hand-pick these: ``backend: megatron`` builds its TransformerConfig, layer spec,
DistributedDataParallelConfig and optimizer from them; ``backend: deepspeed`` its optimizer. A GPU config
started on a machine without CUDA falls back to the CPU path and prints the fallbacks
(:func:`report`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal

from excitation_dist.recipe.config import RunConfig


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken install
        return False


@dataclass(frozen=True)
class Environment:
    """What the machine offers; :meth:`detect` reads it, tests pass it in."""

    cuda: bool = False  # a CUDA device is visible
    transformer_engine: bool = False  # import transformer_engine works (NVIDIA's PyTorch containers)
    apex: bool = False  # NVIDIA apex (not PyPI's 'apex'): apex.optimizers, fused layer norm
    apex_gradient_accumulation_fusion: bool = False  # apex's fused_weight_gradient_mlp_cuda extension

    @classmethod
    def detect(cls, *, cuda: bool = True) -> Environment:
        """``cuda=False``: do not look for a CUDA device (that imports torch); a CPU config never reads it."""
        if cuda:
            import torch

        return cls(
            cuda=cuda and torch.cuda.is_available(),
            transformer_engine=_importable("transformer_engine"),
            apex=_importable("apex.optimizers") and _importable("apex.normalization"),
            apex_gradient_accumulation_fusion=_importable("fused_weight_gradient_mlp_cuda"),
        )


@dataclass
class FastPaths:
    """The resolved settings; ``fallbacks``: (setting, reason) for each one off its fast path."""

    device: Literal["cpu", "cuda"]
    precision: Literal["fp32", "bf16", "fp16"]
    # megatron
    transformer_engine: bool  # TE layer spec (TE linear/attention/norm layers)
    moe_grouped_gemm: bool  # TEGroupedMLP: every local expert in one grouped GEMM
    token_dispatcher: Literal["alltoall", "allgather"]
    gradient_accumulation_fusion: bool
    bias_dropout_fusion: bool
    apply_rope_fusion: bool
    masked_softmax_fusion: bool
    bias_activation_fusion: bool
    persist_layer_norm: bool
    distributed_optimizer: bool
    overlap_grad_reduce: bool
    overlap_param_gather: bool
    fused_optimizer: bool  # megatron's Adam from TE or apex (megatron-core picks it when importable)
    # deepspeed
    deepspeed_optimizer: Literal["FusedAdam", "torch"]  # FusedAdam: the DeepSpeed config's optimizer block
    fallbacks: list[tuple[str, str]] = field(default_factory=list)

    def megatron_transformer_kwargs(self) -> dict[str, bool]:
        """The fusion switches and grouped GEMM, as TransformerConfig keywords."""
        return dict(
            moe_grouped_gemm=self.moe_grouped_gemm, gradient_accumulation_fusion=self.gradient_accumulation_fusion,
            bias_dropout_fusion=self.bias_dropout_fusion, apply_rope_fusion=self.apply_rope_fusion,
            masked_softmax_fusion=self.masked_softmax_fusion, bias_activation_fusion=self.bias_activation_fusion,
            persist_layer_norm=self.persist_layer_norm,
        )


def resolve(cfg: RunConfig, env: Environment | None = None) -> FastPaths:
    """The fast paths of ``cfg`` on a machine described by ``env`` (default: this one)."""
    env = Environment.detect(cuda=cfg.device == "cuda") if env is None else env
    fallbacks: list[tuple[str, str]] = []

    def fall(setting: str, reason: str) -> bool:
        fallbacks.append((setting, reason))
        return False

    device: Literal["cpu", "cuda"] = cfg.device
    if cfg.device == "cuda" and not env.cuda:
        device = "cpu"
        fall("device", "cuda requested, but no CUDA device is visible: CPU ranks over gloo")
    precision = cfg.precision
    if device == "cpu" and precision == "fp16":
        precision = "fp32"
        fall("precision", "fp16 needs CUDA (loss scaling kernels): fp32 on CPU")
    cuda = device == "cuda"
    te = cuda and env.transformer_engine
    if cuda and not te:
        fall("transformer_engine", "import transformer_engine failed: megatron-core's local layers")
    elif not cuda:
        fall("transformer_engine", "CPU: megatron-core's local layers")
    megatron = cfg.backend == "megatron"
    grouped = te and megatron
    if megatron and not grouped:
        fall("moe_grouped_gemm", "needs Transformer Engine (TEGroupedMLP): SequentialMLP, one GEMM per expert")
    dispatcher = cfg.parallel.token_dispatcher
    if cuda and megatron and dispatcher != "alltoall":
        fall("token_dispatcher", f"parallel.token_dispatcher: {dispatcher} set in the config (alltoall is faster "
                                 "with expert parallelism)")
    grad_fusion = cuda and (te or env.apex_gradient_accumulation_fusion)
    fused = dict(
        bias_dropout_fusion=cuda,  # megatron's jit-fused bias + dropout + add
        # Transformer Engine's fused rotary embedding (megatron fuses latent attention's only with YaRN)
        apply_rope_fusion=te and (cfg.model.attention != "mla" or cfg.model.rope_scaling == "yarn"),
        masked_softmax_fusion=cuda,  # fused scale-mask-softmax (TE attention makes it moot)
        bias_activation_fusion=cuda,  # jit-fused (bias +) SwiGLU / GELU
        persist_layer_norm=cuda and (te or env.apex),  # persistent layer-norm kernel (TE, or apex's FastLayerNorm)
    )
    if megatron:
        if not grad_fusion:
            fall("gradient_accumulation_fusion", "needs CUDA with Transformer Engine layers or apex's "
                                                 "fused_weight_gradient_mlp_cuda")
        for name, on in fused.items():
            if not on:
                fall(name, "CPU: no fused kernels" if not cuda else "needs Transformer Engine")
    dist_opt = cfg.parallel.distributed_optimizer
    if megatron and cuda and not dist_opt:
        fall("distributed_optimizer", "parallel.distributed_optimizer: false set in the config")
    overlap = cuda and dist_opt
    if megatron and dist_opt and not cuda:
        fall("overlap_grad_reduce", "CPU: gradients reduced after the backward pass (gloo)")
        fall("overlap_param_gather", "CPU: parameters gathered after the optimizer step (gloo)")
    fused_opt = cuda and (te or env.apex) and cfg.optimizer.name != "sgd"
    if megatron and cfg.optimizer.name != "sgd" and not fused_opt:
        fall("fused_optimizer", "megatron-core's Adam falls back to torch.optim (no Transformer Engine or apex)")
    ds_fused = cuda and cfg.optimizer.name in ("adam", "adamw")
    if cfg.backend == "deepspeed" and not ds_fused:
        fall("deepspeed_optimizer", "CPU: a torch optimizer (DeepSpeed's FusedAdam is a CUDA kernel)"
             if not cuda else f"optimizer.name: {cfg.optimizer.name} has no fused DeepSpeed kernel")
    if not megatron:
        fallbacks[:] = [f for f in fallbacks if f[0] in ("device", "precision", "deepspeed_optimizer")]
    return FastPaths(
        device=device, precision=precision, transformer_engine=te, moe_grouped_gemm=grouped,
        token_dispatcher=dispatcher, gradient_accumulation_fusion=grad_fusion, **fused,
        distributed_optimizer=dist_opt, overlap_grad_reduce=overlap, overlap_param_gather=overlap,
        fused_optimizer=fused_opt, deepspeed_optimizer="FusedAdam" if ds_fused else "torch", fallbacks=fallbacks,
    )


def report(cfg: RunConfig, fast: FastPaths) -> str:
    """Lines for the run's start: the fast paths, or which settings fall back and why."""
    if not fast.fallbacks:
        return f"fast paths: all on ({cfg.backend}, {fast.device}, {fast.precision})"
    head = f"fast paths: {len(fast.fallbacks)} setting(s) fall back ({cfg.backend}, {fast.device}, {fast.precision}):"
    return "\n".join([head, *(f"  {name}: {reason}" for name, reason in fast.fallbacks)])


def apply_device(cfg: RunConfig, fast: FastPaths) -> RunConfig:
    """``cfg`` with the resolved device and precision (a GPU config on a CPU machine runs on CPU)."""
    import dataclasses

    if (cfg.device, cfg.precision) == (fast.device, fast.precision):
        return cfg
    return dataclasses.replace(cfg, device=fast.device, precision=fast.precision)
