"""Optimizer: AdamW with warmup + cosine/linear decay, clipping and selective weight decay."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import optax

from jaxlm.config import ConfigError


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW settings. Defaults are OLMo-1B's (peak lr 4e-4, betas 0.9/0.95, wd 0.1, clip 1.0)."""

    lr: float = 4e-4
    warmup_steps: int = 2000
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * lr
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    # Parameters whose path contains one of these names get no weight decay.
    no_decay: tuple[str, ...] = ("embedding", "norm")
    clip_norm: float | None = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optimizer.lr: expected a positive number, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps: expected >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optimizer.min_lr_ratio: expected a number in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"optimizer.{name}: expected a number in [0, 1), got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ConfigError(f"optimizer.weight_decay: expected >= 0, got {self.weight_decay}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ConfigError(f"optimizer.clip_norm: expected a positive number or null, got {self.clip_norm}")


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr``, then decay to ``min_lr_ratio * lr`` at ``total_steps``."""
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    end = config.lr * config.min_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    if config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(config.lr, decay_steps, alpha=config.min_lr_ratio)
    elif config.schedule == "linear":
        decay = optax.linear_schedule(config.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(config.lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup), decay], [warmup])


def decay_mask(params: Any, no_decay: tuple[str, ...]) -> Any:
    """True for parameters that get weight decay: none whose path names a ``no_decay`` entry."""

    def keep(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return not any(token in name for name in names for token in no_decay)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(config, total_steps)
    parts = []
    if config.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(config.clip_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=config.beta1,
            b2=config.beta2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=lambda p: decay_mask(p, config.no_decay),
        )
    )
    return optax.chain(*parts)
