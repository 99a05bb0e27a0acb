"""Megatron-LM GPT(-MoE) pretraining with Excitation (megatron-core 0.19.x, ``megatron.training``).

    torchrun --nproc-per-node 8 -m excitation_dist.recipe.pretrain_gpt \\
        <the usual Megatron-LM GPT arguments: --num-layers ... --num-experts 8 ...> \\
        --excitation-strategy positivesum --excitation-gamma 1.0

Runs ``megatron.training.pretrain`` unchanged. Excitation is enabled by
``--excitation-strategy`` (the other ``--excitation-*`` flags are the fields of
:class:`ExcitationConfig`) and attached by wrapping
``megatron.training.training.get_megatron_optimizer``, which the loop looks up by
name when it builds the optimizer: no Megatron-LM code is copied or forked.
On Megatron's logging iterations (``--log-interval``) Excitation's statistics
summarized over layers go to Megatron-LM's own writers, TensorBoard
(``--tensorboard-dir``) and Weights & Biases (``--wandb-project``), and each layer's
every ``--excitation-log-layer-interval`` iterations (the last rank's writers; with
pipeline parallelism that is the last stage's layers). Checkpoints
(``--save`` / ``--load``, torch_dist) carry Excitation's state
(:mod:`excitation_dist.megatron.checkpointing`; ``--excitation-require-state``).
Data: ``--mock-data`` gives the random-token dataset below; otherwise
Megatron's GPTDataset from ``--data-path``. On a machine without a GPU the
CPU patches (``patches/megatron_cpu``) are applied first. The recipe's own
megatron-core loop (``excitation-dist train``, ``backend: megatron``) is
:mod:`excitation_dist.recipe.backends.megatron`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch

from excitation_dist.config import ExcitationConfig

_FLAG = "--excitation-"
_STATE: dict[str, Any] = {}


# ------------------------------------------------------------- arguments
def add_excitation_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--excitation-<field>`` for every field of :class:`ExcitationConfig`
    (``extra_args_provider`` of Megatron's argument parser)."""
    group = parser.add_argument_group("excitation", "Excitation (arXiv 2602.21798); off unless --excitation-strategy")
    group.add_argument(_FLAG + "log-layer-interval", type=int, default=None,
                       help="iterations between per-layer Excitation statistics (a multiple of --log-interval; "
                            "default: every logged iteration); the summaries over layers go out every logged iteration")
    defaults = ExcitationConfig()
    for f in dataclasses.fields(ExcitationConfig):
        flag, default = _FLAG + f.name.replace("_", "-"), getattr(defaults, f.name)
        if f.name == "strategy":
            group.add_argument(flag, default=None, help="enable Excitation with this strategy (zerosum, positivesum, ...)")
        elif isinstance(default, bool):
            group.add_argument(flag, action="store_true", help=f"ExcitationConfig.{f.name}")
        elif f.name in ("floor", "ceiling"):
            group.add_argument(flag, type=float, default=None, help=f"ExcitationConfig.{f.name}")
        else:
            group.add_argument(flag, type=type(default), default=default, help=f"ExcitationConfig.{f.name} (default {default})")
    group.add_argument(_FLAG + "require-state", action="store_true",
                       help="when --load finds a checkpoint without Excitation's state, refuse instead of starting "
                            "Excitation fresh")
    return parser


def check_excitation_flags(argv: list[str]) -> None:
    """Check the ``--excitation-*`` flags of ``argv`` before Megatron parses its own (whose
    error, printed by every rank, is Megatron's whole usage): an unknown flag (with the
    closest one), a bad value or an invalid configuration exits with one line, on rank 0."""
    import difflib

    parser = add_excitation_args(argparse.ArgumentParser(prog="pretrain_gpt", add_help=False, exit_on_error=False))
    known = sorted(o for a in parser._actions for o in a.option_strings)
    ours = [a for a in argv if a.startswith(_FLAG)]
    problem = None
    for arg in ours:
        flag = arg.split("=", 1)[0]
        if flag not in known:
            close = difflib.get_close_matches(flag, known, n=1)
            problem = (f"unknown flag {flag}" + (f" (did you mean {close[0]}?)" if close else "")
                       + f"; the Excitation flags are {', '.join(known)}")
            break
    if problem is None:
        values = []
        for i, arg in enumerate(argv):  # the flags and the values that follow them
            if arg.startswith(_FLAG):
                values.append(arg)
                if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                    values.append(argv[i + 1])
        try:
            excitation_config_from_args(parser.parse_known_args(values)[0])
        except (argparse.ArgumentError, ValueError) as exc:  # ConfigError is a ValueError
            problem = str(exc)
    if problem is not None:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"pretrain_gpt: {problem}", file=sys.stderr, flush=True)
        raise SystemExit(2)


