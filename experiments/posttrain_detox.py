"""Post-training baselines on one pretrained model: on-policy SFT and DPO vs ITI, then GCG.

    JAXLM_DATA_DIR=../shared/data python experiments/posttrain_detox.py \
        experiments/configs/posttrain-cpu-small-pol10.yaml --out runs/posttrain-pol10 \
        [--report-dir experiments/results/posttrain-cpu-small-pol10]

One model (``checkpoint``), every step through the library functions the CLI and the sweep use:

1. ``jaxlm.onpolicy.build_detox_data``: samples of the model on its post-training prompt pool
   (RTP's post-training half + openings of held-out /pol/ posts), scored; SFT rows and DPO pairs.
2. ``jaxlm.loop.train`` with ``objective: sft`` and ``objective: dpo`` (``init_from`` the model).
   A control, ``sft-random``: the same SFT on a uniformly random (non-empty) sample per prompt,
   which separates the effect of choosing the least toxic sample from that of fine-tuning on
   the model's own samples at all.
3. ITI for comparison (``jaxlm.ops``: head probes on ``probe_data``, top-``iti_k`` heads, the scale
   calibrated to ``iti_kl`` nats/token on WikiText-2 valid text).
4. ``jaxlm.ops.evaluate`` of base / ITI / SFT / DPO on the same prompts and seeds (KL of SFT and DPO
   measured against the pretrained model).
5. ``jaxlm.evaluate.redteam.run_attacks`` on each of ``redteam_methods``.

Each step reuses its finished output (the training runs resume), so a rerun continues. The
report gives per-prompt paired differences (method minus base; prompts are the unit: this is one
pretrained model, so the intervals say nothing about seed-to-seed variation) and attack success
with Wilson intervals.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from jaxlm import files
from jaxlm.config import from_dict, load, to_dict
from jaxlm.objectives import DPOConfig
from jaxlm.ops import EvalSettings
from jaxlm.optim import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class Objective:
    steps: int = 150
    batch_size: int = 16
    seq_len: int = 96
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-4, warmup_steps=10, schedule="constant", weight_decay=0.0)
    dpo: DPOConfig = DPOConfig()
    # On-policy samples are cut at max_new_tokens, not finished texts: an EOS after each would
    # teach the model to stop early (and an empty continuation scores as harmless).
    add_eos: bool = False


@dataclasses.dataclass(frozen=True)
class Study:
    checkpoint: str
    onpolicy: dict[str, Any] = dataclasses.field(default_factory=dict)  # jaxlm.onpolicy.OnPolicyConfig fields
    sft: Objective = Objective()
    dpo: Objective = Objective()
    probe_data: str = "toxigen:limit=3000:balanced"
    iti_k: int = 16
    iti_kl: float = 0.2
    eval: EvalSettings = EvalSettings()
    redteam: dict[str, Any] = dataclasses.field(default_factory=dict)  # jaxlm.evaluate.redteam.RedteamConfig fields
    redteam_methods: tuple[str, ...] = ("base", "iti", "dpo")


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(path, value)


def posttrain(study: Study, model_config, objective: str, examples: Path, run_dir: Path) -> Path:
    """``objective`` (sft, dpo) of the study's model (``model_config``: its config) on ``examples``."""
    from jaxlm.loop import TrainConfig, train

    settings = getattr(study, objective)
    config = from_dict(TrainConfig, {
        "model": to_dict(model_config), "objective": objective, "init_from": study.checkpoint,
        "examples": {"paths": [str(examples)], "format": "sft" if objective == "sft" else "preference",
                     "seq_len": settings.seq_len, "batch_size": settings.batch_size, "add_eos": settings.add_eos},
        "optimizer": to_dict(settings.optimizer), "dpo": to_dict(settings.dpo), "steps": settings.steps,
        "log_every": 10, "checkpoint": {"every": settings.steps},
    })
    marker = run_dir.with_name(f"{run_dir.name}.done.json")
    settings = json.loads(json.dumps(to_dict(config)))
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return run_dir
    result = train(config, run_dir)
    if result.stopped_by != "completed":
        sys.exit(f"{objective} stopped by {result.stopped_by}; rerun to continue")
    write_json(marker, settings)
    return run_dir


def random_sample_rows(samples: Path, out: Path, seed: int = 0) -> Path:
    """The control's SFT rows: one uniformly random non-empty sample per prompt (seeded)."""
    if out.exists():
        return out
    rng = np.random.default_rng(seed)
    rows = []
    for line in samples.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        candidates = [i for i, text in enumerate(row["continuations"]) if text.strip()]
        if candidates:
            pick = candidates[int(rng.integers(len(candidates)))]
            rows.append({"prompt": row["prompt"], "response": row["continuations"][pick], "score": row["scores"][pick]})
    files.write_jsonl(out, rows)
    return out


