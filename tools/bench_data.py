"""Benchmark: `jaxlm data prepare` throughput and loader throughput on the real corpora.

Three parts, reported side by side in one section:

1. Prepare throughput (MB of cleaned UTF-8 text per second) on a subset of the real corpora
   (the first ``--books`` Gutenberg books and ``--posts`` /pol/ posts): the tokenizer is
   trained once (timed separately), then the whole prepare step (read + clean, tokenize,
   score toxicity, write shards) runs with each ``--workers`` value into a fresh directory,
   interleaved over ``--repeats``. Component rates on the same text (one process): reading,
   ``encode_batch`` with the tokenizer's threads, one-thread encoding, toxicity scoring.
2. The full prepare (all books, all /pol/ days): its manifest (``--full DIR``, written by
   ``jaxlm data prepare experiments/configs/recipe-gutenberg-pol.yaml --out DIR``) gives the
   time, tokens per source and drops.
3. Loader throughput reading those prepared shards (``jaxlm.data.pipeline``, seq_len 256,
   batch 32): Gutenberg 90% / pol 10%, pol only (the worst case: short posts), Gutenberg only;
   then the ``cpu-small`` train step (``jaxlm.train.Trainer``) on the same batches, measured in
   the same run (``tools/bench_loader.py``'s ``time_loader`` / ``time_training``).

    python tools/bench_data.py --full ../prepared/gutenberg-pol [--books 40] [--posts 40000]
        [--workers 0 1 2] [--repeats 2] [--batches 200] [--loader-repeats 3] [--train-steps 3]
        [--append docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loader import interleaved_rates, loader_table, publish, time_loader, time_training  # noqa: E402  (same directory)

SECTION = "## Data preparation and loading (real corpora)"


def subset_recipe(books: int, posts: int, tokenizer: str | None, vocab_size: int):
    from jaxlm.config import from_dict
    from jaxlm.data.recipe import Recipe

    data = {
        "sources": {
            "gutenberg": {"reader": "gutenberg", "paths": ["clean/gutenberg"], "max_documents": books},
            "pol": {"reader": "4chan_csv", "paths": ["toxic/pol"], "max_documents": posts},
        },
        "tokenizer": {"vocab_size": vocab_size, "sample_chars": 2_000_000}
        if tokenizer is None
        else {"path": tokenizer},
    }
    return from_dict(Recipe, data)


def component_rates(recipe, tokenizer_path: str) -> dict[str, float]:
    """MB/s of reading, encoding (threaded / one thread) and scoring the subset's text, in-process."""
    from jaxlm.data.encode import profanity_scorer
    from jaxlm.data.inputs import read_documents, resolve_source
    from jaxlm.data.sources import ReadStats, split_text
    from jaxlm.paths import data_dir
    from jaxlm.tokenizer import Tokenizer

    start = time.perf_counter()
    texts = []
    for name, source in recipe.sources.items():
        inputs = resolve_source(name, source, data_dir)
        texts += [d.text for d in read_documents(inputs, recipe.read, ReadStats())]
    read_s = time.perf_counter() - start
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    tokenizer = Tokenizer.load(tokenizer_path)
    start = time.perf_counter()
    for i in range(0, len(texts), 2048):
        tokenizer.encode_batch(texts[i : i + 2048])
    threaded_s = time.perf_counter() - start
    backend = tokenizer.backend
    start = time.perf_counter()
    for text in texts:
        backend.encode(text, add_special_tokens=False)
    serial_s = time.perf_counter() - start
    score = profanity_scorer()
    pieces = [p for t in texts for p in ([t] if len(t) <= 1000 else split_text(t, 1000))]
    start = time.perf_counter()
    for i in range(0, len(pieces), 4096):
        score(pieces[i : i + 4096])
    score_s = time.perf_counter() - start
    return {
        "megabytes": megabytes,
        "read": megabytes / read_s,
        "encode_threaded": megabytes / threaded_s,
        "encode_one_thread": megabytes / serial_s,
        "score": megabytes / score_s,
    }


