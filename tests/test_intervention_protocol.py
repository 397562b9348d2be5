"""The intervention protocol: edits (site x op x positions) applied inside the model, in decoding.

Identity at scale 0 for every op and site; each position policy touches exactly its
positions; the edit math equals its numpy formula; cached decode equals an uncached forward
with the same edit; one prefill + one decode program per edit structure across a scale
sweep; parity with forward hooks on transformers OLMo; files (v2, and ITI v1) and refusals.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import decode, model
from jaxlm.config import model_preset
from jaxlm.decode import left_pad
from jaxlm.intervene import (
    Edit,
    Intervention,
    InterventionError,
    add_edit,
    erase_edit,
    project_edit,
    random_directions,
    read_sidecar,
    sidecar_path,
)

CFG = model_preset("tiny")
L, H, D, DM = CFG.n_layers, CFG.n_heads, CFG.resolved_head_dim, CFG.d_model
SITES = ("head_out", "resid_pre", "resid_mid", "resid_post")
RESIDUAL = SITES[1:]
N_NEW = 5
PROMPTS = [[5, 17, 99, 3], [42, 7], [250, 1, 2]]


def random_params(config, seed=0, std=0.1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, std, s.shape), jnp.float32), model.param_shapes(config))


@pytest.fixture(scope="module")
def params():
    return random_params(CFG)


def unit_rows(rng, shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_edit(site, op, positions="all", seed=0, layer_mask=None):
    """A random edit of ``op`` at ``site`` strong enough to move the logits at scale 1."""
    rng = np.random.default_rng(seed)
    shape = (L, H, D) if site == "head_out" else (L, DM)
    if op == "add":
        return add_edit(site, 2.0 * rng.normal(size=shape), layer_mask=layer_mask, positions=positions)
    if op == "project":
        return project_edit(site, rng.normal(size=shape), rng.normal(size=shape[:-1]), layer_mask=layer_mask,
                            positions=positions)
    P = rng.normal(size=(L, DM, DM)) / np.sqrt(DM)
    return erase_edit(site, P, rng.normal(size=(L, DM)), layer_mask=layer_mask, positions=positions)


CASES = [(site, op) for site in SITES for op in ("add", "project", "erase") if not (site == "head_out" and op == "erase")]


@jax.jit
def run(params, tokens, intervention):
    """Logits and every site's capture, with ``intervention`` resolved for a forward over whole texts."""
    edits = None if intervention is None else intervention.for_prefill(jnp.ones(tokens.shape, bool))
    out = model.forward(CFG, params, tokens, intervention=edits, capture=SITES)
    return out.logits, out.captures


def tokens_for(seed=0, shape=(2, 7)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, shape), jnp.int32)


# -- identity, positions, math ------------------------------------------------------------


@pytest.mark.parametrize("site,op", CASES)
def test_scale_zero_is_the_identity_for_every_op_and_site(params, site, op):
    tokens = tokens_for()
    base_logits, base_captures = run(params, tokens, None)
    iv = Intervention.from_edits([make_edit(site, op)], scale=0.0)
    logits, captures = run(params, tokens, iv)
    # x + 0 * delta is x; XLA may fuse the (edited) program's reductions differently: float32 rounding
    np.testing.assert_allclose(logits, base_logits, rtol=0, atol=2e-6)
    for name in SITES:
        np.testing.assert_allclose(captures[name], base_captures[name], rtol=0, atol=2e-6)
    moved, _ = run(params, tokens, iv.with_scale(1.0))  # the same program, now an edit that matters
    assert np.abs(np.asarray(moved - base_logits)).max() > 1e-3


def test_bfloat16_identity_and_float32_edit_math():
    cfg = model_preset("tiny", dtype="bfloat16")
    p = random_params(cfg)
    tokens = tokens_for()
    mask = jnp.ones(tokens.shape, bool)
    u = unit_rows(np.random.default_rng(3), (L, DM))
    iv = Intervention.from_edits([project_edit("resid_post", u)], scale=0.0)
    base = model.forward(cfg, p, tokens, capture=("resid_post",))
    zero = model.forward(cfg, p, tokens, intervention=iv.for_prefill(mask), capture=("resid_post",))
    np.testing.assert_array_equal(zero.logits, base.logits)
    ablated = model.forward(cfg, p, tokens, intervention=iv.with_scale(1.0).for_prefill(mask), capture=("resid_post",))
    resid = ablated.captures["resid_post"]
    assert resid.dtype == jnp.bfloat16
    along = np.einsum("lbtd,ld->lbt", np.asarray(resid, np.float32), u)
    norm = np.linalg.norm(np.asarray(resid, np.float32), axis=-1)
    before = np.abs(np.einsum("lbtd,ld->lbt", np.asarray(base.captures["resid_post"], np.float32), u))
    assert (np.abs(along) <= 0.02 * norm).all() and before.max() > 0.1  # only bf16 rounding is left


