"""Look at prepared data: the manifest's per-source counts, each chain step's drops and the score
distributions (``inspect_dataset``, for a prepared dataset directory), and through a pipeline a
few decoded packed sequences and the realised vs target token share of each source over N
batches (``inspect_pipeline``). ``jaxlm data inspect`` prints either report. Every shard looked
at is checked against its sha256.
"""

from __future__ import annotations

import dataclasses
from typing import Any


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
        for key in ("toxicity", "held_out_from", "text_bytes", "chain", "scores"):
            if key in entry:
                item[key] = entry[key]
        summary[name] = item
    return summary


def inspect_dataset(dataset_dir: str) -> dict[str, Any]:
    """A prepared dataset's manifest summary (counts, drops, chain steps, score distributions and
    classifiers), every shard verified against its sha256."""
    from jaxlm.data import records

    manifest = records.read_manifest(dataset_dir)
    records.verify_dataset(manifest, checksums=True)
    return {
        "dataset": str(manifest.root),
        "manifest": {
            "tokenizer": str(manifest.tokenizer) if manifest.tokenizer else None,
            "vocab_size": next(iter(manifest.sources.values())).vocab_size,
            "sources": manifest_summary(manifest),
            "classifiers": manifest.data.get("classifiers", {}),
        },
    }


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
