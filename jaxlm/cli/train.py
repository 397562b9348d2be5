"""``jaxlm train CONFIG --run-dir DIR``: train or resume a model."""

from __future__ import annotations

import argparse
import logging


def run(args: argparse.Namespace, objective: str | None = None) -> int:
    """Train with ``args``; ``objective`` (``jaxlm posttrain sft|dpo``) sets the config's objective,
    and a config naming another one is refused. Errors (a bad config, dataset or checkpoint, a
    full disk) propagate to ``jaxlm.cli.main``, which prints them as one line with exit code 2."""
    from jaxlm.config import ConfigError, read_yaml
    from jaxlm.loop import load_train_config, train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.steps is not None and args.steps <= 0:
        raise ConfigError(f"--steps: expected a positive number of steps, got {args.steps}")
    if args.stop_at is not None and args.stop_at <= 0:
        raise ConfigError(f"--stop-at: expected a positive step to stop at, got {args.stop_at}")
    overrides = list(args.overrides)
    if objective is not None:
        given = read_yaml(args.config).get("objective", objective)
        if given != objective:
            raise ConfigError(f"{args.config}: objective is {given!r}, but this is `jaxlm posttrain {objective}`")
        overrides.insert(0, f"objective={objective}")
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    config = load_train_config(args.config, overrides)
    result = train(
        config,
        args.run_dir,
        max_steps=args.stop_at,
        allow_config_change=args.override_config,
        show_progress=not args.no_progress,
    )
    print(f"stopped at step {result.step} ({result.stopped_by}); run directory: {args.run_dir}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training config YAML (see experiments/configs/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optimizer.lr=1e-3")
    parser.add_argument("--run-dir", required=True, help="run directory (created, or resumed if it exists)")
    parser.add_argument("--steps", type=int, help="total training steps (overrides the config's `steps`)")
    parser.add_argument("--stop-at", type=int, help="stop (with a checkpoint) at this step; resume later")
    parser.add_argument("--override-config", action="store_true", help="continue a run dir created with another config")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train or resume a model in a run directory")
    add_arguments(parser)
    parser.set_defaults(func=run)
