"""Checks of numeric command-line options, run before any model is loaded: a value that cannot
work becomes one ``OptionError`` line naming the option (``jaxlm generate: error: --batch-size:
expected an integer >= 1, got 0``) instead of a traceback from deep inside a run."""

from __future__ import annotations

import math

from jaxlm.errors import JaxlmError


class OptionError(JaxlmError):
    """A command-line option has a value that cannot work; the message names the option."""


def at_least(option: str, value: int | None, minimum: int) -> None:
    """``value`` (unless None, i.e. not given) is an integer >= ``minimum``."""
    if value is not None and value < minimum:
        raise OptionError(f"{option}: expected an integer >= {minimum}, got {value}")


def finite(option: str, value: float | None, minimum: float | None = None) -> None:
    """``value`` (unless None) is a finite number, and >= ``minimum`` when given."""
    if value is None:
        return
    if not math.isfinite(value):
        raise OptionError(f"{option}: expected a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise OptionError(f"{option}: expected a number >= {minimum:g}, got {value:g}")


def nucleus(option: str, value: float | None) -> None:
    """``value`` (unless None) is a top-p mass in (0, 1]."""
    if value is not None and not 0.0 < value <= 1.0:
        raise OptionError(f"{option}: expected a number in (0, 1] (1 = no nucleus filtering), got {value}")
