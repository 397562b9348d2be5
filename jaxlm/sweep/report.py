"""The study's report: tables, statistics and plots from a sweep directory's outputs.

Units of inference (``jaxlm.evaluate.stats``): every model is evaluated on the *same* prompts
with the same sampling seed, a prompt's score being the maximum toxicity over its samples.
Claims *between* models (a toxic share vs the clean models) treat the seed (an independent
training) as the unit: a hierarchical bootstrap resamples seeds, then prompts (one prompt draw
shared by every model keeps the pairing). Claims *within* models (a method vs no intervention
on the same models) pair seeds and prompts. Interventions with a capability cost are compared
between shares at a matched KL on each model's dose-response curve (``jaxlm.sweep.dose``).
Probe-accuracy claims compare each model's top quarter of heads, models as the unit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import stats

from jaxlm.evaluate.stats import format_p, hierarchical_difference, mean_ci, power_table
from jaxlm.sweep import dose
from jaxlm.sweep.config import SweepConfig
from jaxlm.sweep.plan import (
    ITI_BUILD, UNPREPARED_DATASET, RunSpec, iti_methods, methods_for, posttrain_methods, posttrained, redteamed, spec_methods, untagged_methods,
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
                "rtp_prompt_max_by": result.get("rtp_prompt_max_by"), "continuations": result.get("rtp_continuations"),
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


def seed_scores(rows: list[dict], protocol: str, **where: Any) -> dict[int, np.ndarray] | None:
    """Seed -> per-prompt max toxicity of the matching rows (one model per seed); None if none."""
    chosen = [r for r in rows if all(r.get(k) == v for k, v in where.items())]
    if not chosen:
        return None
    return {r["seed"]: np.asarray(r[f"{protocol}_prompt_max"], float) for r in chosen}


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


def _fmt_difference(t: dict) -> str:
    seeds = (f"{t['n_seeds_a']} seed{'s' if t['n_seeds_a'] != 1 else ''}" if t.get("paired")
             else f"{t['n_seeds_a']} vs {t['n_seeds_b']} seeds")
    return f"{t['mean']:+.4f} [{t['low']:+.4f}, {t['high']:+.4f}], {format_p(t['p'])} ({seeds} x {t['n_prompts']} prompts)"


def compare(a: dict | None, b: dict | None, within: bool) -> dict | None:
    """``a - b`` (seed -> per-prompt scores): within the same models (seeds and prompts paired) or
    between models (seeds resampled per group, prompts paired)."""
    if a is None or b is None:
        return None
    if within:
        common = sorted(set(a) & set(b))
        if not common:
            return None
        a, b = {k: a[k] for k in common}, {k: b[k] for k in common}
    return {**hierarchical_difference(a, b, paired_seeds=within), "paired": within}


def _lower_claim(claim: str, what: str, a: dict | None, b: dict | None, within: bool) -> list[dict]:
    """The claim that toxicity ``a`` is lower than ``b``; no claim when either side was not run."""
    t = compare(a, b, within)
    if t is None:
        return []
    significant = not (t["low"] <= 0 <= t["high"])
    return [{"claim": claim, "evidence": f"{what}: {_fmt_difference(t)}", "verdict": _verdict(t["mean"] < 0, significant)}]


def reference_iti(config: SweepConfig):
    """The ITI method claims use: the level at alpha 4 (the reference's weakest), else the middle one."""
    iti = iti_methods(config)
    fixed = [m for m in iti if config.iti.kl_targets is None and config.iti.levels[m.level] == 4.0]
    return fixed[0] if fixed else iti[len(iti) // 2]


def top_quarter(accuracy: np.ndarray, tail: float = RIGHT_TAIL) -> float:
    flat = np.sort(np.asarray(accuracy).ravel())
    return float(flat[-max(1, round(tail * flat.size)):].mean())


def evaluate_claims(config: SweepConfig, rows: list[dict], probe_acc: dict[str, np.ndarray], runs: Sequence[RunSpec],
                    matched: Sequence[dict] = ()) -> list[dict]:
    """The reference study's claims, each tested on this sweep's numbers (95% intervals; a claim
    holds when its interval excludes 0 in the claimed direction). ``matched``: the primary
    scorer's ``dose.matched_kl_rows``."""
    claims: list[dict] = []
    design = config.designs[0]
    shares = sorted(s for s in config.shares if s > 0)
    ref = reference_share(config)
    top_share = shares[-1] if shares else None
    iti = reference_iti(config)

    def run_filter(share: float, d: str = design) -> dict:
        return share_filter(share, d)

    # 1. base toxicity rises with the toxic share (between models)
    for d in config.designs:
        if top_share is None:
            break
        t = compare(seed_scores(rows, "rtp", method="base", **run_filter(top_share, d)),
                    seed_scores(rows, "rtp", method="base", **run_filter(0.0)), within=False)
        if t is None:
            continue
        evidence = f"per-prompt max toxicity without intervention, {top_share:.0%} minus clean: {_fmt_difference(t)}"
        claims.append({"claim": f"Base toxicity rises with the toxic share ({d} design, RTP)", "evidence": evidence,
                       "verdict": _verdict(t["mean"] > 0, not (t["low"] <= 0 <= t["high"]))})
    # 1b. ITI lowers toxicity at all (the premise of every ITI comparison; within models)
    for share in [0.0] + ([ref] if ref is not None else []):
        claims += _lower_claim(
            f"ITI ({iti.level}) lowers the toxicity of the {'clean' if share == 0 else f'{share:.0%}-toxic'} models (RTP)",
            "per-prompt max toxicity, ITI minus no intervention",
            seed_scores(rows, "rtp", method=iti.name, **run_filter(share)),
            seed_scores(rows, "rtp", method="base", **run_filter(share)), within=True)
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
    # 3. probe accuracy: fatter right tail with more toxic data (models as the unit)
    if top_share is not None:
        high, low = share_probes(probe_acc, runs, top_share, design), share_probes(probe_acc, runs, 0.0, design)
        if len(high) >= 2 and len(low) >= 2:
            a, b = [top_quarter(x) for x in high], [top_quarter(x) for x in low]
            test = stats.ttest_ind(a, b, equal_var=False)
            pooled = right_tail_test(high, low)
            claims.append({
                "claim": f"Toxicity is more linearly separable in the {top_share:.0%}-toxic models (top quarter of per-head probe accuracy)",
                "evidence": f"mean accuracy of each model's top {RIGHT_TAIL:.0%} heads {np.mean(a):.3f} vs {np.mean(b):.3f} "
                            f"(clean); Welch t-test over models p = {test.pvalue:.2g} ({len(a)} vs {len(b)} models; "
                            f"heads pooled, one-sided Mann-Whitney p = {pooled['p']:.2g})",
                "verdict": _verdict(np.mean(a) > np.mean(b), test.pvalue < 0.05),
            })
    # 4. the paper's claim: after ITI the reference-share models are less toxic than the clean ones,
    #    at the same capability cost (matched KL) and at the reference's fixed alpha
    for r in matched:
        if r["family"] != "iti" or r["share"] != ref or r["difference"] is None:
            continue
        t = {**r["difference"], "paired": False}
        claims.append({
            "claim": f"At matched KL {r['kl']:g}, ITI leaves the {ref:.0%}-toxic models less toxic than the clean ones (RTP)",
            "evidence": f"toxicity at KL {r['kl']:g} on each model's ITI curve, {ref:.0%} minus clean: {_fmt_difference(t)}",
            "verdict": _verdict(t["mean"] < 0, not (t["low"] <= 0 <= t["high"])),
        })
    if ref is not None:
        for protocol in PROTOCOLS:
            claims += _lower_claim(
                f"After ITI ({iti.level}) the {ref:.0%}-toxic models are less toxic than the clean ones ({protocol.upper()})",
                f"per-prompt max toxicity, {ref:.0%} minus clean",
                seed_scores(rows, protocol, method=iti.name, **run_filter(ref)),
                seed_scores(rows, protocol, method=iti.name, **run_filter(0.0)), within=False)
    # 5. the "smile": post-ITI toxicity is lowest at an intermediate share
    all_shares = [0.0] + shares
    if len(all_shares) >= 3:
        curve = {s: seed_scores(rows, "rtp", method=iti.name, **run_filter(s)) for s in all_shares}
        curve = {s: v for s, v in curve.items() if v is not None}
        if len(curve) >= 3:
            means = {s: float(np.mean([x.mean() for x in v.values()])) for s, v in curve.items()}
            best = min(means, key=means.get)
            ends = [e for e in (min(curve), max(curve)) if e != best]
            inner = best not in (min(curve), max(curve))
            tests = [compare(curve[best], curve[e], within=False) for e in ends]
            sig = inner and all(t["high"] < 0 for t in tests)
            claims.append({
                "claim": f"Post-ITI toxicity across shares is a 'smile' with its minimum at an intermediate share (RTP, ITI {iti.level}, {design})",
                "evidence": "mean per-prompt max toxicity by share: "
                            + ", ".join(f"{s:.0%} {m:.3f}" for s, m in sorted(means.items()))
                            + f"; minimum at {best:.0%}"
                            + "".join(f"; vs {e:.0%}: {_fmt_difference(t)}" for e, t in zip(ends, tests)),
                "verdict": _verdict(inner, sig),
            })
    # 5b. tagged pretraining: conditioning on the non-toxic tag lowers toxicity (within models)
    for tag in config.tagged:
        claims += _lower_claim(
            f"{tag.kind.upper()} {tag.share:.0%}: conditioning on the non-toxic tag lowers toxicity (RTP)",
            "per-prompt max toxicity, conditioned minus unconditioned",
            seed_scores(rows, "rtp", method="tag-conditioned", tagged=tag.kind),
            seed_scores(rows, "rtp", method="base", tagged=tag.kind), within=True)
    # 6. ITI on the reference-share models beats the baselines
    if ref is not None:
        ours = seed_scores(rows, "rtp", method=iti.name, **run_filter(ref))
        baselines = [("clean + prompting", {"method": "prompting", **run_filter(0.0)}, False),
                     (f"{ref:.0%} + prompting", {"method": "prompting", **run_filter(ref)}, True)]
        baselines += [(f"{t.kind.upper()} (conditioned)", {"method": "tag-conditioned", "tagged": t.kind}, False)
                      for t in config.tagged]
        for label, where, within in baselines:
            claims += _lower_claim(f"{ref:.0%}-toxic + ITI ({iti.level}) is less toxic than {label} (RTP)",
                                   "per-prompt max toxicity difference", ours, seed_scores(rows, "rtp", **where), within)
    # 7. post-training (SFT, DPO on the model's own samples) lowers toxicity; after DPO the
    #    reference-share model is less toxic than the clean one (the reference's Table 2)
    for method in posttrain_methods(config):
        for share in sorted({0.0, ref} - {None}):
            claims += _lower_claim(
                f"{method.name.upper()} lowers the toxicity of the {share:.0%}-toxic model (RTP)",
                f"per-prompt max toxicity, {method.name} minus no intervention",
                seed_scores(rows, "rtp", method=method.name, **run_filter(share)),
                seed_scores(rows, "rtp", method="base", **run_filter(share)), within=True)
        if ref is not None:
            claims += _lower_claim(
                f"After {method.name.upper()} the {ref:.0%}-toxic model is less toxic than the clean model (RTP)",
                f"per-prompt max toxicity, {ref:.0%} minus clean",
                seed_scores(rows, "rtp", method=method.name, **run_filter(ref)),
                seed_scores(rows, "rtp", method=method.name, **run_filter(0.0)), within=False)
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
    described = [f"{s.name} ({s.method}{''.join(f', {k}={v}' for k, v in s.settings.items())}, "
                 f"{', '.join(strength.describe() for strength in s.strengths.values())})" for s in config.methods]
    calibrated = (" (KL budgets calibrated per model like ITI's)"
                  if any(x.calibrated for s in config.methods for x in s.strengths.values()) else "")
    return f"Other interventions: {'; '.join(described)}{calibrated}. "


def headline_methods(config: SweepConfig) -> list:
    """The methods of the summary tables: no intervention, prompting, ITI at the reference alpha,
    single-strength interventions and the post-trained models (dose-responses have their own table)."""
    ref = reference_iti(config).name
    single = {spec.name for spec in config.methods if spec.strength is not None}
    return [m for m in untagged_methods(config) if not m.intervened or m.name == ref or m.name in single]


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
        for method in headline_methods(config):
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
    methods = [m.name for m in headline_methods(config)]
    # per-model strengths: ITI's alphas, and the scales of specs calibrated to a KL budget
    strengths = [(f"alpha {m.level}", m.name) for m in iti_methods(config)] if config.iti.kl_targets is not None else []
    calibrated = {name for spec in config.methods for name, x in spec.strengths.items() if x.calibrated}
    strengths += [(f"scale {m.name}", m.name) for m in spec_methods(config) if m.name in calibrated]
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


def load_transfer(out: Path, runs: Sequence[RunSpec]) -> dict[str, dict]:
    tables = {}
    for run in runs:
        path = out / "runs" / run.name / "probe" / "transfer.json"
        if path.exists():
            tables[run.name] = json.loads(path.read_text())
    return tables


def transfer_table(config: SweepConfig, transfer: dict[str, dict], runs: Sequence[RunSpec], design: str) -> list[str]:
    """Probes fitted on each labelled set (rows), tested on each (columns): the mean accuracy of the
    training set's top-quarter heads, over each share's models (all heads' mean in brackets)."""
    lines = []
    for share in sorted(config.shares):
        tables = [transfer[r.name] for r in runs if r.name in transfer and r.tagged is None and r.share == share
                  and (share == 0 or r.design == design)]
        if not tables:
            continue
        sets = tables[0]["sets"]
        top = np.mean([t["top_accuracy"] for t in tables], axis=0)
        mean = np.mean([t["mean_accuracy"] for t in tables], axis=0)
        counts = ", ".join(f"`{name}` {tables[0]['n'][name]}" for name in sets)
        lines += [f"**{share:.0%} toxic** ({len(tables)} models; texts: {counts}):", "",
                  "| fitted on \\ tested on | " + " | ".join(f"`{n}`" for n in sets) + " |", "|---" * (len(sets) + 1) + "|"]
        for i, name in enumerate(sets):
            lines.append(f"| `{name}` | " + " | ".join(f"{top[i][j]:.3f} ({mean[i][j]:.3f})" for j in range(len(sets))) + " |")
        lines.append("")
    return lines


def labelled_set_lines(config: SweepConfig, transfer: dict[str, dict]) -> list[str]:
    """What each labelled set is: its spec, size and class counts (from the probe stage) and how
    its labels arise."""
    from jaxlm.data.labelled import LABEL_SOURCES, parse_data_spec

    counts = next(iter(transfer.values()), {})
    lines = []
    for role, spec in [("probes", config.probe.data), *(("transfer", t) for t in config.probe.transfer)]:
        n, toxic = counts.get("n", {}).get(spec), counts.get("toxic", {}).get(spec)
        size = "" if n is None else f": {n} texts" + ("" if toxic is None else f" ({toxic} labelled toxic, {n - toxic} not)")
        lines.append(f"- `{spec}` ({role}){size}. {LABEL_SOURCES[parse_data_spec(spec).name]}.")
    return lines


def head_choice_table(config: SweepConfig, out: Path, runs: Sequence[RunSpec], design: str) -> list[str]:
    """Cross-validated accuracy of each share's best heads with its spread over folds, and how
    much the top-K sets of the models of one share agree (Jaccard overlap, mean over pairs)."""
    lines = ["| share | K | mean CV accuracy of the top K [fold sd] | top-K overlap between seeds (Jaccard) |",
             "|---|---|---|---|"]
    for share in sorted(config.shares):
        weights = []
        for r in runs:
            path = out / "runs" / r.name / "probe" / "probe_weights.npz"
            if r.tagged is None and r.share == share and (share == 0 or r.design == design) and path.exists():
                weights.append(np.load(path))
        if not weights:
            continue
        heads = weights[0]["accuracy"].size
        for k in sorted({2, 4, 8, heads} & set(range(1, heads + 1))):
            tops, accs, sds = [], [], []
            for w in weights:
                order = [tuple(x) for x in w["ranking"][:k]]
                tops.append(set(order))
                accs.append(np.mean([w["accuracy"][h] for h in order]))
                if "accuracy_std" in w:
                    sds.append(np.mean([w["accuracy_std"][h] for h in order]))
            pairs = [(a, b) for i, a in enumerate(tops) for b in tops[i + 1:]]
            overlap = np.mean([len(a & b) / len(a | b) for a, b in pairs]) if pairs else math.nan
            sd = f" [{np.mean(sds):.3f}]" if sds else ""
            lines.append(f"| {share:.0%} | {k} | {np.mean(accs):.3f}{sd} | {overlap:.2f} |")
    return lines


def scorer_sanity_table(config: SweepConfig, out: Path, rows: list[dict]) -> list[str]:
    """Each scorer on the sanity suite (``scorers/sanity.json``), then on the clean models' own
    generations without intervention."""
    path = out / "scorers" / "sanity.json"
    if not path.exists():
        return []
    from jaxlm.evaluate.sanity import markdown_table

    result = json.loads(path.read_text())
    lines = markdown_table(result)
    base = [r for r in rows if r["method"] == "base" and r["design"] == "clean"]
    if base:
        cells = [f"{np.mean([np.mean(r['rtp_prompt_max']) for r in base]):.3f}"]
        cells += [f"{np.mean([np.mean(r['rtp_prompt_max_by'][n]) for r in base]):.3f}" if all(r.get("rtp_prompt_max_by") for r in base) else "-"
                  for n in config.eval.extra_scorers]
        lines += ["", f"The clean models' own RTP continuations (no intervention, {len(base)} models), mean per-prompt "
                      "score by scorer (" + ", ".join(config.eval.scorers) + "): " + ", ".join(cells) + "."]
    floors = ", ".join(f"`{name}` {v['degeneration_floor']:.3f} ({v['degeneration_floor_category']})"
                       for name, v in result["scorers"].items() if v["degeneration_floor"] is not None)
    if floors:
        lines += ["", f"Degenerate-text floor (the highest mean over random tokens, a repeated word, shuffled words): {floors}."]
    return lines


def power_section(config: SweepConfig, rows: list[dict]) -> list[str]:
    """Minimum detectable effects at 80% power (alpha 0.05) from this study's own spread: the SD of
    per-prompt differences within a model (reference ITI minus no intervention) and the SD of model
    means between seeds (no intervention, per share)."""
    design, iti = config.designs[0], reference_iti(config).name
    diffs, seed_sds = [], []
    for share in sorted(config.shares):
        where = share_filter(share, design)
        base, treated = seed_scores(rows, "rtp", method="base", **where), seed_scores(rows, "rtp", method=iti, **where)
        if base and treated:
            diffs += [np.std(treated[k] - base[k], ddof=1) for k in set(base) & set(treated)]
        if base and len(base) >= 2:
            seed_sds.append(np.std([v.mean() for v in base.values()], ddof=1))
    if not diffs or not seed_sds:
        return []
    sd_diff, seed_sd = float(np.mean(diffs)), float(np.sqrt(np.mean(np.square(seed_sds))))
    n_prompts = len(next(r["rtp_prompt_max"] for r in rows))
    table = power_table(sd_diff, seed_sd, sorted({100, 250, n_prompts, 1000, 2000}), sorted({2, len(config.seeds), 5, 10}))
    lines = [f"SD of per-prompt differences within a model ({iti} minus no intervention): {sd_diff:.3f}; SD of a model's "
             f"mean toxicity between seeds: {seed_sd:.4f}. Minimum detectable effects (80% power, two-sided alpha 0.05):", "",
             "| prompts | seeds per group | within-model MDE | between-model MDE |", "|---|---|---|---|"]
    lines += [f"| {r['n_prompts']} | {r['n_seeds']} | {r['within_model_mde']:.3f} | {r['between_model_mde']:.3f} |" for r in table]
    return lines


# ---------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------


def plot_toxicity_by_share(config: SweepConfig, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m.name for m in headline_methods(config)]
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


def posttrain_scorer(config: SweepConfig) -> str:
    """The scorer that ranked the post-training samples (read without the prepared dataset)."""
    return config.posttrain.onpolicy_config(UNPREPARED_DATASET).scorer


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
    design = config.designs[0]
    # every dose-response under the primary scorer; ITI's also under the other measures
    matched = {measure: dose.matched_kl_rows(config, rows, design, measure, names=None if measure == "primary" else [ITI_BUILD])
               for measure in ("primary", *config.eval.extra_scorers, "likelihood")}
    claims = evaluate_claims(config, rows, probe_acc, runs, matched["primary"])
    figures = {
        "frontier.png": lambda p: dose.plot_frontiers(config, rows, design, p),
        "dose_response.png": lambda p: dose.plot_dose_response(config, rows, design, p),
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
        f"Probes: `{config.probe.data}`, last token, C = {config.probe.C}, heads ranked by "
        f"{f'{config.probe.folds}-fold cross-validated' if config.probe.folds > 1 else 'held-out'} accuracy. "
        f"ITI: top {config.iti.k} heads, "
        f"{config.iti.direction} directions, strengths {', '.join(f'{k} ({config.iti.describe(k)})' for k in config.iti.levels)}"
        f"{' (per-model alpha calibrated to the KL budget on WikiText-2 valid text)' if config.iti.kl_targets else ''}. "
        f"{_specs_sentence(config)}"
        f"Evaluation: RTP {config.eval.rtp_prompts} prompts per file (challenging, non-toxic) of its evaluation part x "
        f"{config.eval.rtp_samples} samples, ToxiGen {config.eval.toxigen_prompts} prompts per prompt file built from "
        f"its held-out sentences, scorer `{config.eval.scorer}`"
        f"{''.join(f' (also `{n}`)' for n in config.eval.extra_scorers)}; CE/KL on "
        f"{config.eval.ce_docs} WikiText-2 test rows; BLiMP {config.eval.blimp_per_paradigm} pairs per paradigm"
        f"{f'; likelihood of RTP continuations, {config.eval.continuations} per label' if config.eval.continuations else ''}.", "",
        generation_checks(rows), "",
        "## Claims of the reference study", "",
        "| claim | evidence | verdict |", "|---|---|---|",
        *[f"| {c['claim']} | {c['evidence']} | **{c['verdict']}** |" for c in claims], "",
        f"## Table 1 analogue ({config.designs[0]} design; mean over seeds [95% CI])", "", *table1(config, rows), "",
    ]
    for d in config.designs:
        lines += [f"## Per share ({d} design)", "", *per_share_table(config, rows, d, probe_acc, runs), ""]
    lines += [f"## Dose-response ({design} design; mean over seeds)", "",
              "RTP toxicity: the mean per-prompt score under each scorer; lik. gap: the mean log-likelihood per token of "
              "RTP's own toxic continuations minus its non-toxic ones (teacher-forced; more negative: the model "
              "prefers non-toxic text). KL: to the model without intervention on WikiText-2 test rows.", "",
              *dose.dose_table(config, rows, design), ""]
    titles = {"primary": f"RTP toxicity (`{config.eval.scorer}`)", "likelihood": "the likelihood gap (scorer-free)"}
    for measure, results in matched.items():
        table = dose.matched_kl_table(results)
        if len(table) > 2:
            lines += [f"## Frontiers compared at matched KL: {titles.get(measure, f'RTP toxicity (`{measure}`)')}", "",
                      "Each model's dose-response curve (the model without intervention at KL 0) interpolated at the KL; "
                      "intervals: 95% hierarchical bootstrap (seeds, then prompts); models whose curve stops short are left out.",
                      "", *table, ""]
    transfer = load_transfer(out, runs)
    lines += ["## Labelled sets", "", *labelled_set_lines(config, transfer), ""]
    if transfer:
        lines += ["## Probe generalisation across labelled sets", "",
                  "Per-head probes fitted on all of one set and tested on another: mean accuracy of the fitting set's "
                  "top-quarter heads (of all heads in brackets); the diagonal is the set's own cross-validated accuracy.",
                  "", *transfer_table(config, transfer, runs, design)]
    lines += ["## Head choice", "", *head_choice_table(config, out, runs, design), ""]
    sanity_lines = scorer_sanity_table(config, out, rows)
    if sanity_lines:
        lines += ["## Scorer validity", "", *sanity_lines, ""]
    power = power_section(config, rows)
    if power:
        lines += ["## Power", "", *power, ""]
    posttraining = posttrain_table(config, out, runs)
    if posttraining:
        lines += ["## Post-training data and runs", "",
                  "SFT on the least toxic of each prompt's own samples; DPO on (least, most toxic) pairs "
                  f"(jaxlm.onpolicy; scorer `{posttrain_scorer(config)}`).", "", *posttraining, ""]
    attacks = load_redteam(config, out, runs)
    if attacks:
        lines += ["## Table 3 analogue: GCG attack success", "", *redteam_table(config, attacks), ""]
    lines += ["## Figures", ""] + [f"![{name}]({name})" for name in figures] + [""]
    if timings:
        lines += ["Stage wall times (this invocation, s): " + ", ".join(f"{k} {v}" for k, v in timings.items()), ""]
    (target / "report.md").write_text("\n".join(lines))
    per_prompt = ("rtp_prompt_max", "toxigen_prompt_max", "rtp_prompt_max_by", "continuations")
    summary = {"claims": claims, "rows": [{k: v for k, v in r.items() if k not in per_prompt} for r in rows],
               "matched_kl": matched, "transfer": transfer,
               "probe_accuracy": {k: {"mean": float(v.mean()), "max": float(v.max())} for k, v in probe_acc.items()},
               "training": {k: {"step_seconds": v["step_seconds"], "final": v.get("final")} for k, v in trained.items()},
               "redteam": attacks}
    (target / "report.json").write_text(json.dumps(summary, indent=1, default=float))
    return target / "report.md"
