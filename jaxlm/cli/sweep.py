"""``jaxlm sweep CONFIG [--out DIR]``: the whole study, resumable.

Prepares the corpora once, pretrains one model per toxic share x seed x design (plus the
MEDA/INST tagged baselines), probes every head, builds ITI, evaluates every model x method
(RTP, ToxiGen, CE/KL, BLiMP), optionally runs the toy experiment, and writes
``report.md`` with the reference study's claims checked. Rerun the same command after a
kill: finished work is skipped (``jaxlm.sweep.stages``). ``--stages`` runs a subset
(e.g. ``--stages report`` to redraw the report); trailing ``key=value`` override the config.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jaxlm.cli import add_documented_parser


def run(args: argparse.Namespace) -> int:
    from jaxlm.sweep import STAGES, Sweep, SweepInterrupted, load_sweep_config

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on every read-only checkpoint open
    stages = tuple(args.stages.split(",")) if args.stages else STAGES
    try:
        config = load_sweep_config(args.config, args.overrides)
        out = args.out or f"runs/sweep-{config.name}"
        report = Sweep(config, out, report_dir=args.report_dir, progress=not args.no_progress).run(stages)
    except SweepInterrupted as err:
        print(f"jaxlm sweep: {err}", file=sys.stderr)
        return 3
    if report is not None:
        print(f"report: {report}")
    return 0


def register(subparsers) -> None:
    parser = add_documented_parser(subparsers, "sweep", "the whole study: toxic-share sweep -> probes -> ITI -> evaluation -> report", __doc__)
    parser.add_argument("config", help="sweep config YAML (experiments/configs/sweep-*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. seeds=[0] eval.rtp_prompts=20")
    parser.add_argument("--out", help="sweep directory (default runs/sweep-<name>)")
    parser.add_argument("--report-dir", help="where report.md and the plots go (default: the sweep directory)")
    parser.add_argument("--stages", help="comma-separated subset of prepare,train,probe,iti,posttrain,eval,redteam,"
                                          "scorers,toy,report (jaxlm.sweep.stages.STAGES)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)
