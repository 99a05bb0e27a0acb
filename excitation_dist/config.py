"""ExcitationConfig: what a user sets, validated with messages they can act on."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

STRATEGIES = ("none", "zerosum", "positivesum", "expdiff", "inverted", "random", "global")
"""The strategy names; their math is in :mod:`excitation_dist.strategies`."""

COUNT_MODES = ("processed", "routed")
UPDATE_PATHS = ("auto", "folded", "blend")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


@dataclass
class ExcitationConfig:
    """Excitation settings. The defaults reproduce the paper (batch-level ZeroSum,
    gamma 1, no smoothing, no clamp, no warm-up).

    Attributes:
        strategy: one of ``none, zerosum, positivesum, expdiff, inverted, random, global``.
        gamma: power-law exponent, >= 0 (0 turns ZeroSum/PositiveSum off).
        floor: optional lower bound on every multiplier, in [0, 1].
        ceiling: optional upper bound on every multiplier, >= 1.
        utilization_ema: EMA coefficient in [0, 1) applied to utilization across
            optimizer steps (0 = batch-level, as in the paper).
        warmup_steps: ramp multipliers linearly from 1 over this many optimizer steps.
        renormalize_energy: rescale each layer's multipliers to unit root-mean-square.
        counts: ``processed`` (tokens the experts actually compute, after capacity
            dropping) or ``routed`` (router assignments before dropping).
        seed: seed of the ``random`` control strategy (identical on all ranks).
        update: how the update is scaled. ``folded``: the expert rows are stepped
            at learning rate ``phi * lr`` inside the optimizer's step (torch SGD /
            Adam / AdamW, single-tensor, foreach or fused; not amsgrad, maximize or
            capturable; DeepSpeed, apex and Transformer Engine FusedAdam over fp32
            parameters; no snapshot, no host sync). ``blend``: any optimizer steps
            normally and the change of the owned expert rows is blended afterwards
            (a transient copy of those rows, no host sync). ``auto`` (default):
            folded where it is exact, else blend, said in one log line.
    """

    strategy: str = "zerosum"
    gamma: float = 1.0
    floor: float | None = None
    ceiling: float | None = None
    utilization_ema: float = 0.0
    warmup_steps: int = 0
    renormalize_energy: bool = False
    counts: str = "processed"
    seed: int = 0
    update: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def fail(name: str, msg: str) -> None:
            raise ConfigError(f"excitation.{name}: {msg} (got {getattr(self, name)!r})")

        if self.strategy not in STRATEGIES:
            fail("strategy", f"must be one of {', '.join(STRATEGIES)}")
        for name in ("gamma", "utilization_ema"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                fail(name, "must be a finite number")
        if self.gamma < 0:
            fail("gamma", "must be >= 0")
        if not 0.0 <= self.utilization_ema < 1.0:
            fail("utilization_ema", "must be in [0, 1); 0 disables smoothing")
        if self.floor is not None:
            if isinstance(self.floor, bool) or not isinstance(self.floor, (int, float)) or not 0.0 <= self.floor <= 1.0:
                fail("floor", "must be a number in [0, 1] or null")
        if self.ceiling is not None:
            if isinstance(self.ceiling, bool) or not isinstance(self.ceiling, (int, float)) or not self.ceiling >= 1.0:
                fail("ceiling", "must be a number >= 1 or null")
        for name in ("warmup_steps", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                fail(name, "must be an integer >= 0")
        if not isinstance(self.renormalize_energy, bool):
            fail("renormalize_energy", "must be true or false")
        if self.counts not in COUNT_MODES:
            fail("counts", f"must be one of {', '.join(COUNT_MODES)}")
        if self.update not in UPDATE_PATHS:
            fail("update", f"must be one of {', '.join(UPDATE_PATHS)}")

    # ------------------------------------------------------------- loading
    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "ExcitationConfig":
        values = dict(values or {})
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ConfigError(
                f"unknown excitation key(s) {', '.join(unknown)}; allowed keys: {', '.join(allowed)}"
            )
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, key: str | None = "excitation") -> "ExcitationConfig":
        """Load from a YAML file: the mapping under ``key`` (or the whole file if
        ``key`` is None or absent)."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"excitation config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping, found {type(data).__name__}")
        if key is not None and key in data:
            data = data[key]
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: '{key}' must be a mapping")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def active(self) -> bool:
        """False when this configuration never changes an update (strategy none)."""
        return self.strategy != "none"


def as_config(config: "ExcitationConfig | Mapping[str, Any] | None") -> ExcitationConfig:
    """Accept a config object, a plain mapping or None (defaults)."""
    if isinstance(config, ExcitationConfig):
        return config
    return ExcitationConfig.from_dict(config)


__all__ = ["ExcitationConfig", "ConfigError", "COUNT_MODES", "UPDATE_PATHS", "as_config"]
