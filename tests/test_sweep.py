"""The study sweep: the plan it implies, config errors, and a tiny end-to-end sweep that resumes."""

import json
import os

import numpy as np
import pytest
import yaml

from jaxlm.config import ConfigError, from_dict
from jaxlm.sweep import Sweep, SweepConfig, load_sweep_config, methods_for, plan_runs
from jaxlm.evaluate.stats import paired_test
from jaxlm.sweep.config import Strength
from jaxlm.sweep.plan import posttrained, train_config
from jaxlm.sweep.report import right_tail_test

TEMPLATE = {
    # a 160-token context: the prompting method's instruction is ~100 tokens in this 320-token BPE
    "model": {"preset": "tiny", "vocab_size": 320, "max_seq_len": 160},
    "optimizer": {"lr": 3e-3, "warmup_steps": 2},
    "data": {"seq_len": 32, "batch_size": 8},
    "steps": 12,
    "log_every": 4,
    "checkpoint": {"every": 12},
    "tensorboard": False,
}


def sweep_config(**changes) -> SweepConfig:
    data = {"name": "t", "recipe": "unused.yaml", "train": TEMPLATE, "clean": "clean", "toxic": "toxic",
            "shares": [0.0, 0.25], "seeds": [0], "designs": ["added", "fixed_total"], **changes}
    return from_dict(SweepConfig, data)


def test_plan_designs_keep_clean_tokens_or_total_fixed():
    config = sweep_config(shares=[0.0, 0.1, 0.25], seeds=[0, 1], tagged=[{"kind": "inst", "share": 0.1, "every": 400}],
                          train={**TEMPLATE, "steps": 1000})
    order = [r.name for r in plan_runs(config)]
    # the main design across seeds first, then the tagged baselines, then the other design
    assert order[:6] == ["clean-seed0", "added-tox10-seed0", "added-tox25-seed0", "clean-seed1", "added-tox10-seed1", "added-tox25-seed1"]
    assert order[6:8] == ["inst-tox10-seed0", "inst-tox10-seed1"] and order[8].startswith("fixed_total")
    runs = {r.name: r for r in plan_runs(config)}
    # share 0 is the same model in both designs: trained once per seed
    assert sorted(n for n in runs if n.startswith("clean")) == ["clean-seed0", "clean-seed1"]
    assert runs["added-tox25-seed0"].steps == round(1000 / 0.75)
    assert runs["fixed_total-tox25-seed1"].steps == 1000
    for run in runs.values():  # the added design: clean tokens (steps x clean share) fixed
        if run.design in ("added", "clean"):
            assert abs(run.steps * (1 - run.share) - 1000) <= 0.5
    cfg = train_config(config, runs["added-tox10-seed1"], "/data")
    assert cfg.data.sources == {"clean": 0.9, "toxic": 0.1} and cfg.seed == 1 and cfg.data.seed == 1
    tags = train_config(config, runs["inst-tox10-seed0"], "/data").data.tags
    assert tags.kind == "inst" and tags.every == 400
    methods = [m.name for m in methods_for(config, runs["clean-seed0"])]
    assert methods == ["base", "prompting", "iti-weak", "iti-mid", "iti-strong"]
    tagged = methods_for(config, runs["inst-tox10-seed0"])
    assert [m.name for m in tagged] == ["base", "tag-conditioned"] and tagged[1].prefix == "The following text is not toxic:\n"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"shares": [0.1, 0.2]}, "share 0"),
        ({"shares": [0.0, 1.0]}, "shares"),
        ({"designs": ["mixed"]}, "designs"),
        ({"seeds": [0, 0]}, "seeds"),
        ({"train": {**TEMPLATE, "data": {"dataset": "x"}}}, "train.data.dataset"),
        ({"iti": {"k": 0}}, "iti.k"),
        ({"tagged": [{"kind": "meda", "share": 0.0}]}, "tagged"),
    ],
)
def test_config_errors_name_the_field(changes, message):
    with pytest.raises(ConfigError, match=message):
        sweep_config(**changes)


