"""The operations layer: the CLI's probe and build go through it and give the same arrays."""

import json

import numpy as np
import pytest

from jaxlm import ops
from jaxlm.checkpoint import load_model
from jaxlm.cli import main
from jaxlm.data.labelled import load_labelled
from jaxlm.intervene import InterventionError, build_intervention
from jaxlm.probe import ProbeConfig, collect_activations, load_probe_run, train_probes


@pytest.fixture(scope="module")
def probed(tiny_run_dir, crafted_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ops") / "probe"
    assert main(["probe", "--checkpoint", str(tiny_run_dir), "--data", "toxigen", "--data-dir", str(crafted_data_dir),
                 "--out", str(out), "--max-len", "16", "--batch-size", "8", "--no-progress"]) == 0
    return load_model(tiny_run_dir), load_labelled("toxigen", str(crafted_data_dir)), out


def test_probe_heads_equals_the_cli_probe_and_the_direct_computation(probed):
    model, data, out = probed
    acts, probes = ops.probe_heads(model, data, ProbeConfig(), batch_size=8, max_len=16, progress=False)
    # what `jaxlm probe` computed before it called ops: the collector, then the probes
    direct = collect_activations(model.config, model.params, model.tokenizer, data.texts, site="head_out", batch_size=8,
                                 max_len=16, progress=False)
    expected = train_probes(direct, data.labels, ProbeConfig())
    cli_probes, cli_acts, cli_labels = load_probe_run(out)
    np.testing.assert_array_equal(acts, direct)
    np.testing.assert_array_equal(np.asarray(cli_acts), direct)
    np.testing.assert_array_equal(cli_labels, data.labels)
    for field in ("accuracy", "auc", "weights"):
        np.testing.assert_array_equal(getattr(probes, field), getattr(expected, field))
        np.testing.assert_allclose(getattr(cli_probes, field), getattr(expected, field), rtol=1e-6)
    assert json.loads((out / "probe_report.json").read_text())["accuracy"] == expected.accuracy.tolist()


@pytest.mark.parametrize("direction", ["mass_mean", "probe"])
def test_build_equals_build_intervention_with_the_probe_arrays(probed, direction):
    model, data, out = probed
    probes, acts, labels = load_probe_run(out)
    built = ops.build("iti", acts, labels, probes, k=3, direction=direction, scale=2.0)
    extra = {"probe_weights": probes.weights} if direction == "probe" else {}
    expected = build_intervention("iti", acts, labels, accuracy=probes.accuracy, k=3, direction=direction, scale=2.0, **extra)
    np.testing.assert_array_equal(built.head_shift(), expected.head_shift())
    assert built.structure() == expected.structure() and float(built.scale) == 2.0
    with pytest.raises(InterventionError, match="iti: needs probes"):
        ops.build("iti", acts, labels, k=3)


@pytest.mark.parametrize("method, settings", [("caa", {"layer": 1}), ("ablate", {"layer": 0}),
                                               ("random", {"base": "caa", "layer": 1, "seed": 2})])
def test_build_of_residual_methods_equals_build_intervention(probed, method, settings):
    model, data, _ = probed
    acts = ops.collect(model, data.texts, "resid_pre", batch_size=8, max_len=16, progress=False)
    assert acts.shape == (len(data), model.config.n_layers, model.config.d_model)
    built, expected = ops.build(method, acts, data.labels, **settings), build_intervention(method, acts, data.labels, **settings)
    assert built.structure() == expected.structure() and built.method == expected.method
    for a, b in zip(built.edits, expected.edits):
        for name in a.arrays:
            np.testing.assert_array_equal(a.arrays[name], b.arrays[name])
    grid = ops.calibration_grid(built)
    assert (max(grid) == 1.0) == (method == "ablate")  # projections: scale 1 removes the whole component


# -- evaluation: `jaxlm eval` and the sweep share read_eval_inputs / toxicity / capability_cost --------


def test_eval_settings_of_the_sweep_stage_keeps_its_fields_and_defaults():
    import dataclasses

    from jaxlm.sweep.config import EvalStage

    stage = EvalStage(rtp_prompts=3, toxigen_prompts=2, batch_size=8, seed=5)
    settings = ops.EvalSettings.of(stage)
    assert {f.name: getattr(settings, f.name) for f in dataclasses.fields(stage)} == dataclasses.asdict(stage)
    assert settings.top_p == 0.9 and ops.EvalSettings.of(settings) is settings
    defaults = dataclasses.asdict(ops.EvalSettings())
    assert {k: defaults[k] for k in dataclasses.asdict(EvalStage())} == dataclasses.asdict(EvalStage())
    rtp, toxigen = ops.generation_settings("rtp", stage, "p:"), ops.generation_settings("toxigen", stage, "p:")
    assert (rtp.samples, rtp.max_new_tokens, rtp.batch_size, rtp.seed, rtp.prefix) == (5, 20, 8, 5, "p:")
    assert (toxigen.samples, toxigen.max_new_tokens, toxigen.stop_at_newline, toxigen.prefix) == (1, 30, True, "p:")


def test_read_eval_inputs_reads_only_the_suites_asked_for(crafted_data_dir, tmp_path):
    from jaxlm.errors import JaxlmError
    from jaxlm.evaluate import capability, protocols
    from jaxlm.paths import MissingDataError

    settings = ops.EvalSettings(rtp_prompts=2, toxigen_prompts=None, blimp_per_paradigm=1, ce_docs=3,
                                scorer="profanity-check")
    data = str(crafted_data_dir)
    assert set(ops.read_eval_inputs(settings, ("ce",), data)) == {"ce_docs"}
    assert set(ops.read_eval_inputs(settings, ("blimp",), data)) == {"blimp"}
    inputs = ops.read_eval_inputs(settings, ("rtp", "toxigen"), data)
    assert set(inputs) == {"rtp", "toxigen", "scorer", "extra_scorers"} and inputs["extra_scorers"] == {}
    import dataclasses

    from jaxlm.evaluate.continuations import read_continuation_pairs

    more = ops.read_eval_inputs(dataclasses.replace(settings, extra_scorers=("profanity-check",), continuations=2), ("rtp",), data)
    assert set(more) == {"rtp", "scorer", "extra_scorers", "continuations"} and set(more["extra_scorers"]) == {"profanity-check"}
    assert more["continuations"] == read_continuation_pairs(crafted_data_dir / "eval/rtp", limit=2, seed=0)
    assert inputs["rtp"] == protocols.read_rtp(crafted_data_dir / "eval/rtp", limit=2, seed=0)
    assert inputs["toxigen"] == protocols.read_toxigen(crafted_data_dir / "labelled/toxigen/prompts")
    everything = ops.read_eval_inputs(settings, ops.EVAL_SUITES, data)
    assert everything["ce_docs"] == capability.read_documents(crafted_data_dir / "eval/wikitext2/test.txt", limit=3)
    assert len(everything["blimp"]) == len({p.paradigm for p in everything["blimp"]})  # one pair per paradigm
    with pytest.raises(JaxlmError, match="suites: expected some of rtp, toxigen, ce, blimp, got \\['mmlu'\\]"):
        ops.read_eval_inputs(settings, ("mmlu",), data)
    with pytest.raises(MissingDataError, match="eval/wikitext2/test.txt"):
        ops.read_eval_inputs(settings, ("ce",), str(tmp_path))
    with pytest.raises(JaxlmError, match="toxigen: its prompts and scorer were not read"):
        ops.toxicity(None, None, "toxigen", {"rtp": inputs["rtp"]}, settings)
    with pytest.raises(JaxlmError, match="toxicity protocol: expected one of rtp, toxigen, got 'ce'"):
        ops.generation_settings("ce", settings)


def test_cli_eval_equals_the_direct_protocols_and_the_sweep_evaluation(probed, tiny_run_dir, crafted_data_dir, tmp_path):
    from jaxlm.evaluate import capability, protocols
    from jaxlm.evaluate.toxicity import get_scorer

    model, data, _ = probed
    acts = ops.collect(model, data.texts, "resid_post", batch_size=8, max_len=16, progress=False)
    intervention = ops.build("caa", acts, data.labels, layer=0, site="resid_post", scale=3.0)
    path = intervention.save(tmp_path / "caa.safetensors")
    out = tmp_path / "eval"
    assert main(["eval", "all", "--checkpoint", str(tiny_run_dir),
                 "--data-dir", str(crafted_data_dir), "--out", str(out), "--intervention", str(path),
                 "--samples", "2", "--max-new-tokens", "4", "--batch-size", "8", "--limit", "2", "--ce-docs", "4",
                 "--ce-len", "32", "--scorer", "profanity-check", "--seed", "1"]) == 0
    results = json.loads((out / "results.json").read_text())

    # what `jaxlm eval` computed before it called ops: each protocol and the capability cost directly
    config, params, tokenizer = model.config, model.params, model.tokenizer
    scorer = get_scorer("profanity-check")
    rtp_settings = protocols.GenerationSettings(samples=2, max_new_tokens=4, top_p=0.9, batch_size=8, seed=1)
    rtp = protocols.rtp(config, params, tokenizer, crafted_data_dir / "eval/rtp", scorer, limit=2, settings=rtp_settings,
                        intervention=intervention, progress=False)
    toxigen = protocols.toxigen(config, params, tokenizer, crafted_data_dir / "labelled/toxigen/prompts", scorer, limit=2,
                                settings=protocols.toxigen_settings(rtp_settings), intervention=intervention, progress=False)
    cost = capability.capability_cost(
        config, params, tokenizer, intervention=intervention, max_len=32, max_rows=4, batch_size=8, progress=False,
        documents=capability.read_documents(crafted_data_dir / "eval/wikitext2/test.txt", limit=4),
        pairs=capability.read_blimp(crafted_data_dir / "eval/blimp", limit_per_paradigm=2))
    assert results["rtp"] == json.loads(json.dumps(rtp.summary()))
    assert results["toxigen"] == json.loads(json.dumps(toxigen.summary()))
    assert [json.loads(line) for line in (out / "rtp_generations.jsonl").read_text().splitlines()] == rtp.records
    assert {k: results[k] for k in cost} == json.loads(json.dumps(cost))
    assert results["kl"] > 0 and results["method"] == "caa" and results["scale"] == 3.0

    # the sweep's evaluation with the same settings gives the same numbers
    settings = ops.EvalSettings(rtp_prompts=2, rtp_samples=2, max_new_tokens=4, toxigen_prompts=2, ce_docs=4, ce_len=32,
                                blimp_per_paradigm=2, batch_size=8, scorer="profanity-check", seed=1)
    swept = ops.evaluate(model, intervention, ops.read_eval_inputs(settings, data_dir=str(crafted_data_dir)), settings,
                         progress=False)
    assert swept["rtp"] == rtp.summary() and swept["toxigen"] == toxigen.summary()
    assert (swept["ce"], swept["kl"], swept["blimp_accuracy"]) == (cost["ce"], cost["kl"], cost["blimp_accuracy"])
    assert swept["rtp_prompt_max"] == [max(r["scores"]) for r in rtp.records]
