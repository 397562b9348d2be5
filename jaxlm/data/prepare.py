"""Prepare: raw corpora -> chain (filters, scores, transforms) -> tokenized ArrayRecord shards + manifest.

``prepare(recipe, out_dir)`` (CLI: ``jaxlm data prepare RECIPE.yaml``) reads each source of a
``Recipe`` (``data/recipe``) with its ``jaxlm.data.sources`` reader (``data/inputs``), trains a
byte-level BPE on a seeded sample of every source (or loads a given ``tokenizer.json``) and
the recipe's quality classifiers (``data/classifiers``), transforms, tokenizes and scores every
document in worker processes (``data/encode``), applies each source's filter chain
(``data/chain``), and writes the prepared dataset that ``jaxlm.data.pipeline`` reads
(``data/shards``, ``data/records``)::

    <out>/manifest.json          written last, atomically (see below)
    <out>/tokenizer.json         the tokenizer the documents were encoded with
    <out>/<source>/shard-*.array_record
    <out>/<source>@valid/...     held-out documents, when ``valid_fraction > 0``

Records (``jaxlm.data.records``) hold a document's token ids, without an end-of-document
id (the pipeline appends one when packing), and its metadata: ``doc_id``, ``source``, the
reader's metadata (author/title, thread/time/country, file/line, ...), ``toxicity`` and
``toxicity_max``, and what the chain adds (``quality.<name>``, ``quality.<name>.percentile``,
``permuted``).

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
import dataclasses
import datetime
import functools
import json
import logging
import math
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from jaxlm.config import ConfigError, to_dict
from jaxlm.data import DataError, records
from jaxlm.data import classifiers as classifiers_lib
from jaxlm.data.chain import (
    SourceChain,
    percentile_key,
    permute_tokens,
    permuted_documents,
    quality_key,
    source_seed,
)
from jaxlm.data.classifiers import PreparedClassifier, prepare_classifiers
from jaxlm.data.encode import (
    TOXICITY_PACKAGE,
    TOXICITY_SCORER,
    ChunkRunner,
    SourceWork,
    WorkItem,
    chunked,
    hook_fingerprint,
)
from jaxlm.data.inputs import (
    SourceInputs,
    digest,
    held_out_flags,
    input_fingerprints,
    read_documents,
    resolve_source,
)
from jaxlm.data.recipe import Recipe, split_names
from jaxlm.data.shards import CandidateSpool, RollingShards, clear_source_dir, clear_staging
from jaxlm.data.sources import Document, ReadOptions, ReadStats
from jaxlm.errors import DirectoryLock

log = logging.getLogger(__name__)

PREPARE_VERSION = 1  # bump when the same inputs and recipe would give different records
TOKENIZER_FILE = "tokenizer.json"
PREVIOUS_MANIFEST = ".manifest.previous.json"
DROP_NO_TOKENS = "no_tokens"  # a non-empty text that encodes to no ids (not expected with byte-level BPE)
SAMPLE_PIECE_CHARS = 10_000  # tokenizer sample: reservoir over pieces of about this many characters
STAGED_TOKENIZER = ".tokenizer.json.staged"  # a new tokenizer until the run commits


# ---------------------------------------------------------------------------------------
# Versions (part of every fingerprint)
# ---------------------------------------------------------------------------------------


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
    steps = {step.kind for source in recipe.sources.values() for step in source.filters}
    if "near_dedup" in steps:
        versions["datasketch"] = _version("datasketch")
    if recipe.classifier_names():
        versions["fasttext-numpy2"] = _version("fasttext-numpy2")
        versions["scikit-learn"] = _version("scikit-learn")
    return versions


def environment_versions() -> dict[str, Any]:
    names = ("jaxlm", "tokenizers", TOXICITY_PACKAGE, "scikit-learn", "array-record", "grain", "numpy")
    return {"python": platform.python_version(), **{name: _version(name) for name in names}}


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
    rng = np.random.default_rng([seed, source_seed(source)])
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
    return digest(
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
    scores: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # per score key, of written documents

    def write(self, ids: np.ndarray, meta: dict[str, Any], characters: int, text_bytes: int) -> None:
        self.shards.write(ids, meta)
        self.documents += 1
        self.tokens += int(ids.size)
        self.characters += characters
        self.text_bytes += text_bytes
        if meta.get("toxicity") is not None:
            self.toxicity_sum += meta["toxicity"]
            self.toxic_documents += meta["toxicity"] > 0.5
        for key, value in meta.items():
            if key.startswith("quality.") and not key.endswith(".percentile") and value is not None:
                self.scores.setdefault(key, []).append(value)

    def score_summaries(self) -> dict[str, Any]:
        from jaxlm.data.quality import score_summary

        return {key: score_summary(np.asarray(values)) for key, values in sorted(self.scores.items())}


@dataclasses.dataclass(frozen=True)
class _Candidate:
    """A spooled document: its split, how much of the chain applies to it, its sizes."""

    split: int
    filtered: bool
    transformed: bool
    characters: int
    text_bytes: int


def build_source(
    inputs: SourceInputs,
    options: ReadOptions,
    out_dir: Path,
    runner: ChunkRunner,
    token_dtype: str,
    *,
    classifiers: dict[str, PreparedClassifier] | None = None,
    task_chars: int,
    progress: bool,
) -> tuple[dict[str, dict[str, Any]], list[RollingShards]]:
    """Read, transform, encode, score, filter and stage one source (and its held-out split);
    returns manifest entries (without the tokenizer fields) per prepared source name and the
    staged shards, for the caller to ``commit`` once every source is built. A chain with
    whole-source steps (quality selection, Perm(k)) spools the documents that pass the
    per-document filters (``shards.CandidateSpool``) and writes the selected ones in a second
    pass, in their original order. On any exception the staged files are deleted and the
    source's old shards are left as they were."""
    from tqdm import tqdm

    started = time.perf_counter()
    stats = ReadStats()
    recipe = inputs.recipe
    fraction = recipe.valid_fraction
    chain = SourceChain(recipe)
    used = {step.quality.classifier for step in recipe.filters if step.quality is not None}
    loaded = tuple((n, c.load_path, c.positive_label) for n, c in (classifiers or {}).items() if n in used)
    work = SourceWork(recipe.filters, chain.hooks, loaded)
    splits: list[_SplitWriter] = []
    spool: CandidateSpool | None = None
    candidates: list[_Candidate] = []
    candidate_scores: dict[str, list[float]] = {name: [] for name in sorted(used)}  # of filtered candidates
    try:
        for name in split_names(inputs.name, recipe):
            shards = RollingShards(out_dir / name, token_dtype, recipe.records_per_shard)
            splits.append(_SplitWriter(name, shards))
        if chain.needs_all_documents:
            spool = CandidateSpool(out_dir / inputs.name, token_dtype)
        flagged = held_out_flags(read_documents(inputs, options, stats), fraction)
        chunks = chunked(flagged, lambda item: item[0].text, task_chars, 4096)

        def items_of(chunk) -> list[WorkItem]:
            return [
                WorkItem(d.text, d.meta if chain.hooks else {}, _chain_applies(held, recipe.held_out_chain)[1])
                for d, held in chunk
            ]

        bar = tqdm(desc=f"prepare {inputs.name}", unit="doc", disable=not progress, mininterval=1)
        with bar:
            for chunk, encoded in runner.map(chunks, items_of, work):
                offsets = np.concatenate([[0], np.cumsum(encoded.lengths)])
                for k, (document, held) in enumerate(chunk):
                    filtered, transformed = _chain_applies(held, recipe.held_out_chain)
                    hook_drop = encoded.hook_drops[k]
                    if transformed and chain.hooks:
                        chain.count_hooks(hook_drop)
                    if hook_drop is not None:
                        stats.count_drop(inputs.name, hook_drop)
                        continue
                    ids = encoded.ids[offsets[k] : offsets[k + 1]]
                    if ids.size == 0:
                        stats.count_drop(inputs.name, DROP_NO_TOKENS)
                        continue
                    split_index = 1 if held else 0
                    meta = _json_safe(document.meta)
                    meta.update(doc_id=document.doc_id, source=splits[split_index].name, toxicity=None)
                    if encoded.toxicity is not None:
                        meta["toxicity"] = round(float(encoded.toxicity[k]), 6)
                        meta["toxicity_max"] = round(float(encoded.toxicity_max[k]), 6)
                    for i, step in enumerate(recipe.filters):
                        if step.quality is not None:
                            meta[quality_key(step.quality.classifier)] = round(float(encoded.features[i][k]), 6)
                    if filtered:
                        reason = chain.verdict(encoded.features, k, document.doc_id, meta)
                        if reason is not None:
                            stats.count_drop(inputs.name, reason)
                            continue
                    characters, text_bytes = int(encoded.characters[k]), int(encoded.text_bytes[k])
                    if spool is None:
                        splits[split_index].write(ids, meta, characters, text_bytes)
                        continue
                    spool.append(ids, meta)
                    candidates.append(_Candidate(split_index, filtered, transformed, characters, text_bytes))
                    if filtered:
                        for name in candidate_scores:
                            candidate_scores[name].append(meta[quality_key(name)])
                bar.update(len(chunk))
                bar.set_postfix_str(f"{sum(s.text_bytes for s in splits) / 1e6:.0f} MB", refresh=False)
        if spool is not None:
            _write_selected(inputs.name, chain, spool, candidates, candidate_scores, splits, stats)
            spool.remove()
        for split in splits:
            if split.documents == 0:
                what = "held-out" if split is not splits[0] else "training"
                raise DataError(
                    f"sources.{inputs.name}: no {what} documents "
                    f"({sum(s.documents for s in splits)} documents {'kept' if recipe.filters else 'read'}, "
                    f"valid_fraction {fraction}); "
                    + ("lower valid_fraction or add documents" if split is not splits[0] else "lower valid_fraction")
                    + (" (or loosen the filters)" if recipe.filters else "")
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
        if split.scores:
            entry["scores"] = split.score_summaries()
        if split is splits[0]:
            entry.update(
                reader=recipe.reader,
                seconds=round(seconds, 2),  # both splits
                read=read,
                dropped=read["dropped"],
            )
            if recipe.filters or recipe.transforms:
                entry["chain"] = chain.to_json()
        else:
            entry["held_out_from"] = inputs.name
        entries[split.name] = entry
    return entries, [split.shards for split in splits]


def _chain_applies(held: bool, held_out_chain: str) -> tuple[bool, bool]:
    """``(filtered, transformed)``: whether a document goes through the filters and the transforms."""
    if not held:
        return True, True
    return held_out_chain == "all", held_out_chain != "none"


def _write_selected(
    source: str,
    chain: SourceChain,
    spool: CandidateSpool,
    candidates: list[_Candidate],
    candidate_scores: dict[str, list[float]],
    splits: list[_SplitWriter],
    stats: ReadStats,
) -> None:
    """The second pass: whole-source selection, percentiles and Perm(k) over the spooled
    candidates, then the kept ones written in their original order."""
    filtered = np.asarray([c.filtered for c in candidates], bool)
    scores = {name: np.asarray(values, np.float64) for name, values in candidate_scores.items()}
    kept_filtered, percentiles = chain.select(int(filtered.sum()), scores)
    kept = np.ones(len(candidates), bool)
    kept[filtered] = kept_filtered
    for i in chain.ranking:
        reason = quality_key(chain.filters[i].quality.classifier)
        if chain.counts[i].dropped[reason]:
            stats.count_drop(source, reason, chain.counts[i].dropped[reason])
    full_percentiles = {}
    for name, values in percentiles.items():
        full = np.full(len(candidates), np.nan)
        full[filtered] = values
        full_percentiles[name] = full
    permuted = np.zeros(len(candidates), bool)
    if chain.perm is not None:
        for split in range(len(splits)):
            members = np.flatnonzero(kept & np.asarray([c.split == split and c.transformed for c in candidates], bool))
            permuted[members] = permuted_documents(len(members), chain.perm, source, split)
            chain.count_permuted(len(members), int(permuted[members].sum()))
    for index, ((ids, meta), candidate) in enumerate(zip(spool, candidates)):
        if not kept[index]:
            continue
        for name, values in full_percentiles.items():
            if not np.isnan(values[index]):
                meta[percentile_key(name)] = round(float(values[index]), 6)
        if chain.perm is not None and candidate.transformed:
            meta["permuted"] = bool(permuted[index])
            if permuted[index]:
                ids = permute_tokens(ids, chain.perm, source, index)
        splits[candidate.split].write(ids, meta, candidate.characters, candidate.text_bytes)


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
    contents = {
        "recipe": recipe_data,
        "inputs": inputs,
        "versions": versions,
        "tokenizer": given.fingerprint() if given is not None else None,
    }
    chain_inputs = _chain_inputs(recipe, data_root)
    if chain_inputs:
        contents["chain_inputs"] = chain_inputs
    fingerprint = digest(contents)
    plan = _Plan(recipe, out, resolved, inputs, versions, fingerprint, given, data_root, workers, progress, task_chars)
    with DirectoryLock(out, "data prepare"):
        return _prepare_locked(plan, started)


def _chain_inputs(recipe: Recipe, data_root: Callable[[], Path]) -> dict[str, Any]:
    """What the chains read besides the sources: the HQ documents of trained classifiers, the
    files of given ones, the source of every hook's module (empty without such steps)."""
    found: dict[str, Any] = {}
    for name in recipe.classifier_names():
        spec = recipe.classifiers[name]
        if spec.path is not None:
            path = Path(os.path.expanduser(spec.path))
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            found[f"classifiers.{name}"] = [
                {"path": f.name, "sha256": records.file_sha256(f)} for f in files if f.exists()
            ] or os.fspath(path)
        else:
            positive = resolve_source(f"classifiers.{name}.positive", spec.positive, data_root)
            found[f"classifiers.{name}"] = input_fingerprints(positive, recipe.fingerprint)
    for source in recipe.sources.values():
        for step in source.transforms:
            if step.hook is not None:
                found[f"hook {step.hook.function}"] = hook_fingerprint(step.hook)
    return found


def _source_fingerprint(
    name: str, recipe: Recipe, inputs: list[dict[str, Any]], tokenizer_hash: str, versions: dict[str, Any],
    classifiers: dict[str, PreparedClassifier],
) -> str:
    """What one source's records depend on: its recipe entry (chain included), read options,
    scorer, inputs, tokenizer, versions, and the classifiers and hooks of its chain."""
    source = recipe.sources[name]
    contents: dict[str, Any] = {
        "source": to_dict(source),
        "read": to_dict(source.read or recipe.read),
        "toxicity": to_dict(recipe.toxicity),
        "inputs": inputs,
        "tokenizer": tokenizer_hash,
        "versions": versions,
    }
    used = [step.quality.classifier for step in source.filters if step.quality is not None]
    hooks = [step.hook for step in source.transforms if step.hook is not None]
    if used or hooks:
        contents["chain"] = {
            "classifiers": {n: classifiers[n].fingerprint for n in used},
            "hooks": {hook.function: hook_fingerprint(hook) for hook in hooks},
        }
    return digest(contents)


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
    classifiers: dict[str, PreparedClassifier] = {}
    staged_tokenizer.unlink(missing_ok=True)  # left by a killed run
    try:
        tokenizer, trained, sample_fp, sample_chars = _choose_tokenizer(plan, previous, staged_tokenizer)
        tokenizer_hash = tokenizer.fingerprint()
        token_dtype = records.token_dtype_for_vocab(tokenizer.vocab_size)
        common = {"vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id}
        classifiers = prepare_classifiers(recipe, out, resolved, plan.data_root, versions, plan.progress)
        source_fps = {
            name: _source_fingerprint(name, recipe, inputs[name], tokenizer_hash, versions, classifiers)
            for name in recipe.sources
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
                        classifiers=classifiers, task_chars=plan.task_chars, progress=plan.progress,
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
        classifiers_lib.abort(classifiers)
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
    classifiers_lib.commit(classifiers)
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
        **({"classifiers": {n: c.info for n, c in classifiers.items()}} if classifiers else {}),
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
