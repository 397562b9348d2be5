import ast
from pathlib import Path

import numpy as np
import pytest

from jaxlm.batching import BatchingError, fill_rows, length_buckets, pad_tokens, padded_batch_size, round_up
from jaxlm.decode import left_pad


def test_pad_tokens_left_and_right():
    tokens, mask = pad_tokens([[1, 2, 3], [4]], 4, side="left", pad_id=9)
    assert tokens.tolist() == [[9, 1, 2, 3], [9, 9, 9, 4]] and tokens.dtype == np.int32
    assert mask.tolist() == [[False, True, True, True], [False, False, False, True]]
    tokens, mask = pad_tokens([[1, 2, 3], [4]], 4, rows=3)  # right padding, an all-padding extra row
    assert tokens.tolist() == [[1, 2, 3, 0], [4, 0, 0, 0], [0, 0, 0, 0]]
    assert mask.sum(axis=1).tolist() == [3, 1, 0]


def test_pad_tokens_cuts_long_rows_from_the_padded_side():
    assert pad_tokens([[1, 2, 3, 4, 5]], 2, side="left")[0].tolist() == [[4, 5]]  # keeps the last tokens
    assert pad_tokens([[1, 2, 3, 4, 5]], 2, side="right")[0].tolist() == [[1, 2]]  # keeps the first


def test_pad_tokens_refuses_bad_arguments():
    with pytest.raises(BatchingError, match="side: expected 'left' or 'right', got 'middle'"):
        pad_tokens([[1]], 2, side="middle")
    with pytest.raises(BatchingError, match="rows: 1 is fewer than the 2 sequences"):
        pad_tokens([[1], [2]], 2, rows=1)


def test_batch_shapes():
    assert [round_up(n, 16) for n in (1, 16, 17)] == [16, 16, 32]
    assert [padded_batch_size(n, 32) for n in (1, 8, 9, 100)] == [8, 8, 16, 32]
    assert length_buckets(64) == (16, 32, 64) and length_buckets(100) == (16, 32, 64, 100)
    assert fill_rows([[1], [2, 3]], 4) == [[1], [2, 3], [2, 3], [2, 3]]
    assert fill_rows([[1]], 1) == [[1]]


def test_left_pad_is_pad_tokens_on_the_left():
    rows = [[5, 6, 7], [8]]
    tokens, mask = left_pad(rows, pad_id=1, multiple=8)
    expected_tokens, expected_mask = pad_tokens(rows, 8, side="left", pad_id=1)
    assert np.array_equal(tokens, expected_tokens) and np.array_equal(mask, expected_mask)


def _jaxlm_imports(module: str) -> set[str]:
    path = Path(__file__).parents[1] / "jaxlm" / (module.replace(".", "/") + ".py")
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith("jaxlm")}


def test_batching_and_scorer_modules_depend_one_way():
    # no padding code left behind in the callers: they import the one helper
    for module in ("decode", "probe", "evaluate.capability", "evaluate.protocols"):
        assert "jaxlm.batching" in _jaxlm_imports(module), module
    # toxicity -> toxicity_model -> scorer, never back
    assert "jaxlm.evaluate.toxicity" not in _jaxlm_imports("evaluate.toxicity_model")
    assert not _jaxlm_imports("evaluate.scorer") & {"jaxlm.evaluate.toxicity", "jaxlm.evaluate.toxicity_model"}
    assert "jaxlm.evaluate.scorer" in _jaxlm_imports("data.encode")  # the one profanity-check loader