def excitation_config_from_args(args: argparse.Namespace) -> ExcitationConfig | None:
    if getattr(args, "excitation_strategy", None) is None:
        return None
    return ExcitationConfig(**{f.name: getattr(args, f"excitation_{f.name}") for f in dataclasses.fields(ExcitationConfig)})


# ------------------------------------------------------------ integration
def install_excitation(config: ExcitationConfig, *, require_state: bool = False) -> None:
    """Wrap ``megatron.training.training.get_megatron_optimizer`` so that the
    optimizer Megatron-LM builds comes back with Excitation attached, and
    Megatron-LM's checkpointing so that its torch_dist checkpoints carry
    Excitation's state (:mod:`excitation_dist.megatron.checkpointing`)."""
    from megatron.training import training

    from excitation_dist.megatron import checkpointing, compat
    from excitation_dist.megatron.backend import attach

    compat.check_version()
    build = getattr(training, "get_megatron_optimizer", None)
    if build is None or not callable(build):
        raise RuntimeError("megatron.training.training has no get_megatron_optimizer; this Megatron-LM loop is not supported")

    def get_megatron_optimizer_with_excitation(opt_config: Any, model_chunks: Any, *args: Any, **kwargs: Any) -> Any:
        optimizer = build(opt_config, model_chunks, *args, **kwargs)
        _STATE["excitation"] = attach(model_chunks, optimizer, config)
        if _STATE["excitation"] is not None:  # None: a pipeline stage without MoE layers
            _log_metrics_on_logging_steps(optimizer, _STATE["excitation"])
        return optimizer

    training.get_megatron_optimizer = get_megatron_optimizer_with_excitation
    checkpointing.install_megatron_lm_hooks(require_state=require_state)


def _log_metrics_on_logging_steps(optimizer: Any, excitation: Any) -> None:
    step = optimizer.step

    def step_and_log(*args: Any, **kwargs: Any) -> Any:
        result = step(*args, **kwargs)
        from megatron.training.global_vars import get_args, get_tensorboard_writer, get_wandb_writer

        from excitation_dist.recipe.metrics_log import TensorBoardScalars, WandbScalars, layers_due

        # Megatron-LM's writers (on its last rank), which Megatron-LM closes itself
        writers = [cls(writer, owned=False) for cls, writer in ((TensorBoardScalars, get_tensorboard_writer()),
                                                                 (WandbScalars, get_wandb_writer())) if writer is not None]
        args = get_args()
        iteration = getattr(args, "curr_iteration", excitation.step) + 1
        # metrics() reads counts and multipliers on the host: only on Megatron's logging iterations
        if writers and excitation.step > 0 and iteration % max(1, getattr(args, "log_interval", 1)) == 0:
            per_layer = layers_due(iteration, getattr(args, "excitation_log_layer_interval", None))
            scalars = excitation.metrics(per_layer=per_layer)
            for writer in writers:
                writer.write(iteration, scalars)
        return result

    optimizer.step = step_and_log


def excitation() -> Any:
    """The controller of this process (after the optimizer was built); None on a
    pipeline stage without MoE layers (dense first layers, ``--moe-layer-freq``)."""
    return _STATE.get("excitation")


