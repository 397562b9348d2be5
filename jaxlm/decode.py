"""Batched generation with the KV cache: a jitted prefill, then a jitted ``lax.while_loop`` decode.

``generate(config, params, tokens, max_new_tokens=..., ...)`` takes a left-padded batch of
prompts (``prompt_mask`` or ``prompt_lengths`` say which tokens are real; ``left_pad`` builds
one from Python lists) and returns ``Generation(tokens [B, N], lengths [B], logprobs)``.

Programs: one prefill and one decode loop per (batch, prompt length, ``max_new_tokens``,
sampling settings, intervention structure: the sites, operations and position policies of
its edits). The intervention (any ``jaxlm.intervene.Intervention``: decode knows no method)
is an ordinary pytree argument, its arrays and scale dynamic; without one a zero ITI-shaped
intervention is passed, so baseline and ITI runs, and every scale, share the compiled
programs. Position policies are resolved here: the prefill touches the positions of
``Intervention.for_prefill`` (``last``: the last real prompt token; ``all``/``prompt``: every
real prompt token; ``generated``: none), each decode step its one new position unless the
policy is ``prompt``. The decode state (cache included) is donated to the loop.

Padding: pad slots get segment id 0 in the cache, so nothing attends to them, and positions
count real tokens only (a row's first real token is position 0), so a row's continuation
does not depend on how much it was padded. A row stops after emitting ``eos_id``; its later
slots hold ``pad_id``. Sampling is seeded: the key for step ``i`` is ``fold_in(rng, i)``.

Sharding: generation runs where the parameters are. Parameters on a mesh (``NamedSharding``s,
e.g. ``jaxlm.checkpoint.load_model(path, mesh=...)`` or ``jaxlm.sharding.place_params``) make
both programs run on that mesh under the logical-axis rules: the prompts' batch over
``data`` x ``fsdp`` (filled up to a multiple of those shards with copies of the last prompt,
which count as done from the start and are dropped from the result), the KV cache laid out
per ``jaxlm.model.CACHE_LOGICAL_AXES`` (batch over the data axes, kv heads over ``tensor``),
the intervention and the key replicated. The tokens equal those of one device (greedy, and
sampling with the same key: its draws do not depend on the sharding); log-probs agree to
float rounding (sharded matmuls sum in another order).

Numerics: the loop carries, per row, the first step whose logits held a NaN or inf; after
the loop ``generate`` raises ``NonFiniteLogitsError`` naming that row and step, rather than
returning the (meaningless, often empty) text such logits produce.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxlm import sharding as sharding_lib
from jaxlm.batching import fill_rows, pad_tokens, round_up
from jaxlm.config import ModelConfig
from jaxlm.errors import JaxlmError
from jaxlm.intervene import Intervention
from jaxlm.model import KVCache, Params, forward, init_cache

Array = jax.Array
log = logging.getLogger(__name__)

# Which draws a seed gives; bump when sampling changes them (sweeps redo their generations).
# 2: sort-free nucleus and Gumbel-max (1: argsort nucleus, jax.random.categorical).
SAMPLER_VERSION = 2

# Times each jitted program body was traced (= compiled), by name; see ``trace_counts``.
_TRACES: collections.Counter = collections.Counter()


class GenerationError(JaxlmError, ValueError):
    """Bad generation arguments; the message names the argument."""


class NonFiniteLogitsError(GenerationError):
    """The model produced NaN or inf logits: ``row`` (of the batch) at ``step`` (generated token) first."""

    def __init__(self, message: str, row: int, step: int):
        super().__init__(message)
        self.row, self.step = row, step


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """The static part of a generation call (a change compiles new programs)."""

    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus: smallest set of tokens with probability >= top_p (1: off)
    top_k: int = 0  # only the k most likely tokens (0: off)
    eos_id: int | None = None
    pad_id: int = 0
    return_logprobs: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens: expected >= 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise GenerationError(f"temperature: expected >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p: expected 0 < top_p <= 1, got {self.top_p}")
        if self.top_k < 0:
            raise GenerationError(f"top_k: expected >= 0 (0 = off), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@struct.dataclass
class Generation:
    """What ``generate`` returns."""

    tokens: Array  # [B, N] int32: generated tokens; pad_id after a row's eos (or early stop)
    lengths: Array  # [B] int32: generated tokens per row, eos included
    logprobs: Array | None = None  # [B, N] float32: log p(token) under the model; 0 at pads

    def sequences(self) -> list[list[int]]:
        """Each row's generated ids, up to and including its eos."""
        tokens, lengths = np.asarray(self.tokens), np.asarray(self.lengths)
        return [row[:n].tolist() for row, n in zip(tokens, lengths)]


