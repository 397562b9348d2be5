"""``jaxlm train CONFIG --run-dir DIR``: train or resume a model."""

from __future__ import annotations

import argparse
import logging


def run(args: argparse.Namespace) -> int:
    """Errors (a bad config, dataset or checkpoint, a full disk) propagate to ``jaxlm.cli.main``,
    which prints them as one line with exit code 2."""
    from jaxlm.config import ConfigError
    from jaxlm.loop import load_train_config, train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.steps is not None and args.steps <= 0:
        raise ConfigError(f"--steps: expected a positive number of steps, got {args.steps}")
    if args.stop_at is not None and args.stop_at <= 0:
        raise ConfigError(f"--stop-at: expected a positive step to stop at, got {args.stop_at}")
    overrides = list(args.overrides)
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


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train or resume a model in a run directory")
    parser.add_argument("config", help="training config YAML (see experiments/configs/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optimizer.lr=1e-3")
    parser.add_argument("--run-dir", required=True, help="run directory (created, or resumed if it exists)")
    parser.add_argument("--steps", type=int, help="total training steps (overrides the config's `steps`)")
    parser.add_argument("--stop-at", type=int, help="stop (with a checkpoint) at this step; resume later")
    parser.add_argument("--override-config", action="store_true", help="continue a run dir created with another config")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