# ------------------------------------------------------------------ data
class RandomTokens(torch.utils.data.Dataset):
    """``num_samples`` sequences of uniform random tokens, sample ``i`` seeded by ``i``
    (identical on every rank; Megatron's sampler gives each DP rank its own indices)."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int) -> None:
        self.num_samples, self.seq_length, self.vocab_size, self.seed = num_samples, seq_length, vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        text = torch.randint(0, self.vocab_size, (self.seq_length + 1,), generator=g)
        return {
            "tokens": text[:-1],
            "labels": text[1:],
            "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
            "position_ids": torch.arange(self.seq_length),
        }


def datasets_provider(train_val_test_num_samples: list[int], vp_stage: int | None = None):
    from megatron.training import get_args

    args = get_args()
    if not args.mock_data:
        return _gpt_datasets(train_val_test_num_samples, args)
    vocab = args.padded_vocab_size
    return tuple(RandomTokens(max(int(n), 1), args.seq_length, vocab, args.seed + split)
                 for split, n in enumerate(train_val_test_num_samples))


datasets_provider.is_distributed = True  # every rank builds its own (cheap) dataset


def _gpt_datasets(num_samples: list[int], args: argparse.Namespace):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.training import get_tokenizer
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend, blend_per_split=blend_per_split,
        split=args.split, path_to_cache=args.data_cache_path, tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids, reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
    )
    return BlendedMegatronDatasetBuilder(GPTDataset, num_samples, lambda: True, config).build()


# ---------------------------------------------------------------- model step
def _loss(loss_mask: torch.Tensor, output: torch.Tensor):
    mask = loss_mask.reshape(-1).float()
    loss = torch.sum(output.reshape(-1).float() * mask)
    num_tokens = mask.sum().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.detach().view(1), num_tokens.view(1).float()])}


def forward_step(data_iterator: Any, model: Any, return_schedule_plan: bool = False):
    batch = next(data_iterator) if data_iterator is not None else None
    device = next(model.parameters()).device
    if batch is None:  # a middle pipeline stage: its input comes from the previous stage
        return model(None, None, None), partial(_loss, torch.ones(1, device=device))
    batch = {k: v.to(device) for k, v in batch.items()}
    seq = batch["tokens"].shape[1]
    causal = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool, device=device), diagonal=1)
    output = model(batch["tokens"], batch["position_ids"], causal, labels=batch["labels"], loss_mask=batch["loss_mask"])
    return output, partial(_loss, batch["loss_mask"])


# ------------------------------------------------------------------- main
def _skip_dataset_helper_build() -> None:
    """``initialize_megatron`` compiles Megatron's C++ dataset index helpers
    (pybind11, make) on rank 0; :class:`RandomTokens` does not use them."""
    from megatron.core.datasets import utils

    utils.compile_helpers = lambda: None


# Megatron-LM flags a CPU run needs (gloo, no Transformer Engine, no fused CUDA kernels); put before the
# user's own flags, so that an explicit flag of the user still wins. Both bias-activation fusions are off:
# Megatron-LM sets TransformerConfig.bias_activation_fusion from --bias-swiglu-fusion with --swiglu, else
# from --bias-gelu-fusion (on unless --disable-bias-linear), and with it on megatron-core's expert MLP
# refuses GeLU ("Only support fusion of swiglu and quick_gelu with per_token_scale").
CPU_ARGS = [
    "--distributed-backend", "gloo", "--transformer-impl", "local", "--use-cpu-initialization", "--num-workers", "0",
    "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-dropout-fusion",
    "--no-bias-swiglu-fusion", "--no-bias-gelu-fusion", "--no-rope-fusion", "--no-persist-layer-norm",
]
# (flag a user may pass, why it cannot run on CPU): said once at start, as the recipe's fast-path report does
_CPU_ONLY_FALLBACKS = {
    "--moe-grouped-gemm": "grouped GEMM kernels need CUDA; megatron-core runs the experts one by one (SequentialMLP)",
    "--use-flash-attn": "flash attention needs CUDA; megatron-core's local attention runs instead",
}


def cpu_fallbacks(argv: list[str]) -> list[tuple[str, str]]:
    """(setting, reason) for what a CPU run of ``pretrain_gpt`` turns off or replaces: the CPU flag
    set (Transformer Engine, NCCL, the CUDA fusions) and the GPU-only flags in ``argv``."""
    out = [("--transformer-impl local", "Transformer Engine needs CUDA"),
           ("--distributed-backend gloo", "NCCL needs GPUs"),
           ("fusions off", "gradient-accumulation, masked-softmax, bias-dropout, bias-swiglu, bias-gelu and rope "
                           "fusions are CUDA kernels")]
    given = {a.split("=", 1)[0] for a in argv}
    out += [(flag, why) for flag, why in _CPU_ONLY_FALLBACKS.items() if flag in given]
    return out


TRAINING_LOOP_VERSION = "0.19.2"  # the megatron-core whose megatron.training the CPU patches were checked against
UNPACKED = Path(__file__).resolve().parents[2] / ".megatron-0.19.2"  # `make megatron-0.19.2` (Python 3.11)


def use_megatron_with_training_loop() -> str:
    """Make a megatron-core that ships Megatron-LM's loop importable, before anything imports megatron.

    Python 3.11 installs megatron-core 0.16.1 (no ``megatron.training``); ``make
    setup`` unpacks the 0.19.2 wheel into ``.megatron-0.19.2/`` of the checkout,
    which is put first on ``sys.path`` here (its ``typing.override`` backfilled).
    Returns the megatron-core version in use; raises with what to install otherwise."""
    import importlib.metadata
    import importlib.util

    from excitation_dist.megatron import compat

    def installed() -> str | None:
        try:
            return importlib.metadata.version("megatron-core")
        except importlib.metadata.PackageNotFoundError:
            return None

    how = (f"Megatron-LM's training loop (megatron.training) ships with megatron-core 0.19.x; "
           f"excitation_dist.recipe.pretrain_gpt was checked with {TRAINING_LOOP_VERSION}. Get it with "
           f"`pip install megatron-core=={TRAINING_LOOP_VERSION}` on Python >= 3.12, or on Python 3.11 run "
           f"`make megatron-{TRAINING_LOOP_VERSION}` in the project checkout (unpacks the wheel into "
           f"{UNPACKED.name}/, which pretrain_gpt then uses by itself)")
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        if not (UNPACKED / "megatron" / "training").is_dir():
            raise SystemExit(f"pretrain_gpt: megatron-core is not installed. {how}")
    if not compat.has_training_loop() and (UNPACKED / "megatron" / "training").is_dir():
        if "megatron.core" in sys.modules:
            raise SystemExit(f"pretrain_gpt: megatron {installed()} was imported before pretrain_gpt could switch to "
                             f"{UNPACKED}; run pretrain_gpt in a fresh process (python -m / torchrun -m)")
        sys.path.insert(0, str(UNPACKED))
        importlib.invalidate_caches()
    compat.backfill_typing_override()
    version = installed() or "unknown"
    if not compat.has_training_loop():
        raise SystemExit(f"pretrain_gpt: megatron-core {version} has no megatron.training. {how}")
    if version.split("+")[0] != TRAINING_LOOP_VERSION:
        try:
            compat.check_version(version)
        except RuntimeError as exc:
            raise SystemExit(f"pretrain_gpt: {exc}") from None
    return version


def main(argv: list[str] | None = None, *, cpu: bool | None = None) -> None:
    """Parse Megatron-LM's arguments plus ``--excitation-*`` and run ``pretrain``.
    Without a GPU (``cpu``): the CPU flags above, TorchDynamo off (megatron's
    jit fusions would compile with inductor) and the CPU patches, all automatic."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    check_excitation_flags(sys.argv[1:])  # before megatron's own parser (and before importing megatron)
    if cpu is None:
        cpu = not torch.cuda.is_available()
    version = use_megatron_with_training_loop()  # before the patches: they check this version
    if cpu:
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
        if os.environ["TORCHDYNAMO_DISABLE"] == "1":
            from torch import _dynamo

            _dynamo.config.disable = True
        if int(os.environ.get("RANK", "0")) == 0:
            fallbacks = cpu_fallbacks(sys.argv[1:])
            print(f"fast paths: {len(fallbacks)} setting(s) fall back (pretrain_gpt, cpu):\n"
                  + "\n".join(f"  {name}: {why}" for name, why in fallbacks), flush=True)
        sys.argv = [sys.argv[0], *CPU_ARGS, *sys.argv[1:]]
        from excitation_dist.megatron import cpu_patches

        try:
            cpu_patches.apply(training_loop=True)
        except RuntimeError as exc:  # PatchVersionError: a version the CPU shims were not checked against
            raise SystemExit(f"pretrain_gpt on CPU with megatron-core {version}: {exc}") from None

    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    args = parse_and_validate_args(extra_args_provider=add_excitation_args,
                                   args_defaults={"tokenizer_type": "NullTokenizer", "eval_interval": 1000})
    layer_interval = args.excitation_log_layer_interval
    if layer_interval is not None and (layer_interval < 1 or layer_interval % max(1, args.log_interval)):
        raise SystemExit(f"pretrain_gpt: --excitation-log-layer-interval {layer_interval} must be a multiple of "
                         f"--log-interval {args.log_interval} (per-layer statistics go out on logged iterations)")
    config = excitation_config_from_args(args)
    if config is not None:
        install_excitation(config, require_state=args.excitation_require_state)
    elif args.excitation_require_state:
        raise SystemExit("pretrain_gpt: --excitation-require-state needs --excitation-strategy (Excitation is off)")
    if args.mock_data:
        _skip_dataset_helper_build()
    container = pretrain_cfg_container_from_args(args, gpt_config_from_args(args))
    gc.freeze()  # the imported modules live for the run: megatron-core's full collections (two per save) skip them
    pretrain(container, datasets_provider, ModelType.encoder_or_decoder, forward_step)


if __name__ == "__main__":
    main()
