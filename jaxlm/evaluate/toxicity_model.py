"""A toxicity classifier trained by jaxlm: hashed word + character n-gram TF-IDF, logistic regression.

The model is small and transparent: two ``HashingVectorizer`` feature blocks (word 1-2-grams,
character 2-5-grams within word boundaries), sublinear term frequency, smoothed IDF, per-block
L2 normalisation, then a logistic regression fitted with scikit-learn. Hashing means no
vocabulary has to be stored: the model file is a plain ``.npz`` (IDF vectors, weights,
intercept and a JSON header), loadable without pickle.

Targets may be soft (a probability, e.g. a Perspective score): each text enters the fit twice,
as positive with weight ``w * p`` and as negative with weight ``w * (1 - p)``, which is exactly
the cross-entropy against ``p``.

``train_default_model`` builds the model behind ``get_scorer("jaxlm-tfidf")`` and
``get_scorer("jaxlm")``: trained on the RTP texts (prompts and continuations) with their
Perspective toxicity as soft target, *only on the training split*. The split is by source
document (``filename``), by a salted hash, so a prompt and its continuation always fall on the
same side; the held-out side is what the calibration report (``tools/calibrate_scorers.py``)
evaluates it on. The file also holds stacking weights that combine the model with
profanity-check (``stacked_probability``), fitted to the Perspective scores on out-of-fold
predictions (document folds of the training split), so the combination is calibrated to
Perspective's level, not only its ranking.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import scipy.sparse as sp
from scipy.special import expit

from jaxlm.data.labelled import rtp_records
from jaxlm.data.records import file_sha256
from jaxlm.errors import JaxlmError
from jaxlm.evaluate.scorer import ProfanityCheckScorer
from jaxlm.paths import MissingDataError, dataset_path

log = logging.getLogger(__name__)

FORMAT = "jaxlm-tfidf-logistic/1"
RTP_FILES = ("eval/rtp/toxic.jsonl", "eval/rtp/nontoxic.jsonl")
DAVIDSON_FILE = "labelled/davidson/labeled_data.csv.gz"
CACHE_DIR_ENV = "JAXLM_CACHE_DIR"
RTP_PARTS = ("prompt", "continuation")


class ToxicityModelError(JaxlmError, ValueError):
    """A toxicity model file or training input is invalid; the message names it."""


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FeatureSettings:
    word_ngrams: tuple[int, int] = (1, 2)
    char_ngrams: tuple[int, int] = (2, 5)
    word_features: int = 2**18
    char_features: int = 2**19

    def __post_init__(self) -> None:
        for name in ("word_ngrams", "char_ngrams"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ToxicityModelError(f"{name}: expected 1 <= low <= high, got {(low, high)}")
        for name in ("word_features", "char_features"):
            if getattr(self, name) < 1:
                raise ToxicityModelError(f"{name}: expected a positive number of hash buckets")

    @property
    def size(self) -> int:
        return self.word_features + self.char_features


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    features: FeatureSettings = FeatureSettings()
    inverse_regularisation: float = 30.0  # scikit-learn's ``C``
    max_iter: int = 2000
    # Default-model data: RTP train split (soft Perspective targets), optionally Davidson too.
    rtp_heldout_fraction: float = 0.3
    split_salt: str = "jaxlm-rtp-split-1"
    davidson_weight: float = 0.0  # 0 = not used (it lowers agreement with Perspective)
    stack_folds: int = 3  # document folds of the training split for the stacking weights

    def __post_init__(self) -> None:
        if self.inverse_regularisation <= 0:
            raise ToxicityModelError("inverse_regularisation: expected > 0")
        if not 0.0 < self.rtp_heldout_fraction < 1.0:
            raise ToxicityModelError("rtp_heldout_fraction: expected a fraction strictly between 0 and 1")
        if self.davidson_weight < 0:
            raise ToxicityModelError("davidson_weight: expected >= 0")
        if self.stack_folds < 2:
            raise ToxicityModelError("stack_folds: expected >= 2")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------


def _vectorizers(features: FeatureSettings):
    from sklearn.feature_extraction.text import HashingVectorizer

    common = dict(alternate_sign=False, norm=None, lowercase=True, dtype=np.float64)
    word = HashingVectorizer(
        analyzer="word", ngram_range=tuple(features.word_ngrams), n_features=features.word_features,
        token_pattern=r"(?u)\b\w+\b", **common,
    )
    char = HashingVectorizer(
        analyzer="char_wb", ngram_range=tuple(features.char_ngrams), n_features=features.char_features, **common
    )
    return word, char


def hashed_counts(features: FeatureSettings, texts: Sequence[str]) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Raw n-gram counts per text: (word block, character block)."""
    word, char = _vectorizers(features)
    return word.transform(texts).tocsr(), char.transform(texts).tocsr()