def prepare_throughput(args) -> dict:
    from jaxlm.data.prepare import prepare

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        first = prepare(subset_recipe(args.books, args.posts, None, args.vocab), root / "trained", workers=args.workers[-1],
                        progress=False)
        trained_s = time.perf_counter() - start
        tokenizer = str(root / "trained" / "tokenizer.json")
        recipe = subset_recipe(args.books, args.posts, tokenizer, args.vocab)
        runs: dict[int, list[float]] = {w: [] for w in args.workers}
        seconds: dict[int, list[float]] = {w: [] for w in args.workers}
        megabytes = None
        for repeat, workers in itertools.product(range(args.repeats), args.workers):
            out = root / f"w{workers}-r{repeat}"
            start = time.perf_counter()
            result = prepare(recipe, out, workers=workers, progress=False)
            elapsed = time.perf_counter() - start
            megabytes = sum(e.get("text_bytes", 0) for e in result.manifest["sources"].values()) / 1e6
            runs[workers].append(megabytes / elapsed)
            seconds[workers].append(elapsed)
            print(f"repeat {repeat}: workers {workers}: {elapsed:.1f} s, {megabytes / elapsed:.2f} MB/s", flush=True)
        components = component_rates(recipe, tokenizer)
        print("component rates (MB/s):", {k: round(v, 2) for k, v in components.items()})
        sources = first.manifest["sources"]
    return {
        "trained_s": trained_s,
        "megabytes": megabytes,
        "runs": runs,
        "seconds": seconds,
        "components": components,
        "subset": {n: (e["num_documents"], e["num_tokens"]) for n, e in sources.items()},
    }


