"""Prepare: raw corpora -> tokenizer -> tokenized, toxicity-scored ArrayRecord shards + manifest.

``prepare(recipe, out_dir)`` (CLI: ``jaxlm data prepare RECIPE.yaml``) reads each source of a
``Recipe`` with its ``jaxlm.data.sources`` reader, trains a byte-level BPE on a seeded sample
of every source (or loads a given ``tokenizer.json``), tokenizes and scores every document
in worker processes, and writes the prepared dataset that ``jaxlm.data.pipeline`` reads::

    <out>/manifest.json          written last, atomically (see below)
    <out>/tokenizer.json         the tokenizer the documents were encoded with
    <out>/<source>/shard-*.array_record
    <out>/<source>@valid/...     held-out documents, when ``valid_fraction > 0``

Records (``jaxlm.data.records``) hold a document's token ids, without an end-of-document
id (the pipeline appends one when packing), and its metadata: ``doc_id``, ``source``, the
reader's metadata (author/title, thread/time/country, file/line, ...), ``toxicity`` and
``toxicity_max``.

Toxicity: the offline ``alt-profanity-check`` classifier was trained on tweets and short
comments, and as a linear model on word counts it saturates on long inputs. A document is
therefore scored in chunks of at most ``toxicity.chunk_chars`` characters (cut at
paragraph, line or word boundaries); ``toxicity`` is the character-weighted mean of the
chunk scores (the document's overall level: what the MEDA/INST tag transform and
filtering read) and ``toxicity_max`` the highest chunk score (its worst passage). A post
shorter than a chunk gets one score, so both are equal.

Reuse and interruption:

- the output directory is locked (``jaxlm.errors.DirectoryLock``, ``.lock``) for the whole
  run: a second prepare into it fails at once naming the first one's pid;
- the manifest records a fingerprint of the recipe, the input files (size + mtime, or
  sha256 with ``fingerprint: sha256``), the tokenizer and the versions that decide the
  output, and every shard's size and sha256 (``records.ShardFile``); a re-run with the same
  fingerprint, every shard verified and the recorded tokenizer does nothing ("up to date");
- otherwise each source whose own fingerprint (its recipe entry, inputs, read options,
  tokenizer hash, scorer) matches the previous manifest's entry and whose shards are the
  ones it records (size and sha256: ``source_problem``) is reused; every other source is
  rebuilt, and the log says why. A rebuilt source's shards (``records.ShardWriter``,
  atomic) go to a hidden ``.staging/`` folder, a new tokenizer to ``.tokenizer.json.staged``;
  nothing of the existing dataset changes until every source is built, so a failure (a full
  disk, bad input, Ctrl-C) deletes what was staged and leaves the previous dataset as it was;
- then the commit: the old ``manifest.json`` is moved aside (``.manifest.previous.json``),
  so while the dataset changes no manifest claims it is complete, the tokenizer and the
  staged shards are renamed into place, ``shard-i-of-n`` (``RollingShards``), and the new
  manifest is written last; after a crash in the commit, the next run reuses every source
  that still verifies.

Drops are counted per source with their reasons (``ReadStats``: ``empty``,
``empty_post``, ``invalid_utf8``, ``too_long``, ``duplicate_id``); documents longer than
``read.max_chars`` are split into parts (counted as ``split``) unless
``read.too_long: drop``. Bad input (unreadable paths, corrupt gzip, invalid UTF-8 with
``invalid_utf8: error``, missing columns/fields, an empty corpus, unknown reader kinds or
arguments) raises ``DataError``/``ConfigError`` naming the file or field.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import inspect
import itertools
import json
import logging
import math
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import numpy as np

from jaxlm.config import ConfigError, apply_overrides, from_dict, read_yaml, to_dict
from jaxlm.data import DataError, records, sources
from jaxlm.data.sources import Document, ReadOptions, ReadStats
from jaxlm.errors import DirectoryLock

log = logging.getLogger(__name__)

PREPARE_VERSION = 1  # bump when the same inputs and recipe would give different records
TOKENIZER_FILE = "tokenizer.json"
PREVIOUS_MANIFEST = ".manifest.previous.json"
VALID_SUFFIX = "@valid"
DROP_NO_TOKENS = "no_tokens"  # a non-empty text that encodes to no ids (not expected with byte-level BPE)
TOXICITY_SCORER = "profanity-check"
TOXICITY_PACKAGE = "alt-profanity-check"
SAMPLE_PIECE_CHARS = 10_000  # tokenizer sample: reservoir over pieces of about this many characters
MAX_SHARD_BYTES = 256 * 2**20  # a shard also ends after about this many bytes of tokens
STAGING_DIR = ".staging"  # shards being written, hidden inside the source directory
STAGED_TOKENIZER = ".tokenizer.json.staged"  # a new tokenizer until the run commits
_STAGING_COUNT = 99999  # placeholder shard count in staging names (the real one is known at the end)

ReaderKind = Literal["gutenberg", "4chan_csv", "4chan_ndjson", "jsonl", "csv", "text", "tfds"]


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
    "tfds": ReaderSpec(sources.read_tfds, None),
}


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
    options (default: the recipe's).
    """

    reader: ReaderKind
    paths: str | tuple[str, ...] = ()
    args: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_documents: int | None = None
    valid_fraction: float = 0.0
    records_per_shard: int = 8192
    read: ReadOptions | None = None

    def __post_init__(self) -> None:
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
class Recipe:
    """What ``jaxlm data prepare`` builds (see ``experiments/configs/recipe-*.yaml``).

    ``out``: default output directory (relative to the current directory; ``--out``
    overrides it). ``data_dir``: the corpora root (default ``$JAXLM_DATA_DIR``).
    ``read``: read options of every source (``max_chars``: longer documents are split into
    parts, or dropped with ``too_long: drop``; ``invalid_utf8``: ``error`` or ``drop``).
    ``fingerprint``: how input files are fingerprinted: ``stat`` (size and mtime) or
    ``sha256`` (content; slower).
    """

    sources: dict[str, SourceRecipe]
    tokenizer: TokenizerRecipe = TokenizerRecipe()
    toxicity: ToxicityRecipe = ToxicityRecipe()
    read: ReadOptions = ReadOptions(max_chars=2_000_000)
    out: str | None = None
    data_dir: str | None = None
    fingerprint: Literal["stat", "sha256"] = "stat"

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