@struct.dataclass
class DecodeState:
    """The ``lax.while_loop`` carry."""

    cache: KVCache
    tokens: Array  # [B, N] int32 output buffer
    logprobs: Array  # [B, N] float32
    last: Array  # [B] int32: the token to feed next
    lengths: Array  # [B] int32
    done: Array  # [B] bool: the row has emitted eos
    step: Array  # [] int32: the output column written next
    rng: Array  # PRNG key
    first_nonfinite: Array  # [B] int32: the step whose logits first held NaN/inf (-1: none yet)


# ---------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int = 0, length: int | None = None, multiple: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists into ``(tokens [B, P] int32, prompt_mask [B, P] bool)``.

    ``P`` is ``length`` or the longest sequence, rounded up to ``multiple`` (fewer distinct
    shapes, fewer compiles). Sequences longer than ``length`` keep their last tokens.
    """
    if not sequences:
        raise GenerationError("left_pad: no sequences")
    for i, seq in enumerate(sequences):
        if len(seq) == 0:
            raise GenerationError(f"left_pad: sequence {i} is empty (a prompt needs at least one token)")
    longest = max(len(s) for s in sequences)
    p = round_up(length if length is not None else longest, multiple)
    return pad_tokens(sequences, p, side="left", pad_id=pad_id)


def keep_last_tokens(
    sequences: Sequence[Sequence[int]], limit: int, what: str = "prompt", head: Sequence[int] = ()
) -> tuple[list[list[int]], int]:
    """Each sequence cut to ``limit`` tokens, and how many were cut; one warning if any were.

    A cut sequence keeps its last tokens; one that starts with ``head`` (a prompt prefix: an
    instruction, a tag) keeps ``head`` too and loses the tokens after it instead.
    """
    head = list(head)
    if limit <= len(head):
        after = f" after their {len(head)}-token prefix" if head else ""
        raise GenerationError(f"{what}s: a limit of {limit} tokens leaves no room{after}")

    def cut_to_limit(seq: list[int]) -> list[int]:
        if len(seq) <= limit:
            return seq
        kept_head = head if head and seq[: len(head)] == head else []
        return kept_head + seq[len(kept_head):][-(limit - len(kept_head)):]

    kept = [cut_to_limit(list(seq)) for seq in sequences]
    cut = sum(len(seq) > limit for seq in sequences)
    if cut:
        log.warning(
            "%d of %d %ss are longer than %d tokens (the context left after the new tokens); they keep %s"
            "their last tokens", cut, len(kept), what, limit, f"their {len(head)}-token prefix and " if head else "",
        )
    return kept, cut


def _prompt_mask(tokens: Array, prompt_mask: Array | None, prompt_lengths: Array | None) -> Array:
    b, p = tokens.shape
    if prompt_mask is not None and prompt_lengths is not None:
        raise GenerationError("give prompt_mask or prompt_lengths, not both")
    if prompt_lengths is not None:
        lengths = np.asarray(prompt_lengths)
        if lengths.shape != (b,):
            raise GenerationError(f"prompt_lengths: expected shape ({b},), got {lengths.shape}")
        if (lengths < 1).any() or (lengths > p).any():
            raise GenerationError(f"prompt_lengths: expected 1..{p} per row, got {lengths.tolist()}")
        return jnp.asarray(np.arange(p)[None, :] >= (p - lengths)[:, None])
    if prompt_mask is None:
        return jnp.ones((b, p), bool)
    mask = np.asarray(prompt_mask).astype(bool)
    if mask.shape != (b, p):
        raise GenerationError(f"prompt_mask: expected shape {(b, p)} like tokens, got {mask.shape}")
    if not mask[:, -1].all() or (np.diff(mask.astype(np.int8), axis=1) < 0).any():
        raise GenerationError(
            "prompt_mask: prompts must be left-padded (padding first, then one run of real tokens "
            "ending at the last column); use jaxlm.decode.left_pad"
        )
    return jnp.asarray(mask)


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------


def nucleus_mask(probs: Array, top_p: float) -> Array:
    """[B, V] bool: the smallest set of most likely tokens whose mass reaches ``top_p`` (per row).

    Token ``i`` is kept iff the mass of the strictly more likely tokens is below ``top_p``,
    the sort-and-cumsum rule without the sort (a [B, 8192] sort costs ~270 ms per decode
    step on a CPU): that mass is non-increasing in ``p_i``, so the kept set is
    ``probs >= t`` for the smallest float ``t`` whose mass above is below ``top_p``, found
    by bisection on the float bits (non-negative floats order like their int32 bits).
    Tokens tied at the boundary are all kept.
    """
    probs = probs.astype(jnp.float32)

    def mass_above(bits: Array) -> Array:
        threshold = jax.lax.bitcast_convert_type(bits, jnp.float32)[:, None]
        return jnp.sum(jnp.where(probs > threshold, probs, 0.0), axis=-1)

    def halve(_, bounds):
        lo, hi = bounds  # mass_above(lo) >= top_p (or lo = 0) > mass_above(hi)
        mid = lo + (hi - lo) // 2
        below = mass_above(mid) < top_p
        return jnp.where(below, lo, mid), jnp.where(below, mid, hi)

    hi = jax.lax.bitcast_convert_type(probs.max(axis=-1), jnp.int32)
    lo = jnp.zeros_like(hi)
    _, hi = jax.lax.fori_loop(0, 31, halve, (lo, hi))  # 31 halvings cover every positive float
    return probs >= jax.lax.bitcast_convert_type(hi, jnp.float32)[:, None]


def sample_tokens(logits: Array, rng: Array, settings: SamplingSettings) -> Array:
    """[B] next tokens from [B, V] logits: greedy, or temperature sampling after top-k then top-p filtering."""
    if settings.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    values = logits.astype(jnp.float32) / settings.temperature
    ids = None
    if settings.top_k > 0:
        values, ids = jax.lax.top_k(values, min(settings.top_k, values.shape[-1]))
    if settings.top_p < 1.0:
        values = jnp.where(nucleus_mask(jax.nn.softmax(values, axis=-1), settings.top_p), values, -jnp.inf)
    # Gumbel-max: distributed as jax.random.categorical draws, 3-5x faster on a CPU at V = 8192.
    choice = jnp.argmax(values + jax.random.gumbel(rng, values.shape, jnp.float32), axis=-1)
    if ids is not None:
        choice = jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]
    return choice.astype(jnp.int32)


def _emit(state: DecodeState, logits: Array, settings: SamplingSettings) -> DecodeState:
    """Choose column ``state.step``'s tokens from ``logits`` [B, V] and advance."""
    broken = ~state.done & ~jnp.all(jnp.isfinite(logits), axis=-1)
    first_nonfinite = jnp.where(broken & (state.first_nonfinite < 0), state.step, state.first_nonfinite)
    key = jax.random.fold_in(state.rng, state.step)
    token = sample_tokens(logits, key, settings)
    token = jnp.where(state.done, settings.pad_id, token)
    column = (0, state.step)
    tokens = jax.lax.dynamic_update_slice(state.tokens, token[:, None], column)
    logprobs = state.logprobs
    if settings.return_logprobs:
        chosen = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), token[:, None], axis=-1)
        logprobs = jax.lax.dynamic_update_slice(logprobs, jnp.where(state.done[:, None], 0.0, chosen), column)
    lengths = state.lengths + (~state.done).astype(jnp.int32)
    done = state.done
    if settings.eos_id is not None:
        done = done | (token == settings.eos_id)
    return state.replace(
        tokens=tokens, logprobs=logprobs, last=token, lengths=lengths, done=done, step=state.step + 1,
        first_nonfinite=first_nonfinite,
    )


