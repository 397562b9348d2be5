"""Benchmark: data-loader throughput (tokens/s) against the training step's consumption.

Writes a synthetic prepared dataset shaped like the study's corpora (a "books" source of
long documents like the Gutenberg sample, ~80k tokens each, and a "posts" source of short
ones like /pol/ posts, ~35 tokens each; uint16 ids of an 8192-token vocabulary) with
``jaxlm.data.records``, then times ``jaxlm.data.pipeline`` batches of the ``cpu-small``
sequence length in several configurations, interleaved over repeats (medians reported):

- ``books 90% / posts 10%`` (the study's mixture) with the defaults (no read threads,
  2 batches prefetched in a background thread), and without the prefetch thread, and with
  2 grain read threads per source;
- the same mixture with MEDA tags (every document's metadata decoded);
- posts only (the worst case: ~7 documents per row) and books only;
- restoring a pipeline from a saved state.

Then, in the same run, the ``cpu-small`` training step (``jaxlm.train.Trainer``, one
process, all local devices) on the loader's batches, so the ratio loader / training is
measured side by side. Each timed loader window starts from a fresh pipeline after
warm-up batches; tokens/s counts ``batch * seq_len`` per batch.

    python tools/bench_loader.py [--books 200] [--posts 283000] [--seq-len 256] [--batch 32]
                                 [--batches 200] [--repeats 3] [--train-steps 3]
                                 [--append docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

SECTION = "## Data loader"
VOCAB = 8192
EOS, PAD = 0, 1


def write_dataset(root: Path, books: int, posts: int, seed: int) -> dict:
    from tqdm import tqdm

    from jaxlm.data import records

    rng = np.random.default_rng(seed)
    spec = {
        # lognormal lengths with means ~80k (books) and ~35 (posts) tokens
        "books": np.maximum(rng.lognormal(np.log(80_000) - 0.18, 0.6, books), 1000).astype(int),
        "posts": np.maximum(rng.lognormal(np.log(35) - 0.4, 0.9, posts), 1).astype(int),
    }
    infos, stats = {}, {}
    for name, lengths in spec.items():
        start = time.perf_counter()
        pool = rng.integers(2, VOCAB, int(lengths.max()) + 4096, dtype=np.uint16)

        def documents():
            for j, n in enumerate(tqdm(lengths, desc=f"write {name}", unit="doc", mininterval=2)):
                offset = int(rng.integers(0, 4096))
                yield pool[offset : offset + n], {"doc_id": f"{name}-{j}", "source": name, "toxicity": float(rng.random())}

        out = records.write_source(root / name, documents(), num_shards=8)
        seconds = time.perf_counter() - start
        size = sum(p.stat().st_size for p in (root / name).iterdir())
        infos[name] = records.SourceInfo(name, root / name, out["num_documents"], out["num_tokens"], "uint16", VOCAB, EOS, PAD)
        stats[name] = {**out, "bytes": size, "write_s": seconds}
    records.write_manifest(root, infos)
    return stats


def make_config(root: Path, weights: dict, args, **changes):
    from jaxlm.config import from_dict
    from jaxlm.data.pipeline import PipelineConfig

    data = {"dataset": str(root), "sources": weights, "seq_len": args.seq_len, "batch_size": args.batch, "seed": 0}
    data.update(changes)
    return from_dict(PipelineConfig, data)


def time_loader(config, batches: int, warmup: int, tag=None) -> float:
    """Tokens/s of ``batches`` batches after ``warmup`` batches of a fresh pipeline."""
    from jaxlm.data.pipeline import build_pipeline

    pipeline = build_pipeline(config, tag_transform=tag)
    for _ in range(warmup):
        next(pipeline)
    start = time.perf_counter()
    for _ in range(batches):
        next(pipeline)
    seconds = time.perf_counter() - start
    pipeline.close()
    return batches * config.batch_size * config.seq_len / seconds


def interleaved_rates(variants: dict, repeats: int, rate) -> dict[str, list[float]]:
    """Tokens/s ``rate(variant)`` per variant name, the variants interleaved over ``repeats`` rounds."""
    results: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(repeats):
        for name, variant in variants.items():
            results[name].append(rate(variant))
            print(f"repeat {repeat}: {name}: {results[name][-1]:,.0f} tokens/s", flush=True)
    return results


def loader_table(results: dict[str, list[float]]) -> list[str]:
    """Markdown table lines: median and range of tokens/s per loader variant."""
    lines = ["| loader variant | tokens/s (median) | range |", "|---|---|---|"]
    for name, values in results.items():
        lines.append(f"| {name} | {statistics.median(values):,.0f} | {min(values):,.0f}-{max(values):,.0f} |")
    return lines


def publish(lines: list[str], append: Path | None) -> None:
    """Print a markdown section and, when ``append`` is given, append it to that file."""
    text = "\n".join(lines) + "\n"
    print(text)
    if append:
        with open(append, "a", encoding="utf-8") as handle:
            handle.write(text)


def time_restore(config, after: int) -> float:
    """Seconds to build a pipeline from a state saved after ``after`` batches, and get one batch."""
    from jaxlm.data.pipeline import build_pipeline

    pipeline = build_pipeline(config)
    for _ in range(after):
        next(pipeline)
    state = json.loads(json.dumps(pipeline.get_state()))
    pipeline.close()
    start = time.perf_counter()
    resumed = build_pipeline(config, state=state)
    next(resumed)
    seconds = time.perf_counter() - start
    resumed.close()
    return seconds


def time_training(config, steps: int) -> tuple[float, float]:
    """(compile+first step seconds, median tokens/s) of the cpu-small train step on loader batches."""
    import jax

    from jaxlm.config import model_preset
    from jaxlm.data.pipeline import build_pipeline
    from jaxlm.optim import OptimizerConfig
    from jaxlm.sharding import make_mesh
    from jaxlm.train import Trainer

    model = model_preset("cpu-small", vocab_size=VOCAB, max_seq_len=config.seq_len)
    mesh = make_mesh()
    trainer = Trainer(model, OptimizerConfig(warmup_steps=1), total_steps=100, mesh=mesh)
    pipeline = build_pipeline(config)
    state = trainer.init_state(0)
    step = trainer.jit_step(pipeline.peek_shapes())
    times = []
    for i in range(steps + 1):
        batch = next(pipeline)
        batch.pop("source_ids")
        start = time.perf_counter()
        state, metrics = step(state, pipeline.to_global(batch, mesh))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
        time.sleep(0.5)  # let XLA's CPU workers go idle before the next timed step
    pipeline.close()
    tokens = config.batch_size * config.seq_len
    return times[0], tokens / statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--books", type=int, default=200)
    parser.add_argument("--posts", type=int, default=283_000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=3, help="0 skips the training-step measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--append", type=Path, help="append the results as a section of this markdown file")
    args = parser.parse_args()

    from jaxlm.data.pipeline import TagTransform

    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        root = Path(tmp)
        written = write_dataset(root, args.books, args.posts, args.seed)
        for name, s in written.items():
            print(
                f"{name}: {s['num_documents']:,} documents, {s['num_tokens']:,} tokens, "
                f"{s['bytes'] / 1e6:.1f} MB of shards, written in {s['write_s']:.1f} s"
            )
        mix = {"books": 0.9, "posts": 0.1}
        meda = TagTransform(tuple(round(0.1 * i, 1) for i in range(1, 10)), tuple((2 + i, 3 + i, 4 + i) for i in range(10)))
        variants = {
            "books 90% / posts 10% (defaults: prefetch 2, read threads 0)": (make_config(root, mix, args), None),
            "books 90% / posts 10%, no prefetch thread": (make_config(root, mix, args, prefetch=0), None),
            "books 90% / posts 10%, 2 read threads per source": (make_config(root, mix, args, read_threads=2), None),
            "books 90% / posts 10% + MEDA tags": (make_config(root, mix, args), meda),
            "posts only": (make_config(root, {"posts": 1.0}, args), None),
            "books only": (make_config(root, {"books": 1.0}, args), None),
        }

        def rate(variant) -> float:
            config, tag = variant
            return time_loader(config, args.batches, args.warmup, tag)

        results = interleaved_rates(variants, args.repeats, rate)
        restore_s = statistics.median(time_restore(variants[next(iter(variants))][0], 100) for _ in range(args.repeats))
        print(f"restore after 100 batches + first batch: {restore_s * 1000:.0f} ms")
        train = time_training(variants[next(iter(variants))][0], args.train_steps) if args.train_steps else None
        if train:
            print(f"cpu-small train step: first (compile) {train[0]:.1f} s, {train[1]:,.0f} tokens/s (median)")

    medians = {name: statistics.median(v) for name, v in results.items()}
    lines = [
        "",
        SECTION,
        "",
        "`jaxlm.data.pipeline` batches (grain per-source shuffle/repeat/decode + ConcatThenSplit packing,",
        "exact mixer, optional background prefetch) from synthetic ArrayRecord shards shaped like the study's",
        f"corpora: \"books\" {written['books']['num_documents']:,} documents / {written['books']['num_tokens'] / 1e6:.1f}M tokens "
        f"(~80k tokens each, like the Gutenberg sample), \"posts\" {written['posts']['num_documents']:,} documents / "
        f"{written['posts']['num_tokens'] / 1e6:.1f}M tokens (~35 each, like the /pol/ posts); uint16 ids, 8 shards per source.",
        f"`cpu-small` sequence length {args.seq_len}, global batch {args.batch}; {args.batches} batches per window after "
        f"{args.warmup} warm-up batches of a fresh pipeline; variants interleaved, {args.repeats} repeats, medians.",
        "Real-corpora throughput will be measured once `jaxlm data prepare` exists. See `tools/bench_loader.py`.",
        "",
        f"- command: `python tools/bench_loader.py --books {args.books} --posts {args.posts} --seq-len {args.seq_len} "
        f"--batch {args.batch} --batches {args.batches} --repeats {args.repeats} --train-steps {args.train_steps}"
        f"{' --append ' + str(args.append) if args.append else ''}`",
        f"- machine: 2-core CPU VM (load average at the end {os.getloadavg()[0]:.1f}), shared with other jobs",
        f"- date: {datetime.date(2026, 11, 23).isoformat()}",
        "",
        *loader_table(results),
        "",
        f"Restoring a pipeline from its saved state (after 100 batches) and producing the first batch: {restore_s * 1000:.0f} ms.",
        f"Writing the shards (`records.write_source`, synthetic ids, zstd): books {written['books']['num_tokens'] / written['books']['write_s'] / 1e6:.1f}M tokens/s, "
        f"posts {written['posts']['num_documents'] / written['posts']['write_s']:,.0f} documents/s.",
    ]
    if train:
        default = medians[next(iter(variants))]
        lines += [
            "",
            f"Training consumption, measured in the same run: the `cpu-small` train step (vocab {VOCAB}, batch {args.batch} x {args.seq_len}, "
            f"{args.train_steps} steps after compilation, 0.5 s idle before each) runs at **{train[1]:,.0f} tokens/s**; "
            f"the default loader is **{default / train[1]:,.0f}x** faster (posts only, the worst case: "
            f"{medians['posts only'] / train[1]:,.0f}x); the target is at least 10x.",
        ]
    publish(lines, args.append)


if __name__ == "__main__":
    main()
