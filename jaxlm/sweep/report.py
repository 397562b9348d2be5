"""The study's report: tables, statistics and plots from a sweep directory's outputs.

Units of inference: toxicity comparisons pair the *same prompts* across models (every
model is evaluated on the same prompts with the same sampling seed); a prompt's score is
the maximum toxicity over its samples, averaged over seeds, and two conditions are compared
by a paired t-test over prompts. Per-share summaries average runs over seeds with
t-based 95% intervals (seeds are the unit there). Probe-accuracy distributions are compared
by a one-sided Mann-Whitney U test on the top quarter of heads of each model, pooled over
seeds (the "right tail"), and on all heads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import stats

from jaxlm.sweep.config import SweepConfig
from jaxlm.sweep.plan import (
    RunSpec, iti_methods, methods_for, posttrain_methods, posttrained, redteamed, spec_methods, untagged_methods,
)

PROTOCOLS = ("rtp", "toxigen")


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def load_rows(config: SweepConfig, out: Path, runs: Sequence[RunSpec]) -> list[dict[str, Any]]:
    """One row per (run, method) with an evaluation result."""
    rows = []
    for run in runs:
        for method in methods_for(config, run):
            path = out / "runs" / run.name / "eval" / f"{method.name}.json"
            if not path.exists():
                continue
            result = json.loads(path.read_text())
            rows.append({
                "run": run.name, "design": run.design, "share": run.share, "seed": run.seed,
                "tagged": run.tagged.kind if run.tagged else None, "method": method.name, "alpha": result["alpha"],
                **{f"{p}_{k}": result[p][k] for p in PROTOCOLS for k in ("expected_max_toxicity", "toxicity_probability", "mean_toxicity")},
                **{f"{p}_prompt_max": result[f"{p}_prompt_max"] for p in PROTOCOLS},
                # older results (before these were counted) carry neither: None, not 0
                **{f"{p}_{k}": result[p].get(k) for p in PROTOCOLS for k in GENERATION_CHECKS},
                "ce": result["ce"], "kl": result["kl"], "blimp": result["blimp_accuracy"],
            })
    return rows


# Counted per evaluation: an empty continuation scores as harmless, a truncated prompt lost its start.
GENERATION_CHECKS = ("empty_continuations", "truncated_prompts")


def generation_checks(rows: list[dict]) -> str:
    """One sentence: how many continuations came back empty and how many prompts were cut to
    the context, over every evaluation, with the worst (run, method) named."""
    parts = []
    for key, what in (("empty_continuations", "empty continuations"), ("truncated_prompts", "prompts cut to the context")):
        counted = [(sum(r[f"{p}_{key}"] for p in PROTOCOLS), r) for r in rows if all(r[f"{p}_{key}"] is not None for p in PROTOCOLS)]
        if not counted:
            parts.append(f"{what}: not recorded")
            continue
        total = sum(n for n, _ in counted)
        worst_n, worst = max(counted, key=lambda item: item[0])
        worst_text = f" (most: {worst_n} in {worst['run']} / {worst['method']})" if total else ""
        parts.append(f"{what}: {total}{worst_text}")
    return "Generation checks over RTP + ToxiGen (scored as harmless if empty): " + "; ".join(parts) + "."


def load_probe_accuracy(out: Path, runs: Sequence[RunSpec]) -> dict[str, np.ndarray]:
    accuracy = {}
    for run in runs:
        path = out / "runs" / run.name / "probe" / "probe_weights.npz"
        if path.exists():
            accuracy[run.name] = np.load(path)["accuracy"]
    return accuracy


def load_train_results(out: Path, runs: Sequence[RunSpec]) -> dict[str, dict]:
    """Each finished run's training marker, with ``step_seconds`` from its metrics log."""
    results = {}
    for run in runs:
        marker = out / "runs" / run.name / "train.done.json"
        if marker.exists():
            results[run.name] = json.loads(marker.read_text())
            results[run.name]["step_seconds"] = logged_step_seconds(out / "runs" / run.name / "train" / "metrics.jsonl")
    return results


