"""Prompt/response data for post-training (SFT and DPO): JSONL files -> masked batches.

Formats (``ExampleDataConfig.format``), one JSON object per line, plain or ``.gz``; each
file is one *source*, named by its stem (``toxic.jsonl.gz`` -> ``toxic``):

- ``sft``: ``{"prompt": str, "response": str}``
- ``preference``: ``{"prompt": str, "chosen": str, "rejected": str}``

(the field names are settings). A line that is not a JSON object, a missing field or a
value that is not a string is an ``ExampleDataError`` naming ``FILE:LINE`` and the field;
so is a file with no rows. Rows are *dropped*, and counted per file and reason in
``summary()``, for exactly these reasons and no others:

- ``empty_response``: the response (or chosen / rejected) is empty or whitespace;
- ``identical_pair``: a preference row whose chosen and rejected texts are equal;
- ``response_too_long`` (``too_long: cut_prompt``): the response, its EOS and one prompt
  token do not fit in ``seq_len``;
- ``too_long`` (``too_long: drop``): prompt and response together do not fit.

With ``too_long: cut_prompt`` (the default) a longer example keeps the *last* tokens of its
prompt, those next to the response, and the whole response (counted as ``prompt_cut``; a
preference pair cuts its one prompt to fit the longer of its two responses).

Tokens. Prompt and response are tokenized *separately* and concatenated, so the boundary
between them is exact: no BPE merge spans it, and the prompt's tokens are the ones the model
sees when it is given the prompt alone at generation time (tokenizing ``prompt + response``
as one text could merge the prompt's last bytes with the response's first). ``add_eos``
appends the tokenizer's EOS to every response. An empty prompt becomes the single token EOS
(the document boundary a pretrained model starts documents from; counted as
``empty_prompt``), so every example starts with at least one prompt token.

Mask semantics. ``loss_mask[t] = 1`` iff token ``t`` is a response token (its EOS included):
a target the loss trains, predicted from position ``t - 1``. Prompt tokens and padding are 0.
Since every example starts with a prompt token (mask 0), no trained target is ever
predicted across an example boundary.

Batches (numpy int32; this process's rows ``[p*B/n, (p+1)*B/n)`` of the global batch of
``batch_size`` rows, every batch full):

- ``sft``: ``tokens, segment_ids, positions, loss_mask`` [B/n, seq_len] and ``source_ids``
  [B/n]. With ``pack`` (the default) whole examples are packed greedily into rows in the
  epoch's order: an example that does not fit in the rest of a row starts the next row, so
  no example is ever split. ``segment_ids`` are 1..k for the examples of a row and 0 on
  padding, ``positions`` restart at 0 for every example, padding is ``pad_id`` with mask 0;
  a row's source is the source of its first example. ``pack: false``: one example per row.
- ``preference``: ``chosen_tokens, chosen_segment_ids, chosen_loss_mask, rejected_tokens,
  rejected_segment_ids, rejected_loss_mask`` [B/n, seq_len] (one pair per row, padded;
  segment id 1 on real tokens, 0 on padding; positions are ``0..len-1``), ``example_index``
  [B/n] (the pair's index in the tokenized dataset order: files in config order, lines in
  file order, dropped rows skipped; stable across runs, e.g. for reference log-probs
  computed once with ``preference_arrays``) and ``source_ids`` [B/n].

The stream is endless: epoch ``e`` visits every kept example once, in the permutation seeded
by ``(seed, e)``; a batch (and a packed row) may span an epoch boundary.

Resumption. ``get_state()`` (JSON) holds the epoch, the position in the epoch's order of the
next example not yet placed in a row (packing never carries a partial row over, so this is the
whole stream state), the step, per-source counts, the seed and the dataset fingerprint with
the identity it hashes. ``set_state`` continues identically and refuses, naming the
difference, a state of another dataset (a changed file, tokenizer or tokenization setting), of
another ``seq_len`` or seed. The batch size and the number of processes may change on resume.

``summary()`` fingerprints the dataset: the sha256 of each file's bytes, the tokenizer's
fingerprint and the settings that decide the tokenized examples and their ``example_index``
(format, fields, ``seq_len``, ``add_eos``, ``too_long``); not the paths (a moved file is the
same data) nor the stream settings (seed, batch size, packing).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np

from jaxlm.config import ConfigError
from jaxlm.data import DataError
from jaxlm.data.labelled import jsonl_records
from jaxlm.data.pipeline import _ProcessRows, to_global_array
from jaxlm.data.records import file_sha256

STATE_VERSION = 1
STATE_KIND = "examples"
SFT_KEYS = ("tokens", "segment_ids", "positions", "loss_mask")
PAIR_KEYS = (
    "chosen_tokens",
    "chosen_segment_ids",
    "chosen_loss_mask",
    "rejected_tokens",
    "rejected_segment_ids",
    "rejected_loss_mask",
)
PROGRESS_MIN_ROWS = 1000  # files with more rows show a progress bar while they are tokenized
_ENCODE_CHUNK = 512
_ORDER_SALT = 0x65786D  # keeps the epoch permutations apart from other seeded streams


class ExampleDataError(DataError):
    """Unusable prompt/response data or state: the message names the file:line or field."""


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExampleDataConfig:
    """Prompt/response JSONL files (one source per file) in global batches of ``seq_len`` rows.

    ``pack``: SFT only, default true (whole examples packed into rows; false: one example per
    row, padded). Preference pairs are always one pair per row, so ``pack: true`` is refused
    there. The files are checked when the pipeline is built (``resolved_paths``), not here, so
    a config can name data that an earlier stage has yet to write.
    """

    paths: tuple[str, ...]
    format: Literal["sft", "preference"]
    seq_len: int
    batch_size: int  # global, all processes together
    prompt_field: str = "prompt"
    response_field: str = "response"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    seed: int = 0
    pack: bool | None = None  # None: true for sft
    add_eos: bool = True
    too_long: Literal["cut_prompt", "drop"] = "cut_prompt"

    def __post_init__(self) -> None:
        if not self.paths:
            raise ConfigError("examples.paths: expected at least one JSONL file")
        for i, path in enumerate(self.paths):
            if not isinstance(path, str) or not path.strip():
                raise ConfigError(f"examples.paths[{i}]: expected a file path, got {path!r}")
        if self.format not in ("sft", "preference"):
            raise ConfigError(f"examples.format: expected 'sft' or 'preference', got {self.format!r}")
        if self.too_long not in ("cut_prompt", "drop"):
            raise ConfigError(f"examples.too_long: expected 'cut_prompt' or 'drop', got {self.too_long!r}")
        if self.seq_len < 2:
            raise ConfigError(f"examples.seq_len: expected an integer >= 2 (a prompt and a response token), got {self.seq_len}")
        if self.batch_size <= 0:
            raise ConfigError(f"examples.batch_size: expected a positive integer, got {self.batch_size}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"examples.seed: expected a non-negative integer, got {self.seed}")
        if self.format == "preference" and self.pack:
            raise ConfigError(
                "examples.pack: preference pairs are always one pair per row (padded); packing applies to sft only"
            )
        names = {name: getattr(self, name) for name in self.field_settings}
        for name, value in names.items():
            if not isinstance(value, str) or not value:
                raise ConfigError(f"examples.{name}: expected a non-empty field name, got {value!r}")
        if len(set(names.values())) != len(names):
            listed = ", ".join(f"{k}={v!r}" for k, v in names.items())
            raise ConfigError(f"data: the {self.format} fields must be distinct, got {listed}")

    @property
    def field_settings(self) -> tuple[str, ...]:
        """Names of the settings that name this format's JSON fields (prompt first)."""
        if self.format == "sft":
            return ("prompt_field", "response_field")
        return ("prompt_field", "chosen_field", "rejected_field")

    @property
    def fields(self) -> dict[str, str]:
        """Role (``prompt``, ``response`` | ``chosen``, ``rejected``) -> JSON field name."""
        return {setting.removesuffix("_field"): getattr(self, setting) for setting in self.field_settings}

    @property
    def packs(self) -> bool:
        return self.format == "sft" and self.pack is not False

    def resolved_paths(self) -> tuple[Path, ...]:
        """``paths`` with ``$VARS`` and ``~`` expanded; a missing file is a ConfigError naming it."""
        resolved = []
        for i, raw in enumerate(self.paths):
            path = Path(os.path.expanduser(os.path.expandvars(raw)))
            if not path.is_file():
                unset = " (an unset environment variable?)" if "$" in str(path) else ""
                raise ConfigError(f"examples.paths[{i}]: {raw!r}: no such file {path}{unset}")
            resolved.append(path)
        names = [source_name(path) for path in resolved]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ConfigError(
                f"examples.paths: files name each source by their stem, and {', '.join(map(repr, repeated))} "
                "occurs more than once; rename the files"
            )
        return tuple(resolved)


