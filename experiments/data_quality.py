"""Data-quality experiments at CPU scale (The Data-Quality Illusion, Nait Saada et al. 2025):
Perm(k) and classifier-based quality filtering (CQF).

    JAXLM_DATA_DIR=../shared/data python experiments/data_quality.py perm \
        experiments/configs/study-quality-perm.yaml --out runs/quality-perm \
        --report-dir experiments/results/quality-perm
    JAXLM_DATA_DIR=../shared/data python experiments/data_quality.py cqf \
        experiments/configs/study-quality-cqf.yaml --out runs/quality-cqf \
        --report-dir experiments/results/quality-cqf

Every step goes through the library (``jaxlm.data.prepare`` with the recipe's chain,
``jaxlm.loop.train``, ``jaxlm.evaluate.capability.prepared_document_losses``) and reuses its
finished output, so a rerun continues where a killed one stopped.

- ``perm``: one prepared dataset per k (``transforms: [{perm: {fraction: k}}]``, held-out split
  included), a model per (k, seed), each model evaluated on every k' held-out set:
  ``L(k, k')``, and the matrix ``L(k, k') - L(k', k')`` per seed.
- ``cqf``: the scored pool (k = 100%), the pool-wide score threshold of each top-k% (over the
  training documents of every pool source together), one dataset per k (``min_score``), a model
  per (k, seed) trained on the kept documents at their natural token shares, evaluated on
  WikiText-2 test (overall and per classifier-score decile), and the held-out Gutenberg and
  /pol/ documents (the same for every k).
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


@dataclasses.dataclass(frozen=True)
class Study:
    recipe: str
    ks: tuple[float, ...]
    seeds: tuple[int, ...] = (0, 1)
    eval_documents: int = 200
    train: dict[str, Any] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# Shared steps
# ---------------------------------------------------------------------------------------


def prepare_arm(study: Study, overrides: list[str], out: Path, tokenizer: Path | None) -> Path:
    from jaxlm.data.prepare import prepare
    from jaxlm.data.recipe import load_recipe

    extra = [f"tokenizer.path={tokenizer}"] if tokenizer is not None else []
    prepare(load_recipe(study.recipe, overrides + extra), out, progress=True)
    return out


def train_arm(study: Study, dataset: Path, sources: dict[str, float], seed: int, run_dir: Path) -> Path:
    from jaxlm.loop import TrainConfig, train

    done = run_dir / "done.json"
    data = {**study.train.get("data", {}), "dataset": str(dataset), "sources": sources, "seed": seed}
    config = from_dict(TrainConfig, {**study.train, "data": data, "seed": seed})
    fingerprint = json.dumps(to_dict(config), sort_keys=True)
    if done.exists() and json.loads(done.read_text()).get("config") == fingerprint:
        return run_dir
    result = train(config, run_dir, show_progress=True)
    if result.stopped_by != "completed":
        sys.exit(f"{run_dir}: stopped by {result.stopped_by} at step {result.step}; rerun to continue")
    files.write_json(done, {"config": fingerprint, "final": result.last_metrics})
    return run_dir


def document_losses(run_dir: Path, source_dir: Path, max_documents: int, cache_key: str):
    """Per-document losses of a run's final model on a prepared source (cached in the run dir)."""
    from jaxlm.checkpoint import load_model
    from jaxlm.evaluate.capability import DocumentLosses, prepared_document_losses

    cache = run_dir / "eval" / f"{cache_key}.json"
    if cache.exists():
        data = json.loads(cache.read_text())
        return DocumentLosses(np.asarray(data["nll"]), np.asarray(data["tokens"]), data["meta"])
    model = load_model(run_dir)
    losses = prepared_document_losses(model.config, model.params, source_dir, max_documents=max_documents,
                                      progress=None)
    cache.parent.mkdir(exist_ok=True)
    files.write_json(cache, {"nll": losses.nll.tolist(), "tokens": losses.tokens.tolist(), "meta": losses.meta})
    return losses


