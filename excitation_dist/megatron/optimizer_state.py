"""Loading a megatron-core DistributedOptimizer checkpoint, in particular into torch's own Adam.

Without Transformer Engine or NVIDIA apex, megatron-core (0.16.1 and 0.19.x)
builds its DistributedOptimizer on ``torch.optim.Adam`` / ``AdamW``, which keeps
Adam's ``step`` as a tensor in every parameter's state (TE's and apex's
FusedAdam keep it in the param groups). megatron-core's checkpoint code assumes
the fused optimizers and, with torch's Adam, gets three things wrong:

1. building the load template of a fresh optimizer fails: ``state_dict()``
   reads the ``step`` of every parameter's state and asserts there is exactly
   one value, but a fresh torch optimizer has no state yet (Megatron-LM 0.19.2's
   ``load_checkpoint``: ``AssertionError`` in ``DistributedOptimizer.state_dict``);
2. ``load_state_dict`` sets each parameter's ``step`` from the saved param
   groups, then ``_set_main_param_and_optimizer_states`` copies every tensor of
   the parameter's state from the loaded parameter state, where ``step`` is not
   the checkpoint's: a ``fully_reshardable`` checkpoint has none
   (``KeyError: 'step'``), a ``dp_reshardable`` one (Megatron-LM's default)
   hands back the load template's own ``step`` (a non-persistent entry), which
   resets Adam's step to 0;
3. ``load_state_dict`` gives all parameters ONE shared ``step`` tensor
   (``s["step"] = step``), and torch's Adam increments ``state["step"]`` in
   place per parameter: every resumed step then advances the shared counter
   once per parameter (3 -> 45 after three steps with 14 parameters), so Adam's
   bias correction, and every weight after the first resumed step, differ from
   the uninterrupted run.

Independently of the optimizer class, megatron-core 0.19.2 loads a
``dp_reshardable`` checkpoint (Megatron-LM's default format) by copying in
place into the DistributedOptimizer's main parameters, which for fp32 models are
views of parameters that require grad, without ``torch.no_grad()`` (4:
``RuntimeError: a view of a leaf Variable that requires grad is being used in
an in-place operation``; its ``fully_reshardable`` loader has the decorator).

:func:`loading` works around all four; the recipe's megatron backend
(``excitation_dist.recipe.backends.megatron``) and the Megatron-LM hooks
(:func:`excitation_dist.megatron.checkpointing.install_megatron_lm_hooks`) both
wrap their load in it. With TE's or apex's Adam it only does what megatron's own
load template does anyway (``init_state_fn``), and turns autograd off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from excitation_dist.megatron import compat


def _bases(optimizer: Any) -> Iterator[tuple[Any, torch.optim.Optimizer]]:
    """(megatron leaf optimizer, its torch optimizer) of every leaf with parameters on this rank."""
    for leaf in compat.leaf_optimizers(optimizer):
        base = compat.base_optimizer(leaf)
        if base is not None:
            yield leaf, base


def _keeps_step_per_parameter(base: torch.optim.Optimizer) -> bool:
    """Whether ``base`` is torch's own Adam/AdamW (a ``step`` tensor in each parameter's state)."""
    return isinstance(base, (torch.optim.Adam, torch.optim.AdamW))


def init_state(optimizer: Any) -> None:
    """Give a fresh optimizer the state tensors a load fills in place (megatron's
    optimizers build their load template from them), with a ``step`` of 0 for
    torch's Adam (problem 1). Unlike megatron's own dummy step, this steps
    nothing, so no Excitation hook runs and no state moves. Equivalent to
    torch's lazy initialization: zero moments at step 0."""
    for leaf, base in _bases(optimizer):
        init = getattr(leaf, "init_state_fn", None)
        if init is not None:
            init(base, getattr(leaf, "config", None))
        if not _keeps_step_per_parameter(base):
            continue
        for group in base.param_groups:
            for param in group["params"]:
                state = base.state[param]
                if "exp_avg" in state and "step" not in state:
                    state["step"] = torch.tensor(0.0)


@contextlib.contextmanager
def _keep_step_on_copy(optimizer: Any) -> Iterator[None]:
    """Within this block, a DistributedOptimizer copying loaded tensors into a
    parameter's state keeps the ``step`` it set from the checkpoint's param
    groups (problem 2): megatron-core saves the step there, never in the
    parameter state."""
    patched = []
    for leaf, base in _bases(optimizer):
        setter = getattr(leaf, "_set_main_param_and_optimizer_states", None)
        if setter is None or not hasattr(leaf, "model_param_group_index_map") or not _keeps_step_per_parameter(base):
            continue

        def set_states(model_param: Any, tensors: dict[str, Any], _leaf: Any = leaf, _set: Any = setter) -> Any:
            group, order = _leaf.model_param_group_index_map[model_param]
            state = _leaf.optimizer.state[_leaf.optimizer.param_groups[group]["params"][order]]
            if "step" in state:
                tensors = {**tensors, "step": state["step"].clone()}
            return _set(model_param, tensors)

        leaf._set_main_param_and_optimizer_states = set_states
        patched.append(leaf)
    try:
        yield
    finally:
        for leaf in patched:
            del leaf._set_main_param_and_optimizer_states  # the instance attribute shadowed the method


def unshare_steps(optimizer: Any) -> None:
    """Give every parameter its own Adam ``step`` tensor (problem 3): cloning
    restores the per-parameter counters the uninterrupted run has (and only
    copies steps that were distinct already)."""
    for _, base in _bases(optimizer):
        for state in base.state.values():
            step = state.get("step")
            if torch.is_tensor(step):
                state["step"] = step.clone()


@contextlib.contextmanager
def loading(optimizer: Any) -> Iterator[None]:
    """Wrap everything a checkpoint load does with ``optimizer``: building the
    load template, reading the checkpoint and ``optimizer.load_state_dict``.
    Prepares a fresh optimizer's state before, keeps ``step`` while megatron
    copies the loaded tensors, and gives every parameter its own ``step`` after;
    autograd is off throughout (a load records no graph)."""
    init_state(optimizer)
    with torch.no_grad(), _keep_step_on_copy(optimizer):
        yield
    unshare_steps(optimizer)


__all__ = ["init_state", "loading", "unshare_steps"]
