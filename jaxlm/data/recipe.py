"""The prepare recipe: sources (reader, inputs, filter/transform chain), tokenizer, toxicity
scoring and quality classifiers, as frozen dataclasses loaded from YAML.

A source's **chain** (DESIGN.md, data/prepare) is declared per source::

    sources:
      pol:
        reader: 4chan_ndjson
        paths: [pol/*.ndjson.gz]
        filters:                       # in order; a dropped document is counted with its reason
          - heuristic: gopher          # or c4, gopher+c4, or {preset: gopher, min_words: 20}
          - dedup: {}                  # exact, on normalised text
          - near_dedup: {threshold: 0.8, num_perm: 128, ngram: 5}
          - toxicity: {max: 0.5}
          - quality: {classifier: wiki, top: 0.2}   # or band: [0.8, 0.9], min_score: 0.7, or none (scores)
        transforms:
          - hook: {function: mypackage.cleaning:fix_quotes, args: {}}
          - perm: {fraction: 0.25, seed: 0}
    classifiers:
      wiki: {positive: {reader: wikitext, paths: [eval/wikitext2/valid.txt]}, negative_documents: 5000}

Execution order per document: text transforms (``hook``) first, on the text as read; then the
scores (toxicity, each classifier) of the text that will be written; then the filters in
their declared order; then tokenization and token transforms (``perm``). Filters that rank a
whole source (``quality`` steps) must come after the per-document ones. Held-out documents
(``valid_fraction``) go through the whole chain by default (``held_out_chain: all``), only
its transforms (``transforms``) or none of it (``none``: an unfiltered held-out set).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import typing
from typing import Any, Callable, Iterator, Literal, Sequence

from jaxlm import config as config_lib
from jaxlm.config import ConfigError, apply_overrides, from_dict, read_yaml
from jaxlm.data import sources
from jaxlm.data.filters import HEURISTIC_PRESETS, HeuristicRules, MinHashSettings
from jaxlm.data.quality import ClassifierSettings
from jaxlm.data.sources import Document, ReadOptions

VALID_SUFFIX = "@valid"

config_lib.PRESETS[HeuristicRules] = HEURISTIC_PRESETS  # ``heuristic: gopher`` / ``{preset: c4, ...}``


ReaderKind = Literal["gutenberg", "4chan_csv", "4chan_ndjson", "jsonl", "csv", "text", "wikitext", "tfds"]


# ---------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReaderSpec:
    """How a recipe's reader kind maps onto a ``jaxlm.data.sources`` function."""

    function: Callable[..., Iterator[Document]]
    path_arg: str | None  # the parameter receiving the source's paths (None: TFDS, no files)
    suffixes: tuple[str, ...] = ()  # files a directory contributes (as the reader searches it)

    def parameters(self) -> dict[str, inspect.Parameter]:
        """Keyword arguments a recipe may give in ``args`` (everything but paths, source, options, stats)."""
        fixed = {self.path_arg, "source", "options", "stats"}
        return {k: p for k, p in inspect.signature(self.function).parameters.items() if k not in fixed}

    def required(self) -> list[str]:
        return [k for k, p in self.parameters().items() if p.default is inspect.Parameter.empty]


READERS: dict[str, ReaderSpec] = {
    "gutenberg": ReaderSpec(sources.read_gutenberg, "dir_or_files", (".txt", ".txt.gz")),
    "4chan_csv": ReaderSpec(sources.read_4chan_csv, "path"),
    "4chan_ndjson": ReaderSpec(sources.read_4chan_ndjson, "path"),
    "jsonl": ReaderSpec(sources.read_jsonl, "path"),
    "csv": ReaderSpec(sources.read_csv, "path"),
    "text": ReaderSpec(sources.read_text_files, "paths_or_glob"),
    "wikitext": ReaderSpec(sources.read_wikitext, "paths_or_glob"),
    "tfds": ReaderSpec(sources.read_tfds, None),
}


# ---------------------------------------------------------------------------------------
# Chain steps
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DedupStep:
    """Exact dedup by content hash (``normalize``: case, Unicode form and whitespace runs ignored);
    the first occurrence is kept."""

    normalize: bool = True


@dataclasses.dataclass(frozen=True)
class ToxicityStep:
    """Keep documents whose ``field`` score (``toxicity``: the mean over chunks; ``toxicity_max``:
    the worst chunk) lies in ``[min, max]``."""

    max: float | None = None
    min: float | None = None
    field: Literal["toxicity", "toxicity_max"] = "toxicity"

    def __post_init__(self) -> None:
        if self.max is None and self.min is None:
            raise ConfigError("toxicity: expected max and/or min (scores in [0, 1])")
        for name in ("max", "min"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"toxicity.{name}: expected a score in [0, 1], got {value}")


