"""Classifier-based quality filtering (CQF): HQ-vs-LQ text classifiers and top-k% selection.

A quality classifier gives each document P(HQ). Two models, both over word n-grams (lengths
1..``word_ngrams``) of ``normalize_for_classifier(text)``:

- ``fasttext``: DCLM's classifier, fastText supervised with ``wordNgrams=2``, trained on one
  thread with a fixed seed in a fresh interpreter (see ``_FASTTEXT_TRAIN_SCRIPT``), which
  makes it bitwise reproducible.
- ``logreg``: the L2 logistic regression of *The Data-Quality Illusion*, over hashed features
  (sklearn ``HashingVectorizer``: whitespace tokens, ``n_features`` buckets, no alternating
  sign) holding l2-normalised term frequencies. TF rather than TF-IDF keeps the featuriser
  stateless: it is rebuilt from the settings and only the weights are saved.

Negatives for training are drawn from a candidate pool uniformly (``uniform_negatives``) or
with the positives' length distribution (``length_matched_negatives``), so that the
classifier cannot separate the classes by length alone.

Selection works on scores: ``score_percentiles`` ranks documents by (score, index);
``top_fraction`` keeps the top k%; ``percentile_band`` keeps a band of percentiles.

A saved classifier is a directory: ``classifier.json`` (format, settings, labels, training
report, ``weights_sha256``) and either ``model.bin`` (fastText's own format; the digest is
that file's sha256) or ``weights.npz`` (``coef`` [n_features], ``intercept`` [1]; the digest is
over the two arrays' float64 little-endian bytes). ``load_classifier`` checks the digest, and
also reads a bare pretrained fastText ``.bin`` such as DCLM's
``openhermes_reddit_eli5_vs_rw_v2_bigram_200k_train.bin`` (labels ``__label__hq`` and
``__label__cc``).
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import math
import mmap
import os
import struct
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from jaxlm.config import ConfigError, from_dict
from jaxlm.data import DataError
from jaxlm.files import replace_atomically, write_json

POSITIVE_LABEL = "__label__hq"
NEGATIVE_LABEL = "__label__lq"
CLASSIFIER_FILE = "classifier.json"
FASTTEXT_FILE = "model.bin"
WEIGHTS_FILE = "weights.npz"
FORMAT = "jaxlm-quality-classifier"
FORMAT_VERSION = 1
SCORE_BATCH = 4096
_INT32_MAX = 2**31 - 1


# ---------------------------------------------------------------------------------------
# Settings and text normalisation
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClassifierSettings:
    """How a quality classifier is featurised and trained.

    ``word_ngrams`` is the longest word n-gram for both models (2: unigrams and bigrams).
    ``epoch``, ``lr``, ``dim``, ``min_count`` and ``bucket`` are fastText's; ``n_features``,
    ``C`` (inverse L2 strength) and ``max_iter`` (lbfgs) the logistic regression's. Texts are
    cut to ``max_chars`` after normalisation. ``holdout_fraction`` of each class is held out
    of training for the report's accuracy and ROC-AUC; ``seed`` fixes that split and
    fastText's training.
    """

    model: Literal["fasttext", "logreg"] = "fasttext"
    word_ngrams: int = 2
    epoch: int = 5
    lr: float = 0.1
    dim: int = 64
    min_count: int = 1
    bucket: int = 2_000_000
    n_features: int = 2**20
    C: float = 1.0
    max_iter: int = 1000
    max_chars: int = 10_000
    seed: int = 0
    holdout_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.model not in ("fasttext", "logreg"):
            raise ConfigError(f"classifier.model: expected one of 'fasttext', 'logreg', got {self.model!r}")
        for name in ("word_ngrams", "epoch", "dim", "min_count", "n_features", "max_iter", "max_chars"):
            _check_int(name, getattr(self, name), minimum=1)
        if self.word_ngrams > 1:
            _check_int("bucket", self.bucket, minimum=1, why=" (word n-grams are hashed into buckets)")
        else:
            _check_int("bucket", self.bucket, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        for name in ("lr", "C"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"classifier.{name}: expected a positive number, got {value!r}")
        fraction = self.holdout_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
            raise ConfigError(f"classifier.holdout_fraction: expected a number in [0, 1), got {fraction!r}")


def _check_int(name: str, value: Any, minimum: int, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= _INT32_MAX:
        raise ConfigError(f"classifier.{name}: expected an integer in [{minimum}, {_INT32_MAX}]{why}, got {value!r}")


def normalize_for_classifier(text: str, max_chars: int = 10_000) -> str:
    """DCLM's fastText preprocessing: lowercase, whitespace runs to one space, cut to ``max_chars``."""
    return " ".join(text.lower().split())[:max_chars]


