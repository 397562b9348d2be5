"""A recipe source's inputs: its paths resolved against the data directory, its input files
fingerprinted, and its documents read (with ``max_documents`` and the held-out split).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from jaxlm.data import DataError, records, sources
from jaxlm.data.recipe import READERS, SourceRecipe
from jaxlm.data.sources import Document, ReadOptions, ReadStats


def _resolve_path(raw: str, root: Callable[[], Path]) -> str:
    expanded = os.path.expanduser(raw)
    return expanded if os.path.isabs(expanded) else os.fspath(root() / expanded)


@dataclasses.dataclass(frozen=True)
class SourceInputs:
    """A source's reader call (resolved) and its input files."""

    name: str
    recipe: SourceRecipe
    kwargs: dict[str, Any]  # reader keyword arguments, paths resolved (without source/options/stats)
    files: tuple[Path, ...]
    root: Path | None  # data directory, when the paths were relative to it


def resolve_source(name: str, source: SourceRecipe, data_root: Callable[[], Path]) -> SourceInputs:
    """Resolve paths against the data directory and list (and check) every input file
    (``name``: a recipe source, or ``classifiers.<name>.positive`` for a classifier's documents)."""
    where = name if name.startswith("classifiers.") else f"sources.{name}"
    spec = READERS[source.reader]
    kwargs = dict(source.args)
    used_root: Path | None = None
    if spec.path_arg is not None:
        if any(not os.path.isabs(os.path.expanduser(p)) for p in source.paths):
            used_root = data_root()
        paths = [_resolve_path(p, data_root) for p in source.paths]
        kwargs[spec.path_arg] = paths
        try:
            files = tuple(path for path, _ in sources.resolve_inputs(paths, suffixes=spec.suffixes))
        except DataError as err:
            raise DataError(f"{where}.paths: {err}") from None
    else:  # TFDS: the prepared dataset's files below its data directory
        if kwargs.get("data_dir") is not None:
            kwargs["data_dir"] = _resolve_path(str(kwargs["data_dir"]), data_root)
        files = _tfds_files(kwargs["name"], kwargs.get("data_dir"))
    unreadable = [f for f in files if not os.access(f, os.R_OK)]
    if unreadable:
        raise DataError(f"{where}: {unreadable[0]}: not readable (permission denied)")
    return SourceInputs(name, source, kwargs, files, used_root)


def _tfds_files(name: str, data_dir: str | None) -> tuple[Path, ...]:
    """Files of a prepared TFDS dataset (``name`` like ``c4/en`` or ``c4/en:3.0.1``); empty when
    the directory is absent (the reader then reports the dataset as missing)."""
    base, _, version = name.partition(":")
    root = Path(data_dir) if data_dir is not None else Path(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()
    folder = root.joinpath(*base.split("/"))
    if version:
        folder = folder / version
    if not folder.is_dir():
        return ()
    return tuple(sorted(p for p in folder.rglob("*") if p.is_file()))


def input_fingerprints(inputs: SourceInputs, how: str) -> list[dict[str, Any]]:
    """Per input file: path (relative to the data directory when below it), size, and mtime or sha256."""
    entries = []
    for path in inputs.files:
        shown = path
        if inputs.root is not None:
            with contextlib.suppress(ValueError):
                shown = path.relative_to(inputs.root)
        stat = path.stat()
        entry: dict[str, Any] = {"path": shown.as_posix(), "size": stat.st_size}
        if how == "sha256":
            entry["sha256"] = records.file_sha256(path)
        else:
            entry["mtime_ns"] = stat.st_mtime_ns
        entries.append(entry)
    return entries


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def read_documents(inputs: SourceInputs, options: ReadOptions, stats: ReadStats | None) -> Iterator[Document]:
    """The source's documents (at most ``max_documents``)."""
    spec = READERS[inputs.recipe.reader]
    documents = spec.function(**inputs.kwargs, source=inputs.name, options=options, stats=stats)
    if inputs.recipe.max_documents is not None:
        documents = itertools.islice(documents, inputs.recipe.max_documents)
    return documents


def held_out_flags(documents: Iterable[Document], fraction: float) -> Iterator[tuple[Document, bool]]:
    """``(document, held_out)``: document ``i`` (0-based, split parts counted once) is held out
    when ``floor((i+1) f + 1/2) > floor(i f + 1/2)``, so ``round(n f)`` of the first ``n`` are."""
    index = -1
    held = False
    for document in documents:
        if document.meta.get("part", 0) == 0:  # a new document (not a continuation part)
            index += 1
            held = fraction > 0 and math.floor((index + 1) * fraction + 0.5) > math.floor(index * fraction + 0.5)
        yield document, held
