"""``jaxlm posttrain data [CONFIG] --checkpoint DIR --out DIR [key=value ...]``: detoxification data
built from the model itself (``jaxlm.onpolicy``).

Prompts from a pool disjoint from every evaluation prompt (RTP's "posttrain" part, openings of
held-out /pol/ posts), N samples per prompt from the checkpoint's model, scored by the offline
scorer; ``sft.jsonl`` holds the least toxic sample per prompt, ``dpo.jsonl`` the (least toxic,
most toxic) pairs whose score gap is at least ``min_gap``; ``samples.jsonl``, ``summary.json``
(counts, score quantiles, settings, fingerprint) and ``scores.png`` go next to them. CONFIG (a
YAML of ``jaxlm.onpolicy.OnPolicyConfig``) is optional: ``key=value`` overrides alone work, e.g.
``dataset=../prepared/gutenberg-pol samples_per_prompt=4``. Run again with the same model and
settings: the finished build is reused; a directory holding another build is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="OnPolicyConfig YAML (optional)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. dataset=../prepared/gutenberg-pol")
    parser.add_argument("--checkpoint", required=True, help="run directory, checkpoints/<step> dir or HF checkpoint dir (jaxlm.hf families)")
    parser.add_argument("--out", required=True, help="output directory (samples, sft, dpo JSONL; summary; plot)")
    parser.add_argument("--data-dir", help="corpora root holding eval/rtp (default: $JAXLM_DATA_DIR)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The CONFIG path and the overrides: a first word ``key=value`` that is not a file is an override."""
    if args.config is not None and "=" in args.config and not Path(args.config).exists():
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def count_line(name: str, counts: dict) -> str:
    return (f"{name}: {counts['prompts']} prompts, {counts['samples']} samples ({counts['empty_samples']} empty), "
            f"sft {counts['sft_rows']} rows ({counts['sft_dropped_max_score']} above sft_max_score), "
            f"dpo {counts['dpo_pairs']} pairs ({counts['dpo_dropped_gap']} below min_gap), "
            f"{counts['no_candidates']} prompts without candidates")


def run(args: argparse.Namespace) -> int:
    from jaxlm import onpolicy
    from jaxlm.checkpoint import load_model

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    path, overrides = config_and_overrides(args)
    config = onpolicy.load_onpolicy_config(path, overrides)
    if args.data_dir is not None:
        config = dataclasses.replace(config, data_dir=args.data_dir)
    built = onpolicy.build_detox_data(load_model(args.checkpoint), config, progress=not args.no_progress,
                                      out_dir=args.out)
    counts = built.summary["counts"]
    for name in (*onpolicy.SOURCES, "all"):
        if counts[name]["prompts"] or name == "all":
            print(count_line(name, counts[name]))
    state = "up to date (same fingerprint)" if built.reused else "written"
    print(f"{state}: {built.sft_path}, {built.dpo_path} (summary: {built.summary_path})")
    return 0
