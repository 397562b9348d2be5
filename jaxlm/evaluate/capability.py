"""Capability cost: cross-entropy / perplexity on held-out text, KL to a reference, BLiMP.

All metrics run the model over padded token rows with one jitted scorer per row shape
(rows are bucketed to multiples of ``bucket`` tokens, so a whole evaluation compiles a
handful of programs). An ``Intervention`` (any method) is applied at every real position
(policy ``all``), as the ITI reference implementation does for its CE/KL side metrics.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import model as model_lib
from jaxlm.batching import fill_rows, pad_tokens, padded_batch_size, round_up
from jaxlm.config import ModelConfig
from jaxlm.data.labelled import jsonl_records
from jaxlm.data.sources import is_wikitext, read_text, wikitext_articles
from jaxlm.evaluate.protocols import EvaluationError, check_limit
from jaxlm.paths import MissingDataError

Params = Any


# ---------------------------------------------------------------------------------------
# Batched scoring of token rows
# ---------------------------------------------------------------------------------------


@partial(jax.jit, static_argnums=0, static_argnames="greedy")
def _row_scores(config: ModelConfig, params: Params, ref_params: Params | None, tokens, segment_ids, intervention,
                greedy: bool = False):
    """Per-token next-token log-prob [B, T-1], with a reference KL(ref || model) [B, T-1] (else
    zeros), and with ``greedy`` whether each target is the model's argmax token [B, T-1] (else None)."""
    edits = None if intervention is None else intervention.at_positions(segment_ids != 0)
    logits = model_lib.forward(config, params, tokens, segment_ids=segment_ids, intervention=edits).logits[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    target_logp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    is_argmax = jnp.argmax(logits, axis=-1) == tokens[:, 1:] if greedy else None
    if ref_params is None:
        return target_logp, jnp.zeros_like(target_logp), is_argmax
    ref_logp = jax.nn.log_softmax(
        model_lib.forward(config, ref_params, tokens, segment_ids=segment_ids).logits[:, :-1], axis=-1
    )
    kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)
    return target_logp, kl, is_argmax


