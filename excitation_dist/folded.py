"""The folded update: Excitation inside the optimizer's own pass over memory.

For optimizers whose parameter change is linear in the learning rate and whose
state does not depend on it (SGD with or without momentum, Adam, AdamW, with
coupled or decoupled weight decay), ``old + phi * (stepped - old)`` is the
same as stepping that expert's elements at learning rate ``phi * lr``. This
module does exactly that for every tensor that holds expert rows, all of one
parameter group at once: torch's own multi-tensor update (``_foreach`` ops over
the whole tensors, a constant number per group however many layers and experts
there are), where the two places the learning rate enters (the decoupled weight
decay and the final step) take the per-row factor through ONE row operation over
all expert blocks (:mod:`excitation_dist.rows`: a Triton kernel on CUDA). No
snapshot, no blend, no host sync (multipliers stay on their device); with every
multiplier 1 the result is torch's own, bit for bit.

The excited tensors are updated inside the base optimizer's step, from the
closure the controller hands it (after every step pre-hook and the caller's
closure; :meth:`excitation_dist.Excitation.hook_optimizer`), and hidden from its
own update (their ``.grad`` is set to None for the step and restored after it,
which every ``torch.optim`` optimizer skips), so dense tensors keep torch's own
implementation (single-tensor, foreach or fused). The state is torch's own format
(``step``, ``exp_avg``, ``exp_avg_sq``; ``momentum_buffer``; a fused optimizer's
step on the device): checkpoints, and a switch between the folded and the blend
path, keep working. A DTensor parameter (FSDP2, expert parallel) is updated on
its local shard (:func:`~excitation_dist.rows.local_tensor`); its state stays
DTensors, as torch's own step keeps it.

The fused Adams of DeepSpeed, apex and Transformer Engine fold too
(:func:`fused_adam_group`: their kernel's formula and step counters, from
:mod:`excitation_dist.fused_adams`), over fp32 parameters (ZeRO partitions,
megatron-core's main parameters).

Anything else (amsgrad, maximize, capturable, differentiable, complex parameters,
Adafactor, Muon, fused Adams over 16-bit parameters or with reduced-precision
state, unknown optimizers) takes the blend path of :mod:`excitation_dist.blend`;
so does, step by step, an excited tensor whose gradient is sparse.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from excitation_dist import fused_adams, triton_adam
from excitation_dist.rows import RowBlocks, RowPlan, local_tensor

_KINDS = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adam"}


def fold_kind(optimizer: torch.optim.Optimizer) -> tuple[str | None, str]:
    """(``"sgd"`` / ``"adam"`` / ``"fused_adam"``, "") when the folded update reproduces
    this optimizer, else (None, the reason)."""
    kind = _KINDS.get(type(optimizer))
    name = type(optimizer).__name__
    if kind is None:
        if fused_adams.family(optimizer) is not None:
            rules, reason = fused_adams.rules(optimizer)
            return ("fused_adam" if rules else None), reason
        return None, (f"{type(optimizer).__module__}.{name} is not one of torch.optim.SGD/Adam/AdamW or the "
                      "DeepSpeed / apex / Transformer Engine FusedAdam")
    for group in optimizer.param_groups:
        if any(torch.is_complex(p) for p in group["params"]):
            return None, f"{name} over complex parameters (torch steps them as real views)"
        for flag in ("capturable", "differentiable", "maximize", "amsgrad"):
            if group.get(flag):
                return None, f"{name} with {flag}=True is not folded"
        for key in ("lr", "betas", "weight_decay", "momentum"):
            values = group.get(key, ())
            if any(torch.is_tensor(v) for v in (values if isinstance(values, tuple) else (values,))):
                return None, f"{name} with a tensor {key!r}"
    return kind, ""


class StepCounts:
    """Host copies of the Adam step counters of the tensors the folded update steps.

    Bias corrections need the step as a number. torch keeps it in a tensor per
    parameter: on the CPU for its single-tensor and foreach paths (reading it is
    free), on the device for ``fused=True`` (reading it would make the host wait).
    The counter is read once per tensor (when its state was created, loaded or
    changed by someone else: the tensor object or its version changed) and then
    advanced here in step with the device tensor."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[torch.Tensor, int, float]] = {}

    def known(self, p: torch.Tensor, step_t: torch.Tensor) -> float | None:
        """The step of ``p`` before this step's increment, if nothing else touched its counter."""
        seen = self._seen.get(id(p))
        if seen is not None and seen[0] is step_t and seen[1] == step_t._version:
            return seen[2]
        return None

    def advanced(self, p: torch.Tensor, step_t: torch.Tensor, before: float | None) -> float:
        """The step of ``p`` after ``step_t += 1`` (``before``: :meth:`known` ahead of the increment)."""
        value = float(step_t) if before is None else before + 1  # one read per new or loaded state
        self._seen[id(p)] = (step_t, step_t._version, value)
        return value


