"""Corpus readers: files, JSONL, CSV, Project Gutenberg, 4chan (CSV and ndjson), TFDS -> ``Document``s.

Every reader is a generator of ``Document(text, source, doc_id, meta)``. Files are opened
plain or gzip-compressed transparently (gzip is recognised by its magic bytes, whatever
the file name). Path arguments take one path, a directory (its files, sorted), a glob
pattern, or a list of these.

Drops are counted, never silent. Pass a ``ReadStats`` to collect, per source, the kept
documents and characters, the documents split because they were too long, and the
dropped documents by reason (``DROP_REASONS``); the prepare step writes
``stats.to_dict()`` into its manifest. Without one, a reader logs a summary of its drops.

Decisions on bad input (``ReadOptions`` chooses where there is a choice):

- missing/unreadable path, corrupt gzip, malformed JSON/CSV, a missing column or field,
  a non-text value: ``DataError`` naming the file, line and field (and the available
  ones), and what was expected;
- invalid UTF-8: by default a ``DataError`` naming the file, line and byte offset
  (offsets count decompressed bytes for ``.gz`` files); ``invalid_utf8="drop"`` drops the
  document instead (reason ``invalid_utf8``). A UTF-8 byte-order mark is ignored;
- an empty document (only whitespace, e.g. an image-only post after HTML cleaning):
  dropped (``empty``);
- a document longer than ``max_chars``: split into consecutive parts at paragraph, line
  or word boundaries (ids ``<id>#<part>``; joined, the parts give back the text) or, with
  ``too_long="drop"``, dropped (``too_long``);
- a repeated id (ids taken from the data: id columns/fields, 4chan post numbers): the
  later copy is dropped (``duplicate_id``);
- a reader that yields no document at all (empty corpus): ``DataError`` at the end,
  with the drop counts.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import csv
import dataclasses
import glob as globlib
import gzip
import html
import json
import logging
import os
import re
import sys
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Literal, Sequence

from jaxlm.config import ConfigError
from jaxlm.data import DataError

log = logging.getLogger(__name__)

PathSpec = str | os.PathLike | Sequence[str | os.PathLike]

GZIP_MAGIC = b"\x1f\x8b"

DROP_EMPTY = "empty"
DROP_EMPTY_POST = "empty_post"  # threads mode: a post with no text inside a kept or dropped thread
DROP_INVALID_UTF8 = "invalid_utf8"
DROP_TOO_LONG = "too_long"
DROP_DUPLICATE_ID = "duplicate_id"
DROP_REASONS = (DROP_EMPTY, DROP_EMPTY_POST, DROP_INVALID_UTF8, DROP_TOO_LONG, DROP_DUPLICATE_ID)


@dataclasses.dataclass(frozen=True)
class Document:
    """One training document. ``doc_id`` is unique within its ``source``."""

    text: str
    source: str
    doc_id: str
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """Document policy shared by all readers (see the module docstring)."""

    max_chars: int | None = None
    too_long: Literal["split", "drop"] = "split"
    invalid_utf8: Literal["error", "drop"] = "error"

    def __post_init__(self) -> None:
        if self.max_chars is not None and (not isinstance(self.max_chars, int) or self.max_chars < 1):
            raise ConfigError(f"max_chars: expected a positive integer or null, got {self.max_chars!r}")
        if self.too_long not in ("split", "drop"):
            raise ConfigError(f"too_long: expected 'split' or 'drop', got {self.too_long!r}")
        if self.invalid_utf8 not in ("error", "drop"):
            raise ConfigError(f"invalid_utf8: expected 'error' or 'drop', got {self.invalid_utf8!r}")


@dataclasses.dataclass
class SourceStats:
    documents: int = 0  # documents yielded (each part of a split document counts)
    characters: int = 0
    split: int = 0  # input documents cut into several parts by max_chars
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)


@dataclasses.dataclass
class ReadStats:
    """Per-source counts of kept, split and dropped documents (mutable; shared by readers)."""

    sources: dict[str, SourceStats] = dataclasses.field(default_factory=dict)

    def source(self, name: str) -> SourceStats:
        return self.sources.setdefault(name, SourceStats())

    def count_kept(self, source: str, text: str) -> None:
        entry = self.source(source)
        entry.documents += 1
        entry.characters += len(text)

    def count_split(self, source: str) -> None:
        self.source(source).split += 1

    def count_drop(self, source: str, reason: str, n: int = 1) -> None:
        self.source(source).dropped[reason] += n

    def dropped(self, source: str | None = None) -> dict[str, int]:
        """{reason: count} for one source, or summed over all."""
        names = [source] if source is not None else list(self.sources)
        total: collections.Counter = collections.Counter()
        for name in names:
            if name in self.sources:
                total.update(self.sources[name].dropped)
        return dict(sorted(total.items()))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """JSON-ready ``{source: {documents, characters, split, dropped: {reason: count}}}``."""
        return {
            name: {
                "documents": entry.documents,
                "characters": entry.characters,
                "split": entry.split,
                "dropped": dict(sorted(entry.dropped.items())),
            }
            for name, entry in sorted(self.sources.items())
        }


# ---------------------------------------------------------------------------------------
# Paths and opening
# ---------------------------------------------------------------------------------------

_GLOB_CHARS = re.compile(r"[*?\[]")


def resolve_inputs(spec: PathSpec, *, suffixes: tuple[str, ...] = ()) -> list[tuple[Path, str]]:
    """(path, name) of every input file. ``name`` (used in document ids) is the path relative
    to a given directory or to a glob's fixed prefix, or a given file's name; the full path
    when names collide. Directories are searched recursively (hidden files skipped) for
    files ending in one of ``suffixes`` (any file when empty)."""
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not items:
        raise DataError("no input paths given")
    found: list[tuple[Path, str]] = []
    for item in items:
        text = os.fspath(item)
        if isinstance(item, str) and _GLOB_CHARS.search(text) and not Path(text).exists():
            root = Path(os.path.dirname(text[: _GLOB_CHARS.search(text).start()]) or ".")
            matches = sorted(Path(m) for m in globlib.glob(text, recursive=True) if Path(m).is_file())
            if not matches:
                raise DataError(f"{text}: no files match this pattern")
            found.extend((m, m.relative_to(root).as_posix()) for m in matches)
            continue
        path = Path(text)
        if path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
                and (not suffixes or p.name.endswith(suffixes))
            )
            if not files:
                wanted = f" ending in {', '.join(suffixes)}" if suffixes else ""
                raise DataError(f"{path}: directory has no files{wanted}")
            found.extend((p, p.relative_to(path).as_posix()) for p in files)
        elif path.exists():
            found.append((path, path.name))
        else:
            raise DataError(f"{path}: no such file or directory")
    names = collections.Counter(name for _, name in found)
    return [(path, os.fspath(path) if names[name] > 1 else name) for path, name in found]


@contextlib.contextmanager
def open_binary(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open ``path`` for reading bytes, decompressing gzip (detected by magic bytes).

    Read errors inside the ``with`` block (corrupt or truncated gzip, I/O errors) become
    ``DataError`` naming the file.
    """
    path = Path(path)
    try:
        raw = open(path, "rb")
    except OSError as err:
        raise DataError(f"{path}: cannot open for reading ({err.strerror or err})") from err
    with raw:
        try:
            compressed = raw.read(2) == GZIP_MAGIC
            raw.seek(0)
        except OSError as err:
            raise DataError(f"{path}: cannot read ({err.strerror or err})") from err
        stream: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        try:
            yield stream
        except (EOFError, zlib.error, gzip.BadGzipFile) as err:
            raise DataError(f"{path}: corrupt or truncated gzip data ({err})") from err
        except OSError as err:
            raise DataError(f"{path}: read error ({err.strerror or err})") from err


