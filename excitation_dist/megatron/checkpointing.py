"""Excitation's state inside megatron-core distributed checkpoints (``dist_checkpointing``).

Each pipeline stage holds the controller of its own MoE layers, so the state is
sharded by layer: one ``ShardedObject`` per MoE layer, keyed by the layer's
global layer number (``excitation.layer_NNNN``: its row of the utilization
EMA), and one object for what every stage shares (``excitation.common``: the
step counter, the number of experts and the Excitation config). Every data-,
tensor- and expert-parallel replica of a stage holds the same values after the
step's count all-reduce, so only the first rank of the stage's count group
writes them (``replica_id`` 0) and every rank reads them: a checkpoint written
on one DP / EP / TP / PP layout loads on another.

Used by the recipe's Megatron backend (beside ``model.sharded_state_dict()``
and ``optimizer.sharded_state_dict()``) and by the Megatron-LM entry, which
adds it to the optimizer's sharded state dict (see :func:`wrap_optimizer_state`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist

from excitation_dist.core import Excitation

KEY = "excitation"
COMMON = f"{KEY}.common"  # ShardedObject keys may not contain "/"


def _layer_key(layer_number: int) -> str:
    return f"{KEY}.layer_{layer_number:04d}"


def layer_numbers(layers: list[Any]) -> list[int]:
    """Global (1-based, pipeline offset included) layer number of every MoE layer."""
    numbers = [getattr(layer, "layer_number", None) for layer in layers]
    if any(n is None for n in numbers) or len(set(numbers)) != len(numbers):
        raise RuntimeError(f"MoE layers without distinct global layer numbers ({numbers}); "
                           "cannot key Excitation's checkpoint state by layer")
    return [int(n) for n in numbers]


def _replica(group: Any) -> int:
    if not dist.is_initialized():
        return 0
    return 0 if dist.get_rank(group) == 0 else 1


def sharded_state_dict(excitation: Excitation, layers: list[Any], group: Any = None, *,
                       writes_common: bool | None = None) -> dict[str, Any]:
    """Excitation's state as ``ShardedObject`` s (the same call builds the template for loading).

    ``layers`` are the stage's MoE layers in the controller's order; ``group`` the
    process group of the stage's count all-reduce (its rank 0 writes);
    ``writes_common``: this rank writes ``excitation.common`` (default: global rank 0;
    with a pipeline stage of dense layers only, the attachment's ``writes_common``)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    if writes_common is None:
        writes_common = _global_rank() == 0
    state = excitation.state_dict()
    ema = state["utilization_ema_LE"]
    replica = _replica(group)
    common = {"step": state["step"], "num_experts": excitation.num_experts, "config": state["config"]}
    out: dict[str, Any] = {
        "common": ShardedObject(COMMON, common, (1,), (0,), replica_id=0 if writes_common else 1),
    }
    for i, number in enumerate(layer_numbers(layers)):
        row = None if ema is None else ema[i].clone()
        out[f"layer_{number:04d}"] = ShardedObject(_layer_key(number), {"ema": row}, (1,), (0,), replica_id=replica)
    return out


def _global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def load_loaded_state(excitation: Excitation, loaded: dict[str, Any], layers: list[Any]) -> None:
    """Restore the controller from what ``dist_checkpointing.load`` returned for
    :func:`sharded_state_dict`'s template."""
    common = loaded["common"]
    if common["num_experts"] != excitation.num_experts:
        raise ValueError(f"the checkpoint's Excitation state is for {common['num_experts']} experts per layer, this "
                         f"model has {excitation.num_experts}; load it into the same MoE architecture")
    rows = [loaded[f"layer_{n:04d}"]["ema"] for n in layer_numbers(layers)]
    if all(r is None for r in rows):
        ema = None
    elif any(r is None for r in rows):
        raise ValueError("the checkpoint's Excitation state has a utilization EMA for some MoE layers of this stage "
                         "and not for others; it was not written by one run of this model")
    else:
        ema = torch.stack([r.to(torch.float64) for r in rows])
    excitation.load_state_dict({"step": common["step"], "utilization_ema_LE": ema,
                                "shape": [excitation.num_layers, excitation.num_experts], "config": common["config"]})


def _excitation_objects(checkpoint_dir: str) -> dict[str, Any]:
    """key -> ShardedObject (no data) of every Excitation object a checkpoint holds."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    return {obj.key: obj for obj in load_sharded_metadata(checkpoint_dir).values()
            if getattr(obj, "key", "").startswith(KEY + ".") and not hasattr(obj, "local_shape")}


def saved_excitation_state(checkpoint_dir: str) -> dict[str, Any] | None:
    """The common part of the Excitation state in a ``torch_dist`` checkpoint
    (step, experts, config), or None when the checkpoint holds none. Reads
    metadata and one small object, on any rank, no process group needed."""
    from megatron.core import dist_checkpointing

    metadata = _excitation_objects(checkpoint_dir)
    if COMMON not in metadata:
        return None
    template = {"common": metadata[COMMON]}
    return dist_checkpointing.load(template, checkpoint_dir, validate_access_integrity=False)["common"]


def read_excitation_state(checkpoint_dir: str) -> dict[str, Any] | None:
    """Every Excitation object of a ``torch_dist`` checkpoint: ``{"common": {step,
    num_experts, config}, "layers": {layer number: EMA row or None}}``, or None
    when it holds none (for inspecting a checkpoint; needs a process group)."""
    from megatron.core import dist_checkpointing

    metadata = _excitation_objects(checkpoint_dir)
    if COMMON not in metadata:
        return None
    loaded = dist_checkpointing.load(metadata, checkpoint_dir, validate_access_integrity=False)
    layers = {int(k[len(_layer_key(0)) - 4:]): v["ema"] for k, v in loaded.items() if k.startswith(_layer_key(0)[:-4])}
    return {"common": loaded[COMMON], "layers": dict(sorted(layers.items()))}


def attachment_of(optimizer: Any) -> tuple[Excitation, list[Any]] | None:
    """(controller, MoE layers) attached to a Megatron optimizer, or None."""
    from excitation_dist.megatron.backend import _ATTACHMENT

    attachment = getattr(optimizer, _ATTACHMENT, None)
    return None if attachment is None else (attachment.excitation, attachment.layers)


def _writes_common(optimizer: Any) -> bool:
    """Whether this rank writes ``excitation.common``: the lowest global rank with a
    controller (``attach`` agreed on it; global rank 0 may hold dense layers only)."""
    from excitation_dist.megatron.backend import _ATTACHMENT

    return getattr(optimizer, _ATTACHMENT).writes_common


def check_compatible(saved: dict[str, Any], excitation: Excitation, *, where: str, flag: str) -> None:
    """Refuse to resume Excitation's state into a run whose experts or strategy differ."""
    if saved["num_experts"] != excitation.num_experts:
        raise ValueError(f"{where}: its Excitation state is for {saved['num_experts']} experts per MoE layer, this "
                         f"model has {excitation.num_experts}; resume with the model that wrote it")
    before, now = saved["config"].get("strategy"), excitation.config.strategy
    if before != now:
        raise ValueError(f"{where}: it was trained with Excitation strategy {before!r}, this run asks for {now!r} "
                         f"({flag}); resume with {before!r}, or start a new run in another directory")


# ------------------------------------------------------------ Megatron-LM's training loop
_HOOKS: dict[str, Any] = {}


def _print_once(optimizer: Any, text: str) -> None:
    """Print on the one rank that writes Excitation's common state (the first with MoE layers:
    global rank 0 may hold a pipeline stage of dense layers only)."""
    if _writes_common(optimizer):
        print(text, flush=True)


def _latest_checkpoint(load_dir: str | None) -> str | None:
    """The directory Megatron-LM's ``load_checkpoint`` will read (its tracker file), or None."""
    import os

    if not load_dir:
        return None
    tracker = os.path.join(load_dir, "latest_checkpointed_iteration.txt")
    if not os.path.isfile(tracker):
        return None
    text = open(tracker).read().strip()
    name = "release" if text == "release" else f"iter_{int(text):07d}"
    path = os.path.join(load_dir, name)
    return path if os.path.isdir(path) else None


def install_megatron_lm_hooks(*, require_state: bool, flag: str = "--excitation-strategy") -> None:
    """Make Megatron-LM's own checkpoints (``torch_dist``) carry Excitation's state.

    Wraps three functions of ``megatron.training`` by name (none is copied):
    ``checkpointing.generate_state_dict`` adds ``excitation`` to the state dict it
    builds for a save (and, when the checkpoint has it, to the template of a
    load); ``checkpointing._load_base_checkpoint`` keeps what was loaded for it;
    ``load_checkpoint`` (in both modules) decides before loading whether the checkpoint
    holds Excitation state (``require_state``: refuse if not; else say
    Excitation starts fresh) and restores the controller afterwards. Every
    load with an optimizer also runs inside
    :func:`excitation_dist.megatron.optimizer_state.loading`, which the recipe's
    megatron backend uses too: with torch's own Adam (no Transformer Engine or
    apex) megatron-core's DistributedOptimizer cannot build its load template,
    and after a load all parameters would share one Adam ``step`` tensor."""
    from megatron.training import checkpointing, training

    if _HOOKS:
        return
    generate, load_base, load = (checkpointing.generate_state_dict, checkpointing._load_base_checkpoint,
                                 training.load_checkpoint)
    _HOOKS.update(generate=generate, load_base=load_base, load=load)

    @functools.wraps(generate)
    def generate_state_dict(args: Any, model: Any, optimizer: Any, *a: Any, **kw: Any) -> Any:
        state = generate(args, model, optimizer, *a, **kw)
        attached = attachment_of(optimizer) if optimizer is not None else None
        loading = _HOOKS.get("loading")  # None: a save; else whether the checkpoint holds the state
        if attached is not None and args.ckpt_format == "torch_dist" and loading in (None, True):
            from excitation_dist.megatron import compat

            state[KEY] = sharded_state_dict(*attached, compat.counts_process_group(),
                                            writes_common=_writes_common(optimizer))
        return state

    @functools.wraps(load_base)
    def load_base_checkpoint(*a: Any, **kw: Any) -> Any:
        result = load_base(*a, **kw)
        if kw.get("sharded_state_dict") is not None and isinstance(result[0], dict) and KEY in result[0]:
            _HOOKS["loaded"] = result[0][KEY]
        return result

    @functools.wraps(load)
    def load_checkpoint(ddp_model: Any, optimizer: Any, *a: Any, **kw: Any) -> Any:
        from megatron.training.global_vars import get_args

        from excitation_dist.megatron import optimizer_state

        args = get_args()
        load_dir = getattr(args, kw.get("load_arg", "load"), None)
        if optimizer is None or not load_dir:
            return load(ddp_model, optimizer, *a, **kw)
        with optimizer_state.loading(optimizer):  # torch's Adam: megatron-core's load shares one step tensor
            path, attached = _latest_checkpoint(load_dir), attachment_of(optimizer)
            if path is None or attached is None:
                return load(ddp_model, optimizer, *a, **kw)
            return _load_with_excitation(path, attached, args, ddp_model, optimizer, *a, **kw)

    def _load_with_excitation(path: str, attached: tuple[Excitation, list[Any]], args: Any, ddp_model: Any,
                              optimizer: Any, *a: Any, **kw: Any) -> Any:
        """Megatron-LM's ``load_checkpoint`` of ``path``, with Excitation's state
        checked before and restored after."""
        excitation, layers = attached
        saved = saved_excitation_state(path) if args.ckpt_format == "torch_dist" else None
        if saved is None:
            why = ("holds no Excitation state" if args.ckpt_format == "torch_dist"
                   else f"is in format {args.ckpt_format!r}; Excitation's state is saved only with --ckpt-format torch_dist")
            if require_state:
                raise SystemExit(f"pretrain_gpt: checkpoint {path} {why} and --excitation-require-state is set; load "
                                 "a checkpoint written with Excitation, or drop the flag to start Excitation fresh")
            _print_once(optimizer, f"pretrain_gpt: checkpoint {path} {why}: Excitation starts fresh (step 0, no EMA)")
        else:
            try:
                check_compatible(saved, excitation, where=f"checkpoint {path}", flag=flag)
            except ValueError as exc:
                raise SystemExit(f"pretrain_gpt: {exc}") from None
        _HOOKS["loading"], _HOOKS["loaded"] = saved is not None, None
        try:
            result = load(ddp_model, optimizer, *a, **kw)
        finally:
            _HOOKS.pop("loading", None)
        loaded = _HOOKS.pop("loaded", None)
        if loaded is not None:
            load_loaded_state(excitation, loaded, layers)
            _print_once(optimizer, f"pretrain_gpt: Excitation resumed from {path} at its step {excitation.step}")
        elif saved is not None:  # e.g. --no-load-optim / --finetune: Megatron built no template with our entry
            from megatron.core import dist_checkpointing
            from excitation_dist.megatron import compat

            template = sharded_state_dict(excitation, layers, compat.counts_process_group())
            load_loaded_state(excitation, dist_checkpointing.load(template, path, validate_access_integrity=False),
                              layers)
        return result

    checkpointing.generate_state_dict = generate_state_dict
    checkpointing._load_base_checkpoint = load_base_checkpoint
    checkpointing.load_checkpoint = load_checkpoint  # setup_model_and_optimizer imports it from here when called
    training.load_checkpoint = load_checkpoint


__all__ = ["COMMON", "KEY", "attachment_of", "check_compatible", "install_megatron_lm_hooks", "load_loaded_state",
           "read_excitation_state", "saved_excitation_state", "sharded_state_dict"]