# ---------------------------------------------------------------------------------------
# Inputs: paths, fingerprints
# ---------------------------------------------------------------------------------------


def _resolve_path(raw: str, root: Callable[[], Path]) -> str:
    expanded = os.path.expanduser(raw)
    return expanded if os.path.isabs(expanded) else os.fspath(root() / expanded)


@dataclasses.dataclass(frozen=True)
class SourceInputs:
    """A source's reader call (resolved) and its input files."""

    name: str
    recipe: SourceRecipe
    kwargs: dict[str, Any]  # reader keyword arguments, paths resolved (without source/options/stats)
    files: tuple[Path, ...]
    root: Path | None  # data directory, when the paths were relative to it


def resolve_source(name: str, source: SourceRecipe, data_root: Callable[[], Path]) -> SourceInputs:
    """Resolve paths against the data directory and list (and check) every input file."""
    spec = READERS[source.reader]
    kwargs = dict(source.args)
    used_root: Path | None = None
    if spec.path_arg is not None:
        if any(not os.path.isabs(os.path.expanduser(p)) for p in source.paths):
            used_root = data_root()
        paths = [_resolve_path(p, data_root) for p in source.paths]
        kwargs[spec.path_arg] = paths
        try:
            files = tuple(path for path, _ in sources.resolve_inputs(paths, suffixes=spec.suffixes))
        except DataError as err:
            raise DataError(f"sources.{name}.paths: {err}") from None
    else:  # TFDS: the prepared dataset's files below its data directory
        if kwargs.get("data_dir") is not None:
            kwargs["data_dir"] = _resolve_path(str(kwargs["data_dir"]), data_root)
        files = _tfds_files(kwargs["name"], kwargs.get("data_dir"))
    unreadable = [f for f in files if not os.access(f, os.R_OK)]
    if unreadable:
        raise DataError(f"sources.{name}: {unreadable[0]}: not readable (permission denied)")
    return SourceInputs(name, source, kwargs, files, used_root)


