"""The excited update: what the controller runs inside each base optimizer step.

One interface for both paths. :meth:`ExcitedUpdate.before` runs inside the step
before the base optimizer touches a parameter (from the closure the controller
hands it): the folded path (:mod:`excitation_dist.folded`) steps the excited
tensors at ``lr * phi`` and hides their gradients; the blend path
(:mod:`excitation_dist.blend`) copies the expert rows. :meth:`ExcitedUpdate.after`
runs in the step post-hook: gradients back, rows blended. Both issue a constant
number of operations per parameter group, however many layers and experts.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch

from excitation_dist.blend import Snapshot, blend, snapshot
from excitation_dist.config import ConfigError
from excitation_dist import fused_adams
from excitation_dist.folded import StepCounts, adam_group, fold_kind, fused_adam_group, sgd_group
from excitation_dist.rows import RowPlan, SegmentBlock

logger = logging.getLogger(__name__)


class ExcitedUpdate:
    """Update paths per base optimizer, the expert rows they act on, and this step's row factors."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.plan = RowPlan([], num_experts)
        self._paths: dict[int, str] = {}  # id(base optimizer) -> "folded:<kind>" or "blend"
        self._fused_rules: dict[int, fused_adams.FusedAdamRules] = {}  # id(base optimizer) -> its fused Adam rules
        self._counts = StepCounts()
        self._phi_LE: torch.Tensor | None = None
        self._factors_R: torch.Tensor | None = None
        self._hidden: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._snapshots: list[Snapshot] = []
        self._warned_sparse = False
        self.last_snapshot_bytes = 0
        self.peak_snapshot_bytes = 0

    def set_blocks(self, blocks: Iterable[SegmentBlock]) -> None:
        self.plan = RowPlan(blocks, self.num_experts)
        self._factors_R = None

    # ----------------------------------------------------------------- paths
    def choose_path(self, optimizer: torch.optim.Optimizer, requested: str) -> str:
        """Record and return the path ``optimizer`` takes under ``excitation.update`` = ``requested``."""
        refused = fused_adams.refusal(optimizer)
        if refused:
            raise ConfigError(f"Excitation cannot scale this optimizer's update: {refused}.")
        kind, reason = fold_kind(optimizer)
        if requested == "folded" and kind is None:
            raise ConfigError(
                f"excitation.update: 'folded' needs an optimizer whose update is linear in the learning rate "
                f"(torch.optim.SGD/Adam/AdamW, foreach or fused, without amsgrad, maximize, capturable; DeepSpeed, "
                f"apex or Transformer Engine FusedAdam over fp32 parameters); {reason}. "
                "Use update: auto (or blend), or change the optimizer."
            )
        if kind == "fused_adam":
            self._fused_rules[id(optimizer)] = fused_adams.rules(optimizer)[0]
        name = type(optimizer).__name__
        if requested == "blend" or kind is None:
            if requested == "auto":
                logger.warning("Excitation: %s takes the blend path (a transient copy of the owned expert rows per "
                               "step): %s", name, reason)
            path = "blend"
        else:
            logger.info("Excitation: %s takes the folded path (expert rows stepped at lr * phi)", name)
            path = f"folded:{kind}"
        self._paths[id(optimizer)] = path
        return path

    def path(self, optimizer: torch.optim.Optimizer) -> str:
        return self._paths.get(id(optimizer), "blend")

    @property
    def update_path(self) -> str:
        """``folded``, ``blend``, or ``mixed`` (several base optimizers on different paths)."""
        paths = {path.split(":")[0] for path in self._paths.values()}
        return paths.pop() if len(paths) == 1 else ("mixed" if paths else "none")

    # ------------------------------------------------------------------ step
    def new_step(self, phi_LE: torch.Tensor) -> None:
        """This step's multipliers (``[L, E]`` on their device)."""
        self._phi_LE = phi_LE
        self._factors_R = None
        self.last_snapshot_bytes = 0

    def _factors(self) -> torch.Tensor:
        if self._factors_R is None:
            self._factors_R = self.plan.factors(self._phi_LE)
        return self._factors_R

    def before(self, optimizer: torch.optim.Optimizer) -> None:
        """Inside the step, before the base optimizer touches a parameter."""
        with torch.no_grad():
            path = self.path(optimizer)
            if path.startswith("folded:"):
                self._folded(optimizer, path.split(":")[1])
            else:
                stepped = [p for group in optimizer.param_groups for p in group["params"]]
                self._snapshot(stepped)

    def after(self) -> None:
        """The step post-hook: gradients back, snapshotted rows blended."""
        for p, grad in self._hidden:
            p.grad = grad
        self._hidden.clear()
        with torch.no_grad():
            for snap in self._snapshots:
                blend(snap, self._factors())
        self._snapshots.clear()

    def discard(self) -> None:
        """Forget this call's hidden gradients and snapshots (the step failed)."""
        self._hidden.clear()
        self._snapshots.clear()

    def _folded(self, optimizer: torch.optim.Optimizer, kind: str) -> None:
        """Step every excited tensor of this call at lr * phi, one parameter group at a time."""
        sparse = []
        for group in optimizer.param_groups:
            members = []
            for p in group["params"]:
                if p in self.plan and p.grad is not None:
                    (sparse if p.grad.is_sparse else members).append(p)
            if not members:
                continue
            if kind == "adam":
                adam_group(optimizer, group, members, self.plan, self._factors(), self._counts)
            elif kind == "fused_adam":
                fused_adam_group(optimizer, group, members, self.plan, self._factors(),
                                 self._fused_rules[id(optimizer)])
            else:
                sgd_group(optimizer, group, members, self.plan, self._factors())
            for p in members:
                self._hidden.append((p, p.grad))
                p.grad = None
        if sparse:  # the base optimizer steps them; the blend scales their update
            if not self._warned_sparse:
                self._warned_sparse = True
                logger.warning("Excitation: expert tensors with sparse gradients take the blend path (a transient "
                               "copy of their rows per step)")
            self._snapshot(sparse)

    def _snapshot(self, stepped: list[torch.Tensor]) -> None:
        snap = snapshot(self.plan, stepped, self._factors())
        if snap is not None:
            self._snapshots.append(snap)
            self.last_snapshot_bytes += snap.nbytes
            self.peak_snapshot_bytes = max(self.peak_snapshot_bytes, self.last_snapshot_bytes)
