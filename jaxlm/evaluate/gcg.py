"""GCG (Zou et al. 2023, "Universal and Transferable Adversarial Attacks on Aligned Language
Models"): optimise an adversarial suffix so that the model continues ``prompt + suffix`` with a
target string. The algorithm follows nanogcg 0.3.0 (the reference implementation in PyTorch).

The attacked sequence is ``prompt`` (left-padded to ``prompt_slots`` with padding no token
attends to) + ``suffix`` (``suffix_length`` tokens) + the target fed back as in generation.
The loss of a suffix is the mean cross-entropy of the target tokens given everything before
them. Each step:

  (a) the loss and its gradient with respect to the one-hot suffix [L, V], through
      ``jaxlm.model.forward(..., token_embeddings=one_hot @ embedding)``; tokens that may not
      appear in a suffix (special tokens, ids past the tokenizer's vocabulary, tokens that decode
      to nothing, and unless ``allow_non_ascii`` tokens whose text is not printable ASCII) get
      a gradient of +inf;
  (b) the ``top_k`` tokens of most negative gradient at each position;
  (c) ``candidates`` new suffixes, each with ``n_replace`` distinct random positions replaced by
      random tokens of their top-k (``jax.random``, key ``fold_in(key(seed), step)``);
      (a)-(c) are one jitted program;
  (d) with ``filter_retokenization``, candidates whose text does not encode back to the same
      ids are dropped (nanogcg ``filter_ids``); all candidates are scored in one jitted call
      (a ``lax.map`` over chunks of ``candidate_batch`` rows: fixed shapes, one compile), and
      the attack moves to the candidate of lowest loss (as nanogcg does, even when it is worse
      than the current suffix);
  (e) success is checked for every candidate from the same logits; with ``early_stop`` the
      attack ends at the first step that finds one.

Success is "the greedy continuation of prompt + suffix starts with the target". It equals
"the teacher-forced argmax at every target position is the target token": greedy decoding
picks the argmax at the last prompt position; when that is the first target token, the next
step sees exactly the teacher-forced input, and so on by induction. So it is read from the
logits the loss already needs (``tests/test_gcg.py`` checks it against
``jaxlm.decode.generate``).

With ``prefix_cache`` the prompt is run once into a KV cache that every gradient and scoring
call continues from (nanogcg's ``use_prefix_cache``); the result is the same as running the
whole sequence each time (to float rounding).

With an intervention the attacked model is the intervened one: its edits touch the positions
a generation from ``prompt + suffix`` touches (``Intervention.for_sequence``: the prompt and
suffix as the prefill, the target positions as decode steps).

The attack's result (``AttackResult``) is the successful suffix of lowest loss when any
succeeded, else the suffix of lowest loss seen, with the best candidate loss of every step.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxlm import model as model_lib
from jaxlm.batching import pad_tokens, round_up
from jaxlm.config import ConfigError, ModelConfig
from jaxlm.errors import JaxlmError

Array = jax.Array
Params = Any
log = logging.getLogger(__name__)

NANOGCG_INIT_SUFFIX = "x x x x x x x x x x x x x x x x x x x x"


class GCGError(JaxlmError, ValueError):
    """An attack that cannot run (empty prompt or target, too long for the context, a top-k larger
    than the allowed tokens); the message names the argument."""


@dataclasses.dataclass(frozen=True)
class GCGConfig:
    """Settings of one GCG attack (names of nanogcg's ``GCGConfig`` in brackets)."""

    suffix_length: int = 20  # suffix tokens (the token count of nanogcg's optim_str_init)
    steps: int = 250  # (num_steps)
    top_k: int = 256  # (topk)
    candidates: int = 512  # candidate suffixes per step (search_width)
    candidate_batch: int | None = None  # candidates per forward when scoring (batch_size); None: all
    n_replace: int = 1
    # The first suffix: this text's tokens, repeated or cut to suffix_length tokens (optim_str_init).
    init_suffix: str = NANOGCG_INIT_SUFFIX
    allow_non_ascii: bool = False
    filter_retokenization: bool = True  # (filter_ids)
    early_stop: bool = True
    prefix_cache: bool = True  # (use_prefix_cache)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("suffix_length", "steps", "top_k", "candidates", "n_replace"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"gcg.{name}: expected an integer >= 1, got {value}")
        if self.n_replace > self.suffix_length:
            raise ConfigError(
                f"gcg.n_replace: expected at most suffix_length ({self.suffix_length}) positions, got {self.n_replace}"
            )
        if self.candidate_batch is not None and self.candidate_batch < 1:
            raise ConfigError(f"gcg.candidate_batch: expected an integer >= 1 (or null: all candidates), got {self.candidate_batch}")
        if not self.init_suffix.strip():
            raise ConfigError("gcg.init_suffix: expected a non-blank text (its tokens start the suffix)")

    @property
    def chunk(self) -> int:
        """Candidates scored per forward."""
        return min(self.candidate_batch or self.candidates, self.candidates)


@dataclasses.dataclass(frozen=True)
class AttackResult:
    suffix_ids: list[int]
    suffix_text: str
    initial_loss: float  # loss of the initial suffix
    best_loss: float  # loss of ``suffix_ids``
    losses: list[float]  # per step run: the loss of the candidate the attack moved to
    steps: int  # steps run
    success: bool  # the greedy continuation of prompt + suffix_ids starts with the target
    success_step: int | None  # first step that found a successful suffix (0: the initial one)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@struct.dataclass
class Problem:
    """The fixed parts of one attack: prompt [P] (left-padded; ``prompt_mask`` marks real tokens),
    target [T], and with a prefix cache the prompt's keys and values (batch 1)."""

    prompt: Array  # [P] int32
    prompt_mask: Array  # [P] bool
    target: Array  # [T] int32
    cache: model_lib.KVCache | None
    suffix_length: int = struct.field(pytree_node=False)

    @property
    def length(self) -> int:
        """Tokens of the whole forward: prompt slots, suffix, target but its last token."""
        return self.prompt.shape[0] + self.suffix_length + self.target.shape[0] - 1


# ---------------------------------------------------------------------------------------
# Tokens a suffix may use
# ---------------------------------------------------------------------------------------


def special_token_ids(tokenizer: Any) -> set[int]:
    """The tokenizer's special (added) tokens, its end-of-document and padding ids."""
    ids = {tokenizer.eos_id, tokenizer.pad_id}
    decoder = tokenizer.backend.get_added_tokens_decoder()
    ids.update(i for i, token in decoder.items() if token.special)
    return ids


def disallowed_tokens(tokenizer: Any, vocab_size: int, allow_non_ascii: bool = False) -> np.ndarray:
    """[vocab_size] bool: the ids a suffix may not use (see the module docstring, step (a))."""
    known = min(tokenizer.vocab_size, vocab_size)
    texts = tokenizer.decode_batch([[i] for i in range(known)], skip_special_tokens=False)
    bad = np.ones(vocab_size, bool)
    for i, text in enumerate(texts):
        bad[i] = text == "" or (not allow_non_ascii and not (text.isascii() and text.isprintable()))
    bad[[i for i in special_token_ids(tokenizer) if i < vocab_size]] = True
    return bad


def initial_suffix(tokenizer: Any, config: GCGConfig) -> list[int]:
    """``config.init_suffix``'s tokens, repeated or cut to ``suffix_length`` tokens."""
    ids = tokenizer.encode(config.init_suffix)
    if not ids:
        raise ConfigError(f"gcg.init_suffix: {config.init_suffix!r} encodes to no tokens")
    return (ids * math.ceil(config.suffix_length / len(ids)))[: config.suffix_length]


def retokenizes(tokenizer: Any, suffixes: np.ndarray) -> np.ndarray:
    """[N] bool: which suffixes [N, L] encode back to the same ids after decoding (nanogcg ``filter_ids``)."""
    again = tokenizer.encode_batch(tokenizer.decode_batch(suffixes.tolist()))
    return np.asarray([ids == row for ids, row in zip(again, suffixes.tolist())], bool)


# ---------------------------------------------------------------------------------------
# The model on prompt + suffix + target
# ---------------------------------------------------------------------------------------


def _sequence_edits(problem: Problem, intervention: Any, batch: int, part: slice) -> Any:
    """The intervention's edits at positions ``part`` of the whole sequence, for ``batch`` rows,
    placed as a generation from prompt + suffix places them (``Intervention.for_sequence``)."""
    if intervention is None:
        return None
    prefill = jnp.concatenate([problem.prompt_mask, jnp.ones(problem.suffix_length, bool)])
    prefill = jnp.broadcast_to(prefill, (batch, prefill.shape[0]))
    resolved = intervention.for_sequence(prefill, problem.target.shape[0] - 1)
    return resolved.replace(edits=tuple(e.replace(position_mask=e.position_mask[:, part]) for e in resolved.edits))


def _prompt_cache(config: ModelConfig, params: Params, problem: Problem, intervention: Any) -> model_lib.KVCache:
    """The prompt's keys and values in a cache with room for the suffix and the target."""
    p = problem.prompt.shape[0]
    cache = model_lib.init_cache(config, 1, problem.length)
    return model_lib.forward(
        config, params, problem.prompt[None], segment_ids=problem.prompt_mask[None].astype(jnp.int32),
        cache=cache, intervention=_sequence_edits(problem, intervention, 1, slice(0, p)), last_logits_only=True,
    ).cache


_prompt_cache_jit = jax.jit(_prompt_cache, static_argnums=0)


def _broadcast_cache(cache: model_lib.KVCache, batch: int) -> model_lib.KVCache:
    def rows(x: Array, axis: int) -> Array:
        shape = list(x.shape)
        shape[axis] = batch
        return jnp.broadcast_to(x, shape)

    return cache.replace(k=rows(cache.k, 1), v=rows(cache.v, 1), segment_ids=rows(cache.segment_ids, 0))


def target_logits(config: ModelConfig, params: Params, problem: Problem, suffix_embeds: Array, intervention: Any = None) -> Array:
    """[B, T, V] logits at the positions that predict the target tokens, for suffix embeddings [B, L, d]."""
    b, l, d = suffix_embeds.shape
    p = problem.prompt.shape[0]
    embedding = params["embedding"]
    fed_target = jnp.broadcast_to(jnp.take(embedding, problem.target[:-1], axis=0), (b, problem.target.shape[0] - 1, d))
    if problem.cache is not None:
        x = jnp.concatenate([suffix_embeds, fed_target], axis=1)
        n = x.shape[1]
        out = model_lib.forward(
            config, params, jnp.zeros((b, n), jnp.int32), segment_ids=jnp.ones((b, n), jnp.int32),
            cache=_broadcast_cache(problem.cache, b), token_embeddings=x,
            intervention=_sequence_edits(problem, intervention, b, slice(p, None)),
        )
        return out.logits[:, l - 1:]
    prompt = jnp.broadcast_to(jnp.take(embedding, problem.prompt, axis=0), (b, p, d))
    x = jnp.concatenate([prompt, suffix_embeds, fed_target], axis=1)
    n = x.shape[1]
    segments = jnp.concatenate([problem.prompt_mask.astype(jnp.int32), jnp.ones(n - p, jnp.int32)])
    out = model_lib.forward(
        config, params, jnp.zeros((b, n), jnp.int32), segment_ids=jnp.broadcast_to(segments, (b, n)),
        token_embeddings=x, intervention=_sequence_edits(problem, intervention, b, slice(None)),
    )
    return out.logits[:, p + l - 1:]


def target_loss(logits: Array, target: Array) -> tuple[Array, Array]:
    """(mean cross-entropy of ``target`` [T] per row [B], whether the argmax is the target at every position [B])."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.broadcast_to(target, logits.shape[:2])[..., None], axis=-1)[..., 0]
    hits = jnp.all(jnp.argmax(logits, axis=-1) == target, axis=-1)
    return nll.mean(axis=-1), hits


def _one_hot_loss(config: ModelConfig, params: Params, problem: Problem, one_hot: Array, intervention: Any):
    embeds = (one_hot @ params["embedding"])[None]
    loss, hits = target_loss(target_logits(config, params, problem, embeds, intervention), problem.target)
    return loss[0], hits[0]


@functools.partial(jax.jit, static_argnums=0)
def token_gradient(config: ModelConfig, params: Params, problem: Problem, suffix: Array, intervention: Any = None):
    """(loss, success, gradient [L, V] of the loss with respect to the one-hot ``suffix`` [L])."""
    one_hot = jax.nn.one_hot(suffix, config.vocab_size, dtype=jnp.float32)
    (loss, hits), grad = jax.value_and_grad(
        lambda h: _one_hot_loss(config, params, problem, h, intervention), has_aux=True
    )(one_hot)
    return loss, hits, grad


def sample_candidates(key: Array, suffix: Array, top: Array, n: int, n_replace: int) -> Array:
    """[n, L] suffixes: ``suffix`` [L] with ``n_replace`` distinct random positions each set to a
    random one of that position's ``top`` [L, k] tokens."""
    length, k = top.shape
    position_key, token_key = jax.random.split(key)
    positions = jnp.argsort(jax.random.uniform(position_key, (n, length)), axis=1)[:, :n_replace]
    picks = jax.random.randint(token_key, (n, n_replace), 0, k)
    rows = jnp.arange(n)[:, None]
    return jnp.broadcast_to(suffix, (n, length)).at[rows, positions].set(top[positions, picks])


@functools.partial(jax.jit, static_argnums=0, static_argnames=("top_k", "n", "n_replace"))
def gradient_step(
    config: ModelConfig, params: Params, problem: Problem, suffix: Array, disallowed: Array, key: Array,
    intervention: Any = None, *, top_k: int, n: int, n_replace: int,
) -> tuple[Array, Array, Array]:
    """Steps (a)-(c): (loss and success of ``suffix``, [n, L] candidate suffixes)."""
    loss, hits, grad = token_gradient(config, params, problem, suffix, intervention)
    grad = jnp.where(disallowed[None, :], jnp.inf, grad)
    top = jax.lax.top_k(-grad, top_k)[1]
    return loss, hits, sample_candidates(key, suffix, top, n, n_replace)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("chunk",))
