"""Labelled text sets for probing: ToxiGen prompts, Davidson tweets, RealToxicityPrompts.

Every loader returns a ``LabelledSet`` (texts, binary labels with 1 = toxic, optional
per-text groups, a name) read from the data directory (``jaxlm.paths``, ``$JAXLM_DATA_DIR``).
``load_labelled("toxigen:limit=2000:balanced=true:seed=1")`` parses a ``--data`` spec
(see ``parse_data_spec``) and applies the requested sampling.

Layouts below the data directory (plain or ``.gz`` files):
  ``labelled/toxigen/prompts/{hate,neutral}_<group>_1k.txt``  one prompt per line, sentences
      joined by a literal backslash-n, each starting with ``- `` (hate -> 1, neutral -> 0);
      each sentence is in a fixed part (``toxigen_split``): probes read the ``probe`` part,
      evaluation prompts are built from the ``eval`` part
  ``labelled/davidson/labeled_data.csv``  columns ``class`` (0 hate, 1 offensive, 2 neither)
      and ``tweet``
  ``eval/rtp/{toxic,nontoxic}.jsonl``  RTP records with ``prompt``/``continuation`` objects
      holding ``text`` and the Perspective ``toxicity`` score
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import math
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from jaxlm.errors import JaxlmError
from jaxlm.paths import MissingDataError, dataset_path
from jaxlm.paths import data_dir as resolve_data_dir

TOXIGEN_DIR = "labelled/toxigen/prompts"
DAVIDSON_FILE = "labelled/davidson/labeled_data.csv"
RTP_DIR = "eval/rtp"
DAVIDSON_CLASS_NAMES = {0: "hate", 1: "offensive", 2: "neither"}


# How each labelled set's labels arise (the report and docs say it with every number).
LABEL_SOURCES = {
    "toxigen": "ToxiGen generation-prompt sentences, labelled by the file they come from (hate_<group> = 1, "
               "neutral_<group> = 0): machine-generated prompt material, not the human-annotated ToxiGen set",
    "davidson": "Davidson et al. (2017) tweets, labelled by their crowd-sourced majority class "
                "(hate or offensive = 1, neither = 0 by default)",
    "rtp": "RealToxicityPrompts prompt and continuation texts, labelled by their Perspective API toxicity "
           "(>= 0.5 = 1, < 0.2 = 0 by default; in between left out)",
}


class LabelledDataError(JaxlmError, ValueError):
    """A labelled data file or ``--data`` spec is malformed; the message names it."""


@dataclasses.dataclass(frozen=True)
class LabelledSet:
    """Texts with binary labels (1 = the concept, e.g. toxic), optional groups, and a name."""

    texts: tuple[str, ...]
    labels: np.ndarray  # [N] int32 in {0, 1}
    groups: tuple[str, ...] | None = None
    name: str = "labelled"

    def __post_init__(self) -> None:
        texts = tuple(self.texts)
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or len(labels) != len(texts):
            raise LabelledDataError(f"{self.name}: {len(texts)} texts but labels of shape {labels.shape}")
        if labels.size and not np.isin(labels, (0, 1)).all():
            raise LabelledDataError(f"{self.name}: labels must be 0 or 1, got {sorted(set(labels.tolist()))}")
        groups = None if self.groups is None else tuple(self.groups)
        if groups is not None and len(groups) != len(texts):
            raise LabelledDataError(f"{self.name}: {len(texts)} texts but {len(groups)} groups")
        object.__setattr__(self, "texts", texts)
        object.__setattr__(self, "labels", labels.astype(np.int32))
        object.__setattr__(self, "groups", groups)

    def __len__(self) -> int:
        return len(self.texts)

    def class_counts(self) -> dict[int, int]:
        return {label: int(np.sum(self.labels == label)) for label in (0, 1)}

    def subset(self, indices: Sequence[int] | np.ndarray, name: str | None = None) -> "LabelledSet":
        idx = np.asarray(indices, dtype=np.int64)
        return LabelledSet(
            texts=tuple(self.texts[i] for i in idx),
            labels=self.labels[idx],
            groups=None if self.groups is None else tuple(self.groups[i] for i in idx),
            name=name or self.name,
        )

    def sample(self, limit: int | None = None, *, balanced: bool = False, seed: int = 0) -> "LabelledSet":
        """A seeded subset in the original order.

        ``balanced``: equal numbers of each class (``limit // 2`` each, or the minority
        class size when that is smaller or ``limit`` is None). Otherwise ``limit`` texts
        drawn uniformly (all of them when ``limit`` is None or not smaller than the set).
        """
        rng = np.random.default_rng(seed)
        if balanced:
            per_class = min(self.class_counts().values())
            if limit is not None:
                per_class = min(per_class, limit // 2)
            chosen = [rng.choice(np.flatnonzero(self.labels == c), per_class, replace=False) for c in (0, 1)]
            indices = np.concatenate(chosen)
        elif limit is not None and limit < len(self):
            indices = rng.choice(len(self), limit, replace=False)
        else:
            return self
        return self.subset(np.sort(indices))


# ---------------------------------------------------------------------------------------
# File helpers
# ---------------------------------------------------------------------------------------


def open_text(path: str | os.PathLike) -> io.TextIOBase:
    """Open a UTF-8 text file, gzip-compressed or not (by the ``.gz`` suffix)."""
    path = Path(path)
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _find(relative: str, data_dir: str | os.PathLike | None) -> Path:
    """``relative`` or ``relative + ".gz"`` below the data directory."""
    root = resolve_data_dir(data_dir)
    for candidate in (root / relative, root / (relative + ".gz")):
        if candidate.is_file():
            return candidate
    raise MissingDataError(f"dataset {relative!r} (or {relative + '.gz'!r}) not found under {root}")


def _dedupe(rows: list[tuple[str, int, str]], name: str) -> LabelledSet:
    """Keep each text once (its first group); drop texts that occur with both labels."""
    first: dict[str, tuple[int, str]] = {}
    conflicting: set[str] = set()
    for text, label, group in rows:
        if text in first:
            if first[text][0] != label:
                conflicting.add(text)
            continue
        first[text] = (label, group)
    kept = [(t, lg) for t, lg in first.items() if t not in conflicting]
    return LabelledSet(
        texts=tuple(t for t, _ in kept),
        labels=np.array([lg[0] for _, lg in kept], dtype=np.int32),
        groups=tuple(lg[1] for _, lg in kept),
        name=name,
    )


def _require_both_classes(data: LabelledSet, where: str) -> LabelledSet:
    counts = data.class_counts()
    if min(counts.values()) == 0:
        raise LabelledDataError(f"{where}: expected texts of both classes, got counts {counts}")
    return data


# ---------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------

TOXIGEN_FILE = re.compile(r"^(hate|neutral)_(.+)_1k\.txt(\.gz)?$")


def toxigen_files(folder: Path) -> list[tuple[Path, str, str]]:
    """``(path, kind, group)`` of each ToxiGen prompt file ``{hate,neutral}_<group>_1k.txt[.gz]``
    in ``folder``, sorted by name (none if ``folder`` is not a directory)."""
    if not folder.is_dir():
        return []
    matches = ((path, TOXIGEN_FILE.match(path.name)) for path in sorted(folder.iterdir()))
    return [(path, match.group(1), match.group(2)) for path, match in matches if match]


def toxigen_parts(line: str) -> list[str]:
    """The statements of one ToxiGen prompt line as written (``- `` bullets kept): the line split
    on its literal ``\\n`` separators, each part stripped, empty parts dropped."""
    parts = (part.strip() for part in line.strip().split("\\n"))
    return [part for part in parts if part]


def split_toxigen_prompt(line: str) -> list[str]:
    """Sentences of one ToxiGen prompt line: split on literal ``\\n``, strip the ``- `` bullet."""
    sentences = (part[1:].strip() if part.startswith("-") else part for part in toxigen_parts(line))
    return [sentence for sentence in sentences if sentence]


def toxigen_prompt_text(line: str) -> str:
    """One ToxiGen prompt line -> the model input: its statements on their own lines, ending in a
    lone ``-`` for the model to continue. Every statement must start with ``-``."""
    parts = toxigen_parts(line)
    if not parts or not all(part.startswith("-") for part in parts):
        raise LabelledDataError(f"not a ToxiGen prompt (statements must start with '-'): {line[:80]!r}")
    if parts[-1] != "-":
        parts.append("-")
    return "\n".join(parts[:-1]) + "\n-"


# ToxiGen prompt sentences are split once into the part probes are trained on ("probe") and the
# part evaluation prompts are built from ("eval"), so no probed sentence is in an evaluation
# prompt. The files repeat few unique sentences (5 to 113 each), so a plain hash split would leave
# some files without any held-out sentence: instead each file holds out the
# ``ceil(TOXIGEN_EVAL_FRACTION * n)`` of its ``n`` unique sentences that rank first by a salted
# hash, and a sentence held out by any file is "eval" everywhere. Changing the rule changes every
# probe and every ToxiGen evaluation: bump the version.
TOXIGEN_PARTS = ("probe", "eval")
TOXIGEN_SPLIT_VERSION = 2
TOXIGEN_EVAL_FRACTION = 0.3


def toxigen_rank(sentence: str) -> float:
    """A sentence's place in [0, 1) in the held-out order: the sha256 of the versioned salt and
    its text (as ``split_toxigen_prompt`` returns it)."""
    import hashlib

    salted = f"toxigen-split/{TOXIGEN_SPLIT_VERSION}/{sentence}".encode("utf-8")
    return int.from_bytes(hashlib.sha256(salted).digest()[:8], "big") / 2.0**64


def toxigen_file_sentences(path: Path) -> list[str]:
    """The unique sentences of one ToxiGen prompt file, in order of first appearance; a prompt line
    whose statements do not start with ``-`` is a ``LabelledDataError`` naming the file and line."""
    seen: dict[str, None] = {}
    try:
        with open_text(path) as handle:
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    toxigen_prompt_text(line)
                except LabelledDataError as err:
                    raise LabelledDataError(f"{path}:{line_no}: {err}") from None
                seen.update((sentence, None) for sentence in split_toxigen_prompt(line))
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise LabelledDataError(f"{path}: cannot read ToxiGen prompts ({err})") from None
    return list(seen)


def toxigen_eval_set(sentences_by_file: Sequence[Sequence[str]]) -> frozenset[str]:
    """The held-out ("eval") sentences: from each file's unique sentences the
    ``ceil(TOXIGEN_EVAL_FRACTION * n)`` first by ``toxigen_rank``, united over the files."""
    held_out: set[str] = set()
    for sentences in sentences_by_file:
        unique = sorted(set(sentences), key=toxigen_rank)
        held_out.update(unique[: math.ceil(TOXIGEN_EVAL_FRACTION * len(unique))])
    return frozenset(held_out)


def toxigen_split(folder: Path) -> tuple[dict[Path, list[str]], frozenset[str]]:
    """Each prompt file's unique sentences and the held-out set over every file in ``folder`` (the
    split never depends on which groups a caller reads)."""
    by_file = {path: toxigen_file_sentences(path) for path, _, _ in toxigen_files(folder)}
    return by_file, toxigen_eval_set(list(by_file.values()))


def load_toxigen(
    data_dir: str | os.PathLike | None = None, groups: Sequence[str] | None = None, part: str = "probe"
) -> LabelledSet:
    """Unique ToxiGen prompt sentences: ``hate_*`` files -> 1, ``neutral_*`` -> 0; group from the name.

    ``part``: ``"probe"`` (default; sentences no ToxiGen evaluation prompt contains), ``"eval"``
    (the held-out sentences evaluation prompts are built from) or ``"all"`` (``toxigen_split``).
    """
    if part not in (*TOXIGEN_PARTS, "all"):
        raise LabelledDataError(f"toxigen: part must be one of probe, eval, all; got {part!r}")
    folder = dataset_path(TOXIGEN_DIR, data_dir)
    files = toxigen_files(folder)
    if not files:
        raise MissingDataError(f"{folder}: no ToxiGen prompt files (expected hate_<group>_1k.txt[.gz])")
    known = sorted({group for _, _, group in files})
    if groups is not None:
        unknown = sorted(set(groups) - set(known))
        if unknown:
            raise LabelledDataError(f"toxigen: unknown group(s) {unknown}; groups in {folder}: {', '.join(known)}")
    by_file, held_out = toxigen_split(folder)
    rows: list[tuple[str, int, str]] = []
    for path, kind, group in files:
        if groups is not None and group not in groups:
            continue
        label = 1 if kind == "hate" else 0
        rows.extend((sentence, label, group) for sentence in by_file[path]
                    if part == "all" or (sentence in held_out) == (part == "eval"))
    return _require_both_classes(_dedupe(rows, "toxigen"), f"toxigen ({folder}, part {part})")


def load_davidson(
    data_dir: str | os.PathLike | None = None, toxic_classes: Sequence[int] = (0, 1)
) -> LabelledSet:
    """Davidson et al. tweets: ``class`` in ``toxic_classes`` -> 1 (default hate + offensive), else 0."""
    bad = sorted(set(toxic_classes) - set(DAVIDSON_CLASS_NAMES))
    if bad or not toxic_classes:
        raise LabelledDataError(f"davidson: toxic classes must be a non-empty subset of 0, 1, 2; got {list(toxic_classes)}")
    path = _find(DAVIDSON_FILE, data_dir)
    rows: list[tuple[str, int, str]] = []
    try:
        with open_text(path) as handle:
            reader = csv.DictReader(handle)
            missing = {"class", "tweet"} - set(reader.fieldnames or ())
            if missing:
                raise LabelledDataError(
                    f"{path}: missing column(s) {sorted(missing)}; header is {reader.fieldnames}"
                )
            for line_no, record in enumerate(reader, start=2):
                try:
                    cls = int(record["class"])
                except (TypeError, ValueError):
                    cls = -1
                if cls not in DAVIDSON_CLASS_NAMES:
                    raise LabelledDataError(
                        f"{path}: record {line_no}: class must be 0, 1 or 2, got {record['class']!r}"
                    )
                text = (record["tweet"] or "").strip()
                if text:
                    rows.append((text, int(cls in toxic_classes), DAVIDSON_CLASS_NAMES[cls]))
    except (OSError, UnicodeDecodeError, EOFError, csv.Error) as err:
        raise LabelledDataError(f"{path}: cannot read Davidson CSV ({err})") from None
    return _require_both_classes(_dedupe(rows, "davidson"), f"davidson ({path})")


def jsonl_records(path: Path, error: type[ValueError] | None = None, what: str = "JSONL") -> Iterator[tuple[int, dict]]:
    """(line number, JSON object) of each non-blank line of a JSONL file (``.gz`` or not); read
    or parse failures raise ``error`` (default ``LabelledDataError``) naming the file and line."""
    error = error or LabelledDataError
    try:
        with open_text(path) as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise error(f"{path}:{line_no}: invalid JSON ({err.msg} at column {err.colno})") from None
                if not isinstance(record, dict):
                    raise error(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
                yield line_no, record
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise error(f"{path}: cannot read {what} ({err})") from None


# RTP prompts are split once, by a hash of the prompt text, into the half evaluations draw from
# ("eval"), a quarter reserved for building training data ("posttrain": on-policy SFT/DPO prompts)
# and a quarter for red-teaming ("redteam": GCG prompt/target pairs), so no text a model is tuned
# or attacked on is an evaluation prompt, whatever the evaluation's limit and seed, and no model is
# attacked on the prompts it was tuned on. Changing the rule changes every RTP evaluation: bump
# the version.
RTP_PARTS = ("eval", "posttrain", "redteam")
RTP_SPLIT_VERSION = 2


def rtp_part(prompt_text: str) -> str:
    """``"eval"`` (half of RTP), ``"posttrain"`` or ``"redteam"`` (a quarter each): the fixed part a
    prompt belongs to, from the first byte of the sha256 of its text."""
    import hashlib

    first = hashlib.sha256(prompt_text.encode("utf-8")).digest()[0]
    if first & 1 == 0:
        return "eval"
    return "posttrain" if first & 2 == 0 else "redteam"


def rtp_records(path: Path, error: type[ValueError] | None = None) -> Iterator[tuple[int, dict]]:
    """``jsonl_records`` of an RTP file."""
    return jsonl_records(path, error, "RTP JSONL")


def load_rtp(
    data_dir: str | os.PathLike | None = None,
    *,
    toxic_threshold: float = 0.5,
    nontoxic_threshold: float = 0.2,
    parts: Sequence[str] = ("prompt", "continuation"),
    rtp_parts: Sequence[str] = RTP_PARTS,
) -> LabelledSet:
    """RTP texts by Perspective toxicity: ``>= toxic_threshold`` -> 1, ``< nontoxic_threshold`` -> 0.

    Texts in between, and texts without a score, are left out. Group = the part
    (``prompt`` or ``continuation``). ``rtp_parts``: only records whose prompt is in these
    parts of RTP (``rtp_part`` of the prompt text, so a prompt and its continuation stay
    together); e.g. ``("posttrain", "redteam")`` keeps every evaluation prompt out.
    """
    if not 0.0 <= nontoxic_threshold <= toxic_threshold <= 1.0:
        raise LabelledDataError(
            f"rtp: need 0 <= nontoxic threshold ({nontoxic_threshold}) <= toxic threshold ({toxic_threshold}) <= 1"
        )
    bad_parts = sorted(set(parts) - {"prompt", "continuation"})
    if bad_parts or not parts:
        raise LabelledDataError(f"rtp: parts must be among 'prompt', 'continuation'; got {list(parts)}")
    bad_splits = sorted(set(rtp_parts) - set(RTP_PARTS))
    if bad_splits or not rtp_parts:
        raise LabelledDataError(f"rtp: split must be among {', '.join(RTP_PARTS)}; got {list(rtp_parts)}")
    rows: list[tuple[str, int, str]] = []
    for stem in ("toxic", "nontoxic"):
        path = _find(f"{RTP_DIR}/{stem}.jsonl", data_dir)
        for line_no, record in rtp_records(path):
            prompt = record.get("prompt")
            if not isinstance(prompt, dict) or not isinstance(prompt.get("text"), str):
                raise LabelledDataError(f"{path}:{line_no}: expected 'prompt' with a 'text' string")
            if rtp_part(prompt["text"]) not in rtp_parts:
                continue
            for part in parts:
                entry = record.get(part)
                if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
                    raise LabelledDataError(f"{path}:{line_no}: expected {part!r} with a 'text' string")
                score = entry.get("toxicity")
                text = entry["text"].strip()
                if score is None or not text:
                    continue
                if score >= toxic_threshold:
                    rows.append((text, 1, part))
                elif score < nontoxic_threshold:
                    rows.append((text, 0, part))
    return _require_both_classes(_dedupe(rows, "rtp"), f"rtp ({RTP_DIR})")


# ---------------------------------------------------------------------------------------
# --data specs
# ---------------------------------------------------------------------------------------


def _int(key: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise LabelledDataError(f"{key} expects an integer, got {raw!r}") from None


def _float(key: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise LabelledDataError(f"{key} expects a number, got {raw!r}") from None


def _bool(key: str, raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on", ""):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise LabelledDataError(f"{key} expects true/false, got {raw!r}")


def _names(key: str, raw: str) -> tuple[str, ...]:
    names = tuple(n for n in raw.split("+") if n)
    if not names:
        raise LabelledDataError(f"{key} expects names joined by '+', got {raw!r}")
    return names


def _one_of(choices: Sequence[str]) -> Callable[[str, str], str]:
    """A parser of one of ``choices``."""

    def parse(key: str, raw: str) -> str:
        if raw not in choices:
            raise LabelledDataError(f"{key} expects one of {', '.join(choices)}, got {raw!r}")
        return raw

    return parse


def _some_of(choices: Sequence[str]) -> Callable[[str, str], tuple[str, ...]]:
    """A parser of ``+``-joined names among ``choices``."""

    def parse(key: str, raw: str) -> tuple[str, ...]:
        names = _names(key, raw)
        unknown = [name for name in names if name not in choices]
        if unknown:
            raise LabelledDataError(f"{key} expects names among {', '.join(choices)} joined by '+', got {raw!r}")
        return names

    return parse


# Loader-specific options: spec key -> (loader keyword, parser).
_LOADERS: dict[str, tuple[Callable[..., LabelledSet], dict[str, tuple[str, Callable[[str, str], Any]]]]] = {
    "toxigen": (load_toxigen, {"groups": ("groups", _names), "part": ("part", _one_of((*TOXIGEN_PARTS, "all")))}),
    "davidson": (
        load_davidson,
        {"toxic_classes": ("toxic_classes", lambda k, raw: tuple(_int(k, c) for c in _names(k, raw)))},
    ),
    "rtp": (
        load_rtp,
        {
            "toxic": ("toxic_threshold", _float),
            "nontoxic": ("nontoxic_threshold", _float),
            "parts": ("parts", _names),
            "split": ("rtp_parts", _some_of(RTP_PARTS)),
        },
    ),
}
_SAMPLING_KEYS = {"limit": _int, "balanced": _bool, "seed": _int}


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` spec: dataset name, sampling, and loader options."""

    name: str
    limit: int | None = None
    balanced: bool = False
    seed: int = 0
    options: tuple[tuple[str, Any], ...] = ()

    def __str__(self) -> str:
        parts = [self.name]
        if self.limit is not None:
            parts.append(f"limit={self.limit}")
        if self.balanced:
            parts.append("balanced=true")
        if self.seed:
            parts.append(f"seed={self.seed}")
        for key, value in self.options:
            shown = "+".join(map(str, value)) if isinstance(value, tuple) else value
            parts.append(f"{key}={shown}")
        return ":".join(parts)


