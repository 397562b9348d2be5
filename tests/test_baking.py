"""Baking interventions into parameters: each baked model equals the runtime edit, or is refused."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import decode, hf, model
from jaxlm.config import model_preset
from jaxlm.intervene import (
    Intervention,
    InterventionError,
    RESIDUAL_SITES,
    ablation_edits,
    add_edit,
    bake_into_params,
    build_intervention,
    orthogonalise_params,
    project_edit,
    random_directions,
    untie_embeddings,
)

CFG = model_preset("tiny")  # tied embeddings, RoPE, non-parametric LayerNorm
L, H, D, DM = CFG.n_layers, CFG.n_heads, CFG.resolved_head_dim, CFG.d_model
PROMPT_LENGTHS = jnp.array([10, 7, 4, 10])  # ragged (left-padded) prompts for decoding


@pytest.fixture(scope="module")
def params():
    return model.init_params(CFG, 0)


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 10)), jnp.int32)


@pytest.fixture(scope="module")
def residual_acts():
    """Labelled residual activations [N, L, d_model] whose classes differ along one direction."""
    rng = np.random.default_rng(1)
    labels = np.arange(40) % 2
    shift = rng.normal(size=(L, DM))
    acts = rng.normal(size=(40, L, DM)) + 3.0 * (labels == 0)[:, None, None] * shift
    return acts.astype(np.float32), labels


def iti_all(alpha=3.0):
    rng = np.random.default_rng(2)
    return Intervention.create(random_directions(2, L, H, D), rng.uniform(0.5, 2.0, (L, H)),
                               rng.random((L, H)) < 0.5, alpha, "all")


def assert_baked_equals_runtime(config, params, baked, intervention, tokens, greedy=True):
    """Forward logits within 1e-5 and (``greedy``) greedy generations token-identical; and the edit acts."""
    runtime = model.forward(config, params, tokens, intervention=intervention.for_prefill(jnp.ones(tokens.shape, bool)))
    plain = model.forward(config, params, tokens).logits
    with_baked = model.forward(config, baked, tokens).logits
    np.testing.assert_allclose(with_baked, runtime.logits, atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(runtime.logits - plain).max()) > 1e-2  # the edit changes the model
    if not greedy:
        return
    edited = decode.generate(config, params, tokens, max_new_tokens=6, intervention=intervention,
                             prompt_lengths=PROMPT_LENGTHS)
    generated = decode.generate(config, baked, tokens, max_new_tokens=6, prompt_lengths=PROMPT_LENGTHS)
    np.testing.assert_array_equal(generated.tokens, edited.tokens)


def test_iti_mode_all_bakes_into_output_bias(params, tokens):
    iv = iti_all()
    baked = bake_into_params(CFG, params, iv)
    assert baked["layers"]["attention"]["out_bias"].shape == (L, DM)
    assert "out_bias" not in params["layers"]["attention"]  # the input is not modified
    np.testing.assert_array_equal(baked["layers"]["attention"]["out"], params["layers"]["attention"]["out"])
    assert_baked_equals_runtime(CFG, params, baked, iv, tokens)


@pytest.mark.parametrize("site", RESIDUAL_SITES)
def test_caa_bakes_into_a_residual_bias(params, tokens, residual_acts, site):
    iv = build_intervention("caa", *residual_acts, layer=1, site=site, positions="all", scale=4.0)
    baked = bake_into_params(CFG, params, iv)
    bias = np.asarray(baked["layers"][f"{site}_bias"])
    assert bias.shape == (L, DM) and not bias[0].any() and np.abs(bias[1]).max() > 0  # gated to layer 1
    assert set(baked["layers"]) - set(params["layers"]) == {f"{site}_bias"}
    assert_baked_equals_runtime(CFG, params, baked, iv, tokens, greedy=False)
    twice = bake_into_params(CFG, baked, iv)["layers"][f"{site}_bias"]  # an existing bias is added to
    np.testing.assert_allclose(twice, 2 * bias, atol=1e-6)


def test_caa_at_every_residual_site_decodes_like_the_runtime_edit(params, tokens, residual_acts):
    built = [build_intervention("caa", *residual_acts, layer=layer, site=site, positions="all", scale=3.0)
             for layer, site in enumerate(RESIDUAL_SITES[:2])] + [
             build_intervention("caa", *residual_acts, layer=0, site="resid_post", positions="all", scale=3.0)]
    iv = Intervention.from_edits([b.edits[0] for b in built], 3.0, method="caa")
    assert_baked_equals_runtime(CFG, params, bake_into_params(CFG, params, iv), iv, tokens)


def test_ablate_bakes_into_orthogonalised_weights(params, tokens, residual_acts):
    iv = build_intervention("ablate", *residual_acts, layer=1)
    with pytest.raises(InterventionError, match="tie_embeddings = true.*untie_embeddings"):
        bake_into_params(CFG, params, iv)
    config, untied = untie_embeddings(CFG, params)
    assert not config.tie_embeddings
    np.testing.assert_array_equal(model.forward(config, untied, tokens).logits, model.forward(CFG, params, tokens).logits)
    baked = bake_into_params(config, untied, iv)
    u = np.asarray(iv.edits[0].arrays["u"][0])
    for weight in (baked["embedding"], baked["layers"]["attention"]["out"], baked["layers"]["mlp"]["down"]):
        assert np.abs(np.asarray(weight) @ u).max() < 1e-6  # nothing writes along u
    np.testing.assert_array_equal(baked["lm_head"], untied["lm_head"])  # the unembedding is kept
    assert_baked_equals_runtime(config, untied, baked, iv, tokens)


def test_ablation_also_projects_baked_biases_and_position_table(residual_acts, tokens):
    """Learned positions, parametric LayerNorm, params already carrying every baked bias, and a
    head_out add in the same intervention as the ablation."""
    config = dataclasses.replace(CFG, position_embedding="learned", norm="layernorm", tie_embeddings=False)
    params = model.init_params(config, 3)
    acts, labels = residual_acts
    for site in RESIDUAL_SITES:  # the block-input bias at layer 0 only: the ablation projects nothing else there
        params = bake_into_params(config, params, build_intervention(
            "caa", acts, labels, site=site, layer=0 if site == "resid_pre" else 1, positions="all", scale=2.0))
    params = bake_into_params(config, params, iti_all(2.0))
    ablate = build_intervention("ablate", acts, labels, layer=0)
    iv = Intervention.from_edits([*ablate.edits, iti_all().edits[0]], 1.0)
    baked = bake_into_params(config, params, iv)
    u = np.asarray(ablate.edits[0].arrays["u"][0])
    assert np.abs(np.asarray(baked["position_embedding"]) @ u).max() < 1e-6
    for name in ("resid_pre_bias", "resid_mid_bias", "resid_post_bias"):
        assert np.abs(np.asarray(params["layers"][name]) @ u).max() > 1e-2  # each bias had a part along u ...
        assert np.abs(np.asarray(baked["layers"][name]) @ u).max() < 1e-5  # ... which is projected out
    assert_baked_equals_runtime(config, params, baked, iv, tokens, greedy=False)

    layer_1_input = params["layers"]["resid_pre_bias"].at[1].set(jnp.asarray(u))  # left in the stream at runtime
    params["layers"]["resid_pre_bias"] = layer_1_input
    with pytest.raises(InterventionError, match=r"resid_pre_bias has a component along u at layer\(s\) \[1\]"):
        bake_into_params(config, params, iv)
    params["layers"]["resid_pre_bias"] = layer_1_input.at[1].set(0.0)
    bake_into_params(config, params, iv)  # a layer-1 bias free of u bakes


def test_head_out_projection_and_add_bake_at_any_scale(params, tokens):
    rng = np.random.default_rng(4)
    u = rng.normal(size=(L, H, D))
    head_mask = rng.random((L, H)) < 0.6
    edits = [project_edit("head_out", u, c=rng.normal(size=(L, H)), head_mask=head_mask),
             iti_all().edits[0], project_edit("head_out", rng.normal(size=(L, H, D)))]
    iv = Intervention.from_edits(edits, 0.7)
    baked = bake_into_params(CFG, params, iv)
    assert_baked_equals_runtime(CFG, params, baked, iv, tokens, greedy=False)


def test_write_side_projection_reproduces_the_ablation_only_at_scale_one(params, tokens, residual_acts):
    """Why other scales are refused: W <- (I - s u u^T) W on every write differs from the runtime edit."""
    config, untied = untie_embeddings(CFG, params)
    ablate = build_intervention("ablate", *residual_acts)
    u = jnp.asarray(ablate.edits[0].arrays["u"][0])

    def scaled(w, s):
        return w - s * (w @ u)[..., None] * u

    mask = jnp.ones(tokens.shape, bool)
    for s in (0.5, 1.0, 2.0):
        layers = {**untied["layers"], "attention": {**untied["layers"]["attention"],
                                                    "out": scaled(untied["layers"]["attention"]["out"], s)},
                  "mlp": {**untied["layers"]["mlp"], "down": scaled(untied["layers"]["mlp"]["down"], s)}}
        written = {**untied, "embedding": scaled(untied["embedding"], s), "layers": layers}
        runtime = model.forward(config, untied, tokens, intervention=ablate.with_scale(s).for_prefill(mask)).logits
        gap = float(jnp.abs(model.forward(config, written, tokens).logits - runtime).max())
        assert gap < 1e-5 if s == 1.0 else gap > 1e-3, (s, gap)


def test_ablation_at_scale_zero_is_the_identity(params, residual_acts):
    iv = build_intervention("ablate", *residual_acts, scale=0.0)
    baked = bake_into_params(CFG, params, iv)  # nothing to orthogonalise, tied embeddings are fine
    jax.tree.map(np.testing.assert_array_equal, baked, params)


def test_orthogonalise_params_equals_projection_at_every_site(params, tokens):
    config, untied = untie_embeddings(CFG, params)
    u = np.random.default_rng(5).normal(size=DM)
    u /= np.linalg.norm(u)
    every = Intervention.from_edits([project_edit(site, np.broadcast_to(u, (L, DM))) for site in RESIDUAL_SITES])
    runtime = model.forward(config, untied, tokens, intervention=every.for_prefill(jnp.ones(tokens.shape, bool)))
    np.testing.assert_allclose(model.forward(config, orthogonalise_params(config, untied, u), tokens).logits,
                               runtime.logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(InterventionError, match="u: expected a unit vector"):
        orthogonalise_params(config, untied, 2 * u)
    with pytest.raises(InterventionError, match=r"u: expected shape \[d_model\]"):
        orthogonalise_params(config, untied, u[:4])


def _ablation():
    return ablation_edits(np.random.default_rng(6).normal(size=DM), L)


def _refusals(acts, labels):
    u = np.random.default_rng(6).normal(size=DM)
    two_directions = np.stack([u, np.roll(u, 1)])
    clamp = _ablation()
    clamp[1] = project_edit("resid_mid", clamp[1].arrays["u"], c=0.5)
    return {
        "last": (build_intervention("caa", acts, labels, positions="last"),
                 r"edit 0 \(add at resid_pre, positions last\).*only position policy 'all'"),
        "prompt": (iti_all().with_positions("prompt"), r"edit 0 \(add at head_out, positions prompt\)"),
        "leace": (build_intervention("leace", acts, labels), r"edit 0 \(erase at resid_pre.*erase \(LEACE\)"),
        "scale": (build_intervention("ablate", acts, labels, scale=0.5), r"edit 0 \(project.*only at scale 1.*0\.5"),
        "missing_write": (Intervention.from_edits(_ablation()[:2]),
                          r"edit 0 \(project at resid_pre\), edit 1 \(project at resid_mid\).*missing: resid_post "
                          r"layer\(s\) \[0, 1\]"),
        "no_embedding": (Intervention.from_edits(_ablation()[1:]), r"missing: resid_pre layer\(s\) \[0\]"),
        "two_directions": (Intervention.from_edits([project_edit(site, two_directions) for site in RESIDUAL_SITES]),
                           r"edit 0 \(project at resid_pre.*u at layer 1 differs"),
        "clamp": (Intervention.from_edits(clamp), r"edit 1 \(project at resid_mid.*c = 0\.5 at layer 0"),
        "add_and_project": (Intervention.from_edits([add_edit("resid_mid", np.ones((L, DM))), *_ablation()]),
                            r"edit 0 \(add at resid_mid.*together with residual projections"),
    }


@pytest.mark.parametrize("case", ["last", "prompt", "leace", "scale", "missing_write", "no_embedding",
                                  "two_directions", "clamp", "add_and_project"])
def test_edits_that_do_not_bake_are_refused(params, residual_acts, case):
    config, untied = untie_embeddings(CFG, params)
    iv, message = _refusals(*residual_acts)[case]
    with pytest.raises(InterventionError, match=message):
        bake_into_params(config, untied, iv)


def test_hf_save_exports_orthogonalised_weights_and_refuses_biases(params, tokens, residual_acts, tmp_path):
    config, untied = untie_embeddings(CFG, params)
    iv = build_intervention("ablate", *residual_acts)
    orthogonal = bake_into_params(config, untied, iv)
    hf.save(config, orthogonal, tmp_path / "ablated")
    loaded_config, loaded = hf.load(tmp_path / "ablated")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), loaded, orthogonal)
    runtime = model.forward(config, untied, tokens, intervention=iv.for_prefill(jnp.ones(tokens.shape, bool))).logits
    np.testing.assert_allclose(model.forward(loaded_config, loaded, tokens).logits, runtime, atol=1e-5, rtol=1e-5)

    with_bias = bake_into_params(config, untied, build_intervention("caa", *residual_acts, site="resid_mid",
                                                                    positions="all"))
    with pytest.raises(ValueError, match="layers.resid_mid_bias cannot be represented.*has no such biases"):
        hf.save(config, with_bias, tmp_path / "biased")


def test_orthogonalised_weights_match_the_ablation_in_transformers(params, tokens, residual_acts, tmp_path):
    """The exported ablated model, run by transformers' OlmoForCausalLM, gives the runtime edit's logits."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    config, untied = untie_embeddings(CFG, params)
    iv = build_intervention("ablate", *residual_acts)
    hf.save(config, bake_into_params(config, untied, iv), tmp_path)
    reference = transformers.OlmoForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        logits = reference(torch.tensor(np.array(tokens), dtype=torch.long)).logits.numpy()
    runtime = model.forward(config, untied, tokens, intervention=iv.for_prefill(jnp.ones(tokens.shape, bool))).logits
    np.testing.assert_allclose(logits, runtime, atol=1e-5, rtol=1e-5)
