import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from jaxlm import model
from jaxlm.config import model_preset
from jaxlm.intervene import (
    Intervention,
    InterventionError,
    bake_into_params,
    mass_mean_directions,
    output_bias,
    probe_directions,
    random_directions,
    read_sidecar,
    sigma_along,
    sidecar_path,
    top_k_heads,
)

CFG = model_preset("tiny")
L, H, D = CFG.n_layers, CFG.n_heads, CFG.resolved_head_dim
N_TEXTS, T = 32, 6


def random_params(config, seed=0, std=0.1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0.0, std, s.shape), jnp.float32), model.param_shapes(config)
    )


@pytest.fixture(scope="module")
def params():
    return random_params(CFG)


@jax.jit
def head_out(params, tokens, intervention):
    """Captured head_out [L, B, T, H, D] under ``intervention`` applied per its prefill positions."""
    mask = jnp.ones(tokens.shape, bool)
    head = intervention.for_prefill(mask)
    return model.forward(CFG, params, tokens, intervention=head, capture=("head_out",)).captures["head_out"]


@pytest.fixture(scope="module")
def labelled():
    """Token texts: label 1 texts use tokens 200..255, label 0 texts tokens 0..99."""
    rng = np.random.default_rng(0)
    labels = np.arange(N_TEXTS) % 2
    tokens = np.where(labels[:, None] == 1, rng.integers(200, 256, (N_TEXTS, T)), rng.integers(0, 100, (N_TEXTS, T)))
    return jnp.asarray(tokens, jnp.int32), labels


@pytest.fixture(scope="module")
def acts(params, labelled):
    tokens, _ = labelled
    captured = head_out(params, tokens, Intervention.zeros(CFG, "all"))
    return np.asarray(captured[:, :, -1].transpose(1, 0, 2, 3))  # [N, L, H, D] at the last token


def iti(alpha=2.0, mode="last", seed=0):
    rng = np.random.default_rng(seed)
    return Intervention.create(
        random_directions(seed, L, H, D), rng.uniform(0.5, 2.0, (L, H)), rng.random((L, H)) < 0.5, alpha, mode
    )


# -- constructors -------------------------------------------------------------------------


def test_mass_mean_directions_and_sigma():
    rng = np.random.default_rng(1)
    labels = np.array([0, 0, 0, 1, 1])
    acts = rng.normal(size=(5, L, H, D))
    directions = mass_mean_directions(acts, labels, wanted_label=0)
    expected = acts[:3].mean(0) - acts[3:].mean(0)
    expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
    np.testing.assert_allclose(directions, expected, rtol=1e-5)
    np.testing.assert_allclose(mass_mean_directions(acts, labels, wanted_label=1), -expected, rtol=1e-5)
    sigma = sigma_along(acts, directions)
    np.testing.assert_allclose(sigma, np.einsum("nlhd,lhd->nlh", acts, expected).std(0), rtol=1e-5)
    with pytest.raises(InterventionError, match="both the wanted label"):
        mass_mean_directions(acts, np.zeros(5), wanted_label=0)


def test_probe_random_and_top_k():
    weights = np.random.default_rng(2).normal(size=(L, H, D)) * 5
    np.testing.assert_allclose(np.linalg.norm(probe_directions(weights), axis=-1), 1.0, rtol=1e-6)
    norms = np.linalg.norm(weights, axis=-1, keepdims=True)
    np.testing.assert_allclose(probe_directions(weights) * norms, weights, rtol=1e-5)
    a, b = random_directions(0, L, H, D), random_directions(jax.random.key(0), L, H, D)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(jnp.linalg.norm(a, axis=-1), 1.0, rtol=1e-6)
    assert not np.allclose(a, random_directions(1, L, H, D))
    accuracy = np.array([[0.5, 0.9, 0.7, np.nan], [0.8, 0.6, 0.9, 0.55]])
    np.testing.assert_array_equal(top_k_heads(accuracy, 3), [[False, True, False, False], [True, False, True, False]])
    assert top_k_heads(accuracy, 8).all() and not top_k_heads(accuracy, 0).any()
    with pytest.raises(InterventionError, match="k: expected"):
        top_k_heads(accuracy, 9)


