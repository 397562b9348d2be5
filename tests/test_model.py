import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import model
from jaxlm import sharding as sharding_lib
from jaxlm.config import MeshConfig, model_preset

CFG = model_preset("tiny")


@pytest.fixture(scope="module")
def params():
    return model.init_params(CFG, 0)


def random_tokens(shape, seed=0, vocab=CFG.vocab_size):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def test_shapes_and_dtypes(params):
    out = model.forward(CFG, params, random_tokens((2, 7)), capture=model.SITES)
    assert out.logits.shape == (2, 7, CFG.vocab_size) and out.logits.dtype == jnp.float32
    L, H, D, d = CFG.n_layers, CFG.n_heads, CFG.resolved_head_dim, CFG.d_model
    assert out.captures["head_out"].shape == (L, 2, 7, H, D)
    for site in ("resid_pre", "resid_mid", "resid_post"):
        assert out.captures[site].shape == (L, 2, 7, d)
    assert out.cache is None
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_last_logits_only_equals_the_last_row_of_the_full_logits(params):
    tokens = random_tokens((2, 7))
    full = model.forward(CFG, params, tokens).logits
    last = model.forward(CFG, params, tokens, last_logits_only=True).logits
    assert last.shape == (2, 1, CFG.vocab_size)
    np.testing.assert_allclose(last, full[:, -1:], atol=1e-5)


def test_unknown_capture_site(params):
    with pytest.raises(ValueError, match="unknown capture site.*head_out"):
        model.forward(CFG, params, random_tokens((1, 3)), capture=("attn_pattern",))


def test_causal(params):
    tokens = random_tokens((1, 12))
    changed = tokens.at[0, 8].set((tokens[0, 8] + 1) % CFG.vocab_size)
    a = model.forward(CFG, params, tokens).logits
    b = model.forward(CFG, params, changed).logits
    np.testing.assert_array_equal(a[0, :8], b[0, :8])
    assert np.abs(a[0, 8:] - b[0, 8:]).max() > 1e-4


def test_packed_segments_are_isolated(params):
    doc_a, doc_b = random_tokens((1, 5), seed=1), random_tokens((1, 7), seed=2)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    segments = jnp.asarray([[1] * 5 + [2] * 7])
    out = model.forward(CFG, params, packed, segment_ids=segments).logits
    alone_a = model.forward(CFG, params, doc_a).logits
    alone_b = model.forward(CFG, params, doc_b).logits
    np.testing.assert_allclose(out[0, :5], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 5:], alone_b[0], atol=1e-5)


def test_positions_from_segments():
    seg = jnp.asarray([[0, 0, 1, 1, 1, 2, 2], [1, 1, 1, 1, 2, 3, 3]])
    expected = [[0, 1, 0, 1, 2, 0, 1], [0, 1, 2, 3, 0, 0, 1]]
    np.testing.assert_array_equal(model.positions_from_segments(seg), expected)


def test_cached_decoding_equals_full_forward(params):
    tokens = random_tokens((2, 10))
    full = model.forward(CFG, params, tokens).logits
    cache = model.init_cache(CFG, 2, 16)
    out = model.forward(CFG, params, tokens[:, :6], cache=cache)
    pieces = [out.logits]
    cache = out.cache
    for t in range(6, 10):
        out = model.forward(CFG, params, tokens[:, t : t + 1], cache=cache)
        pieces.append(out.logits)
        cache = out.cache
    assert int(cache.index) == 10
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5)


def test_left_padded_prompt_with_cache_equals_unpadded(params):
    prompt = random_tokens((1, 4), seed=3)
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), prompt], axis=1)
    segments = jnp.asarray([[0, 0, 0, 1, 1, 1, 1]])
    cache = model.init_cache(CFG, 1, 12)
    out = model.forward(CFG, params, padded, segment_ids=segments, cache=cache)
    reference = model.forward(CFG, params, prompt).logits
    np.testing.assert_allclose(out.logits[:, 3:], reference, atol=1e-5)
    nxt = random_tokens((1, 1), seed=4)
    step = model.forward(CFG, params, nxt, cache=out.cache).logits
    full = model.forward(CFG, params, jnp.concatenate([prompt, nxt], axis=1)).logits
    np.testing.assert_allclose(step[:, 0], full[:, -1], atol=1e-5)


def _shift(seed=5):
    shape = (CFG.n_layers, CFG.n_heads, CFG.resolved_head_dim)
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def head_add(shift, mask, scale):
    """A resolved ``add`` edit at ``head_out`` on every head of every layer."""
    edit = model.ResolvedEdit(arrays={"v": shift}, gate=jnp.ones(shift.shape[:2]), position_mask=mask,
                              site="head_out", op="add")
    return model.ResolvedIntervention(edits=(edit,), scale=jnp.float32(scale))


def test_zero_scale_intervention_is_identity(params):
    tokens = random_tokens((2, 9))
    base = model.forward(CFG, params, tokens, capture=("head_out",))
    mask = jnp.ones((2, 9), bool)
    out = model.forward(CFG, params, tokens, intervention=head_add(_shift(), mask, 0.0), capture=("head_out",))
    np.testing.assert_array_equal(out.logits, base.logits)
    np.testing.assert_array_equal(out.captures["head_out"], base.captures["head_out"])
    empty = model.ResolvedIntervention(edits=(), scale=jnp.float32(1.0))
    np.testing.assert_array_equal(model.forward(CFG, params, tokens, intervention=empty).logits, base.logits)


