"""``jaxlm data prepare RECIPE.yaml`` and ``jaxlm data inspect CONFIG``: build and look at prepared data.

``prepare`` turns raw corpora into tokenized shards (``jaxlm.data.prepare``; see docs/data.md).
``inspect`` summarises a prepared dataset's manifest, decodes a few packed sequences, and
measures the realised token share of each source over N batches of a pipeline config
(a pipeline config YAML, or a training config whose ``data:`` section is one); it also
checks the sha256 of every shard of those sources against the manifest.
Bad input (a recipe, an option, a damaged dataset) raises a ``JaxlmError``, which ``jaxlm``
turns into a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Any

from jaxlm.cli import options


# ---------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------


def _format_drops(dropped: dict[str, int]) -> str:
    return ", ".join(f"{reason} {count:,}" for reason, count in dropped.items()) or "-"


def run_prepare(args: argparse.Namespace) -> int:
    from jaxlm.data.prepare import load_recipe, prepare

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


def load_pipeline_config(path: str, overrides: list[str] | tuple[str, ...] = ()):
    """A ``PipelineConfig`` from a pipeline config YAML or a training config's ``data:`` section."""
    from jaxlm.config import ConfigError, apply_overrides, from_dict, read_yaml
    from jaxlm.data.pipeline import PipelineConfig

    data = apply_overrides(read_yaml(path), list(overrides))
    where = ""
    if "data" in data:
        data, where = data["data"], "data"
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: data: expected a mapping of pipeline fields, got {data!r}")
    try:
        return from_dict(PipelineConfig, data, where)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def manifest_summary(manifest) -> dict[str, Any]:
    """Per prepared source: documents, tokens, drops (and toxicity, held-out origin when known)."""
    summary = {}
    for name, info in manifest.sources.items():
        entry = manifest.data["sources"][name]
        item = {"documents": info.num_documents, "tokens": info.num_tokens, "dropped": entry.get("dropped", {})}
        for key in ("toxicity", "held_out_from", "text_bytes"):
            if key in entry:
                item[key] = entry[key]
        summary[name] = item
    return summary


def _segments(tokens, segment_ids) -> list[list[int]]:
    pieces: list[list[int]] = []
    previous = None
    for token, segment in zip(tokens.tolist(), segment_ids.tolist()):
        if segment != previous:
            pieces.append([])
            previous = segment
        pieces[-1].append(token)
    return pieces


def sample_rows(batch, source_names, tokenizer, count: int, width: int) -> list[dict[str, Any]]:
    """Up to ``count`` decoded rows of a batch, first one per source, then the rest in order;
    document boundaries shown as `` | ``, text truncated to ``width`` characters."""
    rows = list(range(len(batch["source_ids"])))
    firsts = {}
    for row in rows:
        firsts.setdefault(int(batch["source_ids"][row]), row)
    order = list(firsts.values()) + [r for r in rows if r not in firsts.values()]
    samples = []
    for row in order[:count]:
        pieces = _segments(batch["tokens"][row], batch["segment_ids"][row])
        text = " | ".join(tokenizer.decode(piece) for piece in pieces) if tokenizer is not None else str(pieces[0][:20])
        text = text.replace("\n", "\\n")
        samples.append(
            {
                "source": source_names[int(batch["source_ids"][row])],
                "documents": len(pieces),
                "text": text if len(text) <= width else text[: width - 3] + "...",
            }
        )
    return samples


def inspect_pipeline(config, batches: int, samples: int = 4, width: int = 240, progress: bool = False) -> dict[str, Any]:
    """Manifest summary, decoded samples and realised vs target token shares over ``batches``."""
    from tqdm import tqdm

    from jaxlm.data import records
    from jaxlm.data.pipeline import build_pipeline
    from jaxlm.tokenizer import Tokenizer

    pipeline = build_pipeline(dataclasses.replace(config, prefetch=0))
    try:
        manifest = pipeline.manifest
        for name in config.source_names:  # build_pipeline checked sizes and the tokenizer; now the bytes
            records.verify_source(manifest.sources[name], checksums=True)
        tokenizer = Tokenizer.load(manifest.tokenizer) if manifest.tokenizer is not None else None
        decoded = []
        for step in tqdm(range(batches), desc="batches", unit="batch", disable=None if progress else True):
            batch = next(pipeline)
            if step == 0:
                decoded = sample_rows(batch, pipeline.source_names, tokenizer, samples, width)
        realised = pipeline.realised_shares()
        target = pipeline.target_shares(0, batches)
        rows = pipeline.realised_rows()
    finally:
        pipeline.close()
    return {
        "dataset": str(manifest.root),
        "batches": batches,
        "batch_size": config.batch_size,
        "seq_len": config.seq_len,
        "tokens": sum(rows.values()) * config.seq_len,
        "realised": realised,
        "target": target,
        "max_abs_diff_points": max(abs(realised[n] - target[n]) for n in target) * 100,
        "manifest": {
            "tokenizer": str(manifest.tokenizer) if manifest.tokenizer else None,
            "vocab_size": pipeline.vocab_size,
            "sources": manifest_summary(manifest),
        },
        "samples": decoded,
    }


def print_report(report: dict[str, Any]) -> None:
    print(f"dataset: {report['dataset']}  (vocab {report['manifest']['vocab_size']})")
    print(f"  {'source':24s} {'documents':>11s} {'tokens':>14s}  dropped")
    for name, entry in report["manifest"]["sources"].items():
        note = f"  (held out from {entry['held_out_from']})" if "held_out_from" in entry else ""
        print(
            f"  {name:24s} {entry['documents']:11,d} {entry['tokens']:14,d}  {_format_drops(entry['dropped'])}{note}"
        )
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
    insp.add_argument("config", help="pipeline config YAML, or a training config YAML with a data: section")
    insp.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. dataset=/path/to/prepared")
    insp.add_argument("--batches", type=int, default=100, help="batches to draw for the realised mixture (default 100)")
    insp.add_argument("--samples", type=int, default=4, help="decoded sample sequences to show (default 4)")
    insp.add_argument("--json", action="store_true", help="print JSON (keys realised, target, manifest, samples, ...)")
    insp.set_defaults(func=run_inspect, command_name="data inspect")
