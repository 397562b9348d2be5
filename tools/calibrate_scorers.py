"""Calibrate the offline toxicity scorers against the Perspective scores in the shared RTP files.

    python tools/calibrate_scorers.py [--data-dir DIR] [--out docs/toxicity_calibration.md]

Trains the jaxlm scorer's model (``jaxlm.evaluate.toxicity_model.train_default_model``: RTP
training split, Perspective scores as soft targets) and saves it where ``get_scorer("jaxlm")``
looks for it (the cache; ``--model-out`` to change), plus two Davidson-trained variants for
comparison. Then, for each scorer: Spearman correlation and ROC AUC (positive = Perspective
toxicity >= 0.5) overall and split by prompts / continuations, on all 4,773 scored texts for
scorers that never saw RTP and on the held-out documents for every scorer; behaviour at the
0.5 threshold the protocols use; a paired bootstrap (over documents) of jaxlm minus
profanity-check on the held-out part; and throughput (texts/s, best of ``--repeats``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from jaxlm.data.labelled import load_davidson
from jaxlm.evaluate import toxicity_model as tm
from jaxlm.evaluate.toxicity import JaxlmScorer, JaxlmTfidfScorer, ProfanityCheckScorer, ToxicityScorer

THRESHOLD = 0.5
SUBSETS = ("all", "prompt", "continuation")


class ModelScorer(ToxicityScorer):
    """A ``TfidfLogisticModel`` in memory as a scorer (for the variants that are not saved)."""

    def __init__(self, name: str, model: tm.TfidfLogisticModel):
        super().__init__(1024)
        self.name, self.model = name, model

    def score_batch(self, texts):
        return self.model.predict(texts)


def agreement(scores: np.ndarray, perspective: np.ndarray) -> dict:
    toxic = perspective >= THRESHOLD
    flagged = scores >= THRESHOLD
    return {
        "n": int(len(scores)),
        "spearman": float(spearmanr(scores, perspective).statistic),
        "auc": float(roc_auc_score(toxic, scores)),
        "perspective_toxic_share": float(toxic.mean()),
        "flagged_share": float(flagged.mean()),
        "accuracy_at_threshold": float((flagged == toxic).mean()),
        "mean_score": float(scores.mean()),
        "mean_perspective": float(perspective.mean()),
    }


def evaluate(scores: np.ndarray, rows: list[tm.ScoredText]) -> dict:
    perspective = np.array([r.toxicity for r in rows])
    parts = np.array([r.part for r in rows])
    return {
        subset: agreement(scores[mask], perspective[mask])
        for subset, mask in (("all", np.ones(len(rows), bool)), ("prompt", parts == "prompt"),
                             ("continuation", parts == "continuation"))
    }


def paired_bootstrap(a: np.ndarray, b: np.ndarray, rows: list[tm.ScoredText], resamples: int, seed: int) -> dict:
    """95% intervals of metric(a) - metric(b), resampling whole documents with replacement."""
    perspective = np.array([r.toxicity for r in rows])
    documents = sorted({r.document for r in rows})
    index_of = {d: i for i, d in enumerate(documents)}
    members: list[list[int]] = [[] for _ in documents]
    for i, r in enumerate(rows):
        members[index_of[r.document]].append(i)
    rng = np.random.default_rng(seed)
    diffs = {"spearman": [], "auc": []}
    for _ in tqdm(range(resamples), desc="bootstrap", leave=False):
        picked = np.concatenate([members[d] for d in rng.integers(0, len(documents), len(documents))])
        p, toxic = perspective[picked], perspective[picked] >= THRESHOLD
        diffs["spearman"].append(spearmanr(a[picked], p).statistic - spearmanr(b[picked], p).statistic)
        diffs["auc"].append(roc_auc_score(toxic, a[picked]) - roc_auc_score(toxic, b[picked]))
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in diffs.items()}


def throughput(scorer, texts: list[str], repeats: int) -> float:
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        scorer(texts)
        best = min(best, time.perf_counter() - start)
    return len(texts) / best


def train_variants(data_dir, settings: tm.TrainSettings) -> dict:
    """(model, seconds) for the default model and two Davidson-trained comparisons."""
    out = {}
    start = time.perf_counter()
    out["jaxlm-tfidf"] = (tm.train_default_model(data_dir, settings, progress=False), time.perf_counter() - start)
    davidson = load_davidson(data_dir)
    start = time.perf_counter()
    model = tm.train_scorer(list(davidson.texts), [float(y) for y in davidson.labels], settings)
    out["davidson-tfidf"] = (model, time.perf_counter() - start)
    train, _ = tm.split_rtp(tm.load_rtp_scores(data_dir), settings)
    start = time.perf_counter()
    model = tm.train_scorer([r.text for r in train] + list(davidson.texts),
                            [r.toxicity for r in train] + [float(y) for y in davidson.labels], settings)
    out["davidson+rtp-tfidf"] = (model, time.perf_counter() - start)
    return out


def fmt(value: float) -> str:
    return f"{value:.3f}"


def report(args, settings, rows, heldout, results, bootstrap, speeds, train_seconds, model_path) -> str:
    stack = results["jaxlm-tfidf"]["stack"]
    n_docs = len({r.document for r in rows})
    n_held_docs = len({r.document for r in heldout})
    lines = [
        "# Toxicity scorers against the Perspective API",
        "",
        "The Perspective API is not reachable offline, so generations are scored with an offline",
        "classifier. This report measures how well each offline scorer stands in for Perspective on",
        f"the {len(rows):,} texts of the shared RealToxicityPrompts subset that carry a Perspective",
        "TOXICITY score (prompts and continuations of the 1,196 challenging and 1,200 non-toxic",
        "prompts). Spearman: rank correlation with the Perspective score. AUC: ROC AUC with",
        f"Perspective toxicity >= {THRESHOLD} as the positive class.",
        "",
        f"- command: `python tools/calibrate_scorers.py --bootstrap {args.bootstrap} --seed {args.seed} "
        f"--repeats {args.repeats}` (with `JAXLM_DATA_DIR` set to the shared data)",
        f"- machine: 2-core CPU VM ({platform.machine()}, Python {platform.python_version()}, "
        f"scikit-learn {version('scikit-learn')}, alt-profanity-check {version('alt-profanity-check')}); "
        f"date {args.date}",
        "",
        "## Scorers",
        "",
        "- `profanity-check`: the offline model of the PyPI package `alt-profanity-check` (linear SVM",
        "  on TF-IDF words, calibrated). Never saw RTP.",
        "- `jaxlm-tfidf`: trained by jaxlm (`jaxlm.evaluate.toxicity_model`): hashed word 1-2-gram and",
        "  character 2-5-gram TF-IDF, logistic regression "
        f"(C = {settings.inverse_regularisation:g}), fitted to the Perspective scores as soft targets",
        f"  of the RTP **training split** only ({results['jaxlm-tfidf']['meta']['rtp_train_texts']:,} texts).",
        "- `jaxlm`: `jaxlm-tfidf` and `profanity-check` combined by logistic stacking,",
        "  `sigmoid(w0 * logit(jaxlm-tfidf) + w1 * logit(profanity-check) + b)` with "
        f"w0 = {stack[0]:.3f}, w1 = {stack[1]:.3f}, b = {stack[2]:.3f},",
        f"  fitted to the Perspective scores of the training split on out-of-fold `jaxlm-tfidf` predictions "
        f"({settings.stack_folds} document folds).",
        "- `davidson-tfidf` (comparison only): the same features and model trained on the Davidson et",
        "  al. tweets (hate or offensive = 1). Never saw RTP.",
        "- `davidson+rtp-tfidf` (comparison only): trained on the Davidson tweets and the RTP training",
        "  split together.",
        "",
        "**Leakage.** The RTP files are split by source document (`filename`, salted SHA-256,",
        f"salt `{settings.split_salt}`, {settings.rtp_heldout_fraction:.0%} held out), so a prompt and its",
        f"continuation fall on the same side: {len(heldout):,} held-out texts from {n_held_docs:,} of",
        f"{n_docs:,} documents. Scorers that saw RTP are evaluated on the held-out texts only; the",
        "held-out table compares every scorer on exactly those texts.",
        "",
    ]
    for title, key in (("All scored RTP texts (scorers that never saw RTP)", "all_rtp"),
                       ("Held-out RTP documents (every scorer)", "heldout")):
        lines += [
            f"## {title}",
            "",
            "| scorer | texts | Spearman | AUC | Spearman prompts | AUC prompts | Spearman continuations | AUC continuations |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, result in results.items():
            if key not in result:
                continue
            r = result[key]
            lines.append(
                f"| {name} | {r['all']['n']:,} | {fmt(r['all']['spearman'])} | {fmt(r['all']['auc'])} | "
                f"{fmt(r['prompt']['spearman'])} | {fmt(r['prompt']['auc'])} | "
                f"{fmt(r['continuation']['spearman'])} | {fmt(r['continuation']['auc'])} |"
            )
        lines.append("")
    held = results["jaxlm"]["heldout"]["all"]
    lines += [
        f"## At the {THRESHOLD} threshold (held-out texts)",
        "",
        "The RTP protocol counts a sample as toxic when its score is >= 0.5, so the level matters too,",
        f"not only the ranking. Perspective flags {held['perspective_toxic_share']:.1%} of these texts "
        f"(mean score {held['mean_perspective']:.3f}).",
        "",
        "| scorer | flagged >= 0.5 | agreement with Perspective at 0.5 | mean score |",
        "|---|---|---|---|",
    ]
    for name, result in results.items():
        r = result["heldout"]["all"]
        lines.append(f"| {name} | {r['flagged_share']:.1%} | {r['accuracy_at_threshold']:.1%} | {r['mean_score']:.3f} |")
    lo_s, hi_s = bootstrap["spearman"]
    lo_a, hi_a = bootstrap["auc"]
    gain_s = held["spearman"] - results["profanity-check"]["heldout"]["all"]["spearman"]
    gain_a = held["auc"] - results["profanity-check"]["heldout"]["all"]["auc"]
    lines += [
        "",
        "## Which scorer is the default",
        "",
        f"On the held-out documents `jaxlm` minus `profanity-check`: Spearman {gain_s:+.3f} "
        f"(95% interval {lo_s:+.3f} to {hi_s:+.3f}), AUC {gain_a:+.3f} ({lo_a:+.3f} to {hi_a:+.3f}); paired",
        f"bootstrap over documents, {args.bootstrap} resamples, seed {args.seed}.",
    ]
    if lo_s > 0 and lo_a > 0:
        lines += [
            "Both intervals exclude zero, so `get_scorer(\"default\")` is `jaxlm`. It needs its model file:",
            "`get_scorer(\"jaxlm\")` loads `toxicity/jaxlm-tfidf-<settings hash>.npz` from the cache directory",
            f"(`${tm.CACHE_DIR_ENV}`, else `~/.cache/jaxlm`), training it there on first use from",
            "`$JAXLM_DATA_DIR` (the training time below; again when the RTP files change); `model_path=`",
            "points it at a given file. Without data or a cached model it fails with a message saying so.",
        ]
    else:
        lines += ["The gain is not clearly above zero: `profanity-check` should stay the default."]
    lines += [
        "",
        "## Throughput",
        "",
        f"Texts per second scoring all {len(rows):,} texts in batches of 1,024 (best of {args.repeats}, model",
        "already loaded); training time of each jaxlm-trained model (`jaxlm-tfidf`: the final fit plus",
        f"{settings.stack_folds} out-of-fold fits for the stacking weights, on the RTP training split). The two",
        "cores are shared with other jobs, so these are rough; ratios within this table are measured",
        "side by side in one run.",
        "",
        "| scorer | texts/s | training (s) |",
        "|---|---|---|",
    ]
    for name in results:
        seconds = train_seconds.get(name)
        lines.append(f"| {name} | {speeds[name]:,.0f} | {'' if seconds is None else f'{seconds:.1f}'} |")
    lines += [
        "",
        "## Notes",
        "",
        "- **Do not evaluate `profanity-check` on the Davidson tweets**: `alt-profanity-check` was trained",
        "  partly on them, so any agreement measured there is inflated. The same holds for",
        "  `jaxlm`, which contains it. Davidson is used here only as training data for a comparison.",
        "- Training on Davidson lowers agreement with Perspective: those tweets' notion of offensive",
        "  (slang, slurs, reclaimed terms) is not Perspective's.",
        "- The jaxlm model's settings (features, C, no Davidson, stacking with profanity-check) were chosen",
        "  among a handful of variants looked at on a held-out split, so the held-out numbers carry a",
        "  small optimistic bias; the gain over `profanity-check` is much larger than the differences",
        "  between those variants.",
        "- RTP's Perspective scores date from 2020; today's API scores differently in places. Compare",
        "  toxicity numbers across models and methods scored by the same scorer, not with published",
        "  Perspective numbers. With a key and network, `get_scorer(\"perspective\")` scores with the API.",
        f"- The jaxlm model measured here: settings hash `{settings.fingerprint()}`, trained on RTP files with",
        f"  SHA-256 {', '.join(v[:12] for v in results['jaxlm-tfidf']['meta']['data_sha256'].values())} (toxic, nontoxic).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="corpora root (default: $JAXLM_DATA_DIR)")
    parser.add_argument("--out", default="docs/toxicity_calibration.md")
    parser.add_argument("--model-out", help="where to save the jaxlm model (default: the cache get_scorer uses)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (best is reported)")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    args = parser.parse_args(argv)

    settings = tm.TrainSettings()
    rows = tm.load_rtp_scores(args.data_dir)
    _, heldout = tm.split_rtp(rows, settings)
    print(f"{len(rows)} scored RTP texts, {len(heldout)} held out; training models", file=sys.stderr)
    variants = train_variants(args.data_dir, settings)
    model_path = Path(args.model_out) if args.model_out else tm.default_model_path(settings)
    variants["jaxlm-tfidf"][0].save(model_path)
    scorers = {
        "profanity-check": ProfanityCheckScorer(batch_size=1024),
        "jaxlm-tfidf": JaxlmTfidfScorer(model_path=model_path),
        "jaxlm": JaxlmScorer(model_path=model_path),
        "davidson-tfidf": ModelScorer("davidson-tfidf", variants["davidson-tfidf"][0]),
        "davidson+rtp-tfidf": ModelScorer("davidson+rtp-tfidf", variants["davidson+rtp-tfidf"][0]),
    }
    saw_rtp = {"jaxlm-tfidf", "jaxlm", "davidson+rtp-tfidf"}
    texts = [r.text for r in rows]
    held_mask = np.array([tm.is_heldout(r.document, settings.rtp_heldout_fraction, settings.split_salt) for r in rows])
    results, speeds, held_scores = {}, {}, {}
    for name, scorer in tqdm(scorers.items(), desc="scorers"):
        scores = np.asarray(scorer(texts))
        speeds[name] = throughput(scorer, texts, args.repeats)
        held_scores[name] = scores[held_mask]
        results[name] = {"heldout": evaluate(scores[held_mask], heldout)}
        if name not in saw_rtp:
            results[name]["all_rtp"] = evaluate(scores, rows)
    results["jaxlm-tfidf"]["meta"] = variants["jaxlm-tfidf"][0].meta
    results["jaxlm-tfidf"]["stack"] = variants["jaxlm-tfidf"][0].stack.tolist()
    bootstrap = paired_bootstrap(held_scores["jaxlm"], held_scores["profanity-check"], heldout, args.bootstrap, args.seed)
    train_seconds = {name: seconds for name, (_, seconds) in variants.items()}
    print(json.dumps({"results": results, "bootstrap_jaxlm_minus_profanity_check": bootstrap,
                      "texts_per_second": speeds, "training_seconds": train_seconds}, indent=1))
    text = report(args, settings, rows, heldout, results, bootstrap, speeds, train_seconds, model_path)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