# ---------------------------------------------------------------------------------------
# Negatives
# ---------------------------------------------------------------------------------------


def uniform_negatives(n_candidates: int, n: int, seed: int) -> np.ndarray:
    """Sorted indices of ``n`` of ``n_candidates`` candidates drawn uniformly without replacement."""
    _check_sample_size(n, n_candidates)
    return np.sort(np.random.default_rng(seed).choice(n_candidates, size=n, replace=False)).astype(np.int64)


def length_matched_negatives(
    candidate_lengths: Sequence[int] | np.ndarray,
    positive_lengths: Sequence[int] | np.ndarray,
    n: int,
    seed: int,
    n_bins: int = 10,
) -> np.ndarray:
    """Sorted indices of ``n`` candidates whose character-length distribution matches the positives'.

    Bins are on log(1 + length), with edges at the positives' quantiles (``n_bins`` bins of
    equal positive share; equal edges merge). Each bin's quota is its share of the positives
    times ``n`` (largest remainders round it to a total of exactly ``n``) and is drawn without
    replacement from the candidates in that bin. A bin with too few candidates takes the rest
    from its nearest bins (distance 1 on either side, then 2, ...), with a warning.
    """
    candidates = _lengths_array(candidate_lengths, "candidate_lengths")
    positives = _lengths_array(positive_lengths, "positive_lengths")
    if positives.size == 0:
        raise DataError("positive_lengths: expected at least one positive document to match lengths to")
    _check_sample_size(n, candidates.size)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ConfigError(f"n_bins: expected a positive integer, got {n_bins!r}")
    edges = np.unique(np.quantile(np.log1p(positives), np.linspace(0.0, 1.0, n_bins + 1)[1:-1]))
    positive_bins = np.searchsorted(edges, np.log1p(positives), side="right")
    candidate_bins = np.searchsorted(edges, np.log1p(candidates), side="right")
    n_used_bins = edges.size + 1
    quotas = _largest_remainder_quotas(np.bincount(positive_bins, minlength=n_used_bins) / positives.size, n)

    rng = np.random.default_rng(seed)
    order = rng.permutation(candidates.size)
    remaining = [order[candidate_bins[order] == b].tolist() for b in range(n_used_bins)]
    chosen: list[int] = []
    shortfalls = {}
    for b, quota in enumerate(quotas):
        take = min(int(quota), len(remaining[b]))
        chosen += remaining[b][:take]
        remaining[b] = remaining[b][take:]
        if take < quota:
            shortfalls[b] = int(quota) - take
    for b, missing in shortfalls.items():
        for distance in range(1, n_used_bins):
            neighbours = [nb for nb in (b - distance, b + distance) if 0 <= nb < n_used_bins]
            nearby = [i for nb in neighbours for i in remaining[nb]]
            picked = {nearby[j] for j in rng.permutation(len(nearby))[:missing]}
            chosen.extend(picked)
            for nb in neighbours:
                remaining[nb] = [i for i in remaining[nb] if i not in picked]
            missing -= len(picked)
            if missing == 0:
                break
    if shortfalls:
        warnings.warn(
            f"length-matched negatives: {sum(shortfalls.values())} of {n} drawn from neighbouring length bins "
            f"(too few candidates in bins {sorted(shortfalls)} of {n_used_bins})",
            stacklevel=2,
        )
    return np.sort(np.asarray(chosen, dtype=np.int64))