def test_from_activations(acts, labelled):
    _, labels = labelled
    accuracy = np.random.default_rng(3).random((L, H))
    iv = Intervention.from_activations(acts, labels, accuracy, k=3, alpha=4.0, position_mode="all")
    assert iv.k == 3 and iv.position_mode == "all" and float(iv.alpha) == 4.0
    np.testing.assert_array_equal(iv.head_mask, top_k_heads(accuracy, 3))
    np.testing.assert_allclose(iv.directions, mass_mean_directions(acts, labels, 0), rtol=1e-6)
    np.testing.assert_allclose(iv.scales, sigma_along(acts, iv.directions), rtol=1e-6)
    # the probe direction is oriented toward the wanted class whatever the weights' sign
    toward = mass_mean_directions(acts, labels, 0)
    for sign in (1.0, -1.0):
        by_probe = Intervention.from_activations(
            acts, labels, accuracy, 3, direction="probe", probe_weights=sign * toward
        )
        np.testing.assert_allclose(by_probe.directions, toward, atol=1e-6)
    rand = Intervention.from_activations(acts, labels, accuracy, 3, direction="random", key=7)
    np.testing.assert_allclose(rand.directions, random_directions(7, L, H, D), rtol=1e-6)
    with pytest.raises(InterventionError, match="needs probe_weights"):
        Intervention.from_activations(acts, labels, accuracy, 3, direction="probe")
    with pytest.raises(InterventionError, match="direction: expected"):
        Intervention.from_activations(acts, labels, accuracy, 3, direction="pca")


# -- positions and effects ----------------------------------------------------------------


def test_prefill_positions_per_mode():
    mask = jnp.asarray([[False, False, True, True], [True, True, True, True], [False, False, False, True]])
    expected = {
        "last": [[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 1]],
        "all": np.asarray(mask),
        "prompt": np.asarray(mask),
        "generated": np.zeros((3, 4)),
    }
    for mode, want in expected.items():
        np.testing.assert_array_equal(iti(mode=mode).prefill_positions(mask), np.asarray(want, bool))
        np.testing.assert_array_equal(iti(mode=mode).for_prefill(mask).edits[0].position_mask, np.asarray(want, bool))
        step = iti(mode=mode).for_decode_step(3).edits[0].position_mask
        assert step.tolist() == [[mode != "prompt"]] * 3
    right_padded = jnp.asarray([[True, True, False]])  # the last real token, wherever it is
    np.testing.assert_array_equal(iti(mode="last").prefill_positions(right_padded), [[False, True, False]])


@pytest.mark.parametrize("mode", ["last", "all", "prompt", "generated"])
def test_each_mode_touches_exactly_its_positions(params, labelled, mode):
    tokens = labelled[0][:4]
    iv = iti(alpha=3.0, mode=mode)
    base = np.asarray(head_out(params, tokens, iv.with_alpha(0.0)))
    moved = np.asarray(head_out(params, tokens, iv))
    changed = np.abs(moved - base).max(axis=(0, 3, 4)) > 1e-6  # [B, T]: any layer/head/dim moved
    want = np.asarray(iv.prefill_positions(jnp.ones(tokens.shape, bool)))
    np.testing.assert_array_equal(changed, want)
    # at the first layer the shift is exactly alpha * sigma * direction on the chosen heads
    delta = moved[0] - base[0]  # [B, T, H, D]
    shift = np.asarray(iv.alpha * iv.head_shift())[0]
    np.testing.assert_allclose(delta, want[:, :, None, None] * shift[None, None], atol=1e-5)


def test_iti_moves_a_probe_score_toward_the_wanted_class(params, labelled, acts):
    tokens, labels = labelled
    # per-head logistic-regression probes for "label 1" (the unwanted class, e.g. toxic)
    weights = np.zeros((L, H, D))
    for layer in range(L):
        for h in range(H):
            weights[layer, h] = LogisticRegression(max_iter=1000).fit(acts[:, layer, h], labels).coef_[0]
    accuracy = np.full((L, H), 0.5)
    accuracy[0, :2] = 1.0  # intervene on two first-layer heads
    iv = Intervention.from_activations(
        acts, labels, accuracy, k=2, alpha=5.0, position_mode="last", direction="probe", probe_weights=weights
    )
    moved = np.asarray(head_out(params, tokens, iv))[:, :, -1].transpose(1, 0, 2, 3)
    score_before = np.einsum("nhd,hd->nh", acts[:, 0, :2], weights[0, :2])
    score_after = np.einsum("nhd,hd->nh", moved[:, 0, :2], weights[0, :2])
    # the probe's "label 1" score falls by alpha * sigma * |w| on every example
    drop = 5.0 * np.asarray(iv.scales[0, :2]) * np.linalg.norm(weights[0, :2], axis=-1)
    np.testing.assert_allclose(score_before - score_after, np.broadcast_to(drop, score_before.shape), rtol=1e-3)
    assert (drop > 0).all()
    # along the direction itself the projection grows by exactly alpha * sigma
    proj = np.einsum("nhd,hd->nh", moved[:, 0, :2] - acts[:, 0, :2], np.asarray(iv.directions[0, :2]))
    np.testing.assert_allclose(proj, np.broadcast_to(5.0 * np.asarray(iv.scales[0, :2]), proj.shape), rtol=1e-3)


