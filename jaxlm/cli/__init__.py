"""The ``jaxlm`` command line: one module per subcommand, imported lazily.

Each subcommand module defines ``register(subparsers)``, which adds its parser and
sets ``func`` (called with the parsed namespace, returns an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules under jaxlm.cli, in the order `jaxlm --help` lists them.
SUBCOMMAND_MODULES = ("info", "data", "train", "probe", "iti", "generate", "eval", "toy", "sweep")


def add_documented_parser(subparsers, name: str, summary: str, doc: str) -> argparse.ArgumentParser:
    """A subcommand parser listed with ``summary``, whose ``--help`` shows ``doc`` (its module
    docstring) with the line breaks kept."""
    return subparsers.add_parser(name, help=summary, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxlm",
        description="JAX/Flax training and intervention stack (pretraining data -> probes -> ITI -> evaluation).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f"jaxlm.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