def _rows(plan: RowPlan, members: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], *,
          gaps: bool, ys: Sequence[torch.Tensor] | None = None) -> RowBlocks:
    """The expert blocks (and, with ``gaps``, the elements between them at factor 1) of
    ``members``, located in ``xs[i]`` (read from ``ys[i]``)."""
    rows = RowBlocks()
    for i, p in enumerate(members):
        layout = plan.tensors[id(p)]
        y = None if ys is None else ys[i]
        for start, n, length, first in layout.blocks:
            rows.add(xs[i], start, n, length, first, y=y)
        if gaps:
            for start, length in layout.gaps:
                rows.add(xs[i], start, 1, length, plan.num_rows, y=y)
    return rows


def _spans(plan: RowPlan, members: Sequence[torch.Tensor]) -> list[list[tuple[int, int, int, int]]]:
    """Per member, ``(start, numel, row length, first factor row)`` of its expert blocks and gaps."""
    out = []
    for p in members:
        layout = plan.tensors[id(p)]
        out.append([(start, n * length, length, first) for start, n, length, first in layout.blocks]
                   + [(start, length, length, plan.num_rows) for start, length in layout.gaps])
    return out


def _state_step(p: torch.Tensor, group: dict) -> torch.Tensor:
    """torch's own initial step counter: on the parameter's device for fused, else a CPU scalar."""
    if group.get("fused"):
        return torch.zeros((), dtype=torch.float32, device=local_tensor(p).device)
    return torch.tensor(0.0, dtype=torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32)


def adam_group(optimizer: torch.optim.Optimizer, group: dict[str, Any], members: list[torch.Tensor],
               plan: RowPlan, factors_R: torch.Tensor, counts: StepCounts) -> None:
    """torch.optim.Adam/AdamW (no amsgrad) on ``members`` at learning rate phi * lr per expert row."""
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
    for p in members:
        state = optimizer.state[p]
        if not state:  # torch's own lazy initialization
            state["step"] = _state_step(p, group)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        params.append(local_tensor(p))
        grads.append(local_tensor(p.grad))
        exp_avgs.append(local_tensor(state["exp_avg"]))
        exp_avg_sqs.append(local_tensor(state["exp_avg_sq"]))
        steps.append(state["step"])
    before = [counts.known(p, s) for p, s in zip(members, steps)]
    torch._foreach_add_(steps, 1)
    step_values = [counts.advanced(p, s, b) for p, s, b in zip(members, steps, before)]
    if len(set(step_values)) == 1 and triton_adam.usable([*params, *grads, *exp_avgs, *exp_avg_sqs]):
        triton_adam.launch(params, grads, exp_avgs, exp_avg_sqs, _spans(plan, members), factors_R, lr=lr,
                           beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd, correction1=1 - beta1**step_values[0],
                           correction2=1 - beta2**step_values[0],
                           decoupled=group.get("decoupled_weight_decay", False), formula="torch")
        return
    if wd != 0:
        if group.get("decoupled_weight_decay", False):
            _rows(plan, members, params, gaps=True).apply("scale", 1.0 - factors_R * (lr * wd))
        else:
            grads = torch._foreach_add(grads, params, alpha=wd)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    denoms = torch._foreach_sqrt(exp_avg_sqs)  # torch's own denominator, bit for bit
    torch._foreach_div_(denoms, [(1 - beta2**s) ** 0.5 for s in step_values])
    torch._foreach_add_(denoms, eps)
    # dividing the denominator by phi scales the step by phi; phi = 1 changes no bit, phi = 0 gives an
    # infinite denominator, hence an update of exactly 0
    _rows(plan, members, denoms, gaps=False).apply("scale", factors_R.reciprocal())
    torch._foreach_addcdiv_(params, exp_avgs, denoms, [-lr / (1 - beta1**s) for s in step_values])