@pytest.mark.parametrize("site", ["head_out", "resid_mid"])  # the other sites: the identity and decode tests
@pytest.mark.parametrize("policy", ["last", "all", "prompt", "generated"])
def test_each_policy_touches_exactly_its_positions(params, site, policy):
    """Prefill over left-padded prompts: the edited site moves exactly at the policy's
    positions, at the masked layer only; a decode step moves unless the policy is ``prompt``."""
    tokens, mask = left_pad(PROMPTS)
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    op = "add" if site == "head_out" else "erase"
    iv = Intervention.from_edits([make_edit(site, op, policy, layer_mask=[False, True])], scale=1.0)
    segments = mask.astype(jnp.int32)
    base = model.forward(CFG, params, tokens, segment_ids=segments, capture=(site,)).captures[site]
    out = model.forward(CFG, params, tokens, segment_ids=segments, intervention=iv.for_prefill(mask), capture=(site,))
    delta = np.abs(np.asarray(out.captures[site] - base))
    delta = delta.max(axis=tuple(range(3, delta.ndim)))  # [L, B, T]
    np.testing.assert_array_equal(delta[0], 0.0)  # layer 0 is masked out
    want = {"last": np.asarray(mask) & (np.arange(4) == 3), "all": np.asarray(mask), "prompt": np.asarray(mask),
            "generated": np.zeros(mask.shape, bool)}[policy]
    np.testing.assert_array_equal(delta[1] > 1e-6, want)

    cache = model.init_cache(CFG, 3, 8)
    prefilled = model.forward(CFG, params, tokens, segment_ids=segments, cache=cache)
    step = jnp.asarray([[11], [12], [13]], jnp.int32)
    plain = model.forward(CFG, params, step, cache=prefilled.cache, capture=(site,)).captures[site]
    edited = model.forward(CFG, params, step, cache=prefilled.cache, intervention=iv.for_decode_step(3),
                           capture=(site,)).captures[site]
    assert (np.abs(np.asarray(edited[1] - plain[1])).max() > 1e-6) == (policy != "prompt")