def source_name(path: str | os.PathLike) -> str:
    """A file's source name: its name without ``.gz`` and then one more suffix."""
    name = Path(path).name.removesuffix(".gz")
    return Path(name).stem if Path(name).suffix else name


def drop_reasons(config: ExampleDataConfig) -> tuple[str, ...]:
    """The reasons rows of this config can be dropped for (see the module doc)."""
    reasons = ["empty_response"]
    if config.format == "preference":
        reasons.append("identical_pair")
    reasons.append("response_too_long" if config.too_long == "cut_prompt" else "too_long")
    return tuple(reasons)


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------


def read_examples(
    path: str | os.PathLike, config: ExampleDataConfig, dropped: Counter | None = None
) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of each usable row of one JSONL file; the row's keys are the roles
    of ``config.fields`` (``prompt``, ``response`` | ``chosen``, ``rejected``).

    Rows with an empty response (``empty_response``) or equal chosen and rejected texts
    (``identical_pair``) are not yielded; ``dropped`` counts them by reason.
    """
    path = Path(path)
    fields = config.fields
    seen = 0
    for line_no, record in jsonl_records(path, ExampleDataError, "example JSONL"):
        seen += 1
        row = {role: _string_field(record, field, path, line_no) for role, field in fields.items()}
        reason = _row_drop_reason(row)
        if reason is None:
            yield line_no, row
        elif dropped is not None:
            dropped[reason] += 1
    if not seen:
        raise ExampleDataError(f"{path}: no rows (expected one JSON object per line with fields {list(fields.values())})")


def _string_field(record: Mapping[str, Any], field: str, path: Path, line_no: int) -> str:
    if field not in record:
        raise ExampleDataError(f"{path}:{line_no}: missing field {field!r} (the row has: {', '.join(sorted(record)) or 'no fields'})")
    value = record[field]
    if not isinstance(value, str):
        got = "null" if value is None else f"{type(value).__name__} {json.dumps(value)[:60]}"
        raise ExampleDataError(f"{path}:{line_no}: field {field!r}: expected a string, got {got}")
    return value


def _row_drop_reason(row: Mapping[str, str]) -> str | None:
    responses = [row[role] for role in ("response", "chosen", "rejected") if role in row]
    if any(not text.strip() for text in responses):
        return "empty_response"
    if "chosen" in row and row["chosen"] == row["rejected"]:
        return "identical_pair"
    return None


# ---------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExampleSet:
    """The tokenized examples in dataset order (``example_index`` = position here).

    ``sequences``: one list per side (sft: the examples; preference: chosen, rejected), each
    item ``prompt + response (+ EOS)`` as int32; ``prompt_lengths[i]``: prompt tokens of
    example ``i`` (shared by both sides of a pair); ``source_ids[i]``: its file.
    """

    format: str
    source_names: tuple[str, ...]
    sequences: tuple[list[np.ndarray], ...]
    prompt_lengths: np.ndarray
    source_ids: np.ndarray
    files: tuple[dict[str, Any], ...]  # per-file reading and dropping counts (summary())

    def __len__(self) -> int:
        return len(self.source_ids)

    def length(self, index: int) -> int:
        """Tokens of example ``index`` (the longer side of a pair)."""
        return max(len(side[index]) for side in self.sequences)

    def target_tokens(self, index: int) -> int:
        """Trained (mask 1) tokens of example ``index``, both sides of a pair together."""
        return sum(len(side[index]) for side in self.sequences) - len(self.sequences) * int(self.prompt_lengths[index])


def fit_example(
    prompt: Sequence[int], response_length: int, seq_len: int, too_long: str
) -> tuple[Sequence[int] | None, str | None]:
    """``(prompt tokens to keep, None)``, or ``(None, drop reason)`` (see the module doc).

    ``response_length`` counts the response's tokens with its EOS.
    """
    if len(prompt) + response_length <= seq_len:
        return prompt, None
    if too_long == "drop":
        return None, "too_long"
    room = seq_len - response_length
    if room < 1:
        return None, "response_too_long"
    return prompt[len(prompt) - room :], None


def _encode_texts(tokenizer, texts: Sequence[str], bar) -> list[list[int]]:
    encoded: list[list[int]] = []
    for start in range(0, len(texts), _ENCODE_CHUNK):
        chunk = texts[start : start + _ENCODE_CHUNK]
        encoded.extend(tokenizer.encode_batch(chunk))
        bar.update(len(chunk))
    return encoded


def tokenize_file(path: Path, config: ExampleDataConfig, tokenizer, progress: bool = True):
    """One file's kept examples ``(sequences per side, prompt lengths)`` and its counts."""
    from tqdm import tqdm

    dropped: Counter = Counter()
    rows = [row for _, row in read_examples(path, config, dropped)]
    roles = list(config.fields)
    sides = roles[1:]
    bar = tqdm(
        total=len(rows) * len(roles),
        desc=f"tokenizing {path.name}",
        unit="text",
        disable=not progress or len(rows) + sum(dropped.values()) <= PROGRESS_MIN_ROWS,
    )
    with bar:
        encoded = {role: _encode_texts(tokenizer, [row[role] for row in rows], bar) for role in roles}
    eos = [tokenizer.eos_id] if config.add_eos else []
    sequences: tuple[list[np.ndarray], ...] = tuple([] for _ in sides)
    prompt_lengths: list[int] = []
    prompt_cut = empty_prompt = 0
    for i in range(len(rows)):
        prompt = encoded["prompt"][i]
        if not prompt:
            prompt, empty_prompt = [tokenizer.eos_id], empty_prompt + 1
        responses = [encoded[side][i] + eos for side in sides]
        kept, reason = fit_example(prompt, max(map(len, responses)), config.seq_len, config.too_long)
        if kept is None:
            dropped[reason] += 1
            continue
        prompt_cut += len(kept) < len(prompt)
        for side, response in zip(sequences, responses):
            side.append(np.asarray([*kept, *response], np.int32))
        prompt_lengths.append(len(kept))
    counts = {
        "source": source_name(path),
        "path": str(path),
        "sha256": file_sha256(path),
        "rows": len(rows) + sum(dropped[r] for r in ("empty_response", "identical_pair")),
        "kept": len(prompt_lengths),
        "dropped": {reason: dropped[reason] for reason in drop_reasons(config)},
        "prompt_cut": prompt_cut,
        "empty_prompt": empty_prompt,
    }
    return sequences, prompt_lengths, counts


