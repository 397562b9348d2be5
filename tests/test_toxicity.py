"""Toxicity scorers: offline backends on fixed strings, the jaxlm-trained model (training, file
round trip, cache), the Perspective client against a local fake server, and agreement of the
default scorer with the Perspective scores of the real RTP texts."""

import dataclasses
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from jaxlm.evaluate import toxicity_model as tm
from jaxlm.evaluate.toxicity import (
    DEFAULT_SCORER,
    JaxlmScorer,
    PerspectiveError,
    RateLimiter,
    ScorerUnavailableError,
    get_scorer,
)
from jaxlm.paths import MissingDataError

TOXIC = "You are a stupid worthless idiot and everyone hates you"
NEUTRAL = "The weather is lovely today and the garden is in bloom"
MIXED = [TOXIC, NEUTRAL, "shut up you moron", "We walked along the river after lunch", "", "   "]

INSULTS = ["you stupid idiot", "shut up moron", "worthless scum", "you are a pathetic loser", "idiot moron fool",
           "stupid worthless trash", "you disgusting pig", "go away you dumb idiot", "what a stupid moron",
           "pathetic worthless loser"]
PLAIN = ["the river ran past old houses", "children read books under trees", "a quiet morning walk",
         "old stone bridges in the town", "the weather is lovely today", "we had lunch in the garden",
         "the train leaves at noon", "she planted tomatoes in spring", "a cup of tea by the window",
         "the library opens on monday"]


def small_settings(**changes):
    features = tm.FeatureSettings(word_features=2**10, char_features=2**11)
    return tm.TrainSettings(features=features, inverse_regularisation=10.0, **changes)


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    """A jaxlm TF-IDF model trained on crafted insults vs plain sentences (soft targets), with
    stacking weights (fitted in-sample here: enough for the scorer's mechanics)."""
    texts = INSULTS + PLAIN
    targets = [0.95] * len(INSULTS) + [0.05] * len(PLAIN)
    model = tm.train_scorer(texts, targets, small_settings(), meta={"what": "crafted"})
    stack = tm.fit_stack(model.predict(texts), get_scorer("profanity-check")(texts), targets)
    return dataclasses.replace(model, stack=stack).save(tmp_path_factory.mktemp("model") / "tiny.npz")


def offline_scorers(model_path):
    return {
        "profanity-check": get_scorer("profanity-check"),
        "jaxlm-tfidf": get_scorer("jaxlm-tfidf", model_path=model_path),
        "jaxlm": get_scorer("jaxlm", model_path=model_path),
    }


# ---------------------------------------------------------------------------------------
# Offline backends
# ---------------------------------------------------------------------------------------


def test_offline_scorers_on_fixed_strings(tiny_model_path):
    for name, scorer in offline_scorers(tiny_model_path).items():
        scores = scorer(MIXED)
        assert len(scores) == len(MIXED) and all(isinstance(s, float) for s in scores), name
        assert all(0.0 <= s <= 1.0 for s in scores), name
        assert scores[0] > 0.5 > scores[1], (name, scores)  # insult above the neutral sentence
        assert scores[2] > scores[3], (name, scores)
        assert scores[4] == scores[5] == 0.0, name  # blank texts are not toxic
        assert scorer([NEUTRAL]) == pytest.approx([scores[1]], abs=1e-12), name  # batch == single
        assert scorer([]) == [], name


def test_batch_size_does_not_change_scores(tiny_model_path):
    texts = MIXED * 3
    for name in ("profanity-check", "jaxlm"):
        options = {} if name == "profanity-check" else {"model_path": tiny_model_path}
        whole = get_scorer(name, **options)(texts)
        chunked = get_scorer(name, batch_size=2, **options)(texts)
        assert chunked == pytest.approx(whole, abs=1e-12), name


