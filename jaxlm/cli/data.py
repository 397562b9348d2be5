"""``jaxlm data prepare RECIPE.yaml`` and ``jaxlm data inspect CONFIG``: build and look at prepared data.

``prepare`` turns raw corpora into tokenized shards (``jaxlm.data.prepare``; see docs/data.md).
``inspect`` summarises a prepared dataset's manifest (per-source counts, each chain step's
drops, score distributions; given the dataset directory, that alone), decodes a few packed sequences, and
measures the realised token share of each source over N batches of a pipeline config
(a pipeline config YAML, or a training config whose ``data:`` section is one); it also
checks the sha256 of every shard of those sources against the manifest.
Bad input (a recipe, an option, a damaged dataset) raises a ``JaxlmError``, which ``jaxlm``
turns into a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from jaxlm.cli import options
from jaxlm.data.inspect import inspect_dataset, inspect_pipeline, load_pipeline_config


# ---------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------


def _format_drops(dropped: dict[str, int]) -> str:
    return ", ".join(f"{reason} {count:,}" for reason, count in dropped.items()) or "-"


def run_prepare(args: argparse.Namespace) -> int:
    from jaxlm.data.prepare import prepare
    from jaxlm.data.recipe import load_recipe

    options.at_least("--workers", args.workers, 0)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    recipe = load_recipe(args.recipe, args.overrides)
    try:
        result = prepare(recipe, args.out, workers=args.workers, data_dir=args.data_dir, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("jaxlm data prepare: interrupted; nothing half-written is marked complete (run again to finish)",
              file=sys.stderr)
        return 130
    if result.up_to_date:
        print(f"{result.out_dir}: up to date")
        return 0
    sources = result.manifest["sources"]
    print(f"{'source':24s} {'documents':>11s} {'tokens':>14s} {'MB text':>9s}  dropped")
    for name, entry in sources.items():
        megabytes = entry.get("text_bytes", 0) / 1e6
        print(
            f"{name:24s} {entry['num_documents']:11,d} {entry['num_tokens']:14,d} "
            f"{megabytes:9.1f}  {_format_drops(entry.get('dropped', {}))}"
        )
    run = result.manifest.get("run", {})
    tokenizer = "trained" if result.tokenizer_trained else "reused"
    print(
        f"built {', '.join(result.built) or 'nothing'}; reused {', '.join(result.reused) or 'nothing'}; "
        f"tokenizer {tokenizer}; {result.seconds:.1f} s"
        + (f" ({run['megabytes_per_second']:.2f} MB/s of text)" if run.get("megabytes_per_second") else "")
    )
    print(f"prepared dataset: {result.out_dir}")
    return 0


# ---------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------


def _format_summary(summary: dict[str, Any]) -> str:
    quantiles = summary.get("quantiles", {})
    shown = " ".join(f"q{float(q) * 100:.0f} {v:.3f}" for q, v in quantiles.items() if float(q) in (0.1, 0.5, 0.9))
    return f"mean {summary['mean']:.3f}  {shown}"


def print_manifest(report: dict[str, Any]) -> None:
    """Per source: documents, tokens, drops; then each chain step's counts and the score distributions."""
    print(f"dataset: {report['dataset']}  (vocab {report['manifest']['vocab_size']})")
    print(f"  {'source':24s} {'documents':>11s} {'tokens':>14s}  dropped")
    sources = report["manifest"]["sources"]
    for name, entry in sources.items():
        note = f"  (held out from {entry['held_out_from']})" if "held_out_from" in entry else ""
        print(
            f"  {name:24s} {entry['documents']:11,d} {entry['tokens']:14,d}  {_format_drops(entry['dropped'])}{note}"
        )
    for name, entry in sources.items():
        if entry.get("chain"):
            print(f"chain of {name}:")
            for step in entry["chain"]:
                outcome = (
                    f"permuted {step['permuted']:10,d}" if "permuted" in step else f"dropped {step['dropped']:10,d}"
                )
                print(
                    f"  {step['step']:36s} in {step['documents_in']:10,d}  {outcome}"
                    + (f"  ({_format_drops(step['reasons'])})" if len(step["reasons"]) > 1 else "")
                )
        for key, summary in entry.get("scores", {}).items():
            print(f"  {name} {key}: {_format_summary(summary)}")
    for name, info in report["manifest"].get("classifiers", {}).items():
        held = info.get("report", {})
        line = f"classifier {name}: {info.get('origin')}"
        if "positive_documents" in info:
            line += f", {info['positive_documents']:,} HQ vs {info['negative_documents']:,} pool documents"
        if isinstance(held.get("heldout_auc"), float):
            line += f", held-out AUC {held['heldout_auc']:.3f}"
        print(line)


def print_report(report: dict[str, Any]) -> None:
    print_manifest(report)
    print("samples (first batch; ' | ' separates documents):")
    for sample in report["samples"]:
        print(f"  [{sample['source']}] {sample['text']}")
    print(
        f"token shares over {report['batches']} batches ({report['batch_size']} x {report['seq_len']} tokens, "
        f"{report['tokens']:,} in all):"
    )
    print(f"  {'source':24s} {'target':>8s} {'realised':>9s} {'diff (points)':>14s}")
    for name, target in report["target"].items():
        realised = report["realised"][name]
        print(f"  {name:24s} {target:8.2%} {realised:9.2%} {(realised - target) * 100:+14.2f}")


def run_inspect(args: argparse.Namespace) -> int:
    options.at_least("--batches", args.batches, 1)
    options.at_least("--samples", args.samples, 0)
    if Path(args.config).is_dir():  # a prepared dataset: its manifest only
        report = inspect_dataset(args.config)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print_manifest(report)
        return 0
    config = load_pipeline_config(args.config, args.overrides)
    report = inspect_pipeline(config, args.batches, args.samples, progress=not args.json)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


# ---------------------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------------------


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="prepare corpora into shards; inspect a prepared dataset")
    commands = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    commands.required = True

    prep = commands.add_parser(
        "prepare",
        help="tokenize and score corpora into ArrayRecord shards + manifest (reuses up-to-date outputs)",
        description="Build a prepared dataset from a recipe (see experiments/configs/recipe-*.yaml, docs/data.md).",
    )
    prep.add_argument("recipe", help="recipe YAML")
    prep.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. sources.pol.max_documents=1000")
    prep.add_argument("--out", help="output directory (default: the recipe's `out`)")
    prep.add_argument("--workers", type=int, default=2, help="tokenizing/scoring processes (0: in-process; default 2)")
    prep.add_argument("--data-dir", help="corpora root (default: the recipe's data_dir, then $JAXLM_DATA_DIR)")
    prep.add_argument("--no-progress", action="store_true", help="no progress bars")
    prep.set_defaults(func=run_prepare, command_name="data prepare")  # names the error line

    insp = commands.add_parser(
        "inspect",
        help="manifest summary, sample sequences and realised vs target token shares",
        description="Inspect the data a pipeline config (or a training config's data: section) produces.",
    )
    insp.add_argument(
        "config",
        help="a prepared dataset directory (its manifest: counts, chain steps, scores), a pipeline config YAML, "
        "or a training config YAML with a data: section",
    )
    insp.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. dataset=/path/to/prepared")
    insp.add_argument("--batches", type=int, default=100, help="batches to draw for the realised mixture (default 100)")
    insp.add_argument("--samples", type=int, default=4, help="decoded sample sequences to show (default 4)")
    insp.add_argument("--json", action="store_true", help="print JSON (keys realised, target, manifest, samples, ...)")
    insp.set_defaults(func=run_inspect, command_name="data inspect")