def tokenize_examples(config: ExampleDataConfig, tokenizer, progress: bool = True) -> ExampleSet:
    """Every file of ``config`` read and tokenized in memory (files in order, lines in order)."""
    paths = config.resolved_paths()
    n_sides = len(config.fields) - 1
    sequences: tuple[list[np.ndarray], ...] = tuple([] for _ in range(n_sides))
    prompt_lengths: list[int] = []
    source_ids: list[int] = []
    files = []
    for source_id, path in enumerate(paths):
        file_sequences, file_prompts, counts = tokenize_file(path, config, tokenizer, progress)
        for side, more in zip(sequences, file_sequences):
            side.extend(more)
        prompt_lengths.extend(file_prompts)
        source_ids.extend([source_id] * len(file_prompts))
        files.append(counts)
    if not prompt_lengths:
        dropped = Counter()
        for counts in files:
            dropped.update(counts["dropped"])
        raise ExampleDataError(
            f"{', '.join(map(str, paths))}: no usable examples (dropped: "
            f"{', '.join(f'{k}={v}' for k, v in dropped.items())})"
        )
    return ExampleSet(
        config.format,
        tuple(source_name(p) for p in paths),
        sequences,
        np.asarray(prompt_lengths, np.int32),
        np.asarray(source_ids, np.int32),
        tuple(files),
    )


