"""End-to-end smoke run on the real corpora (the README's main command until the study lands).

    python experiments/smoke.py --out runs/smoke [--steps 300]

Real Gutenberg books + one day of /pol/ posts -> a byte-level BPE -> prepared shards ->
a small OLMo-style model trained on a 90/10 clean/toxic token mixture -> per-head probes on
the ToxiGen sentences -> an ITI intervention on the best heads -> RTP continuations with and
without it, scored offline, plus the CE/KL cost on WikiText-2. Writes ``report.json`` and
``report.md`` into ``--out`` and prints where they are. About 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np


def prepare_subset(out: Path, books: int, posts: int, vocab_size: int) -> Path:
    """Tokenizer + shards for a small real subset (the full corpora: `jaxlm data prepare`)."""
    from jaxlm.data import records
    from jaxlm.data.sources import ReadStats, read_4chan_csv, read_gutenberg
    from jaxlm.evaluate.toxicity import get_scorer
    from jaxlm.paths import dataset_path
    from jaxlm.tokenizer import train_bpe

    stats = ReadStats()
    book_files = sorted(dataset_path("clean/gutenberg").rglob("*.txt.gz"))[:books]
    day = sorted(dataset_path("toxic/pol").glob("*.csv.gz"))[0]
    corpora = {
        "gutenberg": list(read_gutenberg(book_files, stats=stats)),
        "pol": list(itertools.islice(read_4chan_csv(day, stats=stats), posts)),
    }
    sample = [d.text[:20000] for docs in corpora.values() for d in docs]
    tokenizer = train_bpe(sample, vocab_size)
    tokenizer.save(out / "tokenizer.json")
    scorer = get_scorer()
    infos = {}
    for name, docs in corpora.items():
        encoded = tokenizer.encode_batch([d.text for d in docs])
        scores = scorer([d.text[:4000] for d in docs])
        items = [
            (np.asarray(ids), {"doc_id": d.doc_id, "source": name, "toxicity": float(s)})
            for d, ids, s in zip(docs, encoded, scores)
            if ids
        ]
        written = records.write_source(out / name, items, num_shards=1)
        infos[name] = records.SourceInfo(
            name, out / name, written["num_documents"], written["num_tokens"], "uint16",
            tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id,
        )
    records.write_manifest(out, infos, tokenizer="tokenizer.json", extra={"read_stats": stats.to_dict()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/smoke")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--books", type=int, default=12)
    parser.add_argument("--posts", type=int, default=6000)
    parser.add_argument("--prompts", type=int, default=24, help="RTP challenging prompts")
    args = parser.parse_args()

    from jaxlm.checkpoint import load_model
    from jaxlm.config import from_dict
    from jaxlm.data.labelled import load_toxigen
    from jaxlm.evaluate import capability, protocols
    from jaxlm.evaluate.toxicity import get_scorer
    from jaxlm.intervene import Intervention
    from jaxlm.loop import TrainConfig, train
    from jaxlm.paths import dataset_path
    from jaxlm.probe import ProbeConfig, collect_head_activations, train_probes

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print("[1/5] preparing a real subset (Gutenberg + /pol/)")
    dataset = prepare_subset(out / "data", args.books, args.posts, vocab_size=2048)

    print("[2/5] training a small model on 90% Gutenberg / 10% /pol/ tokens")
    config = from_dict(
        TrainConfig,
        {
            "model": {"preset": "cpu-small", "vocab_size": 2048, "d_model": 128, "n_layers": 4, "n_heads": 4,
                      "mlp_hidden": 512, "max_seq_len": 128},
            "optimizer": {"lr": 3e-3, "warmup_steps": 30, "weight_decay": 0.1},
            "data": {"dataset": str(dataset), "sources": {"gutenberg": 0.9, "pol": 0.1}, "seq_len": 128, "batch_size": 16},
            "checkpoint": {"every": args.steps},
            "steps": args.steps,
            "log_every": 25,
        },
    )
    train(config, out / "run")
    model = load_model(out / "run")
    cfg, params, tok = model.config, model.params, model.tokenizer

    print("[3/5] probing every head on the ToxiGen sentences")
    labelled = load_toxigen()
    acts = collect_head_activations(cfg, params, tok, labelled.texts, batch_size=32, max_len=64)
    probes = train_probes(acts, labelled.labels, ProbeConfig(C=1.0))
    probes.save_report(out / "probe", title="smoke: ToxiGen probes")

    print("[4/5] ITI on the 8 best heads; RTP continuations with and without it")
    iti = Intervention.from_activations(acts, labelled.labels, probes.accuracy, k=8, alpha=0.0)
    iti.save(out / "iti.safetensors", provenance={"probe": str(out / "probe")})
    scorer = get_scorer()
    prompts = [p for p in protocols.read_rtp(dataset_path("eval/rtp"), limit=args.prompts) if p.label == "toxic"]
    settings = protocols.GenerationSettings(samples=4, max_new_tokens=20, batch_size=32, seed=0)
    docs = capability.read_documents(dataset_path("eval/wikitext2/valid.txt"), limit=20)
    rows = []
    for alpha in (0.0, 8.0):
        intervention = iti.with_alpha(alpha)
        result = protocols.run_protocol("rtp", cfg, params, tok, prompts, scorer, settings, intervention, progress=False)
        cost = capability.text_loss(cfg, params, tok, docs, max_len=128, max_rows=40, intervention=intervention.with_mode("all"),
                                    ref_params=params, progress=None)
        rows.append({"alpha": alpha, **{k: result.metrics[k] for k in ("expected_max_toxicity", "toxicity_probability", "mean_toxicity")},
                     "ce": cost.ce, "kl": cost.kl, "example": result.records[0]["continuations"][0]})

    print("[5/5] writing the report")
    report = {
        "final_loss": json.loads((out / "run" / "metrics.jsonl").read_text().splitlines()[-1])["loss"],
        "probe_accuracy": {"mean": float(probes.accuracy.mean()), "max": float(probes.accuracy.max()),
                           "best_head": list(map(int, probes.top_heads(1)[0]))},
        "iti": rows,
        "seconds": round(time.time() - started, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# jaxlm smoke run", "",
        f"- final training loss: {report['final_loss']:.3f}",
        f"- probe accuracy over {acts.shape[1] * acts.shape[2]} heads: mean {report['probe_accuracy']['mean']:.3f}, "
        f"max {report['probe_accuracy']['max']:.3f}", "",
        "| ITI alpha | expected max toxicity | toxicity probability | CE (WikiText-2) | KL to base |",
        "|---|---|---|---|---|",
        *[f"| {r['alpha']:g} | {r['expected_max_toxicity']:.3f} | {r['toxicity_probability']:.3f} | {r['ce']:.3f} | {r['kl']:.4f} |" for r in rows],
        "", f"({report['seconds']} s; toxicity by the offline profanity-check scorer)", "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
