"""Concept directions and erasers estimated from labelled activations.

Pure functions from activations ``acts`` ``[N, *U, D]`` (N examples; ``U`` the unit axes, e.g.
``[L, H]`` for ``head_out`` or ``[L]`` for a residual site; ``D`` the feature axis) and labels
``[N]`` to the arrays the intervention builders need:

- ``mean_difference`` / ``unit``: the mean of the wanted class minus that of the rest, per unit
  (ITI's mass-mean shift, CAA / ActAdd steering vectors, the direction ablation projects out);
- ``sigma_along``: the spread of the activations along a direction (ITI's per-head scale);
- ``norm_matched_random``: isotropic random directions with a given set's norms (the control);
- ``leace_fit`` / ``leace_fit_per_layer``: LEACE (Belrose et al. 2023), the least-squares affine
  eraser ``x' = x - P (x - mu)`` after which no linear classifier recovers the concept.

Statistics are accumulated in float64; directions and scales come back float32 (what
intervention files store), erasers float64. Inputs are checked: labels need both a wanted and
another class, every array must be finite, and N must match, else ``ConceptError`` naming the
argument and its shape.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxlm.errors import JaxlmError

Array = jax.Array


class ConceptError(JaxlmError, ValueError):
    """Activations or labels that cannot give a concept direction or eraser; names the argument and shapes."""


# ---------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------


def _check_finite(name: str, values: np.ndarray) -> None:
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise ConceptError(f"{name}: expected finite numbers, got {bad} of {values.size} values NaN or inf (shape {values.shape})")


def _check_acts_labels(acts: Any, labels: Any, min_ndim: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``acts`` [N, ..., D] (at least ``min_ndim`` axes) and ``labels`` [N], both finite."""
    acts, labels = np.asarray(acts), np.asarray(labels)
    if acts.ndim < min_ndim:
        raise ConceptError(f"acts: expected shape [N, ..., D] with at least {min_ndim} axes, got {acts.shape}")
    if labels.ndim != 1 or labels.shape[0] != acts.shape[0]:
        raise ConceptError(f"labels: expected shape [N] = ({acts.shape[0]},) to match acts {acts.shape}, got {labels.shape}")
    _check_finite("acts", acts)
    _check_finite("labels", labels)
    return acts, labels


# ---------------------------------------------------------------------------------------
# Directions and scales
# ---------------------------------------------------------------------------------------


def mean_difference(acts: Any, labels: Any, wanted_label: int = 0) -> np.ndarray:
    """``[*U, D]`` float64: mean of ``acts`` [N, *U, D] over ``labels == wanted_label`` minus the mean over the rest.

    The mass-mean (ITI), contrastive-activation-addition / ActAdd vector pointing toward the
    wanted class; ``unit`` of it is the direction.
    """
    acts, labels = _check_acts_labels(acts, labels)
    wanted = labels == wanted_label
    if not wanted.any() or wanted.all():
        raise ConceptError(
            f"labels: need examples of both the wanted label {wanted_label} and another label, "
            f"got {int(wanted.sum())} wanted of {len(labels)}"
        )
    mean_wanted = acts[wanted].astype(np.float64).mean(axis=0)
    mean_other = acts[~wanted].astype(np.float64).mean(axis=0)
    return mean_wanted - mean_other


def unit(vectors: Any) -> np.ndarray:
    """``vectors`` [..., D] scaled to unit norm along the last axis (float32; norms computed in the input's
    precision); an all-zero vector stays zero."""
    vectors = np.asarray(vectors)
    _check_finite("vectors", vectors)
    norm = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def sigma_along(acts: Any, directions: Any) -> np.ndarray:
    """``[*U]`` float32: standard deviation over N of ``acts`` [N, *U, D] projected on ``directions`` [*U, D]
    (ITI's scale; population std, float64 accumulation)."""
    acts, directions = np.asarray(acts), np.asarray(directions, np.float64)
    if acts.ndim < 2 or acts.shape[1:] != directions.shape:
        raise ConceptError(
            f"sigma_along: acts {acts.shape} and directions {directions.shape} must be [N, *U, D] and [*U, D]"
        )
    _check_finite("acts", acts)
    _check_finite("directions", directions)
    projections = np.einsum("n...d,...d->n...", acts.astype(np.float64), directions)
    return projections.std(axis=0).astype(np.float32)


def _as_key(key_or_seed: Any) -> Array:
    if isinstance(key_or_seed, (int, np.integer)) and not isinstance(key_or_seed, bool):
        return jax.random.key(int(key_or_seed))
    if isinstance(key_or_seed, jax.Array) and (
        jnp.issubdtype(key_or_seed.dtype, jax.dtypes.prng_key) or key_or_seed.dtype == jnp.uint32
    ):
        return key_or_seed
    raise ConceptError(f"key_or_seed: expected an int seed or a jax PRNG key, got {type(key_or_seed).__name__}")


