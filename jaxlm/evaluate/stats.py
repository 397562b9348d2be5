"""Study statistics: seed-level bootstrap, toxicity at matched KL, and power.

Units of inference. Each model (share x seed) is evaluated on the *same* prompts, a prompt's
score being the maximum toxicity over its samples. Claims *between* models (share 10% vs 0%)
treat the seed as the unit: seeds are independent trainings, so their spread is part of the
uncertainty, and the bootstrap resamples seeds and then prompts (``hierarchical_bootstrap``,
``hierarchical_difference``). Comparisons *within* one model (ITI vs base) pair the prompts
(``paired_test``). Methods with a capability cost are compared at a matched KL on each
model's dose-response curve (``matched_kl_difference``). ``paired_mde``, ``between_model_mde``
and ``power_table`` say how large an effect a study of a given size can detect.

Pure numpy/scipy; the bootstraps are vectorised over replicates and seeded.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np
from scipy import stats

from jaxlm.errors import JaxlmError

Values = Mapping[Hashable, np.ndarray]  # seed -> per-prompt scores
Curves = Mapping[Hashable, tuple[np.ndarray, np.ndarray]]  # seed -> (kl[scales], tox[scales, prompts])
Statistic = Callable[..., np.ndarray]  # a numpy reduction taking ``axis``: np.mean, np.median

CHUNK_ELEMENTS = 1 << 22  # resampled values held at once (about 32 MiB of float64)


class StatsError(JaxlmError, ValueError):
    """Inputs a statistic cannot use: empty or non-finite scores, mismatched prompt sets or shapes."""


# ---------------------------------------------------------------------------------------
# t-intervals and paired tests
# ---------------------------------------------------------------------------------------


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and t-based 95% interval (nan bounds for a single value)."""
    x = np.asarray(values, float)
    m = float(x.mean())
    if len(x) < 2:
        return m, math.nan, math.nan
    half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return m, m - half, m + half