# ---------------------------------------------------------------------------------------
# Jitted programs
# ---------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("config", "settings"))
def prefill(
    params: Params,
    tokens: Array,
    prompt_mask: Array,
    intervention: Intervention | None,
    rng: Array,
    *,
    config: ModelConfig,
    settings: SamplingSettings,
) -> DecodeState:
    """Run the prompts through the model into a fresh cache and choose the first new token.

    ``intervention=None`` compiles a program without edits (``generate`` never does: it
    passes a zero intervention so that every scale shares one program).
    """
    _TRACES["prefill"] += 1
    b, p = tokens.shape
    n = settings.max_new_tokens
    cache = init_cache(config, b, p + n)
    out = forward(
        config,
        params,
        tokens,
        segment_ids=prompt_mask.astype(jnp.int32),
        cache=cache,
        intervention=None if intervention is None else intervention.for_prefill(prompt_mask),
        last_logits_only=True,
    )
    state = DecodeState(
        cache=out.cache,
        tokens=jnp.full((b, n), settings.pad_id, jnp.int32),
        logprobs=jnp.zeros((b, n), jnp.float32),
        last=jnp.zeros((b,), jnp.int32),
        lengths=jnp.zeros((b,), jnp.int32),
        done=jnp.zeros((b,), bool),
        step=jnp.zeros((), jnp.int32),
        rng=rng,
        first_nonfinite=jnp.full((b,), -1, jnp.int32),
    )
    return _emit(state, out.logits[:, -1], settings)


