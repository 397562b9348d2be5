"""``jaxlm rounds CONFIG [--out DIR]``: the escaping-collapse study, resumable.

For every seed, pretrains a base model on the addition task's curriculum, then runs every arm
(filter-only, random, hardest-first and boosting-weighted labels, each labelled arm at every
labeler accuracy beta) for ``rounds`` rounds of sample -> noisy filter -> weak labels -> SFT,
measures every model (test pass@1, training prompts solved, diversity, label budget on solved
prompts) and writes ``report.md`` with plots (``jaxlm.rounds``). Rerun the same command after a
kill: finished work is skipped and a killed training run resumes. ``--rounds N`` stops every
chain after round N; trailing ``key=value`` override the config.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jaxlm.cli import add_documented_parser


def run(args: argparse.Namespace) -> int:
    from jaxlm.rounds import RoundsInterrupted, RoundsStudy, load_rounds_config

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)
    config = load_rounds_config(args.config, args.overrides)
    out = args.out or f"runs/rounds-{config.name}"
    try:
        report = RoundsStudy(config, out, progress=not args.no_progress).run(max_rounds=args.rounds)
    except RoundsInterrupted as err:
        print(f"jaxlm rounds: {err}", file=sys.stderr)
        return 3
    print(f"report: {report}")
    return 0


def register(subparsers) -> None:
    parser = add_documented_parser(subparsers, "rounds", "escaping collapse: generate -> filter -> label -> retrain rounds",
                                   __doc__)
    parser.add_argument("config", help="rounds config YAML (experiments/configs/rounds-*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. seeds=[0] rounds=2")
    parser.add_argument("--out", help="study directory (default runs/rounds-<name>)")
    parser.add_argument("--rounds", type=int, help="stop every chain after this round (continue later)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)
