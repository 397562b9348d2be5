"""The ``jaxlm`` command line: one module per subcommand, imported lazily.

Each subcommand module defines ``register(subparsers)``, which adds its parser and
sets ``func`` (called with the parsed namespace, returns an exit code).

Errors: a ``JaxlmError`` (bad input, damaged artefact) or an ``OSError`` (missing file, full
disk) raised by a subcommand becomes one line ``jaxlm SUBCOMMAND: error: ...`` on stderr and
exit code 2; ``--debug`` (or ``JAXLM_DEBUG=1``) lets the traceback through instead.

Overrides: a subcommand with an ``overrides`` positional accepts ``key.sub=value`` anywhere on
its command line, before or after its options.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

DEBUG_ENV = "JAXLM_DEBUG"

# Subcommand modules under jaxlm.cli, in the order `jaxlm --help` lists them.
SUBCOMMAND_MODULES = ("info", "data", "train", "posttrain", "probe", "iti", "steer", "generate", "eval", "redteam", "export",
                      "average", "toy", "sweep", "rounds")


def add_documented_parser(subparsers, name: str, summary: str, doc: str) -> argparse.ArgumentParser:
    """A subcommand parser listed with ``summary``, whose ``--help`` shows ``doc`` (its module
    docstring) with the line breaks kept."""
    return subparsers.add_parser(name, help=summary, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxlm",
        description="JAX/Flax training and intervention stack (pretraining data -> probes -> ITI -> evaluation).",
    )
    parser.add_argument(
        "--debug", action="store_true", help=f"show the Python traceback of an error (also: {DEBUG_ENV}=1)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f"jaxlm.cli.{name}").register(subparsers)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` words after a subcommand's options join its overrides, and
``--debug`` may follow the subcommand too."""
    args, extra = parser.parse_known_args(argv)
    leftover = []
    for word in extra:
        if word == "--debug":
            args.debug = True
        elif hasattr(args, "overrides") and "=" in word and not word.startswith("-"):
            args.overrides.append(word)
        else:
            leftover.append(word)
    if leftover:
        parser.error(f"unrecognized arguments: {' '.join(leftover)}")
    return args


def error_line(command: str, err: Exception) -> str:
    """The one line a user sees for ``err``."""
    from jaxlm.errors import JaxlmError, describe_os_error

    message = describe_os_error(err) if isinstance(err, OSError) and not isinstance(err, JaxlmError) else str(err)
    return f"jaxlm {command}: error: {message}"


def main(argv: list[str] | None = None) -> int:
    from jaxlm.errors import JaxlmError

    args = parse(build_parser(), argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except (JaxlmError, OSError) as err:
        if debug:
            raise
        print(error_line(getattr(args, "command_name", args.command), err), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