def fused_adam_group(optimizer: torch.optim.Optimizer, group: dict[str, Any], members: list[torch.Tensor],
                     plan: RowPlan, factors_R: torch.Tensor, rules: fused_adams.FusedAdamRules) -> None:
    """A DeepSpeed / apex / Transformer Engine FusedAdam on ``members`` at learning rate
    phi * lr per expert row: their kernel's formula (:mod:`excitation_dist.fused_adams`),
    in their state (``exp_avg``, ``exp_avg_sq``, their step counter), so that a checkpoint,
    or a later step by the optimizer itself, continues where this one left off. Exact to
    float32 rounding (the kernel keeps intermediates in registers; these ops round each)."""
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    bias_correction = group.get("bias_correction", True)
    for p in members:
        if "exp_avg" not in optimizer.state[p]:
            fused_adams.init_state(rules, optimizer.state[p], p, group)
    step = fused_adams.advance_step(rules, optimizer, group, members)
    params = [local_tensor(p) for p in members]
    grads = [local_tensor(p.grad) for p in members]
    exp_avgs = [local_tensor(optimizer.state[p]["exp_avg"]) for p in members]
    exp_avg_sqs = [local_tensor(optimizer.state[p]["exp_avg_sq"]) for p in members]
    correction1 = 1 - beta1**step if bias_correction else 1.0
    correction2 = 1 - beta2**step if bias_correction else 1.0
    if triton_adam.usable([*params, *grads, *exp_avgs, *exp_avg_sqs]):
        triton_adam.launch(params, grads, exp_avgs, exp_avg_sqs, _spans(plan, members), factors_R, lr=lr,
                           beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd, correction1=correction1,
                           correction2=correction2, decoupled=rules.decoupled, formula="fused")
        return
    if wd != 0 and not rules.decoupled:
        grads = torch._foreach_add(grads, params, alpha=wd)
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    updates = torch._foreach_div(exp_avg_sqs, correction2)  # the one transient: sqrt(v / bc2) + eps, then
    torch._foreach_sqrt_(updates)                              # overwritten in place by (m / bc1) / it
    torch._foreach_add_(updates, eps)
    torch._foreach_reciprocal_(updates)
    torch._foreach_mul_(updates, exp_avgs)
    torch._foreach_div_(updates, correction1)
    if wd != 0 and rules.decoupled:
        torch._foreach_add_(updates, params, alpha=wd)
    _rows(plan, members, updates, gaps=False).apply("scale", factors_R)
    torch._foreach_add_(params, updates, alpha=-lr)


def sgd_group(optimizer: torch.optim.Optimizer, group: dict[str, Any], members: list[torch.Tensor],
              plan: RowPlan, factors_R: torch.Tensor) -> None:
    """torch.optim.SGD on ``members`` at learning rate phi * lr per expert row."""
    lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
    params = [local_tensor(p) for p in members]
    grads = [local_tensor(p.grad) for p in members]
    scratch = False  # whether `updates` are this step's temporaries (then scaled in place)
    updates = grads
    if wd != 0:
        updates, scratch = torch._foreach_add(grads, params, alpha=wd), True
    if momentum != 0:
        buffers, running, running_updates = [], [], []
        for p, update in zip(members, updates):
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:  # torch's first step: the buffer is the update
                if local_tensor(p) is p:
                    state["momentum_buffer"] = torch.clone(update).detach()
                else:  # a DTensor's buffer is a DTensor of its layout, as torch's own step makes it
                    state["momentum_buffer"] = torch.empty_like(p.grad)
                    local_tensor(state["momentum_buffer"]).copy_(update)
            else:
                running.append(local_tensor(state["momentum_buffer"]))
                running_updates.append(update)
            buffers.append(local_tensor(state["momentum_buffer"]))
        if running:
            torch._foreach_mul_(running, momentum)
            torch._foreach_add_(running, running_updates, alpha=1 - group["dampening"])
        if group["nesterov"]:
            updates, scratch = torch._foreach_add(updates, buffers, alpha=momentum), True
        else:
            updates, scratch = buffers, False
    # torch's own last op is add_(update, alpha=-lr); the rows take (update * phi) through the same op, so
    # phi = 1 changes no bit. A temporary update is scaled in place; the gradient or momentum buffer is not.
    if scratch:
        _rows(plan, members, updates, gaps=False).apply("scale", factors_R)
        torch._foreach_add_(params, updates, alpha=-lr)
    else:
        _rows(plan, members, params, gaps=True, ys=updates).apply("add_scaled", factors_R, -lr)
