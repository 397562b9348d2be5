"""Bad input and damaged artefacts around a training run: each is one line and exit code 2
(or a warning and a safe fallback), and nothing already in the run directory is lost."""

import errno
import gzip
import json
import os
import shutil

import numpy as np
import pytest
import yaml

from jaxlm import checkpoint as ckpt
from jaxlm.cli import main
from jaxlm.errors import DirectoryLock
from jaxlm.train import Trainer


@pytest.fixture(scope="module")
def config_file(tiny_prepared, tmp_path_factory):
    config = {
        "model": {"preset": "tiny", "vocab_size": 320},
        "optimizer": {"lr": 3e-3, "warmup_steps": 5},
        "data": {"dataset": str(tiny_prepared), "sources": {"clean": 0.75, "toxic": 0.25}, "seq_len": 32, "batch_size": 8},
        "checkpoint": {"every": 4, "keep_last": 3},
        "steps": 12,
        "log_every": 1,
        "tensorboard": False,
    }
    path = tmp_path_factory.mktemp("config") / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train_cli(config_file, run_dir, *extra):
    return main(["train", str(config_file), "--run-dir", str(run_dir), "--no-progress", *extra])


@pytest.fixture(scope="module")
def full_run(config_file, tmp_path_factory):
    """The uninterrupted 12 steps: the losses every repaired run must reproduce."""
    run_dir = tmp_path_factory.mktemp("full") / "run"
    assert train_cli(config_file, run_dir) == 0
    return run_dir


