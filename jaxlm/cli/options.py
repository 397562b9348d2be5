"""Checks of numeric command-line options, run before any model is loaded: a value that cannot
work becomes one ``OptionError`` line naming the option (``jaxlm generate: error: --batch-size:
expected an integer >= 1, got 0``) instead of a traceback from deep inside a run. Also the
``--mesh`` option of the commands that run a model (sharded inference, ``jaxlm.sharding``)."""

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


MESH_HELP = ("run the model sharded over this process's devices: data=N,fsdp=N,tensor=N (as in training's mesh "
             "section; an axis not named is 1, data the remaining devices unless another axis is -1)")


def add_mesh_argument(parser) -> None:
    """``--mesh data=N,fsdp=N,tensor=N``: load the model onto a device mesh (sharded inference)."""
    parser.add_argument("--mesh", help=MESH_HELP)


def mesh_config(option: str, value: str | None):
    """The ``jaxlm.config.MeshConfig`` that ``value`` (``data=2,fsdp=2,tensor=2``) names, None when not given."""
    if value is None:
        return None
    from jaxlm.config import ConfigError, MeshConfig
    from jaxlm.sharding import MESH_AXES

    sizes: dict[str, int] = {}
    for part in value.split(","):
        name, equals, size = (piece.strip() for piece in part.partition("="))
        if not equals or name not in MESH_AXES or name in sizes:
            raise OptionError(f"{option}: expected data=N,fsdp=N,tensor=N (each axis at most once), got {value!r}")
        try:
            sizes[name] = int(size)
        except ValueError:
            raise OptionError(f"{option}: {name}: expected an integer, got {size!r}") from None
    sizes.setdefault("data", 1 if -1 in sizes.values() else -1)
    try:
        return MeshConfig(**sizes)
    except ConfigError as err:
        raise OptionError(f"{option}: {err}") from None


def mesh(option: str, value: str | None):
    """The ``jax.sharding.Mesh`` over this process's devices that ``value`` names, None when not given."""
    config = mesh_config(option, value)
    if config is None:
        return None
    import jax

    from jaxlm.config import ConfigError
    from jaxlm.sharding import make_mesh

    try:
        return make_mesh(config, jax.local_devices())
    except ConfigError as err:
        raise OptionError(f"{option}: {err}") from None
