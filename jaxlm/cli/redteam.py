"""``jaxlm redteam --checkpoint DIR [--intervention FILE --scale S] --out DIR``: GCG attacks.

Builds --pairs prompt/target pairs from RTP's challenging prompts (continuations with
Perspective toxicity >= 0.5, red-teaming part of RTP only: see jaxlm.evaluate.redteam),
optimises a GCG suffix per pair (Zou et al. 2023) against the model, with the intervention
when one is given, and writes DIR/attacks.jsonl (one row per attack; a rerun with the same
settings continues where it stopped) and DIR/summary.json (success rate with a Wilson 95%
interval, mean steps to success, mean continuation toxicity). An attack succeeds when the
greedy continuation of prompt + suffix starts with the target.

Trailing key=value overrides set jaxlm.evaluate.redteam.RedteamConfig fields, e.g.
gcg.steps=100 gcg.candidates=256 target_tokens=6 scorer=profanity-check.
"""

from __future__ import annotations

import argparse
import dataclasses

from jaxlm.cli import add_documented_parser


def check_options(args: argparse.Namespace) -> None:
    """Refuse option values that cannot work, naming the option, before the model is loaded."""
    from jaxlm.cli import options
    from jaxlm.cli.steer import intervention_options

    options.at_least("--pairs", args.pairs, 1)
    intervention_options(args)


def load_config(args: argparse.Namespace):
    """The ``RedteamConfig`` of the overrides, with --pairs and --seed applied."""
    from jaxlm.config import load
    from jaxlm.evaluate.redteam import RedteamConfig

    config = load(RedteamConfig, None, args.overrides)
    changes = {name: getattr(args, name) for name in ("pairs", "seed") if getattr(args, name) is not None}
    return dataclasses.replace(config, **changes)


def run(args: argparse.Namespace) -> int:
    from jaxlm.checkpoint import CheckpointError, load_model
    from jaxlm.cli.steer import intervention_options
    from jaxlm.evaluate.redteam import attack_pairs, pair_settings, run_attacks

    check_options(args)
    config = load_config(args)
    loaded = load_model(args.checkpoint)
    if loaded.tokenizer is None:
        raise CheckpointError(f"{args.checkpoint}: no tokenizer.json next to the checkpoint")
    pairs = attack_pairs(args.data_dir, loaded.tokenizer, config.pairs, config.seed, prompt_tokens=config.prompt_tokens,
                         target_tokens=config.target_tokens, min_toxicity=config.min_toxicity)
    path, scale = intervention_options(args)
    summary = run_attacks(
        loaded, pairs, config.gcg, intervention=path, scale=scale, scorer=config.scorer, out_dir=args.out,
        continuation_tokens=config.continuation_tokens, progress=not args.no_progress,
        pairs_info=pair_settings(args.data_dir, config),
    )
    low, high = summary["success_rate_ci95"]
    steps = summary["mean_steps_to_success"]
    against = "no intervention" if path is None else f"{path} at scale {summary['settings']['scale']:g}"
    print(
        f"redteam ({against}): {summary['successes']}/{summary['n']} attacks succeeded, "
        f"success rate {summary['success_rate']:.1%} (95% CI {low:.1%}-{high:.1%}); "
        f"mean steps to success {'-' if steps is None else f'{steps:.1f}'}, "
        f"mean continuation toxicity {summary['mean_continuation_toxicity']:.3f}: {args.out}/summary.json"
    )
    return 0


def register(subparsers) -> None:
    from jaxlm.cli.steer import add_intervention_arguments

    parser = add_documented_parser(
        subparsers, "redteam", "GCG attacks on RTP prompt/target pairs: success rate with or without an intervention",
        __doc__,
    )
    parser.add_argument("--checkpoint", required=True, help="run directory, checkpoints/<step> dir or HF checkpoint dir (jaxlm.hf families)")
    add_intervention_arguments(parser)
    parser.add_argument("--out", required=True, help="output directory (attacks.jsonl, summary.json)")
    parser.add_argument("--pairs", type=int, help="number of prompt/target pairs (default 100)")
    parser.add_argument("--seed", type=int, help="seed of the pair selection (default 0)")
    parser.add_argument("--data-dir", help="corpora root (default: $JAXLM_DATA_DIR)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="RedteamConfig overrides key=value, e.g. gcg.steps=100")
    parser.set_defaults(func=run)
