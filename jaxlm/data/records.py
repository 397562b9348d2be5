"""On-disk format of prepared data: ArrayRecord shards of tokenized documents plus a manifest.

A prepared dataset is a directory::

    manifest.json                      written last, atomically: marks the dataset complete
    tokenizer.json                     (optional) the tokenizer the documents were encoded with
    <source>/shard-00000-of-00004.array_record
    <source>/shard-00001-of-00004.array_record ...

Each ArrayRecord record (written with ``group_size:1`` for random access) is one document::

    bytes 0-3    magic b"JXTD"
    byte  4      format version (1)
    byte  5      token item size: 2 (little-endian uint16) or 4 (little-endian uint32)
    bytes 6-7    zero
    bytes 8-11   length of the JSON metadata in bytes (uint32 LE; padded with spaces to a
                 multiple of 4 so the tokens are aligned)
    bytes 12-15  number of tokens (uint32 LE)
    JSON metadata (UTF-8): ``doc_id`` (str), ``source`` (str), ``toxicity`` (float or null),
                 any further JSON-safe keys
    tokens       ``n_tokens * item size`` bytes

No pickle: a record is plain bytes that any language can parse. Shards are written to a
hidden temporary name, fsynced and renamed, so an interrupted run never leaves a file with
a valid shard name; ``open_source`` also checks that a source's shard set is complete.

``manifest.json`` (see ``read_manifest``) holds, per source, the fields the pipeline needs:
``directory``, ``num_documents``, ``num_tokens``, ``token_dtype``, ``vocab_size``, ``eos_id``,
``pad_id``; other keys (dropped documents, fingerprints, tokenizer hash) are kept as they are.
``write_manifest`` also records per source ``files`` (each shard's ``name``, ``bytes``,
``sha256``, ``documents``, ``tokens``, ``max_token_id``) and ``max_token_id``, and at top
level ``tokenizer_sha256`` (``Tokenizer.fingerprint()`` of the named tokenizer file).

Integrity (``verify_source``, ``verify_tokenizer``): opening a source checks that its shard
names and sizes are the ones the manifest records (cheap, at every open) and, with
``checksums=True`` (``jaxlm data prepare`` before reusing a source, ``jaxlm data inspect``),
their sha256. Hashing every shard at every training start would cost a full read of the
dataset; without it a garbled byte is still caught, because ArrayRecord (Riegeli) checks a
hash of every chunk it reads, and the read error names the shard and record. The manifest
itself must agree with its ``files`` (document and token counts) and its ``vocab_size``
must hold ``max_token_id``; the tokenizer file must have the recorded fingerprint and no
more ids than ``vocab_size``. Manifests written before these fields existed still open: their
shards are checked while they are read (token ids against ``vocab_size`` in the pipeline).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from jaxlm.data import DataError

MAGIC = b"JXTD"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sBBxxII")  # magic, version, itemsize, pad, meta_len, n_tokens
HEADER_SIZE = _HEADER.size  # 16
TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_ITEMSIZE_TO_DTYPE = {2: TOKEN_DTYPES["uint16"], 4: TOKEN_DTYPES["uint32"]}

SHARD_SUFFIX = ".array_record"
SHARD_PATTERN = re.compile(r"^shard-(\d{5})-of-(\d{5})\.array_record$")
DEFAULT_WRITER_OPTIONS = "group_size:1"  # random access (grain requires group_size 1); zstd
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "jaxlm.prepared"
MANIFEST_VERSION = 1


class RecordError(DataError):
    """A record or shard is malformed; the message says which and what was expected."""


class ManifestError(DataError):
    """``manifest.json`` is missing, unreadable or lacks a field; the message names it."""


# ---------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------


def token_dtype_for_vocab(vocab_size: int) -> str:
    """``"uint16"`` when every id fits in 16 bits (vocab_size <= 65536), else ``"uint32"``."""
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size: expected a positive integer, got {vocab_size!r}")
    if vocab_size > 2**32:
        raise ValueError(f"vocab_size: {vocab_size} ids do not fit in uint32")
    return "uint16" if vocab_size <= 2**16 else "uint32"


def encode_record(tokens: Any, meta: Mapping[str, Any], *, token_dtype: str | None = None) -> bytes:
    """One document as record bytes (see the module doc for the layout).

    ``tokens``: 1-D non-negative integer ids. ``meta``: JSON-safe mapping; ``doc_id`` and
    ``source`` are required, ``toxicity`` (float in [0, 1] or None) optional. ``token_dtype``
    ("uint16"/"uint32") defaults to the smallest that holds the largest id.
    """
    ids = np.asarray(tokens)
    if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
        raise RecordError(f"tokens: expected a 1-D array of integer ids, got shape {ids.shape} dtype {ids.dtype}")
    largest = int(ids.max()) if ids.size else 0
    if ids.size and int(ids.min()) < 0:
        raise RecordError(f"tokens: ids must be non-negative, got {int(ids.min())}")
    if token_dtype is None:
        token_dtype = "uint16" if largest < 2**16 else "uint32"
    if token_dtype not in TOKEN_DTYPES:
        raise RecordError(f"token_dtype: expected one of {', '.join(TOKEN_DTYPES)}, got {token_dtype!r}")
    dtype = TOKEN_DTYPES[token_dtype]
    if largest > np.iinfo(dtype).max:
        raise RecordError(f"tokens: id {largest} does not fit in {token_dtype}")
    meta_bytes = _encode_meta(meta)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, dtype.itemsize, len(meta_bytes), ids.size)
    return header + meta_bytes + ids.astype(dtype, copy=False).tobytes()


def _encode_meta(meta: Mapping[str, Any]) -> bytes:
    if not isinstance(meta, Mapping):
        raise RecordError(f"meta: expected a mapping, got {type(meta).__name__}")
    for key in ("doc_id", "source"):
        if not isinstance(meta.get(key), str):
            raise RecordError(f"meta.{key}: expected a string, got {meta.get(key)!r}")
    tox = meta.get("toxicity")
    if tox is not None and (isinstance(tox, bool) or not isinstance(tox, (int, float)) or not math.isfinite(tox)):
        raise RecordError(f"meta.toxicity: expected a finite number or null, got {tox!r}")
    try:
        text = json.dumps(dict(meta), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise RecordError(f"meta: not JSON-serialisable ({err})") from None
    raw = text.encode("utf-8")
    return raw + b" " * (-len(raw) % 4)


def _parse_header(data: bytes) -> tuple[np.dtype, int, int]:
    if len(data) < HEADER_SIZE:
        raise RecordError(f"record of {len(data)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, itemsize, meta_len, n_tokens = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise RecordError(f"record does not start with the magic {MAGIC!r} (got {magic!r}): not a jaxlm document")
    if version != FORMAT_VERSION:
        raise RecordError(f"record format version {version} is not supported (expected {FORMAT_VERSION})")
    if itemsize not in _ITEMSIZE_TO_DTYPE:
        raise RecordError(f"record token item size {itemsize} is invalid (expected 2 or 4)")
    expected = HEADER_SIZE + meta_len + n_tokens * itemsize
    if len(data) != expected:
        raise RecordError(
            f"record is {len(data)} bytes but its header announces {expected} "
            f"({meta_len} bytes of metadata, {n_tokens} tokens of {itemsize} bytes): truncated or corrupt"
        )
    return _ITEMSIZE_TO_DTYPE[itemsize], meta_len, n_tokens


def decode_tokens(data: bytes) -> np.ndarray:
    """The token ids of a record (a read-only uint16/uint32 view), skipping the metadata."""
    dtype, meta_len, n_tokens = _parse_header(data)
    return np.frombuffer(data, dtype=dtype, count=n_tokens, offset=HEADER_SIZE + meta_len)


def decode_record(data: bytes) -> tuple[np.ndarray, dict[str, Any]]:
    """``(tokens, meta)`` of a record: the inverse of ``encode_record``."""
    dtype, meta_len, n_tokens = _parse_header(data)
    try:
        meta = json.loads(bytes(data[HEADER_SIZE : HEADER_SIZE + meta_len]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecordError(f"record metadata is not valid UTF-8 JSON ({err})") from None
    if not isinstance(meta, dict):
        raise RecordError(f"record metadata: expected a JSON object, got {type(meta).__name__}")
    return np.frombuffer(data, dtype=dtype, count=n_tokens, offset=HEADER_SIZE + meta_len), meta


# ---------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------


def shard_name(index: int, count: int) -> str:
    if not (0 <= index < count <= 99999):
        raise ValueError(f"shard {index} of {count}: expected 0 <= index < count <= 99999")
    return f"shard-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes (the one file hash of jaxlm: inputs, shards, checkpoints)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@dataclasses.dataclass(frozen=True)
class ShardFile:
    """One committed shard as the manifest records it (an item of a source's ``files``)."""

    name: str
    bytes: int
    sha256: str
    documents: int
    tokens: int
    max_token_id: int  # -1: no tokens

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def describe_shards(directory: str | os.PathLike) -> list[ShardFile]:
    """Size, sha256 and counts of every shard of a source, read from disk (every record is
    decoded: for manifests of sources written without ``ShardWriter.file``)."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    files = []
    for path in shard_paths(directory):
        data = _open_shard(path, ArrayRecordDataSource)
        documents = tokens = 0
        largest = -1
        for i in range(len(data)):
            ids = decode_tokens(_read_named(data, i, path))
            documents += 1
            tokens += ids.size
            if ids.size:
                largest = max(largest, int(ids.max()))
        files.append(ShardFile(path.name, path.stat().st_size, file_sha256(path), documents, tokens, largest))
    return files


class ShardWriter:
    """Writes one shard ``shard-XXXXX-of-YYYYY.array_record`` of a source, atomically.

    Records go to a hidden temporary file; ``close()`` (or leaving the ``with`` block
    normally) fsyncs it and renames it to the final name. Leaving the block with an
    exception, or ``abort()``, deletes the temporary file. Use one writer per shard
    (``num_shards`` writers can run in parallel processes)::

        with ShardWriter(out_dir / "pol", shard_index=0, num_shards=4, token_dtype="uint16") as w:
            for ids, meta in docs:
                w.write(ids, meta)
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        shard_index: int,
        num_shards: int,
        *,
        token_dtype: str = "uint16",
        options: str = DEFAULT_WRITER_OPTIONS,
    ) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"token_dtype: expected one of {', '.join(TOKEN_DTYPES)}, got {token_dtype!r}")
        if "group_size:1" not in options.replace(" ", ""):
            raise ValueError(f"options: shards must be written with group_size:1 for random access, got {options!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / shard_name(shard_index, num_shards)
        self.tmp_path = self.directory / f".{self.path.name}.tmp-{os.getpid()}"
        self.token_dtype = token_dtype
        self.num_records = 0
        self.num_tokens = 0
        self.max_token_id = -1
        self.file: ShardFile | None = None  # set by close()
        self._writer = ArrayRecordWriter(str(self.tmp_path), options)
        if not self._writer.ok():
            raise RecordError(f"{self.tmp_path}: cannot open for writing")
        self._done = False

    def write(self, tokens: Any, meta: Mapping[str, Any]) -> None:
        if self._done:
            raise RuntimeError(f"{self.path}: writer already closed")
        ids = np.asarray(tokens)
        record = encode_record(ids, meta, token_dtype=self.token_dtype)
        try:
            self._writer.write(record)
        except RuntimeError as err:  # array_record reports write failures (a full disk) bare
            raise RecordError(f"{self.tmp_path}: cannot write the shard ({err})") from err
        self.num_records += 1
        self.num_tokens += int(ids.size)
        if ids.size:
            self.max_token_id = max(self.max_token_id, int(ids.max()))

    def close(self) -> Path:
        """Finish the shard: flush, fsync, rename to its final name; returns that path.
        ``file`` then describes it (size, sha256, counts) for the manifest."""
        if self._done:
            return self.path
        try:
            self._writer.close()
        except RuntimeError as err:
            raise RecordError(f"{self.tmp_path}: cannot finish the shard ({err})") from err
        with open(self.tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        self.file = ShardFile(
            self.path.name, self.tmp_path.stat().st_size, file_sha256(self.tmp_path),
            self.num_records, self.num_tokens, self.max_token_id,
        )
        os.replace(self.tmp_path, self.path)
        _fsync_dir(self.directory)
        self._done = True
        return self.path

    def abort(self) -> None:
        """Drop the shard: nothing with a valid shard name is left behind."""
        if self._done:
            return
        self._done = True
        try:
            self._writer.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_source(
    directory: str | os.PathLike,
    documents: Iterable[tuple[Any, Mapping[str, Any]]],
    *,
    num_shards: int = 1,
    token_dtype: str = "uint16",
    options: str = DEFAULT_WRITER_OPTIONS,
) -> dict[str, int]:
    """Write ``(tokens, meta)`` documents round-robin into ``num_shards`` shards of a source.

    Either every shard is committed or (on an exception) none is. Returns
    ``{"num_documents": ..., "num_tokens": ...}``.
    """
    writers = [
        ShardWriter(directory, i, num_shards, token_dtype=token_dtype, options=options) for i in range(num_shards)
    ]
    try:
        for i, (tokens, meta) in enumerate(documents):
            writers[i % num_shards].write(tokens, meta)
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    for writer in writers:
        writer.close()
    return {
        "num_documents": sum(w.num_records for w in writers),
        "num_tokens": sum(w.num_tokens for w in writers),
        "files": [w.file.to_json() for w in writers],
    }


def shard_paths(directory: str | os.PathLike) -> list[Path]:
    """The complete, sorted shard set of a source directory (errors name the problem)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise RecordError(f"{directory}: source directory does not exist")
    found: dict[int, set[int]] = {}
    for path in directory.iterdir():
        match = SHARD_PATTERN.match(path.name)
        if match:
            found.setdefault(int(match.group(2)), set()).add(int(match.group(1)))
    if not found:
        raise RecordError(f"{directory}: no shards (expected files named shard-XXXXX-of-YYYYY{SHARD_SUFFIX})")
    if len(found) > 1:
        raise RecordError(
            f"{directory}: shards of different sets ({', '.join(f'of-{n:05d}' for n in sorted(found))}); "
            "remove the stale ones and prepare again"
        )
    (count, indices), = found.items()
    missing = sorted(set(range(count)) - indices)
    if missing:
        raise RecordError(
            f"{directory}: incomplete shard set: {len(missing)} of {count} shards missing "
            f"(e.g. {shard_name(missing[0], count)}); prepare again"
        )
    return [directory / shard_name(i, count) for i in range(count)]


def _open_shard(path: Path, source_class):
    try:
        return source_class([str(path)])
    except Exception as err:  # array_record raises bare exceptions for corrupt files
        raise RecordError(
            f"{path}: not a readable ArrayRecord shard ({err or type(err).__name__}); "
            "truncated or corrupt: prepare the dataset again"
        ) from err


def _read_named(data, index: int, path: Path) -> bytes:
    try:
        return data[index]
    except Exception as err:  # array_record: RuntimeError("Corrupted Riegeli/records file ...")
        raise RecordError(
            f"{path}: record {index} is unreadable ({err}); the shard is corrupt: prepare the dataset again"
        ) from err


class ShardSource:
    """Random access (``len``, ``[i]`` -> record bytes) over a source's shards, in order.

    Reads go through one grain ``ArrayRecordDataSource`` over all shards; a read that fails
    (a corrupt chunk) is re-raised as ``RecordError`` naming the shard file and record.
    """

    def __init__(self, directory: Path, paths: list[Path]):
        import grain

        self.directory = directory
        self.paths = paths
        try:
            self._data = grain.sources.ArrayRecordDataSource([str(p) for p in paths])
        except Exception:
            for path in paths:  # name the shard that cannot be opened
                _open_shard(path, grain.sources.ArrayRecordDataSource)
            raise
        self._starts: list[int] | None = None

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> bytes:
        try:
            return self._data[index]
        except Exception as err:
            raise self._read_error(int(index), err) from err

    def __getitems__(self, indices):
        try:
            return self._data.__getitems__(indices)
        except Exception:
            return [self[i] for i in indices]  # raises the error of the first unreadable record

    def _read_error(self, index: int, err: Exception) -> RecordError:
        import grain

        if self._starts is None:
            sizes = [len(_open_shard(p, grain.sources.ArrayRecordDataSource)) for p in self.paths]
            self._starts = [0] + list(np.cumsum(sizes)[:-1])
        shard = bisect.bisect_right(self._starts, index) - 1
        local = index - int(self._starts[shard])
        return RecordError(
            f"{self.paths[shard]}: record {local} (document {index} of {self.directory.name}) is unreadable "
            f"({err}); the shard is corrupt: prepare the dataset again"
        )


def open_source(directory: str | os.PathLike, info: "SourceInfo | None" = None) -> ShardSource:
    """Random access to a source's records (``len``, ``[i]`` -> record bytes); with ``info``
    (its manifest entry), its shards are first checked against it (``verify_source``)."""
    paths = verify_source(info) if info is not None else shard_paths(directory)
    return ShardSource(Path(directory), paths)


def verify_source(info: "SourceInfo", *, checksums: bool = False) -> list[Path]:
    """The shard paths of a source, checked against its manifest entry: the same shard
    names and sizes (and sha256 with ``checksums``); manifests without ``files`` (older
    ones) only get the shard-set check. Errors name the shard and what differs."""
    paths = shard_paths(info.directory)
    if info.files is None:
        return paths
    found = [p.name for p in paths]
    recorded = [f.name for f in info.files]
    if found != recorded:
        raise RecordError(
            f"{info.directory}: shards {_name_range(found)} on disk, the manifest records {_name_range(recorded)}; "
            "prepare the dataset again"
        )
    for path, file in zip(paths, info.files):
        size = path.stat().st_size
        if size != file.bytes:
            raise RecordError(
                f"{path}: {size} bytes, the manifest records {file.bytes}: the shard is truncated or was "
                "replaced; prepare the dataset again"
            )
        if checksums:
            digest = file_sha256(path)
            if digest != file.sha256:
                raise RecordError(
                    f"{path}: sha256 {digest}, the manifest records {file.sha256}: the shard is corrupt or "
                    "was replaced; prepare the dataset again"
                )
    return paths


def _name_range(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)})" if names else "none"


# ---------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """What the pipeline needs to know about one prepared source."""

    name: str
    directory: Path  # absolute
    num_documents: int
    num_tokens: int
    token_dtype: str
    vocab_size: int
    eos_id: int
    pad_id: int
    files: tuple[ShardFile, ...] | None = None  # None: a manifest written before shards were recorded
    max_token_id: int | None = None  # the largest id in the shards (-1: none), when recorded

    def to_json(self, root: Path) -> dict[str, Any]:
        directory = self.directory
        try:
            directory = directory.relative_to(root)
        except ValueError:
            pass
        entry: dict[str, Any] = {
            "directory": str(directory),
            "num_documents": self.num_documents,
            "num_tokens": self.num_tokens,
            "token_dtype": self.token_dtype,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }
        if self.files is not None:
            entry["files"] = [f.to_json() for f in self.files]
        if self.max_token_id is not None:
            entry["max_token_id"] = self.max_token_id
        return entry


@dataclasses.dataclass(frozen=True)
class Manifest:
    root: Path  # the prepared dataset directory
    sources: dict[str, SourceInfo]
    tokenizer: Path | None  # absolute path of the tokenizer file, when the manifest names one
    data: dict[str, Any]  # the whole manifest as read (extra keys included)


_SOURCE_FIELDS = {
    "directory": "a directory path relative to the dataset",
    "num_documents": "a non-negative integer",
    "num_tokens": "a non-negative integer",
    "token_dtype": "'uint16' or 'uint32'",
    "vocab_size": "a positive integer",
    "eos_id": "a token id (integer in [0, vocab_size))",
    "pad_id": "a token id (integer in [0, vocab_size))",
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def source_info(path: Path, name: str, entry: Any, root: Path) -> SourceInfo:
    """The checked ``SourceInfo`` of manifest entry ``sources.<name>`` (``path``: the manifest
    file, for messages; ``root``: the dataset directory); errors name the field."""
    where = f"{path}: sources.{name}"
    if not isinstance(entry, dict):
        raise ManifestError(f"{where}: expected an object with fields {', '.join(_SOURCE_FIELDS)}")
    for field, expected in _SOURCE_FIELDS.items():
        if field not in entry:
            raise ManifestError(f"{where}: missing field {field!r} (expected {expected})")
    directory, dtype = entry["directory"], entry["token_dtype"]
    if not isinstance(directory, str) or not directory:
        raise ManifestError(f"{where}.directory: expected {_SOURCE_FIELDS['directory']}, got {directory!r}")
    for field in ("num_documents", "num_tokens"):
        if not _is_int(entry[field]) or entry[field] < 0:
            raise ManifestError(f"{where}.{field}: expected a non-negative integer, got {entry[field]!r}")
    if not _is_int(entry["vocab_size"]) or entry["vocab_size"] <= 0:
        raise ManifestError(f"{where}.vocab_size: expected a positive integer, got {entry['vocab_size']!r}")
    if dtype not in TOKEN_DTYPES:
        raise ManifestError(f"{where}.token_dtype: expected 'uint16' or 'uint32', got {dtype!r}")
    if entry["vocab_size"] > np.iinfo(TOKEN_DTYPES[dtype]).max + 1:
        raise ManifestError(f"{where}.token_dtype: {dtype} cannot hold ids of a {entry['vocab_size']}-token vocabulary")
    for field in ("eos_id", "pad_id"):
        if not _is_int(entry[field]) or not 0 <= entry[field] < entry["vocab_size"]:
            raise ManifestError(
                f"{where}.{field}: expected a token id in [0, {entry['vocab_size']}), got {entry[field]!r}"
            )
    files = _check_files(where, entry)
    max_token_id = entry.get("max_token_id")
    if max_token_id is not None and (not _is_int(max_token_id) or max_token_id < -1):
        raise ManifestError(f"{where}.max_token_id: expected a token id (or -1: no tokens), got {max_token_id!r}")
    if files is not None:
        max_token_id = max([f.max_token_id for f in files], default=-1)
    if max_token_id is not None and max_token_id >= entry["vocab_size"]:
        raise ManifestError(
            f"{where}.vocab_size: {entry['vocab_size']}, but the shards hold token id {max_token_id} "
            "(max_token_id): the manifest was edited or belongs to other shards; prepare the dataset again"
        )
    return SourceInfo(
        name=name,
        directory=(root / directory).resolve(),
        num_documents=entry["num_documents"],
        num_tokens=entry["num_tokens"],
        token_dtype=dtype,
        vocab_size=entry["vocab_size"],
        eos_id=entry["eos_id"],
        pad_id=entry["pad_id"],
        files=files,
        max_token_id=max_token_id,
    )


_FILE_FIELDS = {"name": str, "bytes": int, "sha256": str, "documents": int, "tokens": int, "max_token_id": int}


def _check_files(where: str, entry: dict[str, Any]) -> tuple[ShardFile, ...] | None:
    """A source entry's ``files`` (None when absent), agreeing with its document/token counts."""
    raw = entry.get("files")
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw:
        raise ManifestError(f"{where}.files: expected a non-empty list of shard records, got {raw!r}")
    files = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or any(
            not isinstance(item.get(k), t) or isinstance(item.get(k), bool) for k, t in _FILE_FIELDS.items()
        ):
            raise ManifestError(f"{where}.files[{i}]: expected an object with {', '.join(_FILE_FIELDS)}, got {item!r}")
        files.append(ShardFile(**{k: item[k] for k in _FILE_FIELDS}))
    for field, attribute in (("num_documents", "documents"), ("num_tokens", "tokens")):
        held = sum(getattr(f, attribute) for f in files)
        if held != entry[field]:
            raise ManifestError(
                f"{where}.{field}: the manifest lists {entry[field]} {attribute} but the shards in "
                f"{entry['directory']!r} hold {held} (its files record): the manifest was edited or belongs to "
                "other shards; prepare the dataset again"
            )
    return tuple(files)


def tokenizer_fingerprint(path: Path) -> str:
    """``Tokenizer.fingerprint()`` of a tokenizer file (what ``tokenizer_sha256`` records)."""
    from jaxlm.tokenizer import Tokenizer

    return Tokenizer.load(path).fingerprint()


def verify_tokenizer(manifest: "Manifest"):
    """The dataset's tokenizer (None when the manifest names none, or an old manifest names a
    missing file), checked: it must be the file the data was encoded with (its fingerprint
    equals ``tokenizer_sha256``, when recorded) and every source's ``vocab_size`` must cover
    its ids. Errors name the tokenizer file, the manifest and both hashes."""
    from jaxlm.tokenizer import Tokenizer

    path = manifest.root / MANIFEST_FILE
    expected = manifest.data.get("tokenizer_sha256")
    if manifest.tokenizer is None:
        return None
    if not manifest.tokenizer.is_file():
        if expected is None:
            return None
        raise ManifestError(f"{manifest.tokenizer}: missing (the tokenizer named by {path}); prepare the dataset again")
    tokenizer = Tokenizer.load(manifest.tokenizer)
    found = tokenizer.fingerprint()
    if expected is not None and found != expected:
        raise DataError(
            f"{manifest.tokenizer}: fingerprint {found} is not the tokenizer_sha256 {expected} recorded in {path}: "
            "this is not the tokenizer the data was encoded with; restore it or prepare the dataset again"
        )
    for info in manifest.sources.values():
        if info.vocab_size < tokenizer.vocab_size:
            raise ManifestError(
                f"{path}: sources.{info.name}.vocab_size is {info.vocab_size}, but {manifest.tokenizer} has "
                f"{tokenizer.vocab_size} tokens: the manifest was edited; prepare the dataset again"
            )
    return tokenizer


def verify_dataset(manifest: "Manifest", names: Iterable[str] | None = None, *, checksums: bool = False) -> None:
    """``verify_tokenizer`` and ``verify_source`` of the named sources (default: all)."""
    verify_tokenizer(manifest)
    for name in names if names is not None else manifest.sources:
        verify_source(manifest.sources[name], checksums=checksums)


def read_manifest(dataset_dir: str | os.PathLike) -> Manifest:
    """Read and check ``<dataset_dir>/manifest.json``; errors name the file and field."""
    root = Path(dataset_dir)
    path = root / MANIFEST_FILE
    if not path.is_file():
        hint = " (the dataset directory does not exist)" if not root.exists() else " (run `jaxlm data prepare` first)"
        raise ManifestError(f"{path}: no manifest{hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path}: unreadable manifest ({err})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a JSON object at top level")
    if data.get("format", MANIFEST_FORMAT) != MANIFEST_FORMAT:
        raise ManifestError(f"{path}: format {data.get('format')!r} is not {MANIFEST_FORMAT!r}")
    version = data.get("version", MANIFEST_VERSION)
    if not _is_int(version) or version > MANIFEST_VERSION:
        raise ManifestError(f"{path}: version {version!r} is newer than this jaxlm understands ({MANIFEST_VERSION})")
    sources = data.get("sources")
    if not isinstance(sources, dict) or not sources:
        raise ManifestError(f"{path}: missing field 'sources' (expected an object: source name -> source fields)")
    infos = {name: source_info(path, name, entry, root) for name, entry in sources.items()}
    tokenizer = data.get("tokenizer")
    if tokenizer is not None and not isinstance(tokenizer, str):
        raise ManifestError(f"{path}: tokenizer: expected a file path relative to the dataset, got {tokenizer!r}")
    return Manifest(root=root, sources=infos, tokenizer=(root / tokenizer).resolve() if tokenizer else None, data=data)


def write_manifest(
    dataset_dir: str | os.PathLike,
    sources: Mapping[str, SourceInfo | Mapping[str, Any]],
    *,
    tokenizer: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``manifest.json`` atomically (temp file, fsync, rename); re-reads it to validate.

    ``sources`` maps names to ``SourceInfo`` or plain dicts (which may carry extra keys such
    as dropped-document counts); ``extra`` adds top-level keys (fingerprints, tokenizer hash).
    A source entry without ``files`` gets them from its shards on disk (``describe_shards``),
    and ``tokenizer_sha256`` is recorded when the tokenizer file exists and ``extra`` has none.
    """
    root = Path(dataset_dir)
    root.mkdir(parents=True, exist_ok=True)
    entries = {
        name: (info.to_json(root) if isinstance(info, SourceInfo) else dict(info)) for name, info in sources.items()
    }
    for entry in entries.values():
        if "files" not in entry and isinstance(entry.get("directory"), str):
            files = describe_shards(root / entry["directory"])
            entry["files"] = [f.to_json() for f in files]
            entry["max_token_id"] = max([f.max_token_id for f in files], default=-1)
    data: dict[str, Any] = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION}
    if tokenizer is not None:
        data["tokenizer"] = tokenizer
        if (root / tokenizer).is_file() and "tokenizer_sha256" not in (extra or {}):
            data["tokenizer_sha256"] = tokenizer_fingerprint(root / tokenizer)
    data.update(extra or {})
    data["sources"] = entries
    path = root / MANIFEST_FILE
    tmp = root / f".{MANIFEST_FILE}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, ensure_ascii=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        for name, entry in entries.items():
            source_info(tmp, name, entry, root)
    except BaseException:  # a full disk, an invalid entry: no temporary file is left behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    _fsync_dir(root)
    return path


def source_info_for_directory(source_dir: str | os.PathLike) -> SourceInfo:
    """The manifest entry of a source directory, from the manifest in its parent directory."""
    source_dir = Path(source_dir).resolve()
    manifest = read_manifest(source_dir.parent)
    for info in manifest.sources.values():
        if info.directory == source_dir:
            return info
    raise ManifestError(
        f"{source_dir}: not a source of {manifest.root / MANIFEST_FILE} "
        f"(its sources: {', '.join(manifest.sources)})"
    )


def check_token_ids(ids: np.ndarray, info: SourceInfo, index: int) -> np.ndarray:
    """``ids`` of document ``index`` of a source, refused when an id is >= the manifest's ``vocab_size``."""
    if ids.size and int(ids.max()) >= info.vocab_size:
        raise RecordError(
            f"{info.directory}: document {index} holds token id {int(ids.max())}, but the manifest's "
            f"sources.{info.name}.vocab_size is {info.vocab_size}: the manifest was edited or belongs to other "
            "shards; prepare the dataset again"
        )
    return ids


def iter_documents(directory: str | os.PathLike) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """All ``(tokens, meta)`` documents of a source in stored order (shard by shard)."""
    source = open_source(directory)
    for i in range(len(source)):
        yield decode_record(source[i])


def iter_prepared_tokens(source_dir: str | os.PathLike, max_tokens: int, eos_id: int | None = None) -> np.ndarray:
    """The first ``max_tokens`` ids of a source's documents in stored order, each followed by EOS.

    One int32 array (shorter when the source has fewer tokens). ``eos_id`` defaults to the
    manifest's (the manifest in the source directory's parent).
    """
    info = source_info_for_directory(source_dir) if eos_id is None else None
    if info is not None:
        eos_id = info.eos_id
    source = open_source(source_dir, info)
    pieces, total = [], 0
    for i in range(len(source)):
        if total >= max_tokens:
            break
        ids = check_token_ids(decode_tokens(source[i]), info, i) if info is not None else decode_tokens(source[i])
        pieces += [ids, np.asarray([eos_id])]
        total += ids.size + 1
    if not pieces:
        return np.zeros((0,), np.int32)
    return np.concatenate(pieces).astype(np.int32)[:max_tokens]
