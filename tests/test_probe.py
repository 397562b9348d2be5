"""Head activations and vectorised per-head probes (checked against scikit-learn)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from jaxlm.config import ConfigError, model_preset
from jaxlm.model import forward, init_params
from jaxlm.probe import (
    ProbeConfig,
    ProbeResult,
    auc_scores,
    collect_head_activations,
    length_buckets,
    stratified_folds,
    stratified_split,
    train_probes,
    transfer_accuracy,
)

SIGNAL_HEADS = ((1, 2), (0, 1))  # strong, weaker


def byte_tokenizer(texts):
    return [list(text.encode("utf-8")) for text in texts]


@pytest.fixture(scope="module")
def synthetic():
    """N=400, L=2, H=4, D=8 activations with anisotropic, offset noise and planted signal."""
    rng = np.random.default_rng(0)
    n, layers, heads, dim = 400, 2, 4, 8
    labels = (rng.random(n) < 0.4).astype(np.int32)
    signs = 2.0 * labels - 1.0
    scale = rng.uniform(0.2, 4.0, size=(1, layers, heads, dim))
    acts = rng.normal(size=(n, layers, heads, dim)) * scale + 3.0 * rng.normal(size=(1, layers, heads, dim))
    acts[:, 1, 2, 0] += 2.0 * signs * scale[0, 1, 2, 0]
    acts[:, 0, 1, :3] += 0.6 * signs[:, None] * scale[0, 0, 1, :3]
    return acts.astype(np.float32), labels


@pytest.fixture(scope="module")
def probes(synthetic):
    return train_probes(*synthetic, ProbeConfig(seed=3))


def test_matches_sklearn_per_head(synthetic, probes):
    acts, labels = synthetic
    train, val = probes.train_index, probes.val_index
    for layer in range(acts.shape[1]):
        for head in range(acts.shape[2]):
            x = acts[:, layer, head]
            reference = LogisticRegression(max_iter=1000).fit(x[train], labels[train])
            assert abs(reference.score(x[val], labels[val]) - probes.accuracy[layer, head]) <= 0.01
            np.testing.assert_allclose(probes.weights[layer, head], reference.coef_[0], rtol=0.02, atol=0.02 * np.abs(reference.coef_).max())
            np.testing.assert_allclose(probes.intercepts[layer, head], reference.intercept_[0], atol=0.05)
    assert probes.converged.all()
    scores = probes.scores(acts)  # activation-space weights reproduce the predictions
    assert ((scores[val] > 0) == labels[val, None, None]).mean(axis=0) == pytest.approx(probes.accuracy)


def test_regularisation_strength_follows_sklearn_convention(synthetic):
    acts, labels = synthetic
    strong = train_probes(acts, labels, ProbeConfig(C=0.01, seed=3))
    x = acts[:, 1, 2]
    reference = LogisticRegression(C=0.01, max_iter=1000).fit(x[strong.train_index], labels[strong.train_index])
    np.testing.assert_allclose(strong.weights[1, 2], reference.coef_[0], rtol=0.02, atol=1e-4)
    loose = train_probes(acts, labels, ProbeConfig(C=100.0, seed=3))
    assert np.linalg.norm(strong.weights[1, 2]) < 0.5 * np.linalg.norm(loose.weights[1, 2])


def test_planted_heads_rank_first(probes):
    assert probes.ranking[: len(SIGNAL_HEADS)] == SIGNAL_HEADS
    assert probes.head_mask(2).sum() == 2 and probes.head_mask(2)[1, 2]
    assert probes.accuracy[1, 2] > 0.9 and probes.auc[1, 2] > 0.95
    others = np.ones(probes.shape, bool)
    for layer, head in SIGNAL_HEADS:
        others[layer, head] = False
    assert probes.accuracy[others].max() < 0.75


def test_split_is_stratified_seeded_and_disjoint():
    labels = np.array([1] * 100 + [0] * 400)
    train, val = stratified_split(labels, 0.2, seed=7)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 500
    assert labels[val].sum() == 20 and len(val) == 100
    again, _ = stratified_split(labels, 0.2, seed=7)
    other, _ = stratified_split(labels, 0.2, seed=8)
    assert np.array_equal(train, again) and not np.array_equal(train, other)
    folds = stratified_folds(labels, 5, seed=7)
    assert np.array_equal(np.sort(np.concatenate(folds)), np.arange(500))
    assert all(labels[f].sum() == 20 and len(f) == 100 for f in folds)
    with pytest.raises(ValueError, match="at least 2 examples"):
        stratified_split(np.array([1, 0, 0, 0]))


def test_kfold_reports_mean_and_spread(synthetic, probes):
    acts, labels = synthetic
    folded = train_probes(acts, labels, ProbeConfig(folds=4, seed=3))
    assert folded.accuracy_std is not None and folded.accuracy_std.shape == (2, 4)
    assert folded.ranking[0] == SIGNAL_HEADS[0]
    assert folded.n_train == folded.n_val == len(labels)
    assert np.abs(folded.accuracy - probes.accuracy).max() < 0.1


def test_auc_handles_ties():
    scores = np.array([[0.1, 0.4, 0.35, 0.8], [1.0, 1.0, 1.0, 1.0]])
    labels = np.array([0, 0, 1, 1])
    np.testing.assert_allclose(auc_scores(scores, labels), [0.75, 0.5])


def test_report_files_and_round_trip(probes, tmp_path):
    paths = probes.save_report(tmp_path / "out", metadata={"data": "synthetic"})
    report = json.loads(paths["report"].read_text())
    assert np.array(report["accuracy"]).shape == (2, 4)
    assert report["accuracy"] == probes.accuracy.tolist() and report["ranking"][0] == list(SIGNAL_HEADS[0])
    assert (report["n_train"], report["n_val"]) == (320, 80)
    assert report["settings"]["C"] == 1.0 and report["metadata"] == {"data": "synthetic"}
    assert paths["heatmap"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = ProbeResult.load(tmp_path / "out")
    assert loaded.ranking == probes.ranking and loaded.config == probes.config
    np.testing.assert_array_equal(loaded.weights, probes.weights)


def planted(n, seed, shift=0.0):
    """[n, 2, 3, 6] noise with the label planted along one direction of head (1, 2); ``shift``
    moves every row (a different data set along the same direction)."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.5).astype(np.int32)
    acts = rng.normal(size=(n, 2, 3, 6)) + shift
    acts[:, 1, 2] += 1.5 * (2.0 * labels - 1.0)[:, None] * np.linspace(1.0, 0.2, 6)
    return acts.astype(np.float32), labels


