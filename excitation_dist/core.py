"""The distributed Excitation controller. Framework-agnostic.

One object per model (per pipeline stage). Per optimizer step it

1. accumulates tokens per (MoE layer, global expert) into one ``[L, E]`` buffer
   over all micro-batches (:meth:`Excitation.record`);
2. issues ONE SUM all-reduce of that buffer over the ranks that hold distinct
   tokens (:meth:`Excitation.reduce_counts_async`), as soon as the caller knows
   the counts are final, and waits for it only when the optimizer step starts;
3. turns the global counts into multipliers ``phi_LE`` (:mod:`strategies`);
4. inside the optimizer step (after its pre-hooks and its closure), steps the
   registered expert slices at ``lr * phi`` (the folded path, :mod:`folded`), or
   snapshots them and, in the post-hook, blends ``new = old + phi * (stepped - old)``
   on them (the blend path, :mod:`blend`).

"Where are counts reduced" is :meth:`reduce_counts_async`; "where is the update
scaled" is :class:`excitation_dist.update.ExcitedUpdate` (:mod:`folded`, :mod:`blend`). Every
backend uses these two.

Backends translate their framework into :class:`ExpertSegment` s: slices of the
tensors the base optimizer actually steps (a full parameter, one expert of a
stacked parameter, or the piece of a ZeRO / distributed-optimizer fp32 shard
that belongs to one expert).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.distributed as dist

from excitation_dist.config import ConfigError, ExcitationConfig, as_config
from excitation_dist.metrics import flat_metrics
from excitation_dist.rows import build_blocks, local_tensor
from excitation_dist.update import ExcitedUpdate
from excitation_dist.strategies import multipliers, shape_multipliers, utilization

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpertSegment:
    """Elements ``[start, end)`` of ``tensor.view(-1)`` belong to ``expert``
    (global index) of MoE layer ``layer`` (0-based, in this controller's order).

    ``tensor`` must be the very tensor the base optimizer steps (a parameter, or
    a flat fp32 master partition), so that the step hooks can tell whether it is
    being stepped. For a DTensor the offsets are into its local shard
    (:func:`excitation_dist.rows.local_tensor`), the elements this rank updates.
    """

    tensor: torch.Tensor
    start: int
    end: int
    layer: int
    expert: int


def in_backward() -> bool:
    """True while autograd runs a backward pass (where activation recompute happens)."""
    return torch._C._current_graph_task_id() != -1


def in_nonreentrant_recompute() -> bool:
    """True while ``torch.utils.checkpoint(use_reentrant=False)`` recomputes a
    forward in backward. Its original forward ran with grad enabled and was
    counted, so the recompute must not consume an uncounted (reentrant) original.
    torch marks the recompute only by its saved-tensor hooks (``_recomputation_hook``,
    torch 2.1-2.13); an unknown torch reads as False (the recompute is then
    matched against pending reentrant originals, as before this check existed)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return False
    hooks = top(True)
    return hooks is not None and "_recomputation_hook" in getattr(hooks[0], "__qualname__", "")


def collective_device(process_group: dist.ProcessGroup | None) -> torch.device:
    """The device a collective over ``process_group`` needs its tensors on: the
    current CUDA device when the group's backend is NCCL, else the CPU (gloo,
    or no initialized process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    backend = str(dist.get_backend(process_group)).lower()
    if backend == "nccl" or ("nccl" in backend and "gloo" not in backend):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _Phase(enum.Enum):
    COUNTING = "counting"  # micro-batches are adding counts
    REDUCING = "reducing"  # the all-reduce was issued; counts are frozen
    READY = "ready"  # multipliers computed for the current optimizer step


class Excitation:
    """Counts tokens per expert, reduces them once per step, and scales the
    optimizer's update of expert slices by the Excitation multipliers.

    Args:
        config: :class:`ExcitationConfig` or a mapping of its fields.
        num_layers: L, the number of MoE layers this controller covers.
        num_experts: E, global routed experts per layer.
        process_group: group of the ranks holding distinct tokens for these
            layers (data x context x sequence-parallel-tensor; equivalently
            expert-parallel x expert-data-parallel). ``None`` with an
            initialized default group means the whole world.
        reduce: all-reduce the counts (default: when torch.distributed is
            initialized and the group has more than one rank).
        device: device of the count buffer. Default: the device the group's
            collective backend runs on (the current CUDA device for NCCL, the
            CPU for gloo; :func:`collective_device`); without a reduction, the
            device of the first counts recorded.
    """

    def __init__(
        self,
        config: ExcitationConfig | Mapping[str, Any] | None,
        num_layers: int,
        num_experts: int,
        process_group: dist.ProcessGroup | None = None,
        *,
        reduce: bool | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if num_layers <= 0 or num_experts <= 0:
            raise ValueError(f"need at least one MoE layer and one expert, got L={num_layers}, E={num_experts}")
        self.config = as_config(config)
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.process_group = process_group
        if reduce is None:
            reduce = dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1
        self.reduce = reduce
        # The count buffer lives where the collective runs; without a reduction, where the first counts arrive.
        self._device_fixed = device is not None or reduce
        if device is not None:
            self.device = torch.device(device)
        else:
            self.device = collective_device(process_group) if reduce else torch.device("cpu")

        self._counts_LE = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=self.device)
        self._phase = _Phase.COUNTING
        self._pending: dist.Work | None = None
        self._segments: list[ExpertSegment] = []
        self._update = ExcitedUpdate(num_experts)  # the update paths (folded, blend) and the rows they act on
        self._closures_owed: set[int] = set()  # optimizers handed our closure this step, not yet called
        self._hook_handles: list[Any] = []
        # Host-side tallies per layer for this step (Python ints: no device sync), see count_this_forward().
        self._counted_forwards_L = [0] * num_layers
        self._uncounted_recomputes_L = [0] * num_layers
        self._uncounted_originals_L = [0] * num_layers

        self.step = 0  # optimizer steps that computed multipliers (excluding skipped steps)
        self.utilization_ema_LE: torch.Tensor | None = None
        # On the counts' device; read them on the host only when logging (metrics()).
        self.last_counts_LE = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=self.device)
        self.last_multipliers_LE = torch.ones(num_layers, num_experts, dtype=torch.float64, device=self.device)
        self.count_collectives_issued = 0

    # ---------------------------------------------------------------- counts
    def record(self, layer: int, tokens_per_expert_E: torch.Tensor) -> None:
        """Add one micro-batch's tokens per global expert of ``layer``.

        Call only for training forwards (not evaluation, not activation
        recompute); the backends' guards do that.
        """
        if self._phase is _Phase.READY:
            self.end_step()  # the previous optimizer step is over
        if self._phase is _Phase.REDUCING:
            raise RuntimeError(
                "Excitation counts were recorded after this step's count all-reduce was issued; "
                "call reduce_counts_async() only after the last micro-batch's forward (with DDP: run every "
                "micro-batch but the last under model.no_sync(), or attach(..., overlap=False))"
            )
        if tokens_per_expert_E.shape != (self.num_experts,):
            raise ValueError(
                f"layer {layer}: expected counts of shape [{self.num_experts}], got {tuple(tokens_per_expert_E.shape)}"
            )
        if not self._device_fixed:
            self._device_fixed = True
            self.device = tokens_per_expert_E.device
            self._counts_LE = self._counts_LE.to(self.device)
        self._counts_LE[layer].add_(tokens_per_expert_E.to(self._counts_LE.device, torch.int64))

    def count_this_forward(self, layer: int, training: bool) -> bool:
        """Decide whether a routing forward of ``layer`` counts, and remember it.

        Every backend's counter asks this (the one backward guard of the project):

        * evaluation (``training`` False): never counted;
        * a forward outside backward with grad enabled: counted (the usual case,
          and the original forward of non-reentrant activation checkpointing);
        * a training-mode forward outside backward under ``no_grad``: not counted
          now, remembered as one *uncounted original* of the layer (reentrant
          checkpointing: ``torch.utils.checkpoint(use_reentrant=True)``,
          DeepSpeed's and megatron's checkpoint functions run the original
          forward so);
        * a recompute inside backward of a non-reentrant checkpoint (its original
          ran with grad and was counted): only tallied;
        * any other forward inside backward (a reentrant recompute): counted when
          it replays one of the layer's uncounted originals, else only tallied.

        Uncounted originals are kept per forward, not per layer: a reentrant-
        checkpointed micro-batch followed by plain ones in the same step (Megatron's
        partial activation checkpointing, 1F1B warm-up forwards) still counts the
        checkpointed one at its recompute. Originals never replayed by the step's
        end are dropped. All bookkeeping is in Python integers: no device sync.
        """
        if not training:
            return False
        if in_backward():  # an activation recompute
            if torch.is_grad_enabled() and not in_nonreentrant_recompute() and self._uncounted_originals_L[layer] > 0:
                self._uncounted_originals_L[layer] -= 1
                self._counted_forwards_L[layer] += 1
                return True
            self._uncounted_recomputes_L[layer] += 1
            return False
        if torch.is_grad_enabled():
            self._counted_forwards_L[layer] += 1
            return True
        self._uncounted_originals_L[layer] += 1
        return False

    def hook_router(
        self, layer: int, module: torch.nn.Module, tokens_per_expert: Callable[[tuple, dict, Any], torch.Tensor]
    ) -> Any:
        """Count ``module``'s routing as Excitation layer ``layer``: a forward hook
        that, for each forward :meth:`count_this_forward` admits, records
        ``tokens_per_expert(args, kwargs, output)`` (int ``[E]`` on the router's
        device). The one place where every backend's counting is wired. Returns
        the hook's handle (``.remove()`` unhooks it)."""

        def count(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self.count_this_forward(layer, module.training):
                self.record(layer, tokens_per_expert(args, kwargs, output))

        return module.register_forward_hook(count, with_kwargs=True)

    def counts_final(self) -> bool:
        """False while some layer still owes a recompute that will be counted in
        backward (reentrant checkpointing): the count all-reduce must wait."""
        return not any(self._uncounted_originals_L)

    def reduce_counts_async(self, *, final: bool = False) -> None:
        """Issue this step's single count all-reduce now (non-blocking).

        Call when the counts are final (after the last micro-batch's forward)
        to overlap the collective with backward; otherwise the optimizer step
        issues it (``final=True``). An early call while a layer still awaits its
        counted recompute (:meth:`counts_final` False) is deferred to the step.
        Calling it again in the same step does nothing.
        """
        if self._phase is not _Phase.COUNTING or (not final and not self.counts_final()):
            return
        if self.reduce:
            self._pending = dist.all_reduce(self._counts_LE, op=dist.ReduceOp.SUM, group=self.process_group, async_op=True)
            self.count_collectives_issued += 1
        self._phase = _Phase.REDUCING

    def skip_step(self) -> None:
        """The framework skipped this optimizer step (for example fp16 overflow):
        apply nothing and drop the counts. Collective order is kept."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
        self._update.discard()
        self._reset_counts()

    def end_step(self) -> None:
        """The optimizer step is complete; the next record() starts a new step."""
        if self._phase is _Phase.READY:
            self._reset_counts()

    def finish_step(self, applied: bool) -> None:
        """For backends that wrap their framework's step: end the step if the
        framework applied it and the base optimizer really ran (its pre-hook
        computed this step's multipliers), else :meth:`skip_step` (nothing
        applied, counts dropped). A wrapper can call a step applied that never
        reached the base optimizer: a GradScaler that skipped it on overflow
        (DeepSpeed ZeRO-0 with ``torch_autocast`` fp16), or a rank whose base
        optimizer has nothing to step."""
        if applied and self._phase is _Phase.READY:
            self.end_step()
        else:
            self.skip_step()

    def _reset_counts(self) -> None:
        self._counts_LE.zero_()
        for tally in (self._counted_forwards_L, self._uncounted_recomputes_L, self._uncounted_originals_L):
            tally[:] = [0] * self.num_layers
        self._phase = _Phase.COUNTING

    # ----------------------------------------------------------- multipliers
    def _finalize(self) -> None:
        self._check_every_layer_counted()
        self.reduce_counts_async(final=True)
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
        self.last_counts_LE = self._counts_LE.detach().clone()
        self.last_multipliers_LE = self.compute_multipliers(self.last_counts_LE)
        self._update.new_step(self.last_multipliers_LE)
        self.step += 1
        self._phase = _Phase.READY

    def _check_every_layer_counted(self) -> None:
        """Refuse a step in which a layer ran only recomputes that replayed no
        uncounted original: its tokens would be silently missing (phi = 1)."""
        missing = [layer for layer in range(self.num_layers)
                   if self._uncounted_recomputes_L[layer] and not self._counted_forwards_L[layer]]
        if missing:
            raise RuntimeError(
                f"Excitation counted no forward of MoE layer(s) {missing} this step: they ran only as activation "
                "recompute inside backward, and no original forward of theirs was seen in training mode. Run the "
                "original forward with the model in train() mode, through torch.utils.checkpoint (either "
                "use_reentrant setting) or the framework's checkpoint function, so that each token is counted once."
            )

    def compute_multipliers(self, counts_LE: torch.Tensor) -> torch.Tensor:
        """Multipliers for this step's global counts, with the configured
        smoothing, shaping and warm-up (advances the utilization EMA). float64
        ``[L, E]`` on the counts' device; nothing is read on the host."""
        cfg = self.config
        active_L1 = counts_LE.sum(-1, keepdim=True) > 0
        source = counts_LE
        if cfg.utilization_ema > 0:
            u = utilization(counts_LE)
            if self.utilization_ema_LE is None:
                self.utilization_ema_LE = u
            else:
                blended = cfg.utilization_ema * self.utilization_ema_LE + (1 - cfg.utilization_ema) * u
                has_history = self.utilization_ema_LE.sum(-1, keepdim=True) > 0
                self.utilization_ema_LE = torch.where(active_L1, torch.where(has_history, blended, u), self.utilization_ema_LE)
            source = self.utilization_ema_LE
        generator = None
        if cfg.strategy == "random":
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
        phi = multipliers(source, cfg.strategy, cfg.gamma, generator=generator, validate=False)
        warmup = min(1.0, self.step / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
        phi = shape_multipliers(
            phi,
            floor=cfg.floor,
            ceiling=cfg.ceiling,
            renormalize_energy=cfg.renormalize_energy,
            warmup_fraction=warmup,
        )
        return torch.where(active_L1, phi, torch.ones_like(phi))

    # -------------------------------------------------------------- segments
    def set_segments(self, segments: Iterable[ExpertSegment]) -> None:
        """Replace the registered expert slices (rebuild after a checkpoint load
        or anything else that re-creates the optimizer's tensors)."""
        segments = list(segments)
        for s in segments:
            local = local_tensor(s.tensor)  # a DTensor's local shard; any other tensor itself
            if not 0 <= s.layer < self.num_layers or not 0 <= s.expert < self.num_experts:
                raise ValueError(f"segment (layer {s.layer}, expert {s.expert}) outside [{self.num_layers}, {self.num_experts}]")
            if not 0 <= s.start < s.end <= local.numel():
                raise ValueError(f"segment [{s.start}, {s.end}) outside a tensor of {local.numel()} elements")
            if not local.is_contiguous():
                raise ValueError("expert segments must live in contiguous tensors (the optimizer's flat view)")
        self._update.set_blocks(build_blocks(segments))
        self._segments = segments

    @property
    def segments(self) -> list[ExpertSegment]:
        return list(self._segments)

    def owned_expert_numel(self) -> int:
        """Elements of expert parameters this rank steps (its owned slices)."""
        return sum(s.end - s.start for s in self._segments)

    # ------------------------------------------------------- optimizer hooks
    def hook_optimizer(self, optimizer: torch.optim.Optimizer, *, end_step_after: bool = True) -> None:
        """Hook the base torch optimizer's step and choose its update path
        (``config.update``; see :mod:`excitation_dist.folded`).

        The excited update runs *inside* ``step()``, after every step pre-hook
        and after the step's closure: the pre-hook only hands the optimizer a
        closure of ours (wrapping the caller's, if any), which the optimizer calls
        before it touches a parameter. So gradient clipping or logging pre-hooks
        registered after attach see and change the expert gradients the update
        uses, and a closure that runs the forward and backward (Lightning's
        automatic optimization, NeMo) is counted in the step it belongs to.
        Without a closure, the blend path snapshots in the pre-hook (a snapshot of
        parameters does not depend on gradients). Our post-hook runs before the
        post-hooks registered earlier, so every post-hook sees the gradients back.

        ``end_step_after``: the post-hook also ends the step. Pass False when the
        wrapper steps the base optimizer once per parameter group (ZeRO) and
        call :meth:`end_step` after the whole step instead.
        """
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ConfigError(
                "torch.optim.LBFGS evaluates its closure several times per step (line search): Excitation counts "
                "the tokens of one forward per optimizer step. Use a first-order optimizer (SGD, Adam, AdamW, ...)."
            )
        self._update.choose_path(optimizer, self.config.update)
        pre = optimizer.register_step_pre_hook(self._step_pre_hook)

        def post(opt, args, kwargs):
            self._post_step(opt)
            if end_step_after:
                self.end_step()

        post_handle = optimizer.register_step_post_hook(post)
        hooks = getattr(optimizer, "_optimizer_step_post_hooks", None)  # torch's OrderedDict of post-hooks
        if hooks is not None and post_handle.id in hooks:
            hooks.move_to_end(post_handle.id, last=False)
        self._hook_handles += [pre, post_handle]

    @property
    def update_path(self) -> str:
        """``folded``, ``blend``, or ``mixed`` (several base optimizers on different paths)."""
        return self._update.update_path

    @property
    def last_snapshot_bytes(self) -> int:
        """Bytes the blend path copied in the last step (0 on the folded path)."""
        return self._update.last_snapshot_bytes

    @property
    def peak_snapshot_bytes(self) -> int:
        return self._update.peak_snapshot_bytes

    def remove_hooks(self) -> None:
        for h in self._hook_handles:
            h.remove()
        self._hook_handles.clear()

    def _step_pre_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> tuple | None:
        """Step pre-hook: hand the optimizer our closure (folded path, or any
        step called with a closure); else prepare the blend now."""
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        folded = self._update.path(optimizer).startswith("folded:")
        if closure is None and not folded:
            # the blend path without a closure: snapshot now (many optimizers take a closure argument and never
            # call it; a snapshot of parameters does not depend on the gradients later pre-hooks may change)
            self._prepare_update(optimizer)
            return None
        excited = self._excited_closure(optimizer, closure)
        return args[:1], {**kwargs, "closure": excited}

    def _excited_closure(self, optimizer: torch.optim.Optimizer, closure: Callable | None) -> Callable:
        """The closure the optimizer calls first thing in its step: the caller's
        closure (forward and backward: its counts belong to this step), then the
        multipliers and the excited update."""
        calls = 0

        def excited_closure():
            nonlocal calls
            calls += 1
            if calls > 1:
                raise RuntimeError(
                    f"{type(optimizer).__name__}.step() called its closure more than once: Excitation counts the "
                    "tokens of one forward per optimizer step and cannot scale a step that re-evaluates the model "
                    "(line search). Use an optimizer that calls the closure once (torch.optim SGD/Adam/AdamW do)."
                )
            loss = closure() if closure is not None else None
            self._prepare_update(optimizer)
            return loss

        self._closures_owed.add(id(optimizer))
        return excited_closure

    def _prepare_update(self, optimizer: torch.optim.Optimizer) -> None:
        """Inside the step, before the base optimizer touches a parameter:
        finalize the multipliers once per step; then step the excited tensors at
        lr * phi and hide their gradients (folded), or copy the rows to blend."""
        self._closures_owed.discard(id(optimizer))
        if self._phase is not _Phase.READY:
            self._finalize()
        if self.config.active:
            self._update.before(optimizer)

    def _post_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Post-step: give the folded tensors their gradients back; blend the rest."""
        if id(optimizer) in self._closures_owed:
            self._closures_owed.discard(id(optimizer))
            self._update.discard()
            raise RuntimeError(
                f"{type(optimizer).__name__}.step() did not call its closure, where Excitation's update runs: this "
                "step was applied without Excitation. Pass excitation update: blend for this optimizer."
            )
        self._update.after()

    # ------------------------------------------------------------ reporting
    def metrics(self, prefix: str = "excitation", per_layer: bool = True) -> dict[str, float]:
        """Scalars of the last step: utilization and multiplier statistics summarized
        over layers (and, with ``per_layer``, of every layer), snapshot bytes and the
        step counter. Reads counts and multipliers on the host: two device-to-host copies."""
        out = flat_metrics(self.last_counts_LE.cpu(), self.last_multipliers_LE.cpu(), prefix, per_layer)
        out[f"{prefix}/snapshot_bytes"] = float(self.last_snapshot_bytes)
        out[f"{prefix}/step"] = float(self.step)
        return out

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the step counter (warm-up, random control)
        and the utilization EMA. Counts are per step and are not saved."""
        return {
            "step": self.step,
            "utilization_ema_LE": None if self.utilization_ema_LE is None else self.utilization_ema_LE.cpu().clone(),
            "shape": [self.num_layers, self.num_experts],
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        shape = list(state.get("shape", []))
        if shape != [self.num_layers, self.num_experts]:
            raise ValueError(
                f"Excitation checkpoint is for [layers, experts] = {shape}, this model has "
                f"[{self.num_layers}, {self.num_experts}]; load it into the same MoE architecture"
            )
        self.step = int(state["step"])
        ema = state.get("utilization_ema_LE")
        self.utilization_ema_LE = None if ema is None else ema.to(self._counts_LE.device, torch.float64).clone()
        self._reset_counts()