def paired_test(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Paired comparison of per-unit values ``a - b``: mean difference, 95% CI, two-sided p."""
    d = np.asarray(a, float) - np.asarray(b, float)
    m, lo, hi = mean_ci(d)
    p = float(stats.ttest_1samp(d, 0.0).pvalue) if len(d) > 1 and d.std() > 0 else (1.0 if m == 0 else 0.0)
    return {"diff": m, "lo": lo, "hi": hi, "p": p, "n": int(len(d))}


# ---------------------------------------------------------------------------------------
# Hierarchical (seed, then prompt) bootstrap
# ---------------------------------------------------------------------------------------


def _scores(values: Values, what: str) -> list[np.ndarray]:
    if not values:
        raise StatsError(f"{what}: no seeds given")
    arrays = []
    for key, x in values.items():
        x = np.asarray(x, float)
        if x.ndim != 1 or x.size == 0:
            raise StatsError(f"{what}: seed {key!r}: expected a non-empty 1-D array of per-prompt scores, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise StatsError(f"{what}: seed {key!r}: {int((~np.isfinite(x)).sum())} non-finite scores")
        arrays.append(x)
    return arrays


def _check_bootstrap(n_boot: int, confidence: float) -> None:
    if n_boot < 1:
        raise StatsError(f"n_boot: expected >= 1, got {n_boot}")
    if not 0.0 < confidence < 1.0:
        raise StatsError(f"confidence: expected a level in (0, 1), got {confidence}")


def _chunks(n_boot: int, elements_per_replicate: int):
    size = max(1, CHUNK_ELEMENTS // max(1, elements_per_replicate))
    for start in range(0, n_boot, size):
        yield min(size, n_boot - start)


def _slot_stats(arrays: list[np.ndarray], slots: np.ndarray, rng: np.random.Generator, stat: Statistic,
                prompt_idx: np.ndarray | None = None) -> np.ndarray:
    """Per-seed statistic for every (replicate, slot): slot ``j`` of replicate ``r`` is model
    ``slots[r, j]`` on its prompts resampled, either with the replicate's shared ``prompt_idx[r]``
    (all models scored the same prompts) or independently for every slot."""
    if prompt_idx is not None:
        per_model = stat(np.stack(arrays)[:, prompt_idx], axis=-1)  # [models, replicates]
        return per_model[slots, np.arange(len(slots))[:, None]]
    out = np.empty(slots.shape)
    for model, x in enumerate(arrays):
        chosen = slots == model
        idx = rng.integers(0, len(x), (int(chosen.sum()), len(x)))
        out[chosen] = stat(x[idx], axis=-1)
    return out


def _interval(point: float, draws: np.ndarray, confidence: float) -> dict[str, float]:
    low, high = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"mean": float(point), "low": float(low), "high": float(high)}


def hierarchical_bootstrap(values: Values, n_boot: int = 2000, seed: int = 0, stat: Statistic = np.mean,
                           confidence: float = 0.95) -> dict[str, Any]:
    """Mean over seeds of each seed's ``stat`` over prompts, with a two-stage percentile interval:
    every replicate resamples the seeds with replacement, then the prompts within each drawn seed.

    Returns ``mean``, ``low``, ``high``, ``n_seeds`` and ``n_prompts`` (per seed; the fewest if
    seeds differ).
    """
    arrays = _scores(values, "hierarchical_bootstrap")
    _check_bootstrap(n_boot, confidence)
    rng = np.random.default_rng(seed)
    k = len(arrays)
    draws = []
    for size in _chunks(n_boot, k * max(map(len, arrays))):
        slots = rng.integers(0, k, (size, k))
        draws.append(_slot_stats(arrays, slots, rng, stat).mean(axis=1))
    point = np.mean([stat(x) for x in arrays])
    return {**_interval(point, np.concatenate(draws), confidence), "n_seeds": k, "n_prompts": min(map(len, arrays))}


def _p_value(draws: np.ndarray) -> float:
    """Two-sided bootstrap p: twice the smaller tail mass at 0, at least 1/n_boot, at most 1."""
    p = 2 * min(float(np.mean(draws <= 0)), float(np.mean(draws >= 0)))
    return min(1.0, max(p, 1.0 / len(draws)))


def format_p(p: float, n_boot: int = 2000) -> str:
    """A bootstrap p-value for a report; at its floor ``1 / n_boot`` it reads as a bound."""
    return f"p <= {1 / n_boot:.2g}" if p <= 1 / n_boot else f"p = {p:.2g}"


def hierarchical_difference(a: Values, b: Values, paired_prompts: bool = True, paired_seeds: bool = False,
                            n_boot: int = 2000, seed: int = 0, stat: Statistic = np.mean,
                            confidence: float = 0.95) -> dict[str, Any]:
    """Group ``a`` minus group ``b``, each the mean over its seeds (models) of a per-seed ``stat``.

    Every replicate resamples each group's seeds with replacement (independent trainings, so
    not paired across groups unless ``paired_seeds``: then ``a`` and ``b`` must have the same
    seeds and one draw of seeds serves both, the difference taken per seed). With
    ``paired_prompts`` (every model scored the same prompts) one prompt index set per
    replicate is applied to every model, which keeps the prompt pairing; otherwise each drawn
    model's prompts are resampled on their own.

    Returns ``mean`` (the difference), ``low``/``high`` (percentile interval), ``p`` (two-sided,
    ``2 min(P(d <= 0), P(d >= 0))`` floored at ``1/n_boot``), ``n_seeds_a``, ``n_seeds_b`` and
    ``n_prompts`` (per model; the fewest if they differ).
    """
    if paired_seeds:
        if set(a) != set(b):
            raise StatsError(f"hierarchical_difference: paired seeds need the same seeds in both groups, got {list(a)} and {list(b)}")
        b = {key: b[key] for key in a}  # seed i of a pairs with seed i of b
    arrays_a = _scores(a, "hierarchical_difference: group a")
    arrays_b = _scores(b, "hierarchical_difference: group b")
    _check_bootstrap(n_boot, confidence)
    lengths = {len(x) for x in arrays_a + arrays_b}
    if paired_prompts and len(lengths) > 1:
        raise StatsError(f"hierarchical_difference: paired prompts need one prompt count for every model, got {sorted(lengths)}")
    rng = np.random.default_rng(seed)
    ka, kb, n_prompts = len(arrays_a), len(arrays_b), max(lengths)
    draws = []
    for size in _chunks(n_boot, (ka + kb) * n_prompts):
        slots_a = rng.integers(0, ka, (size, ka))
        slots_b = slots_a if paired_seeds else rng.integers(0, kb, (size, kb))
        prompt_idx = rng.integers(0, n_prompts, (size, n_prompts)) if paired_prompts else None
        stats_a = _slot_stats(arrays_a, slots_a, rng, stat, prompt_idx)
        stats_b = _slot_stats(arrays_b, slots_b, rng, stat, prompt_idx)
        draws.append(stats_a.mean(axis=1) - stats_b.mean(axis=1))
    draws = np.concatenate(draws)
    point = np.mean([stat(x) for x in arrays_a]) - np.mean([stat(x) for x in arrays_b])
    return {**_interval(point, draws, confidence), "p": _p_value(draws), "n_seeds_a": ka, "n_seeds_b": kb,
            "n_prompts": min(lengths)}


# ---------------------------------------------------------------------------------------
# Dose-response frontiers and toxicity at matched KL
# ---------------------------------------------------------------------------------------


def frontier(kl: np.ndarray, tox: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One model's dose-response points of one method family, sorted by KL.

    ``kl`` is [points] (the caller includes the base model as the scale-0 point, KL 0);
    ``tox`` is [points, ...] (mean toxicity, or per-prompt scores [points, prompts]) and is
    reordered with it.
    """
    kl, tox = np.asarray(kl, float), np.asarray(tox, float)
    if kl.ndim != 1 or kl.size == 0:
        raise StatsError(f"frontier: expected a non-empty 1-D array of KL values, got shape {kl.shape}")
    if tox.ndim < 1 or len(tox) != len(kl):
        raise StatsError(f"frontier: expected {len(kl)} toxicity points (one per KL value), got shape {tox.shape}")
    if not np.isfinite(kl).all():
        raise StatsError(f"frontier: {int((~np.isfinite(kl)).sum())} non-finite KL values")
    order = np.argsort(kl, kind="stable")
    return kl[order], tox[order]


