"""Ablations of the toy experiment's unstated choices: which settings produce or erase the effect?

Each ablation is the default sweep (experiments/toy/configs/default.yaml) with a few fields
changed, run over fewer shares to keep compute modest. Every run writes
``OUT/<name>/toy_results.json`` and its plot. ``OUT/ablations.md`` summarises the paired gap
(underrepresented - control entanglement) at the lowest and the highest share for each run, plus
the measurement-level ablations (layer, direction method, probe C, training length) read from
every run's grid; ``OUT/ablations.json`` holds the primary rows and every grid cell with
p < 0.01 at the lowest share. Finished runs are reused (delete
their directory to redo one).

    python experiments/toy/run_ablations.py --out experiments/results/toy/ablations \
        --baseline experiments/results/toy/default/toy_results.json
    python experiments/toy/run_ablations.py --out DIR --only heads-1 noise-0.1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from jaxlm.toy import load_toy_config, run_study, write_results

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"

# name -> overrides of the default config (model-level choices need retraining).
ABLATIONS: dict[str, list[str]] = {
    "positions-rope": ["model.position_embedding=rope"],
    "positions-none": ["model.position_embedding=none"],
    "heads-1": ["model.n_heads=1"],
    "heads-4": ["model.n_heads=4"],
    "mlp-4": ["model.mlp_hidden=4"],
    "mlp-64": ["model.mlp_hidden=64"],
    "weight-decay-0.1": ["optimizer.weight_decay=0.1"],
    "noise-0.1": ["transition_noise=0.1"],
    "steps-16000": ["steps=16000", "checkpoints=[8000]", "shares=[0.001,1.0]"],  # 4x longer: 2 shares only
    "probe-from-0": ["probe_from=0"],  # probe every position, including the ambiguous first two
    "balanced-probes": ["probe_balanced=true"],
    "rare-chain-0": ["rare_chain=0"],  # another chain underrepresented (chains differ in shared edges)
}
BASELINE = "default"  # the default sweep, summarised first when --baseline is given


def gap(record: dict) -> dict:
    """A grid share record ([mean, lo, hi] triples) -> the gap and both group means."""
    return {
        "share": record["share"],
        "under": record["underrepresented"][0],
        "control": record["control"][0],
        "gap": record["difference"][0],
        "ci95": record["difference"][1:],
        "p": record["p_value"],
    }


def summarise_run(name: str, overrides: list[str], results: dict) -> list[dict]:
    """One row per grid entry (method x C x layer x step) of a run: gaps at the lowest/highest share."""
    rows = []
    for entry in results["grid"]:
        rows.append({
            "run": name,
            "overrides": overrides,
            "method": entry["method"],
            "C": entry["C"],
            "layer": entry["layer"],
            "step": entry["step"],
            "primary": all(entry[k] == results["primary"][k] for k in ("method", "C", "layer", "step")),
            "lowest": gap(entry["shares"][0]),
            "highest": gap(entry["shares"][-1]),
            "reproduced": entry["verdict"]["reproduced"],
        })
    return rows


def fmt_gap(g: dict) -> str:
    p = "n/a" if g["p"] is None else f"{g['p']:.2g}"
    return f"{g['under']:.3f} vs {g['control']:.3f}: {g['gap']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}], p {p}"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| run | overrides | rare vs control E at lowest share: gap [95% CI], p | at share 1 | reproduced (p<0.01) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r["primary"]:
            lines.append(
                f"| {r['run']} | {' '.join(r['overrides']) or '(default)'} | {fmt_gap(r['lowest'])} | "
                f"{fmt_gap(r['highest'])} | {'yes' if r['reproduced'] else 'no'} |"
            )
    lines += [
        "",
        "Grid cells with p < 0.01 at the lowest share, per run and training step "
        "(cells: 4 methods x C values x 4 layers; `+` rare more entangled, `-` less):",
        "",
    ]
    steps = sorted({r["step"] for r in rows})
    lines += ["| run | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for run in dict.fromkeys(r["run"] for r in rows):
        cells = []
        for step in steps:
            here = [r for r in rows if r["run"] == run and r["step"] == step]
            if not here:
                cells.append("")
                continue
            sig = [r for r in here if r["lowest"]["p"] is not None and r["lowest"]["p"] < 0.01]
            plus = sum(r["lowest"]["gap"] > 0 for r in sig)
            cells.append(f"+{plus} / -{len(sig) - plus} of {len(here)}")
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    positive = [r for r in rows if r["lowest"]["p"] is not None and r["lowest"]["p"] < 0.01 and r["lowest"]["gap"] > 0]
    for r in positive:
        lines.append(
            f"\nRare > control at p < 0.01: {r['run']}, {r['method']} C={r['C']} layer {r['layer']} step {r['step']}: "
            f"{fmt_gap(r['lowest'])}; at share 1: {fmt_gap(r['highest'])}."
        )
    return "\n".join(lines) + "\n"


def forest_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = [r for r in rows if r["primary"]]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(primary) + 1.5))
    for k, r in enumerate(primary):
        for key, color, offset in (("lowest", "tab:red", -0.15), ("highest", "tab:blue", 0.15)):
            g = r[key]
            ax.errorbar(g["gap"], k + offset, xerr=[[g["gap"] - g["ci95"][0]], [g["ci95"][1] - g["gap"]]],
                        fmt="o", color=color, capsize=3, label=f"share {g['share']:g}" if k == 0 else None)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(primary)), [r["run"] for r in primary])
    ax.invert_yaxis()
    ax.set_xlabel("entanglement gap, underrepresented - control (paired over seeds, 95% CI)")
    ax.set_title("toy ablations: paper's probe directions, last layer")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_length_plot(results: dict, path: Path, method: str = "probe", C: float = 1.0) -> None:
    """Both groups' entanglement against share at every measured step (one run, its last layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layer = results["primary"]["layer"]
    entries = [g for g in results["grid"] if g["method"] == method and g["C"] == C and g["layer"] == layer]
    fig, axes = plt.subplots(1, len(entries), figsize=(3.2 * len(entries), 3.4), sharey=True)
    for ax, entry in zip(axes, sorted(entries, key=lambda g: g["step"])):
        shares = [r["share"] for r in entry["shares"]]
        for group, color in (("underrepresented", "tab:red"), ("control", "tab:blue")):
            mean, lo, hi = (np.asarray([r[group][k] for r in entry["shares"]]) for k in range(3))
            ax.plot(shares, mean, "o-", color=color, ms=3, label=group)
            ax.fill_between(shares, lo, hi, color=color, alpha=0.2)
        for r in entry["shares"]:
            if r["p_value"] is not None and r["p_value"] < 0.01:
                ax.annotate("*", (r["share"], max(r["underrepresented"][2], r["control"][2])), ha="center")
        ax.axhline(results["random_level"]["mean"], color="gray", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_title(f"step {entry['step']}")
        ax.set_xlabel("share")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"entanglement ({method}, layer {layer})")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--only", nargs="+", choices=sorted(ABLATIONS), help="run only these ablations")
    parser.add_argument("--shares", default="[0.001,0.03,1.0]", help="YAML list of shares for every ablation")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--baseline", help="toy_results.json of the default sweep, summarised as 'default'")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    out = Path(args.out)
    names = args.only or list(ABLATIONS)
    for name in names:
        path = out / name / "toy_results.json"
        if path.exists():
            print(f"{name}: reusing {path}")
            continue
        overrides = [f"shares={args.shares}", f"seeds={args.seeds}", *ABLATIONS[name]]
        config = load_toy_config(args.config, overrides)
        print(f"{name}: {' '.join(ABLATIONS[name]) or '(default)'}", flush=True)
        results = run_study(config, progress=not args.no_progress)
        results["ablation"] = {"name": name, "overrides": ABLATIONS[name]}
        write_results(results, out / name)
        v = results["verdict"]
        print(f"{name}: gap {v['gap_at_lowest_share']:+.3f} (p {v['p_at_lowest_share']}), "
              f"train {results['timing_s']['train']} s", flush=True)

    rows = []
    if args.baseline:
        baseline = json.loads(Path(args.baseline).read_text())
        rows += summarise_run(BASELINE, [], baseline)
        training_length_plot(baseline, out / "training_length.png")
    for name in ABLATIONS:  # summarise everything present, in a fixed order
        path = out / name / "toy_results.json"
        if path.exists():
            rows += summarise_run(name, ABLATIONS[name], json.loads(path.read_text()))
    significant = [r for r in rows if r["lowest"]["p"] is not None and r["lowest"]["p"] < 0.01]
    summary = {"primary": [r for r in rows if r["primary"]], "significant_at_lowest_share": significant}
    (out / "ablations.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "ablations.md").write_text(markdown(rows))
    forest_plot(rows, out / "ablations.png")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
