"""Everything about a run that one process can check before any rank starts.

``excitation-dist train`` (and ``--dry-run``) calls :func:`check_run` after the
config loaded: the data prefix exists and parses, the tokenizer loads and fits
``model.vocab_size`` (``auto`` is resolved here, padded as Megatron pads), the
checkpoint and log directories are writable and the checkpoint directory is not
held by another live run, the checkpoint a resume would load was written by a
compatible run (:func:`resume_check`: backend, model, Excitation strategy and
state, layout, precision, and a sample order it can read on in, from its
``COMPLETE`` record only), and the device and
framework are there. Every problem is one line naming the key, what is wrong
and the fix; all of them are reported together. Nothing is written.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from excitation_dist import versions
from excitation_dist.config import ConfigError
from excitation_dist.recipe.checkpoint import CheckpointManager, holds_excitation_state, read_metadata, resume_metadata
from excitation_dist.recipe.config import DataConfig, RunConfig
from excitation_dist.recipe.run_lock import held_by_our_launcher, locked_by, locked_message

EMBEDDED_VOCAB = 256  # the embedded corpus is byte-level
VOCAB_PADDING = 128  # Megatron's --make-vocab-size-divisible-by default (times tensor_parallel)
_TOKEN_SAMPLE = 1 << 20  # tokens read to check the data against the tokenizer


def padded_vocab_size(vocab: int, tensor_parallel: int = 1) -> int:
    """``vocab`` rounded up to a multiple of 128 x tensor_parallel (Megatron's padding)."""
    multiple = VOCAB_PADDING * tensor_parallel
    return -(-vocab // multiple) * multiple


def tokenizer_vocab_size(data: DataConfig) -> int:
    """Vocabulary of the run's tokenizer (256 for the byte-level embedded corpus)."""
    if data.embedded:
        return EMBEDDED_VOCAB
    from excitation_dist.data.errors import DataError
    from excitation_dist.data.tokenizers import load_tokenizer

    try:
        return load_tokenizer(str(data.tokenizer), data.tokenizer_kind).vocab_size
    except DataError as exc:
        raise ConfigError(f"data.tokenizer: {exc}; pass the .model file that prepare-data wrote (its 'tokenizer:' "
                          "line), or a Hugging Face tokenizer.json or its directory") from None


def resolve_vocab_size(cfg: RunConfig, vocab: int) -> None:
    """Set ``model.vocab_size: auto`` to the padded tokenizer vocabulary, or
    check that an explicit size holds every token id."""
    m = cfg.model
    if m.vocab_size == "auto":
        m.vocab_size = padded_vocab_size(vocab, cfg.parallel.tensor_parallel)
    elif vocab > m.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {m.vocab_size} is smaller than the tokenizer's vocabulary of {vocab} tokens; set "
            f"model.vocab_size=auto (pads it to {padded_vocab_size(vocab, cfg.parallel.tensor_parallel)}) "
            f"or at least {vocab}"
        )


def check_data(cfg: RunConfig, vocab: int | None) -> None:
    """Every prefix of ``data.path`` (one, or a blend whose weights parse) is a
    complete Megatron indexed dataset (``.idx`` present, of the right format and
    size, ``.bin`` of the size it describes), each split the run reads holds a
    document, and the first tokens are ids of the tokenizer. Reads headers and a
    sample of tokens, never a whole corpus."""
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        raise ConfigError("data: the recipe reads its data through megatron-core's dataset stack (every backend), "
                          "and megatron-core is not installed; pip install -e '.[recipe]'")
    if cfg.data.embedded:
        return
    from excitation_dist.data.blends import SPLIT_NAMES, parse_blend, parse_split, split_ranges
    from excitation_dist.data.errors import DataError
    from excitation_dist.data.indexed import inspect_index

    hint = ("give the prefix prepare-data printed (its 'dataset:' line, e.g. data/corpus_text_document, "
            "without .bin/.idx) or one Megatron-LM's preprocess_data wrote")
    try:
        blend = parse_blend(cfg.data.path)
    except DataError as exc:
        raise ConfigError(f"data.path: {exc}") from None
    needed = [0, 1] if cfg.schedule.eval_interval else [0]
    if parse_split(cfg.data.split)[2] > 0:  # a test share: evaluated after the last step
        needed.append(2)
    for prefix in blend.prefixes:
        if not Path(f"{prefix}.idx").is_file() or not Path(f"{prefix}.bin").is_file():
            missing = f"{prefix}.idx" if not Path(f"{prefix}.idx").is_file() else f"{prefix}.bin"
            raise ConfigError(f"data.path: {missing} does not exist; {hint}")
        try:
            index = inspect_index(prefix)
        except DataError as exc:
            raise ConfigError(f"data.path: {exc}") from None
        if vocab is not None and index.tokens:
            largest = int(np.max(index.first_tokens(_TOKEN_SAMPLE)))
            if largest >= vocab:
                raise ConfigError(f"data.path: {prefix} holds token id {largest} but data.tokenizer has {vocab} tokens: "
                                  "the dataset was written with another tokenizer; pass that tokenizer or run "
                                  "prepare-data again")
        ranges = split_ranges(cfg.data.split, index.sequences)
        for i in needed:
            begin, end = ranges[i]
            if index.tokens_of_sequences(begin, end) == 0:
                names = [SPLIT_NAMES[j] for j in needed]
                names = names[0] + " split" if len(names) == 1 else ", ".join(names[:-1]) + f" and {names[-1]} splits"
                raise ConfigError(
                    f"data.path: {prefix} holds {index.tokens} tokens; its {names} "
                    f"(data.split={cfg.data.split}) each need at least one non-empty document, and the "
                    f"{SPLIT_NAMES[i]} split gets none ({index.documents} document(s) in all): use more data, change "
                    "data.split (a test share 0 skips the test evaluation), or set schedule.eval_interval=0 with a "
                    "split such as 100,0,0")


def _writable(path: Path) -> bool:
    """``path`` exists as a writable directory, or could be created."""
    while not path.exists():
        if path.parent == path:
            return False
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def check_directories(cfg: RunConfig, *, check_lock: bool = True) -> None:
    for key, value in (("checkpoint.dir", cfg.checkpoint.dir), ("logging.dir", cfg.logging.dir),
                       ("data.cache_dir", cfg.data.cache_dir)):
        if value is None:
            continue
        path = Path(value)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{key}: {path} exists and is not a directory; choose another path")
        if not _writable(path):
            raise ConfigError(f"{key}: {path} is not writable by this user; choose a directory you can write")
    if check_lock and cfg.checkpoint.dir is not None:
        holder = locked_by(cfg.checkpoint.dir)
        if holder is not None and not held_by_our_launcher(cfg.checkpoint.dir):
            raise ConfigError(locked_message(cfg.checkpoint.dir, holder))
    if check_lock:  # before launch only: a restart inside the launch replaces its own attempt's records
        check_logging_dir_unused(cfg)


def check_logging_dir_unused(cfg: RunConfig) -> None:
    """A run that trains from step 0 into a ``logging.dir`` that holds another run's metrics
    would mix two runs in one ``metrics.jsonl``: refused (nothing is overwritten). A run that
    resumes from a checkpoint continues the metrics there."""
    from excitation_dist.recipe.metrics_log import METRICS_FILE, logged_steps

    steps = logged_steps(cfg.logging.dir)
    if steps is None:
        return
    if cfg.checkpoint.dir is not None and cfg.checkpoint.resume and CheckpointManager(cfg.checkpoint.dir).latest():
        return
    why = ("checkpoint.dir is not set" if cfg.checkpoint.dir is None else
           "checkpoint.resume is false" if not cfg.checkpoint.resume else
           f"checkpoint.dir {cfg.checkpoint.dir} holds no complete checkpoint to resume")
    raise ConfigError(
        f"logging.dir: {Path(cfg.logging.dir) / METRICS_FILE} already holds the metrics of a run (steps "
        f"{steps[0]}-{steps[1]}), and this run would train from step 0 ({why}): the two would mix in one file. "
        "Set logging.dir to a new directory (or move the old one away)")


def _flat(prefix: str, value) -> dict:
    if isinstance(value, dict):
        out = {}
        for key, sub in value.items():
            out.update(_flat(f"{prefix}.{key}", sub))
        return out
    return {prefix: value}


def _changes(saved: dict, now: dict, prefix: str, skip: tuple[str, ...] = ()) -> list[str]:
    """``key old -> new`` for every key whose value differs (checkpoint -> this run). Keys only one side
    has (a field added to or removed from the config since the checkpoint was written) are not compared."""
    a, b = _flat(prefix, saved), _flat(prefix, now)
    return [f"{key} {a[key]!r} -> {b[key]!r}" for key in sorted(set(a) & set(b))
            if key not in skip and a[key] != b[key]]


def resume_check(cfg: RunConfig, checkpoint: Path | None = None) -> tuple[list[str], list[str]]:
    """(problems, notes) of resuming ``cfg`` from ``checkpoint`` (default: the
    one ``checkpoint.dir/latest`` names; nothing when the run does not resume or
    the directory holds none). Reads only the checkpoint's ``COMPLETE`` record
    and compares it with what :func:`~excitation_dist.recipe.checkpoint.resume_metadata`
    would record for ``cfg``: another backend, model, Excitation strategy, a
    DeepSpeed checkpoint of another layout or precision, another sample order
    (:func:`~excitation_dist.recipe.data.resume_order_check`: seed, data, split,
    or a schedule that reshuffles the data), or (with
    ``checkpoint.require_excitation_state``) no Excitation state to resume are
    problems; a fresh Excitation start and a torch run on another number of
    ranks are notes."""
    if checkpoint is None:
        if cfg.checkpoint.dir is None or not cfg.checkpoint.resume:
            return [], []
        checkpoint = CheckpointManager(cfg.checkpoint.dir).latest()
        if checkpoint is None:
            return [], []
    record = Path(checkpoint) / "COMPLETE"
    fix = ("resume with the configuration that wrote it, or set checkpoint.dir to a new directory to start "
           "another run (the checkpoint is left as it is)")
    try:
        saved = read_metadata(checkpoint)
    except (OSError, ValueError) as exc:
        return [f"checkpoint.dir: {record} cannot be read ({exc}); set checkpoint.dir to a new directory, or "
                "remove that checkpoint directory to resume from the previous one"], []
    if "resume_metadata" not in saved:
        return [], [f"checkpoint {checkpoint} was written before checkpoints recorded their configuration: resuming "
                    "without checking its backend, model, Excitation strategy, layout or data order, at sample "
                    "step x schedule.global_batch_size"]
    now = resume_metadata(cfg, excitation_state=True)
    problems: list[str] = []
    notes: list[str] = []
    if saved.get("backend") != now["backend"]:
        problems.append(f"backend: {record} was written by backend {saved.get('backend')!r}, this run is "
                        f"{now['backend']!r} (backend {saved.get('backend')!r} -> {now['backend']!r}); their "
                        f"checkpoint formats differ: {fix}")
        return problems, notes  # the rest is not comparable across backends
    skip = ("model.source",) + (("model.vocab_size",) if cfg.model.vocab_size == "auto" else ())
    model = _changes(saved.get("model") or {}, now["model"], "model", skip)
    if model:
        problems.append(f"model: {record} holds another model shape: {', '.join(model)} (checkpoint -> this run); "
                        f"{fix}")

    before, after = saved.get("excitation"), now["excitation"]
    strategy_before = "none" if before is None else before.get("strategy")
    if before is not None and strategy_before != cfg.excitation.strategy:
        problems.append(f"excitation.strategy: {record} was trained with Excitation strategy {strategy_before!r}, "
                        f"this run asks for {cfg.excitation.strategy!r} (excitation.strategy {strategy_before!r} -> "
                        f"{cfg.excitation.strategy!r}); resume with excitation.strategy={strategy_before}, or set "
                        "checkpoint.dir to a new directory to start another run")
    elif after is not None and not holds_excitation_state(saved):
        why = ("was written with Excitation off (excitation.strategy 'none')" if before is None
               else "holds no Excitation state")
        if cfg.checkpoint.require_excitation_state:
            problems.append(f"checkpoint.require_excitation_state: {record} {why}, and this run requires "
                            "Excitation's state to resume; resume from a checkpoint written with Excitation "
                            f"{cfg.excitation.strategy!r}, or set checkpoint.require_excitation_state=false to start "
                            "Excitation fresh")
        else:
            notes.append(f"checkpoint {checkpoint} {why}: Excitation starts fresh (step 0, no EMA); set "
                         "checkpoint.require_excitation_state=true to refuse this instead")
    elif before is not None and after is not None:
        tuned = _changes(before, after, "excitation")
        if tuned:
            notes.append(f"checkpoint {checkpoint}: {', '.join(tuned)} (checkpoint -> this run): Excitation's saved "
                         "state resumes under the new settings")

    layout_keys = {"deepspeed": ("world_size", "data_parallel", "expert_parallel", "zero_stage")}.get(cfg.backend, ())
    layout = _changes({k: saved.get("parallel", {}).get(k) for k in layout_keys},
                      {k: now["parallel"][k] for k in layout_keys}, "parallel")
    if cfg.backend == "deepspeed" and saved.get("precision") != now["precision"]:
        layout.append(f"precision {saved.get('precision')!r} -> {now['precision']!r}")
    if layout:
        problems.append(f"parallel: {record} was written on another layout: {', '.join(layout)} (checkpoint -> "
                        "this run); DeepSpeed's ZeRO checkpoints hold the optimizer state per data-parallel rank "
                        "and load only on the layout and precision that wrote them: resume with that layout, convert "
                        "the checkpoint with DeepSpeed's universal checkpoint (python -m "
                        "deepspeed.checkpoint.ds_to_universal) to load it on another, or set checkpoint.dir to a new "
                        "directory")
    from excitation_dist.recipe.data import resume_order_check

    data_problems, data_notes = resume_order_check(cfg, saved, record)
    problems.extend(data_problems)
    notes.extend(f"checkpoint {checkpoint} {note}" for note in data_notes)
    ranks_before = saved.get("parallel", {}).get("world_size")
    if cfg.backend == "torch" and ranks_before != now["parallel"]["world_size"]:
        notes.append(f"checkpoint {checkpoint} was written by {ranks_before} ranks, this run has "
                     f"{now['parallel']['world_size']}: fine for backend torch (DDP keeps full replicas)")
    if cfg.backend == "fsdp2" and ranks_before != now["parallel"]["world_size"]:
        notes.append(f"checkpoint {checkpoint} was written by {ranks_before} ranks, this run has "
                     f"{now['parallel']['world_size']}: fine for backend fsdp2 (torch.distributed.checkpoint "
                     "reshards the model and optimizer state at load)")
    return problems, notes


def check_device_and_backend(cfg: RunConfig, *, launching_locally: bool) -> None:
    """The device exists (enough GPUs for a one-node launch) and the backend's
    framework is installed in a version the project was checked against."""
    if cfg.device == "cuda":
        import torch  # only here: a CPU config is checked without importing torch

        if not torch.cuda.is_available():
            raise ConfigError("device: cuda, but this machine has no usable GPU (torch.cuda.is_available() is "
                              "False); set device=cpu, or run on a GPU node with a CUDA build of torch")
        if launching_locally and torch.cuda.device_count() < cfg.parallel.gpus_per_node:
            raise ConfigError(f"parallel.gpus_per_node: {cfg.parallel.gpus_per_node}, but this node has "
                              f"{torch.cuda.device_count()} GPU(s); lower it to the GPUs present")
    if cfg.backend == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("backend: deepspeed is not installed; DS_BUILD_OPS=0 pip install -e '.[deepspeed]', "
                              "or set backend=torch")
        try:
            versions.check("deepspeed")
        except RuntimeError as exc:
            raise ConfigError(f"backend: {exc}") from None
    elif cfg.backend == "megatron":
        if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
            raise ConfigError("backend: megatron-core is not installed; pip install -e '.[megatron]', "
                              "or set backend=deepspeed")
        from excitation_dist.megatron import cpu_patches

        try:
            versions.check("megatron-core")
        except RuntimeError as exc:
            raise ConfigError(f"backend: {exc}") from None
        if cfg.device == "cpu":
            version, checked = versions.installed("megatron-core").split("+")[0], cpu_patches.checked_versions()
            if version not in checked:
                raise ConfigError(f"backend: megatron on CPU needs the CPU patches (patches/megatron_cpu/), which "
                                  f"support megatron-core {' and '.join(checked)}; found {version}: pip install "
                                  f"megatron-core==0.16.1 (Python 3.11) or 0.19.2 (Python >= 3.12), or use a GPU")


def check_run(cfg: RunConfig, *, launching_locally: bool, check_lock: bool = True,
              notes: list[str] | None = None) -> list[str]:
    """Run every check; resolves ``model.vocab_size: auto`` in place. Returns the
    problems found (empty when the run can start), one message each; what the
    run should say but that does not stop it (Excitation starting fresh at
    resume) is appended to ``notes``. Ranks pass ``check_lock=False``: rank 0
    takes the lock itself, and the others would see it."""
    problems: list[str] = []
    vocab = None
    try:
        vocab = tokenizer_vocab_size(cfg.data)
        resolve_vocab_size(cfg, vocab)
    except ConfigError as exc:
        problems.append(str(exc))
    for check in (lambda: check_data(cfg, vocab), lambda: check_directories(cfg, check_lock=check_lock),
                  lambda: check_device_and_backend(cfg, launching_locally=launching_locally)):
        try:
            check()
        except ConfigError as exc:
            problems.append(str(exc))
    resume_problems, resume_notes = resume_check(cfg)
    problems.extend(resume_problems)
    if notes is not None:
        notes.extend(resume_notes)
    return problems
