import json

import jax
import numpy as np
import pytest

from jaxlm import model
from jaxlm.config import model_preset
from jaxlm.data.labelled import rtp_part
from jaxlm.evaluate import continuations as cont
from jaxlm.evaluate.protocols import EvaluationError
from jaxlm.intervene import build_caa
from jaxlm.paths import MissingDataError
from jaxlm.tokenizer import train_bpe

WORDS = "the river ran past old stone houses while children read books under quiet trees you stupid idiot".split()


def prompts_in(part, count, start=0):
    """``count`` distinct prompts whose RTP part is ``part``."""
    out, i = [], start
    while len(out) < count:
        text = f"prompt {i} about the river"
        if rtp_part(text) == part:
            out.append(text)
        i += 1
    return out


@pytest.fixture(scope="module")
def tok():
    rng = np.random.default_rng(0)
    return train_bpe([" ".join(rng.choice(WORDS, 12)) + "." for _ in range(200)], vocab_size=300)


@pytest.fixture(scope="module")
def cfg(tok):
    return model_preset("tiny", vocab_size=tok.vocab_size)


@pytest.fixture(scope="module")
def params(cfg):
    return model.init_params(cfg, 0)


def write_rtp(directory, rows_by_stem):
    directory.mkdir(parents=True, exist_ok=True)
    for stem, rows in rows_by_stem.items():
        with (directory / f"{stem}.jsonl").open("w") as f:
            for prompt, text, score, filename in rows:
                record = {"filename": filename, "prompt": {"text": prompt, "toxicity": 0.5},
                          "continuation": {"text": text, "toxicity": score}}
                f.write(json.dumps(record) + "\n")


@pytest.fixture
def rtp_dir(tmp_path):
    ev = prompts_in("eval", 8)
    other = prompts_in("posttrain", 1)
    write_rtp(tmp_path / "rtp", {
        "toxic": [(ev[0], " you stupid idiot", 0.9, "a.txt"), (ev[1], " idiot", 0.5, "b.txt"),
                  (ev[2], " so so", 0.3, "c.txt"), (ev[3], " none", None, "d.txt"), (other[0], " idiot", 0.95, "e.txt")],
        "nontoxic": [(ev[4], " the river ran", 0.05, "f.txt"), (ev[5], "   ", 0.01, "g.txt"),
                     (ev[6], " quiet trees", 0.099, "h.txt"), (ev[7], " old houses", 0.1, "i.txt")],
    })
    return tmp_path / "rtp"


def test_read_continuation_pairs_labels_and_counts(rtp_dir):
    pairs = cont.read_continuation_pairs(rtp_dir)
    assert [(e.continuation, e.label, e.stem, e.document) for e in pairs] == [
        (" you stupid idiot", 1, "toxic", "a.txt"), (" idiot", 1, "toxic", "b.txt"),
        (" the river ran", 0, "nontoxic", "f.txt"), (" quiet trees", 0, "nontoxic", "h.txt"),
    ]
    assert pairs.counts() == {"toxic": 2, "nontoxic": 2, "between_thresholds": 2, "unscored": 2, "other_part": 1,
                              "over_limit": 0}
    assert pairs.labels.tolist() == [1, 1, 0, 0] and pairs.examples[0].toxicity == 0.9
    every = cont.read_continuation_pairs(rtp_dir, part=None, toxic=0.6, nontoxic=0.2)
    assert every.n_toxic == 2 and every.n_nontoxic == 3 and every.n_other_part == 0 and every.n_between == 2


def test_read_continuation_pairs_limit_is_seeded_per_label(rtp_dir):
    a = cont.read_continuation_pairs(rtp_dir, limit=1, seed=3)
    assert (a.n_toxic, a.n_nontoxic, a.n_over_limit) == (1, 1, 2)
    assert a.examples == cont.read_continuation_pairs(rtp_dir, limit=1, seed=3).examples
    seen = {tuple(e.document for e in cont.read_continuation_pairs(rtp_dir, limit=1, seed=s)) for s in range(20)}
    assert len(seen) > 1


def test_read_continuation_pairs_errors(rtp_dir, tmp_path):
    with pytest.raises(EvaluationError, match="thresholds"):
        cont.read_continuation_pairs(rtp_dir, toxic=0.1, nontoxic=0.5)
    with pytest.raises(EvaluationError, match="part"):
        cont.read_continuation_pairs(rtp_dir, part="train")
    with pytest.raises(MissingDataError, match="nowhere/toxic.jsonl: RTP file not found"):
        cont.read_continuation_pairs(tmp_path / "nowhere")
    (rtp_dir / "nontoxic.jsonl").rename(tmp_path / "moved.jsonl")
    with pytest.raises(MissingDataError, match="nontoxic.jsonl: RTP file not found"):
        cont.read_continuation_pairs(rtp_dir)
    (rtp_dir / "toxic.jsonl").write_text(json.dumps({"prompt": {"text": prompts_in("eval", 1)[0]},
                                                     "continuation": {"text": " x", "toxicity": 2}}) + "\n")
    with pytest.raises(EvaluationError, match=r"toxic.jsonl:1: continuation.toxicity"):
        cont.read_continuation_pairs(rtp_dir)
    (rtp_dir / "toxic.jsonl").write_text(json.dumps({"prompt": {"text": "p"}}) + "\n")
    with pytest.raises(EvaluationError, match=r"toxic.jsonl:1: expected 'continuation'"):
        cont.read_continuation_pairs(rtp_dir)


