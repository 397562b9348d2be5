"""Where jaxlm finds the shared corpora: the ``JAXLM_DATA_DIR`` setting."""

from __future__ import annotations

import os
from pathlib import Path

from jaxlm.errors import JaxlmError

DATA_DIR_ENV = "JAXLM_DATA_DIR"


class MissingDataError(JaxlmError, FileNotFoundError):
    """A dataset the caller asked for is not under the data directory."""


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The corpora root: ``override``, else ``$JAXLM_DATA_DIR``; it must exist."""
    raw = override if override is not None else os.environ.get(DATA_DIR_ENV)
    if not raw:
        raise MissingDataError(
            f"no data directory: set {DATA_DIR_ENV} to the folder holding the corpora "
            "(clean/, toxic/, labelled/, eval/), e.g. ../shared/data"
        )
    root = Path(raw).expanduser()
    if not root.is_dir():
        raise MissingDataError(f"{DATA_DIR_ENV}={raw!r} is not a directory")
    return root


def dataset_path(relative: str, override: str | os.PathLike | None = None) -> Path:
    """Path of one dataset below the data directory; raises if it is absent."""
    path = data_dir(override) / relative
    if not path.exists():
        raise MissingDataError(f"dataset {relative!r} not found under {path.parent} ({DATA_DIR_ENV})")
    return path
