"""init_from, SFT and DPO runs through the training loop (jaxlm train / jaxlm posttrain)."""

import json
import math

import numpy as np
import pytest
import yaml

from jaxlm import checkpoint as ckpt
from jaxlm import warmstart
from jaxlm.checkpoint import IncompatibleCheckpointError
from jaxlm.config import ConfigError, from_dict
from jaxlm.data.pipeline import build_pipeline
from jaxlm.loop import TrainConfig, load_train_config, read_metrics_rows, train
from jaxlm.objectives import next_token_loss

from conftest import CLEAN_WORDS, TOXIC_WORDS


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _sentence(rng, words, n):
    return " ".join(rng.choice(words, size=n))


def sft_file(tmp_path, n=24):
    rng = np.random.default_rng(0)
    return _rows(tmp_path / "sft.jsonl", [
        {"prompt": _sentence(rng, TOXIC_WORDS, 6), "response": " " + _sentence(rng, CLEAN_WORDS, 5)} for _ in range(n)
    ])


def pairs_file(tmp_path, n=24):
    rng = np.random.default_rng(1)
    return _rows(tmp_path / "pairs.jsonl", [
        {"prompt": _sentence(rng, CLEAN_WORDS, 6), "chosen": " " + _sentence(rng, CLEAN_WORDS, 5),
         "rejected": " " + _sentence(rng, TOXIC_WORDS, 5)} for _ in range(n)
    ])


def post_config(tiny_run_dir, objective, path, **changes):
    data = {
        "model": {"preset": "tiny", "vocab_size": 320},
        "objective": objective,
        "init_from": str(tiny_run_dir),
        "examples": {"paths": [path], "format": "sft" if objective == "sft" else "preference", "seq_len": 32,
                     "batch_size": 8},
        "optimizer": {"lr": 1e-3, "warmup_steps": 0},
        "checkpoint": {"every": 3},
        "steps": 6,
        "log_every": 1,
        "tensorboard": False,
    }
    for key, value in changes.items():
        data[key] = value
    return from_dict(TrainConfig, data)


def losses(run_dir):
    rows, _ = read_metrics_rows(run_dir / "metrics.jsonl")
    return [json.loads(line)["loss"] for _, line in rows]


def test_init_from_starts_from_exactly_the_given_parameters(tiny_run_dir, tmp_path):
    source = load_train_config(tiny_run_dir / "config.yaml")
    config = from_dict(TrainConfig, {**yaml.safe_load((tiny_run_dir / "config.yaml").read_text()),
                                     "init_from": str(tiny_run_dir), "steps": 1, "log_every": 1})
    run = tmp_path / "continued"
    train(config, run, show_progress=False)

    loaded = ckpt.load_model(tiny_run_dir)
    pipeline = build_pipeline(source.data)
    batch = next(pipeline)
    pipeline.close()
    loss, aux = next_token_loss(loaded.config, loaded.params, {k: batch[k] for k in ("tokens", "segment_ids", "positions")})
    assert losses(run)[0] == pytest.approx(float(loss / aux["n_tokens"]), rel=1e-6)
    record = json.loads((run / warmstart.START_FILE).read_text())
    assert record["step"] == 20 and record["init_from"] == str(tiny_run_dir)
    assert record["params_sha256"] == ckpt.params_sha256(loaded.params)


def test_init_from_an_hf_directory_starts_from_the_same_weights(tiny_run_dir, tmp_path):
    import shutil

    from jaxlm import hf

    loaded = ckpt.load_model(tiny_run_dir)
    exported = hf.save(loaded.config, loaded.params, tmp_path / "hf")
    shutil.copyfile(tiny_run_dir / "tokenizer.json", exported / "tokenizer.json")
    config = post_config(exported, "sft", sft_file(tmp_path), steps=1)
    train(config, tmp_path / "run", show_progress=False)
    record = json.loads((tmp_path / "run" / warmstart.START_FILE).read_text())
    assert record["step"] is None and record["resolved"] == str(exported.resolve())
    assert record["params_sha256"] == ckpt.params_sha256(loaded.params)