def parse_data_spec(text: str) -> DataSpec:
    """Parse ``NAME[:key=value]...`` (``,`` also separates options).

    NAME is one of ``toxigen``, ``davidson``, ``rtp``. Sampling keys: ``limit=N``,
    ``balanced[=true]`` (equal class counts), ``seed=S``. Loader keys: toxigen
    ``groups=a+b``, ``part=probe|eval|all`` (default ``probe``: sentences kept out of every
    ToxiGen evaluation prompt, ``toxigen_split``); davidson ``toxic_classes=0+1``; rtp
    ``toxic=0.5``, ``nontoxic=0.2``, ``parts=prompt+continuation`` (which texts of a record),
    ``split=posttrain+redteam`` (records whose prompt is in these parts of RTP, ``rtp_part``;
    default all three, ``eval`` included). Example: ``davidson:limit=4000:balanced:seed=1``.
    Malformed values are a ``LabelledDataError`` naming the spec.
    """
    pieces = [p.strip() for p in re.split(r"[:,]", text.strip())]
    name, items = pieces[0].lower(), [p for p in pieces[1:] if p]
    if name not in _LOADERS:
        raise LabelledDataError(f"data spec {text!r}: unknown dataset {name!r}; valid: {', '.join(_LOADERS)}")
    loader_keys = _LOADERS[name][1]
    sampling: dict[str, Any] = {}
    options: list[tuple[str, Any]] = []
    for item in items:
        key, _, raw = item.partition("=")
        key = key.strip().lower()
        if key in _SAMPLING_KEYS or key in loader_keys:
            parser = _SAMPLING_KEYS[key] if key in _SAMPLING_KEYS else loader_keys[key][1]
            try:
                value = parser(key, raw.strip())
            except LabelledDataError as err:
                raise LabelledDataError(f"data spec {text!r}: {err}") from None
            if key in _SAMPLING_KEYS:
                sampling[key] = value
            else:
                options.append((key, value))
        else:
            valid = ", ".join([*_SAMPLING_KEYS, *loader_keys])
            raise LabelledDataError(f"data spec {text!r}: unknown option {key!r} for {name}; valid: {valid}")
    limit = sampling.get("limit")
    if limit is not None and limit <= 0:
        raise LabelledDataError(f"data spec {text!r}: limit must be positive, got {limit}")
    return DataSpec(name=name, options=tuple(options), **sampling)


def load_labelled(
    spec: str | DataSpec,
    data_dir: str | os.PathLike | None = None,
    *,
    limit: int | None = None,
    seed: int | None = None,
) -> LabelledSet:
    """Load the labelled set a spec names; ``limit``/``seed`` override the spec's own."""
    parsed = parse_data_spec(spec) if isinstance(spec, str) else spec
    if limit is not None:
        parsed = dataclasses.replace(parsed, limit=limit)
    if seed is not None:
        parsed = dataclasses.replace(parsed, seed=seed)
    loader, keys = _LOADERS[parsed.name]
    data = loader(data_dir, **{keys[key][0]: value for key, value in parsed.options})
    data = data.sample(parsed.limit, balanced=parsed.balanced, seed=parsed.seed)
    return dataclasses.replace(data, name=str(parsed))