@pytest.fixture(scope="module")
def base_run(config_file, tmp_path_factory):
    """A run stopped at step 8: checkpoints 4 and 8, metrics rows 1..8."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    assert train_cli(config_file, run_dir, "--stop-at", "8") == 0
    return run_dir


@pytest.fixture
def run(base_run, tmp_path):
    return shutil.copytree(base_run, tmp_path / "run")


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def contents(run_dir):
    """Every file of a run directory (but its lock) and its bytes: "nothing was touched"."""
    return {
        p.relative_to(run_dir).as_posix(): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def array_files(step_dir):
    return [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.parent.name.startswith("ocdbt.process_")]


def garble(step_dir):
    """Overwrite 400 bytes in the middle of each array data file of a checkpoint, as a disk or
    a copy gone wrong would (orbax may or may not notice: the checksums must)."""
    for path in array_files(step_dir):
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 400] = b"\xff" * 400
        path.write_bytes(bytes(data))


def resave_with_nan_embedding(run_dir, step):
    """Replace checkpoint ``step`` by one whose ``params.embedding`` is NaN (saved by orbax, unsealed)."""
    from jaxlm.loop import load_train_config
    from jaxlm.sharding import make_mesh

    config = load_train_config(run_dir / "config.yaml")
    trainer = Trainer(config.model, config.optimizer, config.steps, make_mesh(config.mesh))
    manager = ckpt.open_manager(run_dir, config.checkpoint)
    restored = ckpt.restore_latest(manager, trainer.abstract_state())
    assert restored.step == step
    params = dict(restored.state.params, embedding=restored.state.params["embedding"] * np.nan)
    manager.delete(step)
    ckpt.save(manager, step, restored.state.replace(params=params), restored.data_state, restored.meta, force=True)
    manager.wait_until_finished()
    manager.close()


def poison_losses_from(monkeypatch, first_bad_step):
    real_jit_step = Trainer.jit_step

    def poisoned_jit_step(self, example):
        step = real_jit_step(self, example)

        def run_step(state, batch):
            new_state, metrics = step(state, batch)
            if int(new_state.step) >= first_bad_step:
                metrics = dict(metrics, loss=metrics["loss"] * np.nan)
            return new_state, metrics

        return run_step

    monkeypatch.setattr(Trainer, "jit_step", poisoned_jit_step)


# ---------------------------------------------------------------------------------------
# Case 1 and 8: a checkpoint that does not fit, or was saved by another config
# ---------------------------------------------------------------------------------------


def test_changed_model_shape_is_refused_naming_the_leaf_and_nothing_is_touched(config_file, run, capsys):
    before = contents(run)
    assert train_cli(config_file, run, "model.n_layers=3", "--override-config") == 2
    err = capsys.readouterr().err
    assert "jaxlm train: error: checkpoint at step 8" in err
    assert "params.layers.attention.k: checkpoint has float32[2,32,4,8], this run expects float32[3,32,4,8]" in err
    assert contents(run) == before  # no corrupt-*, config.yaml and metrics.jsonl as they were

    (run / "config.yaml").unlink()
    before = contents(run)
    assert train_cli(config_file, run, "model.n_layers=3") == 2
    err = capsys.readouterr().err
    assert "checkpoint at step 8 was saved with a different config" in err and "model.n_layers: 2 -> 3" in err
    assert contents(run) == before


def test_deleted_config_yaml_does_not_resume_another_configs_state(config_file, run, full_run, capsys):
    (run / "config.yaml").unlink()
    before = contents(run)
    for override, diff in (
        ("optimizer.lr=0.01", "optimizer.lr: 0.003 -> 0.01"),
        ("seed=1", "seed: 0 -> 1"),
        ("data.sources={clean: 0.5, toxic: 0.5}", "data.sources.clean: 0.75 -> 0.5"),
    ):
        assert train_cli(config_file, run, override) == 2
        err = capsys.readouterr().err
        assert diff in err and "--override-config" in err
        assert contents(run) == before
    assert train_cli(config_file, run) == 0  # its own config resumes, exactly
    assert losses(run) == losses(full_run)


# ---------------------------------------------------------------------------------------
# Case 2: garbled bytes
# ---------------------------------------------------------------------------------------


def test_garbled_checkpoint_bytes_fall_back_to_the_previous_checkpoint(config_file, run, full_run):
    garble(run / "checkpoints" / "8")
    with pytest.warns(UserWarning, match=r"checkpoint at step 8 .*unreadable .*does not match its checksum"):
        assert train_cli(config_file, run) == 0
    assert (run / "checkpoints" / "corrupt-8").is_dir()
    assert losses(run) == losses(full_run)  # resumed from step 4: steps 1..12 exactly as uninterrupted


def test_unsealed_checkpoint_with_non_finite_values_is_set_aside(config_file, run, full_run):
    resave_with_nan_embedding(run, 8)
    assert not (run / "checkpoints" / "8" / ckpt.CHECKSUM_FILE).exists()
    with pytest.warns(UserWarning, match=r"checkpoint at step 8 .*non-finite values in params\.embedding"):
        assert train_cli(config_file, run) == 0
    assert losses(run) == losses(full_run)


def test_non_finite_loss_after_an_unverified_restore_does_not_call_it_last_good(config_file, run, monkeypatch, capsys):
    (run / "checkpoints" / "8" / ckpt.CHECKSUM_FILE).unlink()
    poison_losses_from(monkeypatch, 10)
    assert train_cli(config_file, run) == 2
    err = capsys.readouterr().err
    assert "non-finite loss nan at step 10" in err
    assert "newest checkpoint (8, not verified" in err and "last good" not in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["4", "8"]


# ---------------------------------------------------------------------------------------
# Case 6 and 7: the run directory
# ---------------------------------------------------------------------------------------


def test_second_training_in_the_same_run_dir_is_refused_naming_the_holder(config_file, run, capsys):
    before = contents(run)
    with DirectoryLock(run, "training run"):
        assert train_cli(config_file, run) == 2
    err = capsys.readouterr().err
    assert f"in use by another training run (pid {os.getpid()})" in err
    assert contents(run) == before


def test_failed_starts_leave_nothing_that_blocks_the_corrected_command(config_file, tmp_path, capsys):
    run_dir = tmp_path / "new"
    for override, message in (
        (f"data.dataset={tmp_path / 'typo'}", f"{tmp_path / 'typo'}"),
        ("data.sources={clean: 0.5, nope: 0.5}", "unknown source 'nope'"),
        ("model.vocab_size=100", "model.vocab_size (100) is smaller"),
        (f'eval_sets=[{{"name": "held", "path": "{tmp_path / "missing.txt"}"}}]', "eval_sets[held].path"),
    ):
        assert train_cli(config_file, run_dir, override) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        for name in ("config.yaml", "metrics.jsonl", "tokenizer.json"):
            assert not (run_dir / name).exists(), (override, name)
    assert train_cli(config_file, run_dir, "--stop-at", "4") == 0


# ---------------------------------------------------------------------------------------
# Case 13: metrics.jsonl, a full disk, damaged checkpoints read for inference, bad data
# ---------------------------------------------------------------------------------------


def test_torn_final_metrics_line_is_dropped_with_a_warning(config_file, run, full_run, caplog):
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "loss": 4.1')
    assert train_cli(config_file, run) == 0
    assert "dropped 1 torn final line" in caplog.text
    assert losses(run) == losses(full_run)


def test_garbled_metrics_line_before_the_end_is_an_error_naming_file_and_line(config_file, run, capsys):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:17] + "\x00garbage"
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    before = contents(run)
    assert train_cli(config_file, run) == 2
    assert f"{run / 'metrics.jsonl'}:3: garbled line" in capsys.readouterr().err
    assert contents(run) == before


def test_metrics_of_an_attempt_without_a_checkpoint_are_moved_aside(config_file, run, full_run):
    shutil.rmtree(run / "checkpoints")  # as if killed before its first checkpoint
    earlier = (run / "metrics.jsonl").read_text()
    assert train_cli(config_file, run) == 0
    assert (run / "metrics.jsonl.before-restart").read_text() == earlier
    assert losses(run) == losses(full_run)


def test_disk_full_while_saving_is_one_line_and_keeps_what_was_saved(config_file, run, full_run, monkeypatch, capsys):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    async def no_space(self, item, directory):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", no_space)
    rows_before = (run / "metrics.jsonl").read_text().splitlines()
    assert train_cli(config_file, run) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("jaxlm train: error:")]
    assert "checkpoints/12: saving the checkpoint of step 12 failed" in line and "no space left on device" in line
    assert "earlier checkpoints kept: [4, 8]" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["4", "8"]  # no *.orbax-checkpoint-tmp
    assert (run / "metrics.jsonl").read_text().splitlines()[:8] == rows_before

    monkeypatch.undo()  # space freed: the same command resumes from step 8
    assert train_cli(config_file, run) == 0
    assert losses(run) == losses(full_run)


def test_load_model_refuses_a_damaged_checkpoint_naming_its_directory(run, capsys):
    garble(run / "checkpoints" / "8")
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoints/8/state/.* does not match its checksum.*steps \[4\]"):
        ckpt.load_model(run)
    argv = ["generate", "--checkpoint", str(run / "checkpoints" / "8"), "--prompt", "the river", "--max-new-tokens", "2"]
    assert main(argv + ["--no-progress"]) == 2
    assert f"{run / 'checkpoints' / '8'}" in capsys.readouterr().err
    assert ckpt.load_model(run / "checkpoints" / "4").step == 4  # the other one still loads

    step_dir = run / "checkpoints" / "4"  # truncated, and no checksums to catch it: orbax's error, named
    (step_dir / ckpt.CHECKSUM_FILE).unlink()
    for path in array_files(step_dir):
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match=r"unreadable checkpoint: .*checkpoints/4"):
        ckpt.load_model(step_dir)


def test_load_model_refuses_parameters_that_do_not_fit_the_config(run):
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["n_layers"] = 3
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ckpt.CheckpointError, match=r"do not fit the model in .*config\.yaml: params\.layers"):
        ckpt.load_model(run)


def test_bad_dataset_and_eval_files_are_one_line_errors(config_file, tiny_prepared, tmp_path, capsys):
    bad_text = tmp_path / "held.txt"
    bad_text.write_bytes(b"the river ran past \xff\xfe old stone houses. " * 40)
    packed = gzip.compress(b"the river ran past old stone houses. " * 200)
    truncated = tmp_path / "held.txt.gz"
    truncated.write_bytes(packed[: len(packed) // 2])
    for path in (bad_text, truncated):
        eval_sets = json.dumps([{"name": "held", "path": str(path)}])
        assert train_cli(config_file, tmp_path / "run", f"eval_sets={eval_sets}") == 2
        err = capsys.readouterr().err
        assert f"eval_sets[held]: {path}" in err and "Traceback" not in err

    dataset = shutil.copytree(tiny_prepared, tmp_path / "dataset")
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["sources"]["clean"]["num_documents"] += 10
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    assert train_cli(config_file, tmp_path / "run", f"data.dataset={dataset}") == 2
    err = capsys.readouterr().err
    assert "jaxlm train: error:" in err and str(dataset) in err and "Traceback" not in err
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_steps_zero_and_negative_stop_at_are_one_line_errors(config_file, tmp_path, capsys):
    assert train_cli(config_file, tmp_path / "run", "--steps", "0") == 2
    assert "--steps: expected a positive number of steps, got 0" in capsys.readouterr().err
    assert train_cli(config_file, tmp_path / "run", "--stop-at", "-3") == 2
    assert "--stop-at: expected a positive step to stop at, got -3" in capsys.readouterr().err


def test_batch_that_does_not_split_over_the_mesh_is_one_line(config_file, tmp_path, capsys):
    import jax

    devices = jax.device_count()
    if devices == 1:
        pytest.skip("one device: every batch splits")
    run_dir = tmp_path / "run"
    assert train_cli(config_file, run_dir, f"data.batch_size={devices + 2}" if devices > 2 else "data.batch_size=3") == 2
    err = capsys.readouterr().err
    assert "data.batch_size" in err and "batch shards" in err and "Traceback" not in err
    assert not (run_dir / "checkpoints").exists()
