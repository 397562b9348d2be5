"""``jaxlm toy [--quick] --out DIR``: the toy superposition experiment (data share vs entanglement).

Trains shares x seeds tiny jaxlm transformers (d_model 4, 4 layers) on 3 cyclic Markov
chains, one of them underrepresented, measures feature directions from the residual
stream and their entanglement, and writes ``DIR/toy_results.json`` (per share: mean
entanglement of the underrepresented and control features with 95% CIs, their paired
difference with a 95% CI and p-values; every method x layer x C x checkpoint in ``grid``)
and ``DIR/toy_entanglement.png``. ``--config`` takes a YAML ``ToyConfig``
(experiments/toy/configs/); trailing ``key=value`` arguments override it.
"""

from __future__ import annotations

import argparse

from jaxlm.cli import add_documented_parser


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from jaxlm.toy import load_toy_config, quick_config, results_table, run_study, write_results

    config = load_toy_config(args.config, args.overrides)
    if args.quick:
        config = quick_config(config)
    changes = {}
    if args.seeds is not None:
        changes["seeds"] = args.seeds
    if args.shares:
        changes["shares"] = tuple(args.shares)
    if args.steps is not None:
        changes["steps"] = args.steps
        changes["checkpoints"] = tuple(s for s in config.checkpoints if s < args.steps)
    config = dataclasses.replace(config, **changes)

    print(
        f"toy: {len(config.shares)} shares x {config.seeds} seeds, {config.steps} steps, "
        f"{config.model.n_layers} layers x d_model {config.model.d_model}, {config.model.n_heads} heads, "
        f"MLP {config.model.mlp_hidden}, {config.model.position_embedding} positions"
    )
    results = run_study(config, progress=not args.no_progress)
    path = write_results(results, args.out)
    prim = results["primary"]
    print(f"primary: {prim['method']} directions, layer {prim['layer']}, C {prim['C']}, step {prim['step']}")
    print(results_table(results))
    v = results["verdict"]
    print(
        f"random directions {results['random_level']['mean']:.3f}, Welch bound {results['welch_bound']:.3f}; "
        f"gap at share {v['lowest_share']:g}: {v['gap_at_lowest_share']:+.3f} (p {v['p_at_lowest_share']}); "
        f"reproduced at p<{v['alpha']}: {v['reproduced']}"
    )
    print(f"wrote {path} and {path.parent / 'toy_entanglement.png'}")
    return 0


def register(subparsers) -> None:
    parser = add_documented_parser(
        subparsers, "toy", "toy superposition experiment: an underrepresented feature's share vs its entanglement", __doc__
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--quick", action="store_true", help="small demo sweep (3 shares x 5 seeds, 1,000 steps, about a minute)")
    parser.add_argument("--config", help="YAML ToyConfig (e.g. experiments/toy/configs/default.yaml)")
    parser.add_argument("--seeds", type=int, help="seeds per share")
    parser.add_argument("--shares", type=float, nargs="+", help="rare chain's weight relative to a control chain")
    parser.add_argument("--steps", type=int, help="training steps")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. model.n_heads=1")
    parser.set_defaults(func=run)