@functools.partial(jax.jit, static_argnames=("config", "settings"), donate_argnames=("state",))
def decode(
    params: Params,
    state: DecodeState,
    intervention: Intervention | None,
    *,
    config: ModelConfig,
    settings: SamplingSettings,
) -> DecodeState:
    """Generate until every row is done or ``max_new_tokens`` columns are filled."""
    _TRACES["decode"] += 1
    b = state.last.shape[0]
    step_intervention = None if intervention is None else intervention.for_decode_step(b)
    ones = jnp.ones((b, 1), jnp.int32)

    def unfinished(s: DecodeState) -> Array:
        return (s.step < settings.max_new_tokens) & ~jnp.all(s.done)

    def step(s: DecodeState) -> DecodeState:
        out = forward(config, params, s.last[:, None], segment_ids=ones, cache=s.cache, intervention=step_intervention)
        return _emit(s.replace(cache=out.cache), out.logits[:, 0], settings)

    return jax.lax.while_loop(unfinished, step, state)


def check_finite_logits(first_nonfinite: np.ndarray, scale: float) -> None:
    """``NonFiniteLogitsError`` for the first row whose logits held NaN or inf (``first_nonfinite`` [B], -1 = none)."""
    rows = np.flatnonzero(first_nonfinite >= 0)
    if rows.size == 0:
        return
    row = int(rows[0])
    step = int(first_nonfinite[row])
    raise NonFiniteLogitsError(
        f"the model produced NaN or inf logits for batch row {row} at generated token {step} "
        f"({rows.size} of {first_nonfinite.size} rows affected; intervention scale {scale:g}): "
        "the parameters or the intervention overflow, so no text was generated",
        row, step,
    )


