"""The training data pipeline: per-source packed streams, mixed by exact token shares.

Per source (grain Dataset API)::

    ArrayRecord shards -> MapDataset.source -> shuffle(own seed) -> repeat (reshuffled each
    epoch) -> map(decode, optional tag prefix, append EOS) -> to_iter_dataset
    -> ConcatThenSplitIterDataset(seq_len)

gives full ``seq_len`` rows with ``segment_ids`` (1..k for the document pieces of a row; a
document longer than the row continues in the next row, so every token is kept and there
is no padding) and ``positions`` (restarting at 0 for every piece).

A source with a curriculum (``data.curricula.<source>``, ``CurriculumConfig``; Luo et al.
2025 quality curricula) replaces the uniform shuffle by ``CurriculumMapDataset``: its
documents sorted by a metadata score, cut into equal-count buckets visited in order, each
bucket shuffled (seeded). At the end of an epoch the same curriculum starts again with a new
within-bucket shuffle. The scores are read from the shards' metadata once, when the
pipeline is built. A source without one is streamed exactly as before.

Then ``ExactMixtureIterDataset`` draws the rows of each global batch from the sources.
Every row holds ``seq_len`` tokens, so a share of rows is a share of tokens. The rows are
assigned with Tijdeman's chairman-assignment rule (earliest deadline first): after *every*
row, each source's realised row count is within ``1 - 1/(2k-2)`` rows (< 1) of its target
``weight * rows`` (k = sources with weight > 0). So every batch holds ``weight * B``
rows of a source up to rounding (at most one row off with two sources, under two with
more) and the rounding error is carried over, never accumulated; weight 0 is never
drawn, weight 1 is every row. (Largest-remainder rounding per batch with the
error carried over, levanter-style, is not used: with three or more sources and small
weights it can ask for a negative count.) The order of rows within a batch is shuffled
deterministically from (seed, step). grain's own ``mix`` rejects zero weights and rounds
the proportions, hence the custom mixer.

Weights may change at given steps (``schedule``): batch ``i`` (0-based; the batch that
train step ``i`` consumes) uses the last stage with ``stage.step <= i``. Each change starts
a new *phase*: the apportionment restarts from zero counts with the new weights.

State (``Pipeline.get_state()``, JSON)::

    {"version": 1, "seq_len": T, "seed": S, "step": next batch index,
     "phase": {"start_step", "weights": {name: "p/q"}, "rows", "counts": {name: rows}},
     "rows_per_source": {name: rows since step 0},
     "streams": {name: grain iterator state of the source's packed stream}}

Restoring continues identically (a curriculum stream included: its order is a function of
the stream position). Restored with a config whose weights at the saved step
differ from the saved phase's (a mixture change on resume), the per-source streams keep
their positions and a new phase starts at the saved step with the new weights. Sources
absent from the state start at their beginning; sources absent from the config are
dropped from the state. A different ``seq_len`` or ``seed`` is refused.

Coverage: built for a known number of steps (``build_pipeline(num_steps=...)``), the
pipeline logs one warning per source the mixture will repeat: ``planned_source_tokens``
gives the tokens each source contributes, compared with one epoch of its stream.

Integrity: ``build_pipeline`` refuses (``DataError`` naming the file) a tokenizer that is not
the one the manifest records, a manifest whose counts or ``vocab_size`` disagree with its
shard records, and a shard whose name or size differs from them; a record that cannot be
read is reported with its shard and index (see ``jaxlm.data.records``).

Multi-host: every process builds the same global batch and keeps rows
``[p*B/n, (p+1)*B/n)``; the global batch (and the state) do not depend on the number of
processes, so a run can resume on a different number of hosts. The price: each process
reads and packs every row of the global batch (the loader runs at millions of tokens/s per
core; see docs/benchmarks.md). ``to_global_array`` places a process's rows into a global
``jax.Array`` with the data sharding.
"""

from __future__ import annotations

import atexit
import bisect
import dataclasses
import hashlib
import logging
import math
import os
import typing
import weakref
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import grain
import numpy as np
from grain import experimental as grain_experimental

from jaxlm.config import ConfigError
from jaxlm.data import DataError, records
from jaxlm.data.records import Manifest, SourceInfo

log = logging.getLogger(__name__)

STATE_VERSION = 1
BATCH_KEYS = ("tokens", "segment_ids", "positions", "source_ids")
_SUM_TOLERANCE = 1e-6


# ---------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ScheduleStage:
    """From batch ``step`` on, sample with ``weights`` (names not listed get weight 0)."""

    step: int
    weights: dict[str, float]