def test_intervention_changes_exactly_the_masked_positions(params):
    tokens = random_tokens((2, 9))
    base = model.forward(CFG, params, tokens, capture=("head_out",))
    mask = np.zeros((2, 9), bool)
    mask[0, 4] = mask[1, 6] = True
    shift = _shift()
    iv = head_add(shift, jnp.asarray(mask), 2.0)
    out = model.forward(CFG, params, tokens, intervention=iv, capture=("head_out",))
    # Layer 0: head_out moves by exactly scale * shift at masked positions, nowhere else.
    delta = np.asarray(out.captures["head_out"][0] - base.captures["head_out"][0])
    np.testing.assert_allclose(delta[mask], np.broadcast_to(2.0 * shift[0], delta[mask].shape), atol=1e-5)
    np.testing.assert_array_equal(delta[~mask], 0.0)
    # Logits: unchanged before the first masked position of each row, changed at it.
    np.testing.assert_array_equal(out.logits[0, :4], base.logits[0, :4])
    np.testing.assert_array_equal(out.logits[1, :6], base.logits[1, :6])
    assert np.abs(out.logits[0, 4] - base.logits[0, 4]).max() > 1e-4
    assert np.abs(out.logits[1, 6] - base.logits[1, 6]).max() > 1e-4


def test_captured_head_out_equals_manual_computation(params):
    tokens = random_tokens((1, 6))
    out = model.forward(CFG, params, tokens, capture=("head_out", "resid_pre"))
    layer = 1
    x = out.captures["resid_pre"][layer]
    h = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + CFG.norm_eps)
    attn = jax.tree.map(lambda w: w[layer], params["layers"]["attention"])
    positions = jnp.arange(6)[None]
    q = model.rope(jnp.einsum("btd,dhk->bthk", h, attn["q"]), positions, model.rope_frequencies(CFG))
    k = model.rope(jnp.einsum("btd,dhk->bthk", h, attn["k"]), positions, model.rope_frequencies(CFG))
    v = jnp.einsum("btd,dhk->bthk", h, attn["v"])
    scores = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(CFG.resolved_head_dim)
    scores = jnp.where(np.tril(np.ones((6, 6), bool)), scores, -np.inf)
    manual = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(scores, -1), v)
    np.testing.assert_allclose(out.captures["head_out"][layer], manual, atol=1e-5)


def test_grouped_query_and_untied_and_norm_variants():
    tokens = random_tokens((1, 8))
    for changes in ({"n_kv_heads": 2}, {"tie_embeddings": False}, {"norm": "rmsnorm"}, {"norm": "layernorm"}):
        cfg = model_preset("tiny", **changes)
        p = model.init_params(cfg, 1)
        full = model.forward(cfg, p, tokens).logits
        cache = model.init_cache(cfg, 1, 8)
        first = model.forward(cfg, p, tokens[:, :5], cache=cache)
        rest = model.forward(cfg, p, tokens[:, 5:], cache=first.cache)
        np.testing.assert_allclose(jnp.concatenate([first.logits, rest.logits], 1), full, atol=1e-5)
    assert "lm_head" in model.init_params(model_preset("tiny", tie_embeddings=False), 0)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = model_preset("tiny", dtype="bfloat16")
    p = model.init_params(cfg, 0)
    out = model.forward(cfg, p, random_tokens((1, 5)), capture=("head_out",))
    assert out.logits.dtype == jnp.float32 and out.captures["head_out"].dtype == jnp.bfloat16
    ref = model.forward(CFG, model.init_params(CFG, 0), random_tokens((1, 5))).logits
    assert np.abs(out.logits - ref).max() < 0.1


def test_remat_gives_the_same_gradients(params):
    tokens = random_tokens((2, 8))

    def loss(cfg, p):
        return model.forward(cfg, p, tokens).logits.mean()

    g_plain = jax.grad(lambda p: loss(CFG, p))(params)
    g_remat = jax.grad(lambda p: loss(model_preset("tiny", remat="block"), p))(params)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_sharded_forward_on_8_devices_equals_single_device(params):
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (set by conftest)")
    mesh = sharding_lib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), devices[:8])
    shardings = sharding_lib.logical_to_sharding(model.param_logical_axes(CFG), mesh)
    sharded = sharding_lib.shard(params, shardings)
    assert sharded["layers"]["attention"]["q"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    tokens = random_tokens((4, 8))
    tokens_sharded = jax.device_put(tokens, sharding_lib.batch_sharding(mesh))
    fwd = jax.jit(lambda p, t: model.forward(CFG, p, t).logits)
    with sharding_lib.activation_sharding(mesh):
        out = fwd(sharded, tokens_sharded)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(out, model.forward(CFG, params, tokens).logits, atol=1e-5)


def test_dot_product_attention_implementation_equals_own_attention():
    """``attention: xla`` (jax.nn.dot_product_attention) gives the logits and cached decode of the
    default softmax attention, GQA and packed segments included."""
    import dataclasses

    from jaxlm.config import model_preset
    from jaxlm.model import forward, init_cache, init_params

    config = dataclasses.replace(model_preset("tiny"), n_kv_heads=2)
    other = dataclasses.replace(config, attention="xla")
    params = init_params(config, 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, config.vocab_size, (2, 12)), jnp.int32)
    segments = jnp.asarray([[1] * 5 + [2] * 7, [0] * 3 + [1] * 9], jnp.int32)
    full = forward(config, params, tokens, segment_ids=segments).logits
    np.testing.assert_allclose(forward(other, params, tokens, segment_ids=segments).logits, full, atol=1e-5, rtol=1e-5)
    cache = init_cache(other, 2, 16)
    first = forward(other, params, tokens[:, :8], segment_ids=segments[:, :8], cache=cache)
    rest = forward(other, params, tokens[:, 8:], segment_ids=segments[:, 8:], cache=first.cache)
    np.testing.assert_allclose(rest.logits, full[:, 8:], atol=1e-5, rtol=1e-5)