def seed_summary(values: list[float]) -> dict[str, Any]:
    """Mean over seeds and the per-seed values (seeds are the unit)."""
    return {"mean": float(np.mean(values)), "seeds": [float(v) for v in values],
            "range": float(np.ptp(values)) if len(values) > 1 else 0.0}


def arm_name(k: float) -> str:
    return f"k{round(k * 100):03d}"


# ---------------------------------------------------------------------------------------
# Perm(k)
# ---------------------------------------------------------------------------------------


def run_perm(study: Study, out: Path) -> dict[str, Any]:
    datasets: dict[float, Path] = {}
    tokenizer = None
    for k in study.ks:
        override = f"sources.gutenberg.transforms=[{{perm: {{fraction: {k}, seed: 0}}}}]"
        datasets[k] = prepare_arm(study, [override], out / "data" / arm_name(k), tokenizer)
        tokenizer = tokenizer or datasets[k] / "tokenizer.json"
    losses: dict[tuple[float, float], list[float]] = {}
    permuted_ce: dict[tuple[float, float], list[float]] = {}
    for k in study.ks:
        for seed in study.seeds:
            run_dir = train_arm(study, datasets[k], {"gutenberg": 1.0}, seed, out / "runs" / f"{arm_name(k)}-s{seed}")
            for test_k in study.ks:
                result = document_losses(run_dir, datasets[test_k] / "gutenberg@valid", study.eval_documents,
                                         f"valid-{arm_name(test_k)}")
                losses.setdefault((k, test_k), []).append(result.ce())
                flags = np.asarray([bool(m.get("permuted")) for m in result.meta])
                if flags.any():
                    permuted_ce.setdefault((k, test_k), []).append(result.ce(flags))
    ks = list(study.ks)
    seeds = len(study.seeds)
    matrix = [[seed_summary([losses[(k, t)][s] - losses[(t, t)][s] for s in range(seeds)]) for t in ks] for k in ks]
    return {
        "ks": ks,
        "seeds": list(study.seeds),
        "loss": [[seed_summary(losses[(k, t)]) for t in ks] for k in ks],
        "relative": matrix,
        "permuted_documents_loss": {f"{k}->{t}": seed_summary(v) for (k, t), v in permuted_ce.items()},
        "ordered": perm_order_checks(ks, matrix),
        "eval_documents": study.eval_documents,
    }


