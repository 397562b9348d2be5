import gzip
import json

import numpy as np
import pytest

from jaxlm.data.labelled import rtp_part
from jaxlm.evaluate import sanity
from jaxlm.evaluate.scorer import ToxicityScorer
from jaxlm.evaluate.toxicity_model import TrainSettings, is_heldout
from jaxlm.paths import DATA_DIR_ENV, MissingDataError
from jaxlm.tokenizer import train_bpe

PARAGRAPH = "the old stone bridge crossed the quiet river near the small town where children played".split()


def first_matching(predicate, template, count):
    out, i = [], 0
    while len(out) < count:
        if predicate(template.format(i)):
            out.append(template.format(i))
        i += 1
    return out


SETTINGS = TrainSettings()
HELD = first_matching(lambda d: is_heldout(d, SETTINGS.rtp_heldout_fraction, SETTINGS.split_salt), "doc{}.txt", 8)
TRAINED = first_matching(lambda d: not is_heldout(d, SETTINGS.rtp_heldout_fraction, SETTINGS.split_salt), "doc{}.txt", 8)
EVAL = first_matching(lambda p: rtp_part(p) == "eval", "prompt {}", 16)
OTHER = first_matching(lambda p: rtp_part(p) != "eval", "prompt {}", 4)


@pytest.fixture(scope="module")
def tok():
    return train_bpe([" ".join(PARAGRAPH)] * 20, vocab_size=280)


@pytest.fixture
def data_dir(tmp_path):
    """WikiText-2 test (headings, an ``<unk>`` paragraph), three ToxiGen groups, and RTP records
    whose continuations sit in and out of the eval part and the scorers' held-out documents."""
    wiki = tmp_path / "eval" / "wikitext2"
    wiki.mkdir(parents=True)
    paragraphs = [" ".join(np.random.default_rng(i).permutation(PARAGRAPH * 3)) for i in range(6)]
    (wiki / "test.txt").write_text(
        " = Bridge = \n\n " + " \n\n ".join(paragraphs[:3]) + " \n\n = = History = = \n\n " + paragraphs[3]
        + " \n\n an <unk> word in a paragraph of more than ten words here \n\n = Town = \n\n " + " \n\n ".join(paragraphs[4:]) + " \n"
    )
    prompts = tmp_path / "labelled" / "toxigen" / "prompts"
    prompts.mkdir(parents=True)
    for kind in ("hate", "neutral"):
        for group in ("black", "women", "left_handed"):
            (prompts / f"{kind}_{group}_1k.txt.gz").write_bytes(gzip.compress(b"- a statement\\n-\n"))
    rtp = tmp_path / "eval" / "rtp"
    rtp.mkdir(parents=True)
    rows = {
        "toxic": [(EVAL[0], " toxic held one", 0.9, HELD[0]), (EVAL[1], " toxic held two", 0.75, HELD[1]),
                  (EVAL[2], " toxic trained", 0.95, TRAINED[0]), (OTHER[0], " toxic other part", 0.9, HELD[2]),
                  (EVAL[3], " fairly rude", 0.6, HELD[3])],
        "nontoxic": [(EVAL[4], " kind held", 0.05, HELD[4]), (EVAL[5], " kind trained", 0.02, TRAINED[1]),
                     (EVAL[6], " kind borderline", 0.1, HELD[5]), (EVAL[7], " toxic held three", 0.8, HELD[6])],
    }
    for stem, records in rows.items():
        with (rtp / f"{stem}.jsonl").open("w") as f:
            for prompt, text, score, filename in records:
                f.write(json.dumps({"filename": filename, "prompt": {"text": prompt, "toxicity": 0.5},
                                    "continuation": {"text": text, "toxicity": score}}) + "\n")
    return tmp_path


def test_sanity_texts_categories(data_dir, tok):
    texts = sanity.sanity_texts(tok, data_dir, n=5, length_words=10)
    assert list(texts) == list(sanity.CATEGORIES)
    for name in ("empty", "random_tokens", "repeated_token", "shuffled_clean", "clean"):
        assert len(texts[name]) == 5, name
    assert texts["empty"] == [""] * 5
    wiki = (data_dir / "eval" / "wikitext2" / "test.txt").read_text()
    for clean, shuffled in zip(texts["clean"], texts["shuffled_clean"]):
        words = clean.split()
        assert len(words) == 10 and "=" not in words and "<unk>" not in words and clean in wiki
        assert sorted(shuffled.split()) == sorted(words)
    assert texts["shuffled_clean"] != texts["clean"]
    for text in texts["repeated_token"]:
        words = text.split()
        assert len(words) == 10 and len(set(words)) == 1 and words[0] in PARAGRAPH
    assert all(t.strip() for t in texts["random_tokens"]) and len(set(texts["random_tokens"])) == 5
    assert sorted(texts["toxic_heldout"]) == ["toxic held one", "toxic held three", "toxic held two"]
    assert texts["nontoxic_heldout"] == ["kind held"]