def test_transfer_accuracy_follows_the_shared_direction():
    train, test = planted(300, 0), planted(400, 1, shift=0.1)
    out = transfer_accuracy(*train, *test)
    assert out["accuracy"].shape == out["auc"].shape == (2, 3) and (out["n_train"], out["n_test"]) == (300, 400)
    assert out["accuracy"][1, 2] > 0.95 and out["auc"][1, 2] > 0.98
    others = np.delete(out["accuracy"].ravel(), 5)
    assert np.all(np.abs(others - 0.5) < 0.1)  # heads without the signal do not transfer
    random_labels = np.random.default_rng(2).permutation(test[1])
    chance = transfer_accuracy(*train, test[0], random_labels)
    assert abs(chance["accuracy"][1, 2] - 0.5) < 0.1 and abs(chance["auc"][1, 2] - 0.5) < 0.1


@pytest.mark.parametrize("standardize", [False, True])
def test_transfer_accuracy_matches_sklearn(standardize):
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (x_train, y_train), (x_test, y_test) = planted(200, 3), planted(150, 4, shift=0.3)
    config = ProbeConfig(C=0.3, standardize=standardize)
    out = transfer_accuracy(x_train, y_train, x_test, y_test, config)
    for layer, head in ((1, 2), (0, 0)):
        reference = LogisticRegression(C=config.C, max_iter=1000, tol=1e-10)
        if standardize:
            reference = make_pipeline(StandardScaler(), reference)
        reference.fit(x_train[:, layer, head], y_train)
        assert abs(reference.score(x_test[:, layer, head], y_test) - out["accuracy"][layer, head]) <= 1e-3
        expected_auc = roc_auc_score(y_test, reference.decision_function(x_test[:, layer, head]))
        assert abs(expected_auc - out["auc"][layer, head]) <= 1e-3


def test_transfer_accuracy_checks_its_inputs():
    (x_train, y_train), (x_test, y_test) = planted(40, 5), planted(30, 6)
    with pytest.raises(ValueError, match=r"test activations must be \[N, L, H, D\]"):
        transfer_accuracy(x_train, y_train, x_test[:, 0], y_test)
    with pytest.raises(ValueError, match="train activations are"):
        transfer_accuracy(x_train, y_train, x_test[:, :1], y_test)
    with pytest.raises(ValueError, match="30 test activation rows but 29 labels"):
        transfer_accuracy(x_train, y_train, x_test, y_test[:-1])
    with pytest.raises(ValueError, match="each class needs at least 2 examples"):
        transfer_accuracy(x_train, y_train, x_test, np.zeros(30, np.int32))


def test_bad_inputs_fail_clearly(synthetic):
    acts, labels = synthetic
    with pytest.raises(ConfigError, match="probe.C"):
        ProbeConfig(C=0.0)
    with pytest.raises(ValueError, match="400 activation rows but 399 labels"):
        train_probes(acts, labels[:-1])
    with pytest.raises(ValueError, match=r"\[N, L, H, D\]"):
        train_probes(acts[:, 0], labels)


# ---------------------------------------------------------------------------------------
# Activations from the tiny model
# ---------------------------------------------------------------------------------------

TEXTS = ["abc", "hello world, this is longer", "tiny", "a sentence of twenty", "x" * 40, "mid length"]


