"""``jaxlm iti --probe-dir DIR --out FILE``: build an ITI intervention from `jaxlm probe` output."""

from __future__ import annotations

import argparse
from pathlib import Path


def build(probe_dir: Path, k: int, alpha: float, direction: str, position_mode: str, seed: int):
    """The intervention for the ``k`` most accurate heads of a probe run (activations + labels + report)."""
    from jaxlm import ops
    from jaxlm.intervene import InterventionError
    from jaxlm.probe import load_probe_run

    result, acts, labels = load_probe_run(probe_dir)
    try:
        return ops.build("iti", acts, labels, result, k=k, scale=alpha, positions=position_mode, direction=direction,
                         wanted_label=0, seed=seed)
    except InterventionError as err:
        raise InterventionError(f"{probe_dir}: {err}") from None


def run(args: argparse.Namespace) -> int:
    from jaxlm.cli import options

    options.finite("--alpha", args.alpha)
    options.at_least("--k", args.k, 1)
    probe_dir = Path(args.probe_dir)
    intervention = build(probe_dir, args.k, args.alpha, args.direction, args.position_mode, args.seed)
    provenance = {"probe_dir": str(probe_dir), "direction": args.direction, "k": args.k, "seed": args.seed}
    path = intervention.save(args.out, provenance=provenance)
    print(f"ITI on {intervention.k} heads, alpha {float(intervention.alpha)}, mode {intervention.position_mode}: {path}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("iti", help="build an ITI intervention file from `jaxlm probe` output")
    parser.add_argument("--probe-dir", required=True, help="output directory of `jaxlm probe`")
    parser.add_argument("--out", required=True, help="intervention file to write (.safetensors + .json sidecar)")
    parser.add_argument("--k", type=int, default=30, help="number of heads (top K by probe accuracy)")
    parser.add_argument("--alpha", type=float, default=8.0, help="strength in units of sigma")
    parser.add_argument("--direction", default="mass_mean", choices=("mass_mean", "probe", "random"))
    parser.add_argument("--position-mode", default="last", choices=("last", "all", "generated"))
    parser.add_argument("--seed", type=int, default=0, help="seed for random directions (ablation)")
    parser.set_defaults(func=run)