def _lengths_array(lengths: Sequence[int] | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(lengths, dtype=np.float64)
    if array.ndim != 1 or not np.all(np.isfinite(array)) or np.any(array < 0):
        raise DataError(f"{name}: expected a 1-D sequence of non-negative character lengths")
    return array


def _check_sample_size(n: int, available: int) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= available:
        raise ConfigError(f"n: expected an integer in [0, {available}] (the number of candidates), got {n!r}")


def _largest_remainder_quotas(shares: np.ndarray, total: int) -> np.ndarray:
    """Integer quotas proportional to ``shares`` that sum to ``total`` (ties go to lower bins)."""
    exact = shares * total
    quotas = np.floor(exact).astype(np.int64)
    leftover = total - int(quotas.sum())
    quotas[np.argsort(-(exact - quotas), kind="stable")[:leftover]] += 1
    return quotas


# ---------------------------------------------------------------------------------------
# Classifiers
# ---------------------------------------------------------------------------------------


class QualityClassifier(abc.ABC):
    """P(HQ) of texts; built by ``train_classifier`` or ``load_classifier``.

    ``labels`` are the model's class labels, ``positive_label`` the one whose probability
    ``score`` returns; ``report`` is the training report (None for a pretrained fastText file).
    """

    def __init__(self, settings: ClassifierSettings, positive_label: str, labels: tuple[str, ...],
                 report: dict | None, weights_sha256: str | None) -> None:
        self.settings = settings
        self.positive_label = positive_label
        self.labels = labels
        self.report = report
        self._weights_sha256 = weights_sha256

    def score(self, texts: Sequence[str], batch_size: int = SCORE_BATCH) -> np.ndarray:
        """float64 P(HQ) in [0, 1] for each text, featurised ``batch_size`` texts at a time."""
        scores = np.empty(len(texts), dtype=np.float64)
        for start in range(0, len(texts), batch_size):
            batch = [normalize_for_classifier(text, self.settings.max_chars) for text in texts[start:start + batch_size]]
            scores[start:start + len(batch)] = self._score_normalized(batch)
        return scores

    def save(self, directory: str | Path) -> Path:
        """Write the classifier to ``directory`` (created if needed): weights first, ``classifier.json`` last."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._weights_sha256 = self._write_weights(directory)
        write_json(directory / CLASSIFIER_FILE, {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "settings": dataclasses.asdict(self.settings),
            "positive_label": self.positive_label,
            "labels": list(self.labels),
            "weights_sha256": self._weights_sha256,
            "report": self.report,
        })
        return directory

    def fingerprint(self) -> str:
        """sha256 over the settings, the positive label and the weights' digest (``weights_sha256``)."""
        identity = {
            "settings": dataclasses.asdict(self.settings),
            "positive_label": self.positive_label,
            "weights_sha256": self._current_weights_sha256(),
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def _current_weights_sha256(self) -> str:
        return self._weights_sha256

    @abc.abstractmethod
    def _score_normalized(self, texts: list[str]) -> np.ndarray:
        """P(HQ) of texts already passed through ``normalize_for_classifier``."""

    @abc.abstractmethod
    def _write_weights(self, directory: Path) -> str:
        """Write the weights file into ``directory``; returns its ``weights_sha256``."""


class FastTextClassifier(QualityClassifier):
    """A fastText supervised model; P(HQ) is the positive label's softmax probability."""

    def __init__(self, model: Any, settings: ClassifierSettings, positive_label: str,
                 report: dict | None, weights_sha256: str | None, source: Path | None = None) -> None:
        super().__init__(settings, positive_label, tuple(model.labels), report, weights_sha256)
        self._model = model
        self._source = source

    def _current_weights_sha256(self) -> str:
        if self._weights_sha256 is None:  # a pretrained file, hashed when first needed
            self._weights_sha256 = _file_sha256(self._source)
        return self._weights_sha256

    def _score_normalized(self, texts: list[str]) -> np.ndarray:
        all_labels, all_probs = self._model.predict(texts, k=-1)
        # fastText adds 1e-5 to each probability before reporting it; clipping keeps P <= 1.
        return np.array([
            min(float(dict(zip(labels, probs)).get(self.positive_label, 0.0)), 1.0)
            for labels, probs in zip(all_labels, all_probs)
        ], dtype=np.float64)

    def _write_weights(self, directory: Path) -> str:
        path = replace_atomically(directory / FASTTEXT_FILE, lambda tmp: self._model.save_model(str(tmp)))
        return _file_sha256(path)


class LogRegClassifier(QualityClassifier):
    """L2 logistic regression on hashed n-gram TF features: P(HQ) = sigmoid(x . coef + intercept)."""

    def __init__(self, coef: np.ndarray, intercept: float, settings: ClassifierSettings,
                 report: dict | None) -> None:
        self.coef = np.ascontiguousarray(coef, dtype="<f8")
        self.intercept = float(intercept)
        super().__init__(settings, POSITIVE_LABEL, (POSITIVE_LABEL, NEGATIVE_LABEL), report,
                         _weights_digest(self.coef, self.intercept))

    def _score_normalized(self, texts: list[str]) -> np.ndarray:
        from scipy.special import expit

        features = _hashing_vectorizer(self.settings).transform(texts)
        return expit(features @ self.coef + self.intercept).astype(np.float64)

    def _write_weights(self, directory: Path) -> str:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, coef=self.coef, intercept=np.array([self.intercept], dtype="<f8"))

        replace_atomically(directory / WEIGHTS_FILE, write)
        return _weights_digest(self.coef, self.intercept)


def _weights_digest(coef: np.ndarray, intercept: float) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(coef, dtype="<f8").tobytes())
    digest.update(np.array([intercept], dtype="<f8").tobytes())
    return digest.hexdigest()