def test_statistics():
    rng = np.random.default_rng(0)
    a = rng.normal(0.5, 0.1, 200)
    test = paired_test(a - 0.05, a + rng.normal(0, 0.01, 200))
    assert test["diff"] < 0 and test["hi"] < 0 and test["p"] < 1e-6
    same = paired_test(a, a + rng.normal(0, 0.01, 200))
    assert same["lo"] < 0 < same["hi"]
    high = [rng.uniform(0.5, 0.9, (4, 4)) for _ in range(2)]
    low = [rng.uniform(0.5, 0.7, (4, 4)) for _ in range(2)]
    assert right_tail_test(high, low)["p"] < 0.05 and right_tail_test(low, high)["p"] > 0.5


@pytest.fixture(scope="module")
def tiny_sweep(crafted_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    recipe = {
        "out": str(root / "prepared"),
        "sources": {
            name: {"reader": "jsonl", "paths": [str(crafted_data_dir / "corpora" / f"{name}.jsonl")],
                   "args": {"text_field": "text", "id_field": "id"}}
            for name in ("clean", "toxic")
        },
        "tokenizer": {"vocab_size": 320},
        "toxicity": {"enabled": True},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    config = {
        "name": "tiny", "recipe": str(root / "recipe.yaml"), "clean": "clean", "toxic": "toxic",
        "shares": [0.0, 0.25], "seeds": [0], "designs": ["added"],
        "tagged": [{"kind": "meda", "share": 0.25}], "train": TEMPLATE,
        "probe": {"data": "toxigen", "max_len": 16, "batch_size": 8},
        "iti": {"k": 3, "kl_targets": {"weak": 0.01, "strong": 0.05}, "calibration_rows": 4},
        "eval": {"rtp_prompts": 2, "rtp_samples": 2, "max_new_tokens": 4, "toxigen_prompts": 2, "ce_docs": 4,
                 "ce_len": 16, "blimp_per_paradigm": 2, "batch_size": 8, "scorer": "profanity-check"},
    }
    (root / "sweep.yaml").write_text(yaml.safe_dump(config))
    return root


def run_sweep(root, monkeypatch, data_dir, *overrides, **kwargs):
    monkeypatch.setenv("JAXLM_DATA_DIR", str(data_dir))
    config = load_sweep_config(str(root / "sweep.yaml"), list(overrides))
    log = []
    report = Sweep(config, root / "out", progress=False, echo=log.append, **kwargs).run()
    return config, report, log


def eval_files(root):
    paths = sorted(p for p in (root / "out" / "runs").glob("*/eval/*.json") if not p.name.endswith(".done.json"))
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in paths}


def test_sweep_end_to_end_then_resumes_without_redoing_work(tiny_sweep, crafted_data_dir, monkeypatch):
    config, report, _ = run_sweep(tiny_sweep, monkeypatch, crafted_data_dir)
    out = tiny_sweep / "out"
    runs = plan_runs(config)
    assert [r.name for r in runs] == ["clean-seed0", "added-tox25-seed0", "meda-tox25-seed0"]
    for run in runs:
        metrics = [json.loads(line) for line in (out / "runs" / run.name / "train" / "metrics.jsonl").read_text().splitlines()]
        assert metrics[-1]["step"] == run.steps == (12 if run.share == 0 else 16)  # clean tokens fixed
        for method in methods_for(config, run):
            result = json.loads((out / "runs" / run.name / "eval" / f"{method.name}.json").read_text())
            assert len(result["rtp_prompt_max"]) == 4 and np.isfinite(result["ce"])
            iti = method.name.startswith("iti-")
            assert (result["kl"] > 0) == iti and (result["alpha"] > 0) == iti  # only ITI moves the distribution
        if run.tagged is None:  # strengths calibrated per model to the KL budgets (0.01 < 0.05 nats/token)
            weak, strong = (json.loads((out / "runs" / run.name / "eval" / f"iti-{n}.json").read_text()) for n in ("weak", "strong"))
            assert weak["alpha"] < strong["alpha"] and weak["kl"] < strong["kl"]
    base = json.loads((out / "runs" / "clean-seed0" / "eval" / "base.json").read_text())
    prompting = json.loads((out / "runs" / "clean-seed0" / "eval" / "prompting.json").read_text())
    assert prompting["ce"] == base["ce"] and prompting["prefix"]  # CE is the model's, the prefix only steers generation
    text = report.read_text()
    assert "## Claims of the reference study" in text and "| clean no intervention |" in text
    assert "MEDA 25% (conditioned on non-toxic)" in text
    counted = [json.loads(p.read_text()) for p in out.glob("runs/*/eval/*.json") if not p.name.endswith(".done.json")]
    empty, cut = (sum(r[p][key] for r in counted for p in ("rtp", "toxigen")) for key in ("empty_continuations", "truncated_prompts"))
    assert cut > 0  # the detox instruction plus a ToxiGen prompt overflows the tiny model's context
    assert f"empty continuations: {empty}" in text and f"prompts cut to the context: {cut} (most: " in text
    summary = json.loads((out / "report.json").read_text())
    assert {c["verdict"] for c in summary["claims"]} <= {"reproduced", "not reproduced", "direction agrees, not significant",
                                                         "contradicted (opposite, significant)"}
    assert len(summary["claims"]) >= 5
    for name in ("toxicity_by_share.png", "probe_accuracy.png", "tradeoff.png", "loss_curves.png"):
        assert (out / name).stat().st_size > 0

    before = eval_files(tiny_sweep)
    trained = {r.name: (out / "runs" / r.name / "train.done.json").read_text() for r in runs}
    run_sweep(tiny_sweep, monkeypatch, crafted_data_dir)  # everything is done: nothing is redone
    assert eval_files(tiny_sweep) == before
    # a changed evaluation setting redoes the evaluations only
    run_sweep(tiny_sweep, monkeypatch, crafted_data_dir, "eval.rtp_samples=1")
    after = eval_files(tiny_sweep)
    assert set(after) == set(before) and all(after[k] != before[k] for k in before)
    assert {r.name: (out / "runs" / r.name / "train.done.json").read_text() for r in runs} == trained
    # a lost output is rebuilt on the next run (a sweep killed during evaluation)
    (out / "runs" / "clean-seed0" / "eval" / "iti-weak.json.done.json").unlink()
    run_sweep(tiny_sweep, monkeypatch, crafted_data_dir, "eval.rtp_samples=1")
    again = eval_files(tiny_sweep)
    changed = [k for k in after if again[k] != after[k]]
    assert changed == ["out/runs/clean-seed0/eval/iti-weak.json"]
    # a fresh copy of the corpora (new mtimes): prepare rebuilds the same tokens, no run is redone
    manifest = tiny_sweep / "prepared" / "manifest.json"
    built = manifest.read_text()
    for path in crafted_data_dir.rglob("*"):
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    run_sweep(tiny_sweep, monkeypatch, crafted_data_dir, "eval.rtp_samples=1")
    assert manifest.read_text() != built  # rebuilt (new input fingerprints and build time)
    assert eval_files(tiny_sweep) == again
    assert {r.name: (out / "runs" / r.name / "train.done.json").read_text() for r in runs} == trained
    # a changed training setting retrains that run from scratch (not from its old checkpoint)
    _, _, log = run_sweep(tiny_sweep, monkeypatch, crafted_data_dir, "eval.rtp_samples=1",
                          "tagged=[{kind: meda, share: 0.25, every: 8}]")
    assert "meda-tox25-seed0: its settings changed since it was trained: training afresh" in log
    retrained = [json.loads(line) for line in (out / "runs" / "meda-tox25-seed0" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert retrained[0]["step"] < retrained[-1]["step"] == 16  # every step ran again
    assert {r.name: (out / "runs" / r.name / "train.done.json").read_text() for r in runs[:2]} == {
        r.name: trained[r.name] for r in runs[:2]}


def test_sweep_reports_missing_stages_and_data(tiny_sweep, crafted_data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("JAXLM_DATA_DIR", str(crafted_data_dir))
    config = load_sweep_config(str(tiny_sweep / "sweep.yaml"), ["seeds=[7]"])
    with pytest.raises(RuntimeError, match="run the train stage first"):
        Sweep(config, tiny_sweep / "out", progress=False, echo=lambda _: None).run(("prepare", "probe"))
    with pytest.raises(ValueError, match="unknown stage"):
        Sweep(config, tiny_sweep / "out", progress=False).run(("pretrain",))


def test_methods_specs_are_planned_with_explicit_fields():
    config = sweep_config(methods=[
        {"name": "caa4", "method": "caa", "settings": {"layer": 1}, "strength": {"scale": 4.0}},
        {"name": "ablate-kl", "method": "ablate", "strength": {"kl": 0.01}},
    ])
    clean = plan_runs(config)[0]
    methods = {m.name: m for m in methods_for(config, clean, {"ablate-kl": {"ablate-kl": 0.5}})}
    assert list(methods) == ["base", "prompting", "iti-weak", "iti-mid", "iti-strong", "caa4", "ablate-kl"]
    assert (methods["iti-mid"].build, methods["iti-mid"].level, methods["iti-mid"].scale) == ("iti", "mid", 8.0)
    assert (methods["caa4"].build, methods["caa4"].scale, methods["ablate-kl"].scale) == ("caa4", 4.0, 0.5)
    assert methods["caa4"].label == "+ caa4 (caa, scale 4)" and not methods["prompting"].intervened


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "caa", "method": "caa", "settings": {"layer": 99}, "strength": {"scale": 1.0}},
         r"methods\[caa\]\.settings\.layer: expected an integer in \[0, 1\], got 99 \(clean-seed0: model with 2 layers"),
        ({"name": "r", "method": "random", "settings": {"base": "iti", "k": 99}, "strength": {"scale": 1.0}},
         r"methods\[r\]\.settings\.k: expected a number of heads in \[1, 8\], got 99"),
    ],
)
def test_check_plan_refuses_a_spec_that_does_not_fit_the_model(spec, message):
    from jaxlm.sweep.plan import check_plan

    with pytest.raises(ConfigError, match=message) as err:
        check_plan(sweep_config(methods=[spec], iti={"k": 3}))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "x", "method": "steer", "strength": {"scale": 1.0}}, r"methods\[x\]\.method: expected one of iti, caa"),
        ({"name": "x", "method": "caa", "settings": {"k": 3}, "strength": {"scale": 1.0}}, r"unknown setting\(s\) \['k'\]"),
        ({"name": "x", "method": "caa", "settings": {"scale": 3}, "strength": {"scale": 1.0}}, r"settings\.scale: set by"),
        ({"name": "x", "method": "caa", "strength": {"scale": 1.0, "kl": 0.1}}, "exactly one of scale or kl"),
        ({"name": "x", "method": "caa", "strength": {"kl": -1.0}}, "positive KL budget"),
        ({"name": "x", "method": "caa", "strength": {"scale": float("nan")}}, "finite non-zero"),
        ({"name": "prompting", "method": "caa", "strength": {"scale": 1.0}}, r"methods\[prompting\]\.name"),
        ({"name": "a/b", "method": "caa", "strength": {"scale": 1.0}}, "file-safe name"),
    ],
)
def test_spec_errors_name_the_field(spec, message):
    with pytest.raises(ConfigError, match=message):
        sweep_config(methods=[spec])