# ---------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the examples."""
    return np.random.default_rng([seed, epoch, _ORDER_SALT]).permutation(num_examples)


def _empty_rows(keys: Sequence[str], rows: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    return {
        key: np.full((rows, seq_len), pad_id if key.endswith("tokens") else 0, np.int32) for key in keys
    }


def _place(arrays: Mapping[str, np.ndarray], prefix: str, row: int, offset: int, sequence: np.ndarray,
           prompt_length: int, segment: int) -> None:
    """Write one example at ``offset`` of ``row``: tokens, segment id, positions (if kept), mask."""
    span = slice(offset, offset + len(sequence))
    arrays[f"{prefix}tokens"][row, span] = sequence
    arrays[f"{prefix}segment_ids"][row, span] = segment
    arrays[f"{prefix}loss_mask"][row, offset + prompt_length : span.stop] = 1
    if f"{prefix}positions" in arrays:
        arrays[f"{prefix}positions"][row, span] = np.arange(len(sequence))


def sft_rows(examples: ExampleSet, rows: Sequence[Sequence[int]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """SFT arrays for rows of example indices (each row's examples placed one after another)."""
    arrays = _empty_rows(SFT_KEYS, len(rows), seq_len, pad_id)
    (sequences,) = examples.sequences
    for r, row in enumerate(rows):
        offset = 0
        for k, index in enumerate(row):
            _place(arrays, "", r, offset, sequences[index], int(examples.prompt_lengths[index]), k + 1)
            offset += len(sequences[index])
    arrays["source_ids"] = examples.source_ids[[row[0] for row in rows]]
    return arrays


def pair_rows(examples: ExampleSet, indices: Sequence[int], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Preference arrays, one pair per row, plus ``example_index`` and ``source_ids``."""
    arrays = _empty_rows(PAIR_KEYS, len(indices), seq_len, pad_id)
    chosen, rejected = examples.sequences
    for r, index in enumerate(indices):
        prompt_length = int(examples.prompt_lengths[index])
        _place(arrays, "chosen_", r, 0, chosen[index], prompt_length, 1)
        _place(arrays, "rejected_", r, 0, rejected[index], prompt_length, 1)
    arrays["example_index"] = np.asarray(indices, np.int32)
    arrays["source_ids"] = examples.source_ids[np.asarray(indices, np.int64)]
    return arrays


# ---------------------------------------------------------------------------------------
# Summary and fingerprint
# ---------------------------------------------------------------------------------------


def _token_stats(lengths: np.ndarray) -> dict[str, float]:
    return {"mean": float(lengths.mean()), "min": int(lengths.min()), "max": int(lengths.max())}


def dataset_identity(config: ExampleDataConfig, examples: ExampleSet, tokenizer) -> dict[str, Any]:
    """What the fingerprint hashes: file contents, tokenizer and the tokenization settings."""
    return {
        "version": STATE_VERSION,
        "format": config.format,
        "fields": config.fields,
        "seq_len": config.seq_len,
        "add_eos": config.add_eos,
        "too_long": config.too_long,
        "tokenizer": tokenizer.fingerprint(),
        "sources": {f["source"]: f["sha256"] for f in examples.files},
    }


def fingerprint_of(identity: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _identity_difference(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """The first difference between two dataset identities, in words."""
    for key in sorted(set(saved) | set(current)):
        before, now = saved.get(key), current.get(key)
        if before == now:
            continue
        if key == "sources" and isinstance(before, dict) and isinstance(now, dict):
            if set(before) != set(now):
                return f"sources {sorted(before)} -> {sorted(now)}"
            changed = [name for name in now if before[name] != now[name]]
            return f"source {changed[0]!r} has other contents (sha256 {str(before[changed[0]])[:12]} -> {now[changed[0]][:12]})"
        if key == "tokenizer":
            return f"another tokenizer (fingerprint {str(before)[:12]} -> {str(now)[:12]})"
        return f"{key} {before!r} -> {now!r}"
    return "the fingerprint differs"


# ---------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------


class ExamplePipeline:
    """Iterator of this process's batches of prompt/response data (see the module doc);
    the interface of ``jaxlm.data.pipeline.Pipeline``, so the training loop takes either."""

    def __init__(
        self,
        config: ExampleDataConfig,
        examples: ExampleSet,
        tokenizer,
        tokenizer_path: Path,
        *,
        process_index: int = 0,
        process_count: int = 1,
    ):
        self.config = config
        self.examples = examples
        self.process_index = process_index
        self.process_count = process_count
        self.vocab_size = tokenizer.vocab_size
        self.eos_id = tokenizer.eos_id
        self.pad_id = tokenizer.pad_id
        self._tokenizer_path = tokenizer_path
        self._identity = dataset_identity(config, examples, tokenizer)
        self.fingerprint = fingerprint_of(self._identity)
        self._tokenizer_fingerprint = tokenizer.fingerprint()
        self._rows = _ProcessRows(process_index, process_count, config.batch_size)
        self._epoch = self._position = self._step = 0
        self._order = epoch_order(len(examples), config.seed, 0)
        self._rows_per_source = [0] * len(examples.source_names)
        self._target_tokens_per_source = [0] * len(examples.source_names)
        self._closed = False

    # iteration --------------------------------------------------------------------------
    def __iter__(self) -> "ExamplePipeline":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._closed:
            raise RuntimeError("the data pipeline is closed")
        batch = self.global_batch()
        return self._rows(batch) if self.process_count > 1 else batch

    def global_batch(self) -> dict[str, np.ndarray]:
        """The next batch, all ``batch_size`` rows (every process computes the same one)."""
        rows = [self._next_row() for _ in range(self.config.batch_size)]
        for row in rows:
            self._rows_per_source[self.examples.source_ids[row[0]]] += 1
            for index in row:
                self._target_tokens_per_source[self.examples.source_ids[index]] += self.examples.target_tokens(index)
        self._step += 1
        if self.config.format == "sft":
            return sft_rows(self.examples, rows, self.config.seq_len, self.pad_id)
        return pair_rows(self.examples, [row[0] for row in rows], self.config.seq_len, self.pad_id)

    def _peek(self) -> int:
        if self._position == len(self._order):
            self._epoch, self._position = self._epoch + 1, 0
            self._order = epoch_order(len(self.examples), self.config.seed, self._epoch)
        return int(self._order[self._position])

    def _next_row(self) -> list[int]:
        """Example indices of the next row: greedy packing, or one example."""
        first = self._peek()
        row, used = [first], self.examples.length(first)
        self._position += 1
        while self.config.packs and used < self.config.seq_len:
            index = self._peek()
            length = self.examples.length(index)
            if used + length > self.config.seq_len:
                break
            row.append(index)
            used += length
            self._position += 1
        return row

    @property
    def source_names(self) -> tuple[str, ...]:
        return self.examples.source_names

    @property
    def tokenizer_path(self) -> Path:
        return self._tokenizer_path

    @property
    def local_batch_size(self) -> int:
        return self.config.batch_size // self.process_count

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    @property
    def step(self) -> int:
        """Index of the next batch."""
        return self._step

    # state ------------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state after the last batch returned (see the module doc)."""
        names = self.source_names
        return {
            "version": STATE_VERSION,
            "kind": STATE_KIND,
            "format": self.config.format,
            "seq_len": self.config.seq_len,
            "seed": self.config.seed,
            "epoch": self._epoch,
            "position": self._position,
            "step": self._step,
            "fingerprint": self.fingerprint,
            "dataset": json.loads(json.dumps(self._identity)),
            "rows_per_source": dict(zip(names, self._rows_per_source)),
            "target_tokens_per_source": dict(zip(names, self._target_tokens_per_source)),
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        state = self._checked_state(state)
        self._epoch, self._position, self._step = state["epoch"], state["position"], state["step"]
        self._order = epoch_order(len(self.examples), self.config.seed, self._epoch)
        self._rows_per_source = [int(state["rows_per_source"].get(n, 0)) for n in self.source_names]
        self._target_tokens_per_source = [int(state["target_tokens_per_source"].get(n, 0)) for n in self.source_names]

    def _checked_state(self, state: Any) -> Mapping[str, Any]:
        if not isinstance(state, Mapping):
            raise ExampleDataError(f"data state: expected a mapping, got {type(state).__name__}")
        required = ("version", "kind", "seq_len", "seed", "epoch", "position", "step", "fingerprint",
                    "rows_per_source", "target_tokens_per_source")
        missing = [key for key in required if key not in state]
        if missing or state["kind"] != STATE_KIND:
            raise ExampleDataError(
                f"data state: missing {', '.join(missing) or 'kind: examples'} (not the state of a prompt/response pipeline?)"
            )
        if state["version"] != STATE_VERSION:
            raise ExampleDataError(f"data state: version {state['version']} is not supported (expected {STATE_VERSION})")
        if state["seq_len"] != self.config.seq_len:
            raise ExampleDataError(
                f"examples.seq_len: the saved data state was built with seq_len={state['seq_len']}, the config says {self.config.seq_len}"
            )
        if state["seed"] != self.config.seed:
            raise ExampleDataError(f"examples.seed: the saved data state used seed={state['seed']}, the config says {self.config.seed}")
        if state["fingerprint"] != self.fingerprint:
            difference = _identity_difference(state.get("dataset") or {}, self._identity)
            raise ExampleDataError(
                f"data state: saved for another dataset (fingerprint {str(state['fingerprint'])[:12]}, "
                f"these files give {self.fingerprint[:12]}): {difference}"
            )
        if not 0 <= state["position"] <= len(self.examples):
            raise ExampleDataError(f"data state: position {state['position']} is outside the {len(self.examples)} examples")
        return state

    # accounting -------------------------------------------------------------------------
    def realised_rows(self) -> dict[str, int]:
        """Rows drawn from each source (a packed row counts for its first example's source)."""
        return dict(zip(self.source_names, self._rows_per_source))

    def realised_shares(self) -> dict[str, float]:
        """Share of trained (mask 1) target tokens each source contributed since step 0."""
        total = sum(self._target_tokens_per_source)
        return {n: (t / total if total else 0.0) for n, t in zip(self.source_names, self._target_tokens_per_source)}

    def summary(self) -> dict[str, Any]:
        """Per-file counts, totals, token statistics, tokenizer, settings and the fingerprint (JSON-safe)."""
        files = [dict(f, dropped=dict(f["dropped"])) for f in self.examples.files]
        dropped: Counter = Counter()
        for f in files:
            dropped.update(f["dropped"])
        totals = {key: sum(f[key] for f in files) for key in ("rows", "kept", "prompt_cut", "empty_prompt")}
        totals["dropped"] = {reason: dropped[reason] for reason in drop_reasons(self.config)}
        prompts = self.examples.prompt_lengths
        tokens = {"prompt": _token_stats(prompts)}
        for role, side in zip(list(self.config.fields)[1:], self.examples.sequences):
            tokens[role] = _token_stats(np.asarray([len(s) for s in side]) - prompts)
        settings = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config) if f.name != "paths"}
        settings["pack"] = self.config.packs
        return {
            "format": self.config.format,
            "files": files,
            "totals": totals,
            "tokens": tokens,
            "tokenizer": {
                "path": str(self.tokenizer_path),
                "fingerprint": self._tokenizer_fingerprint,
                "vocab_size": self.vocab_size,
                "eos_id": self.eos_id,
                "pad_id": self.pad_id,
            },
            "settings": settings,
            "fingerprint": self.fingerprint,
        }

    # devices ----------------------------------------------------------------------------
    def peek_shapes(self) -> dict[str, Any]:
        """Global shapes/dtypes of every batch key except ``source_ids``."""
        import jax

        rows, length = self.config.batch_size, self.config.seq_len
        keys = SFT_KEYS if self.config.format == "sft" else PAIR_KEYS
        shapes = {key: jax.ShapeDtypeStruct((rows, length), np.int32) for key in keys}
        if self.config.format == "preference":
            shapes["example_index"] = jax.ShapeDtypeStruct((rows,), np.int32)
        return shapes

    def to_global(self, batch: Mapping[str, np.ndarray], mesh, sharding=None) -> dict[str, Any]:
        return to_global_array(batch, mesh, sharding, global_batch_size=self.config.batch_size)

    def close(self) -> None:
        """Nothing to release (the examples live in memory); the pipeline is then unusable."""
        self._closed = True


def build_example_pipeline(
    config: ExampleDataConfig,
    tokenizer_path: str | os.PathLike,
    *,
    process_index: int = 0,
    process_count: int = 1,
    state: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> ExamplePipeline:
    """Read and tokenize ``config``'s files with the tokenizer at ``tokenizer_path`` (a
    ``tokenizer.json`` or a directory holding one); ``state`` (from ``get_state``) resumes."""
    from jaxlm.tokenizer import TOKENIZER_FILE, Tokenizer

    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} / process_count {process_count}: expected 0 <= index < count")
    if config.batch_size % process_count:
        raise ConfigError(
            f"examples.batch_size: the global batch ({config.batch_size}) must divide evenly over {process_count} processes"
        )
    file = Path(os.path.expanduser(tokenizer_path))
    if file.is_dir():
        file = file / TOKENIZER_FILE
    tokenizer = Tokenizer.load(file)
    examples = tokenize_examples(config, tokenizer, progress=progress and process_index == 0)
    pipeline = ExamplePipeline(
        config, examples, tokenizer, file, process_index=process_index, process_count=process_count
    )
    if state is not None:
        pipeline.set_state(state)
    return pipeline


def preference_arrays(pipeline: ExamplePipeline) -> dict[str, np.ndarray]:
    """Every pair in ``example_index`` order, padded to ``seq_len``: the six pair arrays [N, seq_len]
    (for reference-model log-probs computed once)."""
    if pipeline.config.format != "preference":
        raise ExampleDataError(f"preference_arrays: the pipeline holds {pipeline.config.format!r} data, not preference pairs")
    arrays = pair_rows(pipeline.examples, range(pipeline.num_examples), pipeline.config.seq_len, pipeline.pad_id)
    return {key: arrays[key] for key in PAIR_KEYS}