def _hashing_vectorizer(settings: ClassifierSettings) -> Any:
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(
        n_features=settings.n_features, ngram_range=(1, settings.word_ngrams), alternate_sign=False, norm="l2",
        lowercase=False, tokenizer=str.split, token_pattern=None, dtype=np.float64,
    )


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


def holdout_split(n_positive: int, n_negative: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted held-out indices of the positives and of the negatives.

    Each class holds out ``round(fraction * n)`` documents, but always leaves one for training.
    """
    rng = np.random.default_rng(seed)
    held = []
    for n in (n_positive, n_negative):
        size = min(round(fraction * n), max(n - 1, 0))
        held.append(np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64))
    return held[0], held[1]


def train_classifier(positive: Sequence[str], negative: Sequence[str],
                     settings: ClassifierSettings = ClassifierSettings()) -> tuple[QualityClassifier, dict]:
    """Train an HQ (positive) vs LQ (negative) classifier; returns it and its training report.

    The report holds the class counts (all, trained on, held out), the mean character length
    of each class, and the held-out accuracy (P(HQ) >= 0.5 counts as HQ) and ROC-AUC, which
    are None when the held-out part lacks a class.
    """
    for name, texts in (("positive", positive), ("negative", negative)):
        if len(texts) == 0:
            raise DataError(f"quality classifier training: the {name} (HQ vs LQ) set is empty")
    held_positive, held_negative = holdout_split(len(positive), len(negative), settings.holdout_fraction, settings.seed)
    train_positive = _without(positive, held_positive)
    train_negative = _without(negative, held_negative)
    fit = _train_fasttext if settings.model == "fasttext" else _train_logreg
    classifier = fit(train_positive, train_negative, settings)
    held_texts = [positive[i] for i in held_positive] + [negative[i] for i in held_negative]
    held_labels = np.array([1] * held_positive.size + [0] * held_negative.size)
    classifier.report = {
        "model": settings.model,
        "n_positive": len(positive),
        "n_negative": len(negative),
        "n_train_positive": len(train_positive),
        "n_train_negative": len(train_negative),
        "n_holdout_positive": int(held_positive.size),
        "n_holdout_negative": int(held_negative.size),
        "mean_chars_positive": float(np.mean([len(text) for text in positive])),
        "mean_chars_negative": float(np.mean([len(text) for text in negative])),
        **_holdout_metrics(classifier.score(held_texts), held_labels),
    }
    return classifier, classifier.report


def _without(texts: Sequence[str], held: np.ndarray) -> list[str]:
    keep = np.ones(len(texts), dtype=bool)
    keep[held] = False
    return [text for text, kept in zip(texts, keep) if kept]


def _holdout_metrics(scores: np.ndarray, labels: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score

    if np.unique(labels).size < 2:
        return {"holdout_accuracy": None, "holdout_auc": None}
    return {
        "holdout_accuracy": float(np.mean((scores >= 0.5) == (labels == 1))),
        "holdout_auc": float(roc_auc_score(labels, scores)),
    }


# fasttext-numpy2 0.10.4 allocates fastText's input matrix uninitialised and, training on one
# thread, randomises only its first tenth: the rest is whatever the allocator returns (zeros from
# fresh pages; stale numbers, even NaNs, from reused ones), so a second model trained in the same
# process differs or diverges. Training therefore runs in a fresh interpreter whose allocator
# zero-fills every allocation (glibc's MALLOC_PERTURB_=255): upstream fastText's zero-initialised
# matrix, and bitwise-identical models for a given seed.
_FASTTEXT_TRAIN_SCRIPT = """
import json, sys
import fasttext
fasttext.train_supervised(**json.loads(sys.argv[1])).save_model(sys.argv[2])
"""


def _train_fasttext(positive: list[str], negative: list[str], settings: ClassifierSettings) -> FastTextClassifier:
    import fasttext

    lines = [f"{POSITIVE_LABEL} {normalize_for_classifier(text, settings.max_chars)}\n" for text in positive]
    lines += [f"{NEGATIVE_LABEL} {normalize_for_classifier(text, settings.max_chars)}\n" for text in negative]
    order = np.random.default_rng([settings.seed, 1]).permutation(len(lines))  # SGD sees the classes mixed
    with tempfile.TemporaryDirectory() as tmp:
        train_file, model_file = Path(tmp) / "train.txt", Path(tmp) / FASTTEXT_FILE
        with open(train_file, "w", encoding="utf-8") as handle:
            handle.writelines(lines[i] for i in order)
        arguments = {
            "input": str(train_file), "epoch": settings.epoch, "lr": settings.lr, "wordNgrams": settings.word_ngrams,
            "dim": settings.dim, "minCount": settings.min_count, "bucket": settings.bucket, "loss": "softmax",
            "thread": 1, "seed": settings.seed, "verbose": 0,
        }
        done = subprocess.run(
            [sys.executable, "-c", _FASTTEXT_TRAIN_SCRIPT, json.dumps(arguments), str(model_file)],
            env={**os.environ, "MALLOC_PERTURB_": "255"}, capture_output=True, text=True,
        )
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            raise DataError(f"quality classifier training: fastText failed ({reason.strip()})")
        model = fasttext.load_model(str(model_file))
        digest = _file_sha256(model_file)
    return FastTextClassifier(model, settings, POSITIVE_LABEL, report=None, weights_sha256=digest)


def _train_logreg(positive: list[str], negative: list[str], settings: ClassifierSettings) -> LogRegClassifier:
    from sklearn.linear_model import LogisticRegression

    texts = [normalize_for_classifier(text, settings.max_chars) for text in (*positive, *negative)]
    labels = np.array([1] * len(positive) + [0] * len(negative))
    fitted = LogisticRegression(C=settings.C, max_iter=settings.max_iter).fit(
        _hashing_vectorizer(settings).transform(texts), labels
    )
    return LogRegClassifier(fitted.coef_[0], fitted.intercept_[0], settings, report=None)


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def load_classifier(path: str | Path, positive_label: str | None = None) -> QualityClassifier:
    """A classifier saved by ``QualityClassifier.save``, or a bare pretrained fastText ``.bin``.

    ``positive_label`` is the label whose probability is P(HQ): for a bare ``.bin`` it
    defaults to ``__label__hq``; for a saved directory it defaults to (and must equal) the
    saved one. A bare ``.bin``'s settings take ``epoch``, ``word_ngrams``, ``dim``,
    ``min_count`` and ``bucket`` from the file (fastText does not store ``lr``), the rest
    from the defaults.
    """
    path = Path(path)
    if path.is_dir():
        return _load_saved(path, positive_label)
    if path.is_file():
        model = _load_fasttext_model(path)
        args = model.f.getArgs()
        settings = ClassifierSettings(
            model="fasttext", epoch=args.epoch, word_ngrams=args.wordNgrams, dim=args.dim,
            min_count=args.minCount, bucket=args.bucket,
        )
        label = POSITIVE_LABEL if positive_label is None else positive_label
        _check_positive_label(path, label, model.labels)
        return FastTextClassifier(model, settings, label, report=None, weights_sha256=None, source=path)
    raise DataError(f"{path}: no such file or directory (expected a saved classifier directory or a fastText .bin)")


def _load_saved(directory: Path, positive_label: str | None) -> QualityClassifier:
    meta_file = directory / CLASSIFIER_FILE
    meta = _read_classifier_json(meta_file)
    try:
        settings = from_dict(ClassifierSettings, meta["settings"], f"{meta_file}: settings")
    except ConfigError as err:
        raise DataError(str(err)) from None
    if positive_label is not None and positive_label != meta["positive_label"]:
        raise ConfigError(f"positive_label: {directory} was saved with {meta['positive_label']!r}, got {positive_label!r}")
    if settings.model == "logreg":
        weights_file = directory / WEIGHTS_FILE
        coef, intercept = _read_weights(weights_file, settings.n_features)
        if _weights_digest(coef, intercept) != meta["weights_sha256"]:
            raise _digest_mismatch(weights_file)
        return LogRegClassifier(coef, intercept, settings, meta["report"])
    model_file = directory / FASTTEXT_FILE
    if _file_sha256(model_file) != meta["weights_sha256"]:
        raise _digest_mismatch(model_file)
    model = _load_fasttext_model(model_file)
    _check_positive_label(model_file, meta["positive_label"], model.labels)
    return FastTextClassifier(model, settings, meta["positive_label"], meta["report"], meta["weights_sha256"])


def _read_classifier_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: missing (a saved classifier directory holds {CLASSIFIER_FILE})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable ({_one_line(err)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} file (expected \"format\": \"{FORMAT}\")")
    if meta.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: format version {meta.get('version')!r}, expected {FORMAT_VERSION}")
    for key, kind in (("settings", dict), ("positive_label", str), ("weights_sha256", str), ("report", (dict, type(None)))):
        if not isinstance(meta.get(key), kind):
            raise DataError(f"{path}: field {key!r} is missing or has the wrong type")
    return meta


def _read_weights(path: Path, n_features: int) -> tuple[np.ndarray, float]:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            coef, intercept = arrays["coef"], arrays["intercept"]
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except Exception as err:  # zip, zlib, npy-header and missing-key errors all mean a damaged file
        raise DataError(f"{path}: unreadable weights ({type(err).__name__}: {_one_line(err)})") from None
    if coef.dtype != np.float64 or coef.shape != (n_features,) or intercept.dtype != np.float64 or intercept.shape != (1,):
        raise DataError(
            f"{path}: expected float64 coef [{n_features}] and intercept [1], got {coef.dtype} {list(coef.shape)} "
            f"and {intercept.dtype} {list(intercept.shape)}"
        )
    return coef, float(intercept[0])


def _digest_mismatch(path: Path) -> DataError:
    return DataError(f"{path}: weights do not match the weights_sha256 in {CLASSIFIER_FILE} (damaged or replaced)")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except OSError as err:
        raise DataError(f"{path}: unreadable ({_one_line(err)})") from None
    return digest.hexdigest()


def _check_positive_label(path: Path, label: str, labels: Sequence[str]) -> None:
    if label not in labels:
        raise DataError(f"{path}: positive label {label!r} is not one of the model's labels {list(labels)}")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


_FASTTEXT_MAGIC = 793712314
_FASTTEXT_VERSION = 12
_FASTTEXT_SUPERVISED = 3  # fastText's model_name enum: cbow 1, skipgram 2, supervised 3
_FASTTEXT_HEADER = 92  # magic, version, 12 int32 args and a double, dictionary sizes


def _load_fasttext_model(path: Path) -> Any:
    import fasttext

    _check_fasttext_layout(path)
    try:
        return fasttext.load_model(str(path))
    except ValueError as err:
        raise DataError(f"{path}: not a usable fastText model ({_one_line(err)})") from None


def _check_fasttext_layout(path: Path) -> None:
    """Walk fastText's binary layout (format version 12) and check that the file ends where it does.

    fastText reads a truncated file without complaint (the missing weights come back as
    garbage), so a damaged file is caught here. Quantized models (``.ftz``) are refused.
    """

    def damaged(what: str) -> DataError:
        return DataError(f"{path}: not a usable fastText model ({what})")

    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            if size < _FASTTEXT_HEADER:
                raise damaged(f"{size} bytes, shorter than fastText's {_FASTTEXT_HEADER}-byte header")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                magic, version = struct.unpack_from("<2i", data, 0)
                if magic != _FASTTEXT_MAGIC:
                    raise damaged("wrong magic number")
                if version != _FASTTEXT_VERSION:
                    raise damaged(f"format version {version}, expected {_FASTTEXT_VERSION}")
                if struct.unpack_from("<12i", data, 8)[7] != _FASTTEXT_SUPERVISED:
                    raise damaged("not a supervised (classifier) model")
                n_entries, n_words, n_labels, _, n_pruned = struct.unpack_from("<3iqq", data, 64)
                if n_entries < 0 or n_words < 0 or n_labels < 0 or n_words + n_labels != n_entries:
                    raise damaged("inconsistent dictionary sizes")
                offset = _FASTTEXT_HEADER
                for _ in range(n_entries):  # entry: NUL-terminated word, int64 count, int8 type
                    end = data.find(b"\0", offset)
                    if end < 0:
                        raise damaged("dictionary cut short")
                    offset = end + 10
                offset += 8 * max(n_pruned, 0)  # int32 pairs of the pruned-word index
                for matrix in ("input", "output"):  # bool quantized, int64 rows, int64 cols, float32 data
                    if offset + 17 > size:
                        raise damaged(f"cut short before the {matrix} matrix")
                    if data[offset]:
                        raise damaged("quantized models are not supported")
                    rows, cols = struct.unpack_from("<2q", data, offset + 1)
                    if rows < 0 or cols < 0:
                        raise damaged(f"negative {matrix} matrix shape")
                    offset += 17 + 4 * rows * cols
    except OSError as err:
        raise DataError(f"{path}: unreadable ({_one_line(err)})") from None
    if offset != size:
        raise damaged(f"{size} bytes where the layout needs {offset}")


# ---------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------


def score_percentiles(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Each document's rank by (score, index) ascending, divided by n: a permutation of i / n."""
    scores = _scores_array(scores)
    percentiles = np.empty(scores.size, dtype=np.float64)
    percentiles[np.lexsort((np.arange(scores.size), scores))] = np.arange(scores.size) / max(scores.size, 1)
    return percentiles


def top_fraction(scores: Sequence[float] | np.ndarray, fraction: float) -> np.ndarray:
    """Mask of the ``round(fraction * n)`` documents with the highest (score, index)."""
    scores = _scores_array(scores)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ConfigError(f"fraction: expected a number in (0, 1], got {fraction!r}")
    keep = round(fraction * scores.size)
    mask = np.zeros(scores.size, dtype=bool)
    mask[np.lexsort((np.arange(scores.size), scores))[scores.size - keep:]] = True
    return mask


def percentile_band(percentiles: Sequence[float] | np.ndarray, low: float, high: float) -> np.ndarray:
    """Mask of ``low <= percentile < high``; percentiles are below 1, so ``high = 1`` keeps the top."""
    percentiles = np.asarray(percentiles, dtype=np.float64)
    if percentiles.ndim != 1 or np.any(~(percentiles >= 0)) or np.any(~(percentiles < 1)):
        raise DataError("percentiles: expected a 1-D array of values in [0, 1) (from score_percentiles)")
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number in [0, 1], got {value!r}")
    if not 0 <= low < high <= 1:
        raise ConfigError(f"low / high: expected 0 <= low < high <= 1, got {low!r} and {high!r}")
    return (percentiles >= low) & (percentiles < high)


def score_summary(scores: Sequence[float] | np.ndarray) -> dict:
    """n, mean, the 0, 0.1, ..., 1 quantiles and a 10-bin histogram over [0, 1] (JSON-ready).

    The last bin includes 1; scores outside [0, 1] count in the quantiles but in no bin.
    """
    scores = _scores_array(scores)
    levels = np.round(np.linspace(0.0, 1.0, 11), 1)
    counts, edges = np.histogram(scores, bins=10, range=(0.0, 1.0))
    return {
        "n": int(scores.size),
        "mean": float(scores.mean()) if scores.size else None,
        "quantiles": {f"{q:.1f}": float(v) for q, v in zip(levels, np.quantile(scores, levels))} if scores.size else None,
        "histogram": {"edges": [float(e) for e in np.round(edges, 1)], "counts": [int(c) for c in counts]},
    }


def _scores_array(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 1 or not np.all(np.isfinite(array)):
        raise DataError("scores: expected a 1-D array of finite numbers")
    return array
