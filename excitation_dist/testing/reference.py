"""Reference optimizers for exactness tests: Excitation's update equals running
each expert's elements at learning rate ``phi * lr``. The reference gets those
per-element rates from the test, located independently of Excitation's maps."""

from __future__ import annotations

import math

import torch


class ElementLRAdamW(torch.optim.Optimizer):
    """``torch.optim.AdamW``'s single-tensor update with an optional per-element
    learning-rate factor per stepped tensor: ``lr_scale[id(tensor)]``, a tensor of
    the stepped tensor's shape (absent: factor 1)."""

    def __init__(self, params, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps})
        self.lr_scale: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                scale = self.lr_scale.get(id(p))
                lr = group["lr"] if scale is None else group["lr"] * scale
                p.mul_(1 - lr * group["weight_decay"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(group["eps"])
                p.sub_(lr / (1 - b1**t) * m / denom)