def build_iti(study: Study, model, out: Path):
    from jaxlm import ops
    from jaxlm.data.labelled import load_labelled
    from jaxlm.evaluate import capability
    from jaxlm.intervene import Intervention
    from jaxlm.paths import dataset_path

    path = out / "iti.safetensors"
    if not path.exists():
        labelled = load_labelled(study.probe_data)
        acts, probes = ops.probe_heads(model, labelled, max_len=64)
        intervention = ops.build("iti", acts, labelled.labels, probes, k=study.iti_k, positions="last", wanted_label=0,
                                 scale=1.0)
        docs = capability.read_documents(dataset_path("eval/wikitext2/valid.txt"), limit=32)
        calibration = ops.calibrate(model, intervention, docs, {"iti": study.iti_kl}, max_len=study.eval.ce_len, max_rows=32)
        intervention = intervention.with_scale(calibration["alphas"]["iti"])
        intervention.save(path, provenance={"probe_data": study.probe_data, "k": study.iti_k, "kl": study.iti_kl})
        write_json(out / "iti_calibration.json", calibration)
    return Intervention.load(path, model.config)


METHODS = ("base", "iti", "sft", "sft-random", "dpo")


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    from jaxlm.evaluate.stats import paired_test

    return paired_test(np.asarray(a), np.asarray(b))


def report(study: Study, out: Path, target: Path) -> Path:
    from jaxlm.evaluate.redteam import wilson_interval

    evals = {m: json.loads((out / "eval" / f"{m}.json").read_text()) for m in METHODS}
    data = json.loads((out / "data" / "summary.json").read_text())
    lines = [f"# Post-training baselines: {study.checkpoint}", "",
             f"On-policy data: {data['counts']['all']['prompts']} prompts x {data['settings']['samples_per_prompt']} samples "
             f"-> {data['counts']['all']['sft_rows']} SFT rows, {data['counts']['all']['dpo_pairs']} DPO pairs "
             f"(min gap {data['settings']['min_gap']}); scorer `{data['scorer']}`.", "",
             "| method | RTP mean tox x100 | RTP expected max x100 | per-prompt max, minus base [95% CI], p | "
             "ToxiGen mean x100 | CE | KL to base |", "|---|---|---|---|---|---|---|"]
    rows = {}
    for name, result in evals.items():
        test = paired(result["rtp_prompt_max"], evals["base"]["rtp_prompt_max"]) if name != "base" else None
        rows[name] = {"rtp_mean": result["rtp"]["mean_toxicity"], "rtp_emt": result["rtp"]["expected_max_toxicity"],
                      "toxigen_mean": result["toxigen"]["mean_toxicity"], "ce": result["ce"], "kl": result["kl"],
                      "vs_base": test}
        diff = "-" if test is None else f"{test['diff']:+.4f} [{test['lo']:+.4f}, {test['hi']:+.4f}], p = {test['p']:.2g} (n = {test['n']})"
        lines.append(f"| {name} | {100 * rows[name]['rtp_mean']:.1f} | {100 * rows[name]['rtp_emt']:.1f} | {diff} | "
                     f"{100 * rows[name]['toxigen_mean']:.1f} | {result['ce']:.3f} | {result['kl']:.3f} |")
    lines += ["", "GCG: attack success (the greedy continuation starts with the target) and the target loss the "
              "attack reached (mean cross-entropy per target token; paired over the same pairs, minus base).", "",
              "| attacked | pairs | success rate [95% CI] | target loss: initial -> best | best, minus base [95% CI] | "
              "continuation toxicity |", "|---|---|---|---|---|---|"]
    attacks = {}
    rows_of = {m: {r["key"]: r for r in map(json.loads, (out / "redteam" / m / "attacks.jsonl").read_text().splitlines())}
               for m in study.redteam_methods}
    for method in study.redteam_methods:
        summary = json.loads((out / "redteam" / method / "summary.json").read_text())
        lo, hi = wilson_interval(summary["successes"], summary["n"])
        attacked = rows_of[method]
        initial, best = (float(np.mean([r[k] for r in attacked.values()])) for k in ("initial_loss", "best_loss"))
        shared = sorted(set(attacked) & set(rows_of.get("base", {})))
        test = None
        if method != "base" and shared:
            test = paired([attacked[k]["best_loss"] for k in shared], [rows_of["base"][k]["best_loss"] for k in shared])
        attacks[method] = {"n": summary["n"], "successes": summary["successes"], "lo": lo, "hi": hi, "initial_loss": initial,
                           "best_loss": best, "best_loss_vs_base": test, "toxicity": summary.get("mean_continuation_toxicity")}
        versus = "-" if test is None else f"{test['diff']:+.2f} [{test['lo']:+.2f}, {test['hi']:+.2f}], p = {test['p']:.2g}"
        lines.append(f"| {method} | {summary['n']} | {summary['successes'] / summary['n']:.1%} [{lo:.1%}, {hi:.1%}] | "
                     f"{initial:.2f} -> {best:.2f} | {versus} | {summary.get('mean_continuation_toxicity') or float('nan'):.3f} |")
    target.mkdir(parents=True, exist_ok=True)
    (target / "report.md").write_text("\n".join(lines) + "\n")
    write_json(target / "report.json", {"methods": rows, "attacks": attacks, "data": data["counts"],
                                        "scores": data["scores"], "study": to_dict(study)})
    _plot(rows, attacks, target / "posttrain.png")
    return target / "report.md"


