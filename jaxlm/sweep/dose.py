"""Dose-response and trade-off frontiers: each intervention over its strengths, toxicity against
capability cost (KL), and models of different toxic shares compared at a matched KL.

A *family* is one built intervention (``plan.builds``: the ``iti:`` section, or one ``methods:``
spec) applied at each of its strengths, plus the model without it (scale 0 = KL 0), so a family's
points on one model form its dose-response curve. Toxicity is RTP's per-prompt score (the
maximum over a prompt's samples) under the primary scorer or an extra one; the scorer-free
measure is the toxic minus non-toxic gap in the log-likelihood the model gives RTP's own
continuations. Between shares, curves are compared at the same KL (``stats.matched_kl_difference``:
seeds, then prompts, resampled), never extrapolated past a model's strongest point.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxlm.evaluate import stats
from jaxlm.evaluate.stats import format_p
from jaxlm.sweep.config import SweepConfig
from jaxlm.sweep.plan import ITI_BUILD, builds, intervention_methods

# Capability costs (nats/token of KL on WikiText-2 test text) the frontiers are compared at.
MATCHED_KL = (0.05, 0.1, 0.25, 0.5, 1.0)


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # the build's name
    method: str  # its builder (iti, caa, ...)
    label: str
    points: tuple[tuple[str, float], ...]  # (method name, configured strength), weakest first


def families(config: SweepConfig) -> list[Family]:
    """One family per build, its methods ordered by strength (KL-calibrated ones by budget)."""
    by_build: dict[str, list] = {}
    for method in intervention_methods(config):
        by_build.setdefault(method.build, []).append(method)
    out = []
    for build in builds(config):
        chosen = [(m.name, build.strengths[m.level]) for m in by_build.get(build.name, [])]
        strengths = [(name, x.scale if x.scale is not None else x.kl) for name, x in chosen]
        label = f"ITI (top {config.iti.k} heads)" if build.name == ITI_BUILD else f"{build.name} ({build.method})"
        out.append(Family(build.name, build.method, label, tuple(sorted(strengths, key=lambda kv: kv[1]))))
    return out


def _where(row: dict, share: float, design: str) -> bool:
    if row["tagged"] is not None:
        return False
    return row["share"] == 0.0 if share == 0 else (row["share"] == share and row["design"] == design)


def score_vector(row: dict, measure: str) -> np.ndarray | None:
    """A row's per-prompt RTP scores under ``measure`` (``primary``, an extra scorer's name), or its
    per-example continuation log-likelihoods (``likelihood``); None when not measured."""
    if measure == "primary":
        return np.asarray(row["rtp_prompt_max"], float)
    if measure == "likelihood":
        lik = row.get("continuations")
        return None if lik is None else gap_contributions(lik["logprob"], lik["label"])
    values = (row.get("rtp_prompt_max_by") or {}).get(measure)
    return None if values is None else np.asarray(values, float)


def curves(rows: list[dict], family: Family, share: float, design: str, measure: str = "primary") -> dict[int, tuple]:
    """Seed -> (KL [points], scores [points, prompts]) of ``family`` on the models at ``share``,
    the model without intervention first (KL 0); seeds missing any point are left out."""
    out = {}
    models = {(r["seed"], r["method"]): r for r in rows if _where(r, share, design)}
    for seed in sorted({seed for seed, _ in models}):
        chosen = [models.get((seed, "base"))] + [models.get((seed, name)) for name, _ in family.points]
        if any(r is None for r in chosen):
            continue
        vectors = [score_vector(r, measure) for r in chosen]
        if any(v is None for v in vectors) or len({len(v) for v in vectors}) > 1:  # not measured, or stale rows
            continue
        kl = np.array([0.0] + [r["kl"] for r in chosen[1:]], float)
        out[seed] = (kl, np.stack(vectors))
    return out


def gap_contributions(logprobs: Sequence[float], labels: Sequence[int]) -> np.ndarray:
    """Per-example values whose mean is the toxic minus non-toxic mean log-likelihood:
    ``n / n_toxic * lp`` for toxic examples, ``-n / n_nontoxic * lp`` for the others."""
    lp, toxic = np.asarray(logprobs, float), np.asarray(labels) == 1
    n, n_toxic = len(lp), int(toxic.sum())
    return np.where(toxic, n / max(n_toxic, 1) * lp, -n / max(n - n_toxic, 1) * lp)


def gap(row: dict) -> float | None:
    lik = row.get("continuations")
    return None if lik is None else lik["gap"]


def _mean(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def dose_table(config: SweepConfig, rows: list[dict], design: str) -> list[str]:
    """Per family and strength: KL, RTP toxicity under each scorer and the likelihood gap, mean
    over each share's seeds (the base row: no intervention)."""
    shares = sorted(config.shares)
    scorers = [config.eval.scorer, *config.eval.extra_scorers]
    head = ["method", "strength"] + [f"{s:.0%}: {col}" for s in shares
                                     for col in ["KL", *[f"tox ({n})" for n in scorers], "lik. gap"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cells(method: str) -> list[str]:
        out = []
        for share in shares:
            chosen = [r for r in rows if _where(r, share, design) and r["method"] == method]
            out.append(_fmt(_mean([r["kl"] for r in chosen])))
            out.append(_fmt(_mean([float(np.mean(r["rtp_prompt_max"])) for r in chosen])))
            for name in config.eval.extra_scorers:
                out.append(_fmt(_mean([float(np.mean(v)) if (v := score_vector(r, name)) is not None else None
                                       for r in chosen])))
            out.append(_fmt(_mean([gap(r) for r in chosen]), 3))
        return out

    lines.append("| no intervention | 0 | " + " | ".join(cells("base")) + " |")
    for family in families(config):
        for name, strength in family.points:
            lines.append(f"| {family.label} | {strength:g} | " + " | ".join(cells(name)) + " |")
    return lines


def _interval(result: dict | None, digits: int = 3) -> str:
    if result is None:
        return "-"
    return f"{result['mean']:+.{digits}f} [{result['low']:+.{digits}f}, {result['high']:+.{digits}f}]"


def matched_kl_rows(config: SweepConfig, rows: list[dict], design: str, measure: str = "primary",
                    targets: Sequence[float] = MATCHED_KL, n_boot: int = 2000,
                    names: Sequence[str] | None = None) -> list[dict]:
    """Per family (``names``; None: every family with at least two strengths), toxic share and
    target KL: each share's toxicity at that KL (seed-level bootstrap interval), its change from
    the model without intervention, and both compared with the clean models' (share minus
    clean), when every group's curves reach the KL."""
    out = []
    shares = sorted(s for s in config.shares if s > 0)
    chosen = [f for f in families(config) if (f.name in names if names is not None else len(f.points) >= 2)]
    for family in chosen:
        clean = curves(rows, family, 0.0, design, measure)
        if not clean:
            continue
        for share in shares:
            toxic = curves(rows, family, share, design, measure)
            if not toxic:
                continue
            for target in targets:
                absolute = stats.matched_kl_difference(toxic, clean, target, n_boot=n_boot)
                reduction = stats.matched_kl_difference(_relative(toxic), _relative(clean), target, n_boot=n_boot)
                levels = {}
                for key, group in (("clean", clean), ("toxic", toxic)):
                    reached, _ = stats.scores_at_kl(group, target)
                    levels[key] = stats.hierarchical_bootstrap(reached, n_boot=n_boot) if reached else None
                out.append({"family": family.name, "label": family.label, "share": share, "kl": target,
                            "measure": measure, "clean": levels["clean"], "toxic": levels["toxic"],
                            "difference": absolute, "reduction_difference": reduction})
    return out


def _relative(group: dict) -> dict:
    """Curves as the change from the model without intervention (the first point), per prompt."""
    return {seed: (kl, tox - tox[:1]) for seed, (kl, tox) in group.items()}


def matched_kl_table(results: list[dict]) -> list[str]:
    lines = ["| method | share | KL | clean | share | share minus clean [95% CI], p | "
             "change from no intervention, share minus clean [95% CI], p |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if r["difference"] is None:
            continue
        diff, red = r["difference"], r["reduction_difference"]
        lines.append(
            f"| {r['label']} | {r['share']:.0%} | {r['kl']:g} | {_interval_level(r['clean'])} | {_interval_level(r['toxic'])} | "
            f"{_interval(diff)}, {format_p(diff['p'])} ({diff['n_seeds_a']} vs {diff['n_seeds_b']} seeds) | "
            f"{_interval(red)}, {format_p(red['p'])} |")
    return lines


def _interval_level(result: dict | None) -> str:
    if result is None:
        return "-"
    return f"{result['mean']:.3f} [{result['low']:.3f}, {result['high']:.3f}]"


def plot_frontiers(config: SweepConfig, rows: list[dict], design: str, path: Path) -> None:
    """Toxicity (primary scorer, then each extra one) and the likelihood gap against KL: one column
    per share, one line per family (mean over seeds), the model without intervention at KL 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = sorted(config.shares)
    measures = [("primary", f"RTP toxicity ({config.eval.scorer})"),
                *((name, f"RTP toxicity ({name})") for name in config.eval.extra_scorers),
                ("likelihood", "log-lik. gap, toxic minus non-toxic")]  # the mean of gap_contributions
    fig, axes = plt.subplots(len(measures), len(shares), figsize=(4.6 * len(shares), 3.4 * len(measures)), squeeze=False)
    for column, share in enumerate(shares):
        for family in families(config):
            for row_index, (measure, title) in enumerate(measures):
                group = curves(rows, family, share, design, measure)
                if not group:
                    continue
                kl = np.mean([k for k, _ in group.values()], axis=0)
                values = np.mean([v.mean(axis=1) for _, v in group.values()], axis=0)
                ax = axes[row_index][column]
                ax.plot(kl, values, marker="o", ms=3, label=family.label)
                ax.set_title(f"{share:.0%} toxic: {title}", fontsize=9)
    for ax in axes.ravel():
        ax.set_xscale("symlog", linthresh=0.05)
        ax.set_xlabel("KL to the model without intervention (nats/token)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_dose_response(config: SweepConfig, rows: list[dict], design: str, path: Path) -> None:
    """Toxicity (primary scorer) and KL against strength, one panel per family, one line per share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = [f for f in families(config) if f.points]
    fig, axes = plt.subplots(2, len(fams), figsize=(3.2 * len(fams), 5.6), squeeze=False)
    for column, family in enumerate(fams):
        for share in sorted(config.shares):
            xs, tox, kl = [0.0], [], []
            base = [r for r in rows if _where(r, share, design) and r["method"] == "base"]
            if not base:
                continue
            tox.append(np.mean([np.mean(r["rtp_prompt_max"]) for r in base]))
            kl.append(0.0)
            for name, strength in family.points:
                chosen = [r for r in rows if _where(r, share, design) and r["method"] == name]
                if chosen:
                    xs.append(strength)
                    tox.append(np.mean([np.mean(r["rtp_prompt_max"]) for r in chosen]))
                    kl.append(np.mean([r["kl"] for r in chosen]))
            axes[0][column].plot(xs, tox, marker="o", ms=3, label=f"{share:.0%}")
            axes[1][column].plot(xs, kl, marker="o", ms=3, label=f"{share:.0%}")
        axes[0][column].set_title(family.label, fontsize=9)
        axes[0][column].set_ylabel(f"RTP toxicity ({config.eval.scorer})", fontsize=8)
        axes[1][column].set_ylabel("KL (nats/token)", fontsize=8)
        axes[1][column].set_yscale("symlog", linthresh=0.05)
        axes[1][column].set_xlabel("strength (scale; 0 = none)", fontsize=8)
        for ax in axes[:, column]:
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7, title="toxic share", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

