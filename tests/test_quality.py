"""Quality classifiers (fastText, logreg), negative sampling and top-k% selection (jaxlm.data.quality).

Corpora are synthetic: documents of Zipf-distributed shared words with a share of
class-marker words ("formal" vs "chat"), of varied lengths.
"""

import dataclasses
import json

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from jaxlm.config import ConfigError, from_dict
from jaxlm.data import DataError
from jaxlm.data.quality import (
    CLASSIFIER_FILE,
    FASTTEXT_FILE,
    WEIGHTS_FILE,
    ClassifierSettings,
    holdout_split,
    length_matched_negatives,
    load_classifier,
    normalize_for_classifier,
    percentile_band,
    score_percentiles,
    score_summary,
    top_fraction,
    train_classifier,
    uniform_negatives,
)

COMMON = [f"w{i}" for i in range(300)]
ZIPF = (1 / np.arange(1, len(COMMON) + 1)) / (1 / np.arange(1, len(COMMON) + 1)).sum()
FORMAL = [f"formal{i}" for i in range(100)]
CHAT = [f"chat{i}" for i in range(100)]
MODELS = ["fasttext", "logreg"]
# Tiny models: a few hundred documents train in well under a second.
SETTINGS = {
    "fasttext": ClassifierSettings(model="fasttext", dim=8, bucket=10_000, epoch=20, lr=0.5, holdout_fraction=0.2),
    "logreg": ClassifierSettings(model="logreg", n_features=2**16, holdout_fraction=0.2),
}


def _document(rng, n_words, markers, marker_share):
    words = rng.choice(np.array(COMMON, dtype=object), int(n_words), p=ZIPF)
    marked = rng.random(words.size) < marker_share
    words[marked] = rng.choice(markers, int(marked.sum()))
    return " ".join(words)


def _documents(rng, word_counts, markers, marker_share=0.1):
    return [_document(rng, n, markers, marker_share) for n in word_counts]


@pytest.fixture(scope="module")
def formal_vs_chat():
    rng = np.random.default_rng(0)
    positive = _documents(rng, rng.integers(20, 200, 150), FORMAL, 0.3)
    negative = _documents(rng, rng.integers(20, 200, 150), CHAT, 0.3)
    positive[0] = "Formal3 W1\n\n  FORMAL7\tw2 " + positive[0]  # case and whitespace are normalised away
    return positive, negative


@pytest.fixture(scope="module", params=MODELS)
def trained(request, formal_vs_chat):
    settings = SETTINGS[request.param]
    classifier, report = train_classifier(*formal_vs_chat, settings)
    return settings, classifier, report


# ---------------------------------------------------------------------------------------
# Classifiers
# ---------------------------------------------------------------------------------------


def test_classifier_separates_classes_and_report_matches_its_scores(trained, formal_vs_chat):
    settings, classifier, report = trained
    positive, negative = formal_vs_chat
    assert report["holdout_auc"] > 0.95
    held_positive, held_negative = holdout_split(len(positive), len(negative), settings.holdout_fraction, settings.seed)
    assert (report["n_holdout_positive"], report["n_holdout_negative"]) == (30, 30) == (held_positive.size, held_negative.size)
    assert (report["n_train_positive"], report["n_train_negative"]) == (120, 120)
    assert report["mean_chars_positive"] == np.mean([len(t) for t in positive])
    assert report["mean_chars_negative"] == np.mean([len(t) for t in negative])

    scores = classifier.score([positive[i] for i in held_positive] + [negative[i] for i in held_negative])
    labels = np.array([1] * 30 + [0] * 30)
    assert scores.dtype == np.float64 and np.all((scores >= 0) & (scores <= 1))
    assert report["holdout_auc"] == roc_auc_score(labels, scores)
    assert report["holdout_accuracy"] == np.mean((scores >= 0.5) == (labels == 1))
    # Scoring normalises like training; batching does not change a score.
    assert classifier.score(["FORMAL1 W3\nw4"])[0] == classifier.score(["formal1 w3 w4"])[0]
    assert np.array_equal(classifier.score(positive[:50], batch_size=7), classifier.score(positive[:50]))


def test_training_is_deterministic_for_a_seed(trained, formal_vs_chat):
    settings, classifier, _ = trained
    positive, negative = formal_vs_chat
    again, _ = train_classifier(positive, negative, settings)
    assert np.array_equal(again.score(positive + negative), classifier.score(positive + negative))
    assert again.fingerprint() == classifier.fingerprint()
    other_seed, _ = train_classifier(positive, negative, dataclasses.replace(settings, seed=1))
    assert other_seed.fingerprint() != classifier.fingerprint()