def test_init_from_a_model_that_does_not_fit_is_refused_and_nothing_is_written(tiny_run_dir, tmp_path):
    config = post_config(tiny_run_dir, "sft", sft_file(tmp_path), model={"preset": "tiny", "vocab_size": 320, "n_layers": 3})
    with pytest.raises(IncompatibleCheckpointError, match=r"model.n_layers: the model has 2, this config 3"):
        train(config, tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_post_training_configs_are_validated(tiny_run_dir, tmp_path):
    path = sft_file(tmp_path)
    with pytest.raises(ConfigError, match="init_from: objective 'sft' post-trains a model"):
        post_config(tiny_run_dir, "sft", path, init_from=None)
    with pytest.raises(ConfigError, match="examples.format: objective 'dpo' needs 'preference' rows"):
        post_config(tiny_run_dir, "dpo", path, examples={"paths": [path], "format": "sft", "seq_len": 32, "batch_size": 8})
    with pytest.raises(ConfigError, match="examples: prompt/response data is for objective sft or dpo"):
        from_dict(TrainConfig, {"examples": {"paths": [path], "format": "sft", "seq_len": 32, "batch_size": 8}})
    with pytest.raises(ConfigError, match="examples.seq_len .* exceeds model.max_seq_len"):
        post_config(tiny_run_dir, "sft", path, examples={"paths": [path], "format": "sft", "seq_len": 128, "batch_size": 8})


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_post_training_resumes_exactly(tiny_run_dir, tmp_path, objective):
    path = sft_file(tmp_path) if objective == "sft" else pairs_file(tmp_path)
    config = post_config(tiny_run_dir, objective, path)
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(config, whole, show_progress=False)
    train(config, split, max_steps=3, show_progress=False)
    reference_before = (split / warmstart.REFERENCE_FILE).stat().st_mtime_ns if objective == "dpo" else None
    train(config, split, show_progress=False)
    assert losses(split) == losses(whole) and len(losses(whole)) == 6
    summary = json.loads((whole / "examples_summary.json").read_text())
    assert summary["files"][0]["kept"] == 24
    assert (whole / "tokenizer.json").read_bytes() == (tiny_run_dir / "tokenizer.json").read_bytes()
    if objective == "dpo":
        assert losses(whole)[0] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at step 0
        assert (split / warmstart.REFERENCE_FILE).stat().st_mtime_ns == reference_before
        assert json.loads((split / warmstart.REFERENCE_META).read_text())["pairs"] == 24
    else:
        assert losses(whole)[-1] < losses(whole)[0]


def test_dpo_reference_from_other_pairs_is_refused(tiny_run_dir, tmp_path):
    config = post_config(tiny_run_dir, "dpo", pairs_file(tmp_path))
    run = tmp_path / "run"
    train(config, run, max_steps=3, show_progress=False)
    meta = json.loads((run / warmstart.REFERENCE_META).read_text())
    meta["fingerprint"] = "0" * 64
    (run / warmstart.REFERENCE_META).write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match="computed for other pairs or another starting model"):
        train(config, run, show_progress=False)


def test_posttrain_cli_runs_and_refuses_another_objective(tiny_run_dir, tmp_path, capsys):
    from jaxlm.cli import main

    config = post_config(tiny_run_dir, "sft", sft_file(tmp_path))
    path = tmp_path / "sft.yaml"
    from jaxlm.config import dump_yaml

    dump_yaml(config, path)
    assert main(["posttrain", "sft", str(path), "--run-dir", str(tmp_path / "run"), "--no-progress", "steps=2"]) == 0
    assert len(losses(tmp_path / "run")) == 2
    assert main(["posttrain", "dpo", str(path), "--run-dir", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("jaxlm posttrain dpo: error: ") and "objective is 'sft'" in err[-1]
    missing = tmp_path / "no-such-run"
    assert main(["posttrain", "sft", str(path), "--run-dir", str(tmp_path / "third"), f"init_from={missing}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"jaxlm posttrain sft: error: init_from: {missing}: not a jaxlm run directory")


def test_posttrain_detox_experiment_runs_every_step_and_reports(tiny_run_dir, crafted_data_dir, tmp_path, monkeypatch):
    """experiments/posttrain_detox.py on the tiny model: data, SFT, DPO, ITI, evaluation, attacks, report;
    a rerun reuses every finished output."""
    import importlib.util
    import sys
    from pathlib import Path

    monkeypatch.setenv("JAXLM_DATA_DIR", str(crafted_data_dir))
    script = Path(__file__).resolve().parents[1] / "experiments" / "posttrain_detox.py"
    spec = importlib.util.spec_from_file_location("posttrain_detox", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    small = {"steps": 2, "batch_size": 8, "seq_len": 32}
    config = {
        "checkpoint": str(tiny_run_dir),
        "onpolicy": {"rtp_prompts": 2, "pol_prompts": 0, "samples_per_prompt": 3, "max_new_tokens": 4, "batch_size": 8,
                     "scorer": "profanity-check", "min_gap": 1e-6},
        "sft": small, "dpo": small, "probe_data": "toxigen", "iti_k": 2, "iti_kl": 0.01,
        "eval": {"rtp_prompts": 2, "rtp_samples": 2, "max_new_tokens": 4, "toxigen_prompts": 1, "ce_docs": 4, "ce_len": 16,
                 "blimp_per_paradigm": 1, "batch_size": 8, "scorer": "profanity-check"},
        "redteam": {"pairs": 1, "prompt_tokens": 8, "target_tokens": 2, "continuation_tokens": 2, "scorer": "profanity-check",
                    "gcg": {"steps": 2, "suffix_length": 3, "top_k": 8, "candidates": 8}},
        "redteam_methods": ["base", "iti", "dpo"],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert module.main([str(path), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"base", "iti", "sft", "sft-random", "dpo"} and set(report["attacks"]) == {"base", "iti", "dpo"}
    assert report["methods"]["iti"]["kl"] > 0 and report["methods"]["dpo"]["kl"] > 0
    assert report["methods"]["dpo"]["vs_base"]["n"] == 4  # prompts paired with the base model's
    assert "| dpo |" in (out / "report.md").read_text() and (out / "posttrain.png").stat().st_size > 0
    def kept(p):  # the attack summaries and locks are rewritten by a rerun that finds every attack done
        redone = p.name == ".lock" or ("redteam" in p.parts and p.name == "summary.json")
        return p.is_file() and not redone and "report" not in p.name and p.suffix != ".png"

    outputs = {p: p.stat().st_mtime_ns for p in out.rglob("*") if kept(p)}
    assert module.main([str(path), "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in outputs} == outputs
