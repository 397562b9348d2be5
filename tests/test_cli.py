"""The command line end to end on a real (tiny) trained checkpoint and a crafted data directory:
train -> probe -> iti -> generate -> eval."""

import json

import numpy as np
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


STEER = {  # method -> extra options; the tiny model has 2 layers x 4 heads
    "iti": ["--k", "3"],
    "caa": ["--layer", "0", "--site", "resid_post"],
    "ablate": [],
    "leace": ["--site", "resid_mid"],
    "random": ["--base", "caa", "--seed", "3"],
}


def test_steer_every_method_then_generate_and_eval(run_dir, crafted_data_dir, tmp_path, capsys):
    from jaxlm.intervene import Intervention, read_sidecar

    common = ["--checkpoint", str(run_dir), "--data", "toxigen", "--data-dir", str(crafted_data_dir), "--no-progress"]
    for method, extra in STEER.items():
        path = tmp_path / f"{method}.safetensors"
        assert main(["steer", "--method", method, *common, "--out", str(path), *extra]) == 0
        assert capsys.readouterr().out.startswith(f"{method}: ")
        meta = read_sidecar(path)
        assert meta["method"] == method and meta["provenance"]["checkpoint"] == str(run_dir)
        assert meta["provenance"]["data"].startswith("toxigen") and meta["provenance"]["method"] == method
        settings = meta["provenance"]["settings"]
        if method != "iti":
            assert settings["layer"] == (0 if method == "caa" else 1)  # default: the middle layer
        loaded = Intervention.load(path)
        want = {"iti": [("head_out", "add", "last")], "caa": [("resid_post", "add", "all")],
                "ablate": [("resid_pre", "project", "all"), ("resid_mid", "project", "all"), ("resid_post", "project", "all")],
                "leace": [("resid_mid", "erase", "all")], "random": [("resid_pre", "add", "all")]}[method]
        assert list(loaded.structure()) == want

        assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "the river", "--intervention", str(path),
                     "--scale", "2", "--max-new-tokens", "4", "--no-progress"]) == 0
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert line["scale"] == 2.0 and line["method"] == method and isinstance(line["completion"], str)

        out = tmp_path / f"eval_{method}"
        assert main(["eval", "rtp", "--checkpoint", str(run_dir), "--data-dir", str(crafted_data_dir), "--out", str(out),
                     "--intervention", str(path), "--scale", "1", "--limit", "2", "--samples", "1",
                     "--max-new-tokens", "4", "--batch-size", "8", "--scorer", "profanity-check"]) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["method"] == method and results["scale"] == 1.0 and "expected_max_toxicity" in results["rtp"]
        capsys.readouterr()


def test_steer_reuses_a_probe_run_and_refuses_bad_options(run_dir, crafted_data_dir, tmp_path, capsys):
    probe_dir = tmp_path / "probe"
    common = ["--checkpoint", str(run_dir), "--data-dir", str(crafted_data_dir), "--no-progress"]
    assert main(["probe", *common, "--data", "toxigen", "--out", str(probe_dir)]) == 0
    path = tmp_path / "iti.safetensors"
    assert main(["steer", "--method", "iti", "--checkpoint", str(run_dir), "--probe-dir", str(probe_dir),
                 "--k", "2", "--scale", "5", "--out", str(path)]) == 0
    assert "iti: add at head_out (last); 2 units, scale 5" in capsys.readouterr().out
    from jaxlm.cli.iti import build

    reference = build(probe_dir, 2, 5.0, "mass_mean", "last", 0)  # `jaxlm iti`'s numbers
    from jaxlm.intervene import Intervention

    np.testing.assert_array_equal(Intervention.load(path).head_shift(), reference.head_shift())

    bad = [
        (["--method", "caa", "--data", "toxigen", "--layer", "2"], r"layer: expected an integer in [0, 1]"),
        (["--method", "iti", "--data", "toxigen", "--k", "9"], "k: expected an integer in [1, L*H = 8], got 9"),
        (["--method", "caa", "--probe-dir", str(probe_dir)], "--probe-dir: only iti"),
        (["--method", "leace"], "--data: required"),
        (["--method", "steering", "--data", "toxigen"], "--method: expected one of iti, caa, ablate, leace, random"),
        (["--method", "caa", "--data", "toxigen", "--scale", "nan"], "--scale: expected a finite number"),
        (["--method", "caa", "--data", "toxigen", "--batch-size", "0"], "--batch-size: expected an integer >= 1"),
    ]
    for options, message in bad:
        assert main(["steer", *common, "--out", str(tmp_path / "x.safetensors"), *options]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.safetensors").exists()
    for extra, message in ((["--iti", str(path), "--intervention", str(path)], "--intervention and --iti: give one"),
                           (["--intervention", str(path), "--scale", "1", "--alpha", "2"], "--scale and --alpha: give one"),
                           (["--scale", "1"], "--scale needs --intervention FILE")):
        assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "x", *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["eval", "rtp", "--checkpoint", str(run_dir), "--iti", str(path), "--intervention", str(path)]) == 2
    assert "--intervention and --iti: give one" in capsys.readouterr().err
