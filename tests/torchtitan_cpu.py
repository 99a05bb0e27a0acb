"""torchtitan's own trainer (``python -m torchtitan.train``) on a CPU-only machine, for tests.

    python -m tests.torchtitan_cpu --module qwen3 --config qwen3_moe_debug <torchtitan arguments>
    torchrun --nproc_per_node 2 -m tests.torchtitan_cpu --module qwen3 --config qwen3_moe_debug ...

runs ``torchtitan.train.main`` (one CPU thread per process) after these test-side
stand-ins, applied before torchtitan's trainer is imported (torchtitan's files are
not changed):

* device type ``"cpu"``: ``torchtitan.tools.utils`` picks ``"cuda"`` when no
  accelerator is present; it is imported here while torch reports ``"cpu"``,
  with a device module that has no memory statistics to report, so
  torchtitan's device, its distributed backend (gloo) and its memory monitor
  are the CPU's.
* a tiny ``debugmodel_moe`` flavor of Qwen3 (the flavor ``qwen3_moe_debug``
  uses): torchtitan's own MoE block builder at CPU-test sizes, with the inner
  attention swapped for torchtitan's ``ScaledDotProductAttention``
  (FlexAttention has no backward on CPU; the trainer feeds that backend no
  masks, only positions). The model spec cannot be changed from torchtitan's
  command line (``Trainer.Config.model_spec`` is hidden from it).
* ``torch.distributed.set_timeout`` (torchtitan 0.3.0 calls it; torch 2.13 has
  only the private ``_set_pg_timeout``).
* FSDP2 gradient reductions as plain sums: gloo has no ``PREMUL_SUM``.

Everything else (config parsing, ``--override.imports``, parallelize, optimizer,
data loader, checkpointer, training loop) is torchtitan's. The offline tokenizer
and data set are in ``tests/fixtures/torchtitan`` (``--hf_assets_path`` and
``--dataloader.dataset_path``).
"""

from __future__ import annotations

import torch

# The tiny debugmodel_moe: sizes of a CPU test.
VOCAB, DIM, N_LAYERS, N_HEADS, N_KV_HEADS, HEAD_DIM = 512, 64, 2, 4, 2, 16
MOE_HIDDEN, NUM_EXPERTS, TOP_K = 32, 8, 2


class _CPUDeviceModule:
    """``torch.cpu`` plus the few calls torchtitan's memory monitor makes on its
    device module (``torch.cpu`` has no memory statistics: they read as none)."""

    def __getattr__(self, name):
        return getattr(torch.cpu, name)

    @staticmethod
    def current_device() -> int:
        return 0  # torch.cpu's is "cpu"; torchtitan passes it to barrier(device_ids=[...])

    @staticmethod
    def get_device_name(device=None) -> str:
        return "CPU"

    @staticmethod
    def get_device_properties(device=None):
        from types import SimpleNamespace

        return SimpleNamespace(total_memory=1 << 30)  # only its capacity percentages read it

    @staticmethod
    def memory_stats(device=None) -> dict:
        return {}

    @staticmethod
    def reset_peak_memory_stats(device=None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass


def _cpu_device_type() -> None:
    """Import ``torchtitan.tools.utils`` (which reads the device type and module
    once) while torch reports the CPU as the available device."""
    import torch._utils

    get_type, get_module = torch._utils._get_available_device_type, torch._utils._get_device_module
    torch._utils._get_available_device_type = lambda: get_type() or "cpu"
    torch._utils._get_device_module = lambda device_type=None: (
        _CPUDeviceModule() if device_type == "cpu" else get_module(device_type))
    try:
        import torchtitan.tools.utils as utils
    finally:
        torch._utils._get_available_device_type, torch._utils._get_device_module = get_type, get_module
    if utils.device_type != "cpu" and not torch.cuda.is_available():  # imported before install()
        raise RuntimeError(f"torchtitan already chose device type {utils.device_type!r}: call install() first")


def tiny_qwen3_moe(*, vocab: int, dim: int, n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int,
                   moe_hidden: int, num_experts: int, top_k: int, max_seq_len: int, theta: float,
                   attn_backend: str = "flex", moe_comm_backend: str = "standard"):
    """A Qwen3-MoE model config from torchtitan's own builders at CPU-test sizes, its inner attention
    torchtitan's ScaledDotProductAttention (FlexAttention has no backward on CPU)."""
    from torchtitan.models.common import CosSinRoPE, Embedding, Linear
    from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention
    from torchtitan.models.qwen3 import Qwen3Model, _build_qwen3_moe_layers, _qwen3_norm

    config = Qwen3Model.Config(
        vocab_size=vocab,
        dim=dim,
        norm=_qwen3_norm(dim),
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim),
        lm_head=Linear.Config(in_features=dim, out_features=vocab),
        layers=_build_qwen3_moe_layers(
            fuse_qkv=True, n_layers=n_layers, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
            moe_hidden_dim=moe_hidden, num_experts=num_experts, top_k=top_k, attn_backend=attn_backend,
            rope=CosSinRoPE.Config(dim=head_dim, max_seq_len=max_seq_len, theta=theta),
            moe_comm_backend=moe_comm_backend),
    )
    for _fqn, _cfg, parent, attr in list(config.traverse(FlexAttention.Config)):
        setattr(parent, attr, ScaledDotProductAttention.Config())  # FlexAttention: no backward on CPU
    return config


def _tiny_debugmodel_moe(attn_backend: str = "flex", moe_comm_backend: str = "standard"):
    return tiny_qwen3_moe(vocab=VOCAB, dim=DIM, n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=N_KV_HEADS,
                          head_dim=HEAD_DIM, moe_hidden=MOE_HIDDEN, num_experts=NUM_EXPERTS, top_k=TOP_K,
                          max_seq_len=256, theta=1000000.0, attn_backend=attn_backend,
                          moe_comm_backend=moe_comm_backend)


def _set_timeout() -> None:
    """torchtitan 0.3.0 calls ``torch.distributed.set_timeout`` after the first
    step (``set_pg_timeouts``); torch 2.13 has it only as ``_set_pg_timeout``."""
    import torch.distributed as dist

    if not hasattr(dist, "set_timeout"):
        dist.set_timeout = dist.distributed_c10d._set_pg_timeout


def _gloo_fsdp_reductions() -> None:
    """torchtitan turns FSDP2's gradient division off (divide factor 1.0), which
    FSDP2 reduce-scatters as ``PREMUL_SUM``; gloo has no ``PREMUL_SUM``. Plain sums
    (``set_force_sum_reduction_for_comms``), as torchtitan's symmetric-memory path does."""
    from torch.distributed.fsdp import FSDPModule
    from torchtitan.distributed import fsdp

    disable_division = fsdp.disable_fsdp_gradient_division

    def disable_division_and_sum(model) -> None:
        disable_division(model)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)

    fsdp.disable_fsdp_gradient_division = disable_division_and_sum


def install() -> None:
    """Apply the stand-ins (before torchtitan's trainer is imported)."""
    _cpu_device_type()
    _set_timeout()
    _gloo_fsdp_reductions()
    import torchtitan.models.qwen3 as qwen3

    qwen3.qwen3_configs["debugmodel_moe"] = _tiny_debugmodel_moe


def main() -> None:
    install()
    torch.set_num_threads(1)
    from torchtitan.train import main as train

    train()


if __name__ == "__main__":
    main()