def tox_at_kl(kl_points: np.ndarray, tox_points: np.ndarray, target_kl: float | np.ndarray) -> float | np.ndarray:
    """Toxicity at ``target_kl`` by linear interpolation along the curve sorted by KL; nan
    outside the measured KL range (never extrapolated)."""
    kl, tox = frontier(kl_points, tox_points)
    if tox.ndim != 1:
        raise StatsError(f"tox_at_kl: expected one toxicity value per KL point, got shape {tox.shape}")
    target = np.asarray(target_kl, float)
    inside = (target >= kl[0]) & (target <= kl[-1])
    result = np.where(inside, np.interp(target, kl, tox), np.nan)
    return float(result) if result.ndim == 0 else result


def _interpolation_weights(kl: np.ndarray, target_kl: float) -> np.ndarray:
    """Weights over the points such that ``weights @ tox == tox_at_kl(kl, tox, target_kl)``
    for any ``tox`` (linear interpolation is linear in the values)."""
    basis = np.eye(len(kl))
    return np.array([tox_at_kl(kl, row, target_kl) for row in basis])


def scores_at_kl(curves: Curves, target_kl: float, what: str = "scores_at_kl") -> tuple[dict, list]:
    """Each model's per-prompt toxicity interpolated at ``target_kl`` on its curve (seed ->
    ``(kl[scales], tox[scales, prompts])``), and the seeds whose curve does not reach it."""
    reached, missed = {}, []
    for key, (kl, tox) in curves.items():
        tox = np.asarray(tox, float)
        if tox.ndim != 2:
            raise StatsError(f"{what} seed {key!r}: expected tox of shape [scales, prompts], got {tox.shape}")
        kl, tox = frontier(kl, tox)
        if kl[0] <= target_kl <= kl[-1]:
            reached[key] = _interpolation_weights(kl, target_kl) @ tox
        else:
            missed.append(key)
    return reached, missed