def _invalid_utf8(path: Path, err: UnicodeDecodeError, offset: int, line: int) -> DataError:
    return DataError(
        f"{path}: invalid UTF-8 at line {line}, byte offset {offset} ({err.reason}); "
        "expected UTF-8 text (or read with invalid_utf8='drop' to count and skip such documents)"
    )


def _decode_whole(path: Path, data: bytes, options: ReadOptions) -> str | None:
    """Strict UTF-8 text of a whole file; None when invalid and the options drop it."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        if options.invalid_utf8 == "drop":
            return None
        raise _invalid_utf8(path, err, err.start, data.count(b"\n", 0, err.start) + 1) from None


def read_text(path: str | os.PathLike) -> str:
    """The whole UTF-8 text of a plain or gzip file; ``DataError`` on unreadable or invalid input."""
    with open_binary(path) as stream:
        data = stream.read()
    return _decode_whole(Path(path), data, ReadOptions())


def _lines(path: Path, stream: BinaryIO, options: ReadOptions, bad_lines: list[int] | None = None):
    """(line number, text) of each line, line endings kept. An invalid UTF-8 line raises, or
    (``invalid_utf8="drop"``) yields None, or, when ``bad_lines`` is given, is decoded with
    surrogate escapes and its number appended to ``bad_lines`` (for multi-line CSV records)."""
    offset = 0
    for number, raw in enumerate(stream, 1):
        start = offset
        offset += len(raw)
        if number == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
            start += len(codecs.BOM_UTF8)
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as err:
            if options.invalid_utf8 == "error":
                raise _invalid_utf8(path, err, start + err.start, number) from None
            if bad_lines is None:
                yield number, None
            else:
                bad_lines.append(number)
                yield number, raw.decode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------------------
# Document policy: empty, too long, duplicate ids, counting
# ---------------------------------------------------------------------------------------


def split_text(text: str, max_chars: int) -> list[str]:
    """Consecutive parts of at most ``max_chars`` characters, cut after a paragraph break,
    line break or space in the second half of each window when there is one.
    ``"".join(split_text(t, n)) == t``."""
    parts: list[str] = []
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        floor = start + max_chars // 2
        cut = -1
        for separator in ("\n\n", "\n", " "):
            found = text.rfind(separator, floor, end - len(separator) + 1)
            if found != -1:
                cut = found + len(separator)
                break
        cut = end if cut == -1 else cut
        parts.append(text[start:cut])
        start = cut
    parts.append(text[start:])
    return parts


class _Tally:
    """One reader call's document policy and counts (also recorded in the shared ``ReadStats``)."""

    def __init__(self, source: str, options: ReadOptions, stats: ReadStats | None, inputs: str, dedupe: bool):
        if not isinstance(source, str) or not source:
            raise ConfigError(f"source: expected a non-empty name, got {source!r}")
        self.source = source
        self.options = options
        self.stats = stats if stats is not None else ReadStats()
        self.report = stats is None
        self.inputs = inputs
        self.kept = 0
        self.dropped: collections.Counter = collections.Counter()
        self.seen: set[str] | None = set() if dedupe else None

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n
        self.stats.count_drop(self.source, reason, n)

    def emit(self, text: str | None, doc_id: str, meta: dict[str, Any]) -> Iterator[Document]:
        """The document (or its parts) if it passes the policy; otherwise count the drop."""
        if text is None:
            self.drop(DROP_INVALID_UTF8)
            return
        if not text.strip():
            self.drop(DROP_EMPTY)
            return
        if self.seen is not None:
            if doc_id in self.seen:
                self.drop(DROP_DUPLICATE_ID)
                return
            self.seen.add(doc_id)
        limit = self.options.max_chars
        if limit is not None and len(text) > limit:
            if self.options.too_long == "drop":
                self.drop(DROP_TOO_LONG)
                return
            parts = split_text(text, limit)
            self.stats.count_split(self.source)
            for index, part in enumerate(parts):
                yield self._keep(part, f"{doc_id}#{index}", {**meta, "part": index, "parts": len(parts)})
            return
        yield self._keep(text, doc_id, meta)

    def _keep(self, text: str, doc_id: str, meta: dict[str, Any]) -> Document:
        self.kept += 1
        self.stats.count_kept(self.source, text)
        return Document(text=text, source=self.source, doc_id=doc_id, meta=meta)

    def finish(self) -> None:
        dropped = dict(sorted(self.dropped.items()))
        if self.kept == 0:
            detail = f"; dropped {dropped}" if dropped else ""
            raise DataError(f"{self.inputs}: no documents for source {self.source!r} (empty corpus{detail})")
        if self.report and dropped:
            log.warning("source %r (%s): kept %d documents, dropped %s", self.source, self.inputs, self.kept, dropped)