def norm_matched_random(like: Any, key_or_seed: Any) -> np.ndarray:
    """``like.shape`` float32: isotropic random directions with the norms of ``like`` [*U, D] along D (the control).

    Deterministic in ``key_or_seed`` (an int seed or a jax key); the unit directions are those of
    ``jax.random.normal(key, like.shape)``, so for ``[L, H, D]`` they equal
    ``jaxlm.intervene.random_directions(key, L, H, D)``. A zero vector in ``like`` stays zero.
    """
    like = np.asarray(like)
    if like.ndim < 1 or like.shape[-1] == 0:
        raise ConceptError(f"like: expected shape [..., D] with D > 0, got {like.shape}")
    _check_finite("like", like)
    noise = jax.random.normal(_as_key(key_or_seed), like.shape, jnp.float32)
    directions = np.asarray(noise / jnp.linalg.norm(noise, axis=-1, keepdims=True), np.float64)
    norms = np.linalg.norm(like.astype(np.float64), axis=-1, keepdims=True)
    return (directions * norms).astype(np.float32)


# ---------------------------------------------------------------------------------------
# LEACE
# ---------------------------------------------------------------------------------------


@struct.dataclass
class LeaceEraser:
    """The affine eraser ``x' = x - scale * P (x - mu)`` (a pytree: it can be a jit argument).

    ``P`` [*U, d, d] is the oblique projection ``W^+ P_{W S_xz} W`` (rank = the concept's rank,
    ``P @ P = P``); ``mu`` [*U, d] the mean of the fitting activations. At ``scale = 1`` the class
    means of the fitting data coincide and the cross-covariance with the concept is zero;
    ``scale = 0`` is the identity. Leading unit axes ``U`` (e.g. ``[L]``) broadcast against ``x``'s
    trailing axes.
    """

    P: Any
    mu: Any

    @property
    def rank(self) -> np.ndarray:
        """``[*U]`` int: the number of directions erased (rank of ``P``), from its trace."""
        return np.rint(np.trace(np.asarray(self.P), axis1=-2, axis2=-1)).astype(int)

    def erase(self, x: Any, scale: Any = 1.0) -> Any:
        """``x`` [..., *U, d] with the concept erased (numpy in, numpy out; jax arrays or tracers in, jax out)."""
        delta = x - self.mu
        removed = (self.P @ delta[..., None])[..., 0]
        return x - scale * removed


def concept_matrix(labels: Any, n: int) -> np.ndarray:
    """``[N, k]`` float64 concept values: integer class labels [N] one-hot over their sorted distinct
    values (k = number of classes, at least 2); a 2-D ``[N, k]`` array (continuous or already
    one-hot) is used as given."""
    labels = np.asarray(labels)
    if labels.ndim not in (1, 2) or labels.shape[0] != n:
        raise ConceptError(f"labels: expected shape [N] or [N, k] with N = {n}, got {labels.shape}")
    _check_finite("labels", labels)
    if labels.ndim == 2:
        z = labels.astype(np.float64)
        if not np.any(z.std(axis=0) > 0):
            raise ConceptError(f"labels: every column of the [N, k] = {labels.shape} concept is constant")
        return z
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
        raise ConceptError("labels: a 1-D label array must hold class labels (integers); pass continuous concepts as [N, k]")
    classes, index = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ConceptError(f"labels: need at least two classes, got only {classes.tolist()} in {n} examples")
    return np.eye(len(classes))[index.reshape(-1)]


def _shrunk_covariance(centred: np.ndarray) -> np.ndarray:
    """Optimal linear shrinkage of the (1/N) sample covariance toward ``tr/d * I`` (the estimator
    ``concept_erasure.shrinkage.optimal_linear_shrinkage`` uses, for N not much larger than d)."""
    n, d = centred.shape[0], centred.shape[-1]
    s = np.einsum("n...i,n...j->...ij", centred, centred) / n
    trace = np.trace(s, axis1=-2, axis2=-1)[..., None, None]
    target_norm_sq = trace**2 / d  # |tr/d * I|_F^2
    s_norm_sq = np.sum(s * s, axis=(-2, -1), keepdims=True)
    prod_trace = trace**2 / d  # tr(S @ tr/d * I)
    eps = np.finfo(np.float64).eps
    top = trace**2 * target_norm_sq / n
    bottom = s_norm_sq * target_norm_sq - prod_trace**2
    alpha = 1 - (top + eps) / (bottom + eps)
    beta = (1 - alpha) * (prod_trace + eps) / (target_norm_sq + eps)
    return alpha * s + beta * (trace / d) * np.eye(d)


