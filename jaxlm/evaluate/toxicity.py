"""Toxicity scorers: one interface, ``list[str] -> list[float]`` (probability of toxicity).

``get_scorer(name="default", **options)`` is the stable entry point. Backends:

* ``"profanity-check"`` (``"default"``): the offline linear model shipped in the PyPI
  package ``alt-profanity-check``. Fast, no network. See ``docs/toxicity_calibration.md``
  for how well it tracks the Perspective API on the RTP texts.
* ``"perspective"``: the Perspective API (Comment Analyzer, TOXICITY), for runs with a
  network and a key (``api_key=`` or ``$PERSPECTIVE_API_KEY``). Client-side rate limit,
  retries with exponential backoff on 429/5xx/network errors, clear errors otherwise.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
import warnings
from typing import Callable, Sequence

Scorer = Callable[[Sequence[str]], list[float]]

PERSPECTIVE_URL = "https://commentanalyzer.googleapis.com/v1alpha1"


class ScorerError(ValueError):
    """A scorer could not be built or could not score; the message says why."""


# ---------------------------------------------------------------------------------------
# Offline: alt-profanity-check
# ---------------------------------------------------------------------------------------


class ProfanityCheckScorer:
    """``profanity_check.predict_prob`` (a linear SVM on word n-grams, calibrated)."""

    name = "profanity-check"

    def __init__(self) -> None:
        with warnings.catch_warnings():  # the shipped model was pickled by an older sklearn
            warnings.simplefilter("ignore")
            from profanity_check import predict_prob

        self._predict = predict_prob

    def __call__(self, texts: Sequence[str]) -> list[float]:
        texts = list(texts)
        if not texts:
            return []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [float(p) for p in self._predict(texts)]


# ---------------------------------------------------------------------------------------
# Online: the Perspective API
# ---------------------------------------------------------------------------------------


class RateLimiter:
    """At most ``qps`` calls per second (thread-safe): waits before each call as needed."""

    def __init__(self, qps: float, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        if qps <= 0:
            raise ValueError(f"qps: expected a positive number, got {qps}")
        self.interval = 1.0 / qps
        self._next = 0.0
        self._lock = threading.Lock()
        self._clock, self._sleep = clock, sleep

    def wait(self) -> None:
        with self._lock:
            now = self._clock()
            if now < self._next:
                self._sleep(self._next - now)
                now = self._next
            self._next = now + self.interval


class PerspectiveScorer:
    """The Perspective API's TOXICITY summary score for each text (one request per text)."""

    name = "perspective"
    RETRY_STATUS = (429, 500, 502, 503, 504)

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str = PERSPECTIVE_URL,
        qps: float = 1.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        timeout: float = 30.0,
        languages: Sequence[str] = ("en",),
    ):
        self.api_key = api_key or os.environ.get("PERSPECTIVE_API_KEY")
        if not self.api_key:
            raise ScorerError("perspective: no API key (pass api_key= or set PERSPECTIVE_API_KEY)")
        self.url = f"{base_url.rstrip('/')}/comments:analyze?key={self.api_key}"
        self.limiter = RateLimiter(qps)
        self.max_retries, self.backoff, self.timeout = max_retries, backoff, timeout
        self.languages = list(languages)

    def _request(self, text: str) -> float:
        body = json.dumps(
            {"comment": {"text": text}, "languages": self.languages, "requestedAttributes": {"TOXICITY": {}}}
        ).encode()
        for attempt in range(self.max_retries + 1):
            self.limiter.wait()
            request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read())
                return float(payload["attributeScores"]["TOXICITY"]["summaryScore"]["value"])
            except urllib.error.HTTPError as err:
                detail = _error_message(err)
                if err.code not in self.RETRY_STATUS or attempt == self.max_retries:
                    raise ScorerError(f"perspective: HTTP {err.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                if attempt == self.max_retries:
                    raise ScorerError(f"perspective: request failed after {attempt + 1} attempts: {err}") from None
            except (KeyError, TypeError, ValueError) as err:
                raise ScorerError(f"perspective: unexpected response ({type(err).__name__}: {err})") from None
            time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def __call__(self, texts: Sequence[str]) -> list[float]:
        return [self._request(text) if text.strip() else 0.0 for text in texts]


def _error_message(err: urllib.error.HTTPError) -> str:
    try:
        return json.loads(err.read())["error"]["message"]
    except Exception:
        return err.reason or "no message"


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------

SCORERS: dict[str, Callable[..., Scorer]] = {
    "profanity-check": ProfanityCheckScorer,
    "perspective": PerspectiveScorer,
}
DEFAULT_SCORER = "profanity-check"


def get_scorer(name: str = "default", **options) -> Scorer:
    """A toxicity scorer by name: a callable from a list of texts to a list of probabilities.

    ``"default"`` is the offline ``"profanity-check"``; ``"perspective"`` needs a key.
    """
    key = DEFAULT_SCORER if name == "default" else name
    if key not in SCORERS:
        raise ScorerError(f"unknown toxicity scorer {name!r}; valid scorers: default, {', '.join(SCORERS)}")
    return SCORERS[key](**options)
