"""Staged shard sets of one prepared source directory (the writing half of ``data/prepare``).

A source's shards are written by ``records.ShardWriter`` (each atomic) into a hidden
``.staging/`` folder and only renamed into place, ``shard-i-of-n``, when the whole prepare run
commits; ``CandidateSpool`` holds a source's encoded documents between the two passes of a
chain with whole-source steps (percentile selection, Perm(k)).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from jaxlm.data import records

MAX_SHARD_BYTES = 256 * 2**20  # a shard also ends after about this many bytes of tokens
STAGING_DIR = ".staging"  # shards being written, hidden inside the source directory
_STAGING_COUNT = 99999  # placeholder shard count in staging names (the real one is known at the end)
CANDIDATES_FILE = "candidates.records"  # the spool, inside the staging folder


def clear_staging(directory: Path) -> None:
    """Remove a source directory's staged shards (of this run, or left by a killed one)."""
    staging = directory / STAGING_DIR
    if staging.is_dir():
        for path in staging.iterdir():
            path.unlink()
        staging.rmdir()


def clear_source_dir(directory: Path) -> None:
    """Remove shards (finished, temporary or staged) of an earlier run from a source directory."""
    if not directory.is_dir():
        return
    clear_staging(directory)
    clear_source_dir_shards(directory)


def fsync_directory(directory: Path) -> None:
    """Make renames inside ``directory`` durable (best effort where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class RollingShards:
    """Consecutive shards of at most ``records_per_shard`` records (or ``MAX_SHARD_BYTES`` of
    tokens) for one source directory.

    The number of shards is known only at the end, and it is part of every shard's name:
    shards are written (by ``records.ShardWriter``, atomically) into a hidden staging
    directory; ``finish`` closes the last one, and ``commit`` (once every source of the run
    is finished) replaces the directory's old shards by them, renamed ``shard-i-of-n``. Until
    then the old shards stay as they are; ``abort`` deletes the staged ones only. An
    interrupted commit leaves an incomplete set, which ``records.shard_paths`` refuses.
    """

    def __init__(self, directory: Path, token_dtype: str, records_per_shard: int):
        self.directory = directory
        self.staging = directory / STAGING_DIR
        self.token_dtype = token_dtype
        self.records_per_shard = records_per_shard
        self.max_tokens = MAX_SHARD_BYTES // records.TOKEN_DTYPES[token_dtype].itemsize
        self.finished: list[records.ShardWriter] = []
        self.current: records.ShardWriter | None = None
        clear_staging(directory)

    def write(self, ids: np.ndarray, meta: dict[str, Any]) -> None:
        current = self.current
        if current is None or current.num_records >= self.records_per_shard or current.num_tokens >= self.max_tokens:
            current = self._next_shard()
        try:
            current.write(ids, meta)
        except OSError as err:  # a full disk: say which file could not be written
            raise naming(err, current.tmp_path) from err

    def _next_shard(self) -> records.ShardWriter:
        if self.current is not None:
            self._close_current()
        self.current = records.ShardWriter(
            self.staging, len(self.finished), _STAGING_COUNT, token_dtype=self.token_dtype
        )
        return self.current

    def _close_current(self) -> None:
        try:
            self.current.close()
        except OSError as err:
            raise naming(err, self.current.tmp_path) from err
        self.finished.append(self.current)

    @property
    def num_shards(self) -> int:
        return len(self.finished) + (self.current is not None)

    def finish(self) -> int:
        """Close the last staged shard; returns the number of shards."""
        if self.current is None and not self.finished:
            self._next_shard()  # no record at all: one empty shard keeps the set well-formed
        if self.current is not None:
            self._close_current()
            self.current = None
        return len(self.finished)

    def files(self) -> list[dict[str, Any]]:
        """The manifest's ``files`` of the finished shards, under their final names."""
        count = len(self.finished)
        return [
            {**writer.file.to_json(), "name": records.shard_name(i, count)} for i, writer in enumerate(self.finished)
        ]

    def commit(self) -> None:
        """Replace the directory's old shards by the finished ones."""
        count = len(self.finished)
        clear_source_dir_shards(self.directory)
        for index, writer in enumerate(self.finished):
            os.replace(writer.path, self.directory / records.shard_name(index, count))
        self.staging.rmdir()
        fsync_directory(self.directory)

    def abort(self) -> None:
        """Delete the staged shards; the directory's old shards stay."""
        if self.current is not None:
            self.current.abort()
            self.current = None
        clear_staging(self.directory)


def clear_source_dir_shards(directory: Path) -> None:
    """Remove the committed shards (and stray temporary shards) of a source directory."""
    for path in directory.iterdir():
        if path.is_file() and (records.SHARD_PATTERN.match(path.name) or path.name.startswith(".shard-")):
            path.unlink()


def naming(err: OSError, path: Path) -> OSError:
    """``err`` with ``path`` as its file name when it names none."""
    if err.filename is not None:
        return err
    return OSError(err.errno, err.strerror or str(err), str(path)) if err.errno else err




class CandidateSpool:
    """A source's encoded documents, appended to one file of its staging folder and read back
    in order: the first pass of a chain with whole-source steps writes every candidate here,
    the second pass (once the selection is known) copies the chosen ones into the shards.
    Create it after the source's ``RollingShards`` (which clears the staging folder); their
    ``abort`` deletes it too."""

    def __init__(self, directory: Path, token_dtype: str):
        staging = directory / STAGING_DIR
        staging.mkdir(parents=True, exist_ok=True)
        self.path = staging / CANDIDATES_FILE
        self.token_dtype = token_dtype
        self._file = open(self.path, "wb")
        self._sizes: list[int] = []

    def __len__(self) -> int:
        return len(self._sizes)

    def append(self, ids: np.ndarray, meta: dict[str, Any]) -> None:
        data = records.encode_record(ids, meta, token_dtype=self.token_dtype)
        try:
            self._file.write(data)
        except OSError as err:
            raise naming(err, self.path) from err
        self._sizes.append(len(data))

    def __iter__(self) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        """``(token ids, metadata)`` of every candidate, in the order appended."""
        self._file.close()
        with open(self.path, "rb") as stream:
            for size in self._sizes:
                yield records.decode_record(stream.read(size))

    def remove(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)
