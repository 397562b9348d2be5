"""Concept estimators: LEACE against the ``concept-erasure`` reference, probes at chance after
erasure, mean differences and sigma as ITI computes them, norm-matched random controls, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from concept_erasure import LeaceFitter
from sklearn.linear_model import LogisticRegression

from jaxlm.concepts import (
    ConceptError,
    LeaceEraser,
    concept_matrix,
    leace_fit,
    leace_fit_per_layer,
    mean_difference,
    norm_matched_random,
    sigma_along,
    unit,
)
from jaxlm.errors import JaxlmError
from jaxlm.intervene import mass_mean_directions, random_directions
from jaxlm.intervene import sigma_along as iti_sigma_along

D = 12


def gaussian_classes(n: int, d: int = D, classes: int = 2, separation: float = 1.5, seed: int = 0):
    """``x`` [n, d] float64 with a shared, anisotropic covariance and class-dependent means; ``y`` [n]
    balanced labels 0..classes-1 (shuffled)."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % classes)
    mix = rng.normal(size=(d, d)) / np.sqrt(d) + np.diag(rng.uniform(0.5, 2.0, d))
    means = rng.normal(size=(classes, d))
    means *= separation / np.linalg.norm(means, axis=1, keepdims=True)
    x = rng.normal(size=(n, d)) @ mix.T + means[y] + 3.0  # offset: the eraser must use mu
    return x, y


def reference_erase(x, z_matrix, shrinkage: bool):
    """concept-erasure's LEACE (no trace constraint) fitted and applied on float64 torch tensors."""
    fitter = LeaceFitter.fit(
        torch.from_numpy(x), torch.from_numpy(z_matrix), shrinkage=shrinkage, constrain_cov_trace=False
    )
    eraser = fitter.eraser
    return eraser(torch.from_numpy(x)).numpy(), (eraser.proj_left @ eraser.proj_right).numpy(), eraser.bias.numpy()


# -- LEACE -------------------------------------------------------------------------------


