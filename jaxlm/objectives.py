"""Training objectives as pure functions of (model config, params, batch).

Each objective returns ``(loss_sum, aux)`` where ``loss_sum`` is a *sum* over the batch's units
(target tokens, or preference pairs) and ``aux["count"]`` is how many units it covers, so
micro-batches combine exactly and the step divides once. ``aux`` also holds the sums of the
metrics the objective reports (``metric_sums``); ``jaxlm.train.Trainer`` divides them by the count.

* ``lm``: next-token cross-entropy over every position that continues its document (packed
  documents never predict across their boundary or into padding), optional z-loss.
* ``sft``: the same loss restricted to the tokens a ``loss_mask`` marks (the responses of
  prompt/response examples, ``jaxlm.data.examples``): prompt tokens contribute zero loss and
  zero gradient.
* ``dpo``: direct preference optimisation (Rafailov et al. 2023) against a frozen reference
  whose sequence log-probs come with the batch (``ref_chosen_logp``, ``ref_rejected_logp``,
  computed once from the starting model, ``jaxlm.loop``):
  ``h = (logp_c - ref_c) - (logp_r - ref_r)``;
  ``sigmoid``: ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)`` (``eps`` = label
  smoothing, the conservative-DPO form; 0 is the paper's loss);
  ``ipo``: ``(h - 1 / (2 beta))^2`` (Azar et al. 2023, on summed log-probs).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp

from jaxlm import model as model_lib
from jaxlm.config import ConfigError, ModelConfig

Array = jax.Array
Batch = dict[str, Array]

OBJECTIVES = ("lm", "sft", "dpo")
# The batch keys each objective reads (anything else a pipeline yields stays on the host).
MODEL_INPUTS = {
    "lm": ("tokens", "segment_ids", "positions"),
    "sft": ("tokens", "segment_ids", "positions", "loss_mask"),
    "dpo": (
        "chosen_tokens", "chosen_segment_ids", "chosen_loss_mask",
        "rejected_tokens", "rejected_segment_ids", "rejected_loss_mask",
        "ref_chosen_logp", "ref_rejected_logp",
    ),
}


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = 0.0  # sigmoid loss only: the assumed share of flipped preferences

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"dpo.beta: expected a positive number, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing: expected a number in [0, 0.5), got {self.label_smoothing}")
        if self.loss == "ipo" and self.label_smoothing:
            raise ConfigError("dpo.label_smoothing: applies to the sigmoid loss only (dpo.loss is 'ipo')")


def target_weights(segment_ids: Array, loss_mask: Array | None = None) -> Array:
    """[B, T-1] float: 1 where token t+1 continues token t's document (never across documents or
    padding) and, with ``loss_mask``, is a token the mask trains."""
    same = segment_ids[:, 1:] == segment_ids[:, :-1]
    weights = same & (segment_ids[:, 1:] != 0)
    if loss_mask is not None:
        weights = weights & (loss_mask[:, 1:] != 0)
    return weights.astype(jnp.float32)


def next_token_logprobs(logits: Array, tokens: Array) -> tuple[Array, Array]:
    """(log p(token t+1 | tokens <= t) [B, T-1], log-partition [B, T-1]) from logits [B, T, V]."""
    logits = logits[:, :-1]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return target_logit - log_z, log_z


def token_logprobs(config: ModelConfig, params: Any, tokens: Array, segment_ids: Array, positions: Array | None = None):
    """``next_token_logprobs`` of the model's logits for ``tokens``."""
    out = model_lib.forward(config, params, tokens, positions=positions, segment_ids=segment_ids)
    return next_token_logprobs(out.logits, tokens)


def next_token_loss(
    config: ModelConfig, params: Any, batch: Batch, z_loss: float = 0.0
) -> tuple[Array, dict[str, Array]]:
    """Summed next-token cross-entropy (+ optional z-loss) over the trained target tokens.

    A ``loss_mask`` in the batch restricts the targets (SFT); without one every position that
    continues its document is a target (pretraining).
    """
    tokens = batch["tokens"]
    segment_ids = batch.get("segment_ids")
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)
    logp, log_z = token_logprobs(config, params, tokens, segment_ids, batch.get("positions"))
    weights = target_weights(segment_ids, batch.get("loss_mask"))
    ce = -jnp.sum(logp * weights)
    total = ce + z_loss * jnp.sum(jnp.square(log_z) * weights) if z_loss else ce
    n_tokens = jnp.sum(weights)
    return total, {"count": n_tokens, "ce_sum": ce, "n_tokens": n_tokens}