def perm_order_checks(ks: list[float], matrix: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Whether each test column of ``L(k, k') - L(k', k')`` grows as the training k moves away
    from k' (the ordering the paper reports), counted over adjacent pairs, per seed and on the mean."""
    def column_ordered(values: list[float], t: int) -> tuple[int, int]:
        good = total = 0
        for i in range(len(values) - 1):
            if i + 1 <= t:  # above the diagonal: k below k', moving closer
                good += values[i] >= values[i + 1]
            else:
                good += values[i + 1] >= values[i]
            total += 1
        return good, total

    seeds = len(matrix[0][0]["seeds"])
    per_seed = []
    for s in range(seeds + 1):
        good = total = 0
        for t in range(len(ks)):
            column = [matrix[k][t]["mean"] if s == seeds else matrix[k][t]["seeds"][s] for k in range(len(ks))]
            g, n = column_ordered(column, t)
            good, total = good + g, total + n
        per_seed.append({"which": "mean" if s == seeds else f"seed {s}", "ordered_pairs": good, "pairs": total})
    return {"adjacent_pairs": per_seed}


def plot_perm(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = results["ks"]
    relative = np.asarray([[cell["mean"] for cell in row] for row in results["relative"]])
    figure, axis = plt.subplots(figsize=(4.8, 4))
    image = axis.imshow(relative, cmap="viridis")
    labels = [f"{k:g}" for k in ks]
    axis.set_xticks(range(len(ks)), labels)
    axis.set_yticks(range(len(ks)), labels)
    axis.set_xlabel("test k'")
    axis.set_ylabel("train k")
    for i in range(len(ks)):
        for j in range(len(ks)):
            axis.text(j, i, f"{relative[i, j]:.3f}", ha="center", va="center", color="w", fontsize=8)
    axis.set_title("L(k, k') - L(k', k') (nats/token)")
    figure.colorbar(image)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------------------------
# CQF
# ---------------------------------------------------------------------------------------

POOL = ("gutenberg", "pol")


def pool_thresholds(scored: Path, ks: tuple[float, ...]) -> dict[float, float]:
    """The score of the ``round(k N)``-th best of the ``N`` training documents of the pool sources
    together: keeping ``score >= threshold`` is the pool-wide top-k% (ties kept)."""
    from jaxlm.data import records

    scores = np.sort(np.concatenate([
        np.asarray([meta["quality.wiki"] for _, meta in records.iter_documents(scored / name)]) for name in POOL
    ]))[::-1]
    return {k: float(scores[max(int(round(k * scores.size)), 1) - 1]) for k in ks if k < 1.0}


def kept_composition(dataset: Path) -> dict[str, Any]:
    manifest = json.loads((dataset / "manifest.json").read_text())
    sources = {name: manifest["sources"][name] for name in POOL}
    tokens = sum(e["num_tokens"] for e in sources.values())
    return {
        name: {
            "documents": e["num_documents"],
            "tokens": e["num_tokens"],
            "token_share": e["num_tokens"] / tokens,
            "mean_characters": e["characters"] / e["num_documents"],
        }
        for name, e in sources.items()
    }


def natural_weights(composition: dict[str, Any]) -> dict[str, float]:
    """Each pool source's share of the kept tokens (the mixture a filtered pool has by itself)."""
    total = sum(c["token_share"] for c in composition.values())
    return {name: c["token_share"] / total for name, c in composition.items()}


def evaluate_arm(study: Study, dataset: Path, weights: dict[str, float], scored: Path, prefix: Path) -> dict[str, Any]:
    """Train one model per seed on ``dataset`` at ``weights``; their losses on WikiText-2 test
    (overall and per classifier-score decile) and on the held-out Gutenberg and /pol/ documents."""
    per_seed: dict[str, list[float]] = {}
    deciles: list[list[float]] = []
    for seed in study.seeds:
        run_dir = train_arm(study, dataset, weights, seed, prefix.with_name(f"{prefix.name}-s{seed}"))
        wiki = document_losses(run_dir, scored / "wikitest", study.eval_documents, "wikitest")
        per_seed.setdefault("wikitext_test", []).append(wiki.ce())
        decile = np.minimum((np.asarray([m["quality.wiki.percentile"] for m in wiki.meta]) * 10).astype(int), 9)
        deciles.append([wiki.ce(decile == d) for d in range(10)])
        for name in POOL:
            held = document_losses(run_dir, scored / f"{name}@valid", study.eval_documents, f"{name}-valid")
            per_seed.setdefault(f"{name}_heldout", []).append(held.ce())
    return {
        "loss": {name: seed_summary(values) for name, values in per_seed.items()},
        "wikitext_deciles": [seed_summary([d[i] for d in deciles]) for i in range(10)],
    }


def run_cqf(study: Study, out: Path) -> dict[str, Any]:
    scored = prepare_arm(study, [], out / "data" / arm_name(1.0), None)
    thresholds = pool_thresholds(scored, study.ks)
    classifier = scored / "classifiers" / "wiki"
    datasets = {1.0: scored}
    for k, threshold in thresholds.items():
        overrides = [f"classifiers.wiki={{path: {classifier}}}"] + [
            f"sources.{name}.filters=[{{quality: {{classifier: wiki, min_score: {threshold}}}}}]" for name in POOL
        ]
        datasets[k] = prepare_arm(study, overrides, out / "data" / arm_name(k), scored / "tokenizer.json")
    arms: dict[str, Any] = {}
    for k in study.ks:
        composition = kept_composition(datasets[k])
        weights = natural_weights(composition)
        arms[arm_name(k)] = {
            "k": k,
            "threshold": thresholds.get(k),
            "composition": composition,
            "weights": weights,
            **evaluate_arm(study, datasets[k], weights, scored, out / "runs" / arm_name(k)),
        }
    # Control: every pool document (no CQF) at the smallest k's source shares, which separates
    # "CQF kept better documents" from "CQF changed the mixture of sources".
    smallest = arm_name(min(study.ks))
    control = arms[smallest]["weights"]
    arms[f"{smallest}-mixture"] = {
        "k": 1.0,
        "control_of": smallest,
        "composition": kept_composition(scored),
        "weights": control,
        **evaluate_arm(study, scored, control, scored, out / "runs" / f"{smallest}-mixture"),
    }
    manifest = json.loads((scored / "manifest.json").read_text())
    return {"ks": list(study.ks), "seeds": list(study.seeds), "arms": arms,
            "classifier": manifest["classifiers"]["wiki"], "eval_documents": study.eval_documents}


def plot_cqf(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = {name: arm for name, arm in results["arms"].items() if "control_of" not in arm}
    controls = [arm for arm in results["arms"].values() if "control_of" in arm]
    base = arms[arm_name(1.0)]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    ks = [arms[a]["k"] for a in arms]
    for key, label in (("wikitext_test", "WikiText-2 test"), ("gutenberg_heldout", "Gutenberg held-out"),
                       ("pol_heldout", "/pol/ held-out")):
        means = [arms[a]["loss"][key]["mean"] for a in arms]
        spans = [arms[a]["loss"][key]["range"] / 2 for a in arms]
        line = left.errorbar([k * 100 for k in ks], means, yerr=spans, marker="o", capsize=3, label=label)
        for control in controls:  # drawn at the k whose source shares it copies
            at = arms[control["control_of"]]["k"] * 100
            left.errorbar([at * 1.08], [control["loss"][key]["mean"]], yerr=[control["loss"][key]["range"] / 2],
                          marker="x", capsize=3, color=line[0].get_color(), ls="none")
    left.set_xscale("log")
    left.set_xlabel("kept top-k% of the pool (x: all documents at that k's source shares)")
    left.set_ylabel("CE (nats/token); bars: seed range")
    left.legend(fontsize=8)
    for name, arm in arms.items():
        if arm["k"] == 1.0:
            continue
        diff = [arm["wikitext_deciles"][d]["mean"] - base["wikitext_deciles"][d]["mean"] for d in range(10)]
        right.plot(range(1, 11), diff, marker="o", label=f"top {arm['k']:.0%}")
    for control in controls:
        diff = [control["wikitext_deciles"][d]["mean"] - base["wikitext_deciles"][d]["mean"] for d in range(10)]
        right.plot(range(1, 11), diff, marker="x", ls="--", color="grey", label=f"{control['control_of']} shares, no CQF")
    right.axhline(0, color="grey", lw=0.8)
    right.set_xlabel("WikiText-2 test classifier-score decile (10 = most HQ-like)")
    right.set_ylabel("CE minus k=100% (nats/token)")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study", choices=("perm", "cqf"))
    parser.add_argument("config", help="study YAML (experiments/configs/study-quality-*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--out", required=True, help="work directory (datasets, runs)")
    parser.add_argument("--report-dir", help="where results.json and the figure go (default: --out)")
    args = parser.parse_args(argv)
    study = load(Study, args.config, args.overrides)
    out = Path(args.out)
    report = Path(args.report_dir or args.out)
    report.mkdir(parents=True, exist_ok=True)
    results = run_perm(study, out) if args.study == "perm" else run_cqf(study, out)
    results["config"] = to_dict(study)
    files.write_json(report / "results.json", results, indent=2)
    (plot_perm if args.study == "perm" else plot_cqf)(results, report / f"{args.study}.png")
    print(json.dumps(results.get("ordered", {}), indent=1) if args.study == "perm" else report / "results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