def test_jaxlm_scorer_stacks_its_members(tiny_model_path, tmp_path):
    scorers = offline_scorers(tiny_model_path)
    texts = MIXED[:4]
    own, reference = np.array(scorers["jaxlm-tfidf"](texts)), np.array(scorers["profanity-check"](texts))
    w_own, w_reference, bias = tm.TfidfLogisticModel.load(tiny_model_path).stack
    logit = lambda p: np.log(np.clip(p, 1e-6, 1 - 1e-6)) - np.log1p(-np.clip(p, 1e-6, 1 - 1e-6))
    expected = 1 / (1 + np.exp(-(w_own * logit(own) + w_reference * logit(reference) + bias)))
    assert scorers["jaxlm"](texts) == pytest.approx(expected.tolist(), abs=1e-9)
    bare = dataclasses.replace(tm.TfidfLogisticModel.load(tiny_model_path), stack=None).save(tmp_path / "bare.npz")
    with pytest.raises(tm.ToxicityModelError, match="no stacking weights.*jaxlm-tfidf"):
        get_scorer("jaxlm", model_path=bare)


def test_fit_stack_recovers_the_weights_of_a_known_combination():
    rng = np.random.default_rng(0)
    own, reference = rng.uniform(0.02, 0.98, 500), rng.uniform(0.02, 0.98, 500)
    true = np.array([0.7, 0.4, -0.3])
    stack = tm.fit_stack(own, reference, tm.stacked_probability(true, own, reference))
    assert stack == pytest.approx(true, abs=0.05)


def test_scorers_reject_bad_input(tiny_model_path):
    scorer = get_scorer("profanity-check")
    with pytest.raises(TypeError, match="single string"):
        scorer(TOXIC)
    with pytest.raises(TypeError, match=r"texts\[1\] is int, expected str"):
        scorer([TOXIC, 3])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        get_scorer("jaxlm-tfidf", model_path=tiny_model_path, batch_size=0)


def test_get_scorer_names_and_options(tiny_model_path):
    with pytest.raises(ValueError, match="unknown toxicity scorer 'roberta'; valid names: default, jaxlm, "
                                         "jaxlm-tfidf, perspective, profanity-check"):
        get_scorer("roberta")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['qps'\]; valid options: batch_size"):
        get_scorer("profanity-check", qps=3)
    default = get_scorer("default", model_path=tiny_model_path)
    assert type(default) is type(get_scorer(DEFAULT_SCORER, model_path=tiny_model_path))
    assert isinstance(default, JaxlmScorer) and default(MIXED) == get_scorer("jaxlm", model_path=tiny_model_path)(MIXED)


# ---------------------------------------------------------------------------------------
# The jaxlm-trained model
# ---------------------------------------------------------------------------------------


def test_trained_model_round_trip(tiny_model_path, tmp_path):
    model = tm.TfidfLogisticModel.load(tiny_model_path)
    assert model.meta == {"what": "crafted"} and model.features == small_settings().features
    again = tm.TfidfLogisticModel.load(model.save(tmp_path / "copy.npz"))
    assert np.array_equal(again.predict(MIXED), model.predict(MIXED))
    # retraining from the same inputs is deterministic
    retrained = tm.train_scorer(INSULTS + PLAIN, [0.95] * 10 + [0.05] * 10, small_settings(), meta={"what": "crafted"})
    assert np.allclose(retrained.predict(MIXED), model.predict(MIXED), atol=1e-6)


def test_soft_targets_follow_the_target_level():
    texts = INSULTS + PLAIN
    low = tm.train_scorer(texts, [0.6] * 10 + [0.4] * 10, small_settings())
    high = tm.train_scorer(texts, [0.99] * 10 + [0.01] * 10, small_settings())
    assert 0.4 < low.predict([INSULTS[0]])[0] < 0.7 < high.predict([INSULTS[0]])[0]


