"""The fused Adam optimizers of DeepSpeed, NVIDIA apex and Transformer Engine: what
the folded update needs to know to step their expert tensors as they would.

The three share one CUDA kernel design (apex's ``multi_tensor_adam``; DeepSpeed's
is a copy, Transformer Engine's a descendant) and one state layout
(``exp_avg`` / ``exp_avg_sq`` per parameter, ``adam_w_mode`` on the optimizer,
``bias_correction`` per group). Per element, in float32::

    g = g + wd * p                                  (adam_w_mode=False: L2)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    update = (m / bc1) / (sqrt(v / bc2) + eps)
    update = update + wd * p                        (adam_w_mode=True: decoupled)
    p = p - lr * update

with ``bc = 1 - beta**step`` (1 without bias correction). They differ in where the
step counter lives, which this module keeps in one place:

* DeepSpeed ``deepspeed.ops.adam.FusedAdam``: ``state["step"]`` per tensor, an int
  (created from ``group.get("step", 0)``), but only the counter of the group's LAST
  tensor with a gradient is incremented, and that value is the step of the whole
  group's kernel call. Hiding the excited tensors from its step would change which
  tensor is last; so the folded update sets the counter of every tensor of the group
  to the group's step (the dense ones one behind: the optimizer then increments the
  last), which DeepSpeed reads the same way whichever tensor is last, and which a
  checkpoint carries either way.
* apex ``apex.optimizers.FusedAdam`` and Transformer Engine
  ``transformer_engine.pytorch.optimizers.FusedAdam``: ``group["step"]``, an int per
  group, incremented by the base step for every group with parameters, whether or
  not any has a gradient. The folded update runs before that increment (from the
  closure the optimizer calls first), so it uses ``group["step"] + 1``.

Options whose state the folded update does not reproduce are named in the reason
(the blend path is then taken): capturable (a device step and lr), Transformer
Engine's reduced-precision ``exp_avg_dtype`` / ``exp_avg_sq_dtype`` (scaled
states), ``use_decoupled_grad`` (gradients outside ``.grad``) and 16-bit
parameters (the kernel computes in float32 registers; torch ops on 16-bit tensors
would round each intermediate). Master weights kept inside the optimizer
(Transformer Engine ``master_weights=True``, apex ``use_master=True``) are refused
on both paths: the parameter is overwritten from the master copy every step, so
neither a folded step of the parameter nor a blend of it would reach the master.

The classes are recognized by module and name, without importing them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_FAMILIES = {
    "deepspeed.ops.adam": "DeepSpeed FusedAdam",
    "apex.optimizers": "apex FusedAdam",
    "transformer_engine.pytorch.optimizers": "Transformer Engine FusedAdam",
}


@dataclass(frozen=True)
class FusedAdamRules:
    """How one fused Adam optimizer steps: its name, decoupled decay, where its step lives."""

    name: str
    decoupled: bool
    step_per_tensor: bool  # DeepSpeed: state["step"]; apex / TE: group["step"]


def family(optimizer: torch.optim.Optimizer) -> str | None:
    """The display name of ``optimizer``'s fused Adam family, or None."""
    cls = type(optimizer)
    if cls.__name__ != "FusedAdam":
        return None
    return next((name for prefix, name in _FAMILIES.items() if cls.__module__.startswith(prefix)), None)


def refusal(optimizer: torch.optim.Optimizer) -> str | None:
    """Why Excitation cannot scale this fused Adam's update on any path, or None."""
    name = family(optimizer)
    if name is None:
        return None
    for option in ("master_weights", "use_master"):
        if getattr(optimizer, option, False):
            return (f"{name} with {option}=True keeps fp32 master weights inside the optimizer and overwrites the "
                    f"parameters from them each step, so a scaled update of the parameters would be lost. Keep the "
                    f"master weights outside the optimizer (megatron-core: no --use-precision-aware-optimizer; "
                    f"DeepSpeed: its bf16/fp16 optimizer wrappers), or pass {option}=False")
    return None


def rules(optimizer: torch.optim.Optimizer) -> tuple[FusedAdamRules | None, str]:
    """(rules, "") when the folded update reproduces this fused Adam, else (None, the reason)."""
    name = family(optimizer)
    if name is None:
        return None, f"{type(optimizer).__module__}.{type(optimizer).__name__} is not a fused Adam"
    if getattr(optimizer, "capturable", False):
        return None, f"{name} with capturable=True (its step and lr live on the device) is not folded"
    for option in ("exp_avg_dtype", "exp_avg_sq_dtype"):
        dtype = getattr(optimizer, option, torch.float32)
        if dtype != torch.float32:
            return None, f"{name} with {option}={dtype} (scaled reduced-precision state) is not folded"
    if getattr(optimizer, "use_decoupled_grad", False):
        return None, f"{name} with use_decoupled_grad=True (gradients outside .grad) is not folded"
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.dtype != torch.float32:
                return None, (f"{name} stepping {p.dtype} parameters directly (its kernel computes in float32 "
                              "registers) is not folded; fp32 main parameters (ZeRO, megatron's optimizer) are")
        if torch.is_tensor(group.get("lr")):
            return None, f"{name} with a tensor lr is not folded"
    return FusedAdamRules(name, decoupled=bool(getattr(optimizer, "adam_w_mode", 1)),
                          step_per_tensor=name.startswith("DeepSpeed")), ""


def init_state(rules: FusedAdamRules, state: dict, p: torch.Tensor, group: dict) -> None:
    """The optimizer's own lazy state initialization, for a tensor it has not stepped yet."""
    if rules.step_per_tensor:
        state["step"] = group.get("step", 0)
    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def advance_step(rules: FusedAdamRules, optimizer: torch.optim.Optimizer, group: dict,
                 members: list[torch.Tensor]) -> int:
    """This step's counter for ``group``, as the optimizer's kernel would see it; ``members``
    (the excited tensors, their state created) advanced to it (module docstring)."""
    if not rules.step_per_tensor:
        return group.get("step", 0) + 1  # the base step increments group["step"] after our closure
    stepped = [p for p in group["params"] if p.grad is not None]  # before the excited ones are hidden
    last = optimizer.state[stepped[-1]]
    step = last.get("step", group.get("step", 0)) + 1
    excited = {id(p) for p in members}
    for p in stepped:
        state = optimizer.state[p]
        if id(p) in excited:
            state["step"] = step
        elif state:
            state["step"] = step - 1  # the optimizer increments the last of these to `step`
    return step