def loader_throughput(full: Path, args) -> dict:
    from jaxlm.config import from_dict
    from jaxlm.data.pipeline import PipelineConfig

    def config(weights):
        return from_dict(PipelineConfig, {"dataset": str(full), "sources": weights, "seq_len": args.seq_len,
                                          "batch_size": args.batch, "seed": 0})

    variants = {
        "gutenberg 90% / pol 10% (defaults)": config({"gutenberg": 0.9, "pol": 0.1}),
        "pol only (short posts: worst case)": config({"pol": 1.0}),
        "gutenberg only": config({"gutenberg": 1.0}),
    }
    results = interleaved_rates(variants, args.loader_repeats, lambda cfg: time_loader(cfg, args.batches, 5))
    train = time_training(variants["gutenberg 90% / pol 10% (defaults)"], args.train_steps) if args.train_steps else None
    if train:
        print(f"cpu-small train step: compile+first {train[0]:.1f} s, {train[1]:,.0f} tokens/s")
    return {"results": results, "train": train}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", type=Path, required=True, help="the fully prepared dataset (recipe-gutenberg-pol.yaml)")
    parser.add_argument("--books", type=int, default=40)
    parser.add_argument("--posts", type=int, default=40_000)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--loader-repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--append", type=Path)
    args = parser.parse_args()

    from jaxlm.data.records import read_manifest

    manifest = read_manifest(args.full).data
    load_start = os.getloadavg()[0]
    prep = prepare_throughput(args)
    loader = loader_throughput(args.full, args)

    sources, run = manifest["sources"], manifest["run"]
    medians = {w: statistics.median(v) for w, v in prep["runs"].items()}
    best = max(medians, key=medians.get)
    c = prep["components"]
    lines = [
        "",
        SECTION,
        "",
        "`jaxlm data prepare` (read + clean, tokenize with a byte-level BPE of 8192 tokens, score every document's",
        "toxicity with alt-profanity-check in chunks of 1000 characters, write ArrayRecord shards + manifest) and the",
        "`jaxlm.data.pipeline` loader reading the prepared real corpora. See `tools/bench_data.py`, `docs/data.md`.",
        "",
        f"- command: `python tools/bench_data.py --full {args.full} --books {args.books} --posts {args.posts} "
        f"--workers {' '.join(map(str, args.workers))} --repeats {args.repeats} --batches {args.batches} "
        f"--loader-repeats {args.loader_repeats} --train-steps {args.train_steps}"
        f"{' --append ' + str(args.append) if args.append else ''}`",
        f"- machine: 2-core CPU VM, shared with other jobs (load average {load_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end; 2.0 = both cores busy)",
        f"- date: {datetime.date(2026, 11, 23).isoformat()}",
        "",
        f"### Prepare throughput (subset: first {args.books} books, first {args.posts:,} posts; "
        f"{prep['megabytes']:.1f} MB of text)",
        "",
        "Tokenizer given (trained once beforehand), fresh output directory per run, variants interleaved, "
        f"{args.repeats} repeats, medians. MB = 10^6 bytes of cleaned UTF-8 text.",
        "",
        "| `--workers` | MB/s (median) | range | seconds (median) |",
        "|---|---|---|---|",
    ]
    for workers, values in prep["runs"].items():
        label = f"{workers} (in-process, tokenizer threads)" if workers == 0 else f"{workers} processes"
        lines.append(
            f"| {label} | {medians[workers]:.2f} | {min(values):.2f}-{max(values):.2f} | "
            f"{statistics.median(prep['seconds'][workers]):.1f} |"
        )
    lines += [
        "",
        f"Fastest: `--workers {best}` ({medians[best] / min(medians.values()):.2f}x "
        "the slowest). Component rates on the same text, one process (MB/s): "
        f"reading + cleaning {c['read']:.1f}, `encode_batch` (tokenizer threads) {c['encode_threaded']:.2f}, "
        f"one-thread encoding {c['encode_one_thread']:.2f}, toxicity scoring {c['score']:.1f}. "
        f"Training the tokenizer on the subset's sample (2M characters per source) and preparing it: {prep['trained_s']:.1f} s.",
        "",
        "### Full prepare (all 463 books, all 28 /pol/ days)",
        "",
        f"- command: `jaxlm data prepare experiments/configs/recipe-gutenberg-pol.yaml --out {args.full} "
        f"--workers {run['workers']}` (manifest written {manifest['created']})",
        f"- time: **{run['seconds']:.0f} s** in all (tokenizer trained on {manifest['tokenizer_info']['sample_characters']:,} "
        f"sampled characters), {run['text_megabytes']:.0f} MB of text: {run['megabytes_per_second']:.2f} MB/s for "
        f"the tokenize/score/write passes, {run['megabytes_per_second_with_tokenizer']:.2f} MB/s overall",
        "",
        "| source | documents | tokens | MB of text | tokens/document | mean toxicity | documents > 0.5 | dropped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in sources.items():
        tox = e.get("toxicity", {})
        drops = ", ".join(f"{k} {v:,}" for k, v in e.get("dropped", {}).items()) or "none"
        lines.append(
            f"| {name} | {e['num_documents']:,} | {e['num_tokens']:,} | {e.get('text_bytes', 0) / 1e6:.1f} | "
            f"{e['num_tokens'] / max(e['num_documents'], 1):,.0f} | {tox.get('mean', float('nan')):.3f} | "
            f"{tox.get('share_above_0.5', float('nan')):.1%} | {drops} |"
        )
    results = loader["results"]
    loader_medians = {name: statistics.median(v) for name, v in results.items()}
    lines += [
        "",
        f"### Loader on the prepared shards (seq_len {args.seq_len}, batch {args.batch})",
        "",
        f"{args.batches} batches per window after 5 warm-up batches of a fresh pipeline, variants interleaved, "
        f"{args.loader_repeats} repeats, medians.",
        "",
        *loader_table(results),
    ]
    if loader["train"]:
        train = loader["train"][1]
        default = loader_medians["gutenberg 90% / pol 10% (defaults)"]
        worst = loader_medians["pol only (short posts: worst case)"]
        lines += [
            "",
            f"Training consumption in the same run: the `cpu-small` train step (vocab 8192, batch {args.batch} x "
            f"{args.seq_len}, {args.train_steps} steps after compilation) runs at **{train:,.0f} tokens/s**; the 90/10 "
            f"loader is **{default / train:,.0f}x** faster (pol only: {worst / train:,.0f}x); the target is at least 10x.",
        ]
    publish(lines, args.append)
    print(json.dumps({"prepare": prep["runs"], "loader": loader_medians}, indent=1))


if __name__ == "__main__":
    main()