def test_sanity_texts_identity_sentences(data_dir, tok):
    identity = sanity.sanity_texts(tok, data_dir, n=100)["identity_neutral"]
    assert len(identity) == 3 * len(sanity.NEUTRAL_TEMPLATES)
    assert "Black people live in many different countries." in identity
    assert "Some of my neighbours are women." in identity
    assert "Left handed vote in elections like everyone else." in identity  # unmapped: the raw name
    assert len(sanity.sanity_texts(tok, data_dir, n=7)["identity_neutral"]) == 7
    assert sanity.group_phrase("muslim") == "Muslims" and sanity.group_phrase("new_group") == "new group"


def test_sanity_texts_rtp_without_the_scorer_split(data_dir, tok):
    texts = sanity.sanity_texts(tok, data_dir, n=50, scorer_heldout=False)
    assert sorted(texts["toxic_heldout"]) == ["toxic held one", "toxic held three", "toxic held two", "toxic trained"]
    assert sorted(texts["nontoxic_heldout"]) == ["kind held", "kind trained"]
    assert len(sanity.sanity_texts(tok, data_dir, n=2, scorer_heldout=False)["toxic_heldout"]) == 2


def test_sanity_texts_are_seeded(data_dir, tok):
    a = sanity.sanity_texts(tok, data_dir, n=4, seed=1, length_words=5)
    assert a == sanity.sanity_texts(tok, data_dir, n=4, seed=1, length_words=5)
    b = sanity.sanity_texts(tok, data_dir, n=4, seed=2, length_words=5)
    assert a["random_tokens"] != b["random_tokens"] and a["clean"] != b["clean"]


def test_random_tokens_exclude_special_ids(tok):
    assert sanity.special_ids(tok) == {tok.eos_id, tok.pad_id}


@pytest.mark.parametrize("missing", ["eval/wikitext2/test.txt", "labelled/toxigen/prompts", "eval/rtp/toxic.jsonl"])
def test_missing_data_is_an_error(data_dir, tok, missing):
    import shutil

    path = data_dir / missing
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(MissingDataError):
        sanity.sanity_texts(tok, data_dir, n=3)


def test_no_data_dir_is_an_error(tok, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(MissingDataError, match=DATA_DIR_ENV):
        sanity.sanity_texts(tok)


class LengthScorer(ToxicityScorer):
    """len(text) / 100, clipped to 1."""

    name = "length"

    def score_batch(self, texts):
        return np.minimum(np.array([len(t) for t in texts]) / 100.0, 1.0)


def test_scorer_sanity_with_a_known_scorer():
    texts = {
        "empty": [""] * 3,
        "random_tokens": ["x" * 40, "x" * 60],
        "repeated_token": ["y" * 10],
        "shuffled_clean": ["z" * 20, "z" * 30],
        "clean": ["c" * 10, "c" * 30],
        "toxic_heldout": ["t" * 90, "t" * 200, "t" * 70],
        "nontoxic_heldout": [],
    }
    calls = []

    class Counting(LengthScorer):
        def __call__(self, batch):
            calls.append(len(batch))
            return super().__call__(batch)

    result = sanity.scorer_sanity({"length": Counting(), "other": LengthScorer()}, texts)
    assert calls == [13]  # one batched call per scorer
    length = result["scorers"]["length"]
    cats = length["categories"]
    assert cats["empty"] == {"n": 3, "mean": 0.0, "ci": [0.0, 0.0], "share_above_half": 0.0}
    assert cats["random_tokens"]["mean"] == pytest.approx(0.5) and cats["random_tokens"]["share_above_half"] == 0.5
    assert cats["toxic_heldout"]["mean"] == pytest.approx(0.8667, abs=1e-4)
    assert cats["toxic_heldout"]["share_above_half"] == 1.0
    lo, hi = cats["toxic_heldout"]["ci"]
    assert 0.7 - 1e-9 <= lo < cats["toxic_heldout"]["mean"] < hi <= 1.0
    assert cats["nontoxic_heldout"] == {"n": 0, "mean": None, "ci": None, "share_above_half": None}
    assert length["degeneration_floor"] == pytest.approx(0.5) and length["degeneration_floor_category"] == "random_tokens"
    assert length["separation"] == pytest.approx(0.8667 - 0.2, abs=1e-4)
    assert set(result["texts_sha256"]) == set(texts) and "bootstrap" in result["ci"]
    assert result["texts_sha256"]["clean"] != result["texts_sha256"]["shuffled_clean"]

    table = sanity.markdown_table(result)
    assert table[0] == "| category | n | length | other |" and len(table) == 2 + len(texts) + 2
    assert table[2].startswith("| empty | 3 | 0.000 [0.000, 0.000], >0.5: 0.00")
    assert "| nontoxic_heldout | 0 | - | - |" in table
    assert table[-2] == "| degeneration floor | | 0.500 (random_tokens) | 0.500 (random_tokens) |"


def test_real_data_sanity_texts(shared_data, tok):
    texts = sanity.sanity_texts(tok, shared_data)
    assert all(len(texts[c]) == 200 for c in ("empty", "random_tokens", "repeated_token", "shuffled_clean", "clean"))
    assert len(texts["identity_neutral"]) >= 10 * 15
    assert len(texts["toxic_heldout"]) >= 50 and len(texts["nontoxic_heldout"]) >= 30
    assert "Black people live in many different countries." in sanity.sanity_texts(tok, shared_data, n=1000)["identity_neutral"]
