"""The main-process half of a source's chain (``data/recipe`` declares it, ``data/encode``
computes its per-document features): per-document filter decisions in document order (dedup
indexes live here), the whole-source selections (quality percentiles, top-k%, bands), Perm(k),
and the per-step counts the manifest records.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Any, Sequence

import numpy as np

from jaxlm.data.encode import hook_drop_reason
from jaxlm.data.filters import ExactDuplicates, NearDuplicates
from jaxlm.data.quality import percentile_band, score_percentiles, top_fraction
from jaxlm.data.recipe import PermStep, SourceRecipe

DROP_DEDUP = "dedup"
DROP_NEAR_DEDUP = "near_dedup"
DROP_TOXICITY = "toxicity"


def quality_key(classifier: str) -> str:
    """The metadata key of a document's score under ``classifier``."""
    return f"quality.{classifier}"


def percentile_key(classifier: str) -> str:
    return f"quality.{classifier}.percentile"


def step_label(step: Any) -> str:
    """A short description of a chain step for logs and the manifest."""
    if step.kind == "heuristic":
        return "heuristic"
    if step.kind == "quality":
        q = step.quality
        if q.top is not None:
            how = f"top {q.top:g}"
        elif q.band is not None:
            how = f"band [{q.band[0]:g}, {q.band[1]:g})"
        else:
            how = f"score >= {q.min_score:g}" if q.min_score is not None else "score"
        return f"quality {q.classifier} {how}"
    if step.kind == "toxicity":
        t = step.toxicity
        return f"toxicity {t.field} in [{t.min if t.min is not None else 0:g}, {t.max if t.max is not None else 1:g}]"
    if step.kind == "hook":
        return f"hook {step.hook.function}"
    if step.kind == "perm":
        return f"perm {step.perm.fraction:g}"
    return step.kind


@dataclasses.dataclass
class StepCounts:
    """How many documents reached a step and why it dropped some."""

    label: str
    documents_in: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.label,
            "documents_in": self.documents_in,
            "dropped": sum(self.dropped.values()),
            "reasons": dict(sorted(self.dropped.items())),
        }


class SourceChain:
    """One source's filters, applied document by document (``verdict``) and then, for quality
    steps, over the whole source (``select``)."""

    def __init__(self, recipe: SourceRecipe):
        self.filters = recipe.filters
        self.per_document = [i for i, step in enumerate(self.filters) if not step.ranks_source]
        self.ranking = [i for i, step in enumerate(self.filters) if step.ranks_source]
        self.hooks = tuple(step.hook for step in recipe.transforms if step.hook is not None)
        self.perm: PermStep | None = next((s.perm for s in recipe.transforms if s.perm is not None), None)
        self.counts = [StepCounts(step_label(step)) for step in self.filters]
        self.perm_counts = {"documents_in": 0, "permuted": 0}
        self.hook_counts = [StepCounts(step_label(step)) for step in recipe.transforms if step.hook is not None]
        self._exact = {i: ExactDuplicates() for i, s in enumerate(self.filters) if s.dedup is not None}
        self._near = {i: NearDuplicates(s.near_dedup) for i, s in enumerate(self.filters) if s.near_dedup is not None}

    @property
    def needs_all_documents(self) -> bool:
        """Whether the source must be spooled: a selection or Perm(k) over all its documents."""
        return bool(self.ranking) or self.perm is not None

    def count_hooks(self, reason: str | None) -> None:
        """Count a document the hooks were applied to (``reason``: the drop reason of the one that
        dropped it; the later hooks never saw it)."""
        for counts, step in zip(self.hook_counts, self.hooks):
            counts.documents_in += 1
            if reason is not None and reason == hook_drop_reason(step):
                counts.dropped[reason] += 1
                return

    def verdict(self, features: Sequence[Any], k: int, key: str, meta: dict[str, Any]) -> str | None:
        """Apply the per-document filters, in order, to document ``k`` of a chunk (``features``:
        the chunk's per-step features, ``key`` the document's id): the drop reason, or None."""
        for i in self.per_document:
            step = self.filters[i]
            self.counts[i].documents_in += 1
            reason = None
            if step.heuristic is not None:
                failed = features[i][k]
                reason = f"heuristic.{failed}" if failed is not None else None
            elif step.dedup is not None:
                reason = DROP_DEDUP if self._exact[i].seen(features[i][k]) else None
            elif step.near_dedup is not None:
                reason = DROP_NEAR_DEDUP if self._near[i].check_and_add(key, features[i][k]) is not None else None
            elif step.toxicity is not None:
                t = step.toxicity
                score = meta[t.field]
                outside = (t.max is not None and score > t.max) or (t.min is not None and score < t.min)
                reason = DROP_TOXICITY if outside else None
            if reason is not None:
                self.counts[i].dropped[reason] += 1
                return reason
        return None

    def select(self, n: int, scores: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The whole-source steps over the ``n`` spooled candidates that went through the filters
        (``scores``: classifier name -> [n] scores): ``(kept [n] bool, percentiles)`` where
        ``percentiles[name]`` is [n] (NaN for documents a step never saw)."""
        active = np.arange(n)
        percentiles: dict[str, np.ndarray] = {}
        for i in self.ranking:
            q = self.filters[i].quality
            values = scores[q.classifier][active]
            ranks = score_percentiles(values)
            full = percentiles.setdefault(q.classifier, np.full(n, np.nan))
            full[active] = ranks
            if q.top is not None:
                keep = top_fraction(values, q.top)
            elif q.band is not None:
                keep = percentile_band(ranks, q.band[0], q.band[1])
            elif q.min_score is not None:
                keep = values >= q.min_score
            else:
                keep = np.ones(len(active), bool)
            self.counts[i].documents_in += len(active)
            dropped = int((~keep).sum())
            if dropped:
                self.counts[i].dropped[quality_key(q.classifier)] += dropped
            active = active[keep]
        kept = np.zeros(n, bool)
        kept[active] = True
        return kept, percentiles

    def count_permuted(self, documents: int, permuted: int) -> None:
        self.perm_counts["documents_in"] += documents
        self.perm_counts["permuted"] += permuted

    def to_json(self) -> list[dict[str, Any]]:
        steps = [c.to_json() for c in self.hook_counts + self.counts]
        if self.perm is not None:
            steps.append({"step": f"perm {self.perm.fraction:g}", **self.perm_counts, "dropped": 0, "reasons": {}})
        return steps


def permuted_documents(count: int, step: PermStep, source: str, split: int) -> np.ndarray:
    """Perm(k): which of a split's ``count`` documents are permuted, exactly
    ``round(fraction * count)`` of them, uniformly at random (seeded by step, source and split)."""
    chosen = np.zeros(count, bool)
    number = int(round(step.fraction * count))
    rng = np.random.default_rng([step.seed, source_seed(source), split])
    chosen[rng.choice(count, size=number, replace=False)] = True
    return chosen


def permute_tokens(ids: np.ndarray, step: PermStep, source: str, index: int) -> np.ndarray:
    """A seeded random permutation of one document's tokens (``index``: its position in the source)."""
    rng = np.random.default_rng([step.seed, source_seed(source), 2**32 + index])
    return ids[rng.permutation(ids.size)]


def source_seed(source: str) -> int:
    """A stable 32-bit seed component per source name (the tokenizer sample uses it too)."""
    return int.from_bytes(hashlib.sha256(source.encode()).digest()[:4], "little")
