"""The training run: exact resume after SIGKILL, preemption, non-finite loss, corrupt
checkpoints, config changes, and 1 vs 8 devices."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import yaml

from jaxlm import checkpoint as ckpt
from jaxlm.config import MeshConfig, from_dict
from jaxlm.data.pipeline import build_pipeline
from jaxlm.loop import ConfigMismatchError, NonFiniteLossError, TrainConfig, train
from jaxlm.sharding import make_mesh
from jaxlm.train import Trainer


def config_data(dataset, **changes):
    data = {
        "model": {"preset": "tiny", "vocab_size": 320},
        "optimizer": {"lr": 3e-3, "warmup_steps": 5},
        "data": {"dataset": str(dataset), "sources": {"clean": 0.75, "toxic": 0.25}, "seq_len": 32, "batch_size": 8},
        "mesh": {"data": -1},
        "checkpoint": {"every": 4, "keep_last": 2, "async_save": True},
        "steps": 12,
        "log_every": 1,
        "tensorboard": False,
    }
    for key, value in changes.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return data


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return {row["step"]: row["loss"] for row in read_metrics(run_dir)}


def single_device_env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = ""  # one CPU device: both runs compile the same program
    env["JAX_PLATFORMS"] = "cpu"
    return env


def start_cli(config_path, run_dir, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "jaxlm", "train", str(config_path), "--run-dir", str(run_dir), "--no-progress", *extra],
        env=single_device_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_step(run_dir, step, process, timeout=120):
    deadline = time.time() + timeout
    path = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if path.exists():
            # only whole lines: the trainer may be halfway through writing the last one
            rows = [line for line in path.read_text().split("\n")[:-1] if line.strip()]
            if rows and json.loads(rows[-1])["step"] >= step:
                return json.loads(rows[-1])["step"]
        if process.poll() is not None:
            raise AssertionError(f"training exited early:\n{process.stdout.read()}")
        time.sleep(0.005)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def test_sigkill_then_resume_reproduces_the_uninterrupted_run_exactly(tiny_prepared, tmp_path):
    config_path = tmp_path / "train.yaml"
    config_path.write_text(yaml.safe_dump(config_data(tiny_prepared, steps=200, **{"checkpoint.every": 10})))
    full = start_cli(config_path, tmp_path / "full")
    assert full.wait(timeout=300) == 0, full.stdout.read()

    killed = start_cli(config_path, tmp_path / "killed")
    reached = wait_for_step(tmp_path / "killed", 37, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert reached < 200
    resumed = start_cli(config_path, tmp_path / "killed")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output

    expected = losses(tmp_path / "full")
    assert sorted(expected) == list(range(1, 201))
    assert losses(tmp_path / "killed") == expected  # bitwise: every logged loss
    a = ckpt.load_model(tmp_path / "full")
    b = ckpt.load_model(tmp_path / "killed")
    assert a.step == b.step == 200
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(x, y)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_prepared, tmp_path):
    config_path = tmp_path / "train.yaml"
    config_path.write_text(yaml.safe_dump(config_data(tiny_prepared, steps=100000, **{"checkpoint.every": 100000})))
    process = start_cli(config_path, tmp_path / "run")
    wait_for_step(tmp_path / "run", 5, process)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    assert "SIGTERM" in output
    saved = ckpt.load_model(tmp_path / "run")
    last_logged = read_metrics(tmp_path / "run")[-1]["step"]
    assert saved.step == last_logged >= 5


def load(dataset, **changes):
    return from_dict(TrainConfig, config_data(dataset, **changes))


def test_run_directory_contents_and_config_mismatch(tiny_prepared, tmp_path):
    run = tmp_path / "run"
    result = train(load(tiny_prepared), run, max_steps=4, show_progress=False)
    assert result.step == 4 and result.stopped_by == "max_steps"
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl"):
        assert (run / name).exists()
    row = read_metrics(run)[-1]
    for key in ("step", "loss", "tokens_per_sec", "lr", "grad_norm", "mfu", "mixture"):
        assert key in row
    assert set(row["mixture"]) == {"clean", "toxic"}
    meta = json.loads((run / "checkpoints" / "4" / "meta" / "metadata").read_text())
    assert meta["step"] == 4 and meta["versions"]["jax"] == jax.__version__

    with pytest.raises(ConfigMismatchError, match=r"optimizer\.lr: 0\.003 -> 0\.01.*--override-config"):
        train(load(tiny_prepared, **{"optimizer.lr": 1e-2}), run, max_steps=6, show_progress=False)
    result = train(load(tiny_prepared, **{"optimizer.lr": 1e-2}), run, max_steps=6, allow_config_change=True, show_progress=False)
    assert result.step == 6


def test_non_finite_loss_stops_with_a_diagnostic_and_keeps_the_last_good_checkpoint(tiny_prepared, tmp_path, monkeypatch):
    real_jit_step = Trainer.jit_step

    def poisoned_jit_step(self, example):
        step = real_jit_step(self, example)

        def run(state, batch):
            new_state, metrics = step(state, batch)
            if int(new_state.step) >= 6:
                metrics = dict(metrics, loss=metrics["loss"] * np.nan)
            return new_state, metrics

        return run

    monkeypatch.setattr(Trainer, "jit_step", poisoned_jit_step)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan at step 6 \(batch sources: \{.*'clean': \d+.*\}\).*checkpoint \(4\)"):
        train(load(tiny_prepared), run, show_progress=False)
    assert ckpt.load_model(run).step == 4


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tiny_prepared, tmp_path):
    uninterrupted = train(load(tiny_prepared), tmp_path / "full", show_progress=False)
    run = tmp_path / "run"
    train(load(tiny_prepared), run, max_steps=8, show_progress=False)
    for path in (run / "checkpoints" / "8" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\0" * 7)
    with pytest.warns(UserWarning, match="checkpoint at step 8 .* unreadable"):
        result = train(load(tiny_prepared), run, show_progress=False)
    assert result.step == uninterrupted.step == 12
    assert losses(run) == losses(tmp_path / "full")


def test_one_device_and_eight_device_meshes_give_the_same_losses(tiny_prepared):
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 simulated devices (conftest sets XLA_FLAGS)")
    config = load(tiny_prepared)
    results = {}
    for name, mesh in {
        "1": make_mesh(MeshConfig(), devices[:1]),
        "2x2x2": make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), devices[:8]),
        "fsdp8": make_mesh(MeshConfig(data=1, fsdp=8, tensor=1), devices[:8]),
    }.items():
        trainer = Trainer(config.model, config.optimizer, config.steps, mesh)
        pipeline = build_pipeline(config.data)
        state = trainer.init_state(config.seed)
        step = trainer.jit_step(pipeline.peek_shapes())
        curve = []
        for _ in range(5):
            batch = next(pipeline)
            batch.pop("source_ids")
            state, metrics = step(state, pipeline.to_global(batch, mesh))
            curve.append(float(metrics["loss"]))
        pipeline.close()
        results[name] = curve
    np.testing.assert_allclose(results["2x2x2"], results["1"], rtol=2e-5)
    np.testing.assert_allclose(results["fsdp8"], results["1"], rtol=2e-5)
    assert results["1"][-1] < results["1"][0]


def test_example_configs_train_and_evaluate_held_out_sets(tiny_prepared, tmp_path, monkeypatch):
    """experiments/configs/train-tiny.yaml trains as shipped (pointed at a synthetic dataset), with
    held-out sets given as a text file under $JAXLM_DATA_DIR and as a prepared source."""
    from pathlib import Path

    from jaxlm.loop import load_train_config

    configs = Path(__file__).resolve().parents[1] / "experiments" / "configs"
    monkeypatch.setenv("JAXLM_DATA_DIR", str(tmp_path))
    (tmp_path / "held_out.txt").write_text("the river ran past old stone houses. " * 80)
    eval_sets = [{"name": "text", "path": "$JAXLM_DATA_DIR/held_out.txt", "max_sequences": 4},
                 {"name": "toxic", "path": str(tiny_prepared / "toxic"), "kind": "prepared", "max_sequences": 4}]
    overrides = [f"data.dataset={tiny_prepared}", "model.vocab_size=320", "data.sources={clean: 0.9, toxic: 0.1}",
                 "tensorboard=false", f"eval_sets={json.dumps(eval_sets)}"]
    config = load_train_config(configs / "train-tiny.yaml", overrides)
    result = train(config, tmp_path / "run", show_progress=False)
    assert result.step == config.steps == 20
    final = read_metrics(tmp_path / "run")[-1]["eval"]
    assert set(final) == {"text", "toxic"} and all(np.isfinite(v) and v > 0 for v in final.values())
    assert load_train_config(configs / "train-cpu-small-pol10.yaml").model.d_model == 256

    monkeypatch.delenv("JAXLM_DATA_DIR")
    with pytest.raises(Exception, match=r"eval_sets\[text\]\.path: unset environment variable"):
        train(config, tmp_path / "run2", show_progress=False)
    with pytest.raises(Exception, match=r"eval_sets\[x\]\.kind"):
        load_train_config(configs / "train-tiny.yaml", ['eval_sets=[{"name": "x", "path": "p", "kind": "html"}]'])