def _tfds_files(name: str, data_dir: str | None) -> tuple[Path, ...]:
    """Files of a prepared TFDS dataset (``name`` like ``c4/en`` or ``c4/en:3.0.1``); empty when
    the directory is absent (the reader then reports the dataset as missing)."""
    base, _, version = name.partition(":")
    root = Path(data_dir) if data_dir is not None else Path(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()
    folder = root.joinpath(*base.split("/"))
    if version:
        folder = folder / version
    if not folder.is_dir():
        return ()
    return tuple(sorted(p for p in folder.rglob("*") if p.is_file()))


def input_fingerprints(inputs: SourceInputs, how: str) -> list[dict[str, Any]]:
    """Per input file: path (relative to the data directory when below it), size, and mtime or sha256."""
    entries = []
    for path in inputs.files:
        shown = path
        if inputs.root is not None:
            with contextlib.suppress(ValueError):
                shown = path.relative_to(inputs.root)
        stat = path.stat()
        entry: dict[str, Any] = {"path": shown.as_posix(), "size": stat.st_size}
        if how == "sha256":
            entry["sha256"] = records.file_sha256(path)
        else:
            entry["mtime_ns"] = stat.st_mtime_ns
        entries.append(entry)
    return entries


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def output_versions(recipe: Recipe) -> dict[str, Any]:
    """Versions that decide the bytes written (part of every fingerprint)."""
    versions = {
        "prepare": PREPARE_VERSION,
        "record_format": records.FORMAT_VERSION,
        "tokenizers": _version("tokenizers"),
    }
    if recipe.toxicity.enabled:
        versions[TOXICITY_PACKAGE] = _version(TOXICITY_PACKAGE)
        versions["scikit-learn"] = _version("scikit-learn")
    return versions


def environment_versions() -> dict[str, Any]:
    names = ("jaxlm", "tokenizers", TOXICITY_PACKAGE, "scikit-learn", "array-record", "grain", "numpy")
    return {"python": platform.python_version(), **{name: _version(name) for name in names}}


# ---------------------------------------------------------------------------------------
# Reading documents (with limits and the held-out split)
# ---------------------------------------------------------------------------------------


def read_documents(inputs: SourceInputs, options: ReadOptions, stats: ReadStats | None) -> Iterator[Document]:
    """The source's documents (at most ``max_documents``)."""
    spec = READERS[inputs.recipe.reader]
    documents = spec.function(**inputs.kwargs, source=inputs.name, options=options, stats=stats)
    if inputs.recipe.max_documents is not None:
        documents = itertools.islice(documents, inputs.recipe.max_documents)
    return documents


def held_out_flags(documents: Iterable[Document], fraction: float) -> Iterator[tuple[Document, bool]]:
    """``(document, held_out)``: document ``i`` (0-based, split parts counted once) is held out
    when ``floor((i+1) f + 1/2) > floor(i f + 1/2)``, so ``round(n f)`` of the first ``n`` are."""
    index = -1
    held = False
    for document in documents:
        if document.meta.get("part", 0) == 0:  # a new document (not a continuation part)
            index += 1
            held = fraction > 0 and math.floor((index + 1) * fraction + 0.5) > math.floor(index * fraction + 0.5)
        yield document, held


# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------


def sample_texts(documents: Iterable[Document], sample_chars: int, seed: int, source: str) -> list[str]:
    """A seeded uniform sample of about ``sample_chars`` characters of ``documents``.

    The concatenated stream is cut into pieces of about ``SAMPLE_PIECE_CHARS`` characters
    (at word boundaries; short documents grouped, long ones cut) and a reservoir keeps a
    uniform random ``ceil(sample_chars / SAMPLE_PIECE_CHARS)`` of them (Algorithm R).
    """
    capacity = max(1, math.ceil(sample_chars / SAMPLE_PIECE_CHARS))
    rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(source.encode()).digest()[:4], "little")])
    reservoir: list[list[str]] = []
    seen = 0

    def offer(piece: list[str]) -> None:
        nonlocal seen
        if seen < capacity:
            reservoir.append(piece)
        else:
            slot = int(rng.integers(0, seen + 1))
            if slot < capacity:
                reservoir[slot] = piece
        seen += 1

    buffer: list[str] = []
    buffered = 0
    for document in documents:
        text = document.text
        while text:
            room = SAMPLE_PIECE_CHARS - buffered
            if len(text) < room:
                buffer.append(text)
                buffered += len(text)
                break
            cut = text.rfind(" ", room // 2, room) + 1 or room  # end the piece at a word boundary
            buffer.append(text[:cut])
            text = text[cut:]
            offer(buffer)
            buffer, buffered = [], 0
    if buffer:
        offer(buffer)
    return [text for piece in reservoir for text in piece]


def tokenizer_sample_fingerprint(recipe: Recipe, inputs: dict[str, list[dict[str, Any]]]) -> str:
    """What a trained tokenizer depends on: its recipe, every source's reading and inputs."""
    reading = {
        name: {
            "reader": s.reader,
            "args": s.args,
            "paths": list(s.paths),
            "max_documents": s.max_documents,
            "read": to_dict(s.read or recipe.read),
        }
        for name, s in recipe.sources.items()
    }
    return _digest(
        {
            "tokenizer": to_dict(recipe.tokenizer),
            "reading": reading,
            "inputs": inputs,
            "piece_chars": SAMPLE_PIECE_CHARS,
            "tokenizers": _version("tokenizers"),
        }
    )


def train_tokenizer(recipe: Recipe, resolved: dict[str, SourceInputs], progress: bool):
    """Train the recipe's BPE on a seeded sample of every source; returns (tokenizer, sample chars)."""
    from tqdm import tqdm

    from jaxlm.tokenizer import train_bpe

    texts: list[str] = []
    for name, inputs in resolved.items():
        options = inputs.recipe.read or recipe.read
        documents = read_documents(inputs, options, ReadStats())  # drops are counted in the main pass
        if progress:
            documents = tqdm(documents, desc=f"sample {name}", unit="doc", leave=False, mininterval=1)
        texts += sample_texts(documents, recipe.tokenizer.sample_chars, recipe.tokenizer.seed, name)
    chars = sum(len(t) for t in texts)
    log.info("training a %d-token BPE on %d characters", recipe.tokenizer.vocab_size, chars)
    tokenizer = train_bpe(
        texts, recipe.tokenizer.vocab_size, min_frequency=recipe.tokenizer.min_frequency, show_progress=progress
    )
    return tokenizer, chars


def load_tokenizer(path: str):
    from jaxlm.tokenizer import Tokenizer

    return Tokenizer.load(os.path.expanduser(path))


# ---------------------------------------------------------------------------------------
# Encoding + scoring (in worker processes or in-process)
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class EncodedChunk:
    """Token ids of consecutive documents, concatenated, with per-document lengths and scores."""

    ids: np.ndarray  # [sum(lengths)] of the token dtype
    lengths: np.ndarray  # [n] int64
    toxicity: np.ndarray | None  # [n] float64, character-weighted mean over chunks
    toxicity_max: np.ndarray | None  # [n] float64
    text_bytes: np.ndarray  # [n] int64, UTF-8 bytes of each text


class DocumentEncoder:
    """Tokenizes and scores lists of texts (one instance per worker process)."""

    def __init__(self, tokenizer_json: str, token_dtype: str, toxicity: ToxicityRecipe):
        import tokenizers

        self.backend = tokenizers.Tokenizer.from_str(tokenizer_json)
        self.backend.encode_special_tokens = True  # documents are literal text (as jaxlm.tokenizer does)
        self.dtype = records.TOKEN_DTYPES[token_dtype]
        self.chunk_chars = toxicity.chunk_chars
        self.scorer = profanity_scorer() if toxicity.enabled else None

    def __call__(self, texts: Sequence[str]) -> EncodedChunk:
        encodings = self.backend.encode_batch_fast(list(texts), add_special_tokens=False)
        arrays = [np.asarray(e.ids, dtype=self.dtype) for e in encodings]
        lengths = np.asarray([a.size for a in arrays], np.int64)
        ids = np.concatenate(arrays) if arrays else np.zeros((0,), self.dtype)
        mean = peak = None
        if self.scorer is not None:
            mean, peak = self.score(texts)
        text_bytes = np.asarray([len(t.encode("utf-8")) for t in texts], np.int64)
        return EncodedChunk(ids, lengths, mean, peak, text_bytes)

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


def profanity_scorer() -> Callable[[list[str]], np.ndarray]:
    """``alt-profanity-check``'s probability of being offensive per text (its ``predict_prob``),
    from the one loaded copy of its model (``jaxlm.evaluate.scorer.profanity_check_model``)."""
    import warnings

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


def _encode_in_worker(texts: list[str]) -> EncodedChunk:
    assert _WORKER_ENCODER is not None, "worker not initialised"
    return _WORKER_ENCODER(texts)


class ChunkRunner:
    """Runs ``DocumentEncoder`` over chunks of texts, in order: in-process (``workers=0``,
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

    def map(self, chunks: Iterable[Any], texts_of: Callable[[Any], list[str]]) -> Iterator[tuple[Any, EncodedChunk]]:
        """``(chunk, encoded)`` for each chunk, in input order."""
        if self._pool is None:
            for chunk in chunks:
                yield chunk, self._encoder(texts_of(chunk))
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
                pending.append((chunk, self._pool.apply_async(_encode_in_worker, (texts_of(chunk),))))
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


# ---------------------------------------------------------------------------------------
# Writing one source
# ---------------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def clear_staging(directory: Path) -> None:
    """Remove a source directory's staged shards (of this run, or left by a killed one)."""
    staging = directory / STAGING_DIR
    if staging.is_dir():
        for path in staging.iterdir():
            path.unlink()
        staging.rmdir()


def clear_source_dir(directory: Path) -> None:
    """Remove shards (finished, temporary or staged) of an earlier run from a source directory."""
    if not directory.is_dir():
        return
    clear_staging(directory)
    clear_source_dir_shards(directory)


def _fsync_directory(directory: Path) -> None:
    """Make renames inside ``directory`` durable (best effort where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class RollingShards:
    """Consecutive shards of at most ``records_per_shard`` records (or ``MAX_SHARD_BYTES`` of
    tokens) for one source directory.

    The number of shards is known only at the end, and it is part of every shard's name:
    shards are written (by ``records.ShardWriter``, atomically) into a hidden staging
    directory; ``finish`` closes the last one, and ``commit`` (once every source of the run
    is finished) replaces the directory's old shards by them, renamed ``shard-i-of-n``. Until
    then the old shards stay as they are; ``abort`` deletes the staged ones only. An
    interrupted commit leaves an incomplete set, which ``records.shard_paths`` refuses.
    """

    def __init__(self, directory: Path, token_dtype: str, records_per_shard: int):
        self.directory = directory
        self.staging = directory / STAGING_DIR
        self.token_dtype = token_dtype
        self.records_per_shard = records_per_shard
        self.max_tokens = MAX_SHARD_BYTES // records.TOKEN_DTYPES[token_dtype].itemsize
        self.finished: list[records.ShardWriter] = []
        self.current: records.ShardWriter | None = None
        clear_staging(directory)

    def write(self, ids: np.ndarray, meta: dict[str, Any]) -> None:
        current = self.current
        if current is None or current.num_records >= self.records_per_shard or current.num_tokens >= self.max_tokens:
            current = self._next_shard()
        try:
            current.write(ids, meta)
        except OSError as err:  # a full disk: say which file could not be written
            raise _naming(err, current.tmp_path) from err

    def _next_shard(self) -> records.ShardWriter:
        if self.current is not None:
            self._close_current()
        self.current = records.ShardWriter(
            self.staging, len(self.finished), _STAGING_COUNT, token_dtype=self.token_dtype
        )
        return self.current

    def _close_current(self) -> None:
        try:
            self.current.close()
        except OSError as err:
            raise _naming(err, self.current.tmp_path) from err
        self.finished.append(self.current)

    @property
    def num_shards(self) -> int:
        return len(self.finished) + (self.current is not None)

    def finish(self) -> int:
        """Close the last staged shard; returns the number of shards."""
        if self.current is None and not self.finished:
            self._next_shard()  # no record at all: one empty shard keeps the set well-formed
        if self.current is not None:
            self._close_current()
            self.current = None
        return len(self.finished)

    def files(self) -> list[dict[str, Any]]:
        """The manifest's ``files`` of the finished shards, under their final names."""
        count = len(self.finished)
        return [
            {**writer.file.to_json(), "name": records.shard_name(i, count)} for i, writer in enumerate(self.finished)
        ]

    def commit(self) -> None:
        """Replace the directory's old shards by the finished ones."""
        count = len(self.finished)
        clear_source_dir_shards(self.directory)
        for index, writer in enumerate(self.finished):
            os.replace(writer.path, self.directory / records.shard_name(index, count))
        self.staging.rmdir()
        _fsync_directory(self.directory)

    def abort(self) -> None:
        """Delete the staged shards; the directory's old shards stay."""
        if self.current is not None:
            self.current.abort()
            self.current = None
        clear_staging(self.directory)


def clear_source_dir_shards(directory: Path) -> None:
    """Remove the committed shards (and stray temporary shards) of a source directory."""
    for path in directory.iterdir():
        if path.is_file() and (records.SHARD_PATTERN.match(path.name) or path.name.startswith(".shard-")):
            path.unlink()


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` with ``path`` as its file name when it names none."""
    if err.filename is not None:
        return err
    return OSError(err.errno, err.strerror or str(err), str(path)) if err.errno else err


@dataclasses.dataclass
class _SplitWriter:
    name: str
    shards: RollingShards
    documents: int = 0
    tokens: int = 0
    characters: int = 0
    text_bytes: int = 0
    toxicity_sum: float = 0.0
    toxic_documents: int = 0

    def write(self, ids: np.ndarray, meta: dict[str, Any], characters: int, text_bytes: int) -> None:
        self.shards.write(ids, meta)
        self.documents += 1
        self.tokens += int(ids.size)
        self.characters += characters
        self.text_bytes += text_bytes
        if meta.get("toxicity") is not None:
            self.toxicity_sum += meta["toxicity"]
            self.toxic_documents += meta["toxicity"] > 0.5


def build_source(
    inputs: SourceInputs,
    options: ReadOptions,
    out_dir: Path,
    runner: ChunkRunner,
    token_dtype: str,
    *,
    task_chars: int,
    progress: bool,
) -> tuple[dict[str, dict[str, Any]], list[RollingShards]]:
    """Read, encode, score and stage one source (and its held-out split); returns manifest
    entries (without the tokenizer fields) per prepared source name and the staged shards,
    for the caller to ``commit`` once every source is built. On any exception the staged
    shards are deleted and the source's old shards are left as they were."""
    from tqdm import tqdm

    started = time.perf_counter()
    stats = ReadStats()
    fraction = inputs.recipe.valid_fraction
    splits: list[_SplitWriter] = []
    try:
        for name in split_names(inputs.name, inputs.recipe):
            shards = RollingShards(out_dir / name, token_dtype, inputs.recipe.records_per_shard)
            splits.append(_SplitWriter(name, shards))
        flagged = held_out_flags(read_documents(inputs, options, stats), fraction)
        chunks = chunked(flagged, lambda item: item[0].text, task_chars, 4096)
        bar = tqdm(desc=f"prepare {inputs.name}", unit="doc", disable=not progress, mininterval=1)
        with bar:
            for chunk, encoded in runner.map(chunks, lambda c: [d.text for d, _ in c]):
                offsets = np.concatenate([[0], np.cumsum(encoded.lengths)])
                for k, (document, held) in enumerate(chunk):
                    ids = encoded.ids[offsets[k] : offsets[k + 1]]
                    if ids.size == 0:
                        stats.count_drop(inputs.name, DROP_NO_TOKENS)
                        continue
                    split = splits[1] if held else splits[0]
                    meta = _json_safe(document.meta)
                    meta.update(doc_id=document.doc_id, source=split.name, toxicity=None)
                    if encoded.toxicity is not None:
                        meta["toxicity"] = round(float(encoded.toxicity[k]), 6)
                        meta["toxicity_max"] = round(float(encoded.toxicity_max[k]), 6)
                    split.write(ids, meta, len(document.text), int(encoded.text_bytes[k]))
                bar.update(len(chunk))
                bar.set_postfix_str(f"{sum(s.text_bytes for s in splits) / 1e6:.0f} MB", refresh=False)
        for split in splits:
            if split.documents == 0:
                what = "held-out" if split is not splits[0] else "training"
                raise DataError(
                    f"sources.{inputs.name}: no {what} documents "
                    f"({sum(s.documents for s in splits)} documents read, valid_fraction {fraction}); "
                    + ("lower valid_fraction or add documents" if split is not splits[0] else "lower valid_fraction")
                )
        shard_counts = [split.shards.finish() for split in splits]
    except BaseException:
        for split in splits:
            split.shards.abort()
        raise
    seconds = time.perf_counter() - started
    read = stats.to_dict().get(inputs.name, {"documents": 0, "characters": 0, "split": 0, "dropped": {}})
    entries = {}
    for split, shard_count in zip(splits, shard_counts):
        entry: dict[str, Any] = {
            "directory": split.name,
            "num_documents": split.documents,
            "num_tokens": split.tokens,
            "token_dtype": token_dtype,
            "characters": split.characters,
            "text_bytes": split.text_bytes,
            "shards": shard_count,
            "files": split.shards.files(),
            "max_token_id": max((f["max_token_id"] for f in split.shards.files()), default=-1),
        }
        if split.toxic_documents or split.toxicity_sum:
            entry["toxicity"] = {
                "mean": round(split.toxicity_sum / split.documents, 4),
                "share_above_0.5": round(split.toxic_documents / split.documents, 4),
            }
        if split is splits[0]:
            entry.update(
                reader=inputs.recipe.reader,
                seconds=round(seconds, 2),  # both splits
                read=read,
                dropped=read["dropped"],
            )
        else:
            entry["held_out_from"] = inputs.name
        entries[split.name] = entry
    return entries, [split.shards for split in splits]


# ---------------------------------------------------------------------------------------
# The whole dataset
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PrepareResult:
    out_dir: Path
    manifest: dict[str, Any]
    up_to_date: bool  # nothing was (re)built
    built: tuple[str, ...]  # recipe sources (re)built in this run
    reused: tuple[str, ...]  # recipe sources kept from an earlier run
    tokenizer_trained: bool  # a tokenizer was trained in this run
    seconds: float


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def source_problem(out_dir: Path, name: str, entry: Any) -> str | None:
    """Why a previous manifest's entry for source ``name`` cannot be reused as it is on disk
    (None: its shards are the ones it records, checked by size and sha256)."""
    if not isinstance(entry, dict):
        return "no manifest entry"
    if "files" not in entry:
        return "the manifest records no shard checksums (written by an older jaxlm)"
    try:
        info = records.source_info(out_dir / records.MANIFEST_FILE, name, entry, out_dir)
        if info.directory != (out_dir / name).resolve():
            return f"its directory is {entry.get('directory')!r}, not {name!r}"
        records.verify_source(info, checksums=True)
    except (DataError, OSError) as err:
        return " ".join(str(err).split())
    return None


def _tokenizer_file_hash(path: Path) -> str | None:
    if not path.is_file():
        return None
    from jaxlm.tokenizer import Tokenizer, TokenizerError

    try:
        return Tokenizer.load(path).fingerprint()
    except (TokenizerError, OSError):
        return None


def why_not_current(previous: dict[str, Any], fingerprint: str, out_dir: Path) -> str | None:
    """Why the existing dataset is not up to date for ``fingerprint`` (None: it is: same
    fingerprint, every shard verified, the tokenizer file the one recorded)."""
    if previous.get("fingerprint") != fingerprint:
        return "the recipe, its inputs or the versions changed"
    entries = previous.get("sources")
    if not isinstance(entries, dict) or not entries:
        return "the manifest lists no sources"
    for name, entry in entries.items():
        problem = source_problem(out_dir, name, entry)
        if problem is not None:
            return f"source {name}: {problem}"
    if _tokenizer_file_hash(out_dir / TOKENIZER_FILE) != previous.get("tokenizer_sha256"):
        return f"{out_dir / TOKENIZER_FILE} is not the tokenizer the manifest records (tokenizer_sha256)"
    return None


def prepare(
    recipe: Recipe,
    out_dir: str | os.PathLike | None = None,
    *,
    workers: int = 2,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
    task_chars: int = 1_000_000,
) -> PrepareResult:
    """Build (or reuse) the prepared dataset of ``recipe`` in ``out_dir`` (default ``recipe.out``).

    ``workers``: processes that tokenize and score (0: in this process, with the
    tokenizer's own threads). ``data_dir`` overrides ``recipe.data_dir`` and
    ``$JAXLM_DATA_DIR``. ``task_chars``: characters per chunk of work. The output directory
    is locked (``jaxlm.errors.DirectoryLock``) for the whole run: a second prepare into it
    fails with ``LockedError`` naming the first one's pid.
    """
    from jaxlm.paths import data_dir as find_data_dir

    started = time.perf_counter()
    target = out_dir if out_dir is not None else recipe.out
    if target is None:
        raise ConfigError("out: no output directory (give --out DIR, or out: in the recipe)")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"workers: expected a non-negative integer, got {workers!r}")
    out = Path(os.path.expanduser(os.fspath(target))).resolve()
    root_override = data_dir if data_dir is not None else recipe.data_dir

    @functools.cache
    def data_root() -> Path:
        if root_override is not None and not Path(os.path.expanduser(os.fspath(root_override))).is_dir():
            raise DataError(f"data_dir: {os.fspath(root_override)} is not a directory (expected the corpora root)")
        return find_data_dir(None if root_override is None else os.path.expanduser(os.fspath(root_override))).resolve()

    resolved = {name: resolve_source(name, source, data_root) for name, source in recipe.sources.items()}
    inputs = {name: input_fingerprints(r, recipe.fingerprint) for name, r in resolved.items()}
    versions = output_versions(recipe)
    given = load_tokenizer(recipe.tokenizer.path) if recipe.tokenizer.path is not None else None
    recipe_data = to_dict(dataclasses.replace(recipe, out=None, data_dir=None))
    fingerprint = _digest(
        {
            "recipe": recipe_data,
            "inputs": inputs,
            "versions": versions,
            "tokenizer": given.fingerprint() if given is not None else None,
        }
    )
    plan = _Plan(recipe, out, resolved, inputs, versions, fingerprint, given, data_root, workers, progress, task_chars)
    with DirectoryLock(out, "data prepare"):
        return _prepare_locked(plan, started)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What ``prepare`` resolved before taking the output directory's lock."""

    recipe: Recipe
    out: Path
    resolved: dict[str, SourceInputs]
    inputs: dict[str, list[dict[str, Any]]]
    versions: dict[str, Any]
    fingerprint: str
    given_tokenizer: Any  # a Tokenizer (recipe.tokenizer.path) or None
    data_root: Callable[[], Path]
    workers: int
    progress: bool
    task_chars: int


def _prepare_locked(plan: _Plan, started: float) -> PrepareResult:
    recipe, out, resolved, inputs, versions = plan.recipe, plan.out, plan.resolved, plan.inputs, plan.versions
    manifest_path = out / records.MANIFEST_FILE
    previous_path = out / PREVIOUS_MANIFEST
    current = _read_json(manifest_path)
    if current is not None:
        reason = why_not_current(current, plan.fingerprint, out)
        if reason is None:
            log.info("%s: up to date (fingerprint %s)", out, plan.fingerprint[:12])
            return PrepareResult(out, current, True, (), tuple(recipe.sources), False, time.perf_counter() - started)
        log.info("%s: not up to date: %s", out, reason)
    previous = current if current is not None else _read_json(previous_path)
    previous_sources = previous.get("sources", {}) if previous else {}
    if not isinstance(previous_sources, dict):
        previous_sources = {}

    # Until the commit below, nothing the existing dataset consists of is touched: the new
    # tokenizer and shards are staged under hidden names, deleted again on any error.
    tokenizer_file = out / TOKENIZER_FILE
    staged_tokenizer = out / STAGED_TOKENIZER
    pending: list[RollingShards] = []
    staged_tokenizer.unlink(missing_ok=True)  # left by a killed run
    try:
        tokenizer, trained, sample_fp, sample_chars = _choose_tokenizer(plan, previous, staged_tokenizer)
        tokenizer_hash = tokenizer.fingerprint()
        token_dtype = records.token_dtype_for_vocab(tokenizer.vocab_size)
        common = {"vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id}
        source_fps = {
            name: _digest(
                {
                    "source": to_dict(source),
                    "read": to_dict(source.read or recipe.read),
                    "toxicity": to_dict(recipe.toxicity),
                    "inputs": inputs[name],
                    "tokenizer": tokenizer_hash,
                    "versions": versions,
                }
            )
            for name, source in recipe.sources.items()
        }
        entries: dict[str, dict[str, Any]] = {}
        built: list[str] = []
        reused: list[str] = []
        todo = []
        for name, source in recipe.sources.items():
            reason = _reuse_problem(out, split_names(name, source), previous_sources, source_fps[name])
            if reason is None:
                log.info("%s: reusing source %s (shards verified)", out, name)
                for n in split_names(name, source):
                    clear_staging(out / n)  # left by a killed run
                entries.update({n: dict(previous_sources[n]) for n in split_names(name, source)})
                reused.append(name)
            else:
                log.info("%s: building source %s: %s", out, name, reason)
                todo.append(name)
        if todo:
            with ChunkRunner(plan.workers, tokenizer.to_json(), token_dtype, recipe.toxicity) as runner:
                for name in todo:
                    source = recipe.sources[name]
                    made, staged = build_source(
                        resolved[name], source.read or recipe.read, out, runner, token_dtype,
                        task_chars=plan.task_chars, progress=plan.progress,
                    )
                    pending += staged
                    for entry in made.values():
                        entry["fingerprint"] = source_fps[name]
                    made[name]["inputs"] = inputs[name]
                    entries.update(made)
                    built.append(name)
    except BaseException:
        for shards in pending:
            shards.abort()
        staged_tokenizer.unlink(missing_ok=True)
        raise

    # Commit: from here on no manifest claims the directory is complete (the previous one,
    # moved aside, still tells a re-run which sources can be reused) until the new one is written.
    if manifest_path.exists():
        os.replace(manifest_path, previous_path)
    if staged_tokenizer.exists():
        os.replace(staged_tokenizer, tokenizer_file)
    for shards in pending:
        shards.commit()
    wanted = {n for name, source in recipe.sources.items() for n in split_names(name, source)}
    for stale in set(previous_sources) - wanted:  # sources dropped from the recipe: their shards go
        entry = previous_sources[stale]
        directory = out / str(entry.get("directory", stale) if isinstance(entry, dict) else stale)
        if directory.resolve().parent == out:
            clear_source_dir(directory)
    ordered = {n: {**common, **entries[n]} for name, s in recipe.sources.items() for n in split_names(name, s)}

    seconds = time.perf_counter() - started
    built_names = {n for name in built for n in split_names(name, recipe.sources[name])}
    text_bytes = sum(e.get("text_bytes", 0) for n, e in ordered.items() if n in built_names)
    build_seconds = sum(e.get("seconds", 0.0) for n, e in ordered.items() if n in built)
    extra = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": plan.fingerprint,
        "tokenizer_sha256": tokenizer_hash,
        "tokenizer_sample_fingerprint": sample_fp,
        "tokenizer_info": {
            **common,
            "origin": recipe.tokenizer.path or "trained",
            "sample_characters": sample_chars,
        },
        "toxicity": {
            "enabled": recipe.toxicity.enabled,
            "scorer": TOXICITY_SCORER if recipe.toxicity.enabled else None,
            "chunk_chars": recipe.toxicity.chunk_chars,
            "fields": "toxicity: character-weighted mean of chunk scores; toxicity_max: highest chunk score",
        },
        "dropped": _sum_drops(ordered.values()),
        "data_dir": os.fspath(plan.data_root()) if any(r.root is not None for r in resolved.values()) else None,
        "recipe": to_dict(recipe),
        "versions": {**environment_versions(), **versions},
        "run": {
            "seconds": round(seconds, 2),
            "workers": plan.workers,
            "built": built,
            "reused": reused,
            "tokenizer_trained": trained,
            "text_megabytes": round(text_bytes / 1e6, 3),
            "megabytes_per_second": round(text_bytes / 1e6 / build_seconds, 3) if build_seconds else None,
            "megabytes_per_second_with_tokenizer": round(text_bytes / 1e6 / seconds, 3) if text_bytes else None,
        },
    }
    records.write_manifest(out, ordered, tokenizer=TOKENIZER_FILE, extra=extra)
    previous_path.unlink(missing_ok=True)
    manifest = _read_json(manifest_path) or {}
    return PrepareResult(out, manifest, False, tuple(built), tuple(reused), trained, seconds)


def _reuse_problem(out: Path, names: Sequence[str], previous_sources: dict[str, Any], fingerprint: str) -> str | None:
    """Why a recipe source's prepared splits ``names`` cannot be reused (None: they can)."""
    for name in names:
        entry = previous_sources.get(name)
        if not isinstance(entry, dict):
            return f"{name}: no entry in the previous manifest"
        if entry.get("fingerprint") != fingerprint:
            return f"{name}: its recipe entry, inputs, tokenizer or versions changed"
        problem = source_problem(out, name, entry)
        if problem is not None:
            return f"{name}: {problem}"
    return None


def _choose_tokenizer(plan: _Plan, previous: dict[str, Any] | None, staged: Path):
    """``(tokenizer, trained, sample fingerprint, sample characters)``: the recipe's given
    tokenizer, the dataset's own when its sample is unchanged and the file is the one the
    previous manifest records, or a newly trained one. A new or given one is saved to
    ``staged`` (installed as ``tokenizer.json`` at commit) and reloaded from it."""
    recipe, out = plan.recipe, plan.out
    tokenizer_file = out / TOKENIZER_FILE
    sample_fp = sample_chars = None
    trained = False
    if plan.given_tokenizer is not None:
        tokenizer = plan.given_tokenizer
    else:
        sample_fp = tokenizer_sample_fingerprint(recipe, plan.inputs)
        recorded = previous.get("tokenizer_sha256") if previous else None
        on_disk = _tokenizer_file_hash(tokenizer_file) if previous else None
        if previous is not None and on_disk != recorded:
            log.info("%s: not the tokenizer the manifest records (tokenizer_sha256): training again", tokenizer_file)
        if previous is not None and previous.get("tokenizer_sample_fingerprint") == sample_fp and on_disk == recorded:
            tokenizer = load_tokenizer(os.fspath(tokenizer_file))
            info = previous.get("tokenizer_info")
            sample_chars = info.get("sample_characters") if isinstance(info, dict) else None
            return tokenizer, False, sample_fp, sample_chars
        tokenizer, sample_chars = train_tokenizer(recipe, plan.resolved, plan.progress)
        trained = True
    tokenizer.save(staged)
    reloaded = load_tokenizer(os.fspath(staged))
    if (reloaded.eos_id, reloaded.pad_id) != (tokenizer.eos_id, tokenizer.pad_id):
        raise DataError(
            f"{recipe.tokenizer.path}: its end-of-document/padding tokens ({tokenizer.eos_id}/{tokenizer.pad_id}) come "
            f"from side files that {TOKENIZER_FILE} alone does not carry ({reloaded.eos_id}/{reloaded.pad_id} when "
            "reloaded); use a tokenizer.json whose special tokens have standard names"
        )
    return tokenizer, trained, sample_fp, sample_chars


def _sum_drops(entries: Iterable[dict[str, Any]]) -> dict[str, int]:
    total: collections.Counter = collections.Counter()
    for entry in entries:
        total.update(entry.get("dropped", {}))
    return dict(sorted(total.items()))