def test_edit_math_equals_the_numpy_formulas(params):
    """add, project (clamp to c) and erase (x - P (x - mu)) at resid_mid of layer 1, against numpy
    on the un-edited activations; several edits at one site apply in order."""
    tokens = tokens_for(1)
    rng = np.random.default_rng(5)
    v = rng.normal(size=(L, DM))
    u = unit_rows(rng, (L, DM))
    c = rng.normal(size=L)
    P = rng.normal(size=(L, DM, DM)) / np.sqrt(DM)
    mu = rng.normal(size=(L, DM))
    only_1 = [False, True]
    edits = [add_edit("resid_mid", v, layer_mask=only_1), project_edit("resid_mid", u, c, layer_mask=only_1),
             erase_edit("resid_mid", P, mu, layer_mask=only_1)]
    scale = 0.7
    _, base = run(params, tokens, None)
    x = np.asarray(base["resid_mid"][1], np.float64)  # [B, T, d]: layer 1 before its edits
    for n in range(1, 4):
        _, captures = run(params, tokens, Intervention.from_edits(edits[:n], scale=scale))
        want = x + scale * v[1]
        if n >= 2:
            want = want - scale * ((want @ u[1]) - c[1])[..., None] * u[1]
        if n >= 3:
            want = want - scale * (want - mu[1]) @ P[1].T
        np.testing.assert_allclose(captures["resid_mid"][1], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(captures["resid_mid"][0], base["resid_mid"][0])
    # project at scale 1 clamps the component along u to c exactly
    _, clamped = run(params, tokens, Intervention.from_edits(edits[1:2], scale=1.0))
    np.testing.assert_allclose(np.asarray(clamped["resid_mid"][1]) @ u[1], np.full(x.shape[:2], c[1]), atol=1e-5)


# -- decoding -----------------------------------------------------------------------------


STRUCTURES = {
    "resid_pre add last": lambda: [make_edit("resid_pre", "add", "last")],
    "resid_post project all": lambda: [make_edit("resid_post", "project", "all")],
    "resid_mid erase prompt": lambda: [make_edit("resid_mid", "erase", "prompt")],
    "caa-like + head_out": lambda: [make_edit("resid_post", "add", "generated", layer_mask=[True, False]),
                                    make_edit("resid_post", "add", "prompt", seed=1, layer_mask=[True, False]),
                                    make_edit("head_out", "project", "last", seed=2)],
}


@jax.jit
def teacher_forced(params, tokens, mask, generated, intervention):
    """Uncached forward over prompt + generated tokens with each edit on the positions its policy
    names; returns the logits that chose each generated token."""
    full = jnp.concatenate([tokens, generated], axis=1)
    segments = jnp.concatenate([mask, jnp.ones_like(generated, bool)], axis=1).astype(jnp.int32)
    edits = intervention.for_sequence(mask, generated.shape[1])
    logits = model.forward(CFG, params, full, segment_ids=segments, intervention=edits).logits
    return logits[:, tokens.shape[1] - 1 : -1]


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_cached_decode_equals_an_uncached_forward_with_the_edit(params, name):
    tokens, mask = left_pad(PROMPTS)
    iv = Intervention.from_edits(STRUCTURES[name](), scale=1.5)
    out = decode.generate(CFG, params, tokens, prompt_mask=mask, max_new_tokens=N_NEW, intervention=iv,
                          return_logprobs=True)
    logits = teacher_forced(params, jnp.asarray(tokens), jnp.asarray(mask), out.tokens, iv)
    np.testing.assert_array_equal(out.tokens, jnp.argmax(logits, axis=-1))
    chosen = jnp.take_along_axis(jax.nn.log_softmax(logits), out.tokens[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(out.logprobs, chosen, atol=1e-4)
    baseline = decode.generate(CFG, params, tokens, prompt_mask=mask, max_new_tokens=N_NEW, return_logprobs=True)
    assert np.abs(np.asarray(out.logprobs - baseline.logprobs)).max() > 1e-3  # the edit mattered


def test_one_prefill_and_one_decode_program_across_a_scale_sweep(params):
    tokens, mask = left_pad(PROMPTS)
    edits = [make_edit("resid_pre", "add", "all"), make_edit("resid_post", "project", "last", seed=1)]
    iv = Intervention.from_edits(edits, scale=0.0, method="sweep-test")
    before = decode.trace_counts()
    baseline = decode.generate(CFG, params, tokens, prompt_mask=mask, max_new_tokens=N_NEW, intervention=iv)
    first = decode.trace_counts()
    assert {k: first.get(k, 0) - before.get(k, 0) for k in ("prefill", "decode")} == {"prefill": 1, "decode": 1}
    outputs = [decode.generate(CFG, params, tokens, prompt_mask=mask, max_new_tokens=N_NEW,
                               intervention=iv.with_scale(s)).tokens for s in (0.5, 1.0, 2.0, 4.0)]
    # other arrays, another method name, the same structure: still the same two programs
    other = Intervention.from_edits([make_edit("resid_pre", "add", "all", seed=7),
                                     make_edit("resid_post", "project", "last", seed=8)], scale=1.0, method="other")
    decode.generate(CFG, params, tokens, prompt_mask=mask, max_new_tokens=N_NEW, intervention=other)
    assert decode.trace_counts() == first
    assert any(not np.array_equal(o, baseline.tokens) for o in outputs)


# -- parity with forward hooks on transformers OLMo ---------------------------------------


def hf_olmo(params, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxlm.hf import save as save_hf

    save_hf(CFG, params, tmp_path)
    return torch, transformers.OlmoForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _replace(output, hidden):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def hook_edit(torch, fn, last_only):
    """A forward hook replacing a module's output x by ``fn(x)`` (at the last position of each call)."""

    def hook(module, inputs, output):
        x = _hidden(output).clone()
        if last_only:
            x[:, -1] = fn(x[:, -1])
        else:
            x = fn(x)
        return _replace(output, x)

    return hook


def pre_hook_edit(torch, fn, last_only):
    def hook(module, args):
        x = args[0].clone()
        if last_only:
            x[:, -1] = fn(x[:, -1])
        else:
            x = fn(x)
        return (x, *args[1:])

    return hook


def hf_generate(torch, hf, tokens, hooks):
    """Greedy tokens and per-step logits of transformers' generate with ``hooks`` [(module, kind, hook)]."""
    handles = [getattr(module, f"register_forward{'_pre' if kind == 'pre' else ''}_hook")(hook)
               for module, kind, hook in hooks]
    try:
        with torch.inference_mode():
            out = hf.generate(torch.from_numpy(np.asarray(tokens)).long(), max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                              do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True,
                              return_dict_in_generate=True)
    finally:
        for handle in handles:
            handle.remove()
    new = out.sequences[:, tokens.shape[1]:].numpy()
    return new, np.stack([step.numpy() for step in out.logits], axis=1)


def jaxlm_generate(params, tokens, iv):
    out = decode.generate(CFG, params, tokens, max_new_tokens=N_NEW, intervention=iv)
    mask = jnp.ones(tokens.shape, bool)
    return np.asarray(out.tokens), np.asarray(teacher_forced(params, jnp.asarray(tokens), mask, out.tokens, iv))


def assert_parity(ours, theirs, baseline_logits):
    (our_tokens, our_logits), (hf_tokens, hf_logits) = ours, theirs
    np.testing.assert_array_equal(our_tokens, hf_tokens)
    assert np.abs(our_logits - hf_logits).max() <= 1e-5 * np.abs(hf_logits).max()
    assert np.abs(hf_logits - baseline_logits).max() > 1e-2  # the edit is visible in the logits


def test_parity_with_transformers_hooks(params, tmp_path):
    torch, hf = hf_olmo(params, tmp_path)
    layers = hf.model.layers
    tokens = np.random.default_rng(4).integers(0, CFG.vocab_size, (3, 6)).astype(np.int32)
    _, baseline_logits = hf_generate(torch, hf, tokens, [])
    rng = np.random.default_rng(9)
    v = 3.0 * rng.normal(size=(L, DM))
    u = unit_rows(rng, (DM,))
    u_t, v_t = torch.from_numpy(u).float(), torch.from_numpy(v).float()

    def ablate(x):
        return x - (x @ u_t)[..., None] * u_t

    # add at resid_pre of layer 1 and at resid_post of layer 0, at the last position of every call
    for site, layer, module, kind in (("resid_pre", 1, layers[1], "pre"), ("resid_post", 0, layers[0], "post")):
        mask = np.arange(L) == layer
        iv = Intervention.from_edits([add_edit(site, v * mask[:, None], layer_mask=mask, positions="last")], scale=1.5)
        shift = 1.5 * v_t[layer]
        make = pre_hook_edit if kind == "pre" else hook_edit
        theirs = hf_generate(torch, hf, tokens, [(module, kind, make(torch, lambda x, s=shift: x + s, True))])
        assert_parity(jaxlm_generate(params, tokens, iv), theirs, baseline_logits)

    # directional ablation of u at every layer's resid_post
    iv = Intervention.from_edits([project_edit("resid_post", np.broadcast_to(u, (L, DM)))], scale=1.0)
    theirs = hf_generate(torch, hf, tokens, [(layer, "post", hook_edit(torch, ablate, False)) for layer in layers])
    assert_parity(jaxlm_generate(params, tokens, iv), theirs, baseline_logits)

    # ... and at every residual write: the embedding, each attention output and each MLP output
    every = np.broadcast_to(u, (L, DM))
    iv = Intervention.from_edits([project_edit("resid_pre", every, layer_mask=[True, False]),
                                  project_edit("resid_mid", every), project_edit("resid_post", every)], scale=1.0)
    writers = [hf.model.embed_tokens] + [m for layer in layers for m in (layer.self_attn, layer.mlp)]
    theirs = hf_generate(torch, hf, tokens, [(m, "post", hook_edit(torch, ablate, False)) for m in writers])
    assert_parity(jaxlm_generate(params, tokens, iv), theirs, baseline_logits)


# -- files and refusals -------------------------------------------------------------------


def test_v2_round_trip_names_the_mismatching_array(tmp_path):
    iv = Intervention.from_edits(
        [make_edit("head_out", "add", "last"), make_edit("resid_pre", "project", "all", seed=1, layer_mask=[True, False]),
         make_edit("resid_mid", "erase", "generated", seed=2)], scale=0.75, method="mixed")
    path = iv.save(tmp_path / "iv", provenance={"checkpoint": "ckpt/step_1"})
    meta = read_sidecar(path)
    assert meta["format"] == "jaxlm-intervention-v2" and meta["method"] == "mixed" and meta["scale"] == 0.75
    assert [(e["site"], e["op"], e["positions"]) for e in meta["edits"]] == list(iv.structure())
    assert meta["edits"][2]["arrays"] == {"P": "edit2.P", "mu": "edit2.mu", "layer_mask": "edit2.layer_mask"}
    assert meta["shape"] == {"n_layers": L, "n_heads": H, "head_dim": D, "d_model": DM}
    assert meta["k"] == L * H + 1 + L
    loaded = Intervention.load(path, CFG)
    assert loaded.structure() == iv.structure() and loaded.method == "mixed" and float(loaded.scale) == 0.75
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(iv)):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    with pytest.raises(InterventionError, match=r"iv.safetensors: .*edit2.P axis 1 \(d\) is 32 but the model has d_model=64"):
        Intervention.load(path, model_preset("tiny", d_model=64))


def test_a_v1_iti_file_still_loads(params, tmp_path):
    """A file as the ITI-only code wrote it: arrays directions/scales/head_mask, a v1 sidecar."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(2)
    directions = np.asarray(random_directions(1, L, H, D))
    scales = rng.uniform(0.5, 2.0, (L, H)).astype(np.float32)
    head_mask = rng.random((L, H)) < 0.5
    save_file({"directions": directions, "scales": scales, "head_mask": head_mask}, str(tmp_path / "old.safetensors"))
    sidecar = {"format": "jaxlm-iti-v1", "alpha": 2.5, "position_mode": "last", "k": int(head_mask.sum()),
               "shape": {"n_layers": L, "n_heads": H, "head_dim": D}, "provenance": {"probe_dir": "probe"}}
    (tmp_path / "old.json").write_text(json.dumps(sidecar))
    old = Intervention.load(tmp_path / "old.safetensors", CFG)
    assert old.method == "iti" and old.position_mode == "last" and float(old.alpha) == 2.5 and old.k == head_mask.sum()
    np.testing.assert_array_equal(old.head_mask, head_mask)
    np.testing.assert_allclose(old.directions, directions, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(old.scales, scales, rtol=1e-6)
    new = Intervention.create(directions, scales, head_mask, 2.5, "last")
    np.testing.assert_array_equal(old.head_shift(), new.head_shift())
    tokens, mask = left_pad(PROMPTS)
    a = decode.generate(CFG, params, tokens, prompt_mask=mask, max_new_tokens=N_NEW, intervention=old)
    b = decode.generate(CFG, params, tokens, prompt_mask=mask, max_new_tokens=N_NEW, intervention=new)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    # and it re-saves as v2
    again = Intervention.load(old.save(tmp_path / "new"), CFG)
    np.testing.assert_array_equal(again.head_shift(), old.head_shift())


def test_non_finite_and_malformed_edits_are_refused(tmp_path):
    v = np.zeros((L, DM))
    v[1, 3] = np.nan
    with pytest.raises(InterventionError, match="v: expected finite numbers, got 1 of 64"):
        add_edit("resid_post", v)
    with pytest.raises(InterventionError, match="scale: expected finite"):
        Intervention.from_edits([make_edit("resid_pre", "add")], scale=float("inf"))
    with pytest.raises(InterventionError, match="scale: expected finite"):
        Intervention.from_edits([make_edit("resid_pre", "add")]).with_scale(float("nan"))
    with pytest.raises(InterventionError, match="u: expected unit vectors"):
        Edit.create("resid_mid", "project", {"u": np.full((L, DM), 2.0), "c": np.zeros(L)})
    with pytest.raises(InterventionError, match="op erase: only at a residual site"):
        Edit.create("head_out", "erase", {"P": np.zeros((L, DM, DM)), "mu": np.zeros((L, DM))})
    with pytest.raises(InterventionError, match=r"mu: expected shape \[L, d\] = \(2, 32\)"):
        Edit.create("resid_mid", "erase", {"P": np.zeros((L, DM, DM)), "mu": np.zeros((L, DM + 1))})
    with pytest.raises(InterventionError, match="head_mask: only edits at head_out"):
        add_edit("resid_pre", np.zeros((L, DM)), head_mask=np.ones((L, H), bool))
    with pytest.raises(InterventionError, match="expected an ITI intervention"):
        Intervention.from_edits([make_edit("resid_pre", "add")]).directions
    # a NaN written into a saved file is named by its array
    from safetensors.numpy import load_file, save_file

    path = Intervention.from_edits([make_edit("resid_mid", "erase")], scale=1.0).save(tmp_path / "bad")
    arrays = load_file(str(path))
    arrays["edit0.P"][0, 0, 0] = np.inf
    save_file(arrays, str(path))
    with pytest.raises(InterventionError, match=r"bad.safetensors: edit0.P: expected finite numbers"):
        Intervention.load(path)
    path = Intervention.from_edits([make_edit("resid_mid", "erase")], scale=1.0).save(tmp_path / "renamed")
    meta = json.loads(sidecar_path(path).read_text())
    meta["edits"][0]["arrays"]["P"] = "edit9.P"
    sidecar_path(path).write_text(json.dumps(meta))
    with pytest.raises(InterventionError, match=r"missing array\(s\) \['edit9.P'\]"):
        Intervention.load(path)
