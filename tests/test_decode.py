import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import decode, model
from jaxlm.config import model_preset
from jaxlm.decode import GenerationError, SamplingSettings, left_pad, nucleus_mask, sample_tokens
from jaxlm.intervene import Intervention, InterventionError, random_directions

CFG = model_preset("tiny")
N_NEW = 6
# A ragged batch: every generate call below uses this (B, P) unless a test needs otherwise,
# so the compiled programs are shared across tests.
PROMPTS = [[5, 17, 99, 3], [42, 7], [250, 1, 2]]
SAMPLED = {"temperature": 1.0, "top_p": 0.9}


def random_params(config, seed=0, std=0.1):
    """Random parameters without compiling the initialiser (keeps the test file fast)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0.0, std, s.shape), jnp.float32), model.param_shapes(config)
    )


@pytest.fixture(scope="module")
def params():
    return random_params(CFG)


@pytest.fixture(scope="module")
def batch():
    return left_pad(PROMPTS)


def strong_iti(mode="last", alpha=8.0):
    """All heads, random directions, sigma 1: strong enough to change greedy tokens."""
    l, h, d = CFG.n_layers, CFG.n_heads, CFG.resolved_head_dim
    return Intervention.create(random_directions(3, l, h, d), np.ones((l, h)), np.ones((l, h), bool), alpha, mode)


def gen(params, batch, **kwargs):
    tokens, mask = batch
    kwargs.setdefault("max_new_tokens", N_NEW)
    kwargs.setdefault("return_logprobs", True)
    return decode.generate(CFG, params, tokens, prompt_mask=mask, **kwargs)


def teacher_forced(params, batch, generated, intervention=None):
    """Uncached forward over prompt + generated tokens; returns (argmax, log p(chosen)) at each new slot.

    With ``intervention``, each edit touches the positions its policy names in a prefill and
    its decode steps (``Intervention.for_sequence``).
    """
    tokens, mask = batch
    if intervention is None:
        intervention = Intervention.zeros(CFG)
    return _teacher_forced(params, jnp.asarray(tokens), jnp.asarray(mask), generated, intervention)


@jax.jit
def _teacher_forced(params, tokens, mask, generated, intervention):
    p = tokens.shape[1]
    full = jnp.concatenate([tokens, generated], axis=1)
    segments = jnp.concatenate([mask, jnp.ones_like(generated, bool)], axis=1).astype(jnp.int32)
    edits = intervention.for_sequence(mask, generated.shape[1])
    logits = model.forward(CFG, params, full, segment_ids=segments, intervention=edits).logits
    logits = logits[:, p - 1 : -1]  # the logits that chose each generated token
    chosen = jnp.take_along_axis(jax.nn.log_softmax(logits), generated[..., None], axis=-1)[..., 0]
    return jnp.argmax(logits, axis=-1), chosen


def test_left_pad():
    tokens, mask = left_pad([[1, 2, 3], [4]], pad_id=9)
    np.testing.assert_array_equal(tokens, [[1, 2, 3], [9, 9, 4]])
    np.testing.assert_array_equal(mask, [[True, True, True], [False, False, True]])
    tokens, mask = left_pad([[1, 2, 3], [4]], multiple=4)
    assert tokens.shape == (2, 4) and mask.sum() == 4 and tokens[0, 1:].tolist() == [1, 2, 3]
    tokens, _ = left_pad([[1, 2, 3, 4, 5]], length=2)
    assert tokens.tolist() == [[4, 5]]
    with pytest.raises(GenerationError, match="sequence 1 is empty"):
        left_pad([[1], []])


def test_greedy_matches_uncached_forward(params, batch):
    out = gen(params, batch)
    assert out.tokens.shape == (3, N_NEW) and out.tokens.dtype == jnp.int32
    np.testing.assert_array_equal(out.lengths, [N_NEW] * 3)
    argmax, logprobs = teacher_forced(params, batch, out.tokens)
    np.testing.assert_array_equal(out.tokens, argmax)
    np.testing.assert_allclose(out.logprobs, logprobs, atol=1e-4)


def test_ragged_rows_match_each_row_alone(params, batch):
    together = gen(params, batch)
    alone = decode.generate(CFG, params, jnp.asarray([PROMPTS[1]]), max_new_tokens=N_NEW, return_logprobs=True)
    np.testing.assert_array_equal(together.tokens[1], alone.tokens[0])
    np.testing.assert_allclose(together.logprobs[1], alone.logprobs[0], atol=1e-5)
    # prompt_lengths is the same as the mask
    tokens, mask = batch
    by_lengths = decode.generate(
        CFG, params, tokens, prompt_lengths=mask.sum(1), max_new_tokens=N_NEW, return_logprobs=True
    )
    np.testing.assert_array_equal(by_lengths.tokens, together.tokens)


def test_eos_stops_rows(params, batch):
    free = gen(params, batch)
    eos = int(free.tokens[0, 2])
    stopped = gen(params, batch, eos_id=eos, pad_id=255)
    for row in range(3):
        hits = np.flatnonzero(np.asarray(free.tokens[row]) == eos)
        n = int(hits[0]) + 1 if hits.size else N_NEW
        assert int(stopped.lengths[row]) == n
        np.testing.assert_array_equal(stopped.tokens[row, :n], free.tokens[row, :n])
        assert (np.asarray(stopped.tokens[row, n:]) == 255).all()
        assert (np.asarray(stopped.logprobs[row, n:]) == 0).all()
        assert stopped.sequences()[row] == np.asarray(free.tokens[row, :n]).tolist()
    assert int(stopped.lengths[0]) <= 3


@functools.partial(jax.jit, static_argnames="settings")
def draw(logits, keys, settings):
    return jax.vmap(lambda key: sample_tokens(logits, key, settings))(keys)


def test_sample_tokens_respects_top_k_and_top_p():
    logits = jax.random.normal(jax.random.key(0), (4, 50)) * 2.0
    keys = jax.random.split(jax.random.key(1), 200)
    order = np.argsort(-np.asarray(logits), axis=1)

    top_k = SamplingSettings(max_new_tokens=1, temperature=1.0, top_k=5)
    draws = np.asarray(draw(logits, keys, top_k))  # [200, 4]
    for row in range(4):
        assert set(draws[:, row]) <= set(order[row, :5])
        assert len(set(draws[:, row])) > 1

    top_p = SamplingSettings(max_new_tokens=1, temperature=1.0, top_p=0.6)
    draws = np.asarray(draw(logits, keys, top_p))
    probs = np.asarray(jax.nn.softmax(logits))
    for row in range(4):
        sorted_probs = probs[row, order[row]]
        size = int(np.searchsorted(np.cumsum(sorted_probs), 0.6) + 1)  # smallest prefix with mass >= 0.6
        assert set(draws[:, row]) <= set(order[row, :size])

    greedy = np.asarray(jnp.argmax(logits, -1))
    for settings in (SamplingSettings(1, temperature=1.0, top_k=1), SamplingSettings(1, temperature=1.0, top_p=1e-6)):
        for row in np.asarray(draw(logits, keys[:20], settings)):
            np.testing.assert_array_equal(row, greedy)


@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.6, 0.9, 0.99])
def test_nucleus_mask_equals_the_sorted_cumulative_rule(top_p):
    """The sort-free nucleus keeps exactly the tokens the sort-and-cumsum definition keeps."""
    scale = np.array([0.1, 1.0, 3.0, 8.0])[:, None]  # flat to peaked rows
    logits = np.asarray(jax.random.normal(jax.random.key(3), (4, 1000))) * scale
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32)), np.float64)
    mask = np.asarray(nucleus_mask(jnp.asarray(probs, jnp.float32), top_p))
    for row in range(len(probs)):
        order = np.argsort(-probs[row])
        before = np.cumsum(probs[row, order]) - probs[row, order]
        expected = np.zeros(probs.shape[1], bool)
        expected[order[before < top_p]] = True
        np.testing.assert_array_equal(mask[row], expected)


def test_sampling_is_seeded(params, batch):
    a = gen(params, batch, **SAMPLED, rng=jax.random.key(1))
    b = gen(params, batch, **SAMPLED, rng=jax.random.key(1))
    c = gen(params, batch, **SAMPLED, rng=jax.random.key(2))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    # sampled tokens and their log-probs agree with an uncached forward
    _, logprobs = teacher_forced(params, batch, a.tokens)
    np.testing.assert_allclose(a.logprobs, logprobs, atol=1e-4)
    with pytest.raises(GenerationError, match="rng"):
        gen(params, batch, **SAMPLED)


@pytest.mark.parametrize("sampling", [{}, {**SAMPLED, "rng": 3}], ids=["greedy", "sampled"])
def test_alpha_zero_is_the_baseline_bitwise(params, batch, sampling):
    baseline = gen(params, batch, **sampling)
    zero = gen(params, batch, intervention=strong_iti(alpha=0.0), **sampling)
    np.testing.assert_array_equal(zero.tokens, baseline.tokens)
    np.testing.assert_array_equal(zero.logprobs, baseline.logprobs)
    shifted = gen(params, batch, intervention=strong_iti(alpha=8.0), **sampling)
    assert not np.array_equal(shifted.logprobs, baseline.logprobs)


def test_changing_alpha_or_directions_does_not_recompile(params, batch):
    gen(params, batch, intervention=strong_iti(alpha=1.0))
    before = decode.trace_counts()
    for alpha in (0.0, 2.0, 4.0, 8.0, 16.0):
        gen(params, batch, intervention=strong_iti(alpha=alpha))
    iti = strong_iti()
    other = Intervention.create(-iti.directions, iti.scales, iti.head_mask, 3.0)
    gen(params, batch, intervention=other)
    gen(params, batch)  # no intervention: the same program too
    assert decode.trace_counts() == before


@pytest.mark.parametrize("mode", ["last", "all", "prompt", "generated"])
def test_generation_shifts_exactly_the_mode_positions(params, batch, mode):
    iti = strong_iti(mode, alpha=6.0)
    out = gen(params, batch, intervention=iti)
    argmax, logprobs = teacher_forced(params, batch, out.tokens, intervention=iti)
    np.testing.assert_array_equal(out.tokens, argmax)
    np.testing.assert_allclose(out.logprobs, logprobs, atol=1e-4)
    # the reference with another mode's positions does not fit: the check can tell modes apart
    other = {"last": "all", "all": "generated", "generated": "last", "prompt": "all"}[mode]
    _, other_logprobs = teacher_forced(params, batch, out.tokens, intervention=iti.with_mode(other))
    assert np.abs(np.asarray(out.logprobs) - other_logprobs).max() > 1e-3


def test_bad_arguments(params, batch):
    tokens, mask = batch
    with pytest.raises(GenerationError, match="left-padded"):
        decode.generate(CFG, params, tokens, prompt_mask=mask[:, ::-1], max_new_tokens=2)
    with pytest.raises(GenerationError, match="max_seq_len"):
        decode.generate(CFG, params, tokens, prompt_mask=mask, max_new_tokens=CFG.max_seq_len)
    with pytest.raises(GenerationError, match="top_p"):
        decode.generate(CFG, params, tokens, max_new_tokens=2, temperature=1.0, top_p=0.0, rng=0)
    with pytest.raises(GenerationError, match="prompt_lengths"):
        decode.generate(CFG, params, tokens, prompt_lengths=[4, 0, 3], max_new_tokens=2)
    wrong = Intervention.zeros(model_preset("tiny", n_layers=3))
    with pytest.raises(InterventionError, match="n_layers=2"):
        decode.generate(CFG, params, tokens, max_new_tokens=2, intervention=wrong)


# -- CLI ----------------------------------------------------------------------------------


class ByteTokenizer:
    """Stand-in with the jaxlm tokenizer interface the CLI uses: UTF-8 bytes as ids."""

    pad_id = 0

    def __init__(self, eos_id=None):
        self.eos_id = eos_id

    def encode_batch(self, texts):
        return [list(text.encode("utf-8")) for text in texts]

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.fixture
def loaded_model(params, monkeypatch):
    from jaxlm import checkpoint

    loaded = checkpoint.LoadedModel(CFG, params, ByteTokenizer(), None, None)
    monkeypatch.setattr(checkpoint, "load_model", lambda path, step=None, mesh=None: loaded)
    return loaded


def alone(params, prompt):
    """The continuation of one prompt, padded as the CLI pads (16 tokens: shares its programs)."""
    tokens, mask = left_pad([list(prompt.encode())], length=16)
    return decode.generate(CFG, params, tokens, prompt_mask=mask, max_new_tokens=4).sequences()[0]


def test_cli_generate_texts_matches_generate(loaded_model, tmp_path):
    from jaxlm.cli.generate import generate_texts, read_prompts

    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hi there"}\n\n{"prompt": "ok"}\n{"prompt": "abc"}\n')
    prompts = read_prompts(tmp_path / "prompts.jsonl")
    assert prompts == ["hi there", "ok", "abc"]
    records = generate_texts(loaded_model, prompts, max_new_tokens=4, batch_size=2, progress=False)
    assert [r["prompt"] for r in records] == prompts
    for record in records:  # each prompt alone gives the same continuation (batching does not leak)
        assert record["tokens"] == alone(loaded_model.params, record["prompt"])
        assert record["completion"] == ByteTokenizer().decode(record["tokens"])
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: expected an object with a string field 'prompt'"):
        read_prompts(tmp_path / "bad.jsonl")


def test_cli_generate_with_iti(loaded_model, tmp_path, capsys):
    import json

    from jaxlm.cli import main

    iti_path = strong_iti(alpha=0.0).save(tmp_path / "iti")
    (tmp_path / "prompts.txt").write_text("first prompt\nsecond\n")
    args = ["generate", "--checkpoint", "ckpt", "--prompts-file", str(tmp_path / "prompts.txt"), "--prompt", "third",
            "--max-new-tokens", "4", "--batch-size", "2", "--no-progress", "--iti", str(iti_path)]
    assert main(args) == 0
    at_zero = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in at_zero] == ["third", "first prompt", "second"] and at_zero[0]["alpha"] == 0.0
    assert main(args + ["--alpha", "8", "--out", str(tmp_path / "out.jsonl")]) == 0
    at_eight = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert at_eight[0]["alpha"] == 8.0
    assert [r["tokens"] for r in at_eight] != [r["tokens"] for r in at_zero]
    assert at_zero[0]["tokens"] == alone(loaded_model.params, "third")  # alpha 0: the un-intervened model
    assert main(["generate", "--checkpoint", "ckpt", "--prompt", "x", "--alpha", "2"]) == 2
    assert "--alpha needs --iti" in capsys.readouterr().err
