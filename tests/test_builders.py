"""Intervention builders (iti, caa, ablate, leace, random) on synthetic labelled activations, and the
site-general activation collector they read from.

Each builder gives the expected edits and numbers (against independent numpy or the reference
estimators), runs through ``decode.generate`` on the tiny model, is the identity at scale 0, and
refuses bad settings naming them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import decode, model
from jaxlm.concepts import ConceptError, leace_fit_per_layer
from jaxlm.config import model_preset
from jaxlm.decode import left_pad
from jaxlm.intervene import (
    BUILDERS,
    Intervention,
    InterventionError,
    build_intervention,
    builder_settings,
    builder_site,
)
from jaxlm.probe import ProbeError, collect_activations, collect_head_activations

CFG = model_preset("tiny")
L, H, D, DM = CFG.n_layers, CFG.n_heads, CFG.resolved_head_dim, CFG.d_model
N = 48
PROMPTS = [[5, 17, 99, 3], [42, 7], [250, 1, 2]]
RESIDUAL = ("resid_pre", "resid_mid", "resid_post")


@pytest.fixture(scope="module")
def params():
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape), jnp.float32), model.param_shapes(CFG))


@pytest.fixture(scope="module")
def labels():
    return np.arange(N) % 2  # 0 = wanted (non-toxic), 1 = other


def synthetic(labels, shape, seed=0, shift=1.5):
    """Gaussian activations [N, *shape] whose class 1 is moved by ``shift`` along a random direction per unit."""
    rng = np.random.default_rng(seed)
    offset = rng.normal(size=shape)
    offset *= shift / np.linalg.norm(offset, axis=-1, keepdims=True)
    return (rng.normal(size=(N, *shape)) + labels.reshape(-1, *[1] * len(shape)) * offset).astype(np.float32)


@pytest.fixture(scope="module")
def head_acts(labels):
    return synthetic(labels, (L, H, D))


@pytest.fixture(scope="module")
def resid_acts(labels):
    return synthetic(labels, (L, DM), seed=1)


@pytest.fixture(scope="module")
def accuracy():
    return np.random.default_rng(2).uniform(0.5, 1.0, (L, H))


def build(method, head_acts, resid_acts, labels, accuracy, **settings):
    acts = head_acts if builder_site(method, **settings) == "head_out" else resid_acts
    if method == "iti" or (method == "random" and settings.get("base", "iti") == "iti"):
        settings = {"accuracy": accuracy, "k": 3, **settings}
    return build_intervention(method, acts, labels, **settings)


def class_mean_difference(acts, labels):
    return acts[labels == 0].astype(np.float64).mean(0) - acts[labels == 1].astype(np.float64).mean(0)


# -- each builder's edits and numbers -----------------------------------------------------


@pytest.mark.parametrize("direction", ["mass_mean", "probe", "random"])
def test_iti_is_from_activations(head_acts, labels, accuracy, direction):
    weights = np.random.default_rng(3).normal(size=(L, H, D))
    built = build_intervention("iti", head_acts, labels, accuracy=accuracy, k=3, direction=direction,
                               probe_weights=weights, seed=5, scale=4.0)
    want = Intervention.from_activations(head_acts, labels, accuracy, 3, 4.0, "last", direction,
                                         probe_weights=weights, key=5)
    assert built.method == "iti" and built.structure() == want.structure() == (("head_out", "add", "last"),)
    for a, b in zip(jax.tree.leaves(built), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    assert built.k == 3


@pytest.mark.parametrize("site", ["resid_pre", "resid_post"])
def test_caa_adds_the_class_mean_difference_at_its_layer_only(resid_acts, labels, site):
    for layer in range(L):
        iv = build_intervention("caa", resid_acts, labels, layer=layer, site=site, scale=2.5)
        (edit,) = iv.edits
        assert iv.method == "caa" and iv.structure() == ((site, "add", "all"),) and float(iv.scale) == 2.5
        np.testing.assert_array_equal(edit.layer_mask, np.arange(L) == layer)
        want = np.zeros((L, DM))
        want[layer] = class_mean_difference(resid_acts[:, layer], labels)
        np.testing.assert_allclose(edit.arrays["v"], want, rtol=1e-6, atol=1e-7)
    default = build_intervention("caa", resid_acts, labels)
    np.testing.assert_array_equal(default.edits[0].layer_mask, np.arange(L) == L // 2)  # the middle layer


def test_ablate_removes_the_direction_at_every_residual_write(params, resid_acts, labels):
    iv = build_intervention("ablate", resid_acts, labels, layer=0)
    assert iv.method == "ablate" and iv.structure() == tuple((s, "project", "all") for s in RESIDUAL)
    u = class_mean_difference(resid_acts[:, 0], labels)
    u /= np.linalg.norm(u)
    for edit in iv.edits:
        np.testing.assert_allclose(edit.arrays["u"], np.broadcast_to(u, (L, DM)), atol=1e-6)
        np.testing.assert_array_equal(edit.arrays["c"], 0.0)
    np.testing.assert_array_equal(iv.edits[0].layer_mask, [True] + [False] * (L - 1))  # the embedding write
    np.testing.assert_array_equal(iv.edits[1].layer_mask & iv.edits[2].layer_mask, True)

    tokens = jnp.asarray(np.random.default_rng(4).integers(0, CFG.vocab_size, (2, 7)), jnp.int32)
    mask = jnp.ones(tokens.shape, bool)
    base = model.forward(CFG, params, tokens, capture=RESIDUAL).captures
    out = model.forward(CFG, params, tokens, intervention=iv.for_prefill(mask), capture=RESIDUAL).captures
    for site in RESIDUAL:
        along = np.einsum("lbtd,d->lbt", np.asarray(out[site], np.float64), u)
        np.testing.assert_allclose(along, 0.0, atol=1e-5)
        assert np.abs(np.einsum("lbtd,d->lbt", np.asarray(base[site], np.float64), u)).max() > 1e-2


def test_leace_edit_is_the_concepts_eraser(resid_acts, labels):
    layer = 1
    iv = build_intervention("leace", resid_acts, labels, layer=layer, site="resid_mid")
    (edit,) = iv.edits
    assert iv.method == "leace" and iv.structure() == (("resid_mid", "erase", "all"),)
    np.testing.assert_array_equal(edit.layer_mask, np.arange(L) == layer)
    eraser = leace_fit_per_layer(resid_acts, labels)
    np.testing.assert_allclose(edit.arrays["P"][layer], eraser.P[layer], atol=1e-5)
    np.testing.assert_allclose(edit.arrays["mu"][layer], eraser.mu[layer], atol=1e-6)
    np.testing.assert_array_equal(edit.arrays["P"][1 - layer], 0.0)
    x = resid_acts[:, layer].astype(np.float64)
    erased = x - (x - np.asarray(edit.arrays["mu"][layer])) @ np.asarray(edit.arrays["P"][layer]).T
    np.testing.assert_allclose(erased, eraser.erase(resid_acts.astype(np.float64))[:, layer], atol=1e-4)
    np.testing.assert_allclose(class_mean_difference(erased, labels), 0.0, atol=1e-4)  # the concept's trace is gone


@pytest.mark.parametrize("base", ["iti", "caa", "ablate"])
def test_random_has_the_base_structure_and_norms_and_is_seeded(head_acts, resid_acts, labels, accuracy, base):
    settings = {} if base == "iti" else {"layer": 1}
    reference = build(base, head_acts, resid_acts, labels, accuracy, **settings)
    control = build("random", head_acts, resid_acts, labels, accuracy, base=base, seed=7, **settings)
    assert control.method == "random" and control.structure() == reference.structure()
    assert float(control.scale) == float(reference.scale)
    for ours, theirs in zip(control.edits, reference.edits):
        name = "u" if ours.op == "project" else "v"
        np.testing.assert_array_equal(ours.gate(), theirs.gate())
        np.testing.assert_allclose(np.linalg.norm(ours.arrays[name], axis=-1),
                                   np.linalg.norm(theirs.arrays[name], axis=-1), rtol=1e-5, atol=1e-7)
        cosine = np.abs(np.sum(np.asarray(ours.arrays[name]) * np.asarray(theirs.arrays[name]), -1))
        assert cosine.max() < 0.99 * np.linalg.norm(theirs.arrays[name], axis=-1).max() ** 2
    again = build("random", head_acts, resid_acts, labels, accuracy, base=base, seed=7, **settings)
    other = build("random", head_acts, resid_acts, labels, accuracy, base=base, seed=8, **settings)
    for a, b in zip(jax.tree.leaves(control), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(control.edits[-1].arrays["u" if base == "ablate" else "v"],
                              other.edits[-1].arrays["u" if base == "ablate" else "v"])


# -- every built intervention in decoding -------------------------------------------------


@pytest.mark.parametrize("method", sorted(BUILDERS))
def test_each_built_intervention_decodes_and_scale_zero_is_no_intervention(params, head_acts, resid_acts, labels,
                                                                            accuracy, method):
    iv = build(method, head_acts, resid_acts, labels, accuracy, scale=3.0)
    tokens, mask = left_pad(PROMPTS)
    plain = decode.generate(CFG, params, tokens, prompt_mask=mask, max_new_tokens=4, return_logprobs=True)
    zero = decode.generate(CFG, params, tokens, prompt_mask=mask, max_new_tokens=4, intervention=iv.with_scale(0.0),
                           return_logprobs=True)
    np.testing.assert_array_equal(zero.tokens, plain.tokens)
    np.testing.assert_allclose(zero.logprobs, plain.logprobs, atol=2e-6)
    moved = decode.generate(CFG, params, tokens, prompt_mask=mask, max_new_tokens=4, intervention=iv,
                            return_logprobs=True)
    assert np.abs(np.asarray(moved.logprobs - plain.logprobs)).max() > 1e-4


# -- settings, provenance, refusals -------------------------------------------------------


def test_settings_for_provenance_and_sites():
    assert builder_settings("caa", layer=1) == {"layer": 1, "site": "resid_pre", "positions": "all",
                                                "wanted_label": 0, "scale": 1.0}
    iti = builder_settings("iti", accuracy=np.zeros((L, H)), k=3)
    assert "accuracy" not in iti and iti["k"] == 3 and iti["direction"] == "mass_mean" and iti["positions"] == "last"
    random = builder_settings("random", base="ablate", seed=4, layer=0)
    assert random["base"] == "ablate" and random["seed"] == 4 and random["layer"] == 0 and random["positions"] == "all"
    assert builder_site("iti") == builder_site("random") == "head_out"
    assert builder_site("caa") == "resid_pre" and builder_site("leace", site="resid_post") == "resid_post"
    assert builder_site("random", base="ablate", site="resid_mid") == "resid_mid"


def test_bad_settings_are_named(head_acts, resid_acts, labels, accuracy):
    cases = [
        (("caa", resid_acts), {"layer": L}, rf"layer: expected an integer in \[0, {L - 1}\]"),
        (("leace", resid_acts), {"layer": -1}, r"layer: expected an integer in \[0"),
        (("caa", resid_acts), {"site": "head_out"}, r"site: expected a residual site \(resid_pre"),
        (("leace", resid_acts), {"site": "resid_nowhere"}, "site: expected a residual site"),
        (("iti", head_acts), {"accuracy": accuracy, "k": 0}, rf"k: expected an integer in \[1, L\*H = {L * H}\], got 0"),
        (("iti", head_acts), {"accuracy": accuracy, "k": L * H + 1}, r"k: expected an integer in \[1"),
        (("caa", resid_acts), {"positions": "everywhere"}, "position_mode: expected one of"),
        (("caa", resid_acts), {"kk": 3}, r"caa: unknown setting\(s\) \['kk'\]; valid settings: layer"),
        (("random", resid_acts), {"base": "leace"}, "base: expected one of iti, caa, ablate"),
        (("steer", resid_acts), {}, "method: expected one of iti, caa, ablate, leace, random"),
        (("ablate", head_acts), {}, r"acts: expected shape \[N, L, d_model\] \(residual activations\), got \(48, 2, 4, 8\)"),
        (("iti", resid_acts), {"accuracy": accuracy}, r"acts: expected shape \[N, L, H, D\]"),
        (("caa", resid_acts[:, :, :4]), {"scale": float("nan")}, "scale: expected finite"),
    ]
    for (method, acts), settings, message in cases:
        with pytest.raises(InterventionError, match=message):
            build_intervention(method, acts, labels, **settings)
    with pytest.raises(ConceptError, match="labels: need examples of both"):
        build_intervention("caa", resid_acts, np.zeros(N, int))
    bad = resid_acts.copy()
    bad[3, 1, 2] = np.inf
    for method in ("caa", "ablate", "leace"):
        with pytest.raises(InterventionError, match="acts: expected finite numbers, got 1 of"):
            build_intervention(method, bad, labels, layer=0)


# -- the site-general collector -----------------------------------------------------------


def tokenize(texts):
    return [[(ord(c) * 7) % CFG.vocab_size for c in text] for text in texts]


@jax.jit
def captures_of(params, tokens):
    return model.forward(CFG, params, tokens, capture=RESIDUAL).captures


def test_collect_activations_at_every_site_matches_the_model_captures(params):
    texts = ["a short one", "the longest text of all here", "mid length"]
    head = collect_head_activations(CFG, params, tokenize, texts, batch_size=2, progress=False)
    assert head.shape == (3, L, H, D)
    np.testing.assert_array_equal(head, collect_activations(CFG, params, tokenize, texts, site="head_out",
                                                            batch_size=2, progress=False))
    references = [captures_of(params, jnp.asarray([ids], jnp.int32)) for ids in tokenize(texts)]
    for site, position in (("resid_pre", "last"), ("resid_mid", "mean"), ("resid_post", "last")):
        acts = collect_activations(CFG, params, tokenize, texts, site=site, batch_size=2, position=position,
                                   progress=False)
        assert acts.shape == (3, L, DM) and acts.dtype == np.float32
        for i, captured in enumerate(references):
            captured = captured[site][:, 0]  # [L, T, d]
            want = captured[:, -1] if position == "last" else captured.mean(axis=1)
            np.testing.assert_allclose(acts[i], want, atol=2e-5)
    with pytest.raises(ProbeError, match="site: expected one of head_out, resid_pre"):
        collect_activations(CFG, params, tokenize, texts, site="mlp_in", progress=False)
