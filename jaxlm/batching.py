"""Token lists -> fixed-shape padded batches: the one place jaxlm pads and batches token rows.

Each caller keeps its own policy (which side to pad, which lengths to round to), but the
arithmetic lives here: ``round_up`` to a multiple, ``length_buckets`` (powers of two),
``padded_batch_size`` (a small job padded to a multiple of 8 rows), ``fill_rows`` (a short
last batch filled with copies of its last row: one batch shape, one compiled program) and
``pad_tokens`` (rows into ``tokens`` and a real-token ``mask``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxlm.errors import JaxlmError

SIDES = ("left", "right")


class BatchingError(JaxlmError, ValueError):
    """Bad padding arguments (side, rows); the message names the argument."""


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``n``."""
    return -(-n // multiple) * multiple


def length_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
    """Padded lengths used for batches: powers of two from ``smallest``, capped by ``max_len``."""
    buckets, length = [], smallest
    while length < max_len:
        buckets.append(length)
        length *= 2
    return (*buckets, max_len)


def padded_batch_size(n_rows: int, batch_size: int) -> int:
    """The batch shape for ``n_rows`` rows in batches of ``batch_size``: a job smaller than one
    batch is padded to a multiple of 8 rows, not to ``batch_size`` (one shape per job size)."""
    return min(batch_size, round_up(n_rows, 8))


def fill_rows(rows: Sequence[Sequence[int]], size: int) -> list[Sequence[int]]:
    """``rows`` followed by copies of its last row up to ``size`` rows (a full batch shape)."""
    rows = list(rows)
    return rows + [rows[-1]] * (size - len(rows))


def pad_tokens(
    sequences: Sequence[Sequence[int]], length: int, *, rows: int | None = None, side: str = "right", pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens [rows, length] int32, mask [rows, length] bool)``: each sequence padded with
    ``pad_id`` on ``side`` (``"left"``: its tokens end at the last column); ``mask`` marks real tokens.

    ``rows`` (default: one per sequence) adds all-padding rows. A sequence longer than
    ``length`` keeps its last tokens when padded on the left, its first on the right.
    """
    if side not in SIDES:
        raise BatchingError(f"side: expected 'left' or 'right', got {side!r}")
    rows = len(sequences) if rows is None else rows
    if rows < len(sequences):
        raise BatchingError(f"rows: {rows} is fewer than the {len(sequences)} sequences")
    tokens = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), bool)
    for row, seq in enumerate(sequences):
        seq = list(seq)
        seq = seq[max(len(seq) - length, 0):] if side == "left" else seq[:length]
        span = slice(length - len(seq), length) if side == "left" else slice(0, len(seq))
        tokens[row, span] = seq
        mask[row, span] = True
    return tokens, mask