def test_spec_names_are_unique():
    spec = {"name": "c", "method": "caa", "strength": {"scale": 1.0}}
    with pytest.raises(ConfigError, match=r"methods: duplicate names in \['c', 'c'\]"):
        sweep_config(methods=[spec, spec])


def test_sweep_with_intervention_specs_reports_their_rows_and_resumes(tiny_sweep, crafted_data_dir, monkeypatch):
    root = tiny_sweep / "specs"
    root.mkdir()
    config = yaml.safe_load((tiny_sweep / "sweep.yaml").read_text())
    config.update(shares=[0.0], tagged=[], prompting=False, iti={"k": 2, "alphas": {"weak": 4.0}})
    config["methods"] = [
        {"name": "caa4", "method": "caa", "settings": {"layer": 1}, "strength": {"scale": 4.0}},
        {"name": "ablate-kl", "method": "ablate", "settings": {"layer": 0}, "strength": {"kl": 0.01}},
        {"name": "random-caa", "method": "random", "settings": {"base": "caa", "layer": 1, "seed": 3},
         "strength": {"scale": 4.0}},
    ]
    (root / "sweep.yaml").write_text(yaml.safe_dump(config))
    config, report, log = run_sweep(root, monkeypatch, crafted_data_dir)
    run = root / "out" / "runs" / "clean-seed0"
    results = {m.name: json.loads((run / "eval" / f"{m.name}.json").read_text()) for m in methods_for(config, plan_runs(config)[0])}
    assert list(results) == ["base", "iti-weak", "caa4", "ablate-kl", "random-caa"]
    assert results["caa4"]["scale"] == 4.0 and results["random-caa"]["scale"] == 4.0 and results["caa4"]["kl"] > 0
    ablate = results["ablate-kl"]
    marker = json.loads((run / "interventions" / "ablate-kl.safetensors.done.json").read_text())
    assert 0 < marker["alphas"]["ablate-kl"] <= 1.0  # calibrated on this model (a projection: at most the whole)
    assert ablate["scale"] == pytest.approx(marker["alphas"]["ablate-kl"], rel=1e-6) and ablate["kl"] > 0
    assert len(marker["kl_curve"]["kl"]) == 17
    from jaxlm.intervene import Intervention

    caa, control = (Intervention.load(run / "interventions" / f"{n}.safetensors") for n in ("caa4", "random-caa"))
    v, r = (np.asarray(i.edits[0].arrays["v"]) for i in (caa, control))
    assert caa.method == "caa" and control.method == "random" and caa.structure() == control.structure()
    np.testing.assert_allclose(np.linalg.norm(v, axis=-1), np.linalg.norm(r, axis=-1), rtol=1e-5)  # norm-matched
    assert abs(float(v[1] @ r[1]) / float(np.linalg.norm(v[1]) ** 2)) < 0.5  # another direction
    # residual activations collected once (caa, ablate and the control all read resid_pre)
    assert sorted(p.name for p in (run / "activations").iterdir()) == ["resid_pre.npy", "resid_pre.npy.done.json"]
    text = report.read_text()
    for row in ("| clean no intervention |", "| clean + ITI weak (alpha 4) |", "| clean + caa4 (caa, scale 4) |",
                "| clean + ablate-kl (ablate, KL 0.01) |", "| clean + random-caa (random, scale 4) |"):
        assert row in text
    assert "scale ablate-kl" in text and "RTP tox x100: random-caa" in text
    assert "Other interventions: caa4 (caa, layer=1, scale 4)" in text

    built = {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and "eval" not in p.parts}
    before = eval_files(root)
    _, _, log = run_sweep(root, monkeypatch, crafted_data_dir)  # all done: nothing is redone
    assert eval_files(root) == before and not [line for line in log if line.startswith(("[train", "[probe", "[iti", "[eval"))]
    assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and "eval" not in p.parts} == built
    # a changed spec rebuilds and re-evaluates that method only
    specs = [dict(spec) for spec in yaml.safe_load((root / "sweep.yaml").read_text())["methods"]]
    specs[0]["strength"] = {"scale": 2.0}
    run_sweep(root, monkeypatch, crafted_data_dir, "methods=" + yaml.safe_dump(specs, default_flow_style=True).strip())
    after = eval_files(root)
    assert [k for k in before if after[k] != before[k]] == ["out/runs/clean-seed0/eval/caa4.json"]