@dataclasses.dataclass(frozen=True)
class TagConfig:
    """Per-document tags from the toxicity score (Prabhumoye et al. 2023 baselines).

    ``meda``: a metadata tag naming the score bucket, default ``<|toxicity:0.7|>`` for
    scores in [0.7, 0.8) (edges 0.1, ..., 0.9). ``inst``: a natural-language instruction,
    default "The following text is toxic:" above 0.5, "... is not toxic:" below. The
    tag text is encoded with the dataset's tokenizer and prepended to the document.
    ``texts`` overrides the defaults (one per bucket: ``len(bucket_edges) + 1``).
    ``every``: repeat the tag before each ``every`` tokens of a longer document. With one tag
    per document, a corpus of long documents (books, ~100k tokens each) mixed with one of
    short ones (posts) carries nearly all its tags on the short documents, so the tag marks
    the source more than the toxicity; C4's ~400-token documents are the reference scale.
    """

    kind: Literal["meda", "inst"] = "meda"
    bucket_edges: tuple[float, ...] | None = None
    texts: tuple[str, ...] | None = None
    sources: tuple[str, ...] | None = None  # None: every source
    missing: Literal["error", "untagged"] = "error"  # documents without a toxicity score
    every: int | None = None  # None: one tag per document

    def resolved_edges(self) -> tuple[float, ...]:
        if self.bucket_edges is not None:
            return tuple(self.bucket_edges)
        return tuple(round(0.1 * i, 1) for i in range(1, 10)) if self.kind == "meda" else (0.5,)

    def resolved_texts(self) -> tuple[str, ...]:
        if self.texts is not None:
            return tuple(self.texts)
        lows = (0.0,) + self.resolved_edges()
        if self.kind == "meda":
            return tuple(f"<|toxicity:{low:.1f}|>" for low in lows)
        if len(lows) == 2:
            return ("The following text is not toxic:\n", "The following text is toxic:\n")
        return tuple(f"The following text has a toxicity score of at least {low:g}:\n" for low in lows)

    def __post_init__(self) -> None:
        edges = self.resolved_edges()
        if any(not math.isfinite(e) for e in edges) or list(edges) != sorted(set(edges)):
            raise ConfigError(f"data.tags.bucket_edges: expected strictly increasing finite numbers, got {list(edges)}")
        if self.every is not None and (isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1):
            raise ConfigError(f"data.tags.every: expected a positive number of tokens (or null), got {self.every!r}")
        if self.texts is not None and len(self.texts) != len(edges) + 1:
            raise ConfigError(
                f"data.tags.texts: expected {len(edges) + 1} texts (one per bucket of edges {list(edges)}), "
                f"got {len(self.texts)}"
            )


