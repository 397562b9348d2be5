"""Calibrate offline toxicity scorers against the Perspective scores in the shared RTP files.

    python tools/calibrate_scorers.py [--scorers profanity-check] [--out docs/toxicity_calibration.md]

For each scorer: Spearman correlation and ROC AUC (Perspective toxicity >= 0.5 = toxic)
overall and split by prompts / continuations, and throughput (texts/s).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from jaxlm.evaluate.toxicity import get_scorer
from jaxlm.paths import dataset_path


def rtp_scored_texts() -> dict[str, tuple[list[str], np.ndarray]]:
    """{"prompt": (texts, perspective scores), "continuation": (...)} over both RTP files."""
    parts: dict[str, tuple[list[str], list[float]]] = {"prompt": ([], []), "continuation": ([], [])}
    for name in ("toxic.jsonl", "nontoxic.jsonl"):
        for line in dataset_path(f"eval/rtp/{name}").read_text().splitlines():
            record = json.loads(line)
            for part, (texts, scores) in parts.items():
                score = record[part].get("toxicity")
                if score is not None:
                    texts.append(record[part]["text"])
                    scores.append(score)
    return {k: (texts, np.asarray(scores)) for k, (texts, scores) in parts.items()}


def agreement(scores: np.ndarray, perspective: np.ndarray) -> dict:
    return {
        "n": int(len(scores)),
        "toxic_share": float(np.mean(perspective >= 0.5)),
        "spearman": float(spearmanr(scores, perspective).statistic),
        "auc": float(roc_auc_score(perspective >= 0.5, scores)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scorers", nargs="+", default=["profanity-check"])
    parser.add_argument("--out", default="docs/toxicity_calibration.md")
    args = parser.parse_args()
    data = rtp_scored_texts()
    everything = (data["prompt"][0] + data["continuation"][0], np.concatenate([data["prompt"][1], data["continuation"][1]]))
    rows = []
    for name in args.scorers:
        scorer = get_scorer(name)
        start = time.perf_counter()
        scores = np.asarray(scorer(everything[0]))
        rate = len(scores) / (time.perf_counter() - start)
        n_prompt = len(data["prompt"][0])
        result = {
            "all": agreement(scores, everything[1]),
            "prompt": agreement(scores[:n_prompt], data["prompt"][1]),
            "continuation": agreement(scores[n_prompt:], data["continuation"][1]),
            "texts_per_sec": rate,
        }
        rows.append((name, result))
        print(name, json.dumps(result))
    lines = [
        "# Toxicity scorers against the Perspective API",
        "",
        "The Perspective API is not reachable offline, so generations are scored with an offline",
        "classifier. This report says how well each offline scorer stands in for Perspective on the",
        "4,773 texts of the shared RealToxicityPrompts subset that carry Perspective scores",
        "(prompts and continuations of the 1,196 challenging and 1,200 non-toxic prompts).",
        "Positive class for the AUC: Perspective toxicity >= 0.5.",
        "",
        f"- command: `python tools/calibrate_scorers.py --scorers {' '.join(args.scorers)}`",
        f"- machine: 2-core CPU VM ({platform.machine()}), date {datetime.date.today().isoformat()}",
        "",
        "| scorer | texts | Spearman (all) | AUC (all) | AUC prompts | AUC continuations | texts/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['all']['n']} | {r['all']['spearman']:.3f} | {r['all']['auc']:.3f} | "
            f"{r['prompt']['auc']:.3f} | {r['continuation']['auc']:.3f} | {r['texts_per_sec']:,.0f} |"
        )
    lines += [
        "",
        "Notes:",
        "- `profanity-check` (PyPI `alt-profanity-check`) is the default scorer (`get_scorer()`).",
        "  It was trained partly on the Davidson et al. tweets, so never evaluate it on those.",
        "- Absolute levels differ from Perspective's: compare toxicity numbers across models and",
        "  methods scored by the same scorer, not with the paper's Perspective numbers.",
        "- With a key and network, `get_scorer(\"perspective\")` scores with the real API.",
        "",
    ]
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