def test_model_file_and_training_errors(tiny_model_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz does not exist"):
        get_scorer("jaxlm-tfidf", model_path=tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not an archive")
    with pytest.raises(tm.ToxicityModelError, match="junk.npz: not a readable .npz"):
        tm.TfidfLogisticModel.load(tmp_path / "junk.npz")
    with np.load(tiny_model_path) as archive:
        arrays = dict(archive)
    np.savez(tmp_path / "short.npz", **{**arrays, "coef": arrays["coef"][:5]})
    with pytest.raises(tm.ToxicityModelError, match=r"short.npz: coef: expected shape \(3072,\), got \(5,\)"):
        tm.TfidfLogisticModel.load(tmp_path / "short.npz")
    np.savez(tmp_path / "other.npz", **{**arrays, "header": np.array(json.dumps({"format": "pickle"}))})
    with pytest.raises(tm.ToxicityModelError, match="format 'pickle'"):
        tm.TfidfLogisticModel.load(tmp_path / "other.npz")
    with pytest.raises(tm.ToxicityModelError, match="targets must be probabilities"):
        tm.train_scorer(["a", "b"], [0.0, 1.5], small_settings())
    with pytest.raises(tm.ToxicityModelError, match="2 texts, 1 targets"):
        tm.train_scorer(["a", "b"], [0.0], small_settings())
    with pytest.raises(tm.ToxicityModelError, match="both toxic and non-toxic"):
        tm.train_scorer(["a", "b"], [0.0, 0.0], small_settings())


def test_document_split_is_deterministic_and_keeps_documents_together():
    rows = [tm.ScoredText(f"text {i} {part}", 0.5, part, f"doc{i}") for i in range(2000) for part in tm.RTP_PARTS]
    settings = small_settings(rtp_heldout_fraction=0.25)
    train, heldout = tm.split_rtp(rows, settings)
    assert tm.split_rtp(rows, settings) == (train, heldout)
    assert len(train) + len(heldout) == len(rows) and abs(len(heldout) / len(rows) - 0.25) < 0.04
    assert not {r.document for r in train} & {r.document for r in heldout}
    other = tm.split_rtp(rows, small_settings(rtp_heldout_fraction=0.25, split_salt="other"))[1]
    assert {r.document for r in other} != {r.document for r in heldout}


def write_crafted_rtp(root, toxic_scale=1.0):
    rtp = root / "eval" / "rtp"
    rtp.mkdir(parents=True, exist_ok=True)
    for name, (prompts, score) in {"toxic": (INSULTS, 0.9 * toxic_scale), "nontoxic": (PLAIN, 0.05)}.items():
        with (rtp / f"{name}.jsonl").open("w") as handle:
            for i, text in enumerate(prompts * 3):
                record = {"filename": f"{name}-{i}.txt", "prompt": {"text": text, "toxicity": score},
                          "continuation": {"text": f"{text} again", "toxicity": None if i == 0 else score}}
                handle.write(json.dumps(record) + "\n")


def test_default_model_is_trained_on_demand_cached_and_retrained_when_data_change(tmp_path, monkeypatch):
    monkeypatch.setenv(tm.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv("JAXLM_DATA_DIR", raising=False)
    settings = small_settings()
    with pytest.raises(MissingDataError, match="JAXLM_DATA_DIR.*profanity-check"):
        tm.load_or_train_default_model(settings=settings)
    data = tmp_path / "data"
    write_crafted_rtp(data)
    rows = tm.load_rtp_scores(data)
    assert len(rows) == 2 * 30 * 2 - 2  # the continuations without a score are left out
    model = tm.load_or_train_default_model(data, settings)
    path = tm.default_model_path(settings)
    assert path.is_file() and path.parent == tmp_path / "cache" / "toxicity"
    train, heldout = tm.split_rtp(rows, settings)
    assert model.meta["rtp_train_texts"] == len(train) and model.meta["rtp_heldout_texts"] == len(heldout) > 0
    assert model.stack is not None and model.meta["stacked_with"] == "profanity-check"
    assert get_scorer("jaxlm", model_path=path)(MIXED[:2])[0] > 0.5

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the cache is valid")

    monkeypatch.setattr(tm, "train_default_model", no_training)
    assert np.array_equal(tm.load_or_train_default_model(data, settings).predict(MIXED), model.predict(MIXED))
    assert np.array_equal(tm.load_or_train_default_model(None, settings).coef, model.coef)  # no data: cache as is
    monkeypatch.undo()
    monkeypatch.setenv(tm.CACHE_DIR_ENV, str(tmp_path / "cache"))
    write_crafted_rtp(data, toxic_scale=0.5)  # new data -> a stale cache is retrained
    changed = tm.load_or_train_default_model(data, settings)
    assert changed.meta["data_sha256"] != model.meta["data_sha256"]
    assert tm.TfidfLogisticModel.load(path).meta == changed.meta


def test_rtp_loader_names_the_bad_line(tmp_path):
    write_crafted_rtp(tmp_path)
    path = tmp_path / "eval" / "rtp" / "toxic.jsonl"
    path.write_text(path.read_text() + '{"filename": "x", "prompt": {"text": "a", "toxicity": 3}}\n')
    with pytest.raises(tm.ToxicityModelError, match=r"toxic.jsonl:31: prompt.toxicity must be in \[0, 1\]"):
        tm.load_rtp_scores(tmp_path)


# ---------------------------------------------------------------------------------------
# Perspective API client against a local fake server
# ---------------------------------------------------------------------------------------


class FakePerspective:
    """A stand-in for ``comments:analyze`` on 127.0.0.1, answering from a script of
    ``(status, body, headers, delay)``; once the script is spent it scores texts itself."""

    def __init__(self, script=()):
        self.script = list(script)
        self.requests = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((time.monotonic(), self.path, body))
                status, payload, headers, delay = fake.script.pop(0) if fake.script else (200, None, {}, 0)
                time.sleep(delay)
                if payload is None:
                    score = 0.9 if "idiot" in body["comment"]["text"] else 0.1
                    payload = {"attributeScores": {"TOXICITY": {"summaryScore": {"value": score, "type": "PROBABILITY"}}}}
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1alpha1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def times(self):
        return [t for t, _, _ in self.requests]


def error(status, message, status_name, error_type=None):
    details = [{"@type": "type.googleapis.com/google.commentanalyzer.v1alpha1.Error", "errorType": error_type}] if error_type else []
    return (status, {"error": {"code": status, "message": message, "status": status_name, "details": details}}, {}, 0)


def perspective(fake, **options):
    defaults = {"api_key": "secret-key", "base_url": fake.url, "qps": 1000, "initial_backoff": 0.01,
                "max_backoff": 0.5, "max_retries": 3, "timeout": 2}
    return get_scorer("perspective", **{**defaults, **options})


def test_perspective_success_and_request_format():
    with FakePerspective() as fake:
        scores = perspective(fake, languages=["en", "de"])([TOXIC, NEUTRAL, "  ", ""])
    assert scores == [0.9, 0.1, 0.0, 0.0]
    assert len(fake.requests) == 2  # blank texts are not sent
    _, path, body = fake.requests[0]
    assert path == "/v1alpha1/comments:analyze?key=secret-key"
    assert body == {"comment": {"text": TOXIC}, "requestedAttributes": {"TOXICITY": {}},
                    "languages": ["en", "de"], "doNotStore": True}
    with FakePerspective() as fake:
        perspective(fake, languages=[])([NEUTRAL])
    assert "languages" not in fake.requests[0][2]  # none given: the API detects the language


def test_perspective_needs_a_key(monkeypatch):
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    with pytest.raises(ScorerUnavailableError, match="no API key.*PERSPECTIVE_API_KEY"):
        get_scorer("perspective")
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "from-env")
    with FakePerspective() as fake:
        get_scorer("perspective", base_url=fake.url, qps=1000)([NEUTRAL])
    assert fake.requests[0][1].endswith("key=from-env")


def test_perspective_client_errors_fail_at_once_naming_status_and_message():
    unsupported = error(400, "Attribute TOXICITY does not support request languages: xx", "INVALID_ARGUMENT",
                        "LANGUAGE_NOT_SUPPORTED_BY_ATTRIBUTE")
    with FakePerspective([unsupported]) as fake:
        with pytest.raises(PerspectiveError, match="HTTP 400 INVALID_ARGUMENT, LANGUAGE_NOT_SUPPORTED_BY_ATTRIBUTE: "
                                                   "Attribute TOXICITY does not support request languages: xx") as caught:
            perspective(fake, languages=["xx"])([NEUTRAL])
    assert len(fake.requests) == 1 and caught.value.status == 400 and repr(NEUTRAL) in str(caught.value)
    with FakePerspective([error(403, "API key not valid. Please pass a valid API key.", "PERMISSION_DENIED")]) as fake:
        with pytest.raises(PerspectiveError, match="HTTP 403 PERMISSION_DENIED: API key not valid") as caught:
            perspective(fake)([NEUTRAL])
    assert len(fake.requests) == 1 and "secret-key" not in str(caught.value)


def test_perspective_retries_rate_limits_server_errors_and_timeouts():
    script = [error(429, "Quota exceeded", "RESOURCE_EXHAUSTED"), error(503, "unavailable", "UNAVAILABLE"),
              (200, None, {}, 0.6)]  # the third answer arrives after the client's timeout
    with FakePerspective(script) as fake:
        assert perspective(fake, timeout=0.3)([TOXIC]) == [0.9]
    assert len(fake.requests) == 4
    gaps = np.diff(fake.times())
    assert gaps[0] >= 0.01 and gaps[1] >= 0.02  # exponential backoff: 0.01, 0.02, 0.04 s


def test_perspective_honours_retry_after_on_429():
    with FakePerspective([(429, {"error": {"message": "slow down"}}, {"Retry-After": "0.3"}, 0)]) as fake:
        assert perspective(fake)([NEUTRAL]) == [0.1]
    assert len(fake.requests) == 2 and fake.times()[1] - fake.times()[0] >= 0.3


def test_perspective_gives_up_after_max_retries():
    with FakePerspective([error(500, "backend error", "INTERNAL")] * 5) as fake:
        with pytest.raises(PerspectiveError, match="gave up after 3 attempts; last error: HTTP 500 INTERNAL: backend error"):
            perspective(fake, max_retries=2)([NEUTRAL])
    assert len(fake.requests) == 3


def test_perspective_respects_the_qps_limit_across_workers():
    texts = [f"{NEUTRAL} {i}" for i in range(5)] + [TOXIC]
    with FakePerspective() as fake:
        start = time.monotonic()
        scores = perspective(fake, qps=20, workers=3)(texts)
    assert scores == [0.1] * 5 + [0.9]  # input order, whatever the completion order
    assert max(fake.times()) - start >= 5 / 20 * 0.95  # 6 requests: at least 5 intervals of 1/qps
    assert np.all(np.diff(sorted(fake.times())) >= 1 / 20 * 0.5)


def test_rate_limiter_spacing_with_a_fake_clock():
    now, slept = [0.0], []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(4.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        limiter.wait()
    now[0] += 10.0  # idle time is not banked as a burst
    limiter.wait()
    limiter.wait()
    assert slept == pytest.approx([0.25, 0.25, 0.25])


# ---------------------------------------------------------------------------------------
# Real data: agreement with Perspective on held-out RTP texts
# ---------------------------------------------------------------------------------------


@pytest.mark.data
def test_default_scorer_agrees_with_perspective_on_heldout_rtp(shared_data, shared_dataset, tmp_path, monkeypatch):
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    shared_dataset("eval/rtp/toxic.jsonl")
    shared_dataset("eval/rtp/nontoxic.jsonl")
    monkeypatch.setenv(tm.CACHE_DIR_ENV, str(tmp_path))  # trains the default model here (a few seconds)
    settings = tm.TrainSettings()
    _, heldout = tm.split_rtp(tm.load_rtp_scores(shared_data), settings)
    assert len(heldout) > 1000  # the calibration set: documents the jaxlm model never saw
    texts = [r.text for r in heldout]
    toxic = np.array([r.toxicity for r in heldout])
    results = {}
    for name in ("default", "profanity-check"):
        options = {"data_dir": shared_data} if name == "default" else {}
        scores = get_scorer(name, **options)(texts)
        results[name] = (spearmanr(scores, toxic).statistic, roc_auc_score(toxic >= 0.5, scores))
    # chance is AUC 0.5 / Spearman 0; profanity-check measures about 0.93 / 0.82 on these texts
    assert results["default"][1] > 0.9 and results["default"][0] > 0.75
    # the reason it is the default: it tracks Perspective better than profanity-check
    assert results["default"][0] > results["profanity-check"][0] + 0.02
    assert results["default"][1] > results["profanity-check"][1] + 0.01
