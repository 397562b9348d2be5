"""``jaxlm train CONFIG --run-dir DIR``: train or resume a model."""

from __future__ import annotations

import argparse
import logging
import sys


def run(args: argparse.Namespace) -> int:
    from jaxlm.config import ConfigError
    from jaxlm.loop import ConfigMismatchError, NonFiniteLossError, load_train_config, train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    try:
        config = load_train_config(args.config, overrides)
        result = train(
            config,
            args.run_dir,
            max_steps=args.stop_at,
            allow_config_change=args.override_config,
            show_progress=not args.no_progress,
        )
    except (ConfigError, ConfigMismatchError, NonFiniteLossError, FileNotFoundError) as err:
        print(f"jaxlm train: error: {err}", file=sys.stderr)
        return 2
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