def _describe(spec: PathSpec) -> str:
    if isinstance(spec, (str, os.PathLike)):
        return os.fspath(spec)
    items = [os.fspath(s) for s in spec]
    return ", ".join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")


# ---------------------------------------------------------------------------------------
# Generic readers
# ---------------------------------------------------------------------------------------


def read_text_files(
    paths_or_glob: PathSpec, source: str, *, options: ReadOptions = ReadOptions(), stats: ReadStats | None = None
) -> Iterator[Document]:
    """One document per file (text exactly as stored); ``doc_id`` is the file's name (see ``resolve_inputs``)."""
    tally = _Tally(source, options, stats, _describe(paths_or_glob), dedupe=False)
    for path, name in resolve_inputs(paths_or_glob):
        with open_binary(path) as stream:
            data = stream.read()
        yield from tally.emit(_decode_whole(path, data, options), name, {"path": name})
    tally.finish()


def _field(record: Any, dotted: str, path: Path, line: int) -> Any:
    """``record["a"]["b"]`` for ``dotted == "a.b"``; DataError naming what is missing and what exists."""
    value = record
    walked: list[str] = []
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            where = ".".join(walked) or "top level"
            available = sorted(value) if isinstance(value, dict) else f"a {type(value).__name__}, not an object"
            raise DataError(f"{path}:{line}: field {dotted!r} missing (available at {where}: {available})")
        value = value[key]
        walked.append(key)
    return value