@pytest.fixture(scope="module")
def tiny():
    config = model_preset("tiny")
    return config, init_params(config, 0)


@functools.cache
def _manual_forward(config):
    return jax.jit(lambda params, ids: forward(config, params, ids, capture=("head_out",)).captures["head_out"])


def _manual(config, params, text):
    """Reference: the unpadded text alone through the model -> head_out [L, T, H, D]."""
    ids = jnp.asarray([byte_tokenizer([text])[0]], jnp.int32)
    return np.asarray(_manual_forward(config)(params, ids)[:, 0])


@pytest.mark.parametrize("padding", ["right", "left"])
def test_last_token_activations_match_unpadded_forward(tiny, padding):
    config, params = tiny
    acts = collect_head_activations(config, params, byte_tokenizer, TEXTS, batch_size=4, padding=padding, progress=False)
    assert acts.shape == (len(TEXTS), config.n_layers, config.n_heads, config.resolved_head_dim)
    assert acts.dtype == np.float32
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(acts[i], _manual(config, params, text)[:, -1], atol=2e-5, rtol=1e-4)


def test_mean_position_and_streaming(tiny, tmp_path):
    config, params = tiny
    kwargs = dict(batch_size=4, position="mean", progress=False)
    in_memory = collect_head_activations(config, params, byte_tokenizer, TEXTS, **kwargs)
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(in_memory[i], _manual(config, params, text).mean(axis=1), atol=2e-5, rtol=1e-4)
    path = tmp_path / "acts.npy"
    streamed = collect_head_activations(config, params, byte_tokenizer, TEXTS, out_path=path, **kwargs)
    assert isinstance(streamed, np.memmap)
    np.testing.assert_array_equal(np.load(path), in_memory)


def test_truncation_buckets_and_errors(tiny):
    config, params = tiny
    assert length_buckets(64) == (16, 32, 64) and length_buckets(100) == (16, 32, 64, 100)
    long_text = "y" * 100  # longer than the tiny model's 64-token context: keeps the first 64
    acts = collect_head_activations(config, params, byte_tokenizer, [long_text], max_len=1000, progress=False)
    np.testing.assert_allclose(acts[0], _manual(config, params, long_text[:64])[:, -1], atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="encode to no tokens.*index 1"):
        collect_head_activations(config, params, byte_tokenizer, ["ok", ""], progress=False)
    with pytest.raises(ValueError, match="position"):
        collect_head_activations(config, params, byte_tokenizer, ["ok"], position="first", progress=False)


# ---------------------------------------------------------------------------------------
# CLI (the checkpoint loader is replaced by the tiny model with a byte tokenizer)
# ---------------------------------------------------------------------------------------


class ByteTokenizer:
    def encode_batch(self, texts):
        return byte_tokenizer(texts)


def test_cli_writes_report_activations_and_labels(tiny, tmp_path, monkeypatch, capsys):
    import gzip

    import jaxlm.checkpoint
    from jaxlm.checkpoint import LoadedModel
    from jaxlm.cli import main

    prompts = tmp_path / "data" / "labelled" / "toxigen" / "prompts"
    prompts.mkdir(parents=True)
    for kind, word in (("hate", "awful"), ("neutral", "lovely")):
        line = "\\n".join(f"- {word} thing number {i}" for i in range(12)) + "\\n-\n"
        with gzip.open(prompts / f"{kind}_group_1k.txt.gz", "wt", encoding="utf-8") as handle:
            handle.write(line)
    config, params = tiny
    loaded = LoadedModel(config=config, params=params, tokenizer=ByteTokenizer(), step=7, source=tmp_path / "ckpt")
    monkeypatch.setattr(jaxlm.checkpoint, "load_model", lambda path, mesh=None: loaded)

    out = tmp_path / "out"
    argv = ["probe", "--checkpoint", str(tmp_path / "ckpt"), "--data", "toxigen:balanced:part=all", "--out", str(out),
            "--data-dir", str(tmp_path / "data"), "--batch-size", "8", "--max-len", "32", "--no-progress"]
    assert main(argv) == 0
    report = json.loads((out / "probe_report.json").read_text())
    assert np.array(report["accuracy"]).shape == (config.n_layers, config.n_heads)
    assert (report["n_train"], report["n_val"]) == (20, 4)
    assert report["metadata"]["data"] == "toxigen:balanced=true:part=all" and report["metadata"]["step"] == 7
    acts = np.load(out / "activations.npy")
    labels = np.load(out / "labels.npy")
    assert acts.shape == (24, config.n_layers, config.n_heads, config.resolved_head_dim)
    assert labels.tolist() == [1] * 12 + [0] * 12
    assert (out / "probe_heatmap.png").exists() and (out / "probe_weights.npz").exists()
    assert "top heads" in capsys.readouterr().out

    assert main(["probe", "--checkpoint", "x", "--data", "toxigen:limit=lots", "--out", str(out)]) == 2
    assert "limit expects an integer" in capsys.readouterr().err
