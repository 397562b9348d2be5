"""Per-document work of ``data/prepare``, in worker processes or in-process: text transforms
(hooks), tokenization, toxicity and quality scores, and the per-document half of each filter
(heuristic verdict, content hash, MinHash signature). The decisions that need the whole source
(dedup indexes, percentiles) are taken in the main process by ``data/chain``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import importlib
import inspect
import os
import warnings
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from jaxlm.config import ConfigError
from jaxlm.data import records, sources
from jaxlm.data.filters import content_key, heuristic_verdict, minhash_signature
from jaxlm.data.recipe import FilterStep, HookStep, ToxicityRecipe

TOXICITY_SCORER = "profanity-check"
TOXICITY_PACKAGE = "alt-profanity-check"


@dataclasses.dataclass(frozen=True)
class SourceWork:
    """What a worker computes for the documents of one source (sent with every chunk)."""

    filters: tuple[FilterStep, ...] = ()
    hooks: tuple[HookStep, ...] = ()
    classifiers: tuple[tuple[str, str, str], ...] = ()  # (name, directory or file, HQ label) of those its filters use


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One document as sent to a worker; ``transform``: apply the source's hooks."""

    text: str
    meta: dict[str, Any]
    transform: bool


@dataclasses.dataclass
class EncodedChunk:
    """Consecutive documents encoded: token ids concatenated, per-document lengths, scores and
    the per-document features of each filter step (``features[j]`` for ``filters[j]``)."""

    ids: np.ndarray  # [sum(lengths)] of the token dtype
    lengths: np.ndarray  # [n] int64
    toxicity: np.ndarray | None  # [n] float64, character-weighted mean over chunks
    toxicity_max: np.ndarray | None  # [n] float64
    text_bytes: np.ndarray  # [n] int64, UTF-8 bytes of each (transformed) text
    characters: np.ndarray  # [n] int64
    hook_drops: list[str | None]  # the hook that dropped each document (its tokens are then empty)
    features: list[Any]  # per filter step: verdicts, keys, signatures [n, num_perm], scores [n] or None


def hook_function(step: HookStep) -> Callable[..., str | None]:
    """The hook's function (ConfigError naming ``hook.function`` when it cannot be imported)."""
    module_name, _, name = step.function.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"hook.function: cannot import {step.function!r} ({err})") from None
    if not callable(function):
        raise ConfigError(f"hook.function: {step.function!r} is not callable")
    return function


def hook_fingerprint(step: HookStep) -> str:
    """The sha256 of the hook's module source (so an edited hook rebuilds its sources)."""
    module = inspect.getmodule(hook_function(step))
    try:
        text = inspect.getsource(module)
    except (OSError, TypeError):
        text = step.function
    return hashlib.sha256(text.encode()).hexdigest()


def hook_drop_reason(step: HookStep) -> str:
    return f"hook.{step.function.partition(':')[2]}"


@functools.cache
def _classifier(path: str, positive_label: str):
    from jaxlm.data.quality import load_classifier

    return load_classifier(path, positive_label=positive_label)