def test_sweep_post_trains_red_teams_reports_and_resumes(tiny_sweep, crafted_data_dir, monkeypatch):
    root = tiny_sweep / "posttrain"
    root.mkdir()
    config = yaml.safe_load((tiny_sweep / "sweep.yaml").read_text())
    config.update(shares=[0.0, 0.25], tagged=[], prompting=False, iti={"k": 2, "alphas": {"weak": 4.0}})
    config["posttrain"] = {
        "shares": [0.25],
        "data": {"rtp_prompts": 2, "pol_prompts": 0, "samples_per_prompt": 4, "max_new_tokens": 4, "batch_size": 8,
                 "scorer": "profanity-check", "min_gap": 1e-6},
        "sft": {"steps": 2, "batch_size": 8},
        "dpo": {"steps": 2, "batch_size": 8},
    }
    config["redteam"] = {
        "shares": [0.0, 0.25], "methods": ["base", "iti-weak", "dpo"],
        "attack": {"pairs": 1, "prompt_tokens": 8, "target_tokens": 2, "continuation_tokens": 2, "scorer": "profanity-check",
                   "gcg": {"steps": 2, "suffix_length": 3, "top_k": 8, "candidates": 8}},
    }
    (root / "sweep.yaml").write_text(yaml.safe_dump(config))
    config, report, log = run_sweep(root, monkeypatch, crafted_data_dir)
    clean, toxic = plan_runs(config)
    assert [m.name for m in methods_for(config, toxic)] == ["base", "iti-weak", "sft", "dpo"]
    assert [m.name for m in methods_for(config, clean)] == ["base", "iti-weak"]  # not post-trained
    out = root / "out" / "runs"
    data = json.loads((out / toxic.name / "posttrain" / "data" / "summary.json").read_text())
    assert data["counts"]["all"]["prompts"] == 4 and data["counts"]["all"]["samples"] == 16
    for objective in ("sft", "dpo"):
        run_dir = out / toxic.name / "posttrain" / objective
        start = json.loads((run_dir / "init_from.json").read_text())
        assert start["resolved"] == str((out / toxic.name / "train").resolve())
        result = json.loads((out / toxic.name / "eval" / f"{objective}.json").read_text())
        assert result["kl"] > 0 and np.isfinite(result["ce"])  # measured against the pretrained model
    for run in (clean, toxic):
        for method in ("base", "iti-weak"):
            summary = json.loads((out / run.name / "redteam" / method / "summary.json").read_text())
            assert summary["n"] == 1
    assert (out / toxic.name / "redteam" / "dpo" / "summary.json").exists()
    assert not (out / clean.name / "redteam" / "dpo").exists()  # the clean model was not post-trained
    text = report.read_text()
    assert "| 25% toxic + SFT (least toxic own samples) |" in text and "## Post-training data and runs" in text
    assert "## Table 3 analogue: GCG attack success" in text and "| 25% toxic | dpo | 1 |" in text
    assert "DPO lowers the toxicity of the 25%-toxic model (RTP)" in text

    def outputs():
        files = (p for p in out.rglob("*") if p.is_file())
        return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in files
                if p.relative_to(out).parts[1] in ("posttrain", "redteam", "eval")}

    before = outputs()
    _, _, log = run_sweep(root, monkeypatch, crafted_data_dir)  # all done: nothing is redone
    assert outputs() == before
    assert not [line for line in log if line.startswith(("[posttrain", "[redteam", "[eval"))]
    # a changed DPO setting redoes DPO, its evaluation and its attacks only (not the data or SFT)
    run_sweep(root, monkeypatch, crafted_data_dir, "posttrain.dpo.dpo.beta=0.5")
    after = outputs()
    changed = {"/".join(k.split("/")[1:3]).split(".")[0] for k in before if after.get(k) != before[k]}
    assert changed == {"posttrain/dpo", "redteam/dpo", "eval/dpo"}