def smoothed_idf(counts: sp.csr_matrix) -> np.ndarray:
    """``ln((1 + n) / (1 + df)) + 1`` per column (scikit-learn's ``smooth_idf``)."""
    df = np.bincount(counts.indices, minlength=counts.shape[1])
    return (np.log((1.0 + counts.shape[0]) / (1.0 + df)) + 1.0).astype(np.float32)


def _tfidf_block(counts: sp.csr_matrix, idf: np.ndarray) -> sp.csr_matrix:
    block = counts.copy()
    block.data = np.log(block.data) + 1.0  # sublinear tf
    block = block @ sp.diags(idf.astype(np.float64))
    norms = np.sqrt(np.asarray(block.multiply(block).sum(axis=1)).ravel())
    norms[norms == 0] = 1.0
    return sp.csr_matrix(sp.diags(1.0 / norms) @ block)


def tfidf_features(
    features: FeatureSettings, texts: Sequence[str], idf_word: np.ndarray, idf_char: np.ndarray
) -> sp.csr_matrix:
    word, char = hashed_counts(features, texts)
    return sp.hstack([_tfidf_block(word, idf_word), _tfidf_block(char, idf_char)], format="csr")


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TfidfLogisticModel:
    """Weights of the hashed TF-IDF logistic regression; ``predict(texts)`` gives P(toxic)."""

    features: FeatureSettings
    idf_word: np.ndarray  # [word_features] float32
    idf_char: np.ndarray  # [char_features] float32
    coef: np.ndarray  # [word_features + char_features] float32
    intercept: float
    meta: dict = dataclasses.field(default_factory=dict)  # provenance: data, settings, versions
    # [weight of logit(this model), weight of logit(profanity-check), bias]; see ``stacked_probability``
    stack: np.ndarray | None = None

    def __post_init__(self) -> None:
        try:  # meta is stored as JSON: keep the in-memory copy identical to what a load gives back
            object.__setattr__(self, "meta", json.loads(json.dumps(self.meta)))
        except (TypeError, ValueError) as err:
            raise ToxicityModelError(f"meta: expected JSON-serialisable provenance ({err})") from None
        expected = {
            "idf_word": (self.features.word_features,),
            "idf_char": (self.features.char_features,),
            "coef": (self.features.size,),
        }
        if self.stack is not None:
            expected["stack"] = (3,)
        for name, shape in expected.items():
            value = getattr(self, name)
            if value.shape != shape:
                raise ToxicityModelError(f"{name}: expected shape {shape}, got {value.shape}")
            if not np.all(np.isfinite(value)):
                raise ToxicityModelError(f"{name}: contains non-finite values")

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0,), np.float64)
        x = tfidf_features(self.features, texts, self.idf_word, self.idf_char)
        return expit(x @ self.coef.astype(np.float64) + self.intercept)

    def save(self, path: str | os.PathLike) -> Path:
        """Write a compressed ``.npz`` (no pickle) atomically; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"format": FORMAT, "features": dataclasses.asdict(self.features), "meta": self.meta}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez_compressed(
                    handle, header=np.array(json.dumps(header, sort_keys=True)), idf_word=self.idf_word,
                    idf_char=self.idf_char, coef=self.coef, intercept=np.array(self.intercept, np.float64),
                    **({} if self.stack is None else {"stack": np.asarray(self.stack, np.float64)}),
                )
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TfidfLogisticModel":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"toxicity model {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except (OSError, ValueError) as err:
            raise ToxicityModelError(f"{path}: not a readable .npz toxicity model ({err})") from None
        missing = sorted({"header", "idf_word", "idf_char", "coef", "intercept"} - set(arrays))
        if missing:
            raise ToxicityModelError(f"{path}: missing array(s) {missing}")
        try:
            header = json.loads(str(arrays["header"]))
        except json.JSONDecodeError as err:
            raise ToxicityModelError(f"{path}: header is not JSON ({err.msg})") from None
        if header.get("format") != FORMAT:
            raise ToxicityModelError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
        raw = header.get("features", {})
        try:
            features = FeatureSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        except TypeError as err:
            raise ToxicityModelError(f"{path}: bad feature settings {raw} ({err})") from None
        try:
            return cls(
                features=features, idf_word=arrays["idf_word"].astype(np.float32),
                idf_char=arrays["idf_char"].astype(np.float32), coef=arrays["coef"].astype(np.float32),
                intercept=float(arrays["intercept"]), meta=header.get("meta", {}),
                stack=arrays["stack"].astype(np.float64) if "stack" in arrays else None,
            )
        except ToxicityModelError as err:
            raise ToxicityModelError(f"{path}: {err}") from None


def train_scorer(
    texts: Sequence[str],
    targets: Sequence[float],
    settings: TrainSettings = TrainSettings(),
    weights: Sequence[float] | None = None,
    meta: dict | None = None,
) -> TfidfLogisticModel:
    """Fit the model on texts with (soft) targets in [0, 1] and optional per-text weights."""
    from sklearn.linear_model import LogisticRegression

    targets = np.asarray(targets, np.float64)
    weights = np.ones(len(texts)) if weights is None else np.asarray(weights, np.float64)
    if not len(texts) == targets.shape[0] == weights.shape[0]:
        raise ToxicityModelError(
            f"train_scorer: {len(texts)} texts, {targets.shape[0]} targets, {weights.shape[0]} weights; expected equal"
        )
    if np.any((targets < 0) | (targets > 1)) or not np.all(np.isfinite(targets)):
        raise ToxicityModelError("train_scorer: targets must be probabilities in [0, 1]")
    if np.any(weights < 0) or not np.all(np.isfinite(weights)):
        raise ToxicityModelError("train_scorer: weights must be finite and >= 0")
    positive, negative = weights * targets, weights * (1 - targets)
    if positive.sum() <= 0 or negative.sum() <= 0:
        raise ToxicityModelError("train_scorer: need both toxic and non-toxic mass in the targets")
    features = settings.features
    word, char = hashed_counts(features, list(texts))
    idf_word, idf_char = smoothed_idf(word), smoothed_idf(char)
    x = sp.hstack([_tfidf_block(word, idf_word), _tfidf_block(char, idf_char)], format="csr")
    x2 = sp.vstack([x, x], format="csr")
    y2 = np.r_[np.ones(len(texts)), np.zeros(len(texts))]
    w2 = np.r_[positive, negative]
    keep = w2 > 0
    fit = LogisticRegression(C=settings.inverse_regularisation, max_iter=settings.max_iter)
    fit.fit(x2[keep], y2[keep], sample_weight=w2[keep])
    return TfidfLogisticModel(
        features=features, idf_word=idf_word, idf_char=idf_char,
        coef=fit.coef_[0].astype(np.float32), intercept=float(fit.intercept_[0]), meta=dict(meta or {}),
    )


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def stacked_probability(stack: np.ndarray, own: Sequence[float], reference: Sequence[float]) -> np.ndarray:
    """``sigmoid(w0 * logit(own) + w1 * logit(reference) + b)`` with ``stack = [w0, w1, b]``."""
    return expit(stack[0] * _logit(own) + stack[1] * _logit(reference) + stack[2])


def fit_stack(own: Sequence[float], reference: Sequence[float], targets: Sequence[float]) -> np.ndarray:
    """Stacking weights ``[w0, w1, b]``: logistic regression of soft ``targets`` on both logits.

    ``own`` must be out-of-fold predictions (scores on texts the model was not trained on),
    or the weights overtrust the model.
    """
    from sklearn.linear_model import LogisticRegression

    x = np.c_[_logit(own), _logit(reference)]
    targets = np.asarray(targets, np.float64)
    fit = LogisticRegression(C=100.0, max_iter=1000).fit(
        np.r_[x, x], np.r_[np.ones(len(x)), np.zeros(len(x))], sample_weight=np.r_[targets, 1 - targets]
    )
    return np.r_[fit.coef_[0], fit.intercept_[0]].astype(np.float64)


# ---------------------------------------------------------------------------------------
# Data: RTP Perspective scores and the document-level split
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ScoredText:
    text: str
    toxicity: float  # Perspective TOXICITY
    part: str  # "prompt" | "continuation"
    document: str  # RTP source ``filename``: prompt and continuation share it


def load_rtp_scores(data_dir: str | os.PathLike | None = None) -> list[ScoredText]:
    """Every RTP prompt and continuation with a Perspective toxicity score, in file order."""
    rows: list[ScoredText] = []
    for relative in RTP_FILES:
        path = dataset_path(relative, data_dir)
        for line_no, record in rtp_records(path, ToxicityModelError):
            rows += _scored_parts(record, f"{path}:{line_no}")
    return rows


def _scored_parts(record: dict, where: str) -> list[ScoredText]:
    if not isinstance(record, dict) or not isinstance(record.get("filename"), str):
        raise ToxicityModelError(f"{where}: expected an object with a 'filename' string")
    out = []
    for part in RTP_PARTS:
        entry = record.get(part)
        if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
            raise ToxicityModelError(f"{where}: expected {part!r} with a 'text' string")
        score = entry.get("toxicity")
        if score is None or not entry["text"].strip():
            continue
        if not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
            raise ToxicityModelError(f"{where}: {part}.toxicity must be in [0, 1], got {score!r}")
        out.append(ScoredText(entry["text"], float(score), part, record["filename"]))
    return out


def is_heldout(document: str, fraction: float, salt: str) -> bool:
    """Deterministic document-level split: a salted SHA-256 of the document id below ``fraction``."""
    digest = hashlib.sha256(f"{salt}\0{document}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def split_rtp(rows: Sequence[ScoredText], settings: TrainSettings) -> tuple[list[ScoredText], list[ScoredText]]:
    """(train, held-out) by source document."""
    held = [is_heldout(r.document, settings.rtp_heldout_fraction, settings.split_salt) for r in rows]
    return [r for r, h in zip(rows, held) if not h], [r for r, h in zip(rows, held) if h]


def training_data_fingerprint(settings: TrainSettings, data_dir: str | os.PathLike | None = None) -> dict:
    files = list(RTP_FILES) + ([DAVIDSON_FILE] if settings.davidson_weight > 0 else [])
    return {relative: file_sha256(dataset_path(relative, data_dir)) for relative in files}


def train_default_model(
    data_dir: str | os.PathLike | None = None,
    settings: TrainSettings = TrainSettings(),
    reference: Callable[[list[str]], list[float]] | None = None,
    progress: bool = True,
) -> TfidfLogisticModel:
    """The ``jaxlm`` scorer's model: RTP training split with soft Perspective targets (+ Davidson
    if weighted), and stacking weights that combine it with ``reference`` (default profanity-check),
    fitted on out-of-fold predictions over ``settings.stack_folds`` document folds."""
    from tqdm import tqdm

    if reference is None:
        reference = ProfanityCheckScorer()
    train, heldout = split_rtp(load_rtp_scores(data_dir), settings)
    extra_texts: list[str] = []
    extra_targets: list[float] = []
    if settings.davidson_weight > 0:
        from jaxlm.data.labelled import load_davidson

        davidson = load_davidson(data_dir)
        extra_texts, extra_targets = list(davidson.texts), [float(label) for label in davidson.labels]

    def fit(rows: list[ScoredText], meta: dict | None = None) -> TfidfLogisticModel:
        texts = [r.text for r in rows] + extra_texts
        targets = [r.toxicity for r in rows] + extra_targets
        weights = [1.0] * len(rows) + [settings.davidson_weight] * len(extra_texts)
        return train_scorer(texts, targets, settings, weights, meta)

    folds = np.array([_fold(r.document, settings) for r in train])
    out_of_fold = np.zeros(len(train))
    bar = tqdm(total=settings.stack_folds + 1, desc="training jaxlm toxicity scorer", disable=not progress)
    for fold in range(settings.stack_folds):
        held = folds == fold
        fold_model = fit([r for r, h in zip(train, held) if not h])
        out_of_fold[held] = fold_model.predict([r.text for r, h in zip(train, held) if h])
        bar.update(1)
    texts = [r.text for r in train]
    stack = fit_stack(out_of_fold, reference(texts), [r.toxicity for r in train])
    meta = {
        "settings": settings.to_dict(),
        "data_sha256": training_data_fingerprint(settings, data_dir),
        "rtp_train_texts": len(train),
        "rtp_heldout_texts": len(heldout),
        "davidson_texts": len(extra_texts),
        "stacked_with": getattr(reference, "name", repr(reference)),
        "versions": {name: _version(name) for name in ("scikit-learn", "alt-profanity-check")},
    }
    model = fit(train, meta)
    bar.update(1)
    bar.close()
    return dataclasses.replace(model, stack=stack)


def _fold(document: str, settings: TrainSettings) -> int:
    digest = hashlib.sha256(f"{settings.split_salt}\0fold\0{document}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % settings.stack_folds


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def cache_dir() -> Path:
    """``$JAXLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxlm``, else ``~/.cache/jaxlm``."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "jaxlm"