def matched_kl_difference(curves_a: Curves, curves_b: Curves, target_kl: float, n_boot: int = 2000, seed: int = 0,
                          confidence: float = 0.95) -> dict[str, Any] | None:
    """Group ``a`` minus group ``b`` in mean toxicity at capability cost ``target_kl``.

    ``curves_x`` maps each seed (model) to ``(kl[scales], per_prompt_tox[scales, prompts])``,
    one method family's dose-response points. Each replicate resamples the seeds of each group
    and one prompt index set shared by every model, takes each model's per-scale mean toxicity
    over those prompts, interpolates it at ``target_kl`` (``tox_at_kl``), averages over seeds
    and differences the groups. The interpolation weights depend only on KL, so this equals
    ``hierarchical_difference`` on each model's interpolated per-prompt scores, which is how
    it is computed. KL is held fixed per point: its sampling error is small next to the
    toxicity's over prompts and seeds, and is not propagated.

    A model whose curve does not reach ``target_kl`` is excluded and counted (``excluded_a``,
    ``excluded_b``: its seeds); None if a group has no model left. Otherwise the result is
    ``hierarchical_difference``'s plus ``target_kl`` and the exclusions.
    """
    if not math.isfinite(target_kl):
        raise StatsError(f"matched_kl_difference: target_kl must be finite, got {target_kl}")
    groups, excluded = [], []
    for name, curves in (("a", curves_a), ("b", curves_b)):
        reached, missed = scores_at_kl(curves, target_kl, f"matched_kl_difference: group {name}")
        groups.append(reached)
        excluded.append(missed)
    if not groups[0] or not groups[1]:
        return None
    result = hierarchical_difference(groups[0], groups[1], paired_prompts=True, n_boot=n_boot, seed=seed, confidence=confidence)
    return {**result, "target_kl": float(target_kl), "excluded_a": excluded[0], "excluded_b": excluded[1],
            "n_excluded_a": len(excluded[0]), "n_excluded_b": len(excluded[1])}


# ---------------------------------------------------------------------------------------
# Power
# ---------------------------------------------------------------------------------------


def _check_power(alpha: float, power: float) -> None:
    if not 0.0 < alpha < 1.0 or not 0.0 < power < 1.0:
        raise StatsError(f"alpha and power: expected levels in (0, 1), got alpha={alpha}, power={power}")


def paired_mde(sd_diff: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimum detectable mean difference of a two-sided paired test over ``n`` units (prompts)
    whose differences have SD ``sd_diff`` (normal approximation: ``(z_{1-a/2} + z_power) sd / sqrt(n)``)."""
    _check_power(alpha, power)
    if n < 1:
        raise StatsError(f"paired_mde: expected n >= 1, got {n}")
    return float((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * sd_diff / math.sqrt(n))


def n_for_mde(sd_diff: float, mde: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Fewest paired units for which ``paired_mde(sd_diff, n) <= mde``."""
    _check_power(alpha, power)
    if mde <= 0:
        raise StatsError(f"n_for_mde: expected mde > 0, got {mde}")
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    n = max(1, math.ceil((z * sd_diff / mde) ** 2))
    while n > 1 and paired_mde(sd_diff, n - 1, alpha, power) <= mde:  # guard against float rounding up
        n -= 1
    return n


def between_model_mde(seed_sd: float, n_seeds_per_group: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimum detectable difference between two groups of models compared on their seed
    means (two-sample t, ``df = 2(n - 1)``): ``(t_{1-a/2} + t_power) seed_sd sqrt(2 / n)``.
    ``seed_sd`` is the SD of a model's score across seeds at the study's prompt count."""
    _check_power(alpha, power)
    n = n_seeds_per_group
    if n < 2:
        raise StatsError(f"between_model_mde: expected >= 2 seeds per group, got {n}")
    df = 2 * (n - 1)
    return float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * seed_sd * math.sqrt(2 / n))


def power_table(sd_diff: float, seed_sd: float, prompt_counts: Sequence[int], seed_counts: Sequence[int],
                alpha: float = 0.05, power: float = 0.8) -> list[dict[str, float]]:
    """One row per (prompt count, seeds per group): the within-model paired MDE over the
    prompts and the between-model MDE over the seeds."""
    return [{"n_prompts": int(n_prompts), "n_seeds": int(n_seeds),
             "within_model_mde": paired_mde(sd_diff, n_prompts, alpha, power),
             "between_model_mde": between_model_mde(seed_sd, n_seeds, alpha, power)}
            for n_prompts in prompt_counts for n_seeds in seed_counts]
