import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from jaxlm.evaluate.toxicity import PerspectiveScorer, RateLimiter, ScorerError, get_scorer

TOXIC = "You are a stupid worthless idiot and everyone hates you"
NEUTRAL = "The weather is lovely today and the garden is in bloom"


def test_default_scorer_orders_fixed_strings_and_batches_consistently():
    scorer = get_scorer()
    scores = scorer([TOXIC, NEUTRAL, ""])
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores[0] > 0.8 > 0.2 > scores[1]
    assert scorer([NEUTRAL]) == pytest.approx([scores[1]])
    assert scorer([]) == []
    assert get_scorer("profanity-check")([TOXIC]) == pytest.approx([scores[0]])


def test_unknown_scorer_lists_the_valid_ones():
    with pytest.raises(ScorerError, match="unknown toxicity scorer 'roberta'; valid scorers: default, profanity-check, perspective"):
        get_scorer("roberta")


def test_perspective_needs_a_key(monkeypatch):
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    with pytest.raises(ScorerError, match="no API key"):
        get_scorer("perspective")


class FakePerspective:
    """A local stand-in for comments:analyze: replies from a script of (status, body)."""

    def __init__(self, script):
        self.script = list(script)
        self.requests = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((time.monotonic(), self.path, body))
                status, payload = fake.script.pop(0) if fake.script else (200, None)
                if payload is None:
                    score = 0.9 if "idiot" in body["comment"]["text"] else 0.1
                    payload = {"attributeScores": {"TOXICITY": {"summaryScore": {"value": score, "type": "PROBABILITY"}}}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1alpha1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def scorer_for(fake, **options):
    defaults = {"api_key": "k", "base_url": fake.url, "qps": 1000, "backoff": 0.01, "max_retries": 3, "timeout": 5}
    return get_scorer("perspective", **{**defaults, **options})


def test_perspective_success_and_request_format():
    with FakePerspective([]) as fake:
        scores = scorer_for(fake)([TOXIC, NEUTRAL, "  "])
    assert scores == [0.9, 0.1, 0.0]  # blank text is not sent
    assert len(fake.requests) == 2
    _, path, body = fake.requests[0]
    assert path == "/v1alpha1/comments:analyze?key=k"
    assert body["requestedAttributes"] == {"TOXICITY": {}} and body["comment"]["text"] == TOXIC


def test_perspective_retries_rate_limit_and_server_errors():
    with FakePerspective([(429, {"error": {"message": "quota"}}), (503, {}), (200, None)]) as fake:
        assert scorer_for(fake)([TOXIC]) == [0.9]
    assert len(fake.requests) == 3


def test_perspective_client_errors_are_not_retried_and_name_the_status():
    error = {"error": {"message": "Attribute TOXICITY does not support request languages: xx"}}
    with FakePerspective([(400, error)]) as fake:
        with pytest.raises(ScorerError, match="HTTP 400: Attribute TOXICITY does not support"):
            scorer_for(fake)([NEUTRAL])
    assert len(fake.requests) == 1


def test_perspective_gives_up_after_max_retries():
    with FakePerspective([(500, {})] * 4) as fake:
        with pytest.raises(ScorerError, match="HTTP 500"):
            scorer_for(fake, max_retries=2)([NEUTRAL])
    assert len(fake.requests) == 3


def test_perspective_respects_the_qps_limit():
    with FakePerspective([]) as fake:
        scorer_for(fake, qps=20)([NEUTRAL] * 5)
    times = [t for t, _, _ in fake.requests]
    assert times[-1] - times[0] >= 4 / 20 * 0.9


def test_rate_limiter_spacing_with_a_fake_clock():
    now = [0.0]
    slept = []

    def sleep(dt):
        slept.append(dt)
        now[0] += dt

    limiter = RateLimiter(4.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        limiter.wait()
    assert slept == pytest.approx([0.25, 0.25])


def test_default_scorer_tracks_perspective_on_the_rtp_texts(shared_dataset):
    from sklearn.metrics import roc_auc_score

    texts, perspective = [], []
    for name in ("toxic.jsonl", "nontoxic.jsonl"):
        for line in shared_dataset(f"eval/rtp/{name}").read_text().splitlines():
            record = json.loads(line)
            for part in ("prompt", "continuation"):
                if record[part].get("toxicity") is not None:
                    texts.append(record[part]["text"])
                    perspective.append(record[part]["toxicity"])
    scores = np.asarray(get_scorer()(texts))
    auc = roc_auc_score(np.asarray(perspective) >= 0.5, scores)
    assert len(texts) > 4000
    assert auc > 0.85  # measured 0.93 (docs/toxicity_calibration.md); chance is 0.5