class DocumentEncoder:
    """Transforms, tokenizes, scores and featurises lists of documents (one per worker process)."""

    def __init__(self, tokenizer_json: str, token_dtype: str, toxicity: ToxicityRecipe):
        import tokenizers

        self.backend = tokenizers.Tokenizer.from_str(tokenizer_json)
        self.backend.encode_special_tokens = True  # documents are literal text (as jaxlm.tokenizer does)
        self.dtype = records.TOKEN_DTYPES[token_dtype]
        self.chunk_chars = toxicity.chunk_chars
        self.scorer = profanity_scorer() if toxicity.enabled else None

    def __call__(self, items: Sequence[WorkItem], work: SourceWork = SourceWork()) -> EncodedChunk:
        texts, hook_drops = apply_hooks(items, work.hooks)
        encodings = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        arrays = [
            np.zeros((0,), self.dtype) if drop else np.asarray(e.ids, dtype=self.dtype)
            for e, drop in zip(encodings, hook_drops)
        ]
        lengths = np.asarray([a.size for a in arrays], np.int64)
        ids = np.concatenate(arrays) if arrays else np.zeros((0,), self.dtype)
        mean = peak = None
        if self.scorer is not None:
            mean, peak = self.score(texts)
        text_bytes = np.asarray([len(t.encode("utf-8")) for t in texts], np.int64)
        characters = np.asarray([len(t) for t in texts], np.int64)
        classifiers = {name: _classifier(path, label) for name, path, label in work.classifiers}
        features = [step_features(step, texts, classifiers) for step in work.filters]
        return EncodedChunk(ids, lengths, mean, peak, text_bytes, characters, hook_drops, features)

    def score(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        pieces: list[str] = []
        owner: list[int] = []
        for i, text in enumerate(texts):
            parts = [text] if len(text) <= self.chunk_chars else sources.split_text(text, self.chunk_chars)
            pieces += parts
            owner += [i] * len(parts)
        scores = np.asarray(self.scorer(pieces), np.float64)
        weights = np.asarray([len(p) for p in pieces], np.float64)
        owner_arr = np.asarray(owner, np.int64)
        n = len(texts)
        mean = np.bincount(owner_arr, weights * scores, n) / np.maximum(np.bincount(owner_arr, weights, n), 1.0)
        peak = np.full(n, -np.inf)
        np.maximum.at(peak, owner_arr, scores)
        return mean, peak


def apply_hooks(items: Sequence[WorkItem], hooks: Sequence[HookStep]) -> tuple[list[str], list[str | None]]:
    """Each item's text after the hooks (in order) and the reason of the hook that dropped it, if any."""
    functions = [(hook_function(step), step) for step in hooks]
    texts: list[str] = []
    drops: list[str | None] = []
    for item in items:
        text: str | None = item.text
        reason = None
        if item.transform:
            for function, step in functions:
                text = function(text, item.meta, **step.args)
                if text is None or not text:
                    reason = hook_drop_reason(step)
                    break
                if not isinstance(text, str):
                    raise ConfigError(f"hook.function: {step.function} returned {type(text).__name__}, expected str or None")
        texts.append("" if reason else text)
        drops.append(reason)
    return texts, drops


def step_features(step: FilterStep, texts: Sequence[str], classifiers: dict[str, Any]) -> Any:
    """The per-document half of one filter step over ``texts``."""
    if step.heuristic is not None:
        return [heuristic_verdict(t, step.heuristic) for t in texts]
    if step.dedup is not None:
        return [content_key(t, step.dedup.normalize) for t in texts]
    if step.near_dedup is not None:
        if not texts:
            return np.zeros((0, step.near_dedup.num_perm), np.uint64)
        return np.stack([minhash_signature(t, step.near_dedup) for t in texts])
    if step.quality is not None:
        return np.asarray(classifiers[step.quality.classifier].score(list(texts)), np.float64)
    return None  # toxicity: the document's own score


def profanity_scorer() -> Callable[[list[str]], np.ndarray]:
    """``alt-profanity-check``'s probability of being offensive per text (its ``predict_prob``),
    from the one loaded copy of its model (``jaxlm.evaluate.scorer.profanity_check_model``)."""
    from jaxlm.evaluate.scorer import ScorerUnavailableError, profanity_check_model

    try:
        vectorizer, model = profanity_check_model()
    except ScorerUnavailableError as err:
        raise ConfigError(
            f"toxicity.enabled: the scorer needs the {TOXICITY_PACKAGE} package ({err}); "
            "install it or set toxicity.enabled: false"
        ) from None
    positive = list(model.classes_).index(1)

    def score(texts: list[str]) -> np.ndarray:
        with warnings.catch_warnings():  # its model was pickled by an older scikit-learn
            warnings.simplefilter("ignore")
            return np.asarray(model.predict_proba(vectorizer.transform(texts))[:, positive], np.float64)

    return score


_WORKER_ENCODER: DocumentEncoder | None = None


def _init_worker(tokenizer_json: str, token_dtype: str, toxicity: ToxicityRecipe) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    global _WORKER_ENCODER
    _WORKER_ENCODER = DocumentEncoder(tokenizer_json, token_dtype, toxicity)


def _encode_in_worker(items: list[WorkItem], work: SourceWork) -> EncodedChunk:
    assert _WORKER_ENCODER is not None, "worker not initialised"
    return _WORKER_ENCODER(items, work)


class ChunkRunner:
    """Runs ``DocumentEncoder`` over chunks of documents, in order: in-process (``workers=0``,
    the tokenizer's own threads) or in ``workers`` spawned processes, at most
    ``2 * workers`` chunks in flight."""

    def __init__(self, workers: int, tokenizer_json: str, token_dtype: str, toxicity: ToxicityRecipe):
        self.workers = workers
        self._pool = None
        self._encoder = None
        if workers > 0:
            import multiprocessing

            context = multiprocessing.get_context("spawn")  # no fork of a process with tokenizer threads
            self._pool = context.Pool(workers, _init_worker, (tokenizer_json, token_dtype, toxicity))
        else:
            self._encoder = DocumentEncoder(tokenizer_json, token_dtype, toxicity)

    def map(
        self, chunks: Iterable[Any], items_of: Callable[[Any], list[WorkItem]], work: SourceWork = SourceWork()
    ) -> Iterator[tuple[Any, EncodedChunk]]:
        """``(chunk, encoded)`` for each chunk, in input order."""
        if self._pool is None:
            for chunk in chunks:
                yield chunk, self._encoder(items_of(chunk), work)
            return
        pending: collections.deque = collections.deque()
        iterator = iter(chunks)
        exhausted = False
        while True:
            while not exhausted and len(pending) < 2 * self.workers:
                chunk = next(iterator, None)
                if chunk is None:
                    exhausted = True
                    break
                pending.append((chunk, self._pool.apply_async(_encode_in_worker, (items_of(chunk), work))))
            if not pending:
                return
            chunk, result = pending.popleft()
            yield chunk, result.get()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> "ChunkRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def chunked(items: Iterable[Any], text_of: Callable[[Any], str], max_chars: int, max_items: int) -> Iterator[list[Any]]:
    """Consecutive groups of at most ``max_items`` items and about ``max_chars`` characters."""
    group: list[Any] = []
    chars = 0
    for item in items:
        group.append(item)
        chars += len(text_of(item))
        if chars >= max_chars or len(group) >= max_items:
            yield group
            group, chars = [], 0
    if group:
        yield group