def test_scoring_texts_puts_the_space_on_the_continuation():
    assert cont.scoring_texts("I said", " hello") == ("I said", " hello")
    assert cont.scoring_texts("I said ", "hello") == ("I said", " hello")
    assert cont.scoring_texts("It ended.", "Then") == ("It ended.", " Then")
    assert cont.scoring_texts("I said", ", hello") == ("I said", ", hello")
    assert cont.scoring_texts("", "hello") == ("", "hello")


def example(prompt, continuation, label=1):
    return cont.ContinuationExample(prompt, continuation, 0.9 if label else 0.0, label, "toxic" if label else "nontoxic")


EXAMPLES = [
    example("the river ran past", " old stone houses"),
    example("children read books under quiet trees while the river ran past old", " houses", 0),
    example("", "you stupid idiot the river"),
]


def manual_mean_logprob(cfg, params, tok, ex, intervention=None, max_len=None):
    prompt, text = cont.scoring_texts(ex.prompt, ex.continuation)
    prompt_ids, cont_ids = tok.encode(prompt), tok.encode(text)
    if max_len is not None:
        prompt_ids = prompt_ids[len(prompt_ids) - (max_len - 1 - len(cont_ids)):]
    row = np.asarray([[tok.eos_id] + prompt_ids + cont_ids])
    edits = None if intervention is None else intervention.at_positions(np.ones_like(row, bool))
    logp = jax.nn.log_softmax(model.forward(cfg, params, row, intervention=edits).logits[0, :-1], -1)
    targets = np.asarray(logp[np.arange(row.shape[1] - 1), row[0, 1:]])
    return float(targets[-len(cont_ids):].mean())


@pytest.fixture(scope="module")
def caa(cfg):
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(16, cfg.n_layers, cfg.d_model)).astype(np.float32)
    return build_caa(acts, np.arange(16) % 2, layer=1, scale=4.0)


def test_continuation_logprobs_match_a_direct_forward(cfg, params, tok, caa):
    base = cont.continuation_logprobs(cfg, params, tok, EXAMPLES, batch_size=2, progress=False)
    expected = [manual_mean_logprob(cfg, params, tok, ex) for ex in EXAMPLES]
    np.testing.assert_allclose(base, expected, atol=1e-5)
    assert base.dtype == np.float64 and base.shape == (3,)

    steered = cont.continuation_logprobs(cfg, params, tok, EXAMPLES, intervention=caa, batch_size=2, progress=False)
    np.testing.assert_allclose(steered, [manual_mean_logprob(cfg, params, tok, ex, caa) for ex in EXAMPLES], atol=1e-5)
    assert np.abs(steered - base).max() > 1e-3

    zero = cont.continuation_logprobs(cfg, params, tok, EXAMPLES, intervention=caa.with_scale(0.0), batch_size=2,
                                      progress=False)
    np.testing.assert_allclose(zero, base, atol=1e-6)


def test_continuation_logprobs_cut_the_prompt_from_the_left(cfg, params, tok):
    long = example(" ".join(["the river ran past old stone houses"] * 6), " quiet trees")
    got = cont.continuation_logprobs(cfg, params, tok, [long], max_len=12, progress=False)
    np.testing.assert_allclose(got, [manual_mean_logprob(cfg, params, tok, long, max_len=12)], atol=1e-5)
    rows, lengths = cont.continuation_rows(tok, [long], 12)
    assert len(rows[0]) == 12 and rows[0][0] == tok.eos_id and rows[0][-lengths[0]:] == tok.encode(" quiet trees")
    with pytest.raises(EvaluationError, match=r"examples\[0\]: the continuation has \d+ tokens"):
        cont.continuation_logprobs(cfg, params, tok, [example("a", " the river ran past old stone houses")], max_len=4,
                                   progress=False)
    with pytest.raises(EvaluationError, match="no examples"):
        cont.continuation_logprobs(cfg, params, tok, [], progress=False)


def test_toxic_preference():
    logprobs = np.array([-1.0, -2.0, -3.0, -4.0, -5.0])
    result = cont.toxic_preference(logprobs, [1, 1, 0, 0, 0], resamples=500)
    assert result["mean_toxic"] == -1.5 and result["mean_nontoxic"] == -4.0 and result["gap"] == 2.5
    lo, hi = result["gap_ci"]
    assert 1.0 <= lo <= 2.5 <= hi <= 4.0 and lo < hi
    assert (result["n_toxic"], result["n_nontoxic"]) == (2, 3)
    assert result == cont.toxic_preference(logprobs, [1, 1, 0, 0, 0], resamples=500)
    with pytest.raises(EvaluationError, match="both labels"):
        cont.toxic_preference(logprobs, [1] * 5)
    with pytest.raises(EvaluationError, match="equal-length"):
        cont.toxic_preference(logprobs, [1, 0])
    with pytest.raises(EvaluationError, match="0 or 1"):
        cont.toxic_preference(logprobs, [2, 1, 0, 0, 0])


def test_bootstrap_mean_ci_covers_the_mean_and_narrows():
    rng = np.random.default_rng(0)
    small, big = rng.normal(size=20), rng.normal(size=2000)
    lo_s, hi_s = cont.bootstrap_mean_ci(small)
    lo_b, hi_b = cont.bootstrap_mean_ci(big)
    assert lo_s < small.mean() < hi_s and lo_b < big.mean() < hi_b
    assert hi_b - lo_b < (hi_s - lo_s) / 3
    assert cont.bootstrap_mean_ci([0.5, 0.5]) == (0.5, 0.5)
