"""Checkpoint averaging: the weighted mean of a run's checkpoints, written as a run that every
``--checkpoint`` command loads; bad requests are one-line errors."""

import json
import re

import jax
import ml_dtypes
import numpy as np
import pytest

from jaxlm import checkpoint as ckpt
from jaxlm.average import AVERAGE_FILE, average_params, average_run
from jaxlm.cli import main
from jaxlm.config import ConfigError, from_dict, read_yaml
from jaxlm.loop import TrainConfig, train


@pytest.fixture(scope="module")
def run_dir(tiny_prepared, tmp_path_factory):
    """A tiny model trained 6 steps, with checkpoints at steps 2, 4 and 6."""
    config = from_dict(TrainConfig, {
        "model": {"preset": "tiny", "vocab_size": 320},
        "optimizer": {"lr": 3e-3, "warmup_steps": 2},
        "data": {"dataset": str(tiny_prepared), "sources": {"clean": 0.5, "toxic": 0.5}, "seq_len": 32, "batch_size": 8},
        "mesh": {"data": -1},
        "checkpoint": {"every": 2, "keep_last": 3, "async_save": False},
        "steps": 6,
        "tensorboard": False,
    })
    run = tmp_path_factory.mktemp("average") / "run"
    train(config, run, show_progress=False)
    return run


def params_at(run_dir, step):
    return jax.tree.map(np.asarray, ckpt.load_model(run_dir, step).params)


def test_weighted_average_of_the_last_two_checkpoints_loads_as_a_run(run_dir, tmp_path):
    out = average_run(run_dir, tmp_path / "avg", last=2, weights=[1, 3])
    loaded = ckpt.load_model(out)
    assert loaded.step == 6 and loaded.tokenizer is not None
    four, six = params_at(run_dir, 4), params_at(run_dir, 6)
    expected = jax.tree.map(lambda a, b: 0.25 * a.astype(np.float64) + 0.75 * b.astype(np.float64), four, six)
    assert jax.tree.structure(loaded.params) == jax.tree.structure(expected)
    for got, want, a, b in zip(*(jax.tree.leaves(t) for t in (loaded.params, expected, four, six))):
        assert got.dtype == a.dtype == np.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(four), jax.tree.leaves(six)))

    record = json.loads((out / AVERAGE_FILE).read_text())
    assert record["source_run"] == str(run_dir.resolve()) and record["steps"] == [4, 6] and record["step"] == 6
    assert record["weights"] == [0.25, 0.75]
    assert record["params_sha256"] == [ckpt.params_sha256(four), ckpt.params_sha256(six)]
    assert record["averaged_params_sha256"] == ckpt.params_sha256(loaded.params)
    assert ckpt.verify_checksums(out / "checkpoints" / "6")
    assert (out / "config.yaml").read_text() == (run_dir / "config.yaml").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["avg"]  # no temporary directory left

    with pytest.raises(ckpt.IncompatibleCheckpointError, match="opt_state"):  # no optimizer state to resume from
        train(from_dict(TrainConfig, read_yaml(out / "config.yaml")), out, show_progress=False)
    assert ckpt.load_model(out).step == 6


def test_cli_average_then_generate(run_dir, tmp_path, capsys):
    out = tmp_path / "avg"
    assert main(["average", str(run_dir), "--steps", "2,6", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    record = json.loads((out / AVERAGE_FILE).read_text())
    assert record["steps"] == [2, 6] and record["weights"] == [0.5, 0.5]
    assert main(["generate", "--checkpoint", str(out), "--prompt", "the river", "--max-new-tokens", "3",
                 "--no-progress"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["prompt"] == "the river" and isinstance(line["completion"], str)


@pytest.mark.parametrize("argv,message", [
    (["--last", "4"], r"last: 4 checkpoints asked for, but \S+ holds 3 \(steps \[2, 4, 6\]\)"),
    (["--last", "0"], r"last: expected a positive number of checkpoints, got 0"),
    (["--last", "2", "--weights", "1,2,3"], r"weights: expected 2 \(one per averaged checkpoint\), got 3"),
    (["--last", "2", "--weights", "1,-1"], r"weights: expected finite non-negative numbers, got \[1.0, -1.0\]"),
    (["--last", "2", "--weights", "0,0"], r"weights: they sum to 0"),
    (["--last", "2", "--weights", "one,two"], r"--weights: expected comma-separated numbers"),
    (["--steps", "2,5"], r"steps: no checkpoint for step 5 in \S+; have \[2, 4, 6\]"),
    (["--steps", "4,4"], r"steps: step 4 given more than once"),
])
def test_bad_requests_are_one_line_errors(run_dir, tmp_path, capsys, argv, message):
    assert main(["average", str(run_dir), *argv, "--out", str(tmp_path / "avg")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxlm average: error: ")
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "avg").exists()


def test_existing_output_and_non_runs_are_refused(run_dir, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    assert main(["average", str(run_dir), "--last", "1", "--out", str(tmp_path / "taken")]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "keep me"
    assert main(["average", str(tmp_path), "--last", "1", "--out", str(tmp_path / "avg")]) == 2
    assert "not a jaxlm training run" in capsys.readouterr().err


def test_average_params_dtypes_weights_and_structure():
    a = {"w": np.array([1.0, 2.0], ml_dtypes.bfloat16), "b": {"x": np.array([[0.0]], np.float32)}}
    b = {"w": np.array([3.0, 6.0], ml_dtypes.bfloat16), "b": {"x": np.array([[4.0]], np.float32)}}
    mean = average_params([a, b])
    assert mean["w"].dtype == ml_dtypes.bfloat16 and mean["w"].tolist() == [2.0, 4.0]
    assert mean["b"]["x"].dtype == np.float32 and mean["b"]["x"].tolist() == [[2.0]]
    weighted = average_params([a, b], [3, 1])
    assert weighted["w"].tolist() == [1.5, 3.0] and weighted["b"]["x"].tolist() == [[1.0]]
    assert average_params([a, b], [0, 2])["b"]["x"].tolist() == [[4.0]]
    with pytest.raises(ConfigError, match=r"trees\[1\]: leaf b.x is float32\[1, 2\], trees\[0\] has float32\[1, 1\]"):
        average_params([a, {**b, "b": {"x": np.zeros((1, 2), np.float32)}}])
    with pytest.raises(ConfigError, match=r"trees\[1\]: leaf b.y is not in trees\[0\]"):
        average_params([a, {**b, "b": {"x": b["b"]["x"], "y": b["b"]["x"]}}])
    with pytest.raises(ConfigError, match=r"trees\[1\]: leaf w of trees\[0\] is missing"):
        average_params([a, {"b": b["b"]}])
    with pytest.raises(ConfigError, match=r"leaf n: int32 is not a floating-point type"):
        average_params([{"n": np.array([1], np.int32)}])
    with pytest.raises(ConfigError, match=r"weights: they sum to 0"):
        average_params([a, b], [0.0, 0.0])
    with pytest.raises(ConfigError, match=r"expected at least one parameter tree"):
        average_params([])
