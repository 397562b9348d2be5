"""Activations at a site and per-head linear probes (the probing half of ITI).

``collect_activations`` runs labelled texts through the model and keeps one capture site's
activation at one position per text: ``[N, L, H, D]`` float32 at ``head_out`` (each head's
attention output before the output projection; ``collect_head_activations``), ``[N, L,
d_model]`` at a residual site; optionally streamed to a ``.npy`` file.

``train_probes`` fits an L2-regularised logistic regression for every (layer, head) at
once: one jitted, ``vmap``-ed Newton solver over heads, on a seeded stratified 4:1 split
(or k folds). The objective is scikit-learn's ``LogisticRegression(C=C)``
(``0.5 * |w|^2 + C * sum(log-loss)``, intercept unpenalised) on the raw activations, so
accuracies agree with a per-head scikit-learn loop; features are centred and scaled
inside the solver for conditioning only (``standardize=True`` penalises the standardised
weights instead, i.e. ``StandardScaler`` + ``LogisticRegression``). Weights come back in
activation space, ready to be ITI directions. ``transfer_accuracy`` fits the same probes on
one labelled set and scores them on another (cross-dataset transfer).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import sharding as sharding_lib
from jaxlm.batching import length_buckets, pad_tokens, round_up
from jaxlm.config import ConfigError, ModelConfig, to_dict
from jaxlm.errors import JaxlmError
from jaxlm.model import SITES, Params, forward

POSITIONS = ("last", "mean")
REPORT_FILE = "probe_report.json"
HEATMAP_FILE = "probe_heatmap.png"
WEIGHTS_FILE = "probe_weights.npz"
NPY_MAGIC = b"\x93NUMPY"
WEIGHT_ARRAYS = ("accuracy", "auc", "train_accuracy", "weights", "intercepts", "ranking", "train_index", "val_index", "converged")


class ProbeError(JaxlmError, ValueError):
    """Bad probe input (texts, labels, activations) or an unreadable probe directory; names what and where."""


# ---------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids per text from a tokenizer with ``encode_batch`` or a callable ``texts -> ids``."""
    if hasattr(tokenizer, "encode_batch"):
        encoded = tokenizer.encode_batch(list(texts))
    elif callable(tokenizer):
        encoded = tokenizer(list(texts))
    else:
        raise TypeError(f"tokenizer must have encode_batch or be callable, got {type(tokenizer).__name__}")
    ids = [list(getattr(item, "ids", item)) for item in encoded]
    if len(ids) != len(texts):
        raise ProbeError(f"tokenizer returned {len(ids)} sequences for {len(texts)} texts")
    return ids


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("site", "position"))
def _reduced_site(
    config: ModelConfig, params: Params, tokens: jax.Array, segment_ids: jax.Array, *, site: str, position: str
) -> jax.Array:
    """[B, L, ...] float32: ``site``'s activation at the last non-pad token, or its mean over non-pad tokens."""
    out = forward(config, params, tokens, segment_ids=segment_ids, capture=(site,))
    acts = out.captures[site].astype(jnp.float32)  # [L, B, T, ...]
    feature_axes = acts.ndim - 3
    real = segment_ids != 0
    if position == "last":
        last = tokens.shape[1] - 1 - jnp.argmax(real[:, ::-1], axis=1)  # [B]
        index = last.reshape((1, -1, 1) + (1,) * feature_axes)
        picked = jnp.take_along_axis(acts, index, axis=2)[:, :, 0]
    else:
        weights = (real / jnp.maximum(real.sum(axis=1, keepdims=True), 1)).astype(jnp.float32)
        picked = jnp.einsum("lbt...,bt->lb...", acts, weights)
    return jnp.moveaxis(picked, 0, 1)


def site_shape(config: ModelConfig, site: str) -> tuple[int, ...]:
    """The per-text shape of ``site``'s activations: ``(L, H, D)`` at head_out, ``(L, d_model)`` elsewhere."""
    if site not in SITES:
        raise ProbeError(f"site: expected one of {', '.join(SITES)}, got {site!r}")
    if site == "head_out":
        return (config.n_layers, config.n_heads, config.resolved_head_dim)
    return (config.n_layers, config.d_model)


