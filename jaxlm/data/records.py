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
"""

from __future__ import annotations

import dataclasses
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
        self._writer = ArrayRecordWriter(str(self.tmp_path), options)
        if not self._writer.ok():
            raise RecordError(f"{self.tmp_path}: cannot open for writing")
        self._done = False

    def write(self, tokens: Any, meta: Mapping[str, Any]) -> None:
        if self._done:
            raise RuntimeError(f"{self.path}: writer already closed")
        ids = np.asarray(tokens)
        self._writer.write(encode_record(ids, meta, token_dtype=self.token_dtype))
        self.num_records += 1
        self.num_tokens += int(ids.size)

    def close(self) -> Path:
        """Finish the shard: flush, fsync, rename to its final name; returns that path."""
        if self._done:
            return self.path
        self._writer.close()
        with open(self.tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
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
    return {"num_documents": sum(w.num_records for w in writers), "num_tokens": sum(w.num_tokens for w in writers)}


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


def open_source(directory: str | os.PathLike):
    """A grain random-access data source (``len``, ``[i]`` -> record bytes) over a source's shards."""
    import grain

    paths = shard_paths(directory)
    try:
        return grain.sources.ArrayRecordDataSource([str(p) for p in paths])
    except Exception as err:  # array_record raises bare exceptions for corrupt files
        raise RecordError(f"{directory}: cannot open shards as ArrayRecord ({err})") from err


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

    def to_json(self, root: Path) -> dict[str, Any]:
        directory = self.directory
        try:
            directory = directory.relative_to(root)
        except ValueError:
            pass
        return {
            "directory": str(directory),
            "num_documents": self.num_documents,
            "num_tokens": self.num_tokens,
            "token_dtype": self.token_dtype,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }


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


def _check_source(path: Path, name: str, entry: Any, root: Path) -> SourceInfo:
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
    return SourceInfo(
        name=name,
        directory=(root / directory).resolve(),
        num_documents=entry["num_documents"],
        num_tokens=entry["num_tokens"],
        token_dtype=dtype,
        vocab_size=entry["vocab_size"],
        eos_id=entry["eos_id"],
        pad_id=entry["pad_id"],
    )


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
    infos = {name: _check_source(path, name, entry, root) for name, entry in sources.items()}
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
    """
    root = Path(dataset_dir)
    root.mkdir(parents=True, exist_ok=True)
    entries = {
        name: (info.to_json(root) if isinstance(info, SourceInfo) else dict(info)) for name, info in sources.items()
    }
    data: dict[str, Any] = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION}
    if tokenizer is not None:
        data["tokenizer"] = tokenizer
    data.update(extra or {})
    data["sources"] = entries
    path = root / MANIFEST_FILE
    tmp = root / f".{MANIFEST_FILE}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    try:
        for name, entry in entries.items():
            _check_source(tmp, name, entry, root)
    except ManifestError:
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
    if eos_id is None:
        eos_id = source_info_for_directory(source_dir).eos_id
    source = open_source(source_dir)
    pieces, total = [], 0
    for i in range(len(source)):
        if total >= max_tokens:
            break
        ids = decode_tokens(source[i])
        pieces += [ids, np.asarray([eos_id])]
        total += ids.size + 1
    if not pieces:
        return np.zeros((0,), np.int32)
    return np.concatenate(pieces).astype(np.int32)[:max_tokens]