def default_model_path(settings: TrainSettings = TrainSettings()) -> Path:
    return cache_dir() / "toxicity" / f"jaxlm-tfidf-{settings.fingerprint()}.npz"


def load_or_train_default_model(
    data_dir: str | os.PathLike | None = None, settings: TrainSettings = TrainSettings()
) -> TfidfLogisticModel:
    """The cached default model; (re)trained from the data directory when absent or stale.

    Stale = the data directory is available and its RTP files differ from those the cached
    model was trained on. Without data, a cached model is used as it is.
    """
    path = default_model_path(settings)
    try:
        fingerprint = training_data_fingerprint(settings, data_dir)
    except MissingDataError as err:
        if path.is_file():
            return TfidfLogisticModel.load(path)
        raise MissingDataError(
            f"the jaxlm toxicity scorer has no trained model at {path} and cannot train one: {err}. "
            "Set JAXLM_DATA_DIR (or pass data_dir=) to the shared corpora and it is trained on first use "
            "(or run `python tools/calibrate_scorers.py`), pass model_path= to a trained .npz, "
            "or use get_scorer('profanity-check')"
        ) from None
    if path.is_file():
        model = TfidfLogisticModel.load(path)
        if model.meta.get("data_sha256") == fingerprint:
            return model
        log.warning("toxicity model %s was trained on other data; retraining", path)
    log.warning("training the jaxlm toxicity scorer (one-off, cached at %s)", path)
    # A progress bar only on a terminal: commands with their own --no-progress, and a one-line
    # error of a command that loaded the scorer first, must not carry one.
    model = train_default_model(data_dir, settings, progress=sys.stderr.isatty())
    model.save(path)
    return model
