"""Objectives: masked SFT loss and DPO (formula, start value, a learnable preference)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import model as model_lib
from jaxlm import objectives
from jaxlm.config import ConfigError, MeshConfig, model_preset
from jaxlm.objectives import DPOConfig
from jaxlm.optim import OptimizerConfig
from jaxlm.sharding import make_mesh
from jaxlm.train import Trainer

CONFIG = model_preset("tiny", vocab_size=64, max_seq_len=16)


def _batch(rng, b=3, t=12):
    tokens = rng.integers(1, 64, size=(b, t)).astype(np.int32)
    segments = np.ones((b, t), np.int32)
    segments[0, 9:] = 0  # padding
    segments[1, 6:] = 2  # a second packed example
    mask = np.zeros((b, t), np.int32)
    mask[:, 4:] = 1  # responses start at position 4 (and at 8 in row 1's second segment)
    mask[1, 6:8] = 0
    return {"tokens": tokens, "segment_ids": segments, "loss_mask": mask * (segments > 0)}


def test_masked_loss_trains_exactly_the_response_tokens():
    rng = np.random.default_rng(0)
    batch = _batch(rng)
    params = model_lib.init_params(CONFIG, 0)
    loss, aux = objectives.next_token_loss(CONFIG, params, {k: jnp.asarray(v) for k, v in batch.items()})
    logits = model_lib.forward(CONFIG, params, jnp.asarray(batch["tokens"]), segment_ids=jnp.asarray(batch["segment_ids"])).logits
    logp = jax.nn.log_softmax(np.asarray(logits), axis=-1)
    expected, count = 0.0, 0
    for b in range(3):
        for t in range(1, 12):
            seg = batch["segment_ids"][b]
            if batch["loss_mask"][b, t] and seg[t] == seg[t - 1] and seg[t] != 0:
                expected -= float(logp[b, t - 1, batch["tokens"][b, t]])
                count += 1
    assert count == int(aux["n_tokens"]) == int(aux["count"])
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_prompt_positions_get_zero_gradient():
    rng = np.random.default_rng(1)
    batch = _batch(rng)
    logits = jnp.asarray(rng.normal(size=(3, 12, 64)), jnp.float32)

    def loss(lg):
        logp, _ = objectives.next_token_logprobs(lg, jnp.asarray(batch["tokens"]))
        w = objectives.target_weights(jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["loss_mask"]))
        return -jnp.sum(logp * w)

    grad = np.asarray(jax.grad(loss)(logits))  # grad at position t-1 is the loss of target t
    trained = np.asarray(objectives.target_weights(jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["loss_mask"])))
    per_position = np.abs(grad[:, :-1]).sum(-1)
    assert np.all(per_position[trained == 0] == 0)
    assert np.all(per_position[trained == 1] > 0)
    assert np.all(grad[:, -1] == 0)


@pytest.mark.parametrize("loss, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)])
def test_dpo_losses_equal_the_formula(loss, smoothing):
    settings = DPOConfig(beta=0.5, loss=loss, label_smoothing=smoothing)
    pc, pr = np.array([-3.0, -10.0, -2.0]), np.array([-4.0, -1.0, -2.0])
    rc, rr = np.array([-3.5, -9.0, -1.0]), np.array([-3.0, -2.0, -2.5])
    losses, margins = objectives.dpo_losses(*(jnp.asarray(x) for x in (pc, pr, rc, rr)), settings)
    h = (pc - rc) - (pr - rr)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    if loss == "ipo":
        expected = (h - 1 / (2 * 0.5)) ** 2
    else:
        expected = -(1 - smoothing) * np.log(sig(0.5 * h)) - smoothing * np.log(sig(-0.5 * h))
    np.testing.assert_allclose(np.asarray(losses), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(margins), 0.5 * h, rtol=1e-6)


def test_dpo_config_is_validated():
    with pytest.raises(ConfigError, match="dpo.beta"):
        DPOConfig(beta=0)
    with pytest.raises(ConfigError, match="label_smoothing"):
        DPOConfig(label_smoothing=0.5)
    with pytest.raises(ConfigError, match="sigmoid loss only"):
        DPOConfig(loss="ipo", label_smoothing=0.1)


def _pairs(n=16, t=12):
    """Prompt = 4 random tokens; chosen continues with token 5 repeated, rejected with token 9."""
    rng = np.random.default_rng(3)
    prompt = rng.integers(10, 64, size=(n, 4))
    batch = {}
    for key, token in (("chosen", 5), ("rejected", 9)):
        tokens = np.concatenate([prompt, np.full((n, t - 4), token)], axis=1).astype(np.int32)
        mask = np.zeros((n, t), np.int32)
        mask[:, 4:] = 1
        batch.update({f"{key}_tokens": tokens, f"{key}_segment_ids": np.ones((n, t), np.int32), f"{key}_loss_mask": mask})
    return batch


def test_dpo_starts_at_log_2_and_learns_a_synthetic_preference():
    mesh = make_mesh(MeshConfig())
    trainer = Trainer(CONFIG, OptimizerConfig(lr=3e-3, warmup_steps=0, schedule="constant"), 40, mesh,
                      objective="dpo", dpo=DPOConfig(beta=0.5))
    state = trainer.init_state(0)
    pairs = _pairs()
    ref = {}
    for key in ("chosen", "rejected"):
        ref[f"ref_{key}_logp"] = np.asarray(objectives.sequence_logprobs(
            CONFIG, state.params, pairs[f"{key}_tokens"], pairs[f"{key}_segment_ids"], pairs[f"{key}_loss_mask"]))
    batch = {**pairs, **ref}
    example = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    step = trainer.jit_step(example)
    history = []
    for _ in range(40):
        state, metrics = step(state, batch)
        history.append({k: float(v) for k, v in metrics.items()})
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert history[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert history[-1]["loss"] < 0.1 < history[0]["loss"]
    assert history[-1]["reward_accuracy"] == 1.0
    assert history[-1]["reward_margin"] > history[5]["reward_margin"] > 0
    gain = (history[-1]["chosen_logp"] - history[-1]["rejected_logp"]) - (ref["ref_chosen_logp"] - ref["ref_rejected_logp"]).mean()
    assert gain > 5.0


def test_grad_accumulation_gives_the_same_dpo_step():
    mesh = make_mesh(MeshConfig())
    pairs = _pairs(n=8)
    batch = {**pairs, "ref_chosen_logp": np.full(8, -20.0, np.float32), "ref_rejected_logp": np.full(8, -18.0, np.float32)}
    example = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    results = []
    for accum in (1, 4):
        trainer = Trainer(CONFIG, OptimizerConfig(lr=1e-3, warmup_steps=0), 10, mesh, grad_accum=accum, objective="dpo")
        state, metrics = trainer.jit_step(example)(trainer.init_state(0), batch)
        results.append((jax.device_get(state.params), {k: float(v) for k, v in metrics.items()}))
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)
    for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0])):
        np.testing.assert_allclose(a, b, atol=1e-6)
