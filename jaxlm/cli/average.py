"""``jaxlm average RUN_DIR --last K | --steps 100,200 [--weights 1,2] --out DIR``: average checkpoints.

Writes the weighted mean of the parameters of a training run's newest ``K`` checkpoints (or
of the listed steps) as a run directory of its own, which every command taking
``--checkpoint`` reads (and ``init_from``): the source run's config and tokenizer, one
sealed checkpoint numbered like the newest averaged step, and ``average.json`` (source run,
steps, normalised weights, each input's parameter sha256). ``--weights`` gives one
non-negative weight per averaged checkpoint, in the order of ``--steps`` (with ``--last``:
oldest first); they are normalised to sum to 1 (default: equal weights). See ``jaxlm.average``.
"""

from __future__ import annotations

import argparse


def parse_numbers(option: str, text: str | None, kind: type) -> list | None:
    """A comma-separated list of numbers (None when the option was not given)."""
    from jaxlm.cli.options import OptionError

    if text is None:
        return None
    try:
        return [kind(item) for item in text.split(",")]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise OptionError(f"{option}: expected comma-separated {what} (e.g. 1,2), got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from jaxlm.average import average_run

    steps = parse_numbers("--steps", args.steps, int)
    weights = parse_numbers("--weights", args.weights, float)
    out = average_run(args.run_dir, args.out, last=args.last, steps=steps, weights=weights)
    print(f"averaged the checkpoints of {args.run_dir} into {out} (see {out / 'average.json'})")
    return 0


def register(subparsers) -> None:
    from jaxlm.cli import add_documented_parser

    parser = add_documented_parser(subparsers, "average", "average the parameters of a run's checkpoints", __doc__)
    parser.add_argument("run_dir", help="training run directory (config.yaml and checkpoints/)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--last", type=int, help="average the newest K checkpoints")
    which.add_argument("--steps", help="comma-separated checkpoint steps to average, e.g. 100,200")
    parser.add_argument("--weights", help="comma-separated weights, one per checkpoint (--steps order; --last: oldest first)")
    parser.add_argument("--out", required=True, help="output run directory (new, or empty)")
    parser.set_defaults(func=run)