def _pad_rows(rows: Sequence[Sequence[int]], bucket: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``tokens`` and ``segment_ids`` (1 real, 0 pad), length rounded up to ``bucket``."""
    tokens, real = pad_tokens(rows, round_up(max(len(r) for r in rows), bucket), pad_id=pad_id)
    return tokens, real.astype(np.int32)


def score_rows(
    config: ModelConfig,
    params: Params,
    rows: Sequence[Sequence[int]],
    *,
    batch_size: int = 16,
    bucket: int = 32,
    pad_id: int = 0,
    intervention: Any = None,
    ref_params: Params | None = None,
    progress: str | None = None,
    greedy: bool = False,
) -> tuple[list[np.ndarray], ...]:
    """For each row: log-probs of tokens 1..n given their prefixes, and KL(ref || model) at 0..n-2
    (``intervention`` at every real position); with ``greedy`` a third list, per row whether
    each of tokens 1..n is the model's most likely next token (lm-eval's ``is_greedy``)."""
    if intervention is not None:
        intervention.check_compatible(config)
        intervention = intervention.program_form()
    if any(len(r) < 2 for r in rows):
        raise EvaluationError("every row needs at least 2 tokens to score (a context token and a target)")
    order = np.argsort([len(r) for r in rows])  # similar lengths together: fewer pad tokens
    logps: list[np.ndarray] = [np.empty(0)] * len(rows)
    kls: list[np.ndarray] = [np.empty(0)] * len(rows)
    argmax: list[np.ndarray] = [np.empty(0, bool)] * len(rows)
    batch_size = padded_batch_size(len(rows), batch_size)
    batches = range(0, len(rows), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=progress, unit="batch", leave=False)
    for start in batches:
        idx = order[start : start + batch_size]
        chunk = fill_rows([rows[i] for i in idx], batch_size)  # fixed batch shape: one compile per bucket
        tokens, segments = _pad_rows(chunk, bucket, pad_id)
        lp, kl, best = jax.device_get(
            _row_scores(config, params, ref_params, tokens, segments, intervention, greedy=greedy)
        )
        for j, i in enumerate(idx):
            n = len(rows[i]) - 1
            logps[i], kls[i] = lp[j, :n], kl[j, :n]
            if greedy:
                argmax[i] = best[j, :n]
    return (logps, kls, argmax) if greedy else (logps, kls)


# ---------------------------------------------------------------------------------------
# Cross-entropy and KL on held-out text
# ---------------------------------------------------------------------------------------


def read_documents(path: str | Path, limit: int | None = None) -> list[str]:
    """Held-out documents from a text file (``.gz`` ok): WikiText articles split at ``= Title =``
    headings (``sources.wikitext_articles``), otherwise blank-line separated paragraphs. Empty
    pieces are skipped."""
    text = read_text(path)
    docs = wikitext_articles(text) if is_wikitext(text) else [p.strip() for p in re.split(r"\n\s*\n", text)]
    docs = [d for d in docs if d]
    return docs[:limit] if limit else docs


def window_rows(token_docs: Iterable[Sequence[int]], length: int, bos_id: int, max_rows: int | None = None) -> list[list[int]]:
    """Cut documents into rows of ``length`` tokens, each starting with ``bos_id`` as context."""
    rows = []
    for doc in token_docs:
        for start in range(0, len(doc), length - 1):
            piece = list(doc[start : start + length - 1])
            if piece:
                rows.append([bos_id] + piece)
            if max_rows and len(rows) >= max_rows:
                return rows
    return rows


@dataclasses.dataclass(frozen=True)
class TextLoss:
    ce: float  # mean next-token cross-entropy, nats per token
    perplexity: float
    kl: float | None  # mean KL(reference || model) per token, when a reference was given
    n_tokens: int
    n_rows: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def text_rows(config: ModelConfig, tokenizer: Any, documents: Sequence[str], max_len: int | None,
              max_rows: int | None) -> list[list[int]]:
    """``documents`` as scoring rows of up to ``max_len`` tokens (the model's context at most),
    each with at least one token to predict."""
    length = min(max_len or config.max_seq_len, config.max_seq_len)
    rows = window_rows(tokenizer.encode_batch(list(documents)), length, tokenizer.eos_id, max_rows)
    rows = [r for r in rows if len(r) >= 2]
    if not rows:
        raise EvaluationError("no text to score: the documents are empty after tokenization")
    return rows


def text_loss(
    config: ModelConfig,
    params: Params,
    tokenizer: Any,
    documents: Sequence[str],
    *,
    max_len: int | None = None,
    max_rows: int | None = None,
    batch_size: int = 16,
    intervention: Any = None,
    ref_params: Params | None = None,
    progress: str | None = "ce",
) -> TextLoss:
    """Cross-entropy (and KL to ``ref_params``) of the model on ``documents``."""
    rows = text_rows(config, tokenizer, documents, max_len, max_rows)
    logps, kls = score_rows(
        config, params, rows, batch_size=batch_size, pad_id=tokenizer.pad_id,
        intervention=intervention, ref_params=ref_params, progress=progress,
    )
    all_lp = np.concatenate(logps)
    ce = float(-all_lp.mean())
    kl = float(np.concatenate(kls).mean()) if ref_params is not None else None
    return TextLoss(ce=ce, perplexity=float(np.exp(ce)), kl=kl, n_tokens=int(all_lp.size), n_rows=len(rows))


@dataclasses.dataclass(frozen=True)
class DocumentLosses:
    """Per-document next-token losses of a model on a prepared source."""

    nll: np.ndarray  # [n] summed negative log-likelihood (nats) of each document's predicted tokens
    tokens: np.ndarray  # [n] predicted tokens per document
    meta: list[dict[str, Any]]  # each document's record metadata (scores, flags)

    def ce(self, mask: np.ndarray | None = None) -> float:
        """Token-weighted mean cross-entropy over the documents ``mask`` selects (default: all)."""
        keep = np.ones(len(self.nll), bool) if mask is None else mask
        return float(self.nll[keep].sum() / max(int(self.tokens[keep].sum()), 1))


def prepared_document_losses(
    config: ModelConfig,
    params: Params,
    source_dir: str | Path,
    *,
    max_documents: int | None = None,
    max_len: int | None = None,
    batch_size: int = 16,
    progress: str | None = "ce",
) -> DocumentLosses:
    """The loss of every document (the first ``max_documents``, in stored order) of a prepared
    source, each cut into windows of up to ``max_len`` tokens (the model's context at most) that
    start with the end-of-document id as context, as ``text_loss`` scores text."""
    from jaxlm.data import records

    info = records.source_info_for_directory(source_dir)
    length = min(max_len or config.max_seq_len, config.max_seq_len)
    rows: list[list[int]] = []
    owners: list[int] = []
    metas: list[dict[str, Any]] = []
    for index, (ids, meta) in enumerate(records.iter_documents(source_dir)):
        if max_documents is not None and index >= max_documents:
            break
        windows = [r for r in window_rows([ids.tolist()], length, info.eos_id) if len(r) >= 2]
        rows += windows
        owners += [len(metas)] * len(windows)
        metas.append(meta)
    if not rows:
        raise EvaluationError(f"{source_dir}: no document with a token to predict")
    logps, _ = score_rows(config, params, rows, batch_size=batch_size, pad_id=info.pad_id, progress=progress)
    owner = np.asarray(owners)
    nll = np.bincount(owner, [-float(lp.sum()) for lp in logps], len(metas))
    tokens = np.bincount(owner, [lp.size for lp in logps], len(metas)).astype(np.int64)
    return DocumentLosses(nll, tokens, metas)


# ---------------------------------------------------------------------------------------
# BLiMP
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MinimalPair:
    good: str
    bad: str
    paradigm: str
    field: str


def read_blimp(directory: str | Path, paradigms: Sequence[str] | None = None, limit_per_paradigm: int | None = None) -> list[MinimalPair]:
    """BLiMP minimal pairs from ``<paradigm>.jsonl[.gz]`` files (``sentence_good``, ``sentence_bad``)."""
    check_limit(limit_per_paradigm, "limit (BLiMP pairs per paradigm)")
    directory = Path(directory)
    files = sorted(directory.glob("*.jsonl*"))
    if not files:
        raise MissingDataError(f"{directory}: no BLiMP *.jsonl or *.jsonl.gz files")
    pairs = []
    for path in files:
        paradigm = path.name.split(".jsonl")[0]
        if paradigms and paradigm not in paradigms:
            continue
        count = 0
        for line_no, row in jsonl_records(path, EvaluationError, "BLiMP JSONL"):
            for key in ("sentence_good", "sentence_bad"):
                if not isinstance(row.get(key), str):
                    raise EvaluationError(f"{path}:{line_no}: missing field {key!r} (have {sorted(row)})")
            pairs.append(MinimalPair(row["sentence_good"], row["sentence_bad"], paradigm, row.get("field", "")))
            count += 1
            if limit_per_paradigm and count >= limit_per_paradigm:
                break
    if paradigms:
        missing = set(paradigms) - {p.paradigm for p in pairs}
        if missing:
            raise MissingDataError(f"{directory}: no BLiMP file for paradigm(s) {sorted(missing)}")
    return pairs


def blimp_accuracy(
    config: ModelConfig,
    params: Params,
    tokenizer: Any,
    pairs: Sequence[MinimalPair],
    *,
    batch_size: int = 32,
    intervention: Any = None,
    progress: str | None = "blimp",
) -> dict:
    """Share of pairs whose good sentence has the higher total log-prob (given a leading EOS)."""
    texts = [p.good for p in pairs] + [p.bad for p in pairs]
    rows = [[tokenizer.eos_id] + ids for ids in tokenizer.encode_batch(texts)]
    logps, _ = score_rows(
        config, params, rows, batch_size=batch_size, pad_id=tokenizer.pad_id, intervention=intervention, progress=progress
    )
    totals = np.asarray([lp.sum() for lp in logps])
    correct = totals[: len(pairs)] > totals[len(pairs) :]
    per_paradigm: dict[str, list[bool]] = defaultdict(list)
    per_field: dict[str, list[bool]] = defaultdict(list)
    for pair, ok in zip(pairs, correct):
        per_paradigm[pair.paradigm].append(bool(ok))
        per_field[pair.field].append(bool(ok))
    return {
        "blimp_accuracy": float(np.mean(correct)),
        "n_pairs": len(pairs),
        "per_paradigm": {k: float(np.mean(v)) for k, v in sorted(per_paradigm.items())},
        "per_field": {k: float(np.mean(v)) for k, v in sorted(per_field.items()) if k},
    }


def capability_cost(
    config: ModelConfig,
    params: Params,
    tokenizer: Any,
    *,
    documents: Sequence[str] | None = None,
    pairs: Sequence[MinimalPair] | None = None,
    intervention: Any = None,
    max_len: int = 128,
    max_rows: int | None = None,
    batch_size: int = 32,
    reference_params: Params | None = None,
    progress: bool = True,
) -> dict:
    """What a model (with an optional ``Intervention``) costs in capability.

    ``documents``: ``ce``, ``kl`` (to ``reference_params``, a model of the same config such as a
    post-trained model's starting point; by default to the model without the intervention, 0
    without one) and
    ``capability`` (the ``TextLoss`` fields); ``pairs``: the ``blimp_accuracy`` fields. The
    intervention acts at every position, as in the reference implementation's side metrics.
    """
    everywhere = None if intervention is None else intervention.with_mode("all")
    out: dict = {}
    if documents is not None:
        loss = text_loss(config, params, tokenizer, documents, max_len=max_len, max_rows=max_rows, batch_size=batch_size,
                         intervention=everywhere,
                         ref_params=reference_params if reference_params is not None else (None if everywhere is None else params),
                         progress="ce" if progress else None)
        out.update(ce=loss.ce, kl=loss.kl or 0.0, capability=loss.to_dict())
    if pairs is not None:
        out.update(blimp_accuracy(config, params, tokenizer, pairs, batch_size=batch_size, intervention=everywhere,
                                  progress="blimp" if progress else None))
    return out


# ---------------------------------------------------------------------------------------
# Calibrating an intervention's strength to a capability budget
# ---------------------------------------------------------------------------------------

ALPHA_GRID = tuple(float(a) for a in np.geomspace(0.25, 64.0, 17))


@partial(jax.jit, static_argnums=0)
def _kl_per_alpha(config: ModelConfig, params: Params, tokens, segment_ids, intervention, alphas):
    """[A, B, T-1] KL(model || model with ``intervention`` at strength ``alphas[a]``) per position;
    the reference forward runs once for all strengths."""
    ref_logp = jax.nn.log_softmax(model_lib.forward(config, params, tokens, segment_ids=segment_ids).logits[:, :-1], axis=-1)
    ref_p = jnp.exp(ref_logp)
    position_mask = segment_ids != 0

    def kl_at(alpha):
        edits = intervention.with_scale(alpha).at_positions(position_mask)
        logits = model_lib.forward(config, params, tokens, segment_ids=segment_ids, intervention=edits).logits[:, :-1]
        return jnp.sum(ref_p * (ref_logp - jax.nn.log_softmax(logits, axis=-1)), axis=-1)

    return jax.lax.map(kl_at, alphas)


def kl_curve(
    config: ModelConfig,
    params: Params,
    tokenizer: Any,
    documents: Sequence[str],
    intervention: Any,
    alphas: Sequence[float] = ALPHA_GRID,
    *,
    max_len: int = 128,
    max_rows: int = 32,
    batch_size: int = 16,
) -> np.ndarray:
    """Mean KL(model || model with the intervention at strength alpha) per token, for each alpha
    (the intervention at every position, as ``text_loss`` measures it; one compiled program)."""
    intervention.check_compatible(config)
    everywhere = intervention.with_mode("all").program_form()
    rows = text_rows(config, tokenizer, documents, max_len, max_rows)
    batch_size = padded_batch_size(len(rows), batch_size)
    total, count = np.zeros(len(alphas)), 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        tokens, segments = _pad_rows(fill_rows(chunk, batch_size), 32, tokenizer.pad_id)
        kl = np.asarray(_kl_per_alpha(config, params, tokens, segments, everywhere, jnp.asarray(alphas, jnp.float32)))
        scored = segments[:, 1:] != 0  # positions with a next token
        scored[len(chunk):] = False  # the copies that fill the batch
        total += kl[:, scored].sum(axis=1)
        count += int(scored.sum())
    return total / count


def alpha_for_kl(alphas: Sequence[float], kls: Sequence[float], target: float) -> float:
    """The strength whose KL cost is ``target``, interpolated in log-log space on a measured curve.

    Below the first grid point KL grows quadratically with alpha (a small shift of the logits);
    above the last the largest alpha is returned (the budget is not reachable on the grid).
    """
    a, k = np.asarray(alphas, float), np.maximum(np.asarray(kls, float), 1e-12)
    if target <= 0:
        raise EvaluationError(f"target KL must be positive, got {target}")
    order = np.argsort(a)
    a, k = a[order], np.maximum.accumulate(k[order])  # the cost of a stronger push is never lower
    if target <= k[0]:
        return float(a[0] * np.sqrt(target / k[0]))
    if target >= k[-1]:
        return float(a[-1])
    i = int(np.searchsorted(k, target))
    if k[i] == k[i - 1]:
        return float(a[i])
    t = (np.log(target) - np.log(k[i - 1])) / (np.log(k[i]) - np.log(k[i - 1]))
    return float(np.exp(np.log(a[i - 1]) + t * (np.log(a[i]) - np.log(a[i - 1]))))
