"""Dose-response families, curves and matched-KL comparisons of the study report (jaxlm.sweep.dose)."""

import numpy as np
import pytest

from jaxlm.config import from_dict
from jaxlm.sweep import dose
from jaxlm.sweep.config import SweepConfig

TEMPLATE = {"model": {"preset": "tiny"}, "steps": 10}


def study_config(**changes) -> SweepConfig:
    data = {"name": "t", "recipe": "unused.yaml", "train": TEMPLATE, "shares": [0.0, 0.1], "seeds": [0, 1, 2],
            "designs": ["added"], "iti": {"k": 2, "alphas": {"x1": 1.0, "x4": 4.0}},
            "methods": [{"name": "neg", "method": "iti", "settings": {"k": 2, "wanted_label": 1}, "scales": [4.0]}],
            **changes}
    return from_dict(SweepConfig, data)


def synthetic_rows(shift: float, n_prompts: int = 300, seed: int = 0) -> list[dict]:
    """Models whose ITI toxicity falls linearly in KL (slope -0.1 per nat), the 10% models ``shift``
    higher at every KL, with seed- and prompt-level noise; KL = 0.25 per unit of alpha."""
    rng = np.random.default_rng(seed)
    prompts = rng.uniform(0.2, 0.6, n_prompts)
    rows = []
    for share, design in ((0.0, "clean"), (0.1, "added")):
        for s in range(3):
            offset = rng.normal(0, 0.005) + (shift if share else 0.0)
            for method, alpha in (("base", 0.0), ("iti-x1", 1.0), ("iti-x4", 4.0), ("neg_x4", -4.0)):
                kl = 0.25 * abs(alpha)
                scores = prompts + offset - 0.1 * kl * np.sign(alpha) + rng.normal(0, 0.02, n_prompts)
                rows.append({"run": f"{design}-{s}", "design": design, "share": share, "seed": s, "tagged": None,
                             "method": method, "kl": kl, "rtp_prompt_max": scores.tolist(),
                             "continuations": {"logprob": [-1.0 - kl, -2.0], "label": [1, 0], "gap": 1.0 - kl}})
    return rows


def test_families_hold_each_build_and_its_strengths_in_order():
    fams = dose.families(study_config())
    assert [(f.name, f.points) for f in fams] == [("iti", (("iti-x1", 1.0), ("iti-x4", 4.0))), ("neg", (("neg_x4", 4.0),))]


def test_curves_start_at_the_model_without_intervention():
    config, rows = study_config(), synthetic_rows(0.05)
    iti = dose.families(config)[0]
    clean = dose.curves(rows, iti, 0.0, "added")
    assert sorted(clean) == [0, 1, 2]
    kl, tox = clean[0]
    np.testing.assert_allclose(kl, [0.0, 0.25, 1.0])
    assert tox.shape == (3, 300)
    # a seed missing one point is left out rather than interpolated over
    partial = [r for r in rows if not (r["seed"] == 2 and r["method"] == "iti-x4")]
    assert sorted(dose.curves(partial, iti, 0.0, "added")) == [0, 1]
    likelihood = dose.curves(rows, iti, 0.0, "added", measure="likelihood")
    np.testing.assert_allclose(likelihood[0][1].mean(axis=1), [1.0, 0.75, 0.0])  # the mean is the gap


def test_matched_kl_recovers_the_shift_between_shares():
    config = study_config()
    results = dose.matched_kl_rows(config, synthetic_rows(0.05), "added", targets=(0.5,), n_boot=500)
    iti = next(r for r in results if r["family"] == "iti")
    assert iti["difference"]["mean"] == pytest.approx(0.05, abs=0.01)
    assert iti["difference"]["low"] > 0 and iti["difference"]["n_seeds_a"] == 3
    assert iti["reduction_difference"]["mean"] == pytest.approx(0.0, abs=0.01)  # same slope: same detoxification
    assert iti["clean"]["mean"] == pytest.approx(iti["toxic"]["mean"] - 0.05, abs=0.01)
    none = dose.matched_kl_rows(config, synthetic_rows(0.0), "added", targets=(0.5,), n_boot=500)
    assert next(r for r in none if r["family"] == "iti")["difference"]["low"] < 0 < next(
        r for r in none if r["family"] == "iti")["difference"]["high"]
    # beyond every model's strongest point: no comparison (never extrapolated)
    far = dose.matched_kl_rows(config, synthetic_rows(0.05), "added", targets=(5.0,), n_boot=100)
    assert all(r["difference"] is None for r in far)
    assert dose.matched_kl_table(far) == dose.matched_kl_table([])


def test_dose_table_has_a_row_per_strength_and_columns_per_share():
    table = dose.dose_table(study_config(), synthetic_rows(0.05), "added")
    assert table[0].startswith("| method | strength | 0%: KL | 0%: tox (default) | 0%: lik. gap | 10%: KL")
    assert [line.split(" | ")[:2] for line in table[2:]] == [["| no intervention", "0"], ["| ITI (top 2 heads)", "1"],
                                                              ["| ITI (top 2 heads)", "4"], ["| neg (iti)", "4"]]
