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
