"""Writing files so that a reader (or a rerun after a kill) never sees half of one.

Every write goes to a temporary sibling, is flushed to disk and then renamed over the target
(``os.replace`` is atomic on POSIX): the target holds either its old or its new contents. A
failed write (a full disk, an exception in the writer) leaves no temporary file behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable


def replace_atomically(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` fills a temporary sibling of ``path``, which then replaces ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, value: Any, *, indent: int | None = 1, sort_keys: bool = False) -> Path:
    return write_text(path, json.dumps(value, indent=indent, sort_keys=sort_keys, ensure_ascii=False, default=float) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    return write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