def trace_counts() -> dict[str, int]:
    """How often each jitted program (``prefill``, ``decode``) was traced, i.e. compiled, so far."""
    return dict(_TRACES)


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------


def generate(
    config: ModelConfig,
    params: Params,
    tokens: Array,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    intervention: Intervention | None = None,
    rng: Array | int | None = None,
    prompt_mask: Array | None = None,
    prompt_lengths: Array | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    return_logprobs: bool = False,
) -> Generation:
    """Continue each prompt of ``tokens`` [B, P] by up to ``max_new_tokens`` tokens.

    Prompts are left-padded: ``prompt_mask`` [B, P] (True = real token) or ``prompt_lengths``
    [B] (real tokens are the last ones of each row); neither means no padding.
    ``temperature`` 0 is greedy; otherwise ``rng`` (a key or an int seed) is required.
    ``intervention``: any ``Intervention``, each edit applied per its position policy; its
    scale and arrays may change between calls without recompiling.
    Parameters on a mesh run the generation sharded on it (see the module docstring).
    """
    settings = SamplingSettings(
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k),
        eos_id=eos_id,
        pad_id=pad_id,
        return_logprobs=return_logprobs,
    )
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise GenerationError(f"tokens: expected shape [batch, prompt_length >= 1], got {tuple(tokens.shape)}")
    if tokens.shape[1] + max_new_tokens > config.max_seq_len:
        raise GenerationError(
            f"prompt length {tokens.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
            f"the model's max_seq_len {config.max_seq_len}"
        )
    mask = _prompt_mask(tokens, prompt_mask, prompt_lengths)
    if rng is None:
        if not settings.greedy:
            raise GenerationError("rng: sampling (temperature > 0) needs a PRNG key or an int seed")
        rng = 0
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    if intervention is None:
        intervention = Intervention.zeros(config)
    else:
        intervention.check_compatible(config)
    intervention = intervention.program_form()
    scale = float(intervention.scale)
    mesh = sharding_lib.inference_mesh(params)
    rows = tokens.shape[0]
    if mesh is not None:
        tokens, mask, intervention, rng = _on_mesh(mesh, tokens, mask, intervention, rng)
    with sharding_lib.activation_sharding(mesh):
        state = prefill(params, tokens, mask, intervention, rng, config=config, settings=settings)
        if tokens.shape[0] > rows:
            state = state.replace(done=state.done | (jnp.arange(tokens.shape[0]) >= rows))
        if max_new_tokens > 1:
            state = decode(params, state, intervention, config=config, settings=settings)
    check_finite_logits(np.asarray(state.first_nonfinite)[:rows], scale)
    out = Generation(tokens=state.tokens, lengths=state.lengths, logprobs=state.logprobs if return_logprobs else None)
    return out if tokens.shape[0] == rows else jax.tree.map(lambda x: x[:rows], out)


def _on_mesh(mesh, tokens: Array, mask: Array, intervention: Intervention, rng: Array):
    """A generation's inputs on ``mesh``: the prompts filled up to a multiple of its batch shards
    (copies of the last prompt) and split over them; the intervention and the key replicated."""
    rows = round_up(tokens.shape[0], sharding_lib.batch_shards(mesh))
    tokens, mask = sharding_lib.shard_batch(_fill_batch((tokens, mask), rows), mesh)
    intervention, rng = jax.device_put((intervention, rng), sharding_lib.replicated(mesh))
    return tokens, mask, intervention, rng


def _fill_batch(arrays: tuple[Array, ...], rows: int) -> tuple[np.ndarray, ...]:
    """Each ``[B, ...]`` array followed by copies of its last row up to ``rows`` rows."""
    return tuple(np.stack(fill_rows(list(np.asarray(a)), rows)) for a in arrays)