@dataclasses.dataclass(frozen=True)
class CurriculumConfig:
    """A source's documents in the order of a per-document score (a quality curriculum).

    ``score``: a numeric key of the documents' metadata (``toxicity``, ``quality.wiki``, ...;
    keys are flat, dots included). The documents, sorted by score (``order``; ties keep
    their stored order), are cut into ``buckets`` of equal count; the buckets are visited in
    order and the documents within a bucket in a seeded shuffle. Every epoch runs the same
    curriculum again with a new within-bucket shuffle. ``missing``: documents without the
    key (or with ``null``) are refused (``error``) or form one bucket of their own after
    (``last``) or before (``first``) the scored ones.
    """

    score: str
    order: Literal["ascending", "descending"] = "ascending"
    buckets: int = 10
    missing: Literal["error", "last", "first"] = "error"


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """A mixture of prepared sources, packed to ``seq_len``, in global batches.

    ``sources`` maps each source of the prepared dataset (``dataset``: the directory with
    ``manifest.json``) to its share of training tokens at step 0; shares are >= 0 and sum
    to 1. ``schedule`` changes the shares from given steps on. ``curricula`` orders some
    sources' documents by a score instead of a uniform shuffle (source name -> curriculum);
    ``None`` and ``{}`` both mean none.
    """

    dataset: str
    sources: dict[str, float]
    seq_len: int = 256
    batch_size: int = 32  # global, all processes together
    seed: int = 0
    schedule: tuple[ScheduleStage, ...] = ()
    tags: TagConfig | None = None
    read_threads: int = 0  # grain read threads per source (0: read in the iterating thread)
    prefetch: int = 2  # batches prepared ahead in a background thread (0: none)
    curricula: dict[str, CurriculumConfig] | None = None

    OMIT_AT_DEFAULT: typing.ClassVar[tuple[str, ...]] = ("curricula",)

    def __post_init__(self) -> None:
        if self.curricula == {}:  # the same config as none: the same recorded form and fingerprint
            object.__setattr__(self, "curricula", None)
        if not self.sources:
            raise ConfigError("data.sources: expected at least one source with a weight")
        check_weights(self.sources, "data.sources")
        for name, value in (("seq_len", self.seq_len), ("batch_size", self.batch_size)):
            if value <= 0:
                raise ConfigError(f"data.{name}: expected a positive integer, got {value}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"data.seed: expected a non-negative integer, got {self.seed}")
        if self.read_threads < 0 or self.prefetch < 0:
            raise ConfigError("data.read_threads / data.prefetch: expected non-negative integers")
        previous = 0
        for i, stage in enumerate(self.schedule):
            where = f"data.schedule[{i}]"
            if stage.step <= previous:
                raise ConfigError(
                    f"{where}.step: expected steps > 0 in increasing order, got {stage.step} after {previous}"
                )
            previous = stage.step
            unknown = sorted(set(stage.weights) - set(self.sources))
            if unknown:
                raise ConfigError(
                    f"{where}.weights: unknown source {', '.join(map(repr, unknown))}; "
                    f"data.sources lists: {', '.join(self.sources)}"
                )
            check_weights(stage.weights, f"{where}.weights")
        if self.tags is not None and self.tags.sources is not None:
            unknown = sorted(set(self.tags.sources) - set(self.sources))
            if unknown:
                raise ConfigError(
                    f"data.tags.sources: unknown source {', '.join(map(repr, unknown))}; "
                    f"data.sources lists: {', '.join(self.sources)}"
                )
        for name, curriculum in (self.curricula or {}).items():
            check_curriculum(name, curriculum, self.sources)

    @property
    def source_names(self) -> tuple[str, ...]:
        return tuple(self.sources)

    def curriculum_of(self, source: str) -> CurriculumConfig | None:
        return (self.curricula or {}).get(source)


def check_curriculum(name: str, curriculum: CurriculumConfig, sources: Mapping[str, float]) -> None:
    """A curriculum must name a source of the mixture, a score key and at least one bucket."""
    where = f"data.curricula.{name}"
    if name not in sources:
        raise ConfigError(f"{where}: unknown source {name!r}; data.sources lists: {', '.join(sources)}")
    if not curriculum.score:
        raise ConfigError(f"{where}.score: expected a metadata key (e.g. toxicity or quality.wiki), got ''")
    if isinstance(curriculum.buckets, bool) or not isinstance(curriculum.buckets, int) or curriculum.buckets < 1:
        raise ConfigError(f"{where}.buckets: expected a positive integer, got {curriculum.buckets!r}")


def check_weights(weights: Mapping[str, float], where: str) -> None:
    """Weights must be finite, >= 0 and sum to 1 (within 1e-6); errors name the offenders."""
    bad = {k: v for k, v in weights.items() if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0}
    if bad:
        raise ConfigError(
            f"{where}: weights must be non-negative numbers; got {', '.join(f'{k}={v}' for k, v in bad.items())}"
        )
    total = sum(weights.values())
    if abs(total - 1.0) > _SUM_TOLERANCE:
        listed = ", ".join(f"{k}={v:g}" for k, v in weights.items())
        raise ConfigError(f"{where}: weights must sum to 1, got {total:g} ({listed})")


def exact_weights(weights: Mapping[str, float], names: Sequence[str]) -> tuple[Fraction, ...]:
    """Weights as exact fractions (from their shortest decimal form), normalised to sum to 1."""
    fractions = [Fraction(repr(float(weights.get(name, 0.0)))) for name in names]
    total = sum(fractions)
    return tuple(f / total for f in fractions)


# ---------------------------------------------------------------------------------------
# Exact apportionment of rows to sources
# ---------------------------------------------------------------------------------------


def apportion_rows(weights: Sequence[Fraction], counts: Sequence[int], rows_done: int, num_rows: int) -> list[int]:
    """Sources of the next ``num_rows`` rows of a phase (Tijdeman's chairman assignment).

    ``counts[i]`` rows of source ``i`` among the phase's first ``rows_done`` rows. At row
    ``n`` the eligible sources are those whose deficit ``n*w_i - counts_i`` is at least
    ``1/(2k-2)``; among them the one whose deficit would first exceed ``1 - 1/(2k-2)``
    (earliest deadline) is chosen, ties to the lower index. This keeps
    ``|counts_i - n*w_i| <= 1 - 1/(2k-2)`` for every source and every ``n`` (R. Tijdeman,
    "The chairman assignment problem", Discrete Math. 32, 1980); zero weights are never
    chosen. ``counts`` is not modified.
    """
    active = [i for i, w in enumerate(weights) if w > 0]
    if not active:
        raise ValueError("apportion_rows: all weights are zero")
    if len(active) == 1:
        return [active[0]] * num_rows
    denom = math.lcm(*(weights[i].denominator for i in active))
    shares = {i: int(weights[i] * denom) for i in active}  # integer numerators summing to denom
    spread = 2 * len(active) - 2
    counts = list(counts)
    chosen = []
    for n in range(rows_done + 1, rows_done + num_rows + 1):
        best, best_key = -1, 0
        for i in active:
            if (n * shares[i] - counts[i] * denom) * spread >= denom:  # deficit >= 1/(2k-2)
                key = counts[i] * spread + spread - 1  # deadline ~ key / shares[i]
                if best < 0 or key * shares[best] < best_key * shares[i]:
                    best, best_key = i, key
        if best < 0:  # cannot happen (Tijdeman); the largest deficit keeps the stream going
            best = max(active, key=lambda i: n * shares[i] - counts[i] * denom)
        counts[best] += 1
        chosen.append(best)
    return chosen


@dataclasses.dataclass
class _Phase:
    start_step: int
    weights: tuple[Fraction, ...]
    rows: int
    counts: list[int]


class MixtureSchedule:
    """Weights per step: ``config.sources`` from step 0, then each schedule stage."""

    def __init__(self, config: PipelineConfig):
        self.names = config.source_names
        self.steps = [0] + [stage.step for stage in config.schedule]
        self.weights = [exact_weights(config.sources, self.names)] + [
            exact_weights(stage.weights, self.names) for stage in config.schedule
        ]

    def weights_at(self, step: int) -> tuple[Fraction, ...]:
        return self.weights[bisect.bisect_right(self.steps, step) - 1]

    def target_shares(self, start: int, stop: int) -> dict[str, float]:
        """Mean weight of each source over batches ``start <= step < stop``."""
        total = [Fraction(0)] * len(self.names)
        for i, first in enumerate(self.steps):
            last = self.steps[i + 1] if i + 1 < len(self.steps) else stop
            span = max(0, min(last, stop) - max(first, start))
            total = [t + w * span for t, w in zip(total, self.weights[i])]
        n = max(stop - start, 1)
        return {name: float(t / n) for name, t in zip(self.names, total)}


def planned_source_tokens(config: PipelineConfig, num_steps: int) -> dict[str, int]:
    """Tokens each source contributes to batches ``0 .. num_steps - 1`` (rows * ``seq_len``).

    Each schedule phase's rows are apportioned by its weights; the mixer keeps every
    source within one row of that target, so the planned count is exact up to one row
    (``seq_len`` tokens) per phase, and exact where ``rows * weight`` is a whole number.
    """
    if num_steps < 0:
        raise ConfigError(f"num_steps: expected a non-negative integer, got {num_steps}")
    schedule = MixtureSchedule(config)
    ends = schedule.steps[1:] + [num_steps]
    rows = dict.fromkeys(schedule.names, 0)
    for start, end, weights in zip(schedule.steps, ends, schedule.weights):
        phase_rows = max(0, min(end, num_steps) - start) * config.batch_size
        for name, weight in zip(schedule.names, weights):
            rows[name] += round(weight * phase_rows)
    return {name: count * config.seq_len for name, count in rows.items()}


def coverage_warnings(config: PipelineConfig, infos: Sequence[SourceInfo], num_steps: int) -> list[str]:
    """One line per source that ``num_steps`` steps will repeat (draw more than one epoch of).

    An epoch of a source's stream is its ``num_tokens`` plus one EOS per document (tags,
    when configured, add to it, so the epochs counted are an upper bound)."""
    needed = planned_source_tokens(config, num_steps)
    lines = []
    for info in infos:
        available = info.num_tokens + info.num_documents
        if needed[info.name] > available:
            lines.append(
                f"data: source {info.name!r} will be repeated: {num_steps} steps draw {needed[info.name]:,} of its "
                f"tokens, it holds {available:,} (with one EOS per document): {needed[info.name] / available:.2f} epochs"
            )
    return lines


# ---------------------------------------------------------------------------------------
# Per-document transform: decode, optional tag, EOS
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TagTransform:
    """Prepends tag token ids chosen by the document's toxicity score bucket.

    Bucket ``b`` = number of ``bucket_edges`` <= score; ``tag_ids[b]`` are the ids to
    prepend. Build it with ``TagTransform.from_config(config, tokenizer)`` or directly with
    pre-tokenized ids. ``sources``: names of the sources it applies to (None: all).
    """

    bucket_edges: tuple[float, ...]
    tag_ids: tuple[tuple[int, ...], ...]
    sources: frozenset[str] | None = None
    missing: Literal["error", "untagged"] = "error"
    every: int | None = None  # repeat the tag before each ``every`` tokens (None: once)

    def __post_init__(self) -> None:
        if len(self.tag_ids) != len(self.bucket_edges) + 1:
            raise ValueError(
                f"TagTransform: expected {len(self.bucket_edges) + 1} tag id sequences for "
                f"{len(self.bucket_edges)} bucket edges, got {len(self.tag_ids)}"
            )
        object.__setattr__(self, "_arrays", tuple(np.asarray(ids, np.int32) for ids in self.tag_ids))

    @classmethod
    def from_config(cls, config: TagConfig, tokenizer) -> "TagTransform":
        ids = tuple(tuple(tokenizer.encode(text)) for text in config.resolved_texts())
        sources = frozenset(config.sources) if config.sources is not None else None
        return cls(config.resolved_edges(), ids, sources, config.missing, config.every)

    def applies_to(self, source: str) -> bool:
        return self.sources is None or source in self.sources

    def bucket(self, score: float) -> int:
        return bisect.bisect_right(self.bucket_edges, score)

    def prefix(self, meta: Mapping[str, Any], source: str) -> np.ndarray:
        score = meta.get("toxicity")
        if score is None:
            if self.missing == "untagged":
                return self._arrays[0][:0]
            raise records.RecordError(
                f"source {source!r}, document {meta.get('doc_id')!r}: no toxicity score in its metadata; "
                "the tag transform needs one (prepare the data with the toxicity scorer, or set "
                "data.tags.missing: untagged)"
            )
        return self._arrays[self.bucket(float(score))]

    def pieces(self, ids: np.ndarray, prefix: np.ndarray) -> list[np.ndarray]:
        """``[prefix, ids]``, or with ``every``: the prefix before each ``every``-token piece."""
        if not self.every or ids.size <= self.every:
            return [prefix, ids]
        return [part for start in range(0, ids.size, self.every) for part in (prefix, ids[start : start + self.every])]


class _DocumentToFeatures:
    """Record bytes -> ``{"tokens": int32[tag + document + EOS]}`` (tags repeated per ``every``).

    ``vocab_size``: when given (a manifest without ``max_token_id``), documents holding an id
    outside the vocabulary are refused instead of reaching the model."""

    def __init__(self, info: SourceInfo, tag: TagTransform | None, vocab_size: int | None = None):
        self.source = info.name
        self.directory = info.directory
        self.eos = np.array([info.eos_id], np.int32)
        self.tag = tag if tag is not None and tag.applies_to(info.name) else None
        self.vocab_size = vocab_size

    def __call__(self, record: bytes) -> dict[str, np.ndarray]:
        try:
            if self.tag is None:
                ids = records.decode_tokens(record)
                pieces = [ids]
            else:
                ids, meta = records.decode_record(record)
                pieces = self.tag.pieces(ids, self.tag.prefix(meta, self.source))
        except records.RecordError as err:
            raise records.RecordError(f"{self.directory}: {err}") from None
        if self.vocab_size is not None and ids.size and int(ids.max()) >= self.vocab_size:
            raise records.RecordError(
                f"{self.directory}: a document holds token id {int(ids.max())}, but the manifest's "
                f"sources.{self.source}.vocab_size is {self.vocab_size}: the manifest was edited or belongs to "
                "other shards; prepare the dataset again"
            )
        return {"tokens": np.concatenate([*pieces, self.eos], dtype=np.int32)}


def stream_seed(seed: int, source: str) -> int:
    """The shuffle seed of one source: stable across runs, machines and source order."""
    digest = hashlib.sha256(f"jaxlm-data:{seed}:{source}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


# ---------------------------------------------------------------------------------------
# Curricula: documents in score order, bucket by bucket
# ---------------------------------------------------------------------------------------

_SCORE_READ_CHUNK = 1024  # records decoded per read while collecting scores
_SCORE_PROGRESS_MIN = 50_000  # sources with at least this many documents show a progress bar


def document_score(meta: Mapping[str, Any], key: str, source: str) -> float:
    """The score ``meta[key]`` as a float; NaN when the key is absent or null. A value that
    is not a finite number is a ``DataError`` naming the source, document and key."""
    value = meta.get(key)
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(
            f"source {source!r}, document {meta.get('doc_id')!r}: metadata {key!r} is {value!r}; "
            f"data.curricula.{source}.score needs a finite number"
        )
    return float(value)


def read_scores(info: SourceInfo, curriculum: CurriculumConfig, *, progress: bool = True) -> np.ndarray:
    """float64 score of every document of a source, in stored order (NaN: no score, allowed
    only when ``curriculum.missing`` is not ``error``)."""
    from tqdm import tqdm

    data = records.open_source(info.directory, info)
    scores = np.empty(len(data), np.float64)
    bar = tqdm(total=len(data), desc=f"curriculum scores {info.name}", unit="doc", mininterval=1,
               disable=not progress or len(data) < _SCORE_PROGRESS_MIN)
    with bar:
        for start in range(0, len(data), _SCORE_READ_CHUNK):
            indices = range(start, min(start + _SCORE_READ_CHUNK, len(data)))
            for index, record in zip(indices, data.__getitems__(list(indices))):
                try:
                    meta = records.decode_record(record)[1]
                except records.RecordError as err:
                    raise records.RecordError(f"{info.directory}: document {index}: {err}") from None
                scores[index] = document_score(meta, curriculum.score, info.name)
                if math.isnan(scores[index]) and curriculum.missing == "error":
                    raise DataError(
                        f"source {info.name!r}, document {meta.get('doc_id')!r}: no {curriculum.score!r} in its "
                        f"metadata; data.curricula.{info.name} orders by it (prepare the source with that score, "
                        f"or set data.curricula.{info.name}.missing: last or first)"
                    )
            bar.update(len(indices))
    return scores


def curriculum_buckets(scores: np.ndarray, curriculum: CurriculumConfig) -> list[np.ndarray]:
    """Document indices of each bucket, in visiting order.

    The scored documents sorted by score (stable: ties keep their stored order), cut into
    ``curriculum.buckets`` equal-count buckets (sizes differ by at most one; empty ones are
    dropped); the unscored ones (NaN) are one bucket after (``last``) or before (``first``).
    """
    scores = np.asarray(scores, np.float64)
    unscored = np.isnan(scores)
    scored = np.flatnonzero(~unscored)
    keys = scores[scored] if curriculum.order == "ascending" else -scores[scored]
    ordered = scored[np.argsort(keys, kind="stable")]
    buckets = [b for b in np.array_split(ordered, curriculum.buckets) if b.size]
    if unscored.any():
        rest = np.flatnonzero(unscored)
        buckets = [rest, *buckets] if curriculum.missing == "first" else [*buckets, rest]
    return buckets


class CurriculumMapDataset(grain.MapDataset):
    """The documents of ``parent`` in curriculum order, epoch after epoch.

    Index ``i`` is position ``i % n`` of epoch ``i // n`` (n: the documents in ``buckets``).
    Each epoch visits ``buckets`` in order, every bucket shuffled with a permutation seeded
    by ``(seed, epoch)``: the same curriculum again with a new within-bucket order. An
    index names its document without any iteration history, so grain's iterator state (the
    next index) resumes a stream mid-curriculum exactly.
    """

    def __init__(self, parent: grain.MapDataset, buckets: Sequence[np.ndarray], seed: int):
        super().__init__(parent)
        self._buckets = tuple(np.asarray(b, np.int64) for b in buckets)
        self._length = sum(b.size for b in self._buckets)
        if self._length == 0:
            raise ValueError("CurriculumMapDataset: the buckets hold no documents")
        self._seed = seed
        self._orders: dict[int, np.ndarray] = {}  # epoch -> document order (the latest two epochs)

    def __len__(self) -> int:
        return self._length

    def __str__(self) -> str:
        return f"CurriculumMapDataset(buckets={len(self._buckets)}, documents={self._length})"

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The document indices of one epoch, in visiting order."""
        order = self._orders.get(epoch)
        if order is None:
            rng = np.random.default_rng([self._seed, epoch])
            order = np.concatenate([rng.permutation(bucket) for bucket in self._buckets])
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1} | {epoch: order}
        return order

    def _document(self, index: int) -> int:
        epoch, position = divmod(int(index), self._length)
        return int(self.epoch_order(epoch)[position])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._document(index)]

    def _getitems(self, indices: Sequence[int]):
        return self._parent._getitems([self._document(i) for i in indices])


def source_stream(
    info: SourceInfo,
    *,
    seq_len: int,
    seed: int,
    tag: TagTransform | None = None,
    read_threads: int = 0,
    buckets: Sequence[np.ndarray] | None = None,
) -> grain.IterDataset:
    """One source as an endless grain stream of packed rows (keys ``tokens``,
    ``tokens_segment_ids``, ``tokens_positions``). ``buckets`` (``curriculum_buckets``):
    visit the documents in that curriculum order instead of a uniform shuffle."""
    data = records.open_source(info.directory, info)
    if len(data) != info.num_documents:
        raise records.ManifestError(
            f"source {info.name!r}: the manifest lists {info.num_documents} documents but the shards in "
            f"{info.directory} hold {len(data)}; prepare again"
        )
    read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64 if read_threads else 0)
    documents = grain.MapDataset.source(data)
    if buckets is None:
        documents = documents.shuffle(seed=stream_seed(seed, info.name))
    else:
        documents = CurriculumMapDataset(documents, buckets, stream_seed(seed, info.name))
    documents = (
        documents.repeat(None)  # endless; the shuffle (or curriculum) reads the epoch from the index
        .map(_DocumentToFeatures(info, tag, info.vocab_size if info.max_token_id is None else None))
        .to_iter_dataset(read_options)
    )
    return grain_experimental.ConcatThenSplitIterDataset(documents, length_struct={"tokens": seq_len})


# ---------------------------------------------------------------------------------------
# The mixer
# ---------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def _stream_state_from_json(state: dict[str, Any]) -> dict[str, Any]:
    """grain's ConcatThenSplit state compares slices with tuples; JSON turns them into lists."""
    state = dict(state)
    state["remainder_slices"] = {k: tuple(v) for k, v in state["remainder_slices"].items()}
    return state


class _MixtureIterator(grain.DatasetIterator):
    def __init__(
        self,
        streams: Sequence[grain.DatasetIterator],
        schedule: MixtureSchedule,
        *,
        batch_size: int,
        seq_len: int,
        seed: int,
        start_step: int,
    ):
        super().__init__(list(streams))
        self._streams = list(streams)
        self._schedule = schedule
        self._names = schedule.names
        self._batch_size = batch_size
        self._seq_len = seq_len
        self._seed = seed
        self._step = start_step
        self._phase: _Phase | None = None
        self._rows_per_source = [0] * len(self._names)

    def _current_phase(self) -> _Phase:
        weights = self._schedule.weights_at(self._step)
        if self._phase is None or self._phase.weights != weights:
            self._phase = _Phase(self._step, weights, 0, [0] * len(weights))
        return self._phase

    def batch_sources(self) -> np.ndarray:
        """Source index of each row of the next batch (advances the phase)."""
        phase = self._current_phase()
        chosen = apportion_rows(phase.weights, phase.counts, phase.rows, self._batch_size)
        for i in chosen:
            phase.counts[i] += 1
        phase.rows += self._batch_size
        order = np.random.default_rng([self._seed, self._step, 0x6D6978]).permutation(self._batch_size)
        return np.asarray(chosen, np.int32)[order]

    def __next__(self) -> dict[str, np.ndarray]:
        sources = self.batch_sources()
        rows = [next(self._streams[i]) for i in sources]
        for i in sources:
            self._rows_per_source[i] += 1
        self._step += 1
        return {
            "tokens": np.stack([r["tokens"] for r in rows]),
            "segment_ids": np.stack([r["tokens_segment_ids"] for r in rows]),
            "positions": np.stack([r["tokens_positions"] for r in rows]),
            "source_ids": sources,
        }

    def get_state(self) -> dict[str, Any]:
        phase = self._phase or _Phase(self._step, self._schedule.weights_at(self._step), 0, [0] * len(self._names))
        return _jsonable(
            {
                "version": STATE_VERSION,
                "seq_len": self._seq_len,
                "seed": self._seed,
                "step": self._step,
                "phase": {
                    "start_step": phase.start_step,
                    "weights": {n: f"{w.numerator}/{w.denominator}" for n, w in zip(self._names, phase.weights)},
                    "rows": phase.rows,
                    "counts": dict(zip(self._names, phase.counts)),
                },
                "rows_per_source": dict(zip(self._names, self._rows_per_source)),
                "streams": {n: s.get_state() for n, s in zip(self._names, self._streams)},
            }
        )

    def set_state(self, state: dict[str, Any]) -> None:
        state = validate_state(state, seq_len=self._seq_len, seed=self._seed)
        self._step = state["step"]
        saved = state["phase"]
        saved_weights = tuple(Fraction(saved["weights"].get(n, "0")) for n in self._names)
        if set(saved["weights"]) == set(self._names) and saved_weights == self._schedule.weights_at(self._step):
            counts = [int(saved["counts"].get(n, 0)) for n in self._names]
            self._phase = _Phase(saved["start_step"], saved_weights, saved["rows"], counts)
        else:  # mixture changed on resume: a new phase from the saved step
            self._phase = None
        self._rows_per_source = [int(state["rows_per_source"].get(n, 0)) for n in self._names]
        for name, stream in zip(self._names, self._streams):
            if name in state["streams"]:
                stream.set_state(_stream_state_from_json(state["streams"][name]))


def validate_state(state: Any, *, seq_len: int, seed: int) -> dict[str, Any]:
    """Check a saved pipeline state against this pipeline (errors say what differs)."""
    if not isinstance(state, dict):
        raise ConfigError(f"data state: expected a mapping, got {type(state).__name__}")
    required = ("version", "seq_len", "seed", "step", "phase", "rows_per_source", "streams")
    missing = [k for k in required if k not in state]
    if missing:
        raise ConfigError(f"data state: missing {', '.join(missing)} (not a jaxlm pipeline state?)")
    if state["version"] != STATE_VERSION:
        raise ConfigError(f"data state: version {state['version']} is not supported (expected {STATE_VERSION})")
    if state["seq_len"] != seq_len:
        raise ConfigError(
            f"data.seq_len: the saved data state was packed with seq_len={state['seq_len']}, the config says {seq_len}"
        )
    if state["seed"] != seed:
        raise ConfigError(f"data.seed: the saved data state used seed={state['seed']}, the config says {seed}")
    return state


class ExactMixtureIterDataset(grain.IterDataset):
    """Global batches drawn from packed per-source streams with exact token shares."""

    def __init__(
        self,
        streams: Sequence[grain.IterDataset],
        schedule: MixtureSchedule,
        *,
        batch_size: int,
        seq_len: int,
        seed: int,
        start_step: int = 0,
    ):
        super().__init__(list(streams))
        self._schedule = schedule
        self._kwargs = dict(batch_size=batch_size, seq_len=seq_len, seed=seed, start_step=start_step)

    def __iter__(self) -> _MixtureIterator:
        return _MixtureIterator([p.__iter__() for p in self._parents], self._schedule, **self._kwargs)

    def __str__(self) -> str:
        return f"ExactMixtureIterDataset(sources={list(self._schedule.names)}, batch_size={self._kwargs['batch_size']})"


class _ProcessRows:
    """Keeps this process's rows ``[p*B/n, (p+1)*B/n)`` of a global batch."""

    def __init__(self, process_index: int, process_count: int, batch_size: int):
        per = batch_size // process_count
        self.rows = slice(process_index * per, (process_index + 1) * per)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v[self.rows] for k, v in batch.items()}


# ---------------------------------------------------------------------------------------
# The pipeline object
# ---------------------------------------------------------------------------------------


class Pipeline:
    """Iterator of this process's batches: dicts of numpy arrays

    ``tokens``, ``segment_ids``, ``positions`` [B/n, T] int32 and ``source_ids`` [B/n] int32
    (indices into ``source_names``). ``get_state``/``set_state`` checkpoint it (JSON).
    """

    def __init__(
        self,
        config: PipelineConfig,
        manifest: Manifest,
        dataset: grain.IterDataset,
        schedule: MixtureSchedule,
        process_index: int,
        process_count: int,
    ):
        self.config = config
        self.manifest = manifest
        self.schedule = schedule
        self.process_index = process_index
        self.process_count = process_count
        self._dataset = dataset
        self._iterator = dataset.__iter__()
        _OPEN_PIPELINES.add(self)
        first = manifest.sources[config.source_names[0]]
        self.vocab_size = first.vocab_size
        self.eos_id = first.eos_id
        self.pad_id = first.pad_id

    # iteration --------------------------------------------------------------------------
    def __iter__(self) -> "Pipeline":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._live())

    def _live(self) -> grain.DatasetIterator:
        if self._iterator is None:
            raise RuntimeError("the data pipeline is closed")
        return self._iterator

    @property
    def source_names(self) -> tuple[str, ...]:
        return self.config.source_names

    @property
    def tokenizer_path(self) -> Path | None:
        return self.manifest.tokenizer

    @property
    def local_batch_size(self) -> int:
        return self.config.batch_size // self.process_count

    # state ------------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state after the last batch returned (see the module doc)."""
        return _jsonable(self._live().get_state())

    def set_state(self, state: dict[str, Any]) -> None:
        self._live().set_state(state)

    @property
    def step(self) -> int:
        """Index of the next batch."""
        return int(self.get_state()["step"])

    # accounting -------------------------------------------------------------------------
    def realised_rows(self) -> dict[str, int]:
        """Rows (= sequences of ``seq_len`` tokens) drawn from each source since step 0."""
        return dict(self.get_state()["rows_per_source"])

    def realised_shares(self) -> dict[str, float]:
        """Share of training tokens each source contributed since step 0 (0 before any batch)."""
        rows = self.realised_rows()
        total = sum(rows.values())
        return {name: (rows.get(name, 0) / total if total else 0.0) for name in self.source_names}

    def weights_at(self, step: int) -> dict[str, float]:
        return {n: float(w) for n, w in zip(self.source_names, self.schedule.weights_at(step))}

    def target_shares(self, start: int, stop: int) -> dict[str, float]:
        """Mean target share of each source over batches ``start <= step < stop``."""
        return self.schedule.target_shares(start, stop)

    # devices ----------------------------------------------------------------------------
    def peek_shapes(self) -> dict[str, Any]:
        """Global shapes/dtypes of the model inputs (tokens, segment_ids, positions)."""
        import jax

        shape = (self.config.batch_size, self.config.seq_len)
        return {k: jax.ShapeDtypeStruct(shape, np.int32) for k in ("tokens", "segment_ids", "positions")}

    def to_global(self, batch: Mapping[str, np.ndarray], mesh, sharding=None) -> dict[str, Any]:
        return to_global_array(batch, mesh, sharding, global_batch_size=self.config.batch_size)

    def close(self) -> None:
        """Stop background threads and release the readers (the pipeline is then unusable)."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None:
            iterator.close()


# grain iterators close themselves in ``__del__``, which fails once interpreter shutdown has
# torn down grain's modules: close open pipelines (and collect them) before that.
_OPEN_PIPELINES: "weakref.WeakSet[Pipeline]" = weakref.WeakSet()


@atexit.register
def _close_open_pipelines() -> None:
    import gc

    for pipeline in list(_OPEN_PIPELINES):
        pipeline.close()
    gc.collect()


def to_global_array(
    batch: Mapping[str, np.ndarray],
    mesh,
    sharding=None,
    *,
    global_batch_size: int | None = None,
) -> dict[str, Any]:
    """Process-local rows -> global ``jax.Array``s with the data sharding.

    ``sharding``: one ``NamedSharding`` for every key, a dict per key, or None for
    ``jaxlm.sharding.batch_sharding`` (batch over the data axes). ``batch`` holds this
    process's rows ``[p*B/n, (p+1)*B/n)``; a full global batch (``global_batch_size`` rows)
    is accepted too, and its process rows are taken.
    """
    import jax

    from jaxlm import sharding as sharding_lib

    count, index = jax.process_count(), jax.process_index()
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        rows = value.shape[0]
        global_rows = global_batch_size if global_batch_size is not None else rows * count
        if count > 1 and rows == global_rows:
            per = global_rows // count
            value = value[index * per : (index + 1) * per]
        elif rows * count != global_rows:
            raise ValueError(
                f"to_global_array: {key!r} has {rows} rows; expected {global_rows // count} per process "
                f"({global_rows} global over {count} processes)"
            )
        if isinstance(sharding, Mapping):
            target = sharding[key]
        elif sharding is not None:
            target = sharding
        else:
            target = sharding_lib.batch_sharding(mesh, ndim=value.ndim)
        out[key] = jax.make_array_from_process_local_data(target, value, (global_rows, *value.shape[1:]))
    return out


def _check_sources(config: PipelineConfig, manifest: Manifest) -> list[SourceInfo]:
    path = manifest.root / records.MANIFEST_FILE
    unknown = [name for name in config.sources if name not in manifest.sources]
    if unknown:
        raise ConfigError(
            f"data.sources: unknown source {', '.join(map(repr, unknown))}; "
            f"prepared sources in {path}: {', '.join(manifest.sources)}"
        )
    infos = [manifest.sources[name] for name in config.sources]
    for info in infos:
        if info.num_documents == 0 or info.num_tokens == 0:
            raise ConfigError(
                f"data.sources: source {info.name!r} is empty ({info.num_documents} documents, "
                f"{info.num_tokens} tokens in {path}); remove it from the mixture or prepare it with data"
            )
    for field in ("vocab_size", "eos_id"):
        values = {info.name: getattr(info, field) for info in infos}
        if len(set(values.values())) > 1:
            raise ConfigError(
                f"{path}: sources disagree on {field} ({', '.join(f'{k}={v}' for k, v in values.items())}); "
                "mixed sources must share one tokenizer"
            )
    return infos


def _buckets_of(config: PipelineConfig, info: SourceInfo, progress: bool) -> list[np.ndarray] | None:
    curriculum = config.curriculum_of(info.name)
    if curriculum is None:
        return None
    return curriculum_buckets(read_scores(info, curriculum, progress=progress), curriculum)


def build_pipeline(
    config: PipelineConfig,
    *,
    process_index: int = 0,
    process_count: int = 1,
    start_step: int = 0,
    state: dict[str, Any] | None = None,
    tag_transform: TagTransform | None = None,
    num_steps: int | None = None,
    progress: bool = True,
) -> Pipeline:
    """The data pipeline for ``config``; ``state`` (from ``get_state``) resumes it.

    ``start_step``: without a state, the step the first batch belongs to (the schedule
    position; streams start at their beginning). ``tag_transform`` overrides
    ``config.tags`` (which is encoded with the dataset's tokenizer). ``num_steps``: the
    steps the run will train, to warn (process 0, one line per source) about sources the
    mixture will repeat (``coverage_warnings``). ``progress``: a progress bar while the
    scores of a large curriculum source are read.
    """
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} / process_count {process_count}: expected 0 <= index < count")
    if config.batch_size % process_count:
        raise ConfigError(
            f"data.batch_size: the global batch ({config.batch_size}) must divide evenly over {process_count} processes"
        )
    if start_step < 0:
        raise ConfigError(f"start_step: expected a non-negative integer, got {start_step}")
    manifest = records.read_manifest(Path(os.path.expanduser(config.dataset)))
    infos = _check_sources(config, manifest)
    tokenizer = records.verify_tokenizer(manifest)  # the file the shards were encoded with
    if tag_transform is None and config.tags is not None:
        if manifest.tokenizer is None:
            raise ConfigError(
                f"data.tags: the tags are encoded with the dataset's tokenizer, but "
                f"{manifest.root / records.MANIFEST_FILE} names none; pass tag_transform= with token ids"
            )
        from jaxlm.tokenizer import Tokenizer

        tag_transform = TagTransform.from_config(config.tags, tokenizer or Tokenizer.load(manifest.tokenizer))
    if num_steps is not None and process_index == 0:
        for line in coverage_warnings(config, infos, num_steps):
            log.warning(line)
    schedule = MixtureSchedule(config)
    streams = [
        source_stream(
            info, seq_len=config.seq_len, seed=config.seed, tag=tag_transform, read_threads=config.read_threads,
            buckets=_buckets_of(config, info, progress),
        )
        for info in infos
    ]
    dataset: grain.IterDataset = ExactMixtureIterDataset(
        streams,
        schedule,
        batch_size=config.batch_size,
        seq_len=config.seq_len,
        seed=config.seed,
        start_step=start_step,
    )
    if process_count > 1:
        dataset = dataset.map(_ProcessRows(process_index, process_count, config.batch_size))
    if config.prefetch:
        dataset = grain_experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=config.prefetch)
    pipeline = Pipeline(config, manifest, dataset, schedule, process_index, process_count)
    if state is not None:
        if start_step and state.get("step") != start_step:
            raise ConfigError(f"start_step {start_step} differs from the saved data state's step {state.get('step')}")
        pipeline.set_state(state)
    return pipeline