def test_baked_bias_equals_mode_all(params, labelled):
    tokens = labelled[0][:4]
    iv = iti(alpha=3.0, mode="all")
    baked = bake_into_params(CFG, params, iv)
    assert "out_bias" not in params["layers"]["attention"]  # input untouched
    assert baked["layers"]["attention"]["out_bias"].shape == (L, CFG.d_model)
    with_bias = model.forward(CFG, baked, tokens).logits
    shifted = model.forward(CFG, params, tokens, intervention=iv.for_prefill(jnp.ones(tokens.shape, bool))).logits
    plain = model.forward(CFG, params, tokens).logits
    np.testing.assert_allclose(with_bias, shifted, atol=2e-5)
    assert np.abs(np.asarray(with_bias - plain)).max() > 1e-2
    w_out = np.asarray(params["layers"]["attention"]["out"])
    manual = np.einsum("lhd,lhdm->lm", 3.0 * np.asarray(iv.head_shift()), w_out)
    np.testing.assert_allclose(output_bias(CFG, params, iv), manual, atol=1e-5)
    twice = bake_into_params(CFG, baked, iv)["layers"]["attention"]["out_bias"]
    np.testing.assert_allclose(twice, 2 * manual, atol=1e-5)


# -- files and checks ---------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    iv = iti(alpha=2.5, mode="generated")
    written = iv.save(tmp_path / "sub" / "toxicity", provenance={"checkpoint": "ckpt/step_10", "k": iv.k})
    assert written == tmp_path / "sub" / "toxicity.safetensors" and sidecar_path(written).is_file()
    loaded = Intervention.load(written, config=CFG)
    for name in ("directions", "scales", "head_mask", "alpha"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(iv, name))
        assert getattr(loaded, name).dtype == getattr(iv, name).dtype
    assert loaded.position_mode == "generated"
    meta = read_sidecar(written)
    assert meta["k"] == iv.k and meta["provenance"]["checkpoint"] == "ckpt/step_10"
    assert meta["shape"] == {"n_layers": L, "n_heads": H, "head_dim": D}
    # only safetensors + JSON: no pickle anywhere
    assert sorted(p.name for p in written.parent.iterdir()) == ["toxicity.json", "toxicity.safetensors"]


def test_mismatched_shapes_name_the_dimension(tmp_path):
    cases = (({"n_layers": 3}, "n_layers=3"), ({"n_heads": 2}, "n_heads=2"), ({"d_model": 64}, "head_dim=16"))
    for changes, field in cases:
        with pytest.raises(InterventionError, match=field):
            iti().check_compatible(model_preset("tiny", **changes))
    path = iti().save(tmp_path / "iv")
    message = r"iv.safetensors.*edit0.v axis 1 \(H\) is 4 but the model has n_heads=8"
    with pytest.raises(InterventionError, match=message):
        Intervention.load(path, config=model_preset("tiny", n_heads=8, head_dim=8))
    with pytest.raises(InterventionError, match="scales: expected shape"):
        Intervention.create(np.zeros((L, H, D)), np.zeros((L, H + 1)), np.zeros((L, H), bool))


def test_load_reports_bad_files(tmp_path):
    path = iti().save(tmp_path / "iv")
    meta = json.loads(sidecar_path(path).read_text())
    edits = [{**meta["edits"][0], "positions": "middle"}]
    sidecar_path(path).write_text(json.dumps({**meta, "edits": edits}))
    with pytest.raises(InterventionError, match=r"iv.json: edits\[0\].positions: expected one of last, all, prompt, generated"):
        Intervention.load(path)
    sidecar_path(path).write_text(json.dumps({**meta, "format": "jaxlm-iti-v9"}))
    with pytest.raises(InterventionError, match="format: expected 'jaxlm-intervention-v2'"):
        Intervention.load(path)
    sidecar_path(path).unlink()
    with pytest.raises(InterventionError, match="missing JSON sidecar"):
        Intervention.load(path)
    with pytest.raises(InterventionError, match="no such intervention file"):
        Intervention.load(tmp_path / "absent.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InterventionError, match="not a readable safetensors file"):
        Intervention.load(tmp_path / "junk.safetensors")
