"""The rounds study's report: accuracy per round per arm, the comparisons the study asks about,
and plots (``report.md``, ``report.json``, ``accuracy.png``, ``curation.png`` in the study dir).

Seeds are the unit: every seed has its own base model and every arm of a seed starts from it,
so arms are compared *paired by seed* (and by test prompt: every model answers the same test
prompts) with ``stats.hierarchical_difference`` (bootstrap over seeds, then prompts). Each
comparison is made at the last round and on the mean over rounds 1..T (area under the curve).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jaxlm import files
from jaxlm.evaluate.stats import hierarchical_bootstrap, hierarchical_difference
from jaxlm.rounds.config import RoundsConfig

COMPARISONS = (("hardest", "random"), ("hardest", "filter"), ("random", "filter"), ("boost", "random"),
               ("boost", "hardest"))
N_BOOT = 2000


def _test_correct(out: Path, row: dict) -> np.ndarray:
    from jaxlm.rounds.study import read_jsonl

    return np.array([r["correct"] for r in read_jsonl(out / row["eval_dir"] / "test.jsonl")], float)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _interval(d: dict) -> str:
    return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def summarize(config: RoundsConfig, rows: Sequence[dict], out: Path) -> dict[str, Any]:
    """Per chain and round: test accuracy (mean over seeds, bootstrap interval) and the curation
    figures; per beta: the arm comparisons; the filter-only arm's gain over its second half."""
    chains = list(dict.fromkeys(r["chain"] for r in rows))
    by_key = {(r["chain"], r["round"], r["seed"]): r for r in rows}
    rounds = sorted({r["round"] for r in rows})
    last = rounds[-1]
    seeds = sorted({r["seed"] for r in rows})
    correct = {key: _test_correct(out, row) for key, row in by_key.items()}

    def per_seed(chain: str, which: Sequence[int]) -> dict[int, np.ndarray]:
        return {s: np.mean([correct[(chain, t, s)] for t in which], axis=0) for s in seeds if (chain, which[0], s) in correct}

    curves = {}
    for chain in chains:
        curve = []
        for t in rounds:
            values = per_seed(chain, [t])
            point = hierarchical_bootstrap(values, n_boot=N_BOOT) if len(values) > 0 else None
            members = [by_key[(chain, t, s)] for s in seeds if (chain, t, s) in by_key]
            entry = {"round": t, "test_accuracy": point}
            for name in ("train_solved", "train_pass_rate", "distinct_answers", "distinct_4grams", "sft_rows",
                         "accepted", "false_accepts", "labels", "correct_labels", "label_budget_on_solved"):
                got = [m[name] for m in members if m.get(name) is not None]
                entry[name] = float(np.mean(got)) if got else None
            curve.append(entry)
        curves[chain] = curve

    arms = {r["chain"]: r["arm"] for r in rows}
    beta_of = {r["chain"]: r["beta"] for r in rows}
    comparisons = []
    later = [t for t in rounds if t >= 1]
    for beta in config.betas:
        def chain_of(arm: str) -> str | None:
            found = [c for c in chains if arms[c] == arm and (beta_of[c] == beta or beta_of[c] is None)]
            return found[0] if found else None

        for a, b in COMPARISONS:
            ca, cb = chain_of(a), chain_of(b)
            if ca is None or cb is None or not later or (beta_of[ca] is None and beta_of[cb] is None):
                continue
            entry = {"beta": beta, "a": ca, "b": cb}
            for label, which in (("last", [last]), ("mean", later)):
                va, vb = per_seed(ca, which), per_seed(cb, which)
                common = sorted(set(va) & set(vb))
                entry[label] = hierarchical_difference({s: va[s] for s in common}, {s: vb[s] for s in common},
                                                       paired_prompts=True, paired_seeds=True, n_boot=N_BOOT)
            comparisons.append(entry)
    stall = None
    filter_chains = [c for c in chains if beta_of[c] is None]
    if filter_chains and last >= 2:
        mid = max(1, last // 2)
        chain = filter_chains[0]
        stall = {"chain": chain, "from": mid, "to": last,
                 "gain": hierarchical_difference(per_seed(chain, [last]), per_seed(chain, [mid]), paired_prompts=True,
                                                 paired_seeds=True, n_boot=N_BOOT),
                 "first_gain": hierarchical_difference(per_seed(chain, [mid]), per_seed(chain, [0]), paired_prompts=True,
                                                       paired_seeds=True, n_boot=N_BOOT)}
    return {"seeds": seeds, "rounds": rounds, "test_prompts": len(next(iter(correct.values()))),
            "curves": curves, "comparisons": comparisons, "filter_stall": stall}


def plot(summary: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    betas = sorted({c["beta"] for c in summary["comparisons"]}, reverse=True) or [None]
    fig, axes = plt.subplots(1, len(betas), figsize=(4.5 * len(betas), 3.6), sharey=True, squeeze=False)
    for ax, beta in zip(axes[0], betas):
        for chain, curve in summary["curves"].items():
            if beta is not None and not (chain.endswith(f"-beta{beta:g}") or "-beta" not in chain):
                continue
            xs = [p["round"] for p in curve]
            mean = [p["test_accuracy"]["mean"] for p in curve]
            low = [p["test_accuracy"]["low"] for p in curve]
            high = [p["test_accuracy"]["high"] for p in curve]
            line, = ax.plot(xs, mean, marker="o", ms=3, label=chain.split("-beta")[0])
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15)
        ax.set_title("all arms" if beta is None else f"labeler beta = {beta:g}")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (greedy pass@1)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    paths = [out / "accuracy.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    names = (("train_solved", "training prompts solved (any of k)"), ("distinct_answers", "distinct answers / k"),
             ("label_budget_on_solved", "label budget on solved prompts"))
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False)
    for ax, (name, title) in zip(axes[0], names):
        for chain, curve in summary["curves"].items():
            xs = [p["round"] for p in curve if p[name] is not None]
            if xs:
                ax.plot(xs, [p[name] for p in curve if p[name] is not None], marker="o", ms=3, label=chain)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    paths.append(out / "curation.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def render(config: RoundsConfig, summary: dict[str, Any]) -> str:
    lines = [f"# Rounds study `{config.name}`", "",
             f"Seeds {summary['seeds']} (one base model each), {summary['test_prompts']} test prompts, "
             f"{config.task.train_prompts} training prompts x k = {config.sampling.k} samples per round, "
             f"rounds 0..{summary['rounds'][-1]} (0: the base model), SFT from the {config.init} model each round. "
             "Intervals: 95% bootstrap over seeds, then test prompts; differences paired by seed and prompt.", "",
             "## Test accuracy (greedy pass@1) per round", ""]
    header = "| chain | " + " | ".join(f"round {t}" for t in summary["rounds"]) + " |"
    lines += [header, "|" + "---|" * (len(summary["rounds"]) + 1)]
    for chain, curve in summary["curves"].items():
        cells = [f"{p['test_accuracy']['mean']:.3f} [{p['test_accuracy']['low']:.3f}, {p['test_accuracy']['high']:.3f}]"
                 for p in curve]
        lines.append(f"| {chain} | " + " | ".join(cells) + " |")
    lines += ["", "## Curation at the last round (mean over seeds)", "",
              "| chain | training prompts solved | distinct answers / k | SFT rows | accepted | false accepts | "
              "labels (correct) | label budget on solved prompts |", "|---|---|---|---|---|---|---|---|"]
    for chain, curve in summary["curves"].items():
        p = curve[-1]
        lines.append(f"| {chain} | {_fmt(p['train_solved'])} | {_fmt(p['distinct_answers'])} | {_fmt(p['sft_rows'], 0)} | "
                     f"{_fmt(p['accepted'], 0)} | {_fmt(p['false_accepts'], 0)} | {_fmt(p['labels'], 0)} "
                     f"({_fmt(p['correct_labels'], 0)}) | {_fmt(p['label_budget_on_solved'])} |")
    lines += ["", "## Comparisons (accuracy difference a - b)", "",
              "| beta | a | b | at the last round | mean over rounds 1..T | p (last) |", "|---|---|---|---|---|---|"]
    for c in summary["comparisons"]:
        lines.append(f"| {c['beta']:g} | {c['a']} | {c['b']} | {_interval(c['last'])} | {_interval(c['mean'])} | "
                     f"{c['last']['p']:.3g} |")
    stall = summary["filter_stall"]
    if stall is not None:
        lines += ["", "## Does filter-only stall?", "",
                  f"`{stall['chain']}`: round 0 -> {stall['from']}: {_interval(stall['first_gain'])}; "
                  f"round {stall['from']} -> {stall['to']}: {_interval(stall['gain'])}."]
    lines += ["", "![accuracy](accuracy.png)", "", "![curation](curation.png)", ""]
    return "\n".join(lines)


def write_tensorboard(rows: Sequence[dict], directory: Path) -> None:
    """Every chain's per-round figures as TensorBoard scalars (``<directory>/seed<s>/<chain>``,
    rewritten whole)."""
    import shutil

    from tensorboardX import SummaryWriter

    shutil.rmtree(directory, ignore_errors=True)
    writers: dict[tuple, SummaryWriter] = {}
    for row in rows:
        key = (row["seed"], row["chain"])
        if key not in writers:
            writers[key] = SummaryWriter(str(directory / f"seed{row['seed']}" / row["chain"]))
        for name, value in row.items():
            if name not in ("seed", "round", "budget", "beta") and isinstance(value, (int, float)) \
                    and not isinstance(value, bool) and math.isfinite(value):
                writers[key].add_scalar(name, value, row["round"])
    for writer in writers.values():
        writer.close()


def write_report(config: RoundsConfig, rows: Sequence[dict], out: Path) -> Path:
    write_tensorboard(rows, out / "tensorboard")
    summary = summarize(config, rows, out)
    files.write_json(out / "report.json", summary)
    plot(summary, out)
    files.write_text(out / "report.md", render(config, summary))
    return out / "report.md"