def _text_value(value: Any, path: Path, line: int, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{path}:{line}: field {field!r} must be a string, got {type(value).__name__} {value!r:.60}")
    return value


def _json_records(path: Path, options: ReadOptions) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON or None for an invalid UTF-8 line to drop) of non-blank lines."""
    with open_binary(path) as stream:
        for number, line in _lines(path, stream, options):
            if line is None:
                yield number, None
                continue
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno})") from None


# (line number, text or None for an invalid UTF-8 record to drop, document id) of one record.
_Row = tuple[int, str | None, str]


def _read_rows(
    path: PathSpec,
    source: str,
    rows: Callable[[Path, str], Iterable[_Row]],
    options: ReadOptions,
    stats: ReadStats | None,
    dedupe: bool,
) -> Iterator[Document]:
    """Documents of ``rows(file, name)`` over every input file, with ``file`` and ``line`` metadata."""
    tally = _Tally(source, options, stats, _describe(path), dedupe=dedupe)
    for file, name in resolve_inputs(path):
        for line, text, doc_id in rows(file, name):
            yield from tally.emit(text, doc_id, {"file": name, "line": line})
    tally.finish()


def read_jsonl(
    path: PathSpec,
    text_field: str,
    source: str,
    id_field: str | None = None,
    *,
    options: ReadOptions = ReadOptions(),
    stats: ReadStats | None = None,
) -> Iterator[Document]:
    """One document per JSON line; fields may be dotted paths (``"prompt.text"``).
    Without ``id_field`` the id is ``<file>:<line>``."""

    def rows(file: Path, name: str) -> Iterator[_Row]:
        for number, record in _json_records(file, options):
            if record is None:
                yield number, None, ""
                continue
            text = _text_value(_field(record, text_field, file, number), file, number, text_field)
            doc_id = f"{name}:{number}" if id_field is None else str(_field(record, id_field, file, number))
            yield number, text, doc_id

    yield from _read_rows(path, source, rows, options, stats, dedupe=id_field is not None)


def _raise_csv_field_limit() -> None:
    limit = sys.maxsize
    while limit > csv.field_size_limit():
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:  # C long is 32-bit on some platforms
            limit //= 2


def _csv_rows(path: Path, options: ReadOptions, required: Sequence[str], optional: Sequence[str] = ()):
    """(column index, first line, row, has invalid UTF-8) per record; ``column index`` maps
    each required column and each optional column the header has to its position."""
    _raise_csv_field_limit()
    with open_binary(path) as stream:
        bad_lines: list[int] = []
        lines = _lines(path, stream, options, bad_lines if options.invalid_utf8 == "drop" else None)
        reader = csv.reader((text for _, text in lines))
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: empty CSV file (expected a header with columns {list(required)})")
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(f"{path}:1: missing column(s) {missing} (columns: {header})")
            index = {c: header.index(c) for c in [*required, *optional] if c in header}
            previous_end = reader.line_num
            for row in reader:
                start, end = previous_end + 1, reader.line_num
                previous_end = end
                if not row:
                    continue
                if len(row) < len(header):
                    raise DataError(f"{path}:{start}: row has {len(row)} fields, the header has {len(header)}")
                invalid = bool(bad_lines) and bad_lines[-1] >= start  # csv reads no further than ``end``
                yield index, start, row, invalid
        except csv.Error as err:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None


def read_csv(
    path: PathSpec,
    text_column: str,
    source: str,
    id_column: str | None = None,
    *,
    options: ReadOptions = ReadOptions(),
    stats: ReadStats | None = None,
) -> Iterator[Document]:
    """One document per CSV row (header required; fields may be huge and span lines).
    Without ``id_column`` the id is ``<file>:<line>``."""
    required = [text_column] + ([id_column] if id_column is not None else [])

    def rows(file: Path, name: str) -> Iterator[_Row]:
        for index, line, row, invalid in _csv_rows(file, options, required):
            doc_id = f"{name}:{line}" if id_column is None else row[index[id_column]]
            yield line, None if invalid else row[index[text_column]], doc_id

    yield from _read_rows(path, source, rows, options, stats, dedupe=id_column is not None)


# ---------------------------------------------------------------------------------------
# Project Gutenberg
# ---------------------------------------------------------------------------------------

_PG = r"PROJECT\s+GUTENBERG"
# The header ends with "*** START OF THE PROJECT GUTENBERG EBOOK <TITLE> ***" (the title may
# wrap onto the next line) or, in old files, "*END*THE SMALL PRINT! ... *END*".
_GUTENBERG_HEADER_END = re.compile(
    rf"^[ \t]*\*{{3}}\s*START\s+OF\s+(?:THE\s+|THIS\s+)?{_PG}(?:[^*]{{0,300}}\*{{3}}|[^\n]*)"
    r"|^[ \t]*\*END\*\s*THE\s+SMALL\s+PRINT![^\n]*",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_FOOTER_START = re.compile(
    r"^[ \t]*(?:"
    rf"\*{{3}}\s*END\s+OF\s+(?:THE\s+|THIS\s+)?{_PG}"
    rf"|End\s+of\s+(?:the\s+|this\s+)?{_PG}(?:['’]s)?\b"  # End of (the) Project Gutenberg('s) EBook of ...
    r"|\*{3}\s*START:\s*FULL\s+LICENSE"
    r")",
    re.IGNORECASE | re.MULTILINE,
)
# Front matter before the book proper: producer credits and the wrapped tail of a START line.
_CREDIT_START = re.compile(
    r"(?:produced|prepared|transcribed|digitized|scanned|proofread)\s+(?:by|from|for)\b"
    r"|e-?text\s+(?:was\s+)?(?:prepared|produced)\b"
    r"|this\s+e-?(?:book|text)\s+was\s+(?:prepared|produced|created|made)\b",
    re.IGNORECASE,
)
_CREDIT_MENTION = re.compile(
    rf"{_PG}|distributed\s+proofread|pgdp\.net|gutenberg\.org|internet\s+archive", re.IGNORECASE
)
_MARKER_RESIDUE = re.compile(r"[^a-z\n]{0,80}\*{3}\s*")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_FRONT_MATTER_MAX_CHARS = 600
_FRONT_MATTER_MAX_PARAGRAPHS = 3


def _is_front_matter(paragraph: str) -> bool:
    if len(paragraph) > _FRONT_MATTER_MAX_CHARS:
        return False
    return bool(
        _CREDIT_START.match(paragraph) or _CREDIT_MENTION.search(paragraph) or _MARKER_RESIDUE.fullmatch(paragraph)
    )


def strip_gutenberg_boilerplate(text: str) -> tuple[str, tuple[str, ...]]:
    """(book body, parts removed) for a Project Gutenberg text.

    Removes the licence header up to the ``*** START OF ... ***`` marker (or the older
    ``*END*THE SMALL PRINT!`` line); up to three short leading front-matter paragraphs
    (producer credits such as "Produced by ..." / "Transcribed from ...", paragraphs naming
    Project Gutenberg or the proofreading team, the wrapped tail of a START marker); and
    everything from a footer marker (``*** END OF ...``, ``End of (the) Project
    Gutenberg's ...``) in the second half of the body. Line endings become ``\n`` and outer
    whitespace is trimmed; text without boilerplate is otherwise unchanged.
    """
    body = text.replace("\r\n", "\n").replace("\r", "\n")
    removed: list[str] = []
    header = _GUTENBERG_HEADER_END.search(body, 0, max(len(body) // 2, 1))
    if header:
        body = body[header.end() :]
        removed.append("header")
    for _ in range(_FRONT_MATTER_MAX_PARAGRAPHS):
        body = body.lstrip()
        split = _PARAGRAPH_BREAK.search(body)
        if split is None or not _is_front_matter(body[: split.start()]):
            break
        body = body[split.end() :]
        if "credits" not in removed:
            removed.append("credits")
    footer = _GUTENBERG_FOOTER_START.search(body, len(body) // 2)
    if footer:
        body = body[: footer.start()]
        removed.append("footer")
    return body.strip(), tuple(removed)


def _book_name(name: str) -> str:
    for suffix in (".gz", ".txt"):
        name = name.removesuffix(suffix)
    return name


def read_gutenberg(
    dir_or_files: PathSpec,
    source: str = "gutenberg",
    *,
    options: ReadOptions = ReadOptions(),
    stats: ReadStats | None = None,
) -> Iterator[Document]:
    """One document per book file (``<Author>/<Title>.txt[.gz]``), boilerplate stripped.

    ``meta``: ``author`` (the parent folder), ``title`` (the file name), ``boilerplate``
    (the parts removed: header, credits, footer). ``doc_id`` is ``<author>/<title>``.
    """
    tally = _Tally(source, options, stats, _describe(dir_or_files), dedupe=True)
    for path, _ in resolve_inputs(dir_or_files, suffixes=(".txt", ".txt.gz")):
        with open_binary(path) as stream:
            raw = _decode_whole(path, stream.read(), options)
        author, title = path.parent.name, _book_name(path.name)
        body, removed = (None, ()) if raw is None else strip_gutenberg_boilerplate(raw)
        meta = {"author": author, "title": title, "boilerplate": list(removed)}
        yield from tally.emit(body, f"{author}/{title}", meta)
    tally.finish()


# ---------------------------------------------------------------------------------------
# 4chan
# ---------------------------------------------------------------------------------------

_CLASS = r"""\bclass\s*=\s*["'][^"']*\b{name}\b[^"']*["']"""
_REPLY_ANCHOR = re.compile(rf"<a\b[^>]*{_CLASS.format(name='quotelink')}[^>]*>.*?</a\s*>", re.IGNORECASE | re.DOTALL)
_DEAD_LINK = re.compile(rf"<span\b[^>]*{_CLASS.format(name='deadlink')}[^>]*>.*?</span\s*>", re.IGNORECASE | re.DOTALL)
# A quote span starts its own line: after <br> or at the start nothing is added, elsewhere a line break.
_QUOTE_OPEN = re.compile(rf"(<br\s*/?>|\A)?\s*<span\b[^>]*{_CLASS.format(name='quote')}[^>]*>", re.IGNORECASE)
_LINE_BREAK = re.compile(r"<br\s*/?>|</?(?:p|div|pre|li|ul|ol|blockquote|h[1-6]|tr)\b[^>]*>", re.IGNORECASE)
_WORD_BREAK = re.compile(r"<wbr\s*/?>", re.IGNORECASE)
_TAG = re.compile(r"<!--.*?-->|</?[a-zA-Z][^>]*>", re.DOTALL)
# Reply references left as plain text: >>123, >>>/pol/123, >>>/pol/
_PLAIN_REPLY = re.compile(r">>>/[A-Za-z0-9]+/\d*|(?<!>)>>\d+")
_BLANK_RUNS = re.compile(r"\n{3,}")


def clean_4chan_html(markup: str | None) -> str:
    """Plain text of a 4chan post body (the API's ``com`` HTML).

    ``<br>`` and block tags become line breaks (raw newlines are HTML whitespace);
    greentext ``<span class="quote">&gt;text</span>`` becomes a ``>text`` line; reply
    references (``<a class="quotelink">&gt;&gt;123</a>``, cross-board ``>>>/pol/123``,
    dead links and plain ``>>123``) are removed; other tags are stripped keeping their
    text (``<wbr>`` joins); entities are unescaped; each line's whitespace is collapsed,
    runs of blank lines become one, and the result is trimmed ("" when nothing is left).
    """
    if not markup:
        return ""
    text = markup.replace("\r", " ").replace("\n", " ")
    if "<" in text:
        text = _REPLY_ANCHOR.sub("", text)
        text = _DEAD_LINK.sub("", text)
        text = _QUOTE_OPEN.sub(lambda m: "" if m.group(1) == "" else "\n", text)
        text = _LINE_BREAK.sub("\n", text)
        text = _WORD_BREAK.sub("", text)
        text = _TAG.sub("", text)
    if "&" in text:
        text = html.unescape(text)
    if ">>" in text:
        text = _PLAIN_REPLY.sub("", text)
    lines = (" ".join(line.split()) for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip()


@dataclasses.dataclass(frozen=True)
class _Post:
    no: int
    thread: int
    time: Any  # as in the source: "YYYY-MM-DD HH:MM:SS" (CSV) or unix seconds (ndjson)
    text: str | None  # cleaned; None = invalid UTF-8
    subject: str
    meta: dict[str, Any]


def _post_text(post: _Post, include_subject: bool) -> str | None:
    if post.text is None:
        return None
    if include_subject and post.subject and post.no == post.thread:
        return f"{post.subject}\n{post.text}".strip()
    return post.text


def _emit_posts(
    posts: Iterable[_Post], tally: _Tally, documents: str, include_subject: bool
) -> Iterator[Document]:
    if documents == "posts":
        for post in posts:
            meta = {"thread": post.thread, "time": post.time, **post.meta}
            yield from tally.emit(_post_text(post, include_subject), str(post.no), meta)
        return
    threads: dict[int, dict[int, _Post]] = {}
    for post in posts:
        thread = threads.setdefault(post.thread, {})
        if post.no in thread:
            tally.drop(DROP_DUPLICATE_ID)
        else:
            thread[post.no] = post
    for thread_no, members in threads.items():
        ordered = sorted(members.values(), key=lambda p: (p.time is None, 0 if p.time is None else p.time, p.no))
        texts = []
        for post in ordered:
            text = _post_text(post, include_subject)
            if text is None:
                tally.drop(DROP_INVALID_UTF8)
            elif text:
                texts.append(text)
            else:
                tally.drop(DROP_EMPTY_POST)
        op = members.get(thread_no)
        meta = {"posts": len(texts), "time": ordered[0].time, "subject": op.subject if op else ""}
        yield from tally.emit("\n\n".join(texts), str(thread_no), meta)


def _check_documents(documents: str) -> None:
    if documents not in ("posts", "threads"):
        raise ConfigError(f"documents: expected 'posts' or 'threads', got {documents!r}")


def _read_posts(
    path: PathSpec,
    source: str,
    documents: str,
    include_subject: bool,
    options: ReadOptions,
    stats: ReadStats | None,
    posts_of: Callable[[Path, _Tally], Iterable[_Post]],
) -> Iterator[Document]:
    """Post or thread documents of ``posts_of(file, tally)`` over every input file, a post id counted once."""
    _check_documents(documents)
    tally = _Tally(source, options, stats, _describe(path), dedupe=True)
    posts = (post for file, _ in resolve_inputs(path) for post in posts_of(file, tally))
    yield from _emit_posts(posts, tally, documents, include_subject)
    tally.finish()


def _as_int(value: Any, path: Path, line: int, field: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DataError(f"{path}:{line}: field {field!r} must be an integer post number, got {value!r}") from None


POL_CSV_COLUMNS = ("", "comment", "time", "thread")  # required; "subject" and "country" are used when present


def _csv_posts(path: Path, options: ReadOptions) -> Iterator[_Post]:
    for index, line, row, invalid in _csv_rows(path, options, POL_CSV_COLUMNS, optional=("subject", "country")):
        values = {c: row[i] for c, i in index.items()}
        meta = {"country": values["country"]} if values.get("country") else {}
        yield _Post(
            no=_as_int(values[""], path, line, "(post number, first column)"),
            thread=_as_int(values["thread"], path, line, "thread"),
            time=values["time"],
            text=None if invalid else clean_4chan_html(values["comment"]),
            subject="" if invalid else clean_4chan_html(values.get("subject", "")),
            meta=meta,
        )


def read_4chan_csv(
    path: PathSpec,
    source: str = "pol",
    documents: Literal["posts", "threads"] = "posts",
    *,
    include_subject: bool = True,
    options: ReadOptions = ReadOptions(),
    stats: ReadStats | None = None,
) -> Iterator[Document]:
    """4chan posts from the scraped CSV (header ``,name,comment,time,country,thread,subject,threadtime``).

    ``documents="posts"``: one document per post, id = post number, meta ``thread``,
    ``time``, ``country``. ``"threads"``: one document per thread (all given files
    together), its posts in time order separated by blank lines, id = thread number,
    meta ``posts`` (non-empty posts), ``time`` (first post), ``subject``. The thread
    subject opens the OP post's text unless ``include_subject=False``. A post seen twice
    (e.g. a sticky in several daily files) counts once (``duplicate_id``).
    """
    yield from _read_posts(
        path, source, documents, include_subject, options, stats, lambda file, tally: _csv_posts(file, options)
    )


def _ndjson_posts(path: Path, options: ReadOptions, tally: _Tally) -> Iterator[_Post]:
    for number, record in _json_records(path, options):
        if record is None:
            tally.drop(DROP_INVALID_UTF8)  # a whole thread on one line: count it once
            continue
        posts = record.get("posts") if isinstance(record, dict) else None
        if not isinstance(posts, list) or not posts:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}:{number}: expected a thread object with a non-empty 'posts' list (got {keys})")
        first_no = None
        for post in posts:
            if not isinstance(post, dict):
                raise DataError(f"{path}:{number}: each post must be an object, got {type(post).__name__}")
            no = _as_int(_field(post, "no", path, number), path, number, "no")
            first_no = no if first_no is None else first_no
            resto = post.get("resto")  # 0 for the OP, else the thread number; absent: the line's first post
            thread = first_no if resto is None else (_as_int(resto, path, number, "resto") or no)
            meta = {k: post[k] for k in ("country", "perspectives") if post.get(k) is not None}
            yield _Post(
                no=no,
                thread=thread,
                time=post.get("time"),
                text=clean_4chan_html(_text_value(post.get("com"), path, number, "com")),
                subject=clean_4chan_html(_text_value(post.get("sub"), path, number, "sub")),
                meta=meta,
            )


def read_4chan_ndjson(
    path: PathSpec,
    source: str = "pol",
    documents: Literal["posts", "threads"] = "posts",
    *,
    include_subject: bool = True,
    options: ReadOptions = ReadOptions(),
    stats: ReadStats | None = None,
) -> Iterator[Document]:
    """4chan posts from the "Raiders of the Lost Kek" archive (or 4chan API thread dumps):
    one JSON object per line, ``{"posts": [...]}``, each post with ``no``, ``resto`` (0 for
    the OP, else the thread number), ``time`` (unix seconds), HTML ``com`` (absent for
    image-only posts), optional ``sub``, ``country`` and ``perspectives`` (Perspective API
    scores, kept in meta). Documents as in ``read_4chan_csv``."""
    yield from _read_posts(
        path, source, documents, include_subject, options, stats, lambda file, tally: _ndjson_posts(file, options, tally)
    )


# ---------------------------------------------------------------------------------------
# TFDS
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# WikiText
# ---------------------------------------------------------------------------------------

_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $", re.M)


def is_wikitext(text: str) -> bool:
    """Whether ``text`` is in the WikiText release format (`` = Title = `` article headings)."""
    return _WIKITEXT_TITLE.search(text) is not None


def detokenize_wikitext(text: str) -> str:
    """Undo WikiText's tokenization artefacts (`` @-@ ``, `` @,@ ``, spaces before punctuation)."""
    text = re.sub(r" @(.)@ ", r"\1", text)
    text = re.sub(r" ([.,;:!?)\]'])", r"\1", text)
    text = re.sub(r"([(\[]) ", r"\1", text)
    return text


def wikitext_articles(text: str) -> list[str]:
    """A WikiText file's articles (split at `` = Title = `` headings), detokenized, stripped."""
    pieces = re.split(r"^ = (?=[^=])", text, flags=re.M)
    return [article for article in (detokenize_wikitext(" = " + p).strip() for p in pieces if p.strip()) if article]


def read_wikitext(
    paths_or_glob: PathSpec, source: str, *, options: ReadOptions = ReadOptions(), stats: ReadStats | None = None
) -> Iterator[Document]:
    """One document per WikiText article (``wikitext_articles``); ``doc_id`` is ``<file>:<index>``."""
    tally = _Tally(source, options, stats, _describe(paths_or_glob), dedupe=False)
    for path, name in resolve_inputs(paths_or_glob):
        with open_binary(path) as stream:
            text = _decode_whole(path, stream.read(), options)
        if text is None:  # invalid UTF-8 with invalid_utf8: drop (counted)
            yield from tally.emit(None, name, {"path": name})
            continue
        if not is_wikitext(text):
            raise DataError(f"{path}: not in the WikiText format (no ' = Title = ' article headings)")
        for index, article in enumerate(wikitext_articles(text)):
            yield from tally.emit(article, f"{name}:{index}", {"path": name, "article": index})
    tally.finish()


def read_tfds(
    name: str,
    split: str,
    text_key: str = "text",
    source: str | None = None,
    data_dir: str | os.PathLike | None = None,
    *,
    id_key: str | None = None,
    options: ReadOptions = ReadOptions(),
    stats: ReadStats | None = None,
    chunk: int = 256,
) -> Iterator[Document]:
    """Documents of an already prepared TFDS dataset via ``tfds.data_source`` (random access,
    no TensorFlow needed; never downloads). The dataset must be stored as ArrayRecord (or
    Parquet), e.g. ``c4/en`` prepared with ``file_format="array_record"``. ``doc_id`` is
    ``<split>:<index>`` or the ``id_key`` feature (e.g. ``"url"`` for C4)."""
    import tensorflow_datasets as tfds  # heavy: imported on use

    where = f"TFDS dataset {name!r} split {split!r}" + (f" in {data_dir}" if data_dir is not None else "")
    try:
        data = tfds.data_source(name, split=split, data_dir=None if data_dir is None else os.fspath(data_dir), download=False)
    except Exception as err:  # tfds raises ValueError, NotImplementedError, AssertionError, OSError...
        reason = (str(err).strip().splitlines() or [""])[0]  # DatasetNotFoundError lists every dataset below
        raise DataError(f"{where}: cannot open as a random-access data source ({type(err).__name__}: {reason})") from err
    tally = _Tally(source or name, options, stats, where, dedupe=id_key is not None)
    features = getattr(getattr(data, "dataset_info", None), "features", None)
    keys = sorted(features.keys()) if features is not None and hasattr(features, "keys") else None
    for key in (text_key, id_key):
        if key is not None and keys is not None and key not in keys:
            raise DataError(f"{where}: no feature {key!r} (features: {keys})")
    decode: Callable[[Any], str | None] = _tfds_text(where, options)
    for start in range(0, len(data), chunk):
        indices = list(range(start, min(start + chunk, len(data))))
        records = data.__getitems__(indices) if hasattr(data, "__getitems__") else [data[i] for i in indices]
        for index, record in zip(indices, records):
            if text_key not in record:
                raise DataError(f"{where}: record {index} has no feature {text_key!r} (features: {sorted(record)})")
            doc_id = f"{split}:{index}" if id_key is None else str(decode(record[id_key]))
            yield from tally.emit(decode(record[text_key]), doc_id, {"index": index})
    tally.finish()


def _tfds_text(where: str, options: ReadOptions) -> Callable[[Any], str | None]:
    def decode(value: Any) -> str | None:
        if isinstance(value, str):
            return value
        if hasattr(value, "item") and not isinstance(value, (bytes, bytearray)):
            value = value.item()  # numpy scalar
        if isinstance(value, (bytes, bytearray)):
            try:
                return bytes(value).decode("utf-8")
            except UnicodeDecodeError as err:
                if options.invalid_utf8 == "drop":
                    return None
                raise DataError(f"{where}: invalid UTF-8 in a text feature at byte {err.start} ({err.reason})") from None
        return str(value)

    return decode