def score_suffixes(config: ModelConfig, params: Params, problem: Problem, suffixes: Array, intervention: Any = None,
                   *, chunk: int) -> tuple[Array, Array]:
    """(loss [N], success [N]) of suffixes [N, L], ``chunk`` rows per forward, in one program."""
    n, length = suffixes.shape
    rows = round_up(n, chunk)
    padded = jnp.concatenate([suffixes, jnp.broadcast_to(suffixes[-1:], (rows - n, length))])

    def score(ids: Array) -> tuple[Array, Array]:
        embeds = jnp.take(params["embedding"], ids, axis=0)
        return target_loss(target_logits(config, params, problem, embeds, intervention), problem.target)

    losses, hits = jax.lax.map(score, padded.reshape(rows // chunk, chunk, length))
    return losses.reshape(-1)[:n], hits.reshape(-1)[:n]


# ---------------------------------------------------------------------------------------
# The attack
# ---------------------------------------------------------------------------------------


def make_problem(
    config: ModelConfig, params: Params, prompt_ids: Sequence[int], target_ids: Sequence[int], suffix_length: int, *,
    prompt_slots: int | None = None, prefix_cache: bool = True, intervention: Any = None,
) -> Problem:
    """The fixed parts of an attack; the prompt left-padded to ``prompt_slots`` (default: its length)."""
    prompt_ids, target_ids = [int(t) for t in prompt_ids], [int(t) for t in target_ids]
    if not prompt_ids:
        raise GCGError("prompt_ids: expected at least one token")
    if not target_ids:
        raise GCGError("target_ids: expected at least one token")
    slots = len(prompt_ids) if prompt_slots is None else prompt_slots
    if slots < len(prompt_ids):
        raise GCGError(f"prompt_slots: {slots} is fewer than the prompt's {len(prompt_ids)} tokens")
    total = slots + suffix_length + len(target_ids)
    if total > config.max_seq_len:
        raise GCGError(
            f"prompt ({slots} slots) + suffix ({suffix_length}) + target ({len(target_ids)}) = {total} tokens "
            f"exceed the model's max_seq_len {config.max_seq_len}"
        )
    for name, ids in (("prompt_ids", prompt_ids), ("target_ids", target_ids)):
        if min(ids) < 0 or max(ids) >= config.vocab_size:
            raise GCGError(f"{name}: token ids must be in 0..{config.vocab_size - 1}, got {min(ids)}..{max(ids)}")
    tokens, mask = pad_tokens([prompt_ids], slots, side="left")
    problem = Problem(prompt=jnp.asarray(tokens[0]), prompt_mask=jnp.asarray(mask[0]),
                      target=jnp.asarray(target_ids, jnp.int32), cache=None, suffix_length=suffix_length)
    if prefix_cache:
        problem = problem.replace(cache=_prompt_cache_jit(config, params, problem, intervention))
    return problem


def _program_intervention(config: ModelConfig, intervention: Any) -> Any:
    if intervention is None:
        return None
    intervention.check_compatible(config)
    return intervention.program_form()


def attack(
    model_config: ModelConfig,
    params: Params,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    target_ids: Sequence[int],
    config: GCGConfig = GCGConfig(),
    intervention: Any = None,
    progress: bool = False,
    *,
    prompt_slots: int | None = None,
) -> AttackResult:
    """Run GCG on one prompt/target pair (token ids) against the model (with ``intervention``,
    any ``jaxlm.intervene.Intervention``, applied). ``prompt_slots``: left-pad the prompt to this
    many tokens, so attacks on prompts of different lengths share compiled programs."""
    intervention = _program_intervention(model_config, intervention)
    disallowed = disallowed_tokens(tokenizer, model_config.vocab_size, config.allow_non_ascii)
    allowed = int((~disallowed).sum())
    if config.top_k > allowed:
        raise GCGError(f"gcg.top_k: expected at most the {allowed} tokens a suffix may use, got {config.top_k}")
    problem = make_problem(model_config, params, prompt_ids, target_ids, config.suffix_length,
                           prompt_slots=prompt_slots, prefix_cache=config.prefix_cache, intervention=intervention)
    disallowed = jnp.asarray(disallowed)
    key = jax.random.key(config.seed)
    current = np.asarray(initial_suffix(tokenizer, config), np.int32)
    best: tuple[bool, float, np.ndarray] | None = None  # (success, loss, ids): the result so far
    initial_loss, success_step, losses = math.nan, None, []
    steps = range(1, config.steps + 1)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="gcg", unit="step", leave=False)
    for step in steps:
        loss, hit, candidates = gradient_step(
            model_config, params, problem, jnp.asarray(current), disallowed, jax.random.fold_in(key, step),
            intervention, top_k=config.top_k, n=config.candidates, n_replace=config.n_replace,
        )
        if step == 1:
            initial_loss = float(loss)
            best = (bool(hit), initial_loss, current)
            if bool(hit):
                success_step = 0
                if config.early_stop:
                    break
        candidates = np.asarray(candidates)
        valid = retokenizes(tokenizer, candidates) if config.filter_retokenization else np.ones(len(candidates), bool)
        if not valid.any():  # nanogcg gives up here; the next step draws new candidates
            log.warning("gcg step %d: no candidate survives retokenization; keeping the current suffix", step)
            losses.append(float(loss))
            continue
        cand_losses, cand_hits = (np.asarray(a) for a in score_suffixes(
            model_config, params, problem, jnp.asarray(candidates), intervention, chunk=config.chunk))
        cand_losses = np.where(valid, cand_losses, np.inf)
        cand_hits = cand_hits & valid
        choice = int(np.argmin(np.where(cand_hits, cand_losses, np.inf) if cand_hits.any() else cand_losses))
        current, hit = candidates[choice], bool(cand_hits[choice])
        losses.append(float(cand_losses[choice]))
        if (hit, -losses[-1]) > (best[0], -best[1]):
            best = (hit, losses[-1], current)
        if progress:
            steps.set_postfix(loss=f"{losses[-1]:.3f}", best=f"{best[1]:.3f}")
        if hit:
            success_step = step if success_step is None else success_step
            if config.early_stop:
                break
    success, best_loss, ids = best
    return AttackResult(
        suffix_ids=ids.tolist(), suffix_text=tokenizer.decode(ids.tolist()), initial_loss=initial_loss,
        best_loss=best_loss, losses=losses, steps=len(losses), success=success, success_step=success_step,
    )
