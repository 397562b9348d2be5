"""Plot a training run's ``metrics.jsonl``: training loss and held-out losses against tokens seen.

    python tools/plot_metrics.py RUN_DIR [RUN_DIR ...] --out loss.png [--title TEXT]

Prints a markdown table of the held-out losses at each evaluation step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"{path}: no metrics (is {run_dir} a jaxlm run directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def eval_table(rows: list[dict]) -> str:
    evals = [r for r in rows if "eval" in r]
    if not evals:
        return "(no held-out evaluations in this run)"
    names = list(evals[0]["eval"])
    lines = ["| step | tokens seen | train loss | " + " | ".join(names) + " |", "|---" * (len(names) + 3) + "|"]
    for r in evals:
        lines.append(f"| {r['step']} | {r['tokens_seen'] / 1e6:.2f}M | {r['loss']:.3f} | "
                     + " | ".join(f"{r['eval'][n]:.3f}" for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--title", default="training loss")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run_dir in args.run_dirs:
        rows = read_metrics(run_dir)
        label = run_dir.name
        ax.plot([r["tokens_seen"] / 1e6 for r in rows], [r["loss"] for r in rows], lw=1.2, label=f"{label}: train")
        evals = [r for r in rows if "eval" in r]
        for name in (evals[0]["eval"] if evals else {}):
            ax.plot([r["tokens_seen"] / 1e6 for r in evals], [r["eval"][name] for r in evals], marker="o", ms=3,
                    ls="--", label=f"{label}: {name}")
        print(f"## {run_dir}\n\n{eval_table(rows)}\n")
    ax.set_xlabel("tokens seen (M)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(args.title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