@dataclasses.dataclass(frozen=True)
class QualityStep:
    """Score every document with classifier ``classifier`` (stored as ``quality.<name>`` and its
    within-source percentile ``quality.<name>.percentile``) and keep the ``top`` fraction by
    score (CQF top-k%), the documents whose percentile lies in ``band = [low, high)``
    (exclusive CQF; ``high = 1`` includes the best), those scoring at least ``min_score`` (a
    threshold fixed on a reference pool, e.g. the pool-wide top-k% of several sources), or all
    of them (none given: scores only)."""

    classifier: str
    top: float | None = None
    band: tuple[float, float] | None = None
    min_score: float | None = None

    OMIT_AT_DEFAULT: typing.ClassVar[tuple[str, ...]] = ("min_score",)

    def __post_init__(self) -> None:
        given = [name for name in ("top", "band", "min_score") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ConfigError(f"quality: give one of top, band and min_score, not {' and '.join(given)}")
        if self.top is not None and not 0.0 < self.top <= 1.0:
            raise ConfigError(f"quality.top: expected a fraction in (0, 1], got {self.top}")
        if self.band is not None and not 0.0 <= self.band[0] < self.band[1] <= 1.0:
            raise ConfigError(f"quality.band: expected [low, high] with 0 <= low < high <= 1, got {list(self.band)}")
        if self.min_score is not None and not 0.0 <= self.min_score <= 1.0:
            raise ConfigError(f"quality.min_score: expected a score in [0, 1], got {self.min_score}")


@dataclasses.dataclass(frozen=True)
class FilterStep:
    """One filter of a source's chain: exactly one of its fields is set."""

    heuristic: HeuristicRules | None = None
    dedup: DedupStep | None = None
    near_dedup: MinHashSettings | None = None
    toxicity: ToxicityStep | None = None
    quality: QualityStep | None = None

    OMIT_AT_DEFAULT: typing.ClassVar[tuple[str, ...]] = ("heuristic", "dedup", "near_dedup", "toxicity", "quality")

    def __post_init__(self) -> None:
        _exactly_one(self, "filter")

    @property
    def kind(self) -> str:
        return _set_field(self)

    @property
    def settings(self) -> Any:
        return getattr(self, self.kind)

    @property
    def ranks_source(self) -> bool:
        """Needs every document of the source before deciding (a percentile)."""
        return self.quality is not None


@dataclasses.dataclass(frozen=True)
class HookStep:
    """A text transform: ``function`` (``package.module:name``) is called as
    ``function(text, meta, **args)`` and returns the new text, or None to drop the document
    (counted as ``hook.<name>``). It must be deterministic; its module's source is part of
    the fingerprint."""

    function: str
    args: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        module, _, name = self.function.partition(":")
        if not module or not name.isidentifier():
            raise ConfigError(f"hook.function: expected 'package.module:function', got {self.function!r}")


@dataclasses.dataclass(frozen=True)
class PermStep:
    """Perm(k): the tokens of exactly ``round(fraction * n)`` of a split's ``n`` documents, chosen
    at random (``seed``), are randomly permuted (marked ``permuted: true`` in their metadata)."""

    fraction: float
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(f"perm.fraction: expected a fraction in [0, 1], got {self.fraction}")


@dataclasses.dataclass(frozen=True)
class TransformStep:
    """One transform of a source's chain: exactly one of its fields is set."""

    hook: HookStep | None = None
    perm: PermStep | None = None

    OMIT_AT_DEFAULT: typing.ClassVar[tuple[str, ...]] = ("hook", "perm")

    def __post_init__(self) -> None:
        _exactly_one(self, "transform")

    @property
    def kind(self) -> str:
        return _set_field(self)


def _set_field(step: Any) -> str:
    return next(f.name for f in dataclasses.fields(step) if getattr(step, f.name) is not None)


def _exactly_one(step: Any, what: str) -> None:
    given = [f.name for f in dataclasses.fields(step) if getattr(step, f.name) is not None]
    if len(given) != 1:
        names = ", ".join(f.name for f in dataclasses.fields(step))
        raise ConfigError(f"expected a {what} with exactly one of {names}, got {given or 'none'}")


# ---------------------------------------------------------------------------------------
# Recipe
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SourceRecipe:
    """One source: a reader, its inputs and arguments, and what to keep.

    ``paths``: files, directories or glob patterns, relative to the data directory
    (``$JAXLM_DATA_DIR``) or absolute. ``args``: keyword arguments of the reader function
    (e.g. ``text_field`` for ``jsonl``, ``documents: threads`` for 4chan, ``name``/``split``
    for ``tfds``). ``max_documents``: stop after this many documents (CI-size subsets).
    ``valid_fraction``: share of documents written to the held-out source ``<name>@valid``
    instead (every document whose running count crosses the next multiple of
    ``1/valid_fraction``, so exactly ``round(n * valid_fraction)`` of ``n``; the parts of a
    split document stay together). ``records_per_shard``: documents per shard file (a shard
    also ends at 256 MiB): ArrayRecord's random reads slow down with the number of records
    in a file (about 3k reads/s with 272k records in one shard, 57k/s with 8k; see
    docs/data.md), which matters for sources of short posts. ``read``: this source's read
    options (default: the recipe's). ``filters`` / ``transforms``: the source's chain and
    ``held_out_chain`` how much of it the held-out split goes through (module doc).
    """

    reader: ReaderKind
    paths: str | tuple[str, ...] = ()
    args: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_documents: int | None = None
    valid_fraction: float = 0.0
    records_per_shard: int = 8192
    read: ReadOptions | None = None
    filters: tuple[FilterStep, ...] = ()
    transforms: tuple[TransformStep, ...] = ()
    held_out_chain: Literal["all", "transforms", "none"] = "all"

    OMIT_AT_DEFAULT: typing.ClassVar[tuple[str, ...]] = ("filters", "transforms", "held_out_chain")

    def __post_init__(self) -> None:
        ranked = [i for i, step in enumerate(self.filters) if step.ranks_source]
        if ranked and any(not step.ranks_source for step in self.filters[ranked[0] :]):
            raise ConfigError(
                f"filters[{ranked[0]}]: a quality step ranks the whole source, so it must come after every "
                "per-document filter (heuristic, dedup, near_dedup, toxicity)"
            )
        kinds = [step.kind for step in self.transforms]
        if "perm" in kinds and "hook" in kinds[kinds.index("perm") :]:
            raise ConfigError(
                f"transforms[{kinds.index('hook', kinds.index('perm'))}]: text transforms (hook) run before "
                "token transforms (perm); list them first"
            )
        if kinds.count("perm") > 1:
            raise ConfigError(f"transforms[{kinds.index('perm', kinds.index('perm') + 1)}]: at most one perm step")
        if isinstance(self.paths, str):
            object.__setattr__(self, "paths", (self.paths,))
        if self.max_documents is not None and self.max_documents < 1:
            raise ConfigError(f"max_documents: expected a positive integer or null, got {self.max_documents}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ConfigError(f"valid_fraction: expected a number in [0, 1), got {self.valid_fraction}")
        if self.records_per_shard < 1:
            raise ConfigError(f"records_per_shard: expected a positive integer, got {self.records_per_shard}")


@dataclasses.dataclass(frozen=True)
class TokenizerRecipe:
    """Load ``path`` (a ``tokenizer.json`` or a directory holding one; relative to the
    current directory), or train a byte-level BPE of ``vocab_size`` on a seeded sample of
    ``sample_chars`` characters per source."""

    path: str | None = None
    vocab_size: int = 8192
    sample_chars: int = 5_000_000
    seed: int = 0
    min_frequency: int = 2

    def __post_init__(self) -> None:
        if self.sample_chars < 1:
            raise ConfigError(f"tokenizer.sample_chars: expected a positive integer, got {self.sample_chars}")


@dataclasses.dataclass(frozen=True)
class ToxicityRecipe:
    """Score every document with the offline ``alt-profanity-check`` classifier, in chunks
    of at most ``chunk_chars`` characters (see the module doc)."""

    enabled: bool = True
    chunk_chars: int = 1000

    def __post_init__(self) -> None:
        if self.chunk_chars < 1:
            raise ConfigError(f"toxicity.chunk_chars: expected a positive integer, got {self.chunk_chars}")


@dataclasses.dataclass(frozen=True)
class ClassifierRecipe:
    """A quality classifier for ``quality`` filter steps: trained during prepare on HQ documents
    (``positive``: a reader and its inputs, like a source without a chain) against
    ``negative_documents`` documents sampled from the pool (``negative_sources``: recipe
    sources, default all of them, as read, before their chains), or loaded from ``path`` (a
    saved jaxlm classifier directory or a bare fastText ``.bin`` whose HQ label is
    ``positive_label``). ``length_matched``: draw the negatives to match the positives' length
    distribution from a uniform reservoir of ``candidate_factor`` times as many pool documents
    (the paper's control for CQF's length bias); otherwise uniformly."""

    positive: SourceRecipe | None = None
    negative_sources: tuple[str, ...] = ()
    negative_documents: int = 10_000
    length_matched: bool = False
    candidate_factor: int = 4
    settings: ClassifierSettings = ClassifierSettings()
    path: str | None = None
    positive_label: str = "__label__hq"

    def __post_init__(self) -> None:
        if (self.positive is None) == (self.path is None):
            raise ConfigError("expected positive (documents to train on) or path (a saved classifier), not both")
        if self.positive is not None and (self.positive.filters or self.positive.transforms or self.positive.valid_fraction):
            raise ConfigError("positive: a classifier's documents take no filters, transforms or valid_fraction")
        if self.negative_documents < 2 or self.candidate_factor < 1:
            raise ConfigError("negative_documents / candidate_factor: expected at least 2 / 1")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What ``jaxlm data prepare`` builds (see ``experiments/configs/recipe-*.yaml``).

    ``out``: default output directory (relative to the current directory; ``--out``
    overrides it). ``data_dir``: the corpora root (default ``$JAXLM_DATA_DIR``).
    ``read``: read options of every source (``max_chars``: longer documents are split into
    parts, or dropped with ``too_long: drop``; ``invalid_utf8``: ``error`` or ``drop``).
    ``fingerprint``: how input files are fingerprinted: ``stat`` (size and mtime) or
    ``sha256`` (content; slower). ``classifiers``: quality classifiers by name, for the
    sources' ``quality`` steps.
    """

    sources: dict[str, SourceRecipe]
    tokenizer: TokenizerRecipe = TokenizerRecipe()
    toxicity: ToxicityRecipe = ToxicityRecipe()
    read: ReadOptions = ReadOptions(max_chars=2_000_000)
    out: str | None = None
    data_dir: str | None = None
    fingerprint: Literal["stat", "sha256"] = "stat"
    classifiers: dict[str, ClassifierRecipe] = dataclasses.field(default_factory=dict)

    OMIT_AT_DEFAULT: typing.ClassVar[tuple[str, ...]] = ("classifiers",)

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("sources: expected at least one source (name: {reader: ..., paths: [...]})")
        for name, source in self.sources.items():
            where = f"sources.{name}"
            if not name or name.startswith(".") or any(c in name for c in "/\\@") or name != name.strip():
                raise ConfigError(
                    f"{where}: invalid source name {name!r} (expected a directory name without '/', '\\' or '@', "
                    "not starting with '.')"
                )
            _check_reader(where, source)
        for name, classifier in self.classifiers.items():
            if classifier.positive is not None:
                _check_reader(f"classifiers.{name}.positive", classifier.positive)
        self._check_chains()

    def _check_chains(self) -> None:
        for name, classifier in self.classifiers.items():
            unknown = sorted(set(classifier.negative_sources) - set(self.sources))
            if unknown:
                raise ConfigError(
                    f"classifiers.{name}.negative_sources: unknown source {', '.join(map(repr, unknown))}; "
                    f"sources: {', '.join(self.sources)}"
                )
        for name, source in self.sources.items():
            for i, step in enumerate(source.filters):
                where = f"sources.{name}.filters[{i}]"
                if step.quality is not None and step.quality.classifier not in self.classifiers:
                    raise ConfigError(
                        f"{where}.quality.classifier: unknown classifier {step.quality.classifier!r}; "
                        f"classifiers: {', '.join(self.classifiers) or 'none declared'}"
                    )
                if step.toxicity is not None and not self.toxicity.enabled:
                    raise ConfigError(f"{where}.toxicity: needs toxicity.enabled: true (the score it filters on)")

    def classifier_names(self) -> tuple[str, ...]:
        """Classifiers some source's chain uses, in declaration order."""
        used = {s.quality.classifier for src in self.sources.values() for s in src.filters if s.quality is not None}
        return tuple(name for name in self.classifiers if name in used)


def _check_reader(where: str, source: SourceRecipe) -> None:
    """The reader arguments and paths of a source (or a classifier's documents) fit its reader."""
    spec = READERS[source.reader]
    allowed = spec.parameters()
    unknown = sorted(set(source.args) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{where}.args: unknown argument {', '.join(map(repr, unknown))} for reader {source.reader!r}; "
            f"valid arguments: {', '.join(allowed) or 'none'}"
        )
    missing = [k for k in spec.required() if k not in source.args]
    if missing:
        raise ConfigError(f"{where}.args: reader {source.reader!r} needs {', '.join(map(repr, missing))}")
    if spec.path_arg is None and source.paths:
        raise ConfigError(f"{where}.paths: reader {source.reader!r} takes no paths (use args.name / args.data_dir)")
    if spec.path_arg is not None and not source.paths:
        raise ConfigError(f"{where}.paths: reader {source.reader!r} needs at least one file, directory or glob")


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Recipe:
    """A ``Recipe`` from YAML plus ``key.sub=value`` overrides (e.g. ``sources.pol.max_documents=1000``)."""
    data = apply_overrides(read_yaml(path), list(overrides))
    try:
        return from_dict(Recipe, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def split_names(name: str, source: SourceRecipe) -> tuple[str, ...]:
    """Prepared source names of a recipe source: ``name`` and, with held-out data, ``name@valid``."""
    return (name, name + VALID_SUFFIX) if source.valid_fraction > 0 else (name,)