def test_sweep_study_design_dose_response_transfer_sanity_and_seed_level_claims(tiny_sweep, crafted_data_dir, monkeypatch):
    """Issue 16's study design at toy scale: two seeds per share, 2-fold head ranking, probes tested
    across labelled sets, a dose-response spec (one build, a method per scale), a second scorer,
    the scorer-free likelihood measure and the scorer sanity suite; claims with seeds as the unit."""
    from jaxlm.evaluate import toxicity

    class WordCountScorer(toxicity.ToxicityScorer):
        """A second scorer for the test: the share of a text's words among a few insults."""

        name = "insults"

        def score_batch(self, texts):
            return np.array([np.mean([w in {"stupid", "idiot", "trash", "hate", "scum", "fool"} for w in t.split()] or [0.0])
                             for t in texts])

    monkeypatch.setitem(toxicity.BACKENDS, "insults", WordCountScorer)
    root = tiny_sweep / "study"
    root.mkdir()
    config = yaml.safe_load((tiny_sweep / "sweep.yaml").read_text())
    config.update(seeds=[0, 1], tagged=[], prompting=False, iti={"k": 2, "alphas": {"x1": 1.0, "x4": 4.0}},
                  probe={**config["probe"], "folds": 2, "transfer": ["davidson", "rtp"]},
                  scorer_sanity={"texts": 3})
    config["methods"] = [{"name": "neg", "method": "iti", "settings": {"k": 2, "wanted_label": 1}, "scales": [1.0, 4.0]}]
    config["eval"] = {**config["eval"], "extra_scorers": ["insults"], "continuations": 2}
    (root / "sweep.yaml").write_text(yaml.safe_dump(config))
    config, report, log = run_sweep(root, monkeypatch, crafted_data_dir)
    runs = plan_runs(config)
    assert [r.name for r in runs] == ["clean-seed0", "added-tox25-seed0", "clean-seed1", "added-tox25-seed1"]
    run = root / "out" / "runs" / "clean-seed0"
    assert [m.name for m in methods_for(config, runs[0])] == ["base", "iti-x1", "iti-x4", "neg_x1", "neg_x4"]
    assert sorted(p.name for p in (run / "interventions").glob("*.safetensors")) == ["neg.safetensors"]  # built once
    neg1, neg4 = (json.loads((run / "eval" / f"neg_x{s}.json").read_text()) for s in (1, 4))
    assert (neg1["scale"], neg4["scale"]) == (1.0, 4.0) and neg4["kl"] > neg1["kl"] > 0
    base = json.loads((run / "eval" / "base.json").read_text())
    n_prompts = len(base["rtp_prompt_max"])
    assert len(base["rtp_prompt_max_by"]["insults"]) == n_prompts and max(base["rtp_prompt_max_by"]["insults"]) <= 1
    likelihood = base["rtp_continuations"]
    assert len(likelihood["logprob"]) == len(likelihood["label"]) == 4 and set(likelihood["label"]) == {0, 1}
    assert likelihood["gap"] == pytest.approx(np.mean([lp for lp, y in zip(likelihood["logprob"], likelihood["label"]) if y])
                                              - np.mean([lp for lp, y in zip(likelihood["logprob"], likelihood["label"]) if not y]))
    transfer = json.loads((run / "probe" / "transfer.json").read_text())
    assert transfer["sets"] == ["toxigen", "davidson", "rtp"] and np.shape(transfer["top_accuracy"]) == (3, 3)
    probes = json.loads((run / "probe" / "probe_report.json").read_text())
    assert probes["settings"]["folds"] == 2 and np.shape(probes["accuracy_std"]) == np.shape(probes["accuracy"])
    sanity = json.loads((root / "out" / "scorers" / "sanity.json").read_text())
    assert set(sanity["scorers"]) == {"profanity-check", "insults"}

    text = report.read_text()
    for section in ("## Dose-response", "## Probe generalisation across labelled sets", "## Head choice",
                    "## Scorer validity", "## Power", "| ITI (top 2 heads) | 4 |", "| neg (iti) | 1 |"):
        assert section in text
    assert "(2 vs 2 seeds x" in text and "(2 seeds x" in text  # between models: seeds resampled; within: paired
    summary = json.loads((root / "out" / "report.json").read_text())
    assert {r["measure"] for r in summary["matched_kl"]["primary"]} <= {"primary"}

    before = eval_files(root)
    _, _, log = run_sweep(root, monkeypatch, crafted_data_dir)  # finished: nothing redone
    assert eval_files(root) == before and not [line for line in log if line.startswith(("[probe", "[iti", "[eval", "[scorers"))]
    # another scale adds one evaluation per model; the build and the other scales stay
    specs = [dict(config["methods"][0]) for config in [yaml.safe_load((root / "sweep.yaml").read_text())]]
    specs[0]["scales"] = [1.0, 4.0, 8.0]
    run_sweep(root, monkeypatch, crafted_data_dir, "methods=" + yaml.safe_dump(specs, default_flow_style=True).strip())
    after = eval_files(root)
    assert {k for k in after if k not in before} == {f"out/runs/{r.name}/eval/neg_x8.json" for r in runs}
    assert all(after[k] == before[k] for k in before)