@pytest.mark.parametrize("shrinkage", [False, True])
@pytest.mark.parametrize("classes", [2, 3])
def test_leace_matches_concept_erasure(classes, shrinkage):
    x, y = gaussian_classes(400, classes=classes, seed=classes)
    eraser = leace_fit(x, y, shrinkage=shrinkage)
    z = np.eye(classes)[y] if classes > 2 else y[:, None].astype(np.float64)
    erased_ref, p_ref, mu_ref = reference_erase(x, z, shrinkage)
    np.testing.assert_allclose(eraser.erase(x), erased_ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(eraser.P, p_ref, atol=1e-8)
    np.testing.assert_allclose(eraser.mu, mu_ref, atol=1e-10)
    assert eraser.rank == classes - 1
    assert not np.allclose(eraser.erase(x), x, atol=1e-2)  # something was erased


def test_leace_binary_labels_one_hot_equals_single_column():
    x, y = gaussian_classes(300)
    one_hot, column = leace_fit(x, y), leace_fit(x, y[:, None].astype(float))
    np.testing.assert_allclose(one_hot.P, column.P, atol=1e-10)
    np.testing.assert_array_equal(concept_matrix(np.array([5, 2, 5]), 3), [[0, 1], [1, 0], [0, 1]])


def test_leace_equalises_class_means_and_is_a_projection():
    x, y = gaussian_classes(600, classes=3, seed=7)
    eraser = leace_fit(x, y)
    erased = eraser.erase(x)
    class_means = np.stack([erased[y == c].mean(0) for c in range(3)])
    scale = np.abs(x).mean()
    np.testing.assert_allclose(class_means - class_means[0], 0.0, atol=1e-10 * scale)
    np.testing.assert_allclose(erased.mean(0), x.mean(0), atol=1e-10 * scale)  # the unconditional mean stays
    centred_z = np.eye(3)[y] - np.eye(3)[y].mean(0)
    np.testing.assert_allclose((erased - erased.mean(0)).T @ centred_z, 0.0, atol=1e-8 * scale * len(y))
    np.testing.assert_allclose(eraser.P @ eraser.P, eraser.P, atol=1e-10)  # oblique projection
    np.testing.assert_allclose(eraser.erase(erased), erased, atol=1e-10 * scale)  # erasing twice = once
    before = np.stack([x[y == c].mean(0) for c in range(3)])
    assert np.abs(before - before[0]).max() > 0.5  # the classes did differ


def test_probe_at_chance_after_erasure():
    x, y = gaussian_classes(4000, separation=3.0, seed=3)
    train, test = slice(0, 3000), slice(3000, None)
    n_test = 1000
    before = LogisticRegression(max_iter=2000).fit(x[train], y[train]).score(x[test], y[test])
    assert before > 0.85
    eraser = leace_fit(x[train], y[train])  # fitted on the training split only: held-out data is new
    erased = eraser.erase(x)
    after = LogisticRegression(max_iter=2000).fit(erased[train], y[train]).score(erased[test], y[test])
    majority = max(np.mean(y[test]), 1 - np.mean(y[test]))
    half_width = 3.29 * np.sqrt(0.25 / n_test)  # two-sided 99.9% binomial interval around chance
    assert abs(after - majority) <= half_width, (before, after, majority)


def test_leace_rank_deficient_covariance_and_ridge():
    rng = np.random.default_rng(5)
    y = np.arange(200) % 2
    basis = rng.normal(size=(5, D))  # activations live in a 5-dimensional subspace of R^12
    x = (rng.normal(size=(200, 5)) + 2.0 * y[:, None]) @ basis
    plain = leace_fit(x, y)
    erased_ref, _, _ = reference_erase(x, y[:, None].astype(np.float64), shrinkage=False)
    np.testing.assert_allclose(plain.erase(x), erased_ref, atol=1e-4)
    ridged = leace_fit(x, y, ridge=1e-3)
    for eraser in (plain, ridged):
        assert np.isfinite(eraser.P).all()
        erased = eraser.erase(x)
        np.testing.assert_allclose(erased[y == 0].mean(0), erased[y == 1].mean(0), atol=1e-8)
    assert not np.allclose(ridged.P, plain.P, atol=1e-6)  # the ridge changed the (oblique) projection


def test_leace_per_layer_equals_stacked_single_fits_and_jits():
    rng = np.random.default_rng(9)
    x0, y = gaussian_classes(300, seed=1)
    layers = [x0, x0 @ rng.normal(size=(D, D)), x0 + rng.normal(size=x0.shape)]
    acts = np.stack(layers, axis=1)  # [N, L, d]
    stacked = leace_fit_per_layer(acts, y)
    assert stacked.P.shape == (3, D, D) and stacked.mu.shape == (3, D)
    erased = stacked.erase(acts)
    for layer in range(3):
        single = leace_fit(acts[:, layer], y)
        np.testing.assert_allclose(stacked.P[layer], single.P, atol=1e-10)
        np.testing.assert_allclose(erased[:, layer], single.erase(acts[:, layer]), atol=1e-10)
    head_acts = acts.reshape(300, 3, 2, D // 2)  # [N, L, H, D] works too
    assert leace_fit_per_layer(head_acts, y).P.shape == (3, 2, D // 2, D // 2)

    eraser32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), stacked)
    apply = jax.jit(lambda e, x, s: e.erase(x, s))
    x32 = jnp.asarray(acts, jnp.float32)
    np.testing.assert_array_equal(apply(eraser32, x32, 0.0), x32)  # scale 0 = identity
    np.testing.assert_allclose(apply(eraser32, x32, 1.0), erased, rtol=1e-3, atol=1e-3)


# -- directions, scales, controls --------------------------------------------------------


def test_mean_difference_and_sigma_equal_iti():
    rng = np.random.default_rng(11)
    acts = rng.normal(size=(40, 2, 3, 8)).astype(np.float32)  # [N, L, H, D]
    labels = rng.permutation(np.arange(40) % 2)
    for wanted in (0, 1):
        directions = unit(mean_difference(acts, labels, wanted))
        np.testing.assert_array_equal(directions, mass_mean_directions(acts, labels, wanted))
        np.testing.assert_array_equal(sigma_along(acts, directions), iti_sigma_along(acts, directions))
    # ... and what they are: class means' difference, population std of the projections
    diff = mean_difference(acts, labels, 0)
    expected = acts[labels == 0].astype(np.float64).mean(0) - acts[labels == 1].astype(np.float64).mean(0)
    np.testing.assert_allclose(diff, expected, rtol=1e-12)
    residual = acts[:, :, 0]  # [N, L, d]: residual-site shapes work the same way
    direction = unit(mean_difference(residual, labels, 1))
    np.testing.assert_allclose(sigma_along(residual, direction), np.einsum("nld,ld->nl", residual, direction).std(0), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(direction, axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(unit(np.zeros((2, 4))), np.zeros((2, 4)))


def test_norm_matched_random():
    rng = np.random.default_rng(13)
    like = rng.normal(size=(2, 3, 8)) * rng.uniform(0.1, 10.0, (2, 3, 1))
    like[1, 2] = 0.0
    a = norm_matched_random(like, 4)
    np.testing.assert_allclose(np.linalg.norm(a, axis=-1), np.linalg.norm(like, axis=-1), rtol=1e-6)
    np.testing.assert_array_equal(a, norm_matched_random(like, jax.random.key(4)))  # seed = key(seed)
    np.testing.assert_array_equal(a, norm_matched_random(like, 4))  # deterministic
    assert not np.allclose(a, norm_matched_random(like, 5))
    assert np.abs(np.einsum("lhd,lhd->lh", unit(a), unit(like))).mean() < 0.6  # not aligned with `like`
    norms = np.linalg.norm(like, axis=-1, keepdims=True)
    np.testing.assert_allclose(a, np.asarray(random_directions(4, 2, 3, 8)) * norms, rtol=1e-5, atol=1e-6)
    assert a.dtype == np.float32 and norm_matched_random(like[0, 0], 0).shape == (8,)


# -- errors ------------------------------------------------------------------------------


def test_errors_name_the_argument():
    x, y = gaussian_classes(50)
    bad = x.copy()
    bad[3, 2] = np.nan
    cases = [
        (lambda: mean_difference(x, np.zeros(50), 0), r"labels: need examples of both the wanted label 0"),
        (lambda: mean_difference(x, y[:40], 0), r"labels: expected shape \[N\] = \(50,\)"),
        (lambda: mean_difference(bad, y, 0), r"acts: expected finite numbers, got 1 of 600"),
        (lambda: sigma_along(x[:, None], np.ones((2, D))), r"sigma_along: acts \(50, 1, 12\) and directions \(2, 12\)"),
        (lambda: sigma_along(x, np.full(D, np.inf)), r"directions: expected finite"),
        (lambda: leace_fit(x, np.ones(50)), r"labels: need at least two classes"),
        (lambda: leace_fit(x, y[:49]), r"labels: expected shape \[N\] or \[N, k\] with N = 50"),
        (lambda: leace_fit(bad, y), r"x: expected finite numbers"),
        (lambda: leace_fit(x[:, None], y), r"x: expected shape \[N, d\], got \(50, 1, 12\)"),
        (lambda: leace_fit(x, y + 0.5), r"labels: a 1-D label array must hold class labels"),
        (lambda: leace_fit(x, np.ones((50, 2))), r"labels: every column of the \[N, k\]"),
        (lambda: leace_fit(x, y, ridge=-1.0), r"ridge: expected a finite number >= 0"),
        (lambda: leace_fit_per_layer(x, y), r"acts: expected shape \[N, L, d\]"),
        (lambda: norm_matched_random(np.full((2, 3), np.nan), 0), r"like: expected finite"),
        (lambda: norm_matched_random(np.ones((2, 3)), "seed"), r"key_or_seed: expected an int seed or a jax PRNG key"),
    ]
    for call, message in cases:
        with pytest.raises(ConceptError, match=message):
            call()
    assert issubclass(ConceptError, JaxlmError)
    assert isinstance(leace_fit(x, y), LeaceEraser)
