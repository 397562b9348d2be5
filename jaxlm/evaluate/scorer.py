"""The toxicity-scorer interface and the offline profanity-check backend.

``ToxicityScorer`` is the base of every backend in ``jaxlm.evaluate.toxicity`` (which
re-exports these names). ``profanity_check_model`` is the one place the ``alt-profanity-check``
package is loaded: the ``profanity-check`` scorer, the reference the ``jaxlm`` scorer is stacked
with (``toxicity_model``) and the data-preparation toxicity scores (``data.encode``) all use it.
This module imports no other jaxlm scorer module, so ``toxicity`` -> ``toxicity_model`` ->
``scorer`` is one-way.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

from jaxlm.errors import JaxlmError

Scorer = Callable[[list[str]], list[float]]


class ScorerUnavailableError(JaxlmError, RuntimeError):
    """A backend cannot be built here (missing package, key or model); the message says what to do."""



def check_texts(texts: object) -> list[str]:
    """``texts`` as a list of strings, or a ``TypeError`` naming the first bad element."""
    if isinstance(texts, (str, bytes)):
        raise TypeError("a toxicity scorer takes a list of texts, got a single string; wrap it in a list")
    if not isinstance(texts, Sequence):
        raise TypeError(f"a toxicity scorer takes a list of texts, got {type(texts).__name__}")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] is {type(text).__name__}, expected str")
    return list(texts)


class ToxicityScorer:
    """Base class: validates input, splits it into batches, checks every batch's output."""

    name = "scorer"

    def __init__(self, batch_size: int = 1024):
        if batch_size < 1:
            raise ValueError(f"{self.name}: batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    def score_batch(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, texts: list[str]) -> list[float]:
        texts = check_texts(texts)
        scores = np.zeros(len(texts), np.float64)  # blank texts are not toxic: 0, never sent to a backend
        todo = [i for i, text in enumerate(texts) if text.strip()]
        for start in range(0, len(todo), self.batch_size):
            index = todo[start : start + self.batch_size]
            out = np.asarray(self.score_batch([texts[i] for i in index]), np.float64).reshape(-1)
            if out.shape != (len(index),) or not np.all(np.isfinite(out)):
                raise RuntimeError(f"{self.name}: expected {len(index)} finite scores, got {out.shape} {out[:4]}")
            if np.any(out < -1e-6) or np.any(out > 1 + 1e-6):
                raise RuntimeError(f"{self.name}: scores outside [0, 1]: {out[(out < 0) | (out > 1)][:4]}")
            scores[index] = np.clip(out, 0.0, 1.0)
        return scores.tolist()

    def __repr__(self) -> str:
        return f"<toxicity scorer {self.name!r}>"


# ---------------------------------------------------------------------------------------
# profanity-check
# ---------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def profanity_check_model():
    """(vectorizer, classifier) of alt-profanity-check, loaded once, version warnings silenced."""
    try:
        from sklearn.exceptions import InconsistentVersionWarning
    except ImportError:  # older scikit-learn: the warning is a plain UserWarning
        InconsistentVersionWarning = UserWarning
    with warnings.catch_warnings():
        # The package ships joblib pickles made with some scikit-learn version; loading them with
        # another one warns. The calibration report measures the model as loaded here.
        warnings.simplefilter("ignore", InconsistentVersionWarning)
        try:
            from profanity_check import profanity_check as package
        except ImportError as err:
            raise ScorerUnavailableError(
                f"profanity-check scorer: cannot import the alt-profanity-check package ({err}); "
                "install it with `pip install alt-profanity-check==1.9.1`"
            ) from None
    return package.vectorizer, package.model


class ProfanityCheckScorer(ToxicityScorer):
    """alt-profanity-check's calibrated linear SVM on TF-IDF words."""

    name = "profanity-check"

    def __init__(self, batch_size: int = 4096):
        super().__init__(batch_size)
        self._vectorizer, self._model = profanity_check_model()
        self._positive = list(self._model.classes_).index(1)

    def score_batch(self, texts: list[str]) -> np.ndarray:
        return self._model.predict_proba(self._vectorizer.transform(texts))[:, self._positive]