def test_dose_response_specs_and_stage_selection_errors():
    from jaxlm.sweep.config import InterventionSpec

    with pytest.raises(ConfigError, match=r"methods\[a\]: expected exactly one of strength"):
        InterventionSpec(name="a", method="caa")
    with pytest.raises(ConfigError, match=r"methods\[a\]: expected exactly one of strength"):
        InterventionSpec(name="a", method="caa", strength=Strength(scale=1.0), scales=(2.0,))
    with pytest.raises(ConfigError, match=r"methods\[a\]\.scales: expected distinct finite non-zero"):
        InterventionSpec(name="a", method="caa", scales=(1.0, 1.0))
    spec = InterventionSpec(name="a", method="caa", scales=(-2.0, 0.5))
    assert {k: v.scale for k, v in spec.strengths.items()} == {"a_x-2": -2.0, "a_x0.5": 0.5}
    with pytest.raises(ConfigError, match=r"posttrain\.seeds: expected a subset of the sweep's seeds \[0\]"):
        sweep_config(posttrain={"seeds": [3]})
    with pytest.raises(ConfigError, match=r"tagged\[meda\]\.seeds: expected a subset"):
        sweep_config(tagged=[{"kind": "meda", "seeds": [1]}])
    with pytest.raises(ConfigError, match=r"probe\.transfer: expected labelled sets other than probe\.data"):
        sweep_config(probe={"data": "toxigen", "transfer": ["toxigen"]})
    with pytest.raises(ConfigError, match=r"eval\.extra_scorers\[0\]: unknown toxicity scorer 'nope'"):
        sweep_config(eval={"extra_scorers": ["nope"]})
    config = sweep_config(shares=[0.0, 0.1], seeds=[0, 1], tagged=[{"kind": "meda", "seeds": [1]}], posttrain={"seeds": [1]})
    runs = plan_runs(config)
    assert [r.name for r in runs if r.tagged] == ["meda-tox10-seed1"]
    assert [r.name for r in runs if posttrained(config, r)] == ["clean-seed1", "added-tox10-seed1"]


def test_report_names_the_post_training_scorer_without_the_prepared_dataset():
    from jaxlm.sweep.report import posttrain_scorer

    # the on-policy settings need a dataset for /pol/ openings; the report has none to give
    config = sweep_config(shares=[0.0, 0.1], posttrain={"data": {"pol_prompts": 200, "scorer": "profanity-check"}})
    assert posttrain_scorer(config) == "profanity-check"


def test_sweep_cli_help_names_every_stage(capsys):
    from jaxlm.cli import main
    from jaxlm.sweep import STAGES

    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps the help text
    assert ",".join(STAGES) in text
