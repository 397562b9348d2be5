"""The command line end to end on a real (tiny) trained checkpoint and a crafted data directory:
train -> probe -> iti -> generate -> eval."""

import json

import pytest

from jaxlm.cli import main


@pytest.fixture(scope="module")
def run_dir(tiny_run_dir):
    return tiny_run_dir


def test_train_probe_iti_generate_eval(run_dir, crafted_data_dir, tmp_path, capsys):
    data_dir = crafted_data_dir
    assert (run_dir / "checkpoints" / "20").is_dir()
    probe_dir = tmp_path / "probe"
    assert main(["probe", "--checkpoint", str(run_dir), "--data", "toxigen", "--data-dir", str(data_dir),
                 "--out", str(probe_dir), "--no-progress"]) == 0
    report = json.loads((probe_dir / "probe_report.json").read_text())
    assert len(report["accuracy"]) == 2 and len(report["accuracy"][0]) == 4

    iti = tmp_path / "iti.safetensors"
    assert main(["iti", "--probe-dir", str(probe_dir), "--k", "3", "--alpha", "4", "--out", str(iti)]) == 0
    assert "ITI on 3 heads" in capsys.readouterr().out

    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "the river", "--iti", str(iti),
                 "--alpha", "6", "--max-new-tokens", "5", "--no-progress"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["prompt"] == "the river" and isinstance(line["completion"], str)

    out = tmp_path / "eval"
    argv = ["eval", "all", "--checkpoint", str(run_dir), "--data-dir", str(data_dir), "--out", str(out),
            "--samples", "2", "--max-new-tokens", "4", "--batch-size", "8", "--limit", "2", "--ce-docs", "4", "--ce-len", "32",
            "--scorer", "profanity-check"]  # the CLI wiring; the default scorer has its own tests
    assert main(argv + ["--iti", str(iti), "--alpha", "4"]) == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("expected_max_toxicity", "toxicity_probability", "mean_toxicity", "ce", "blimp_accuracy"):
        assert key in results
    assert results["capability"]["kl"] > 0  # the intervention moves the next-token distribution
    assert set(results["toxigen"]["groups"]["by_group"]) == {"groupa", "groupb"}
    assert (out / "results.png").exists() and (out / "rtp_generations.jsonl").exists()

    assert main(argv + ["--seed", "3"]) == 0  # same command twice: same numbers
    first = json.loads((out / "results.json").read_text())
    assert main(argv + ["--seed", "3"]) == 0
    assert json.loads((out / "results.json").read_text()) == first


def test_eval_reports_missing_data_clearly(run_dir, tmp_path, capsys):
    assert main(["eval", "ce", "--checkpoint", str(run_dir), "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "eval/wikitext2/test.txt" in capsys.readouterr().err


def test_info_and_help(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "olmo-1b" in info["presets"] and info["versions"]["jax"]
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "probe" in capsys.readouterr().out
