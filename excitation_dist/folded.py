"""The folded update: Excitation inside the optimizer's own pass over memory.

For optimizers whose parameter change is linear in the learning rate and whose
state does not depend on it (SGD with or without momentum, Adam, AdamW, with
coupled or decoupled weight decay), ``old + phi * (stepped - old)`` is the
same as stepping that expert's elements at learning rate ``phi * lr``. This
module does exactly that, for the tensors that hold expert segments: it runs
``torch.optim``'s own single-tensor update, with the two places where the
learning rate enters (the decoupled weight decay and the final step) taking a
per-row factor instead of a scalar. Each expert block is viewed as ``[n, length]``
and the factor is an ``[n, 1]`` column, so the number of passes over memory and
the transient tensors are those of torch's own step: no snapshot, no blend,
no host sync (multipliers stay on their device).

The excited tensors are updated inside the base optimizer's step, from the
closure the controller hands it (after every step pre-hook and the caller's
closure; :meth:`Excitation.hook_optimizer`), and hidden from its own update (their ``.grad`` is set to None for the step and
restored after it, which every ``torch.optim`` optimizer skips), so dense
tensors keep torch's own implementation (foreach or fused). The state is
torch's own format (``step``, ``exp_avg``, ``exp_avg_sq``; ``momentum_buffer``):
checkpoints, and a switch between the folded and the blend path, keep working.

Anything else (fused kernels, amsgrad, maximize, complex parameters, Adafactor,
Muon, unknown optimizers) takes the blend path of :mod:`excitation_dist.blend`;
so does, step by step, an excited tensor whose gradient is sparse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch

from excitation_dist.blend import SegmentBlock

_KINDS = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adam"}


def fold_kind(optimizer: torch.optim.Optimizer) -> tuple[str | None, str]:
    """(``"sgd"`` / ``"adam"``, "") when the folded update reproduces this
    optimizer exactly, else (None, the reason)."""
    kind = _KINDS.get(type(optimizer))
    name = type(optimizer).__name__
    if kind is None:
        return None, f"{type(optimizer).__module__}.{name} is not one of torch.optim.SGD/Adam/AdamW"
    for group in optimizer.param_groups:
        if any(torch.is_complex(p) for p in group["params"]):
            return None, f"{name} over complex parameters (torch steps them as real views)"
        for flag in ("fused", "capturable", "differentiable", "maximize", "amsgrad"):
            if group.get(flag):
                reason = "keeps its fused kernel" if flag == "fused" else "is not folded"
                return None, f"{name} with {flag}=True {reason}"
        for key in ("lr", "betas", "weight_decay", "momentum"):
            values = group.get(key, ())
            if any(torch.is_tensor(v) for v in (values if isinstance(values, tuple) else (values,))):
                return None, f"{name} with a tensor {key!r}"
    return kind, ""


@dataclass(frozen=True)
class _Piece:
    """Elements ``[start, start + n * length)`` of a tensor's flat view: an expert
    block of ``n`` rows whose factors are rows ``[row, row + n)`` of the step's
    row factors, or (``n == 0``) a gap ``[start, start + length)`` at factor 1."""

    start: int
    n: int
    length: int
    row: int

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        if self.n == 0:
            return flat[self.start : self.start + self.length]
        return flat[self.start : self.start + self.n * self.length].view(self.n, self.length)


class FoldPlan:
    """Per excited tensor, its blocks and gaps; the ``(layer, expert)`` of every
    block row, as one device index into the flattened ``[L, E]`` multipliers."""

    def __init__(self, blocks: Iterable[SegmentBlock], num_experts: int) -> None:
        by_tensor: dict[int, list[SegmentBlock]] = {}
        self.tensors: dict[int, torch.Tensor] = {}
        for block in blocks:
            by_tensor.setdefault(id(block.tensor), []).append(block)
            self.tensors[id(block.tensor)] = block.tensor
        self.pieces: dict[int, list[_Piece]] = {}
        flat_index = []
        rows = 0
        for key, tensor_blocks in by_tensor.items():
            tensor_blocks.sort(key=lambda b: b.start)
            pieces, cursor = [], 0
            for b in tensor_blocks:
                if b.start > cursor:
                    pieces.append(_Piece(cursor, 0, b.start - cursor, 0))
                pieces.append(_Piece(b.start, b.n, b.length, rows))
                flat_index.append(b.layer_N * num_experts + b.expert_N)
                rows += b.n
                cursor = b.start + b.n * b.length
            numel = self.tensors[key].numel()
            if cursor < numel:
                pieces.append(_Piece(cursor, 0, numel - cursor, 0))
            self.pieces[key] = pieces
        index = torch.cat(flat_index) if flat_index else torch.zeros(0, dtype=torch.int64)
        device = next(iter(self.tensors.values())).device if self.tensors else torch.device("cpu")
        self.row_index_R = index.to(device)  # uploaded once, when the segments are set

    def __contains__(self, tensor: torch.Tensor) -> bool:
        return id(tensor) in self.pieces


class RowFactors:
    """This step's per-row factors, computed once for all blocks from the
    multipliers on their device (a handful of tiny ops per distinct
    hyperparameter set, never one per block)."""

    def __init__(self, phi_LE: torch.Tensor, row_index_R: torch.Tensor) -> None:
        self.phi_R = phi_LE.reshape(-1).index_select(0, row_index_R.to(phi_LE.device))
        self._cache: dict[tuple, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {}

    def _cached(self, key: tuple, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def phi(self, like: torch.Tensor) -> torch.Tensor:
        return self._cached(("phi", like.dtype, like.device), lambda: self.phi_R.to(like.device, like.dtype).unsqueeze(1))

    def decay(self, like: torch.Tensor, lr: float, weight_decay: float) -> torch.Tensor:
        """``1 - phi * lr * wd`` (decoupled weight decay at learning rate phi * lr)."""
        return self._cached(("decay", like.dtype, like.device, lr, weight_decay),
                            lambda: (1.0 - self.phi_R * (lr * weight_decay)).to(like.device, like.dtype).unsqueeze(1))


def _flat(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise RuntimeError("the folded Excitation update needs contiguous optimizer tensors (parameter, grad, state)")
    return t.view(-1)


def step_tensor(kind: str, optimizer: torch.optim.Optimizer, group: dict[str, Any], p: torch.Tensor,
                pieces: list[_Piece], factors: RowFactors) -> None:
    """One excited tensor's update, in the optimizer's own state."""
    with torch.no_grad():
        if kind == "adam":
            _adam(optimizer.state[p], group, p, pieces, factors)
        else:
            _sgd(optimizer.state[p], group, p, pieces, factors)


def _adam(state: dict, group: dict, p: torch.Tensor, pieces: list[_Piece], factors: RowFactors) -> None:
    """torch.optim.Adam/AdamW's single-tensor update (torch 2.x, no amsgrad)
    with learning rate phi * lr on the block rows."""
    if not state:  # torch's own lazy initialization (step on the CPU when neither capturable nor fused)
        scalar_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        state["step"] = torch.tensor(0.0, dtype=scalar_dtype)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    decoupled = group.get("decoupled_weight_decay", False)
    step_t = state["step"]
    step_t += 1
    step = float(step_t)  # a CPU scalar, as torch reads it: no device sync
    grad = p.grad
    flat_p = _flat(p)
    if wd != 0:
        if decoupled:
            for piece in pieces:
                view = piece.view(flat_p)
                if piece.n:
                    view.mul_(factors.decay(p, lr, wd)[piece.row : piece.row + piece.n])
                else:
                    view.mul_(1 - lr * wd)
        else:
            grad = grad.add(p, alpha=wd)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)  # torch's own denominator, bit for bit
    flat_denom = _flat(denom)
    phi = factors.phi(denom)
    for piece in pieces:  # dividing the denominator by phi scales the step by phi; phi = 1 changes no bit,
        if piece.n:  # phi = 0 gives an infinite denominator, hence an update of exactly 0
            piece.view(flat_denom).div_(phi[piece.row : piece.row + piece.n])
    p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def _sgd(state: dict, group: dict, p: torch.Tensor, pieces: list[_Piece], factors: RowFactors) -> None:
    """torch.optim.SGD's single-tensor update with learning rate phi * lr on the block rows."""
    lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
    grad = p.grad
    if wd != 0:
        grad = grad.add(p, alpha=wd)
    if momentum != 0:
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = grad.detach().clone()
            state["momentum_buffer"] = buf
        else:
            buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
        grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
    # torch's own last op is add_(update, alpha=-lr); the block rows take (update * phi) through the same op,
    # so phi = 1 changes no bit (addcmul_ rounds differently). The update is scaled in place when it is this
    # step's temporary, else (the gradient itself, the momentum buffer) through a transient copy of the rows.
    scratch = grad is not p.grad and grad is not state.get("momentum_buffer")
    flat_p, flat_grad = _flat(p), grad.reshape(-1)
    for piece in pieces:
        view, update = piece.view(flat_p), piece.view(flat_grad)
        if piece.n:
            phi = factors.phi(p)[piece.row : piece.row + piece.n]
            update = update.mul_(phi) if scratch else update * phi
        view.add_(update, alpha=-lr)