def sequence_logprobs(config: ModelConfig, params: Any, tokens: Array, segment_ids: Array, loss_mask: Array) -> Array:
    """[B]: the summed log-probability of each row's masked (response) tokens."""
    logp, _ = token_logprobs(config, params, tokens, segment_ids)
    return jnp.sum(logp * target_weights(segment_ids, loss_mask), axis=-1)


def dpo_losses(
    policy_chosen: Array, policy_rejected: Array, ref_chosen: Array, ref_rejected: Array, settings: DPOConfig
) -> tuple[Array, Array]:
    """(per-pair loss [B], implicit reward margin ``beta * h`` [B]) from sequence log-probs."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if settings.loss == "ipo":
        losses = jnp.square(h - 1.0 / (2.0 * settings.beta))
    else:
        eps = settings.label_smoothing
        losses = -(1.0 - eps) * jax.nn.log_sigmoid(settings.beta * h) - eps * jax.nn.log_sigmoid(-settings.beta * h)
    return losses, settings.beta * h


def dpo_loss(config: ModelConfig, params: Any, batch: Batch, settings: DPOConfig) -> tuple[Array, dict[str, Array]]:
    """Summed DPO loss of a batch of pairs; chosen and rejected rows go through one forward."""
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
    segments = jnp.concatenate([batch["chosen_segment_ids"], batch["rejected_segment_ids"]])
    masks = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
    logps = sequence_logprobs(config, params, tokens, segments, masks)
    chosen, rejected = jnp.split(logps, 2)
    losses, margins = dpo_losses(chosen, rejected, batch["ref_chosen_logp"], batch["ref_rejected_logp"], settings)
    n_pairs = jnp.asarray(losses.shape[0], jnp.float32)
    aux = {
        "count": n_pairs,
        "loss_sum": jnp.sum(losses),
        "reward_margin_sum": jnp.sum(margins),
        "reward_accuracy_sum": jnp.sum((margins > 0).astype(jnp.float32)),
        "chosen_logp_sum": jnp.sum(chosen),
        "rejected_logp_sum": jnp.sum(rejected),
        "n_tokens": jnp.sum(target_weights(segments, masks)),
    }
    return jnp.sum(losses), aux


def objective_loss(objective: str, config: ModelConfig, params: Any, batch: Batch, *, z_loss: float = 0.0,
                   dpo: DPOConfig = DPOConfig()) -> tuple[Array, dict[str, Array]]:
    """The summed loss and sums of ``objective`` (one of ``OBJECTIVES``) on ``batch``."""
    if objective == "dpo":
        return dpo_loss(config, params, batch, dpo)
    if objective in ("lm", "sft"):
        return next_token_loss(config, params, batch, z_loss)
    raise ConfigError(f"objective: expected one of {', '.join(OBJECTIVES)}, got {objective!r}")


def step_metrics(objective: str, aux: dict[str, Array]) -> dict[str, Array]:
    """Per-unit metrics from the summed ``aux`` of one step: ``loss`` (mean per token, or per pair
    for DPO) and the objective's own."""
    count = jnp.maximum(aux["count"], 1.0)
    if objective == "dpo":
        return {
            "loss": aux["loss_sum"] / count,
            "reward_margin": aux["reward_margin_sum"] / count,
            "reward_accuracy": aux["reward_accuracy_sum"] / count,
            "chosen_logp": aux["chosen_logp_sum"] / count,
            "rejected_logp": aux["rejected_logp_sum"] / count,
            "n_pairs": aux["count"],
            "n_tokens": aux["n_tokens"],
        }
    return {"loss": aux["ce_sum"] / count, "n_tokens": aux["n_tokens"]}
