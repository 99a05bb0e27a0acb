"""``backend: fsdp2`` for ``excitation-dist train``: the recipe's GPT-MoE
(:mod:`excitation_dist.models`, plain-PyTorch experts) sharded with FSDP2
(``torch.distributed.fsdp.fully_shard`` per transformer block, then the root)
on a ``cpu``/``cuda`` DeviceMesh over all ranks, Excitation attached with
:func:`excitation_dist.fsdp2.attach`. With ``parallel.expert_parallel: 1`` the mesh
is 1-D (``dp``) and experts are sharded like every other parameter (``Shard(0)`` of
the stacked ``[E, ...]`` weights). With ``expert_parallel: N`` the mesh is
``(dp, ep)`` = ``(world / N, N)``: each MoE layer's experts are ``Shard(0)`` over
``ep`` with tokens exchanged all-to-all and FSDP2 over ``dp``
(:func:`excitation_dist.models.expert_parallel.shard_expert_parallel`, torchtitan's
layout); every rank reads its own data.

Checkpoints go through ``torch.distributed.checkpoint`` (DCP): every rank writes
its shards of the model and optimizer state (``get_state_dict``) and Excitation's
state (one ``BytesIO`` item, written once) into the recipe's staging directory;
the loop then publishes it atomically as for every backend. DCP reshards at load,
so a checkpoint resumes on another number of ranks.
"""

from __future__ import annotations

import io

import torch
import torch.distributed as dist

from excitation_dist.fsdp2 import dcp_state
from excitation_dist.models import GPTMoE
from excitation_dist.recipe.backends import torch as torch_backend
from excitation_dist.recipe.backends.configs import gpt_moe_config, validate
from excitation_dist.recipe.config import RunConfig

EXCITATION_KEY = "excitation"


class FSDP2Backend(torch_backend.TorchDDPBackend):
    """backend torch's training step, evaluation and optimizer; sharding, gradient sync and
    checkpoints of FSDP2."""

    def __init__(self, cfg: RunConfig, device: torch.device) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        from excitation_dist.fsdp2 import attach

        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.model = GPTMoE(gpt_moe_config(cfg, "torch")).to(device)  # the same weights on every rank, then sharded
        ep = cfg.parallel.expert_parallel
        if ep > 1:
            from excitation_dist.models.expert_parallel import shard_expert_parallel

            self.mesh = init_device_mesh(device.type, (dist.get_world_size() // ep, ep), mesh_dim_names=("dp", "ep"))
            for block in self.model.blocks:
                experts = getattr(block.ffn, "experts", None)  # None: a dense layer
                if experts is not None:
                    shard_expert_parallel(experts, self.mesh)
        else:
            self.mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))
        for block in self.model.blocks:
            fully_shard(block, mesh=self.mesh)
        fully_shard(self.model, mesh=self.mesh)
        register_fsdp_forward_method(self.model, "lm_losses")  # evaluation calls lm_losses, not forward
        self.wrapped = self.model
        self.optimizer = torch_backend.optimizer(cfg, self.model.parameters())
        self.excitation = attach(self.model, self.optimizer, cfg.excitation, mesh=self.mesh)
        self.data_parallel_rank = dist.get_rank()

    def forward_backward(self, tokens: torch.Tensor, last_micro_batch: bool, scale: float) -> torch.Tensor:
        # gradient accumulation: FSDP2 reduce-scatters the gradients of the step's last micro-batch only
        self.model.set_requires_gradient_sync(last_micro_batch)
        loss = self.model(tokens)
        (loss * scale).backward()
        return self.model.last_losses["ce"]

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optimizer_state}

    def save(self, directory: str, step: int) -> None:
        """Every rank writes its shards (DCP: ``__R_0.distcp`` per rank, ``.metadata`` by rank 0)."""
        import torch.distributed.checkpoint as dcp

        state = self._state()
        state[EXCITATION_KEY] = dcp_state.pack({**self.excitation.state_dict(), "saved_at_step": step})
        dcp.save(state, checkpoint_id=directory)

    def load(self, directory: str) -> None:
        """Load into this run's shards, whatever the number of ranks that wrote the checkpoint (DCP reshards)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        # The template: this run's sharded state (get_state_dict gives a fresh optimizer its state with a step at
        # lr 0, which changes no parameter; Excitation's state is restored below, or by the loop when the checkpoint
        # holds none).
        state = self._state()
        metadata = dcp.FileSystemReader(directory).read_metadata()
        has_excitation = EXCITATION_KEY in metadata.state_dict_metadata
        if has_excitation:
            state[EXCITATION_KEY] = io.BytesIO()
        dcp.load(state, checkpoint_id=directory)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        if has_excitation:
            saved = dcp_state.unpack(state[EXCITATION_KEY])
            saved.pop("saved_at_step", None)
            self.excitation.load_state_dict(saved)


def train(cfg: RunConfig) -> int:
    validate(cfg)
    return torch_backend.run(cfg, FSDP2Backend)