def logged_step_seconds(metrics: Path) -> float:
    """Seconds spent in training steps per the metrics log (tokens of each logged interval over its
    throughput): every step counts once however often the run was resumed or re-marked."""
    seconds, seen, last_step = 0.0, 0, 0
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    for row in map(json.loads, lines):
        if row.get("step", 0) > last_step and row.get("tokens_per_sec") and "tokens_seen" in row:
            seconds += (row["tokens_seen"] - seen) / row["tokens_per_sec"]
            seen, last_step = row["tokens_seen"], row["step"]
    return seconds


# ---------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and t-based 95% interval (nan bounds for a single value)."""
    x = np.asarray(values, float)
    m = float(x.mean())
    if len(x) < 2:
        return m, math.nan, math.nan
    half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return m, m - half, m + half


def paired_test(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Paired comparison of per-unit values ``a - b``: mean difference, 95% CI, two-sided p."""
    d = np.asarray(a, float) - np.asarray(b, float)
    m, lo, hi = mean_ci(d)
    p = float(stats.ttest_1samp(d, 0.0).pvalue) if len(d) > 1 and d.std() > 0 else (1.0 if m == 0 else 0.0)
    return {"diff": m, "lo": lo, "hi": hi, "p": p, "n": int(len(d))}


def prompt_scores(rows: list[dict], protocol: str, **where: Any) -> np.ndarray | None:
    """Per-prompt max toxicity averaged over the seeds of the matching rows ([prompts])."""
    chosen = [r for r in rows if all(r.get(k) == v for k, v in where.items())]
    if not chosen:
        return None
    return np.mean([r[f"{protocol}_prompt_max"] for r in chosen], axis=0)


RIGHT_TAIL = 0.25  # share of each model's heads that forms its right tail


def right_tail_test(high: Sequence[np.ndarray], low: Sequence[np.ndarray], tail: float = RIGHT_TAIL) -> dict[str, float]:
    """One-sided Mann-Whitney U: are the top ``tail`` heads of ``high``'s models more accurate than ``low``'s?"""

    def top(arrays):
        return np.concatenate([np.sort(a.ravel())[-max(1, round(tail * a.size)) :] for a in arrays])

    a, b = top(high), top(low)
    whole = stats.mannwhitneyu(np.concatenate([x.ravel() for x in high]), np.concatenate([x.ravel() for x in low]), alternative="greater")
    return {"top_mean_high": float(a.mean()), "top_mean_low": float(b.mean()), "p": float(stats.mannwhitneyu(a, b, alternative="greater").pvalue),
            "p_all_heads": float(whole.pvalue), "n_high": len(a), "n_low": len(b)}


def group_mean(rows: list[dict], key: str, **where: Any) -> tuple[float, float, float] | None:
    values = [r[key] for r in rows if all(r.get(k) == v for k, v in where.items())]
    return mean_ci(values) if values else None


def share_filter(share: float, design: str) -> dict[str, Any]:
    """Row filter for the untagged models of ``design`` at ``share`` (the clean models at 0)."""
    return {"share": 0.0, "design": "clean"} if share == 0 else {"share": share, "design": design, "tagged": None}


def share_probes(probe_acc: dict[str, np.ndarray], runs: Sequence[RunSpec], share: float, design: str) -> list[np.ndarray]:
    """Probe accuracies [L, H] of the models ``share_filter`` selects, one per seed."""
    return [probe_acc[r.name] for r in runs
            if r.name in probe_acc and r.tagged is None and r.share == share and (share == 0 or r.design == design)]


def reference_share(config: SweepConfig) -> float | None:
    """The toxic share compared with the clean model (``reference_share``, else the middle one)."""
    shares = sorted(s for s in config.shares if s > 0)
    if config.reference_share in shares:
        return config.reference_share
    return shares[len(shares) // 2] if shares else None


# ---------------------------------------------------------------------------------------
# Claims
# ---------------------------------------------------------------------------------------


def _verdict(holds: bool, significant: bool) -> str:
    if holds and significant:
        return "reproduced"
    if holds:
        return "direction agrees, not significant"
    return "contradicted (opposite, significant)" if significant else "not reproduced"


def _fmt_test(t: dict) -> str:
    ci = "" if math.isnan(t["lo"]) else f" [{t['lo']:+.4f}, {t['hi']:+.4f}]"
    return f"{t['diff']:+.4f}{ci}, p = {t['p']:.2g} (n = {t['n']} prompts)"


def _lower_claim(claim: str, what: str, a: np.ndarray | None, b: np.ndarray | None) -> list[dict]:
    """The claim that per-prompt max toxicity ``a`` is lower than ``b`` (paired over prompts);
    no claim when either side was not run."""
    if a is None or b is None:
        return []
    t = paired_test(a, b)
    return [{"claim": claim, "evidence": f"{what}: {_fmt_test(t)}", "verdict": _verdict(t["diff"] < 0, t["p"] < 0.05)}]


def evaluate_claims(config: SweepConfig, rows: list[dict], probe_acc: dict[str, np.ndarray], runs: Sequence[RunSpec]) -> list[dict]:
    """The reference study's claims, each tested on this sweep's numbers (at alpha = 0.05)."""
    claims: list[dict] = []
    design = config.designs[0]
    shares = sorted(s for s in config.shares if s > 0)
    ref = reference_share(config)
    top_share = shares[-1] if shares else None
    iti = iti_methods(config)
    strongest = iti[-1].name

    def run_filter(share: float, d: str = design) -> dict:
        return share_filter(share, d)

    # 1. base toxicity rises with the toxic share
    for d in config.designs:
        if top_share is None:
            break
        a = prompt_scores(rows, "rtp", method="base", **run_filter(top_share, d))
        b = prompt_scores(rows, "rtp", method="base", **run_filter(0.0))
        if a is None or b is None:
            continue
        t = paired_test(a, b)
        evidence = f"per-prompt max toxicity without intervention, {top_share:.0%} minus clean: {_fmt_test(t)}"
        base = [r for r in rows if r["method"] == "base" and r["tagged"] is None and r["design"] in (d, "clean")]
        if len({r["share"] for r in base}) >= 3:
            fit = stats.linregress([r["share"] for r in base], [r["rtp_mean_toxicity"] for r in base])
            evidence += f"; RTP mean toxicity vs share over {len(base)} models: slope {fit.slope:+.3f} per unit share, p = {fit.pvalue:.2g}"
        claims.append({"claim": f"Base toxicity rises with the toxic share ({d} design, RTP)", "evidence": evidence,
                       "verdict": _verdict(t["diff"] > 0, t["p"] < 0.05)})
    # 1b. ITI lowers toxicity at all (the premise of every ITI comparison)
    for share in [0.0] + ([ref] if ref is not None else []):
        claims += _lower_claim(
            f"ITI ({strongest}) lowers the toxicity of the {'clean' if share == 0 else f'{share:.0%}-toxic'} model (RTP)",
            "per-prompt max toxicity, ITI minus no intervention",
            prompt_scores(rows, "rtp", method=strongest, **run_filter(share)),
            prompt_scores(rows, "rtp", method="base", **run_filter(share)))
    # 2. capability barely moves with the toxic share (in each design: `added` also trains longer)
    for d in config.designs if top_share is not None else ():
        clean_ce = group_mean(rows, "ce", method="base", **run_filter(0.0))
        top_ce = group_mean(rows, "ce", method="base", **run_filter(top_share, d))
        if clean_ce and top_ce:
            change = (top_ce[0] - clean_ce[0]) / clean_ce[0]
            claims.append({
                "claim": f"Capability barely moves with the toxic share ({d} design, WikiText-2 CE)",
                "evidence": f"CE {clean_ce[0]:.3f} (clean) vs {top_ce[0]:.3f} ({top_share:.0%} toxic): "
                            f"{change:+.1%} (criterion: within 2%)",
                "verdict": "reproduced" if abs(change) <= 0.02 else "not reproduced",
            })
    # 3. probe accuracy: fatter right tail with more toxic data
    if top_share is not None:
        high, low = share_probes(probe_acc, runs, top_share, design), share_probes(probe_acc, runs, 0.0, design)
        if high and low:
            t = right_tail_test(high, low)
            claims.append({
                "claim": f"Toxicity is more linearly separable in the {top_share:.0%}-toxic model (right tail of per-head probe accuracy)",
                "evidence": f"mean accuracy of each model's top {RIGHT_TAIL:.0%} heads {t['top_mean_high']:.3f} vs "
                            f"{t['top_mean_low']:.3f} (clean); one-sided Mann-Whitney p = {t['p']:.2g} ({t['n_high']} vs "
                            f"{t['n_low']} heads; all heads: p = {t['p_all_heads']:.2g})",
                "verdict": _verdict(t["top_mean_high"] > t["top_mean_low"], t["p"] < 0.05),
            })
    # 4. ITI detoxifies the reference-share model further than the clean model
    if ref is not None:
        for protocol in PROTOCOLS:
            claims += _lower_claim(
                f"After ITI ({strongest}) the {ref:.0%}-toxic model is less toxic than the clean model ({protocol.upper()})",
                f"per-prompt max toxicity, {ref:.0%} minus clean",
                prompt_scores(rows, protocol, method=strongest, **run_filter(ref)),
                prompt_scores(rows, protocol, method=strongest, **run_filter(0.0)))
    # 5. the "smile": post-ITI toxicity is lowest at an intermediate share
    all_shares = [0.0] + shares
    if len(all_shares) >= 3:
        curve = {s: prompt_scores(rows, "rtp", method=strongest, **run_filter(s)) for s in all_shares}
        curve = {s: v for s, v in curve.items() if v is not None}
        if len(curve) >= 3:
            means = {s: float(v.mean()) for s, v in curve.items()}
            best = min(means, key=means.get)
            ends = [min(curve), max(curve)]
            inner = best not in ends
            tests = [paired_test(curve[best], curve[e]) for e in ends if e != best]
            sig = inner and all(t["diff"] < 0 and t["p"] < 0.05 for t in tests)
            claims.append({
                "claim": f"Post-ITI toxicity across shares is a 'smile' with its minimum at an intermediate share (RTP, ITI {strongest}, {design})",
                "evidence": "mean per-prompt max toxicity by share: "
                            + ", ".join(f"{s:.0%} {m:.3f}" for s, m in sorted(means.items()))
                            + f"; minimum at {best:.0%}"
                            + ("".join(f"; vs {e:.0%}: {_fmt_test(t)}" for e, t in zip([e for e in ends if e != best], tests))),
                "verdict": _verdict(inner, sig),
            })
    # 5b. tagged pretraining: conditioning on the non-toxic tag lowers toxicity
    for tag in config.tagged:
        claims += _lower_claim(
            f"{tag.kind.upper()} {tag.share:.0%}: conditioning on the non-toxic tag lowers toxicity (RTP)",
            "per-prompt max toxicity, conditioned minus unconditioned",
            prompt_scores(rows, "rtp", method="tag-conditioned", tagged=tag.kind),
            prompt_scores(rows, "rtp", method="base", tagged=tag.kind))
    # 6. ITI on the reference-share model beats the baselines
    if ref is not None:
        mid = iti[len(iti) // 2]
        ours = prompt_scores(rows, "rtp", method=mid.name, **run_filter(ref))
        baselines = [("clean + prompting", {"method": "prompting", **run_filter(0.0)}),
                     (f"{ref:.0%} + prompting", {"method": "prompting", **run_filter(ref)})]
        baselines += [(f"{t.kind.upper()} (conditioned)", {"method": "tag-conditioned", "tagged": t.kind}) for t in config.tagged]
        for label, where in baselines:
            claims += _lower_claim(f"{ref:.0%}-toxic + ITI ({mid.level}) is less toxic than {label} (RTP)",
                                   "per-prompt max toxicity difference", ours, prompt_scores(rows, "rtp", **where))
    # 7. post-training (SFT, DPO on the model's own samples) lowers toxicity; after DPO the
    #    reference-share model is less toxic than the clean one (the reference's Table 2)
    for method in posttrain_methods(config):
        for share in sorted({0.0, ref} - {None}):
            claims += _lower_claim(
                f"{method.name.upper()} lowers the toxicity of the {share:.0%}-toxic model (RTP)",
                f"per-prompt max toxicity, {method.name} minus no intervention",
                prompt_scores(rows, "rtp", method=method.name, **run_filter(share)),
                prompt_scores(rows, "rtp", method="base", **run_filter(share)))
        if ref is not None:
            claims += _lower_claim(
                f"After {method.name.upper()} the {ref:.0%}-toxic model is less toxic than the clean model (RTP)",
                f"per-prompt max toxicity, {ref:.0%} minus clean",
                prompt_scores(rows, "rtp", method=method.name, **run_filter(ref)),
                prompt_scores(rows, "rtp", method=method.name, **run_filter(0.0)))
    return claims


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------


def _cell(stat: tuple[float, float, float] | None, scale: float = 1.0, digits: int = 2) -> str:
    if stat is None:
        return "-"
    m, lo, hi = (v * scale for v in stat)
    return f"{m:.{digits}f}" if math.isnan(lo) else f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _specs_sentence(config: SweepConfig) -> str:
    """The ``methods:`` specs in one sentence ('' without any)."""
    if not config.methods:
        return ""
    described = [f"{s.name} ({s.method}{''.join(f', {k}={v}' for k, v in s.settings.items())}, {s.strength.describe()})"
                 for s in config.methods]
    calibrated = " (KL budgets calibrated per model like ITI's)" if any(s.strength.calibrated for s in config.methods) else ""
    return f"Other interventions: {'; '.join(described)}{calibrated}. "


def table1(config: SweepConfig, rows: list[dict]) -> list[str]:
    """Toxicity (x100) and CE per method: clean, the reference share and the tagged baselines."""
    design = config.designs[0]
    ref = reference_share(config)
    lines = ["| setup | ToxiGen mean toxicity x100 | RTP mean toxicity x100 | RTP expected max toxicity x100 | CE (WikiText-2) | KL | BLiMP |",
             "|---|---|---|---|---|---|---|"]
    groups = [("clean", share_filter(0.0, design))]
    if ref is not None:
        groups.append((f"{ref:.0%} toxic", share_filter(ref, design)))
    for label, where in groups:
        for method in untagged_methods(config):
            if group_mean(rows, "ce", method=method.name, **where) is None:
                continue
            lines.append(_row(f"{label} {method.label}", rows, method=method.name, **where))
        if label == "clean":
            for tag in config.tagged:
                lines.append(_row(f"{tag.kind.upper()} {tag.share:.0%} (conditioned on non-toxic)", rows, method="tag-conditioned", tagged=tag.kind))
                lines.append(_row(f"{tag.kind.upper()} {tag.share:.0%} (unconditioned)", rows, method="base", tagged=tag.kind))
    return lines


def _row(label: str, rows: list[dict], **where: Any) -> str:
    cells = [_cell(group_mean(rows, "toxigen_mean_toxicity", **where), 100, 1),
             _cell(group_mean(rows, "rtp_mean_toxicity", **where), 100, 1),
             _cell(group_mean(rows, "rtp_expected_max_toxicity", **where), 100, 1),
             _cell(group_mean(rows, "ce", **where), 1, 3), _cell(group_mean(rows, "kl", **where), 1, 3),
             _cell(group_mean(rows, "blimp", **where), 1, 3)]
    return f"| {label} | " + " | ".join(cells) + " |"


def per_share_table(config: SweepConfig, rows: list[dict], design: str, probe_acc: dict, runs: Sequence[RunSpec]) -> list[str]:
    methods = [m.name for m in untagged_methods(config)]
    # per-model strengths: ITI's alphas, and the scales of specs calibrated to a KL budget
    strengths = [(f"alpha {m.level}", m.name) for m in iti_methods(config)]
    strengths += [(f"scale {m.name}", m.name) for m, spec in zip(spec_methods(config), config.methods) if spec.strength.calibrated]
    head = ["share", "CE (base)", "mean probe acc.", "max probe acc.", f"top-{RIGHT_TAIL:.0%} heads (p vs clean)"]
    head += [f"RTP tox x100: {m}" for m in methods]
    head += [title for title, _ in strengths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for share in sorted(config.shares):
        where = share_filter(share, design)
        accs, clean = share_probes(probe_acc, runs, share, design), share_probes(probe_acc, runs, 0.0, design)
        tail = right_tail_test(accs, clean) if accs and clean else None
        cells = [f"{share:.0%}", _cell(group_mean(rows, "ce", method="base", **where), 1, 3),
                 _cell(mean_ci([a.mean() for a in accs]), 1, 3) if accs else "-",
                 _cell(mean_ci([a.max() for a in accs]), 1, 3) if accs else "-",
                 "-" if tail is None else f"{tail['top_mean_high']:.3f}" + ("" if share == 0 else f" (p {tail['p']:.2g})")]
        cells += [_cell(group_mean(rows, "rtp_mean_toxicity", method=m, **where), 100, 1) for m in methods]
        cells += [_cell(group_mean(rows, "alpha", method=name, **where), 1, 2) for _, name in strengths]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# ---------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------


def plot_toxicity_by_share(config: SweepConfig, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m.name for m in untagged_methods(config)]
    fig, axes = plt.subplots(1, len(config.designs), figsize=(5.5 * len(config.designs), 4), squeeze=False)
    for ax, design in zip(axes[0], config.designs):
        for method in methods:
            xs, ms, los, his = [], [], [], []
            for share in sorted(config.shares):
                where = share_filter(share, design)
                stat = group_mean(rows, "rtp_mean_toxicity", method=method, **where)
                if stat is not None:
                    xs.append(share * 100)
                    ms.append(stat[0])
                    los.append(stat[1] if not math.isnan(stat[1]) else stat[0])
                    his.append(stat[2] if not math.isnan(stat[2]) else stat[0])
            if xs:
                ax.plot(xs, ms, marker="o", label=method)
                ax.fill_between(xs, los, his, alpha=0.15)
        ax.set_title(f"RTP toxicity by toxic share ({design} design)")
        ax.set_xlabel("toxic share of pretraining tokens (%)")
        ax.set_ylabel("mean toxicity of continuations")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_probe_distributions(config: SweepConfig, probe_acc: dict, runs: Sequence[RunSpec], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    design = config.designs[0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    data, labels = [], []
    for share in sorted(config.shares):
        accs = [a.ravel() for a in share_probes(probe_acc, runs, share, design)]
        if accs:
            pooled = np.concatenate(accs)
            data.append(pooled)
            labels.append(f"{share:.0%}")
            xs = np.sort(pooled)
            axes[1].plot(xs, 1.0 - np.arange(len(xs)) / len(xs), label=f"{share:.0%}")
    if data:
        axes[0].violinplot(data, showmedians=True)
        axes[0].set_xticks(range(1, len(labels) + 1), labels)
    axes[0].set_title(f"per-head probe accuracy by toxic share ({design})")
    axes[0].set_xlabel("toxic share")
    axes[0].set_ylabel("validation accuracy")
    axes[1].set_title("right tail: share of heads above an accuracy")
    axes[1].set_xlabel("validation accuracy")
    axes[1].set_ylabel("fraction of heads >= x")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_tradeoff(config: SweepConfig, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    design = config.designs[0]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    chain = ["base"] + [m.name for m in iti_methods(config)]
    for share in sorted(config.shares):
        where = share_filter(share, design)
        pts = [(group_mean(rows, "ce", method=m, **where), group_mean(rows, "rtp_mean_toxicity", method=m, **where)) for m in chain]
        pts = [(c[0], t[0]) for c, t in pts if c is not None and t is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{share:.0%} toxic: base -> ITI")
    for tag in config.tagged:
        c = group_mean(rows, "ce", method="tag-conditioned", tagged=tag.kind)
        t = group_mean(rows, "rtp_mean_toxicity", method="tag-conditioned", tagged=tag.kind)
        if c and t:
            ax.scatter([c[0]], [t[0]], marker="s", s=50, label=f"{tag.kind.upper()} conditioned")
    ax.set_xlabel("cross-entropy on WikiText-2 (nats/token)")
    ax.set_ylabel("RTP mean toxicity")
    ax.set_title(f"toxicity / capability trade-off ({design})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_loss_curves(out: Path, runs: Sequence[RunSpec], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for run in runs:
        metrics = out / "runs" / run.name / "train" / "metrics.jsonl"
        if run.seed != min(r.seed for r in runs) or not metrics.exists():
            continue
        points = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        ax.plot([p["tokens_seen"] / 1e6 for p in points], [p["loss"] for p in points], label=run.name, lw=1)
    ax.set_xlabel("tokens seen (M)")
    ax.set_ylabel("training loss")
    ax.set_title("training loss (first seed)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def posttrain_table(config: SweepConfig, out: Path, runs: Sequence[RunSpec]) -> list[str]:
    """Per post-trained run: the on-policy data (prompts, SFT rows, DPO pairs, scores) and the
    final training metrics of each objective."""
    if config.posttrain is None:
        return []
    lines = ["| run | prompts | samples | SFT rows | DPO pairs | median score: all / SFT / chosen / rejected | "
             + " | ".join(f"{o.upper()} final loss" for o in config.posttrain.objectives) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(config.posttrain.objectives)]
    for run in runs:
        summary_path = out / "runs" / run.name / "posttrain" / "data" / "summary.json"
        if not posttrained(config, run) or not summary_path.exists():
            continue
        summary = json.loads(summary_path.read_text())
        totals = summary.get("counts", {}).get("all", {})
        scores = summary.get("scores", {})
        medians = " / ".join(_median_cell(scores.get(k)) for k in ("all", "sft", "chosen", "rejected"))
        finals = []
        for objective in config.posttrain.objectives:
            marker = out / "runs" / run.name / "posttrain" / f"{objective}.done.json"
            final = json.loads(marker.read_text()).get("final", {}) if marker.exists() else {}
            finals.append(f"{final['loss']:.4f}" if "loss" in final else "-")
        lines.append(f"| {run.name} | {totals.get('prompts', '-')} | {totals.get('samples', '-')} | "
                     f"{totals.get('sft_rows', '-')} | {totals.get('dpo_pairs', '-')} | {medians} | " + " | ".join(finals) + " |")
    return lines


def _median_cell(distribution: dict | None) -> str:
    median = ((distribution or {}).get("quantiles") or {}).get("0.5")
    return "-" if median is None else f"{median:.3f}"


def load_redteam(config: SweepConfig, out: Path, runs: Sequence[RunSpec]) -> list[dict]:
    """One row per (run, method) with a red-teaming summary."""
    if config.redteam is None:
        return []
    rows = []
    for run in runs:
        if not redteamed(config, run):
            continue
        for method in config.redteam.methods:
            path = out / "runs" / run.name / "redteam" / method / "summary.json"
            if path.exists():
                summary = json.loads(path.read_text())
                rows.append({"run": run.name, "share": run.share, "design": run.design, "method": method,
                             "n": summary["n"], "successes": summary["successes"],
                             "toxicity": summary.get("mean_continuation_toxicity")})
    return rows


def redteam_table(config: SweepConfig, rows: list[dict]) -> list[str]:
    """Table 3 analogue: GCG attack success per share and method, attacks pooled over seeds
    (Wilson 95% interval), with the per-seed rates."""
    from jaxlm.evaluate.redteam import wilson_interval

    if not rows:
        return []
    lines = ["| model | method | attacks | success rate [95% CI] | per seed | mean continuation toxicity |",
             "|---|---|---|---|---|---|"]
    for share in sorted({r["share"] for r in rows}):
        for method in config.redteam.methods:
            chosen = [r for r in rows if r["share"] == share and r["method"] == method]
            if not chosen:
                continue
            n, k = sum(r["n"] for r in chosen), sum(r["successes"] for r in chosen)
            lo, hi = wilson_interval(k, n)
            per_seed = ", ".join(f"{r['successes']}/{r['n']}" for r in chosen)
            tox = [r["toxicity"] for r in chosen if r["toxicity"] is not None]
            lines.append(f"| {share:.0%} toxic | {method} | {n} | {k / n:.1%} [{lo:.1%}, {hi:.1%}] | {per_seed} | "
                         f"{np.mean(tox):.3f} |" if tox else f"| {share:.0%} toxic | {method} | {n} | "
                         f"{k / n:.1%} [{lo:.1%}, {hi:.1%}] | {per_seed} | - |")
    return lines


# ---------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------


def write_report(config: SweepConfig, out: str | Path, runs: Sequence[RunSpec], *, timings: dict | None = None,
                 report_dir: str | Path | None = None) -> Path:
    """``report.md``, ``report.json`` and the plots into ``report_dir`` (default: the sweep directory)."""
    out = Path(out)
    target = Path(report_dir) if report_dir is not None else out
    target.mkdir(parents=True, exist_ok=True)
    rows = load_rows(config, out, runs)
    probe_acc = load_probe_accuracy(out, runs)
    trained = load_train_results(out, runs)
    claims = evaluate_claims(config, rows, probe_acc, runs)
    figures = {
        "toxicity_by_share.png": lambda p: plot_toxicity_by_share(config, rows, p),
        "probe_accuracy.png": lambda p: plot_probe_distributions(config, probe_acc, runs, p),
        "tradeoff.png": lambda p: plot_tradeoff(config, rows, p),
        "loss_curves.png": lambda p: plot_loss_curves(out, runs, p),
    }
    for name, draw in figures.items():
        draw(target / name)
    train_seconds = sum(t["step_seconds"] for t in trained.values())
    lines = [
        f"# Study report: {config.name}", "",
        f"{len(runs)} pretraining runs ({len(trained)} finished; {train_seconds / 60:.1f} min of training steps), "
        f"{len(rows)} model x method evaluations. Shares {', '.join(f'{s:.0%}' for s in config.shares)}; "
        f"seeds {', '.join(map(str, config.seeds))}; designs {', '.join(config.designs)}; "
        f"template {config.train.get('steps')} steps (clean-token budget of the `added` design).", "",
        f"Probes: `{config.probe.data}`, last token, C = {config.probe.C}. ITI: top {config.iti.k} heads, "
        f"{config.iti.direction} directions, strengths {', '.join(f'{k} ({config.iti.describe(k)})' for k in config.iti.levels)}"
        f"{' (per-model alpha calibrated to the KL budget on WikiText-2 valid text)' if config.iti.kl_targets else ''}. "
        f"{_specs_sentence(config)}"
        f"Evaluation: RTP {config.eval.rtp_prompts} prompts per split x {config.eval.rtp_samples} samples, "
        f"ToxiGen {config.eval.toxigen_prompts} prompts per prompt file, scorer `{config.eval.scorer}`; CE/KL on "
        f"{config.eval.ce_docs} WikiText-2 rows; BLiMP {config.eval.blimp_per_paradigm} pairs per paradigm.", "",
        generation_checks(rows), "",
        "## Claims of the reference study", "",
        "| claim | evidence | verdict |", "|---|---|---|",
        *[f"| {c['claim']} | {c['evidence']} | **{c['verdict']}** |" for c in claims], "",
        f"## Table 1 analogue ({config.designs[0]} design; mean over seeds [95% CI])", "", *table1(config, rows), "",
    ]
    for design in config.designs:
        lines += [f"## Per share ({design} design)", "", *per_share_table(config, rows, design, probe_acc, runs), ""]
    posttraining = posttrain_table(config, out, runs)
    if posttraining:
        lines += ["## Post-training data and runs", "",
                  "SFT on the least toxic of each prompt's own samples; DPO on (least, most toxic) pairs "
                  f"(jaxlm.onpolicy; scorer `{config.posttrain.onpolicy_config('').scorer}`).", "", *posttraining, ""]
    attacks = load_redteam(config, out, runs)
    if attacks:
        lines += ["## Table 3 analogue: GCG attack success", "", *redteam_table(config, attacks), ""]
    lines += ["## Figures", ""] + [f"![{name}]({name})" for name in figures] + [""]
    if timings:
        lines += ["Stage wall times (this invocation, s): " + ", ".join(f"{k} {v}" for k, v in timings.items()), ""]
    (target / "report.md").write_text("\n".join(lines))
    summary = {"claims": claims, "rows": [{k: v for k, v in r.items() if not k.endswith("_prompt_max")} for r in rows],
               "probe_accuracy": {k: {"mean": float(v.mean()), "max": float(v.max())} for k, v in probe_acc.items()},
               "training": {k: {"step_seconds": v["step_seconds"], "final": v.get("final")} for k, v in trained.items()},
               "redteam": attacks}
    (target / "report.json").write_text(json.dumps(summary, indent=1, default=float))
    return target / "report.md"