def collect_activations(
    config: ModelConfig,
    params: Params,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    site: str = "head_out",
    batch_size: int = 32,
    max_len: int | None = None,
    position: str = "last",
    padding: str = "right",
    out_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> np.ndarray:
    """``site``'s activations at one position per text, float32: ``[N, L, H, D]`` at ``head_out``
    (each head's attention output before the output projection), ``[N, L, d_model]`` at a
    residual site (``resid_pre``, ``resid_mid``, ``resid_post``).

    ``tokenizer``: an object with ``encode_batch(texts)`` (e.g. ``jaxlm.tokenizer.Tokenizer``)
    or a callable ``texts -> token ids``. Texts longer than ``max_len`` (default: the
    model's context) keep their first ``max_len`` tokens. ``position``: ``"last"`` (last
    non-pad token) or ``"mean"`` (mean over non-pad tokens). Texts are sorted by length
    and padded to a few bucket lengths, so one compile serves each bucket. With
    ``out_path`` the result is written to a ``.npy`` memmap batch by batch (and returned
    as that memmap). Parameters on a mesh (``jaxlm.sharding.place_params``, ``load_model(...,
    mesh=)``) run each batch sharded on it, its rows (padded to a multiple of the mesh's
    batch shards) over ``data`` x ``fsdp``; the activations equal one device's to float rounding.
    """
    per_text = site_shape(config, site)
    if position not in POSITIONS:
        raise ProbeError(f"position must be one of {POSITIONS}, got {position!r}")
    if padding not in ("right", "left"):
        raise ProbeError(f"padding must be 'right' or 'left', got {padding!r}")
    if batch_size <= 0:
        raise ProbeError(f"batch_size must be positive, got {batch_size}")
    max_len = min(max_len or config.max_seq_len, config.max_seq_len)
    ids = [seq[:max_len] for seq in encode_texts(tokenizer, texts)]
    empty = [i for i, seq in enumerate(ids) if not seq]
    if empty:
        raise ProbeError(f"{len(empty)} text(s) encode to no tokens (first: index {empty[0]}); drop them first")

    shape = (len(ids), *per_text)
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        result = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32, shape=shape)
    else:
        result = np.empty(shape, np.float32)

    from tqdm.auto import tqdm

    buckets = length_buckets(max_len)
    order = np.argsort([len(seq) for seq in ids], kind="stable")
    mesh = sharding_lib.inference_mesh(params)
    step = min(batch_size, len(ids))
    rows = round_up(step, sharding_lib.batch_shards(mesh))
    with tqdm(total=len(ids), desc=f"{site} activations", unit="text", disable=not progress) as bar:
        for start in range(0, len(ids), step):
            chosen = order[start : start + step]
            batch = [ids[i] for i in chosen]
            length = next(b for b in buckets if b >= max(map(len, batch)))
            tokens, real = pad_tokens(batch, length, rows=rows, side=padding)
            segments = real.astype(np.int32)  # real tokens in segment 1, padding (and extra rows) 0
            tokens, segments = sharding_lib.shard_batch((tokens, segments), mesh)
            with sharding_lib.activation_sharding(mesh):
                acts = _reduced_site(config, params, jnp.asarray(tokens), jnp.asarray(segments), site=site, position=position)
            result[chosen] = np.asarray(acts)[: len(chosen)]
            bar.update(len(chosen))
    if isinstance(result, np.memmap):
        result.flush()
    return result


def collect_head_activations(
    config: ModelConfig, params: Params, tokenizer: Any, texts: Sequence[str], **options: Any
) -> np.ndarray:
    """``head_out`` of every layer and head at one position per text: ``[N, L, H, D]`` float32
    (``collect_activations`` at ``site="head_out"``; same options)."""
    return collect_activations(config, params, tokenizer, texts, site="head_out", **options)


# ---------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ProbeError(f"labels must be 1-D, got shape {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ProbeError(f"labels must be 0 or 1, got values {sorted(set(np.unique(labels).tolist()))}")
    counts = np.bincount(labels.astype(np.int64), minlength=2)
    if counts.min() < 2:
        raise ProbeError(f"each class needs at least 2 examples, got counts {counts.tolist()}")
    return labels.astype(np.int32)


def stratified_split(labels: np.ndarray, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, validation) indices keeping each class's share; each class has both."""
    labels = _check_labels(labels)
    rng = np.random.default_rng(seed)
    val = []
    for cls in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_val = min(max(int(round(len(members) * val_fraction)), 1), len(members) - 1)
        val.append(members[:n_val])
    val_idx = np.sort(np.concatenate(val))
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