def test_save_and_load_give_identical_scores(trained, formal_vs_chat, tmp_path):
    settings, classifier, report = trained
    texts = formal_vs_chat[0] + formal_vs_chat[1]
    classifier.save(tmp_path / "clf")
    meta = json.loads((tmp_path / "clf" / CLASSIFIER_FILE).read_text())
    assert meta["settings"]["model"] == settings.model and meta["positive_label"] == "__label__hq"
    assert (tmp_path / "clf" / (FASTTEXT_FILE if settings.model == "fasttext" else WEIGHTS_FILE)).is_file()

    loaded = load_classifier(tmp_path / "clf")
    assert loaded.settings == settings and loaded.report == report
    assert np.array_equal(loaded.score(texts), classifier.score(texts))
    assert loaded.fingerprint() == classifier.fingerprint()
    with pytest.raises(ConfigError, match="positive_label"):
        load_classifier(tmp_path / "clf", positive_label="__label__lq")


def _assert_one_line_data_error(path, named):
    with pytest.raises(DataError) as caught:
        load_classifier(path)
    message = str(caught.value)
    assert named in message and "\n" not in message
    return message


def test_damaged_or_missing_files_are_one_line_data_errors(trained, tmp_path):
    settings, classifier, _ = trained
    directory = classifier.save(tmp_path / "clf")
    weights = directory / (FASTTEXT_FILE if settings.model == "fasttext" else WEIGHTS_FILE)
    original = weights.read_bytes()

    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    weights.write_bytes(bytes(flipped))
    _assert_one_line_data_error(directory, str(weights))
    weights.write_bytes(original[: len(original) // 2])
    _assert_one_line_data_error(directory, str(weights))
    weights.write_bytes(b"not a model")
    _assert_one_line_data_error(directory, str(weights))
    weights.unlink()
    _assert_one_line_data_error(directory, str(weights))

    weights.write_bytes(original)
    assert load_classifier(directory).fingerprint() == classifier.fingerprint()
    (directory / CLASSIFIER_FILE).write_text('{"format": "jaxlm-quality-classifier", ')
    _assert_one_line_data_error(directory, CLASSIFIER_FILE)
    (directory / CLASSIFIER_FILE).unlink()
    _assert_one_line_data_error(directory, CLASSIFIER_FILE)
    _assert_one_line_data_error(tmp_path / "nowhere", "nowhere")


def test_bare_pretrained_fasttext_bin_loads_with_its_positive_label(formal_vs_chat, tmp_path):
    classifier, _ = train_classifier(*formal_vs_chat, SETTINGS["fasttext"])
    texts = formal_vs_chat[0][:20] + formal_vs_chat[1][:20]
    model_file = classifier.save(tmp_path / "clf") / FASTTEXT_FILE

    bare = load_classifier(model_file)
    assert bare.report is None and bare.positive_label == "__label__hq"
    assert (bare.settings.dim, bare.settings.bucket, bare.settings.word_ngrams, bare.settings.epoch) == (8, 10_000, 2, 20)
    assert np.array_equal(bare.score(texts), classifier.score(texts))
    flipped_label = load_classifier(model_file, positive_label="__label__lq")
    np.testing.assert_allclose(flipped_label.score(texts), 1 - classifier.score(texts), atol=1e-4)
    with pytest.raises(DataError, match="__label__cc"):
        load_classifier(model_file, positive_label="__label__cc")

    truncated = tmp_path / "truncated.bin"
    for cut in (10, len(model_file.read_bytes()) // 2):  # fastText itself would load these
        truncated.write_bytes(model_file.read_bytes()[:-cut])
        assert "not a usable fastText model" in _assert_one_line_data_error(truncated, str(truncated))
    text_file = tmp_path / "notes.bin"
    text_file.write_text("just some text that is long enough to pass the header size check " * 3)
    assert "magic" in _assert_one_line_data_error(text_file, str(text_file))


def test_training_needs_both_classes():
    with pytest.raises(DataError, match="negative"):
        train_classifier(["some text"], [], SETTINGS["logreg"])


@pytest.mark.parametrize(
    ("field", "value"),
    [("model", "svm"), ("epoch", 0), ("epoch", 2.5), ("epoch", True), ("lr", 0.0), ("lr", -1.0), ("dim", 0),
     ("bucket", 0), ("min_count", 0), ("word_ngrams", 0), ("n_features", 0), ("C", 0.0), ("max_iter", 0),
     ("max_chars", 0), ("seed", -1), ("holdout_fraction", 1.0), ("holdout_fraction", -0.1)],
)
def test_settings_validate_every_field(field, value):
    with pytest.raises(ConfigError, match=f"classifier.{field}:"):
        ClassifierSettings(**{field: value})


def test_settings_load_from_plain_data():
    assert from_dict(ClassifierSettings, {"model": "logreg", "C": 2}) == ClassifierSettings(model="logreg", C=2.0)
    assert ClassifierSettings(word_ngrams=1, bucket=0).bucket == 0  # unigrams hash nothing into buckets


def test_normalize_for_classifier_lowercases_collapses_whitespace_and_cuts():
    assert normalize_for_classifier("  Hello\n\nWORLD\t foo \r\n") == "hello world foo"
    assert normalize_for_classifier("Hello\n\nWORLD", max_chars=7) == "hello w"


# ---------------------------------------------------------------------------------------
# Negatives
# ---------------------------------------------------------------------------------------

LEVELS = np.linspace(0.05, 0.95, 19)


def _decile_bins(values, positive_lengths):
    edges = np.quantile(np.log1p(positive_lengths), np.linspace(0, 1, 11)[1:-1])
    return np.searchsorted(edges, np.log1p(values), side="right")


def test_length_matched_negatives_follow_the_positive_lengths():
    rng = np.random.default_rng(0)
    positive_lengths = np.exp(rng.normal(np.log(300), 0.5, 500)).astype(int)
    candidate_lengths = np.concatenate(
        [np.exp(rng.normal(np.log(3000), 0.5, 8000)), np.exp(rng.normal(np.log(300), 0.7, 2000))]
    ).astype(int)

    matched = length_matched_negatives(candidate_lengths, positive_lengths, 500, seed=0)
    assert matched.size == 500 and np.unique(matched).size == 500 and np.all(np.diff(matched) > 0)
    assert np.array_equal(matched, length_matched_negatives(candidate_lengths, positive_lengths, 500, seed=0))
    # n equals the number of positives, so every decile bin gets exactly the positives' count.
    assert np.array_equal(
        np.bincount(_decile_bins(candidate_lengths[matched], positive_lengths), minlength=10),
        np.bincount(_decile_bins(positive_lengths, positive_lengths), minlength=10),
    )
    positive_quantile_bins = _decile_bins(np.quantile(positive_lengths, LEVELS), positive_lengths)
    matched_quantile_bins = _decile_bins(np.quantile(candidate_lengths[matched], LEVELS), positive_lengths)
    assert np.all(np.abs(matched_quantile_bins - positive_quantile_bins) <= 1)

    uniform = uniform_negatives(candidate_lengths.size, 500, seed=0)
    assert uniform.size == 500 and np.unique(uniform).size == 500
    uniform_quantile_bins = _decile_bins(np.quantile(candidate_lengths[uniform], LEVELS), positive_lengths)
    assert np.max(np.abs(uniform_quantile_bins - positive_quantile_bins)) >= 4


def test_length_matched_shortfall_is_filled_from_the_neighbouring_bin():
    positive_lengths = [10] * 50 + [100] * 50 + [1000] * 50
    candidate_lengths = np.array([10] * 5 + [100] * 200 + [1000] * 200)
    with pytest.warns(UserWarning, match="15 of 60 drawn from neighbouring length bins"):
        chosen = length_matched_negatives(candidate_lengths, positive_lengths, 60, seed=0, n_bins=3)
    assert np.unique(chosen).size == 60
    values, counts = np.unique(candidate_lengths[chosen], return_counts=True)
    assert dict(zip(values.tolist(), counts.tolist())) == {10: 5, 100: 35, 1000: 20}


def test_negative_sampling_rejects_impossible_requests():
    with pytest.raises(ConfigError, match="n:"):
        uniform_negatives(10, 11, seed=0)
    with pytest.raises(ConfigError, match="n:"):
        length_matched_negatives([5, 6], [5], 3, seed=0)
    with pytest.raises(DataError, match="positive_lengths"):
        length_matched_negatives([5, 6], [], 1, seed=0)
    with pytest.raises(DataError, match="candidate_lengths"):
        length_matched_negatives([5, -6], [5], 1, seed=0)


@pytest.mark.parametrize("model", MODELS)
def test_length_matched_negatives_remove_most_of_the_length_bias(model):
    """Positives short, the negative pool mostly long: uniform negatives teach the classifier
    length, length-matched ones leave it the content signal (The Data-Quality Illusion)."""
    rng = np.random.default_rng(1)
    positive = _documents(rng, np.exp(rng.normal(np.log(30), 0.4, 300)).astype(int) + 3, FORMAL)
    pool_words = np.exp(np.concatenate([rng.normal(np.log(200), 0.5, 2400), rng.normal(np.log(30), 0.5, 600)]))
    pool = _documents(rng, pool_words.astype(int) + 3, CHAT)
    eval_words = np.exp(rng.uniform(np.log(10), np.log(400), 200)).astype(int)
    evaluation = _documents(rng, eval_words, FORMAL) + _documents(rng, eval_words, CHAT)
    eval_lengths = [len(text) for text in evaluation]

    def length_correlation(negative_indices):
        classifier, _ = train_classifier(positive, [pool[i] for i in negative_indices], SETTINGS[model])
        return spearmanr(classifier.score(evaluation), eval_lengths).statistic

    uniform = length_correlation(uniform_negatives(len(pool), 300, seed=0))
    matched = length_correlation(
        length_matched_negatives([len(t) for t in pool], [len(t) for t in positive], 300, seed=0)
    )
    assert uniform < -0.7
    assert matched - uniform > 0.3


# ---------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------


def test_score_percentiles_rank_by_score_then_index():
    np.testing.assert_array_equal(score_percentiles([0.5, 0.1, 0.5, 0.9]), [0.25, 0.0, 0.5, 0.75])
    scores = np.random.default_rng(0).integers(0, 5, 101) / 4  # many ties
    percentiles = score_percentiles(scores)
    np.testing.assert_array_equal(np.sort(percentiles), np.arange(101) / 101)
    for value in np.unique(scores):
        tied = percentiles[scores == value]
        assert np.all(np.diff(tied) > 0)  # ties: the later index ranks higher
    assert score_percentiles([]).size == 0


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.25, 0.5, 0.999, 1.0])
def test_top_fraction_keeps_exactly_the_top_by_score_and_index(fraction):
    scores = np.random.default_rng(0).integers(0, 7, 257) / 6
    keep = top_fraction(scores, fraction)
    k = round(fraction * scores.size)
    assert keep.dtype == bool and keep.sum() == k
    assert np.array_equal(keep, top_fraction(scores, fraction))
    ranked = sorted(range(scores.size), key=lambda i: (scores[i], i))
    assert set(np.flatnonzero(keep)) == set(ranked[scores.size - k:])
    np.testing.assert_array_equal(keep, score_percentiles(scores) >= (scores.size - k) / scores.size)


def test_percentile_band_edges():
    percentiles = score_percentiles(np.arange(10.0))  # i / 10
    np.testing.assert_array_equal(np.flatnonzero(percentile_band(percentiles, 0.0, 0.3)), [0, 1, 2])
    np.testing.assert_array_equal(np.flatnonzero(percentile_band(percentiles, 0.3, 0.6)), [3, 4, 5])
    np.testing.assert_array_equal(np.flatnonzero(percentile_band(percentiles, 0.9, 1.0)), [9])
    low, high = percentile_band(percentiles, 0.0, 0.5), percentile_band(percentiles, 0.5, 1.0)
    assert not np.any(low & high) and np.all(low | high)


def test_selection_rejects_bad_arguments():
    for fraction in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="fraction"):
            top_fraction([0.1, 0.2], fraction)
    with pytest.raises(ConfigError, match="low / high"):
        percentile_band([0.0, 0.5], 0.5, 0.5)
    with pytest.raises(ConfigError, match="low / high"):
        percentile_band([0.0, 0.5], 0.2, 1.1)
    with pytest.raises(DataError, match="percentiles"):
        percentile_band([0.0, 1.0], 0.0, 0.5)
    with pytest.raises(DataError, match="scores"):
        score_percentiles([0.1, float("nan")])


def test_score_summary():
    summary = score_summary([0.0, 0.05, 0.15, 0.5, 1.0])
    assert summary["n"] == 5 and summary["mean"] == pytest.approx(0.34)
    assert summary["quantiles"]["0.0"] == 0.0 and summary["quantiles"]["0.5"] == 0.15 and summary["quantiles"]["1.0"] == 1.0
    assert summary["histogram"]["counts"] == [2, 1, 0, 0, 0, 1, 0, 0, 0, 1]
    assert summary["histogram"]["edges"] == [round(0.1 * i, 1) for i in range(11)]
    json.dumps(summary)
    empty = score_summary([])
    assert empty["n"] == 0 and empty["mean"] is None and sum(empty["histogram"]["counts"]) == 0
