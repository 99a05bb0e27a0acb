"""The run configuration of ``excitation-dist train``: one YAML file chooses the
model, data, optimizer, schedule, parallel layout, backend and Excitation.

Every field is checked when the file is loaded, before any process group
starts; errors name the key (``parallel.expert_parallel``) and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from excitation_dist.config import ConfigError, ExcitationConfig
from excitation_dist.router_options import RouterOptions
from excitation_dist.recipe.schema import apply_overrides, from_dict, to_dict


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass
class MoEConfig(RouterOptions):
    num_experts: int = 8
    top_k: int = 2
    ffn_hidden_size: int = 128  # hidden width of each routed expert
    shared_expert_ffn_hidden_size: int | None = None  # total width of the shared expert(s); None = none
    first_dense_layers: int = 0  # leading layers with a dense FFN instead of MoE
    capacity_factor: float | None = None  # None: no token dropping
    # Router options (score function, top-k normalization, groups, load balancing, expert bias): inherited from
    # RouterOptions (excitation_dist/router_options.py).
    aux_loss_coef: float = 0.01  # load-balancing loss (unused with load_balancing: none)
    z_loss_coef: float = 0.0  # router z-loss
    router_dtype: Literal["fp32", "model"] = "fp32"

    def __post_init__(self) -> None:
        _require(self.num_experts >= 1, "num_experts", f"must be >= 1, got {self.num_experts}")
        _require(1 <= self.top_k <= self.num_experts, "top_k", f"must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        _require(self.ffn_hidden_size >= 1, "ffn_hidden_size", f"must be >= 1, got {self.ffn_hidden_size}")
        _require(self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor", f"must be > 0 or null, got {self.capacity_factor}")
        _require(self.aux_loss_coef >= 0 and self.z_loss_coef >= 0, "aux_loss_coef",
                 f"loss coefficients must be >= 0, got aux_loss_coef={self.aux_loss_coef}, z_loss_coef={self.z_loss_coef}")
        _require(self.first_dense_layers >= 0, "first_dense_layers", f"must be >= 0, got {self.first_dense_layers}")
        _require(self.topk_scaling_factor is None or self.topk_scaling_factor > 0, "topk_scaling_factor",
                 f"must be > 0 or null, got {self.topk_scaling_factor}")
        _require(self.expert_bias_update_rate > 0, "expert_bias_update_rate", f"must be > 0, got {self.expert_bias_update_rate}")
        _require((self.router_num_groups is None) == (self.router_group_topk is None), "router_group_topk",
                 "set router_num_groups and router_group_topk together (or neither)")
        if self.router_num_groups is not None:
            _require(self.router_num_groups >= 1 and self.num_experts % self.router_num_groups == 0,
                     "router_num_groups", f"must divide num_experts={self.num_experts}, got {self.router_num_groups}")
            _require(1 <= self.router_group_topk <= self.router_num_groups, "router_group_topk",
                     f"must be in [1, router_num_groups={self.router_num_groups}], got {self.router_group_topk}")
            _require(self.top_k % self.router_group_topk == 0
                     and self.top_k // self.router_group_topk <= self.num_experts // self.router_num_groups,
                     "router_group_topk", f"must divide top_k={self.top_k}, with top_k / router_group_topk <= experts per group "
                     f"({self.num_experts} / {self.router_num_groups}), got {self.router_group_topk}")


@dataclass
class ModelConfig:
    source: str = ""  # where the architecture comes from (paper / model card)
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # GQA key/value heads; None = MHA
    head_dim: int | None = None  # None = hidden_size / heads
    ffn_hidden_size: int = 256  # dense FFN layers (first_dense_layers)
    activation: Literal["swiglu", "gelu"] = "swiglu"  # FFN and expert MLPs
    attention: Literal["standard", "mla"] = "standard"
    q_lora_rank: int | None = None  # MLA only: low-rank query projection (DeepSeek-V3); None = full-rank queries
    kv_lora_rank: int | None = None  # MLA only
    qk_rope_head_dim: int | None = None  # MLA only
    vocab_size: int | Literal["auto"] = 256  # auto: the tokenizer's vocabulary padded to 128 x tensor_parallel
    seq_length: int = 64
    max_position_embeddings: int | None = None
    position_embedding: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    # YaRN context extension of the rotary embeddings (DeepSeek-V2/V3's rope_scaling), with attention: mla
    rope_scaling: Literal["none", "yarn"] = "none"
    rope_scaling_factor: float = 1.0
    rope_original_max_position_embeddings: int | None = None
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 0.0
    normalization: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_epsilon: float = 1e-5  # of every RMSNorm / LayerNorm (Hugging Face's rms_norm_eps), on every backend
    qk_layernorm: bool = False
    tie_embeddings: bool = False
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        _require(self.num_layers >= 1, "num_layers", f"must be >= 1, got {self.num_layers}")
        _require(self.moe.first_dense_layers < self.num_layers, "moe.first_dense_layers",
                 f"{self.moe.first_dense_layers} of num_layers={self.num_layers} leaves no MoE layer")
        _require(self.hidden_size % self.num_attention_heads == 0 or self.head_dim is not None, "hidden_size",
                 f"{self.hidden_size} must be divisible by num_attention_heads={self.num_attention_heads} (or set head_dim)")
        if self.num_query_groups is not None:
            _require(self.num_attention_heads % self.num_query_groups == 0, "num_query_groups",
                     f"must divide num_attention_heads={self.num_attention_heads}, got {self.num_query_groups}")
        if self.attention == "mla":
            _require(self.kv_lora_rank is not None and self.qk_rope_head_dim is not None, "attention",
                     "mla needs kv_lora_rank and qk_rope_head_dim")
        _require(self.vocab_size == "auto" or self.vocab_size >= 2, "vocab_size", f"must be >= 2, or auto, got {self.vocab_size}")
        _require(self.seq_length >= 2, "seq_length", f"must be >= 2, got {self.seq_length}")
        _require(self.norm_epsilon > 0, "norm_epsilon", f"must be > 0, got {self.norm_epsilon}")
        _require(self.rope_scaling == "none" or self.attention == "mla", "rope_scaling",
                 "yarn is built with attention: mla only (megatron-core's latent attention); set none")
        _require(self.rope_scaling == "none" or self.rope_original_max_position_embeddings is not None,
                 "rope_original_max_position_embeddings", "yarn needs the pretraining context length")

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.moe.first_dense_layers


@dataclass
class DataConfig:
    # "embedded" (the standard library's sources, bytes), an indexed-dataset prefix (prepare-data's or
    # Megatron-LM's preprocess_data's, without .bin/.idx), or a blend in Megatron's --data-path syntax:
    # "W1 PREFIX1 W2 PREFIX2 ..." (or the same items as a YAML list)
    path: str | list[str | float] = "embedded"
    tokenizer: str | None = None  # sentencepiece .model, or a Hugging Face tokenizer.json or its directory
    tokenizer_kind: Literal["auto", "sentencepiece", "huggingface"] = "auto"  # auto: by the path
    split: str = "98,2,0"  # training, validation, test shares of each prefix's documents (Megatron's --split)
    cache_dir: str | None = None  # megatron-core's index files; shared by all nodes. None: <logging.dir>/data_cache

    def __post_init__(self) -> None:
        from excitation_dist.data.blends import parse_blend, parse_split
        from excitation_dist.data.errors import DataError

        for key, check in (("split", lambda: parse_split(self.split)), ("path", lambda: parse_blend(self.path))):
            try:
                check()
            except DataError as exc:
                raise ConfigError(f"{key}: {exc}") from None
        _require(self.path == "embedded" or self.tokenizer is not None, "tokenizer",
                 "a prepared dataset needs its tokenizer (data.tokenizer: the sentencepiece .model or Hugging Face "
                 "tokenizer that wrote it); see prepare-data's output")

    @property
    def embedded(self) -> bool:
        return self.path == "embedded"


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0

    def __post_init__(self) -> None:
        _require(self.lr > 0 and 0 <= self.min_lr <= self.lr, "lr",
                 f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1",
                 f"betas must be in [0, 1), got beta1={self.beta1}, beta2={self.beta2}")
        _require(self.clip_grad >= 0 and self.weight_decay >= 0, "clip_grad",
                 f"clip_grad and weight_decay must be >= 0, got clip_grad={self.clip_grad}, "
                 f"weight_decay={self.weight_decay}")


@dataclass
class ScheduleConfig:
    train_steps: int = 200
    warmup_steps: int = 20
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    micro_batch_size: int = 8
    global_batch_size: int = 16
    eval_interval: int = 50
    eval_steps: int = 4

    def __post_init__(self) -> None:
        _require(self.train_steps >= 1, "train_steps", f"must be >= 1, got {self.train_steps}")
        _require(0 <= self.warmup_steps <= self.train_steps, "warmup_steps",
                 f"must be in [0, train_steps={self.train_steps}], got {self.warmup_steps}")
        _require(self.micro_batch_size >= 1 and self.global_batch_size >= 1, "micro_batch_size",
                 f"batch sizes must be >= 1, got micro_batch_size={self.micro_batch_size}, "
                 f"global_batch_size={self.global_batch_size}")


@dataclass
class ParallelConfig:
    nodes: int = 1
    gpus_per_node: int = 2  # processes per node (CPU ranks when device is cpu)
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    context_parallel: int = 1
    expert_parallel: int = 1
    expert_tensor_parallel: int = 1
    sequence_parallel: bool = False
    zero_stage: int = 1  # DeepSpeed: 0, 1 or 2
    distributed_optimizer: bool = True  # Megatron
    token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"  # Megatron
    timeout_minutes: float = 10.0  # a rank waiting this long for its peers (start-up, a collective) fails

    def __post_init__(self) -> None:
        _require(self.timeout_minutes > 0, "timeout_minutes", f"must be > 0, got {self.timeout_minutes}")
        _require(self.zero_stage != 3, "zero_stage",
                 "3 is not available in the recipe: Excitation with ZeRO-3 needs DeepSpeed AutoEP (Hugging Face MoE "
                 "models with stacked experts), and the recipe's model uses deepspeed.moe layers, which DeepSpeed "
                 "refuses under ZeRO-3; use 0, 1 or 2, or AutoEP through excitation_dist.deepspeed.attach in your "
                 "own loop (README: Use it from DeepSpeed)")
        _require(self.zero_stage in (0, 1, 2), "zero_stage", f"must be 0, 1 or 2, got {self.zero_stage}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.tensor_parallel * self.pipeline_parallel * self.context_parallel)


@dataclass
class CheckpointConfig:
    dir: str | None = None  # None: no checkpoints
    interval: int = 100
    resume: bool = True  # continue from the latest checkpoint in dir
    keep_last: int = 2
    # resuming with Excitation on from a checkpoint without Excitation state: refuse (true) instead of
    # starting Excitation fresh (false, said in one line)
    require_excitation_state: bool = False

    def __post_init__(self) -> None:
        _require(isinstance(self.interval, int) and self.interval >= 1, "interval",
                 f"must be an integer >= 1 (steps between checkpoints; the last step is always saved), got "
                 f"{self.interval!r}; for no checkpoints leave checkpoint.dir unset")
        _require(isinstance(self.keep_last, int) and self.keep_last >= 1, "keep_last",
                 f"must be an integer >= 1 (checkpoints kept), got {self.keep_last!r}")


@dataclass
class WandbConfig:
    project: str | None = None  # None: no Weights & Biases writer
    name: str | None = None  # the W&B run's name; None: the run's name
    entity: str | None = None  # team or user; None: W&B's default
    mode: Literal["online", "offline"] = "online"  # offline: files under logging.dir/wandb, `wandb sync` later

    def __post_init__(self) -> None:
        import importlib.util

        _require(self.project is None or importlib.util.find_spec("wandb") is not None, "project",
                 "is set, but the wandb package is not installed: pip install 'excitation-dist[wandb]', "
                 "or remove logging.wandb")


@dataclass
class LoggingConfig:
    dir: str = "runs/default"  # TensorBoard events, metrics.jsonl (and W&B's files)
    interval: int = 10  # steps between logged steps: loss, throughput and Excitation's summaries over layers
    # steps between per-layer statistics and the [layers, experts] matrices; None: every logged step
    layer_interval: int | None = None
    wandb: WandbConfig = field(default_factory=WandbConfig)  # a Weights & Biases writer beside TensorBoard

    def __post_init__(self) -> None:
        _require(self.interval >= 1, "interval", f"must be >= 1, got {self.interval}")
        _require(self.layer_interval is None or (self.layer_interval >= 1 and self.layer_interval % self.interval == 0),
                 "layer_interval", f"must be a multiple of logging.interval={self.interval} (per-layer statistics are "
                 f"written on logged steps), or null for every logged step; got {self.layer_interval}")


@dataclass
class RunConfig:
    name: str = "run"
    backend: Literal["deepspeed", "fsdp2", "megatron", "torch"] = "deepspeed"
    device: Literal["cpu", "cuda"] = "cpu"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 1234
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    excitation: ExcitationConfig = field(default_factory=ExcitationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed_config: str | None = None  # optional DeepSpeed JSON merged under the generated one

    def __post_init__(self) -> None:
        self._check_layout()
        self._check_router()

    def _check_router(self) -> None:
        """A router option this backend cannot express fails here, at load, naming the key and the backend."""
        for key, reason in router_gaps(self.model.moe, self.backend):
            raise ConfigError(f"model.moe.{key}: backend {self.backend} cannot express this: {reason}")

    def _check_layout(self) -> None:
        p, m, s = self.parallel, self.model, self.schedule
        model_parallel = p.tensor_parallel * p.pipeline_parallel * p.context_parallel
        _require(p.world_size % model_parallel == 0, "parallel",
                 f"world size {p.world_size} (nodes x gpus_per_node) is not divisible by "
                 f"tensor x pipeline x context parallel = {model_parallel}")
        dp = p.data_parallel
        _require(m.moe.num_experts % p.expert_parallel == 0, "parallel.expert_parallel",
                 f"{p.expert_parallel} must divide model.moe.num_experts={m.moe.num_experts}")
        # expert-parallel groups are carved out of the ranks that hold distinct tokens
        if self.backend == "megatron":
            _require(p.tensor_parallel == 1 or p.sequence_parallel, "parallel.sequence_parallel",
                     "Megatron MoE with tensor_parallel > 1 requires sequence_parallel: true")
            _require((dp * p.context_parallel * p.tensor_parallel) % (p.expert_parallel * p.expert_tensor_parallel) == 0,
                     "parallel.expert_parallel",
                     f"expert_parallel x expert_tensor_parallel = {p.expert_parallel} x {p.expert_tensor_parallel} must "
                     f"divide data x context x tensor parallel = {dp} x {p.context_parallel} x {p.tensor_parallel}")
        else:
            _require(p.tensor_parallel == 1 and p.pipeline_parallel == 1 and p.context_parallel == 1,
                     "parallel", f"the {self.backend} backend supports data and expert parallelism only; use backend: "
                     "megatron for tensor/pipeline/context parallelism")
            _require(self.backend != "torch" or p.expert_parallel == 1, "parallel.expert_parallel",
                     "the torch backend replicates experts (DDP): set 1, or use backend: deepspeed or megatron")
            _require(p.expert_tensor_parallel == 1, "parallel.expert_tensor_parallel", "must be 1 with the deepspeed backend")
            _require(dp % p.expert_parallel == 0, "parallel.expert_parallel", f"must divide the data-parallel size {dp}")
        _require(m.num_attention_heads % p.tensor_parallel == 0, "parallel.tensor_parallel",
                 f"must divide model.num_attention_heads={m.num_attention_heads}")
        _require(m.num_layers % p.pipeline_parallel == 0, "parallel.pipeline_parallel",
                 f"must divide model.num_layers={m.num_layers}")
        _require(s.global_batch_size % (s.micro_batch_size * dp) == 0, "schedule.global_batch_size",
                 f"must be a multiple of micro_batch_size x data-parallel size = {s.micro_batch_size} x {dp}")
        _require(self.device == "cuda" or self.precision != "fp16", "precision",
                 "fp16 needs device: cuda (CPU ranks support fp32 and bf16)")

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.schedule.global_batch_size // (self.schedule.micro_batch_size * self.parallel.data_parallel)

    def to_dict(self) -> dict:
        return to_dict(self)


def router_gaps(moe: MoEConfig, backend: str) -> list[tuple[str, str]]:
    """(model.moe key, reason) for each router option ``backend`` cannot express; empty when it can.

    torch (:class:`excitation_dist.models.moe.TopKMoE`) expresses every option. megatron maps them onto
    megatron-core's router (TransformerConfig.moe_router_*); deepspeed's TopKGate is softmax-only with the
    micro-batch auxiliary loss."""
    gaps: list[tuple[str, str]] = []
    if backend == "megatron":
        if moe.score_function == "sigmoid" and not moe.normalize_topk and moe.top_k > 1:
            gaps.append(("normalize_topk", "megatron-core's sigmoid router always normalizes the top-k scores; "
                         "set normalize_topk: true, or use backend: torch"))
        if moe.expert_bias and moe.score_function != "sigmoid":
            gaps.append(("expert_bias", "megatron-core's expert bias (aux-loss-free balancing) needs "
                         "score_function: sigmoid"))
    elif backend == "deepspeed":
        if moe.score_function != "softmax":
            gaps.append(("score_function", "DeepSpeed's TopKGate scores with a softmax only; use backend: megatron "
                         "or torch"))
        if not moe.normalize_topk and moe.top_k > 1:
            gaps.append(("normalize_topk", "DeepSpeed's TopKGate renormalizes the top-k probabilities (top_k > 1); "
                         "set normalize_topk: true, or use backend: megatron or torch"))
        if moe.topk_scaling_factor not in (None, 1.0):
            gaps.append(("topk_scaling_factor", "DeepSpeed's TopKGate has no scaling factor; use backend: megatron "
                         "or torch"))
        if moe.router_num_groups is not None:
            gaps.append(("router_num_groups", "DeepSpeed's TopKGate has no group-limited routing; use backend: "
                         "megatron or torch"))
        if moe.load_balancing == "seq_aux":
            gaps.append(("load_balancing", "DeepSpeed's TopKGate computes its auxiliary loss over the micro-batch "
                         "(aux) only; use aux or none, or backend: megatron or torch"))
        if moe.expert_bias:
            gaps.append(("expert_bias", "DeepSpeed's TopKGate has no expert bias (aux-loss-free balancing); use "
                         "backend: megatron or torch"))
    return gaps


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_config_data(path: str | Path, _seen: tuple = ()) -> dict:
    """YAML mapping of ``path``; a top-level ``inherit: other.yaml`` (relative to
    the file) is loaded first and this file's keys are merged over it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'inherit' loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    parent = data.pop("inherit", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: inherit must be a path to another YAML config")
        data = _deep_merge(read_config_data(path.parent / parent, _seen + (path.resolve(),)), data)
    return data


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (with ``inherit``), apply ``key.sub=value``
    overrides, validate."""
    data = apply_overrides(read_config_data(path), overrides or [])
    try:
        return from_dict(RunConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