def _leace_projection(sigma_xx: np.ndarray, sigma_xz: np.ndarray, svd_rtol: float) -> np.ndarray:
    """``P = W^+ U U^T W`` [..., d, d] with ``W = sigma_xx^{+1/2}`` (pseudo-inverse square root; eigenvalues
    below ``d * eps * max`` count as zero, torch.linalg.pinv's rule) and ``U`` the left singular vectors
    of ``W sigma_xz`` whose singular values exceed ``svd_rtol`` times the largest."""
    d = sigma_xx.shape[-1]
    eigenvalues, vectors = np.linalg.eigh(sigma_xx)
    keep = eigenvalues > eigenvalues[..., -1:] * d * np.finfo(np.float64).eps
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    inv_sqrt = np.where(keep, 1.0 / np.sqrt(np.where(keep, eigenvalues, 1.0)), 0.0)
    sqrt = np.where(keep, np.sqrt(eigenvalues), 0.0)
    vectors_t = np.swapaxes(vectors, -1, -2)
    whiten = (vectors * inv_sqrt[..., None, :]) @ vectors_t
    unwhiten = (vectors * sqrt[..., None, :]) @ vectors_t
    u, s, _ = np.linalg.svd(whiten @ sigma_xz, full_matrices=False)
    u = u * (s > svd_rtol * s[..., :1])[..., None, :]
    return unwhiten @ u @ np.swapaxes(u, -1, -2) @ whiten


def _leace(acts: np.ndarray, labels: Any, ridge: float, shrinkage: bool, svd_rtol: float) -> LeaceEraser:
    """Fit on ``acts`` [N, *U, d] (checked, any float dtype): P [*U, d, d], mu [*U, d]."""
    if not (np.isfinite(ridge) and ridge >= 0):
        raise ConceptError(f"ridge: expected a finite number >= 0, got {ridge!r}")
    if not (np.isfinite(svd_rtol) and 0 < svd_rtol < 1):
        raise ConceptError(f"svd_rtol: expected a number in (0, 1), got {svd_rtol!r}")
    n, d = acts.shape[0], acts.shape[-1]
    if n < 2:
        raise ConceptError(f"acts: need at least 2 examples to estimate a covariance, got shape {acts.shape}")
    z = concept_matrix(labels, n)
    x = acts.astype(np.float64)
    mu = x.mean(axis=0)
    centred = x - mu
    z_centred = z - z.mean(axis=0)
    if shrinkage:
        sigma_xx = _shrunk_covariance(centred)
    else:
        sigma_xx = np.einsum("n...i,n...j->...ij", centred, centred) / (n - 1)
    sigma_xx = (sigma_xx + np.swapaxes(sigma_xx, -1, -2)) / 2
    if ridge:
        mean_variance = np.trace(sigma_xx, axis1=-2, axis2=-1)[..., None, None] / d
        sigma_xx = sigma_xx + ridge * mean_variance * np.eye(d)
    sigma_xz = np.einsum("n...i,nk->...ik", centred, z_centred) / (n - 1)
    return LeaceEraser(P=_leace_projection(sigma_xx, sigma_xz, svd_rtol), mu=mu)


def leace_fit(
    x: Any, labels: Any, *, ridge: float = 0.0, shrinkage: bool = False, svd_rtol: float = 1e-8
) -> LeaceEraser:
    """LEACE eraser (Belrose et al. 2023) from activations ``x`` [N, d] and a concept ``labels``.

    ``labels``: class labels [N] (one-hot over their distinct values) or concept values [N, k].
    With covariance ``S`` of x, cross-covariance ``S_xz`` and whitening ``W = S^{+1/2}``,
    ``P = W^+ P_{W S_xz} W`` where ``P_{W S_xz}`` projects orthogonally onto the column space of
    ``W S_xz``; erasing is ``x' = x - P (x - mu)``. This removes every linear trace of the concept
    (equal class means, zero cross-covariance) with the least mean squared change.

    Rank-deficient covariance (N <= d, or activations confined to a subspace): the pseudo-inverse
    square root already handles it (directions without variance pass unchanged); ``ridge > 0``
    adds ``ridge * tr(S)/d * I`` to S first (a relative ridge, for an ill-conditioned S), and
    ``shrinkage=True`` uses optimal linear shrinkage toward ``tr(S)/d * I`` as the
    ``concept-erasure`` package does by default. Either still erases the concept exactly; only the
    least-squares optimality is then with respect to the regularised S. Singular values of
    ``W S_xz`` below ``svd_rtol`` times the largest are dropped (removes the one-hot redundancy:
    k classes span k - 1 directions).
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ConceptError(f"x: expected shape [N, d], got {x.shape}")
    _check_finite("x", x)
    return _leace(x, labels, ridge, shrinkage, svd_rtol)


def leace_fit_per_layer(
    acts: Any, labels: Any, *, ridge: float = 0.0, shrinkage: bool = False, svd_rtol: float = 1e-8
) -> LeaceEraser:
    """One LEACE eraser per unit, stacked: ``acts`` [N, L, d] -> P [L, d, d], mu [L, d]
    (also [N, L, H, D] -> P [L, H, D, D]); each equals ``leace_fit(acts[:, l], labels)``."""
    acts = np.asarray(acts)
    if acts.ndim < 3:
        raise ConceptError(f"acts: expected shape [N, L, d] (or [N, L, H, D]), got {acts.shape}")
    _check_finite("acts", acts)
    return _leace(acts, labels, ridge, shrinkage, svd_rtol)
