"""The toy superposition experiment: data, geometry, estimators, statistics, end to end."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import toy
from jaxlm.config import ConfigError

CFG = toy.ToyConfig()


# -- data ---------------------------------------------------------------------------------


def test_feature_sequences_follow_their_chain():
    seqs = toy.feature_sequences(CFG)
    succ = toy.successor_table(CFG.chains)
    chain, start = toy.feature_chain_and_start(CFG)
    assert seqs.shape == (12, CFG.seq_len)
    np.testing.assert_array_equal(seqs[:, 0], start)
    np.testing.assert_array_equal(seqs[:, 1:], succ[chain[:, None], seqs[:, :-1]])
    # Every feature is one unique sequence, and from position 2 on the prefix names it.
    assert len({tuple(s) for s in seqs}) == 12
    assert len({tuple(s[:3]) for s in seqs}) == 12
    assert len({tuple(s[:2]) for s in seqs}) < 12  # at position 1 some chains still agree
    # Each chain is a cycle through all 4 states.
    assert all(sorted(s[:4]) == [0, 1, 2, 3] for s in seqs)
    assert toy.rare_feature_mask(CFG).sum() == 4 and np.all(chain[toy.rare_feature_mask(CFG)] == CFG.rare_chain)


@pytest.mark.parametrize("share", [0.05, 1.0])
def test_sampled_shares_are_realised(share):
    log_w = jnp.log(jnp.asarray(toy.feature_weights(CFG, share)))
    _, features = toy.sample_batch(jax.random.key(0), CFG, log_w, 200_000)
    rare = toy.rare_feature_mask(CFG)[np.asarray(features)]
    expected = share * 4 / (share * 4 + 8)
    assert toy.rare_data_fraction(CFG, share) == pytest.approx(expected)
    assert rare.mean() == pytest.approx(expected, abs=4 * math.sqrt(expected * (1 - expected) / 200_000))
    counts = np.bincount(np.asarray(features), minlength=12)
    assert counts.min() > 0 and counts[~toy.rare_feature_mask(CFG)].std() / counts[~toy.rare_feature_mask(CFG)].mean() < 0.02


def test_noisy_transitions_rate():
    cfg = toy.ToyConfig(transition_noise=0.3)
    features = jnp.repeat(jnp.arange(12), 500)
    tokens = np.asarray(toy.sample_sequences(jax.random.key(1), cfg, features))
    succ = toy.successor_table(cfg.chains)
    chain = toy.feature_chain_and_start(cfg)[0][np.asarray(features)]
    off_chain = tokens[:, 1:] != succ[chain[:, None], tokens[:, :-1]]
    # A jump lands on the chain's own successor 1 time in 4.
    assert off_chain.mean() == pytest.approx(0.3 * 3 / 4, abs=0.01)
    np.testing.assert_array_equal(tokens[:, 0], toy.feature_chain_and_start(cfg)[1][np.asarray(features)])


def test_config_validation_and_loading(tmp_path):
    with pytest.raises(ConfigError, match="vocab_size: expected 4"):
        toy.load_toy_config(None, ["model.vocab_size=5"])
    with pytest.raises(ConfigError, match=r"chains\[1\]"):
        toy.ToyConfig(chains=((0, 1, 2, 3), (0, 1, 1, 3), (0, 3, 2, 1)))
    with pytest.raises(ConfigError, match="distinct"):
        toy.ToyConfig(chains=((0, 1, 2, 3), (1, 2, 3, 0), (0, 3, 2, 1)))  # same cycle, rotated
    path = tmp_path / "toy.yaml"
    path.write_text("model:\n  mlp_hidden: 64\nseeds: 3\n")
    cfg = toy.load_toy_config(path, ["model.position_embedding=rope"])
    # Only the named fields change; the rest stay the toy model's (not ModelConfig's OLMo defaults).
    assert (cfg.model.mlp_hidden, cfg.model.d_model, cfg.model.n_layers, cfg.model.vocab_size) == (64, 4, 4, 4)
    assert cfg.model.position_embedding == "rope" and cfg.seeds == 3
    path.write_text("model:\n  widht: 3\n")
    with pytest.raises(ConfigError, match="toy.yaml.*widht"):
        toy.load_toy_config(path)


# -- geometry and statistics -------------------------------------------------------------


def test_entanglement_and_welch_bound():
    np.testing.assert_allclose(toy.entanglement(jnp.eye(4)), 0.0, atol=1e-7)
    # Three directions at 120 degrees in the plane: a tight frame meeting the Welch bound 1/2.
    angles = np.asarray([0, 2 * np.pi / 3, 4 * np.pi / 3])
    frame = np.stack([np.cos(angles), np.sin(angles)], axis=1) * np.asarray([[1.0], [3.0], [0.2]])  # norms ignored
    np.testing.assert_allclose(toy.entanglement(jnp.asarray(frame)), 0.5, atol=1e-6)
    assert toy.welch_bound(3, 2) == pytest.approx(0.5)
    assert toy.welch_bound(12, 4) == pytest.approx(0.4264, abs=1e-4)
    # A sign flip does not change |cos|; a duplicated direction is fully entangled.
    v = jnp.asarray([[1.0, 0.0], [0.6, 0.8], [-0.6, -0.8]])
    np.testing.assert_allclose(toy.entanglement(v), [0.6, 1.0, 1.0], atol=1e-6)
    with pytest.raises(ValueError):
        toy.welch_bound(4, 4)


def test_random_entanglement_level():
    level = toy.random_entanglement(12, 4, draws=4000)
    assert toy.welch_bound(12, 4) < level["q025"] < level["mean"] < level["q975"] < 1.0
    # Two random directions in the plane: E = |cos| of a uniform angle, mean 2/pi.
    assert toy.random_entanglement(2, 2, draws=20000)["mean"] == pytest.approx(2 / np.pi, abs=0.01)


def test_paired_difference_on_constructed_values():
    from scipy import stats

    control = np.asarray([0.80, 0.82, 0.79, 0.85, 0.81, 0.83])
    under = control + np.asarray([0.10, 0.12, 0.08, 0.11, 0.09, 0.10])
    out = toy.paired_difference(under, control)
    diff = under - control
    half = stats.t.ppf(0.975, 5) * diff.std(ddof=1) / np.sqrt(6)
    assert out["mean"] == pytest.approx(0.1)
    np.testing.assert_allclose(out["ci95"], [0.1 - half, 0.1 + half])
    assert out["p_value"] == pytest.approx(stats.ttest_rel(under, control).pvalue) and out["p_value"] < 1e-4
    assert out["wilcoxon_p"] == pytest.approx(2 / 2**6)  # all 6 differences positive: exact two-sided p
    no_effect = toy.paired_difference(control, control)
    assert no_effect["mean"] == 0 and no_effect["p_value"] is None and no_effect["wilcoxon_p"] is None
    with pytest.raises(ValueError, match="equal length"):
        toy.paired_difference(under, control[:3])


# -- estimators --------------------------------------------------------------------------


def test_logistic_regressions_match_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 3))
    y = (x @ np.asarray([1.5, -2.0, 0.5]) + 0.3 + rng.standard_normal(120) > 0).astype(np.float32)
    w, b = toy.fit_logistic(jnp.asarray(x, jnp.float32), jnp.asarray(y), jnp.ones(120), 0.5)
    ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=10000).fit(x, y)
    np.testing.assert_allclose(w, ref.coef_[0], atol=2e-4)
    np.testing.assert_allclose(b, ref.intercept_[0], atol=2e-4)

    labels = rng.integers(0, 4, 150)
    centers = rng.standard_normal((4, 3)) * 1.5
    xm = centers[labels] + rng.standard_normal((150, 3))
    W, bm = toy.fit_multinomial(jnp.asarray(xm, jnp.float32), jnp.asarray(labels), jnp.ones(150), 4, 2.0)
    ref = LogisticRegression(C=2.0, tol=1e-10, max_iter=10000).fit(xm, labels)
    np.testing.assert_allclose(W, ref.coef_, atol=2e-3)
    np.testing.assert_allclose(bm - bm.mean(), ref.intercept_ - ref.intercept_.mean(), atol=2e-3)


def planted_activations(n_features=12, n_tokens=4, d=16, per_cell=10, seed=0):
    """Activations = token offset + 3 * planted unit direction of the feature + noise."""
    rng = np.random.default_rng(seed)
    planted = np.linalg.qr(rng.standard_normal((d, d)))[0][:n_features]  # orthonormal rows
    token_offsets = rng.standard_normal((n_tokens, d)) * 5
    features = np.repeat(np.arange(n_features), n_tokens * per_cell)
    tokens = np.tile(np.repeat(np.arange(n_tokens), per_cell), n_features)
    acts = token_offsets[tokens] + 3 * planted[features] + 0.5 * rng.standard_normal((features.size, d))
    return jnp.asarray(acts, jnp.float32), jnp.asarray(features), jnp.asarray(tokens), planted


@pytest.mark.parametrize("method", toy.METHODS)
def test_estimators_recover_planted_directions(method):
    acts, features, tokens, planted = planted_activations()
    dirs = np.asarray(toy.directions(method, acts, features, tokens, 12, 4, C=1.0))
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0, atol=1e-5)
    cos = np.sum(dirs * planted, axis=1)
    # One-vs-rest directions point along u_i minus a little of the others' mean (cos ~ 0.96).
    assert cos.min() > 0.9, cos
    assert np.all(np.argmax(np.abs(dirs @ planted.T), axis=1) == np.arange(12))


def test_probe_recipe_averages_per_token_normals():
    """A feature whose direction differs per token gets the renormalised mean of the unit normals."""
    rng = np.random.default_rng(1)
    d, per_cell = 6, 30
    features = np.repeat([0, 1], 2 * per_cell)
    tokens = np.tile(np.repeat([0, 1], per_cell), 2)
    axis = np.where(tokens == 0, 0, 1)  # feature 0 sits +4 along e0 at token 0, along e1 at token 1
    acts = 0.3 * rng.standard_normal((features.size, d))
    acts[np.arange(features.size), axis] += np.where(features == 0, 4.0, 0.0)
    dirs = np.asarray(toy.probe_directions(jnp.asarray(acts, jnp.float32), jnp.asarray(features), jnp.asarray(tokens), 2, 2, 1.0))
    np.testing.assert_allclose(dirs[0, :2], [np.sqrt(0.5), np.sqrt(0.5)], atol=0.05)
    np.testing.assert_allclose(dirs[1], -dirs[0], atol=1e-5)


# -- end to end ----------------------------------------------------------------------------


def test_cli_end_to_end(tmp_path):
    from jaxlm.cli import main

    out = tmp_path / "toy"
    code = main([
        "toy", "--out", str(out), "--seeds", "2", "--shares", "0.01", "1", "--steps", "40", "--no-progress",
        "checkpoints=[20]", "probe_C=[1.0, 0.1]", "optimizer.warmup_steps=0", "optimizer.lr=0.01",
        "model.n_layers=1", "newton_iterations=10",
    ])
    assert code == 0
    results = json.loads((out / "toy_results.json").read_text())
    assert (out / "toy_entanglement.png").stat().st_size > 1000
    assert [r["share"] for r in results["shares"]] == [0.01, 1.0]
    for record in results["shares"]:
        for group in ("underrepresented", "control"):
            assert 0.0 <= record[group]["mean"] <= 1.0 and len(record[group]["ci95"]) == 2
        diff = record["difference"]
        assert set(diff) >= {"mean", "ci95", "p_value", "wilcoxon_p"}
        assert diff["mean"] == pytest.approx(record["underrepresented"]["mean"] - record["control"]["mean"], abs=1e-5)
    assert results["welch_bound"] == pytest.approx(toy.welch_bound(12, 4), abs=1e-5)
    assert results["welch_bound"] < results["random_level"]["mean"] < 1
    assert results["primary"] == {"method": "probe", "C": 1.0, "layer": 0, "step": 40}
    # 4 methods, 1 layer, 2 checkpoints; C varies for the probe and multinomial methods only.
    assert len(results["grid"]) == (2 * 2 + 2) * 1 * 2
    assert np.asarray(results["per_seed"]["underrepresented"]).shape == (2, 2)
    assert results["final_loss"]["max"] < math.log(4)  # learned something in 40 steps


@pytest.mark.parametrize("kind", ["learned", "none"])
def test_position_embedding_variants(kind):
    """``none``: one block sees its prefix as a set (swapping earlier tokens changes nothing)."""
    from jaxlm import model as model_lib

    cfg = dataclasses.replace(toy.TOY_MODEL, position_embedding=kind, init_std=0.5, n_layers=1)
    params = model_lib.init_params(cfg, 0)
    assert ("position_embedding" in params) == (kind == "learned")
    if kind == "learned":
        assert params["position_embedding"].shape == (cfg.max_seq_len, cfg.d_model)
    tokens = jnp.asarray([[0, 1, 2, 3], [1, 0, 2, 3]])
    logits = model_lib.forward(cfg, params, tokens).logits
    gap = float(jnp.abs(logits[0, -1] - logits[1, -1]).max())
    assert (gap < 1e-5) if kind == "none" else (gap > 1e-4)
