"""Toxicity scorers: one interface, several backends.

A scorer is a callable ``list[str] -> list[float]``: the probability that each text is toxic,
in [0, 1], in input order. It works in batches internally (``batch_size``), accepts an empty
list, scores blank texts (empty or whitespace) 0 without consulting the backend (Perspective
refuses empty comments), and rejects anything that is not a list of strings (``TypeError``).

``get_scorer(name="default", **options)`` is the stable entry point. Backends:

``"profanity-check"``
    The offline linear SVM (TF-IDF words, calibrated) shipped in the PyPI package
    ``alt-profanity-check``. Option: ``batch_size``.
``"jaxlm-tfidf"``
    A hashed word + character n-gram TF-IDF logistic regression trained by jaxlm
    (``jaxlm.evaluate.toxicity_model``) on the training split of the RTP texts with their
    Perspective scores as soft targets. Options: ``model_path`` (a trained ``.npz``; default:
    the cache, ``$JAXLM_CACHE_DIR`` or ``~/.cache/jaxlm``, trained there on first use from
    ``$JAXLM_DATA_DIR`` or ``data_dir``), ``data_dir``, ``batch_size``.
``"jaxlm"``
    ``"jaxlm-tfidf"`` and ``"profanity-check"`` combined by a logistic stacking layer fitted to
    the Perspective scores (weights in the same model file); same options.
``"perspective"``
    The Perspective API (Comment Analyzer ``comments:analyze``, attribute ``TOXICITY``).
    Options: ``api_key`` (default ``$PERSPECTIVE_API_KEY``), ``base_url``, ``qps``,
    ``max_retries``, ``initial_backoff``, ``max_backoff``, ``timeout``, ``languages``,
    ``workers``, ``batch_size``.

``"default"`` is ``DEFAULT_SCORER`` (``"jaxlm"``): it agrees best with Perspective on held-out
RTP texts; see ``docs/toxicity_calibration.md`` for the numbers and the command.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np

from jaxlm.errors import JaxlmError
from jaxlm.evaluate.scorer import (  # noqa: F401 (re-exported: the interface and the profanity-check backend)
    ProfanityCheckScorer,
    Scorer,
    ScorerUnavailableError,
    ToxicityScorer,
    check_texts,
    profanity_check_model,
)


DEFAULT_SCORER = "jaxlm"
PERSPECTIVE_URL = "https://commentanalyzer.googleapis.com/v1alpha1"
PERSPECTIVE_KEY_ENV = "PERSPECTIVE_API_KEY"
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


class UnknownScorerError(JaxlmError, ValueError):
    """No toxicity scorer of that name; the message lists the valid ones."""


class PerspectiveError(JaxlmError, RuntimeError):
    """The Perspective API refused a request or could not be reached; names status and message."""

    def __init__(self, message: str, status: int | None = None, reason: str = ""):
        super().__init__(message)
        self.status = status
        self.reason = reason


# ---------------------------------------------------------------------------------------
# Interface
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# jaxlm-trained scorers
# ---------------------------------------------------------------------------------------


class JaxlmTfidfScorer(ToxicityScorer):
    """The hashed TF-IDF logistic regression trained by jaxlm (``toxicity_model``)."""

    name = "jaxlm-tfidf"

    def __init__(self, model_path: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None,
                 batch_size: int = 1024):
        from jaxlm.evaluate.toxicity_model import TfidfLogisticModel, load_or_train_default_model

        super().__init__(batch_size)
        if model_path is not None:
            self.model = TfidfLogisticModel.load(model_path)
        else:
            self.model = load_or_train_default_model(data_dir)

    def score_batch(self, texts: list[str]) -> np.ndarray:
        return self.model.predict(texts)


class JaxlmScorer(ToxicityScorer):
    """The jaxlm TF-IDF model stacked with profanity-check: ``sigmoid(w0 * logit(jaxlm-tfidf) +
    w1 * logit(profanity-check) + b)``, weights from the model file (``train_default_model``)."""

    name = "jaxlm"

    def __init__(self, model_path: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None,
                 batch_size: int = 1024):
        super().__init__(batch_size)
        self.tfidf = JaxlmTfidfScorer(model_path, data_dir, batch_size)
        if self.tfidf.model.stack is None:
            from jaxlm.evaluate.toxicity_model import ToxicityModelError

            raise ToxicityModelError(
                f"jaxlm scorer: the model {model_path or ''} has no stacking weights (made by train_scorer, not "
                "train_default_model); use it as get_scorer('jaxlm-tfidf', model_path=...)"
            )
        self.reference = ProfanityCheckScorer(batch_size)

    def score_batch(self, texts: list[str]) -> np.ndarray:
        from jaxlm.evaluate.toxicity_model import stacked_probability

        own = self.tfidf.score_batch(texts)
        return stacked_probability(self.tfidf.model.stack, own, self.reference.score_batch(texts))


# ---------------------------------------------------------------------------------------
# Perspective API
# ---------------------------------------------------------------------------------------


class RateLimiter:
    """Spaces calls at least ``1 / qps`` seconds apart (thread-safe)."""

    def __init__(self, qps: float, clock: Callable[[], float] = time.monotonic, sleep=time.sleep):
        if not qps > 0:
            raise ValueError(f"qps must be > 0, got {qps}")
        self.interval = 1.0 / qps
        self._clock, self._sleep = clock, sleep
        self._next = -math.inf
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self._sleep(start - now)


def _api_error(err: urllib.error.HTTPError) -> tuple[str, str]:
    """(message, reason) from a Google API error body ``{"error": {...}}``, best effort."""
    try:
        body = err.read().decode("utf-8", "replace")
    except OSError:
        body = ""
    try:
        error = json.loads(body)["error"]
        reasons = [d.get("errorType") or d.get("reason") for d in error.get("details", []) if isinstance(d, dict)]
        reason = ", ".join(r for r in [error.get("status")] + reasons if r)
        return str(error.get("message", "")), reason
    except (ValueError, KeyError, TypeError, AttributeError):
        return body.strip()[:300] or str(err.reason), ""


def _retry_after(err: urllib.error.HTTPError) -> float | None:
    try:
        return max(0.0, float(err.headers.get("Retry-After", "")))
    except (TypeError, ValueError):
        return None


class PerspectiveScorer(ToxicityScorer):
    """Perspective API client: TOXICITY summary score per text, one request per text.

    Requests are spaced to ``qps`` (the default quota is 1 query per second) across up to
    ``workers`` threads. HTTP 429 and 5xx responses, timeouts and connection errors are retried
    up to ``max_retries`` times with exponential backoff (``initial_backoff * 2**attempt``,
    capped at ``max_backoff``; a ``Retry-After`` header is honoured up to that cap). Other
    HTTP errors (bad key, unsupported language, malformed request) fail at once with a
    ``PerspectiveError`` naming the status and the API's message.
    """

    name = "perspective"

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str = PERSPECTIVE_URL,
        qps: float = 1.0,
        max_retries: int = 5,
        initial_backoff: float = 1.0,
        max_backoff: float = 60.0,
        timeout: float = 30.0,
        languages: Sequence[str] = ("en",),
        workers: int = 1,
        batch_size: int = 64,
    ):
        super().__init__(batch_size)
        api_key = api_key if api_key is not None else os.environ.get(PERSPECTIVE_KEY_ENV)
        if not api_key:
            raise ScorerUnavailableError(
                f"perspective scorer: no API key; pass api_key= or set {PERSPECTIVE_KEY_ENV}"
            )
        if max_retries < 0 or initial_backoff < 0 or max_backoff < 0 or timeout <= 0 or workers < 1:
            raise ValueError(
                "perspective scorer: need max_retries >= 0, initial_backoff >= 0, max_backoff >= 0, "
                f"timeout > 0, workers >= 1; got {max_retries}, {initial_backoff}, {max_backoff}, {timeout}, {workers}"
            )
        if isinstance(languages, str):
            languages = (languages,)
        self.url = f"{base_url.rstrip('/')}/comments:analyze?" + urllib.parse.urlencode({"key": api_key})
        self.endpoint = f"{base_url.rstrip('/')}/comments:analyze"  # for messages: never shows the key
        self.limiter = RateLimiter(qps)
        self.max_retries, self.initial_backoff, self.max_backoff = max_retries, initial_backoff, max_backoff
        self.timeout, self.languages, self.workers = timeout, list(languages), workers

    def _request(self, text: str) -> float:
        request_body = {"comment": {"text": text}, "requestedAttributes": {"TOXICITY": {}}, "doNotStore": True}
        if self.languages:  # none given: the API detects the language
            request_body["languages"] = self.languages
        body = json.dumps(request_body).encode()
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            payload = json.loads(response.read().decode("utf-8"))
        try:
            value = float(payload["attributeScores"]["TOXICITY"]["summaryScore"]["value"])
        except (KeyError, TypeError, ValueError):
            raise PerspectiveError(
                f"Perspective API ({self.endpoint}): response without attributeScores.TOXICITY.summaryScore.value: "
                f"{json.dumps(payload)[:300]}"
            ) from None
        if not 0.0 <= value <= 1.0:
            raise PerspectiveError(f"Perspective API ({self.endpoint}): TOXICITY score {value} outside [0, 1]")
        return value

    def score_text(self, text: str) -> float:
        """One text's TOXICITY, with rate limiting and retries."""
        last = ""
        for attempt in range(self.max_retries + 1):
            delay = min(self.max_backoff, self.initial_backoff * 2.0**attempt)
            self.limiter.wait()
            try:
                return self._request(text)
            except urllib.error.HTTPError as err:
                message, reason = _api_error(err)
                detail = f"HTTP {err.code}" + (f" {reason}" if reason else "") + f": {message}"
                if err.code not in RETRYABLE_STATUS:
                    raise PerspectiveError(
                        f"Perspective API ({self.endpoint}) refused the request: {detail}", err.code, reason
                    ) from None
                retry_after = _retry_after(err)
                if retry_after is not None:
                    delay = min(self.max_backoff, max(delay, retry_after))
                last, status = detail, err.code
            except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError) as err:
                last, status = f"{type(err).__name__}: {getattr(err, 'reason', err)}", None
            except json.JSONDecodeError as err:
                raise PerspectiveError(f"Perspective API ({self.endpoint}): response is not JSON ({err.msg})") from None
            if attempt < self.max_retries:
                time.sleep(delay)
        raise PerspectiveError(
            f"Perspective API ({self.endpoint}): gave up after {self.max_retries + 1} attempts; last error: {last}",
            status,
        )

    def _score_named(self, text: str) -> float:
        try:
            return self.score_text(text)
        except PerspectiveError as err:
            excerpt = text if len(text) <= 60 else text[:57] + "..."
            raise PerspectiveError(f"{err} [text: {excerpt!r}]", err.status, err.reason) from None

    def score_batch(self, texts: list[str]) -> np.ndarray:
        if self.workers == 1 or len(texts) == 1:
            return np.array([self._score_named(t) for t in texts], np.float64)
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return np.array(list(pool.map(self._score_named, texts)), np.float64)


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------

BACKENDS: dict[str, type[ToxicityScorer]] = {
    "profanity-check": ProfanityCheckScorer,
    "jaxlm": JaxlmScorer,
    "jaxlm-tfidf": JaxlmTfidfScorer,
    "perspective": PerspectiveScorer,
}
ALIASES = {"default": DEFAULT_SCORER}


def scorer_names() -> list[str]:
    return sorted(ALIASES) + sorted(BACKENDS)


def get_scorer(name: str = "default", **options) -> ToxicityScorer:
    """A toxicity scorer ``list[str] -> list[float]`` by backend name (see the module docstring).

    ``options`` go to the backend (e.g. ``get_scorer("perspective", qps=5)``); an unknown
    name or option is a ``ValueError`` / ``TypeError`` listing the valid ones.
    """
    backend = BACKENDS.get(ALIASES.get(name, name))
    if backend is None:
        raise UnknownScorerError(f"unknown toxicity scorer {name!r}; valid names: {', '.join(scorer_names())}")
    valid = [p for p in inspect.signature(backend.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"toxicity scorer {name!r}: unknown option(s) {unknown}; valid options: {', '.join(valid)}")
    return backend(**options)
