"""``jaxlm probe --checkpoint DIR --data SPEC --out DIR``: per-head probes on a model's head activations.

Writes into ``--out``: ``activations.npy`` ([N, L, H, D] float32, streamed), ``labels.npy``,
``probe_report.json`` (``accuracy`` as an L x H list, ``auc``, ``ranking``, ...),
``probe_heatmap.png`` and ``probe_weights.npz`` (for building ITI interventions).
``--mesh data=2,fsdp=2,tensor=2`` collects the activations with the model sharded over the devices.
"""

from __future__ import annotations

import argparse

from jaxlm.cli import add_documented_parser

DATA_HELP = (
    "labelled set: toxigen | davidson | rtp, with options NAME[:key=value]..., e.g. "
    "'davidson:limit=4000:balanced:seed=1' (keys: limit, balanced, seed; toxigen groups=a+b; "
    "davidson toxic_classes=0+1; rtp toxic=0.5, nontoxic=0.2, parts=prompt+continuation)"
)


def check_options(args: argparse.Namespace) -> None:
    """Refuse option values that cannot work, naming the option, before the model is loaded."""
    from jaxlm.cli import options

    options.at_least("--batch-size", args.batch_size, 1)
    options.at_least("--max-len", args.max_len, 1)
    options.at_least("--limit", args.limit, 1)
    options.at_least("--folds", args.folds, 1)
    options.finite("--C", args.C)
    options.mesh_config("--mesh", args.mesh)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from jaxlm.checkpoint import CheckpointError, load_model
    from jaxlm.cli import options
    from jaxlm.data.labelled import load_labelled, parse_data_spec
    from jaxlm import ops
    from jaxlm.probe import ProbeConfig

    check_options(args)
    out = Path(args.out)
    spec = parse_data_spec(args.data)
    seed = args.seed if args.seed is not None else spec.seed
    probe_config = ProbeConfig(C=args.C, folds=args.folds, seed=seed, standardize=args.standardize)
    data = load_labelled(spec, args.data_dir, limit=args.limit, seed=seed)
    model = load_model(args.checkpoint, mesh=options.mesh("--mesh", args.mesh))
    if model.tokenizer is None:
        raise CheckpointError(f"{args.checkpoint}: no tokenizer.json next to the checkpoint")
    counts = data.class_counts()
    print(f"data {data.name}: {len(data)} texts ({counts[1]} positive, {counts[0]} negative)")

    out.mkdir(parents=True, exist_ok=True)
    _, result = ops.probe_heads(model, data, probe_config, batch_size=args.batch_size, max_len=args.max_len,
                                position=args.position, out_path=out / "activations.npy", progress=not args.no_progress)
    np.save(out / "labels.npy", data.labels)
    metadata = {
        "checkpoint": str(args.checkpoint),
        "step": model.step,
        "data": data.name,
        "class_counts": counts,
        "position": args.position,
        "max_len": args.max_len,
        "activations": "activations.npy",
        "labels": "labels.npy",
    }
    result.save_report(out, title=f"{Path(args.checkpoint).name}: {data.name}", metadata=metadata)
    top = ", ".join(f"L{layer}H{head} {result.accuracy[layer, head]:.3f}" for layer, head in result.top_heads(5))
    print(
        f"probes: mean accuracy {result.accuracy.mean():.3f}, max {result.accuracy.max():.3f} "
        f"(n_train {result.n_train}, n_val {result.n_val}); top heads: {top}"
    )
    print(f"wrote {out}")
    return 0


def register(subparsers) -> None:
    from jaxlm.cli.options import add_mesh_argument

    parser = add_documented_parser(
        subparsers, "probe", "fit a linear probe per attention head on labelled texts and rank the heads", __doc__
    )
    parser.add_argument("--checkpoint", required=True, help="run directory, checkpoints/<step> dir or HF checkpoint dir (jaxlm.hf families)")
    parser.add_argument("--data", required=True, help=DATA_HELP)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--data-dir", help="corpora root (default: $JAXLM_DATA_DIR)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=128, help="tokens kept per text (from the start)")
    parser.add_argument("--limit", type=int, help="number of texts (overrides the spec's limit)")
    parser.add_argument("--seed", type=int, help="sampling and split seed (default: the spec's, else 0)")
    parser.add_argument("--position", choices=("last", "mean"), default="last", help="token position per text")
    parser.add_argument("--C", type=float, default=1.0, help="inverse L2 strength (scikit-learn convention)")
    parser.add_argument("--folds", type=int, default=1, help="1: one 4:1 split; k >= 2: stratified k-fold")
    parser.add_argument("--standardize", action="store_true", help="penalise standardised weights")
    add_mesh_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