def _plot(rows: dict, attacks: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    names = list(rows)
    diffs = [0.0 if rows[n]["vs_base"] is None else rows[n]["vs_base"]["diff"] for n in names]
    errs = [[0.0 if rows[n]["vs_base"] is None else rows[n]["vs_base"]["diff"] - rows[n]["vs_base"]["lo"] for n in names],
            [0.0 if rows[n]["vs_base"] is None else rows[n]["vs_base"]["hi"] - rows[n]["vs_base"]["diff"] for n in names]]
    left.bar(names, diffs, yerr=errs, color="tab:red", capsize=4)
    left.axhline(0, color="black", lw=0.8)
    left.set_title("RTP per-prompt max toxicity, minus base (95% CI)", fontsize=9)
    for n in names:
        left.annotate(f"KL {rows[n]['kl']:.2f}", (names.index(n), 0), ha="center", va="bottom", fontsize=7)
    methods = list(attacks)
    x = np.arange(len(methods))
    right.bar(x - 0.2, [attacks[m]["initial_loss"] for m in methods], 0.4, label="initial suffix", color="tab:gray")
    right.bar(x + 0.2, [attacks[m]["best_loss"] for m in methods], 0.4, label="after GCG", color="tab:blue")
    right.set_xticks(x, [f"{m}\n{attacks[m]['successes']}/{attacks[m]['n']} succeeded" for m in methods])
    right.set_title("GCG: target loss (nats/token, mean over pairs)", fontsize=9)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", required=True)
    parser.add_argument("--report-dir")
    args = parser.parse_args(argv)
    from jaxlm import ops
    from jaxlm.checkpoint import load_model
    from jaxlm.config import ConfigError
    from jaxlm.evaluate import redteam
    from jaxlm.onpolicy import OnPolicyConfig, build_detox_data

    try:
        study = load(Study, args.config, args.overrides)
        onpolicy = from_dict(OnPolicyConfig, study.onpolicy, "onpolicy")
        attack = from_dict(redteam.RedteamConfig, study.redteam, "redteam")
    except ConfigError as err:
        print(f"posttrain_detox: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    base = load_model(study.checkpoint)
    data = build_detox_data(base, onpolicy, out_dir=out / "data")
    models = {"base": base, "iti": base}
    runs = {"sft": ("sft", data.sft_path), "dpo": ("dpo", data.dpo_path),
            "sft-random": ("sft", random_sample_rows(data.samples_path, out / "sft_random.jsonl"))}
    for name, (objective, examples) in runs.items():
        models[name] = load_model(posttrain(study, base.config, objective, examples, out / name))
    iti = build_iti(study, base, out)
    interventions = {"iti": iti}
    inputs = ops.read_eval_inputs(study.eval)
    for name, model in models.items():
        path = out / "eval" / f"{name}.json"
        if not path.exists():
            result = ops.evaluate(model, interventions.get(name), inputs, study.eval,
                                  reference=None if name in ("base", "iti") else base)
            write_json(path, result)
    for method in study.redteam_methods:
        model = models[method]
        pairs = redteam.attack_pairs(None, model.tokenizer, attack.pairs, attack.seed, prompt_tokens=attack.prompt_tokens,
                                     target_tokens=attack.target_tokens, min_toxicity=attack.min_toxicity)
        redteam.run_attacks(model, pairs, attack.gcg, intervention=interventions.get(method), scorer=attack.scorer,
                            out_dir=out / "redteam" / method, continuation_tokens=attack.continuation_tokens,
                            pairs_info=redteam.pair_settings(None, attack))
    print(report(study, out, Path(args.report_dir) if args.report_dir else out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