def stratified_folds(labels: np.ndarray, folds: int, seed: int = 0) -> list[np.ndarray]:
    """Seeded stratified k-fold: the validation indices of each fold (a partition of all)."""
    labels = _check_labels(labels)
    if folds < 2 or folds > np.bincount(labels).min():
        raise ProbeError(f"folds must be between 2 and the smaller class size, got {folds}")
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(labels), np.int64)
    offset = 0
    for cls in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == cls))
        fold_of[members] = (np.arange(len(members)) + offset) % folds
        offset += len(members)
    return [np.flatnonzero(fold_of == k) for k in range(folds)]


# ---------------------------------------------------------------------------------------
# Vectorised logistic regression
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """Probe settings. ``C`` is scikit-learn's inverse regularisation strength."""

    C: float = 1.0
    val_fraction: float = 0.2  # single split (folds = 1): 4:1 train/validation
    folds: int = 1  # >= 2: stratified k-fold; weights then come from a fit on all examples
    seed: int = 0
    standardize: bool = False  # True: penalise standardised weights (StandardScaler + LR)
    max_iter: int = 50  # Newton iterations
    tol: float = 1e-9  # stop when the Newton decrement^2 / 2 (mean-loss scale) is below this

    def __post_init__(self) -> None:
        if not (self.C > 0 and math.isfinite(self.C)):
            raise ConfigError(f"probe.C: expected a positive finite number, got {self.C}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"probe.val_fraction: expected a number in (0, 1), got {self.val_fraction}")
        if self.folds < 1:
            raise ConfigError(f"probe.folds: expected 1 (single split) or k >= 2, got {self.folds}")
        if self.max_iter < 1 or self.tol <= 0:
            raise ConfigError(f"probe: max_iter must be >= 1 and tol > 0, got {self.max_iter}, {self.tol}")


def _fit_logistic(x, y, theta0, C, standardize, max_iter, tol):
    """One head: Newton's method with backtracking on the L2-penalised mean log-loss.

    x [N, D] (the training rows), y [N] in {0, 1}, ``theta0`` [D+1] the start (intercept first,
    standardised units; zeros to start afresh). Returns raw-space (w [D], b []), theta [D+1]
    to continue from, the iterations run and whether it converged. Newton's step depends on
    theta alone, so a fit continued from its theta is the same fit.
    """
    n = x.shape[0]
    mean = jnp.mean(x, axis=0)
    std = jnp.sqrt(jnp.mean(jnp.square(x - mean), axis=0))
    std = jnp.where(std > 1e-12 * (1.0 + jnp.abs(mean)), std, 1.0)
    design = jnp.concatenate([jnp.ones_like(x[:, :1]), (x - mean) / std], axis=1)  # [N, D+1]
    # sklearn: 0.5 |w_raw|^2 + C sum loss; divided by C n. In standardised units w_raw = beta / std.
    penalty = jnp.where(standardize, jnp.ones_like(std), 1.0 / jnp.square(std)) / (C * n)
    penalty = jnp.concatenate([jnp.zeros((1,), x.dtype), penalty])

    def objective(theta, z):
        return jnp.mean(jax.nn.softplus(z) - y * z) + 0.5 * penalty @ jnp.square(theta)

    def newton_step(state):
        theta, z, f0, i, _ = state
        p = jax.nn.sigmoid(z)
        grad = design.T @ (p - y) / n + penalty * theta
        hess = (design * (p * (1.0 - p) / n)[:, None]).T @ design + jnp.diag(penalty)
        hess = hess + 1e-7 * jnp.mean(jnp.diag(hess)) * jnp.eye(hess.shape[0], dtype=hess.dtype)
        direction = -jnp.linalg.solve(hess, grad)
        dz = design @ direction  # the trial points' logits are z + t dz: no further matmul
        slope = grad @ direction  # = -(Newton decrement)^2
        slack = 4.0 * jnp.finfo(x.dtype).eps * jnp.abs(f0)

        def trial(t):
            return objective(theta + t * direction, z + t * dz)

        def too_far(carry):
            t, f = carry
            return (f > f0 + 1e-4 * t * slope + slack) & (t > 1e-3)

        def halve(carry):
            t = 0.5 * carry[0]
            return t, trial(t)

        one = jnp.ones((), x.dtype)
        t, f = jax.lax.while_loop(too_far, halve, (one, trial(one)))
        return theta + t * direction, z + t * dz, f, i + 1, -0.5 * slope <= tol

    def keep_going(state):
        return (state[3] < max_iter) & ~state[4]

    z0 = design @ theta0
    init = (theta0, z0, objective(theta0, z0), jnp.zeros((), jnp.int32), jnp.zeros((), bool))
    theta, _, _, iterations, converged = jax.lax.while_loop(keep_going, newton_step, init)
    coef = theta[1:] / std
    intercept = theta[0] - coef @ mean
    return coef, intercept, theta, iterations, converged


_fit_heads = jax.jit(jax.vmap(_fit_logistic, in_axes=(0, None, 0, None, None, None, None)))

# Newton iterations every head gets; heads still short of ``tol`` then continue in a smaller
# batch (vmapped heads all run until the slowest converges, and most need 4-6 iterations).
FIRST_PASS_ITERATIONS = 6


@dataclasses.dataclass(frozen=True)
class HeadFits:
    """Logistic fits of G heads: raw-space ``coef`` [G, D], ``intercept`` [G], ``scores`` [G, N]."""

    coef: np.ndarray
    intercept: np.ndarray
    scores: np.ndarray
    iterations: np.ndarray
    converged: np.ndarray


def _heads_per_chunk(n: int, d: int, total: int, budget_bytes: int = 1 << 30) -> int:
    return max(1, min(total, budget_bytes // max(1, 16 * n * (d + 1))))


def decision_values(features: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """[G, N] decision values of per-head probes (``coef`` [G, D], ``intercept`` [G]) on ``features`` [N, G, D]."""
    return np.einsum("ngd,gd->gn", features, coef) + intercept[:, None]


def _padded_heads(block: np.ndarray, theta: np.ndarray, heads: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """``block`` [G, N, D] and ``theta`` rows of ``heads``, padded (with the first) to a power of two up to
    ``chunk`` heads, so a few compiled shapes serve every count of unconverged heads."""
    size = min(chunk, 1 << int(np.ceil(np.log2(len(heads)))))
    picked = np.concatenate([heads, np.full(size - len(heads), heads[0])])
    return block[picked], theta[picked]


def fit_logistic_heads(
    features: np.ndarray,
    labels: np.ndarray,
    train_mask: np.ndarray | None = None,
    *,
    C: float = 1.0,
    standardize: bool = False,
    max_iter: int = 50,
    tol: float = 1e-9,
    heads_per_chunk: int | None = None,
) -> HeadFits:
    """Fit one logistic regression per head on ``features`` [N, G, D] (rows in ``train_mask``).

    Heads go through the jitted, vmapped solver in equal chunks (the last padded) so
    memory stays bounded and one compile serves all chunks: ``FIRST_PASS_ITERATIONS`` Newton
    iterations for every head, then the unconverged ones continue together. Only the
    training rows enter the solver; ``scores`` are decision values for every row (train and
    held-out).
    """
    n, g, d = features.shape
    rows = np.arange(n) if train_mask is None else np.flatnonzero(train_mask)
    y = jnp.asarray(np.asarray(labels)[rows], jnp.float32)
    chunk = heads_per_chunk or _heads_per_chunk(len(rows), d, g)
    settings = (jnp.float32(C), jnp.asarray(standardize))
    first_pass = min(max_iter, FIRST_PASS_ITERATIONS)
    parts = []
    for start in range(0, g, chunk):
        every_row = np.asarray(features[:, start : start + chunk], np.float32).transpose(1, 0, 2)  # [G, N, D]
        real = every_row.shape[0]
        block = every_row[:, rows] if train_mask is not None else every_row
        if real < chunk:
            block = np.concatenate([block, np.zeros((chunk - real, *block.shape[1:]), np.float32)])
        theta0 = np.zeros((chunk, d + 1), np.float32)
        coef, intercept, theta, iterations, converged = (
            np.array(a) for a in _fit_heads(block, y, theta0, *settings, jnp.int32(first_pass), jnp.float32(tol))
        )
        todo = np.flatnonzero(~converged[:real]) if max_iter > first_pass else np.zeros(0, int)
        if todo.size:
            more_block, more_theta = _padded_heads(block, theta, todo, chunk)
            more = _fit_heads(more_block, y, more_theta, *settings, jnp.int32(max_iter - first_pass), jnp.float32(tol))
            for target, value in zip((coef, intercept, theta), more[:3]):
                target[todo] = np.asarray(value)[: todo.size]
            iterations[todo] += np.asarray(more[3])[: todo.size]
            converged[todo] = np.asarray(more[4])[: todo.size]
        coef, intercept = coef[:real], intercept[:real]
        scores = decision_values(every_row.transpose(1, 0, 2), coef, intercept)
        parts.append((coef, intercept, scores, iterations[:real], converged[:real]))
    coef, intercept, scores, iterations, converged = (np.concatenate(col) for col in zip(*parts))
    return HeadFits(coef, intercept, scores, iterations, converged)


def auc_scores(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """ROC AUC per row of ``scores`` [G, M] (Mann-Whitney, ties counted half)."""
    from scipy.stats import rankdata

    positive = np.asarray(labels) == 1
    n_pos, n_neg = positive.sum(), (~positive).sum()
    ranks = rankdata(scores, axis=-1)
    return (ranks[:, positive].sum(axis=-1) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def accuracy_scores(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Accuracy per row of decision values [G, M] (predict 1 where the score is positive)."""
    return ((scores > 0) == (np.asarray(labels) == 1)).mean(axis=-1)


# ---------------------------------------------------------------------------------------
# Probing all heads
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """Per-head probes: validation metrics [L, H], activation-space weights [L, H, D], ranking."""

    accuracy: np.ndarray  # [L, H] validation accuracy (mean over folds with k-fold)
    auc: np.ndarray  # [L, H] validation ROC AUC
    train_accuracy: np.ndarray  # [L, H] accuracy of the reported weights on their training rows
    weights: np.ndarray  # [L, H, D] in activation space
    intercepts: np.ndarray  # [L, H]
    ranking: tuple[tuple[int, int], ...]  # (layer, head), best first
    n_train: int
    n_val: int
    train_index: np.ndarray  # rows the weights were fitted on
    val_index: np.ndarray  # validation rows (all rows with k-fold: each validated once)
    config: ProbeConfig
    converged: np.ndarray  # [L, H] bool (for the reported weights)
    accuracy_std: np.ndarray | None = None  # [L, H] across folds (k-fold only)

    @property
    def shape(self) -> tuple[int, int]:
        return self.accuracy.shape  # type: ignore[return-value]

    def top_heads(self, k: int) -> list[tuple[int, int]]:
        return list(self.ranking[:k])

    def head_mask(self, k: int) -> np.ndarray:
        """[L, H] bool: the ``k`` best heads."""
        mask = np.zeros(self.shape, bool)
        for layer, head in self.top_heads(k):
            mask[layer, head] = True
        return mask

    def scores(self, activations: np.ndarray) -> np.ndarray:
        """Decision values [N, L, H] of every head's probe on activations [N, L, H, D]."""
        return np.einsum("nlhd,lhd->nlh", np.asarray(activations, np.float32), self.weights) + self.intercepts

    def report(self, metadata: dict | None = None) -> dict:
        acc = self.accuracy
        data = {
            "accuracy": acc.tolist(),
            "auc": self.auc.tolist(),
            "train_accuracy": self.train_accuracy.tolist(),
            "ranking": [list(pair) for pair in self.ranking],
            "n_train": self.n_train,
            "n_val": self.n_val,
            "n_layers": acc.shape[0],
            "n_heads": acc.shape[1],
            "head_dim": self.weights.shape[-1],
            "summary": {
                "mean_accuracy": float(acc.mean()),
                "max_accuracy": float(acc.max()),
                "mean_auc": float(self.auc.mean()),
                "converged_fraction": float(self.converged.mean()),
            },
            "settings": to_dict(self.config),
        }
        if self.accuracy_std is not None:
            data["accuracy_std"] = self.accuracy_std.tolist()
        if metadata:
            data["metadata"] = metadata
        return data

    def save_report(
        self, out_dir: str | os.PathLike, *, title: str | None = None, metadata: dict | None = None
    ) -> dict[str, Path]:
        """Write ``probe_report.json``, ``probe_heatmap.png`` and ``probe_weights.npz`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"report": out / REPORT_FILE, "heatmap": out / HEATMAP_FILE, "weights": out / WEIGHTS_FILE}
        paths["report"].write_text(json.dumps(self.report(metadata), indent=1), encoding="utf-8")
        plot_heatmap(self.accuracy, paths["heatmap"], title=title or f"probe accuracy (n_val={self.n_val})")
        arrays = {
            "accuracy": self.accuracy,
            "auc": self.auc,
            "train_accuracy": self.train_accuracy,
            "weights": self.weights,
            "intercepts": self.intercepts,
            "ranking": np.asarray(self.ranking, np.int32),
            "train_index": self.train_index,
            "val_index": self.val_index,
            "converged": self.converged,
        }
        if self.accuracy_std is not None:
            arrays["accuracy_std"] = self.accuracy_std
        np.savez(paths["weights"], **arrays)
        return paths

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> "ProbeResult":
        """Read back what ``save_report`` wrote; ``ProbeError`` naming the file that is missing or damaged."""
        out = Path(out_dir)
        report = _read_report(out / REPORT_FILE)
        arrays = _read_weights(out / WEIGHTS_FILE)
        try:
            result = cls._from_saved(report, arrays)
        except JaxlmError as err:
            raise ProbeError(f"{out / REPORT_FILE}: {err}") from None
        except (KeyError, TypeError, ValueError) as err:
            raise ProbeError(f"{out / REPORT_FILE}: not a probe report ({type(err).__name__}: {err})") from None
        l, h = result.accuracy.shape if result.accuracy.ndim == 2 else (None, None)
        if l is None or result.weights.ndim != 3 or result.weights.shape[:2] != (l, h):
            raise ProbeError(
                f"{out / WEIGHTS_FILE}: accuracy {result.accuracy.shape} and weights {result.weights.shape} "
                "are not [L, H] and [L, H, D]"
            )
        return result

    @classmethod
    def _from_saved(cls, report: dict, arrays: dict[str, np.ndarray]) -> "ProbeResult":
        return cls(
            accuracy=arrays["accuracy"],
            auc=arrays["auc"],
            train_accuracy=arrays["train_accuracy"],
            weights=arrays["weights"],
            intercepts=arrays["intercepts"],
            ranking=tuple(tuple(int(v) for v in pair) for pair in arrays["ranking"]),
            n_train=int(report["n_train"]),
            n_val=int(report["n_val"]),
            train_index=arrays["train_index"],
            val_index=arrays["val_index"],
            config=ProbeConfig(**report["settings"]),
            converged=arrays["converged"],
            accuracy_std=arrays["accuracy_std"] if "accuracy_std" in arrays else None,
        )


def _missing_probe_file(path: Path) -> ProbeError:
    return ProbeError(f"{path}: missing (run `jaxlm probe ... --out {path.parent}` first)")


def _read_report(path: Path) -> dict:
    """``probe_report.json`` as a dict."""
    if not path.is_file():
        raise _missing_probe_file(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProbeError(f"{path}: not a JSON probe report ({err})") from None
    if not isinstance(report, dict):
        raise ProbeError(f"{path}: expected a JSON object, got {type(report).__name__}")
    return report


def _read_weights(path: Path) -> dict[str, np.ndarray]:
    """Every array of ``probe_weights.npz``, read in full (so a damaged member fails here)."""
    if not path.is_file():
        raise _missing_probe_file(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise ValueError("a single array, not an .npz archive")
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise ProbeError(f"{path}: not a readable .npz of probe weights ({err})") from None
    missing = [name for name in WEIGHT_ARRAYS if name not in arrays]
    if missing:
        raise ProbeError(f"{path}: missing array(s) {missing}; found {sorted(arrays)}")
    return arrays


def load_array(path: str | os.PathLike, what: str, mmap: bool = False) -> np.ndarray:
    """A ``.npy`` file written by ``jaxlm probe`` (memory-mapped with ``mmap``); ``ProbeError`` naming
    the file when it is missing, truncated or not an array."""
    path = Path(path)
    if not path.is_file():
        raise _missing_probe_file(path)
    with path.open("rb") as stream:
        if stream.read(len(NPY_MAGIC)) != NPY_MAGIC:
            raise ProbeError(f"{path}: not a .npy file of {what} (no NumPy header)")
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise ProbeError(f"{path}: not a readable .npy of {what} ({err})") from None
    if not isinstance(array, np.ndarray):
        raise ProbeError(f"{path}: expected a .npy array of {what}, got an .npz archive")
    return array


def rank_heads(accuracy: np.ndarray, auc: np.ndarray) -> tuple[tuple[int, int], ...]:
    """(layer, head) sorted by accuracy, then AUC (both descending), then position."""
    layers, heads = np.indices(accuracy.shape)
    order = np.lexsort((heads.ravel(), layers.ravel(), -auc.ravel(), -accuracy.ravel()))
    return tuple((int(layers.ravel()[i]), int(heads.ravel()[i])) for i in order)


def train_probes(activations: np.ndarray, labels: np.ndarray, config: ProbeConfig = ProbeConfig()) -> ProbeResult:
    """Fit and validate a probe for every head of ``activations`` [N, L, H, D] (labels [N] in {0, 1})."""
    activations = np.asarray(activations) if not isinstance(activations, np.memmap) else activations
    if activations.ndim != 4:
        raise ProbeError(f"activations must be [N, L, H, D], got shape {activations.shape}")
    labels = _check_labels(labels)
    n, n_layers, n_heads, d = activations.shape
    if len(labels) != n:
        raise ProbeError(f"{n} activation rows but {len(labels)} labels")
    features = activations.reshape(n, n_layers * n_heads, d)
    fit = functools.partial(
        fit_logistic_heads, features, labels, C=config.C, standardize=config.standardize,
        max_iter=config.max_iter, tol=config.tol,
    )
    grid = (n_layers, n_heads)

    def mask_of(index: np.ndarray) -> np.ndarray:
        mask = np.zeros(n, bool)
        mask[index] = True
        return mask

    if config.folds == 1:
        train_idx, val_idx = stratified_split(labels, config.val_fraction, config.seed)
        final = fit(mask_of(train_idx))
        accuracy = accuracy_scores(final.scores[:, val_idx], labels[val_idx])
        auc = auc_scores(final.scores[:, val_idx], labels[val_idx])
        accuracy_std = None
    else:
        per_fold_acc, per_fold_auc = [], []
        for val_idx in stratified_folds(labels, config.folds, config.seed):
            fold = fit(~mask_of(val_idx))
            per_fold_acc.append(accuracy_scores(fold.scores[:, val_idx], labels[val_idx]))
            per_fold_auc.append(auc_scores(fold.scores[:, val_idx], labels[val_idx]))
        accuracy, auc = np.mean(per_fold_acc, axis=0), np.mean(per_fold_auc, axis=0)
        accuracy_std = np.std(per_fold_acc, axis=0).reshape(grid)
        train_idx = val_idx = np.arange(n)
        final = fit(None)
    accuracy, auc = accuracy.reshape(grid), auc.reshape(grid)
    return ProbeResult(
        accuracy=accuracy,
        auc=auc,
        train_accuracy=accuracy_scores(final.scores[:, train_idx], labels[train_idx]).reshape(grid),
        weights=final.coef.reshape(n_layers, n_heads, d),
        intercepts=final.intercept.reshape(grid),
        ranking=rank_heads(accuracy, auc),
        n_train=len(train_idx),
        n_val=len(val_idx),
        train_index=train_idx,
        val_index=val_idx,
        config=config,
        converged=final.converged.reshape(grid),
        accuracy_std=accuracy_std,
    )


def transfer_accuracy(
    train_acts: np.ndarray,
    train_labels: np.ndarray,
    test_acts: np.ndarray,
    test_labels: np.ndarray,
    config: ProbeConfig = ProbeConfig(),
) -> dict:
    """How well per-head probes fit on one labelled set score another (e.g. ToxiGen -> RTP).

    Fits every head's logistic probe on all of ``train_acts`` [N, L, H, D] (the solver and
    ``C``/``standardize`` of ``train_probes``) and scores ``test_acts`` [M, L, H, D]: returns
    ``{"accuracy": [L, H], "auc": [L, H], "n_train": N, "n_test": M}``.
    """
    return transfer_accuracies(train_acts, train_labels, [(test_acts, test_labels)], config)[0]


def transfer_accuracies(
    train_acts: np.ndarray,
    train_labels: np.ndarray,
    tests: Sequence[tuple[np.ndarray, np.ndarray]],
    config: ProbeConfig = ProbeConfig(),
) -> list[dict]:
    """``transfer_accuracy`` on each ``(test_acts, test_labels)`` of ``tests``, the probes fitted once."""
    train_acts = np.asarray(train_acts)
    tests = [(np.asarray(acts), labels) for acts, labels in tests]
    for name, acts in (("train", train_acts), *(("test", acts) for acts, _ in tests)):
        if acts.ndim != 4:
            raise ProbeError(f"{name} activations must be [N, L, H, D], got shape {acts.shape}")
    for test_acts, _ in tests:
        if train_acts.shape[1:] != test_acts.shape[1:]:
            raise ProbeError(f"train activations are [N, {train_acts.shape[1:]}] but test activations [M, {test_acts.shape[1:]}]")
    train_labels = _check_labels(train_labels)
    tests = [(acts, _check_labels(labels)) for acts, labels in tests]
    for name, acts, labels in (("train", train_acts, train_labels), *(("test", acts, labels) for acts, labels in tests)):
        if len(labels) != len(acts):
            raise ProbeError(f"{len(acts)} {name} activation rows but {len(labels)} labels")
    n, n_layers, n_heads, d = train_acts.shape
    fits = fit_logistic_heads(train_acts.reshape(n, n_layers * n_heads, d), train_labels, C=config.C,
                              standardize=config.standardize, max_iter=config.max_iter, tol=config.tol)
    out = []
    for test_acts, test_labels in tests:
        test_features = test_acts.reshape(len(test_acts), n_layers * n_heads, d).astype(np.float32)
        scores = decision_values(test_features, fits.coef, fits.intercept)
        out.append({
            "accuracy": accuracy_scores(scores, test_labels).reshape(n_layers, n_heads),
            "auc": auc_scores(scores, test_labels).reshape(n_layers, n_heads),
            "n_train": int(n),
            "n_test": int(len(test_acts)),
        })
    return out


def plot_heatmap(accuracy: np.ndarray, path: str | os.PathLike, *, title: str = "probe accuracy") -> Path:
    """Layer x head heatmap of ``accuracy`` [L, H] as a PNG (Agg canvas, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_layers, n_heads = accuracy.shape
    fig = Figure(figsize=(max(4.0, 0.35 * n_heads + 2.0), max(3.0, 0.3 * n_layers + 1.5)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(accuracy, origin="lower", aspect="auto", cmap="viridis")
    if n_heads <= 32 and n_layers <= 48:
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_layers))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="validation accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


def load_probe_run(probe_dir: str | os.PathLike) -> tuple[ProbeResult, np.ndarray, np.ndarray]:
    """``(ProbeResult, activations [N, L, H, D] memmap, labels [N])`` of a `jaxlm probe` output
    directory, checked against each other; ``ProbeError`` naming the file that is missing,
    damaged or of the wrong shape."""
    probe_dir = Path(probe_dir)
    acts_path, labels_path = probe_dir / "activations.npy", probe_dir / "labels.npy"
    acts = load_array(acts_path, "head activations [N, L, H, D]", mmap=True)
    labels = load_array(labels_path, "labels [N]")
    result = ProbeResult.load(probe_dir)
    if acts.ndim != 4:
        raise ProbeError(f"{acts_path}: expected shape [N, L, H, D], got {acts.shape}")
    if labels.shape != (acts.shape[0],):
        raise ProbeError(f"{labels_path}: expected shape [N] = ({acts.shape[0]},) like {acts_path.name}, got {labels.shape}")
    if result.weights.shape != acts.shape[1:]:
        raise ProbeError(
            f"{probe_dir}: probe weights [L, H, D] = {result.weights.shape} do not match {acts_path.name} "
            f"{acts.shape[1:]} (files from different probe runs?)"
        )
    bad = count_non_finite(acts)
    if bad:
        raise ProbeError(f"{acts_path}: {bad} of {acts.size} values are NaN or inf (the model that produced them diverged?)")
    return result, acts, labels


def count_non_finite(array: np.ndarray, rows_per_block: int = 256) -> int:
    """NaN and inf values in ``array``, read a block of rows at a time (a memmap stays on disk)."""
    return sum(
        int(np.size(block) - np.count_nonzero(np.isfinite(block)))
        for block in (array[start : start + rows_per_block] for start in range(0, len(array), rows_per_block))
    )
