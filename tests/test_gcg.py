"""GCG (jaxlm.evaluate.gcg): one-hot gradients against torch autograd on the same weights, the
teacher-forced success check against greedy generation, batched scoring, and attacks that work."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import decode, hf, model
from jaxlm.config import ConfigError, from_dict, model_preset
from jaxlm.evaluate import gcg
from jaxlm.intervene import Intervention, add_edit

from conftest import CLEAN_WORDS, TOXIC_WORDS, synthetic_documents

SUFFIX = 6
SLOTS = 16  # every prompt is left-padded to 16 tokens and every target has 4: the tests share compiled programs
SMALL = gcg.GCGConfig(suffix_length=SUFFIX, steps=40, top_k=32, candidates=64, candidate_batch=32,
                      init_suffix="x x x x x x")


@pytest.fixture(scope="module")
def tokenizer():
    from jaxlm.tokenizer import train_bpe

    docs = synthetic_documents(CLEAN_WORDS, 200, 0) + synthetic_documents(TOXIC_WORDS, 200, 1)
    return train_bpe(docs, vocab_size=320)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    """A random tiny model whose logits depend strongly on its input (init_std 0.3)."""
    config = model_preset("tiny", vocab_size=320, init_std=0.3)
    return config, model.init_params(config, 0)


def random_suffixes(tokenizer, config, n=SMALL.candidates, seed=0):
    allowed = np.flatnonzero(~gcg.disallowed_tokens(tokenizer, config.vocab_size))
    return np.random.default_rng(seed).choice(allowed, (n, SUFFIX)).astype(np.int32)


def residual_add(config, scale=0.5):
    v = np.random.default_rng(0).normal(size=(config.n_layers, config.d_model)).astype(np.float32)
    return Intervention.from_edits([add_edit("resid_mid", v, positions="last")], scale=scale)


def problem_of(tiny, prompt, target, **options):
    config, params = tiny
    return gcg.make_problem(config, params, prompt, target, SUFFIX, **{"prompt_slots": SLOTS, **options})


def score(tiny, problem, suffixes, intervention=None, chunk=SMALL.chunk):
    config, params = tiny
    losses, hits = gcg.score_suffixes(config, params, problem, jnp.asarray(suffixes), intervention, chunk=chunk)
    return np.asarray(losses), np.asarray(hits)


def greedy(tiny, prompt, suffixes, intervention=None):
    """The 4-token greedy continuation of prompt + each suffix."""
    config, params = tiny
    tokens = np.asarray([prompt + list(s) for s in suffixes])
    return decode.generate(config, params, tokens, max_new_tokens=4, intervention=intervention).sequences()


# ---------------------------------------------------------------------------------------
# The one-hot gradient equals torch autograd on the exported model
# ---------------------------------------------------------------------------------------


def torch_loss_and_grad(hf_model, prompt, suffix, target):
    import torch

    embedding = hf_model.get_input_embeddings().weight
    one_hot = torch.nn.functional.one_hot(torch.tensor(suffix), embedding.shape[0]).to(embedding.dtype)
    one_hot.requires_grad_()
    pieces = [embedding[torch.tensor(prompt)], one_hot @ embedding, embedding[torch.tensor(target[:-1])]]
    logits = hf_model(inputs_embeds=torch.cat(pieces)[None]).logits[0]
    start = len(prompt) + len(suffix) - 1
    loss = torch.nn.functional.cross_entropy(logits[start:start + len(target)], torch.tensor(target))
    (grad,) = torch.autograd.grad(loss, one_hot)
    return loss.item(), grad.numpy()


def test_one_hot_gradient_matches_torch_autograd(tmp_path):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = model_preset("tiny", init_std=0.15)
    params = model.init_params(config, 3)
    hf.save(config, params, tmp_path)
    reference = transformers.OlmoForCausalLM.from_pretrained(tmp_path).eval()

    rng = np.random.default_rng(0)
    prompt, suffix, target = (rng.integers(0, config.vocab_size, n).tolist() for n in (9, SUFFIX, 5))
    want_loss, want_grad = torch_loss_and_grad(reference, prompt, suffix, target)
    assert np.abs(want_grad).max() > 1e-2  # a gradient worth comparing
    problem = gcg.make_problem(config, params, prompt, target, SUFFIX)  # through the prompt's KV cache
    loss, _, grad = gcg.token_gradient(config, params, problem, jnp.asarray(suffix, jnp.int32))
    assert abs(float(loss) - want_loss) <= 1e-4
    np.testing.assert_allclose(np.asarray(grad), want_grad, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------
# Success = the greedy continuation starts with the target
# ---------------------------------------------------------------------------------------

PROMPT = "the river ran past old"


@pytest.mark.parametrize("with_intervention", [False, True])
def test_teacher_forced_success_equals_greedy_generation(tokenizer, tiny, with_intervention):
    intervention = residual_add(tiny[0]) if with_intervention else None
    prompt = tokenizer.encode(PROMPT)
    suffixes = random_suffixes(tokenizer, tiny[0], seed=1)
    continuations = greedy(tiny, prompt, suffixes, intervention)
    # Target: suffix 0's greedy continuation, so some suffixes succeed and others do not.
    target = continuations[0]
    want = np.asarray([c == target for c in continuations])
    assert want[0] and not want.all()
    _, hits = score(tiny, problem_of(tiny, prompt, target, intervention=intervention), suffixes, intervention)
    np.testing.assert_array_equal(hits, want)


def test_batched_scoring_equals_one_candidate_at_a_time(tokenizer, tiny):
    config, params = tiny
    prompt, target = tokenizer.encode("children read books"), tokenizer.encode(" you stupid idiot hate")
    suffixes = random_suffixes(tokenizer, config, seed=2)
    problem = problem_of(tiny, prompt, target)
    batched, _ = score(tiny, problem, suffixes)
    single = [score(tiny, problem, s[None], chunk=1)[0][0] for s in suffixes[:5]]
    disallowed = jnp.asarray(gcg.disallowed_tokens(tokenizer, config.vocab_size))
    gradient = [float(gcg.gradient_step(config, params, problem, jnp.asarray(s), disallowed, jax.random.key(0), top_k=32,
                                        n=SMALL.candidates, n_replace=1)[0]) for s in suffixes[:5]]
    np.testing.assert_allclose(batched[:5], single, atol=1e-5)
    np.testing.assert_allclose(batched[:5], gradient, atol=1e-5)
    assert np.ptp(batched) > 0.1  # the candidates differ
    # Running the whole sequence instead of continuing the prompt's KV cache changes only rounding.
    again, _ = score(tiny, problem_of(tiny, prompt, target, prefix_cache=False), suffixes)
    np.testing.assert_allclose(again, batched, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Attacks
# ---------------------------------------------------------------------------------------


def attack(tokenizer, tiny, prompt, target, config=SMALL, **options):
    return gcg.attack(*tiny, tokenizer, prompt, target, config, prompt_slots=SLOTS, **options)


def test_gcg_lowers_the_target_loss_far_below_random_suffixes(tokenizer, tiny):
    config, _ = tiny
    prompt, target = tokenizer.encode(PROMPT), tokenizer.encode(" you stupid idiot hate")
    problem = problem_of(tiny, prompt, target)
    random_losses, _ = score(tiny, problem, random_suffixes(tokenizer, config, seed=3))
    result = attack(tokenizer, tiny, prompt, target, dataclasses.replace(SMALL, early_stop=False))
    assert result.steps == SMALL.steps == len(result.losses)
    assert result.best_loss == pytest.approx(min([result.initial_loss, *result.losses]), abs=1e-6)
    # log-likelihood of the target: nats per token gained over the typical and the best random suffix
    assert random_losses.mean() - result.best_loss > 2.0
    assert random_losses.min() - result.best_loss > 1.0
    # the result is what it claims, and a suffix the tokenizer reproduces
    assert result.suffix_text == tokenizer.decode(result.suffix_ids)
    assert tokenizer.encode(result.suffix_text) == result.suffix_ids
    assert not gcg.disallowed_tokens(tokenizer, config.vocab_size)[result.suffix_ids].any()
    again, _ = score(tiny, problem, [result.suffix_ids] * SMALL.candidates)
    assert again[0] == pytest.approx(result.best_loss, abs=1e-5)


def test_attack_stops_at_success_and_generation_agrees(tokenizer, tiny):
    prompt = tokenizer.encode(PROMPT)
    suffixes = random_suffixes(tokenizer, tiny[0], seed=1)
    target = greedy(tiny, prompt, suffixes)[0]  # a continuation some suffix reaches
    result = attack(tokenizer, tiny, prompt, target)
    assert result.success and result.success_step == result.steps < SMALL.steps
    assert greedy(tiny, prompt, [result.suffix_ids, *suffixes[1:]])[0] == target
    # the same attack is reproducible (seeded), and another seed takes another path
    assert attack(tokenizer, tiny, prompt, target) == result
    other = attack(tokenizer, tiny, prompt, target, dataclasses.replace(SMALL, seed=1, steps=3))
    assert other.losses != result.losses[:3]


def test_intervention_changes_the_attacked_model_and_scale_zero_is_none(tokenizer, tiny):
    config, _ = tiny
    prompt, target = tokenizer.encode("old stone houses"), tokenizer.encode(" those people are trash")
    suffixes = random_suffixes(tokenizer, config, seed=5)
    plain, _ = score(tiny, problem_of(tiny, prompt, target), suffixes)
    zero = residual_add(config, scale=0.0)
    at_zero, _ = score(tiny, problem_of(tiny, prompt, target, intervention=zero), suffixes, zero)
    np.testing.assert_allclose(at_zero, plain, atol=1e-5)
    edit = residual_add(config)
    edited, _ = score(tiny, problem_of(tiny, prompt, target, intervention=edit), suffixes, edit)
    assert np.abs(edited - plain).min() > 0.01

    short = dataclasses.replace(SMALL, steps=3, early_stop=False)
    with_edit = attack(tokenizer, tiny, prompt, target, short, intervention=edit)
    without = attack(tokenizer, tiny, prompt, target, short)
    assert with_edit.steps == 3 and abs(with_edit.initial_loss - without.initial_loss) > 0.01
    assert with_edit.initial_loss == pytest.approx(score(tiny, problem_of(tiny, prompt, target, intervention=edit),
                                                         [gcg.initial_suffix(tokenizer, SMALL)] * 64, edit)[0][0], abs=1e-5)


# ---------------------------------------------------------------------------------------
# Tokens, settings and bad input
# ---------------------------------------------------------------------------------------


def test_disallowed_tokens_and_retokenization_filter(tokenizer):
    vocab = tokenizer.vocab_size + 8  # a model vocabulary padded past the tokenizer's
    bad = gcg.disallowed_tokens(tokenizer, vocab)
    assert bad[tokenizer.eos_id] and bad[tokenizer.pad_id] and bad[tokenizer.vocab_size:].all()
    texts = {i: tokenizer.decode([i], skip_special_tokens=False) for i in range(tokenizer.vocab_size)}
    assert all(bad[i] for i, t in texts.items() if not (t.isascii() and t.isprintable()))
    assert not any(bad[i] for i, t in texts.items() if t.isascii() and t.isprintable() and t and i not in
                   gcg.special_token_ids(tokenizer))
    non_ascii = [i for i, t in texts.items() if not t.isascii()]
    assert non_ascii and not gcg.disallowed_tokens(tokenizer, vocab, allow_non_ascii=True)[non_ascii].any()

    whole = tokenizer.encode(" the")
    split = [tokenizer.encode(" x")[0], *tokenizer.encode("the"), *whole]  # " " + "the" decodes to " the" too
    assert len(whole) == 1
    keep = gcg.retokenizes(tokenizer, np.asarray([whole * len(split), split]))
    assert keep.tolist() == [True, False]


def test_initial_suffix_is_the_init_text_repeated_or_cut(tokenizer):
    x, space, _ = tokenizer.encode("x x")  # this tokenizer has no " x" token
    assert gcg.initial_suffix(tokenizer, gcg.GCGConfig(suffix_length=4)) == [x, space, x, space]
    assert gcg.initial_suffix(tokenizer, gcg.GCGConfig(suffix_length=5, init_suffix="x x")) == [x, space, x, x, space]


@pytest.mark.parametrize("changes, field", [
    ({"top_k": 0}, "gcg.top_k"),
    ({"candidates": 0}, "gcg.candidates"),
    ({"n_replace": 7, "suffix_length": 6}, "gcg.n_replace"),
    ({"candidate_batch": 0}, "gcg.candidate_batch"),
    ({"init_suffix": "  "}, "gcg.init_suffix"),
    ({"steps": "many"}, "gcg.steps"),
    ({"topk": 3}, "unknown key 'topk'"),
])
def test_bad_settings_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        from_dict(gcg.GCGConfig, changes, "gcg")


def test_attacks_that_cannot_run_are_refused(tokenizer, tiny):
    config, params = tiny
    prompt, target = tokenizer.encode("the river"), tokenizer.encode(" you")
    with pytest.raises(gcg.GCGError, match="gcg.top_k: expected at most the"):
        attack(tokenizer, tiny, prompt, target, dataclasses.replace(SMALL, top_k=300))
    with pytest.raises(gcg.GCGError, match="target_ids: expected at least one token"):
        gcg.make_problem(config, params, prompt, [], SUFFIX)
    with pytest.raises(gcg.GCGError, match="exceed the model's max_seq_len 64"):
        gcg.make_problem(config, params, prompt, target, SUFFIX, prompt_slots=60)
    with pytest.raises(gcg.GCGError, match="prompt_slots: 1 is fewer"):
        gcg.make_problem(config, params, prompt, target, SUFFIX, prompt_slots=1)
    with pytest.raises(gcg.GCGError, match=r"token ids must be in 0\.\.319"):
        gcg.make_problem(config, params, prompt, [320], SUFFIX)
    with pytest.raises(ValueError, match="token_embeddings: expected shape"):
        model.forward(config, params, jnp.zeros((1, 4), jnp.int32), token_embeddings=jnp.zeros((1, 3, config.d_model)))


def test_token_embeddings_of_the_lookup_reproduce_the_tokens_logits():
    config = model_preset("tiny", position_embedding="learned")
    params = model.init_params(config, 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 10)), jnp.int32)

    @jax.jit
    def both(params, tokens):
        one_hot = jax.nn.one_hot(tokens, config.vocab_size)
        via_embeddings = model.forward(config, params, tokens, token_embeddings=one_hot @ params["embedding"])
        return via_embeddings.logits, model.forward(config, params, tokens).logits

    via_embeddings, via_tokens = both(params, tokens)
    np.testing.assert_allclose(np.asarray(via_embeddings), np.asarray(via_tokens), atol=1e-5)
