"""The toy superposition experiment: a feature's share of the data against its entanglement.

Li et al. (ICML 2025, Section 2) train a 4-layer transformer with a 4-dimensional residual
stream on sequences from 3 cyclic Markov chains over 4 shared states. A *feature* is one
(chain, start state) pair: 12 features in 4 dimensions, so their directions must overlap.
One chain is underrepresented; as its share of the training data grows, the paper reports
its features' *entanglement* ``E(i) = max_{j != i} |cos(v_i, v_j)|`` falling from ~0.95 to
the other features' plateau (~0.8).

This module is the whole pipeline, built on jaxlm's own model and training step:

* data: ``feature_sequences`` (deterministic cycles) and ``sample_sequences`` (optionally
  noisy transitions) with per-feature sampling weights from the swept share;
* training: many models at once (shares x seeds), ``jax.vmap`` over ``Trainer._step``
  (``next_token_loss`` + ``make_optimizer``) inside a jitted ``lax.scan`` over steps;
* directions from the residual stream (``resid_post`` of every layer) by four estimators:
  ``probe`` (the paper's recipe), ``mass_mean``, ``multinomial`` and ``centroid``;
* ``entanglement``, ``welch_bound``, ``random_entanglement`` and ``paired_difference``
  (paired t-test and Wilcoxon over seeds);
* ``run_study`` ties it together; ``plot_entanglement`` draws the figure.

Logistic regressions are solved by a damped Newton method in JAX, vmapped over every
model, layer, token and feature (scikit-learn's convention: ``C`` is the inverse L2
strength on the weights, the intercept is not penalised).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.config import ConfigError, ModelConfig, load, to_dict
from jaxlm.optim import OptimizerConfig

Array = jax.Array

# Three 4-cycles over states 0..3. A complete set of edge-disjoint Hamiltonian cycles of the
# complete digraph on 4 vertices does not exist (Tillson), so 3 cycles share at least two
# directed edges; these share exactly two (2->3 in chains 0 and 1, 1->0 in chains 1 and 2).
DEFAULT_CHAINS: tuple[tuple[int, ...], ...] = ((0, 1, 2, 3), (0, 2, 3, 1), (0, 3, 2, 1))

METHODS = ("probe", "mass_mean", "multinomial", "centroid")
Method = Literal["probe", "mass_mean", "multinomial", "centroid"]

TOY_MODEL = ModelConfig(
    vocab_size=4,
    d_model=4,
    n_layers=4,
    n_heads=2,
    mlp_hidden=16,
    max_seq_len=16,
    position_embedding="learned",
    norm="layernorm",
    tie_embeddings=True,
    init_std=0.1,
)

TOY_OPTIMIZER = OptimizerConfig(
    lr=3e-3,
    warmup_steps=100,
    schedule="constant",  # so a checkpoint at step k is exactly a k-step run
    beta1=0.9,
    beta2=0.999,
    weight_decay=0.0,
    clip_norm=1.0,
)


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """One sweep: data, model, training, probing and the shares x seeds grid."""

    # data
    chains: tuple[tuple[int, ...], ...] = DEFAULT_CHAINS
    rare_chain: int = 2  # the underrepresented chain
    seq_len: int = 16
    transition_noise: float = 0.0  # probability that a step jumps to a uniformly random state
    # model and training (jaxlm's own model and train step)
    model: ModelConfig = TOY_MODEL
    optimizer: OptimizerConfig = TOY_OPTIMIZER
    steps: int = 4000
    batch_size: int = 64
    checkpoints: tuple[int, ...] = (500, 1000, 2000)  # earlier steps at which directions are measured too
    # sweep: the rare chain's per-feature sampling weight relative to a control feature's
    shares: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    seeds: int = 10
    first_seed: int = 0
    # directions
    methods: tuple[Method, ...] = METHODS
    probe_C: tuple[float, ...] = (1.0, 0.01, 100.0)  # inverse L2 strengths; the first is the primary one
    probe_balanced: bool = False  # class-balanced sample weights in the logistic regressions
    probe_from: int = 4  # first position probed (from one full cycle on every prefix names its feature)
    probe_sequences: int = 8  # sequences per feature to probe on when transitions are noisy
    layer: int = -1  # primary layer (index into resid_post); every layer is measured
    newton_iterations: int = 30

    def __post_init__(self) -> None:
        if len(self.chains) < 2:
            raise ConfigError(f"toy.chains: expected at least 2 chains, got {len(self.chains)}")
        states = sorted(self.chains[0])
        for c, chain in enumerate(self.chains):
            if sorted(chain) != list(range(len(states))):
                raise ConfigError(
                    f"toy.chains[{c}]: expected a cycle visiting every state 0..{len(states) - 1} once, got {list(chain)}"
                )
        if len(set(self.chains)) != len(self.chains) or len({_edges(c) for c in self.chains}) != len(self.chains):
            raise ConfigError("toy.chains: the chains must be distinct cycles")
        if not 0 <= self.rare_chain < len(self.chains):
            raise ConfigError(f"toy.rare_chain: expected an index in [0, {len(self.chains)}), got {self.rare_chain}")
        if self.model.vocab_size != self.n_states:
            raise ConfigError(
                f"toy.model.vocab_size: expected {self.n_states} (one token per state), got {self.model.vocab_size}"
            )
        if self.model.max_seq_len < self.seq_len:
            raise ConfigError(f"toy.model.max_seq_len: expected >= seq_len ({self.seq_len}), got {self.model.max_seq_len}")
        if not 0.0 <= self.transition_noise <= 1.0:
            raise ConfigError(f"toy.transition_noise: expected a probability in [0, 1], got {self.transition_noise}")
        if not 0 <= self.probe_from < self.seq_len:
            raise ConfigError(f"toy.probe_from: expected a position in [0, {self.seq_len}), got {self.probe_from}")
        for name in ("steps", "batch_size", "seeds", "probe_sequences", "newton_iterations"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"toy.{name}: expected a positive integer, got {getattr(self, name)}")
        bad_checkpoints = [s for s in self.checkpoints if not 0 < s < self.steps]
        if bad_checkpoints:
            raise ConfigError(f"toy.checkpoints: expected steps in (0, {self.steps}), got {bad_checkpoints}")
        if not self.shares or any(s <= 0 for s in self.shares) or list(self.shares) != sorted(set(self.shares)):
            raise ConfigError(f"toy.shares: expected increasing positive numbers, got {list(self.shares)}")
        if not self.probe_C or any(c <= 0 for c in self.probe_C):
            raise ConfigError(f"toy.probe_C: expected positive numbers, got {list(self.probe_C)}")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"toy.methods: expected distinct names from {', '.join(METHODS)}, got {list(self.methods)}")
        if not -self.model.n_layers <= self.layer < self.model.n_layers:
            raise ConfigError(f"toy.layer: expected an index into {self.model.n_layers} layers, got {self.layer}")

    @property
    def n_states(self) -> int:
        return len(self.chains[0])

    @property
    def n_features(self) -> int:
        return len(self.chains) * self.n_states

    @property
    def primary_layer(self) -> int:
        return self.layer % self.model.n_layers

    @property
    def eval_steps(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.checkpoints) | {self.steps}))

    @property
    def deterministic(self) -> bool:
        return self.transition_noise == 0.0


def _edges(chain: tuple[int, ...]) -> frozenset:
    return frozenset((chain[i], chain[(i + 1) % len(chain)]) for i in range(len(chain)))


def quick_config(config: ToyConfig) -> ToyConfig:
    """The ``--quick`` demo: 3 shares x 5 seeds, 1000 steps, one probe C (about a minute on 2 CPU cores)."""
    return dataclasses.replace(
        config, shares=(0.001, 0.03, 1.0), seeds=5, steps=1000, checkpoints=(), probe_C=config.probe_C[:1]
    )


def load_toy_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ToyConfig:
    """``ToyConfig`` from YAML plus ``key=value`` overrides, on top of the toy defaults.

    Nested ``model`` / ``optimizer`` mappings change only the keys they name (the rest stay
    the toy model's, not ``ModelConfig``'s OLMo defaults): ``jaxlm.config.from_dict`` merges
    a partial section with its field's default.
    """
    return load(ToyConfig, path, overrides, where="toy")


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


def successor_table(chains: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """[n_chains, n_states] int: the next state of each chain from each state."""
    table = np.zeros((len(chains), len(chains[0])), np.int32)
    for c, chain in enumerate(chains):
        for i, state in enumerate(chain):
            table[c, state] = chain[(i + 1) % len(chain)]
    return table


def feature_chain_and_start(config: ToyConfig) -> tuple[np.ndarray, np.ndarray]:
    """Feature ``f = chain * n_states + start``: its chain and start state ([F] each)."""
    f = np.arange(config.n_features)
    return (f // config.n_states).astype(np.int32), (f % config.n_states).astype(np.int32)


def rare_feature_mask(config: ToyConfig) -> np.ndarray:
    """[F] bool: the features of the underrepresented chain."""
    chain, _ = feature_chain_and_start(config)
    return chain == config.rare_chain


def feature_weights(config: ToyConfig, share: float) -> np.ndarray:
    """[F] sampling probabilities: each rare feature has ``share`` times a control feature's weight."""
    weights = np.where(rare_feature_mask(config), share, 1.0)
    return weights / weights.sum()


def rare_data_fraction(config: ToyConfig, share: float) -> float:
    """Expected fraction of training sequences that come from the underrepresented chain."""
    return float(feature_weights(config, share)[rare_feature_mask(config)].sum())


def feature_sequences(config: ToyConfig) -> np.ndarray:
    """[F, seq_len] int32: the noiseless sequence of every feature (its chain from its start)."""
    succ = successor_table(config.chains)
    chain, start = feature_chain_and_start(config)
    seqs = np.zeros((config.n_features, config.seq_len), np.int32)
    seqs[:, 0] = start
    for t in range(1, config.seq_len):
        seqs[:, t] = succ[chain, seqs[:, t - 1]]
    return seqs


def sample_sequences(key: Array, config: ToyConfig, features: Array) -> Array:
    """[B, seq_len] int32 sequences of the given features ([B] int), with transition noise.

    Each step follows the feature's chain, except with probability ``transition_noise``
    when it moves to a uniformly random state instead.
    """
    if config.deterministic:
        return jnp.asarray(feature_sequences(config))[features]
    succ = jnp.asarray(successor_table(config.chains))
    chain_of, start_of = (jnp.asarray(a) for a in feature_chain_and_start(config))
    chains, state0 = chain_of[features], start_of[features]

    def step(state, step_key):
        jump_key, target_key = jax.random.split(step_key)
        jump = jax.random.uniform(jump_key, state.shape) < config.transition_noise
        random_state = jax.random.randint(target_key, state.shape, 0, config.n_states)
        nxt = jnp.where(jump, random_state, succ[chains, state]).astype(jnp.int32)
        return nxt, nxt

    _, rest = jax.lax.scan(step, state0, jax.random.split(key, config.seq_len - 1))
    return jnp.concatenate([state0[:, None], rest.T], axis=1).astype(jnp.int32)


def sample_batch(key: Array, config: ToyConfig, log_weights: Array, batch_size: int) -> tuple[Array, Array]:
    """A training batch: (tokens [B, T], features [B]) with features drawn by ``log_weights``."""
    feature_key, sequence_key = jax.random.split(key)
    features = jax.random.categorical(feature_key, log_weights, shape=(batch_size,))
    return sample_sequences(sequence_key, config, features), features


def probe_set(config: ToyConfig, seed: int = 12345) -> tuple[np.ndarray, np.ndarray]:
    """Sequences to read activations from: (tokens [P, T], features [P]).

    Noiseless data: the 12 feature sequences. Noisy: ``probe_sequences`` samples per feature.
    """
    if config.deterministic:
        return feature_sequences(config), np.arange(config.n_features, dtype=np.int32)
    features = np.repeat(np.arange(config.n_features, dtype=np.int32), config.probe_sequences)
    tokens = sample_sequences(jax.random.key(seed), config, jnp.asarray(features))
    return np.asarray(tokens), features


# ---------------------------------------------------------------------------------------
# Geometry and statistics
# ---------------------------------------------------------------------------------------


def unit(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def entanglement(directions: Array) -> Array:
    """``E(i) = max_{j != i} |cos(v_i, v_j)|`` for directions ``[..., N, M]`` -> ``[..., N]``."""
    u = unit(jnp.asarray(directions, jnp.float32))
    cos = jnp.abs(jnp.einsum("...id,...jd->...ij", u, u))
    n = cos.shape[-1]
    cos = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, cos)
    return jnp.max(cos, axis=-1)


def welch_bound(n: int, m: int) -> float:
    """Lower bound on ``max_i E(i)`` for ``n > m`` unit vectors in ``m`` dimensions."""
    if n <= m:
        raise ValueError(f"the Welch bound needs more vectors than dimensions, got n={n}, m={m}")
    return math.sqrt((n - m) / ((n - 1) * m))


def random_entanglement(n: int, m: int, draws: int = 20000, seed: int = 0) -> dict[str, float]:
    """Entanglement of ``n`` independent uniformly random unit vectors in ``m`` dimensions.

    Monte Carlo over ``draws`` sets: the mean of ``E(i)`` and its 2.5% / 97.5% quantiles.
    """
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((draws, n, m))
    e = np.asarray(entanglement(jnp.asarray(vectors)))
    return {
        "mean": float(e.mean()),
        "q025": float(np.quantile(e, 0.025)),
        "q975": float(np.quantile(e, 0.975)),
    }


def mean_ci(values: np.ndarray, confidence: float = 0.95) -> dict[str, Any]:
    """Mean with a t-based confidence interval."""
    from scipy import stats

    values = np.asarray(values, np.float64)
    mean = float(values.mean())
    if values.size < 2:
        return {"mean": mean, "ci95": [mean, mean], "sd": 0.0, "n": int(values.size)}
    sd = float(values.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, values.size - 1) * sd / math.sqrt(values.size))
    return {"mean": mean, "ci95": [mean - half, mean + half], "sd": sd, "n": int(values.size)}


def paired_difference(under: np.ndarray, control: np.ndarray, confidence: float = 0.95) -> dict[str, Any]:
    """Paired comparison over seeds: mean of ``under - control``, t-based CI, t-test and Wilcoxon p."""
    from scipy import stats

    under, control = np.asarray(under, np.float64), np.asarray(control, np.float64)
    if under.shape != control.shape or under.ndim != 1:
        raise ValueError(f"expected two 1-D arrays of equal length, got {under.shape} and {control.shape}")
    diff = under - control
    out = mean_ci(diff, confidence)
    if diff.size >= 2 and np.any(diff != diff[0]):
        out["p_value"] = float(stats.ttest_rel(under, control).pvalue)
    else:  # too few seeds or no variation: the t-test is undefined
        out["p_value"] = None
    out["wilcoxon_p"] = float(stats.wilcoxon(diff).pvalue) if diff.size >= 2 and np.any(diff != 0) else None
    return out


# ---------------------------------------------------------------------------------------
# Logistic regression (batched Newton) and direction estimators
# ---------------------------------------------------------------------------------------

_LINE_SEARCH = jnp.asarray([1.0, 0.5, 0.25, 0.125, 0.0625, 0.0])
_INTERCEPT_RIDGE = 1e-6  # keeps the Newton system invertible; negligible next to the data term
# Softmax intercepts are free up to a common shift: a small ridge fixes that gauge (it centres them).
_SOFTMAX_INTERCEPT_RIDGE = 1e-3


def _newton(
    loss: Callable[[Array], Array], grad_and_hessian: Callable[[Array], tuple[Array, Array]], theta0: Array,
    iterations: int,
) -> Array:
    """Minimise a smooth strictly convex ``loss`` (flat parameters) by Newton steps with a line search."""

    def body(_, theta):
        grad, hess = grad_and_hessian(theta)
        step = jnp.linalg.solve(hess, grad)
        step = jnp.where(jnp.all(jnp.isfinite(step)), step, 0.0)
        candidates = theta[None] - _LINE_SEARCH[:, None] * step[None]  # the last one keeps theta
        losses = jax.vmap(loss)(candidates)
        losses = jnp.where(jnp.isfinite(losses), losses, jnp.inf)
        return candidates[jnp.argmin(losses)]

    return jax.lax.fori_loop(0, iterations, body, theta0)


def fit_logistic(x: Array, y: Array, weight: Array, C: float | Array, iterations: int = 30) -> tuple[Array, Array]:
    """Weighted L2 logistic regression (scikit-learn's objective): returns (w [d], b []).

    Minimises ``0.5 |w|^2 + C * sum_n weight_n * logloss(y_n, w.x_n + b)``; points with
    ``weight`` 0 are ignored, so fixed-shape masks select subsets.
    """
    d = x.shape[-1]
    xb = jnp.concatenate([x, jnp.ones_like(x[:, :1])], axis=1)
    ridge = jnp.concatenate([jnp.ones(d), jnp.full((1,), _INTERCEPT_RIDGE)])

    def loss(theta):
        z = xb @ theta
        return 0.5 * jnp.sum(ridge * theta * theta) + C * jnp.sum(weight * (jax.nn.softplus(z) - y * z))

    def grad_and_hessian(theta):
        p = jax.nn.sigmoid(xb @ theta)
        grad = ridge * theta + C * xb.T @ (weight * (p - y))
        hess = jnp.diag(ridge) + C * (xb * (weight * p * (1 - p))[:, None]).T @ xb
        return grad, hess

    theta = _newton(loss, grad_and_hessian, jnp.zeros(d + 1, x.dtype), iterations)
    return theta[:d], theta[d]


def fit_multinomial(
    x: Array, labels: Array, weight: Array, n_classes: int, C: float | Array, iterations: int = 30
) -> tuple[Array, Array]:
    """Weighted L2 softmax regression: returns (W [K, d], b [K]); the L2 penalty centres W over classes."""
    n, d = x.shape
    k = n_classes
    xb = jnp.concatenate([x, jnp.ones_like(x[:, :1])], axis=1)
    onehot = jax.nn.one_hot(labels, k, dtype=x.dtype)
    ridge = jnp.tile(jnp.concatenate([jnp.ones(d), jnp.full((1,), _SOFTMAX_INTERCEPT_RIDGE)]), k)

    def loss(flat):
        z = xb @ flat.reshape(k, d + 1).T
        nll = jax.nn.logsumexp(z, axis=1) - jnp.sum(onehot * z, axis=1)
        return 0.5 * jnp.sum(ridge * flat * flat) + C * jnp.sum(weight * nll)

    def grad_and_hessian(flat):
        p = jax.nn.softmax(xb @ flat.reshape(k, d + 1).T, axis=1)  # [N, K]
        grad = ridge * flat + C * ((weight[:, None] * (p - onehot)).T @ xb).reshape(-1)
        wp = weight[:, None] * p
        diagonal = jnp.einsum("na,ni,nj->aij", wp, xb, xb)  # sum_n w p_a x x^T on the a == b blocks
        cross = jnp.einsum("na,nb,ni,nj->aibj", wp, p, xb, xb)
        hess = -cross + jnp.einsum("ab,aij->aibj", jnp.eye(k, dtype=x.dtype), diagonal)
        return grad, jnp.diag(ridge) + C * hess.reshape(k * (d + 1), k * (d + 1))

    flat = _newton(loss, grad_and_hessian, jnp.zeros(k * (d + 1), x.dtype), iterations)
    theta = flat.reshape(k, d + 1)
    return theta[:, :d], theta[:, d]


def _average_unit(per_token: Array, valid: Array) -> Array:
    """Average unit vectors over tokens where ``valid`` ([X, F, d], [X, F]) -> renormalised [F, d]."""
    summed = jnp.sum(unit(per_token) * valid[..., None], axis=0)
    return unit(summed)


def _group_by_token(features: Any, tokens: Any, n_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the points of each token, padded: (index [X, n], features [X, n], valid [X, n]).

    Per-token fits then touch only that token's points (4x less work than masking all of them).
    ``features`` and ``tokens`` must be concrete (they are fixed by the probe set).
    """
    try:
        features, tokens = np.asarray(features), np.asarray(tokens)
    except jax.errors.TracerArrayConversionError:
        raise TypeError("probe features and tokens must be concrete arrays, not traced values") from None
    groups = [np.flatnonzero(tokens == x) for x in range(n_tokens)]
    width = max(1, max(len(g) for g in groups))
    index = np.zeros((n_tokens, width), np.int32)
    valid = np.zeros((n_tokens, width), bool)
    for x, g in enumerate(groups):
        index[x, : len(g)], valid[x, : len(g)] = g, True
    return index, np.where(valid, features[index], -1).astype(np.int32), valid


def _token_feature_masks(features: Array, tokens: Array, n_features: int, n_tokens: int) -> tuple[Array, Array]:
    is_token = tokens[None, :] == jnp.arange(n_tokens)[:, None]  # [X, N]
    is_feature = features[None, :] == jnp.arange(n_features)[:, None]  # [F, N]
    return is_token, is_feature


def probe_directions(
    acts: Array, features: Array, tokens: Array, n_features: int, n_tokens: int, C: float | Array,
    balanced: bool = False, iterations: int = 30,
) -> Array:
    """The paper's recipe: per token, a logistic probe of feature i vs the others; mean unit normal.

    ``acts`` [N, d] residual-stream vectors at positions whose current token is ``tokens`` [N]
    and whose sequence is feature ``features`` [N]. Returns [F, d] unit directions.
    """
    index, token_features, valid = _group_by_token(features, tokens, n_tokens)
    x_by_token = acts.astype(jnp.float32)[index]  # [X, n, d]

    def one(x, point_features, point_valid, feature):
        y = (point_features == feature).astype(jnp.float32)
        weight = point_valid.astype(jnp.float32)
        n_pos, n_all = jnp.sum(weight * y), jnp.sum(weight)
        if balanced:  # scikit-learn's class_weight="balanced"
            pos_weight = n_all / (2 * jnp.maximum(n_pos, 1))
            neg_weight = n_all / (2 * jnp.maximum(n_all - n_pos, 1))
            weight = weight * jnp.where(y > 0, pos_weight, neg_weight)
        w, _ = fit_logistic(x, y, weight, C, iterations)
        return w, (n_pos > 0) & (n_pos < n_all)

    per_feature = jax.vmap(one, in_axes=(None, None, None, 0))
    per_token = jax.vmap(per_feature, in_axes=(0, 0, 0, None))
    normals, ok = per_token(x_by_token, jnp.asarray(token_features), jnp.asarray(valid), jnp.arange(n_features))
    return _average_unit(normals, ok)  # normals [X, F, d]


def mass_mean_directions(acts: Array, features: Array, tokens: Array, n_features: int, n_tokens: int) -> Array:
    """Per token, mean of feature i's activations minus the other features'; mean unit vector."""
    is_token, is_feature = _token_feature_masks(features, tokens, n_features, n_tokens)
    x = acts.astype(jnp.float32)
    both = (is_token[:, None, :] & is_feature[None, :, :]).astype(jnp.float32)  # [X, F, N]
    rest = (is_token[:, None, :] & ~is_feature[None, :, :]).astype(jnp.float32)
    n_both, n_rest = both.sum(-1), rest.sum(-1)
    mean_i = jnp.einsum("xfn,nd->xfd", both, x) / jnp.maximum(n_both, 1)[..., None]
    mean_rest = jnp.einsum("xfn,nd->xfd", rest, x) / jnp.maximum(n_rest, 1)[..., None]
    return _average_unit(mean_i - mean_rest, (n_both > 0) & (n_rest > 0))


def multinomial_directions(
    acts: Array, features: Array, tokens: Array, n_features: int, n_tokens: int, C: float | Array,
    balanced: bool = False, iterations: int = 30,
) -> Array:
    """Per token, one softmax probe over all features; feature i's class weights, mean unit vector."""
    index, token_features, valid = _group_by_token(features, tokens, n_tokens)
    x_by_token = acts.astype(jnp.float32)[index]  # [X, n, d]

    def one(x, point_features, point_valid):
        weight = point_valid.astype(jnp.float32)
        labels = jnp.maximum(point_features, 0)  # padding (-1) has weight 0
        counts = jnp.sum(jax.nn.one_hot(labels, n_features) * weight[:, None], axis=0)  # [F]
        if balanced:
            per_class = jnp.sum(weight) / (jnp.maximum(jnp.sum(counts > 0), 1) * jnp.maximum(counts, 1))
            weight = weight * per_class[labels]
        w, _ = fit_multinomial(x, labels, weight, n_features, C, iterations)
        return w, counts > 0

    weights, ok = jax.vmap(one)(x_by_token, jnp.asarray(token_features), jnp.asarray(valid))  # [X, F, d], [X, F]
    return _average_unit(weights, ok)


def centroid_directions(acts: Array, features: Array, n_features: int) -> Array:
    """Each feature's mean activation (over all its probed positions) minus the mean of feature means."""
    is_feature = (features[None, :] == jnp.arange(n_features)[:, None]).astype(jnp.float32)
    means = (is_feature @ acts.astype(jnp.float32)) / jnp.maximum(is_feature.sum(1), 1)[:, None]
    return unit(means - means.mean(axis=0, keepdims=True))


def directions(
    method: str, acts: Array, features: Array, tokens: Array, n_features: int, n_tokens: int,
    C: float = 1.0, balanced: bool = False, iterations: int = 30,
) -> Array:
    """[F, d] unit feature directions from [N, d] activations by ``method`` (one of ``METHODS``)."""
    if method == "probe":
        return probe_directions(acts, features, tokens, n_features, n_tokens, C, balanced, iterations)
    if method == "mass_mean":
        return mass_mean_directions(acts, features, tokens, n_features, n_tokens)
    if method == "multinomial":
        return multinomial_directions(acts, features, tokens, n_features, n_tokens, C, balanced, iterations)
    if method == "centroid":
        return centroid_directions(acts, features, n_features)
    raise ValueError(f"unknown direction method {method!r}; valid: {', '.join(METHODS)}")


def uses_probe_C(method: str) -> bool:
    return method in ("probe", "multinomial")


# ---------------------------------------------------------------------------------------
# Training many models at once
# ---------------------------------------------------------------------------------------


def make_trainer(config: ToyConfig):
    """jaxlm's ``Trainer`` for the toy model on a single-device mesh."""
    from jaxlm import sharding as sharding_lib
    from jaxlm.config import MeshConfig
    from jaxlm.train import Trainer

    mesh = sharding_lib.make_mesh(MeshConfig(), jax.devices()[:1])
    return Trainer(model_config=config.model, optimizer_config=config.optimizer, total_steps=config.steps, mesh=mesh)


def _chunk_length(config: ToyConfig, limit: int = 250) -> int:
    chunk = math.gcd(*config.eval_steps)
    for divisor in range(min(chunk, limit), 0, -1):
        if chunk % divisor == 0:
            return divisor
    return 1


def train_models(
    config: ToyConfig, shares: tuple[float, ...], seeds: tuple[int, ...], progress: bool = True
) -> tuple[dict[int, Any], np.ndarray]:
    """Train ``len(shares) * len(seeds)`` models in one vmapped program.

    Model ``m = share_index * len(seeds) + seed_index``. A seed fixes the initial parameters
    and the data stream's random key at every share (common random numbers across shares).
    Each step is ``Trainer._step`` (``next_token_loss`` + ``make_optimizer``), ``jax.vmap``-ed
    over models and ``lax.scan``-ned over steps. Returns ({step: stacked params} for every
    step in ``config.eval_steps``, losses [n_chunks, M] at each chunk's last step).
    """
    from tqdm.auto import tqdm

    from jaxlm import model as model_lib
    from jaxlm.train import TrainState

    trainer = make_trainer(config)
    optimizer = trainer.optimizer
    n_models = len(shares) * len(seeds)
    seed_of = np.tile(np.asarray(seeds), len(shares))
    log_weights = jnp.asarray(
        np.log(np.stack([feature_weights(config, s) for s in shares]).repeat(len(seeds), axis=0)), jnp.float32
    )
    init_keys = jax.vmap(jax.random.key)(jnp.asarray(seed_of, jnp.uint32))
    data_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(init_keys)

    def init_one(key):
        params = model_lib.init_params(config.model, key)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

    def step_one(state, log_w, data_key):
        tokens, _ = sample_batch(jax.random.fold_in(data_key, state.step), config, log_w, config.batch_size)
        return trainer._step(state, {"tokens": tokens})

    chunk = _chunk_length(config)

    @jax.jit
    def run_chunk(states):
        def body(s, _):
            s, metrics = jax.vmap(step_one)(s, log_weights, data_keys)
            return s, metrics["loss"]

        states, losses = jax.lax.scan(body, states, None, length=chunk)
        return states, losses[-1]

    states = jax.jit(jax.vmap(init_one))(init_keys)
    snapshots: dict[int, Any] = {}
    losses = []
    bar = tqdm(total=config.steps, desc=f"train {n_models} toy models", disable=not progress, unit="step")
    for done in range(chunk, config.steps + 1, chunk):
        states, loss = run_chunk(states)
        losses.append(np.asarray(loss))
        bar.update(chunk)
        bar.set_postfix(loss=f"{float(np.mean(losses[-1])):.3f}")
        if done in config.eval_steps:
            snapshots[done] = jax.tree.map(np.asarray, states.params)
    bar.close()
    return snapshots, np.stack(losses)


# ---------------------------------------------------------------------------------------
# Measuring the trained models
# ---------------------------------------------------------------------------------------


def make_measure(config: ToyConfig, tokens: np.ndarray, features: np.ndarray) -> Callable[[Any], dict[str, np.ndarray]]:
    """A compiled measurement of stacked models ([M, ...] params) on the probe set.

    The returned function gives ``entanglement`` [methods, C, M, L, F] (methods without ``C``
    repeat their value across C), ``directions`` [methods, C, M, L, F, d] and next-token
    ``accuracy`` [M, F].
    """
    from jaxlm import model as model_lib

    cfg = config.model
    start = config.probe_from
    tokens_j = jnp.asarray(tokens)
    flat_tokens = jnp.asarray(tokens[:, start:].reshape(-1))
    flat_features = jnp.asarray(np.repeat(features, config.seq_len - start))
    target_chain = jnp.asarray(successor_table(config.chains))[
        jnp.asarray(feature_chain_and_start(config)[0])[jnp.asarray(features)][:, None], tokens_j[:, :-1]
    ]  # [P, T-1]: the next state on the chain (the prediction target without noise)

    def one_model(p):
        out = model_lib.forward(cfg, p, tokens_j, capture=("resid_post",))
        resid = out.captures["resid_post"][:, :, start:]  # [L, P, T', d]
        acts = resid.reshape(cfg.n_layers, -1, cfg.d_model)
        # From position 2 on, the prefix names the chain (two steps fix a 4-cycle).
        predicted = jnp.argmax(out.logits[:, 2:-1], axis=-1)
        correct = (predicted == target_chain[:, 2:]).astype(jnp.float32).mean(axis=1)  # [P]
        accuracy = jax.ops.segment_sum(correct, jnp.asarray(features), config.n_features) / jnp.maximum(
            jax.ops.segment_sum(jnp.ones_like(correct), jnp.asarray(features), config.n_features), 1
        )
        per_method = []
        for method in config.methods:
            per_c = []
            for C in (config.probe_C if uses_probe_C(method) else config.probe_C[:1]):
                fn = lambda a, C=C, method=method: directions(  # noqa: E731
                    method, a, flat_features, flat_tokens, config.n_features, config.n_states, C,
                    config.probe_balanced, config.newton_iterations,
                )
                per_c.append(jax.vmap(fn)(acts))  # [L, F, d]
            if len(per_c) < len(config.probe_C):
                per_c = per_c * len(config.probe_C)
            per_method.append(jnp.stack(per_c))
        dirs = jnp.stack(per_method)  # [methods, C, L, F, d]
        return dirs, accuracy

    @jax.jit
    def run(params):
        dirs, accuracy = jax.vmap(one_model)(params)  # [M, methods, C, L, F, d]
        dirs = jnp.moveaxis(dirs, 0, 2)  # [methods, C, M, L, F, d]
        return dirs, entanglement(dirs), accuracy

    def measure(params: Any) -> dict[str, np.ndarray]:
        dirs, ent, accuracy = run(params)
        return {"directions": np.asarray(dirs), "entanglement": np.asarray(ent), "accuracy": np.asarray(accuracy)}

    return measure


def share_summary(
    config: ToyConfig, share: float, under: np.ndarray, control: np.ndarray
) -> dict[str, Any]:
    """Per-share record: both group means with CIs and the paired difference (over seeds)."""
    return {
        "share": float(share),
        "rare_data_fraction": rare_data_fraction(config, share),
        "underrepresented": mean_ci(under),
        "control": mean_ci(control),
        "difference": paired_difference(under, control),
    }


def compact_summary(record: dict[str, Any]) -> dict[str, Any]:
    """A share record for the grid: [mean, ci low, ci high] per group and for the difference."""

    def triple(stat):
        return [stat["mean"], *stat["ci95"]]

    diff = record["difference"]
    return {
        "share": record["share"],
        "underrepresented": triple(record["underrepresented"]),
        "control": triple(record["control"]),
        "difference": triple(diff),
        "p_value": diff["p_value"],
        "wilcoxon_p": diff["wilcoxon_p"],
    }


def verdict(shares: list[dict[str, Any]], alpha: float = 0.01) -> dict[str, Any]:
    """Is the paper's pattern there? Rare features more entangled than controls at the lowest share
    (p < alpha) and the gap shrinking by the highest share."""
    low, high = shares[0], shares[-1]
    p_low = low["difference"]["p_value"]
    gap_low, gap_high = low["difference"]["mean"], high["difference"]["mean"]
    significant = p_low is not None and p_low < alpha and gap_low > 0
    return {
        "alpha": alpha,
        "lowest_share": low["share"],
        "gap_at_lowest_share": gap_low,
        "p_at_lowest_share": p_low,
        "gap_at_highest_share": gap_high,
        "reproduced": bool(significant and gap_low > gap_high),
    }


def run_study(config: ToyConfig, progress: bool = True) -> dict[str, Any]:
    """Train shares x seeds models, measure every method x C x layer x checkpoint, summarise."""
    t0 = time.perf_counter()
    seeds = tuple(range(config.first_seed, config.first_seed + config.seeds))
    snapshots, losses = train_models(config, config.shares, seeds, progress)
    t_train = time.perf_counter() - t0
    tokens, features = probe_set(config)
    rare = rare_feature_mask(config)
    n_shares, n_seeds = len(config.shares), len(seeds)

    grid, primary = [], None
    measure = make_measure(config, tokens, features)
    measured = {step: measure(snapshots[step]) for step in config.eval_steps}
    t_measure = time.perf_counter() - t0 - t_train

    for step in config.eval_steps:
        ent = measured[step]["entanglement"].reshape(
            len(config.methods), len(config.probe_C), n_shares, n_seeds, config.model.n_layers, config.n_features
        )
        for mi, method in enumerate(config.methods):
            for ci, C in enumerate(config.probe_C):
                if ci > 0 and not uses_probe_C(method):
                    continue
                for layer in range(config.model.n_layers):
                    e = ent[mi, ci, :, :, layer]  # [shares, seeds, F]
                    under, control = e[..., rare].mean(-1), e[..., ~rare].mean(-1)
                    records = [share_summary(config, s, under[k], control[k]) for k, s in enumerate(config.shares)]
                    entry = {
                        "method": method,
                        "C": float(C) if uses_probe_C(method) else None,
                        "layer": layer,
                        "step": step,
                        "verdict": verdict(records),
                    }
                    grid.append({**entry, "shares": [compact_summary(r) for r in records]})
                    if (method, ci, layer, step) == (config.methods[0], 0, config.primary_layer, config.steps):
                        primary = {
                            **entry,
                            "shares": records,
                            "per_seed": {"underrepresented": under.tolist(), "control": control.tolist()},
                        }

    accuracy = measured[config.steps]["accuracy"].reshape(n_shares, n_seeds, config.n_features)
    for k, record in enumerate(primary["shares"]):
        record["accuracy"] = {
            "underrepresented": float(accuracy[k][:, rare].mean()),
            "control": float(accuracy[k][:, ~rare].mean()),
        }
    final_loss = losses[-1].reshape(n_shares, n_seeds)
    random_level = random_entanglement(config.n_features, config.model.d_model)
    return {
        "config": to_dict(config),
        "n_features": config.n_features,
        "n_dims": config.model.d_model,
        "welch_bound": welch_bound(config.n_features, config.model.d_model),
        "random_level": random_level,
        "primary": {k: primary[k] for k in ("method", "C", "layer", "step")},
        "shares": primary["shares"],
        "verdict": primary["verdict"],
        "per_seed": primary["per_seed"],
        "final_loss": {"by_share": final_loss.mean(1).tolist(), "max": float(final_loss.max())},
        "grid": grid,
        "timing_s": {"train": round(t_train, 1), "measure": round(t_measure, 1)},
    }


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------


def plot_entanglement(results: dict[str, Any], path: str | Path, title: str | None = None) -> None:
    """Entanglement against share (log x): both groups with 95% CIs, the Welch bound and random level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = results["shares"]
    shares = np.asarray([r["share"] for r in records])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for group, color, label in (
        ("underrepresented", "tab:red", "underrepresented chain"),
        ("control", "tab:blue", "control chains"),
    ):
        mean = np.asarray([r[group]["mean"] for r in records])
        lo = np.asarray([r[group]["ci95"][0] for r in records])
        hi = np.asarray([r[group]["ci95"][1] for r in records])
        ax.plot(shares, mean, "o-", color=color, label=label)
        ax.fill_between(shares, lo, hi, color=color, alpha=0.2)
    for k, r in enumerate(records):
        p = r["difference"]["p_value"]
        if p is not None and p < 0.01:
            top = max(r["underrepresented"]["ci95"][1], r["control"]["ci95"][1])
            ax.annotate("*", (shares[k], top), ha="center", va="bottom", fontsize=12)
    rnd = results["random_level"]
    ax.axhline(rnd["mean"], color="gray", ls="--", label=f"random directions ({rnd['mean']:.2f})")
    ax.axhline(results["welch_bound"], color="black", ls=":", label=f"Welch bound ({results['welch_bound']:.3f})")
    ax.set_xscale("log")
    ax.set_ylim(min(0.35, results["welch_bound"] - 0.05), 1.02)
    ax.set_xlabel("share of the underrepresented chain (relative to a control chain)")
    ax.set_ylabel("entanglement  max$_{j\\neq i}$ |cos(v$_i$, v$_j$)|")
    prim = results["primary"]
    n_seeds = records[0]["difference"]["n"]
    ax.set_title(title or f"{prim['method']} directions, layer {prim['layer']}, {n_seeds} seeds (* p<0.01)")
    ax.legend(loc="center left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_table(results: dict[str, Any]) -> str:
    """Markdown table of the primary setting: both groups and the paired difference per share."""
    lines = [
        "| share | rare data | underrepresented E (95% CI) | control E (95% CI) | difference (95% CI) "
        "| p (t) | p (Wilcoxon) | next-token acc. rare / control |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def fmt(stat):
        return f"{stat['mean']:.3f} [{stat['ci95'][0]:.3f}, {stat['ci95'][1]:.3f}]"

    def fmt_p(p):
        return "n/a" if p is None else f"{p:.2g}"

    for r in results["shares"]:
        diff = r["difference"]
        d = f"{diff['mean']:+.3f} [{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}]"
        acc = r.get("accuracy")
        acc_text = f"{acc['underrepresented']:.2f} / {acc['control']:.2f}" if acc else ""
        lines.append(
            f"| {r['share']:g} | {100 * r['rare_data_fraction']:.2g}% | {fmt(r['underrepresented'])} | "
            f"{fmt(r['control'])} | {d} | {fmt_p(diff['p_value'])} | {fmt_p(diff['wilcoxon_p'])} | {acc_text} |"
        )
    return "\n".join(lines)


def _rounded(value: Any, digits: int = 6) -> Any:
    """Floats rounded to ``digits`` significant digits (keeps the JSON small and readable)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v, digits) for v in value]
    return value


def write_results(results: dict[str, Any], out: str | Path) -> Path:
    """``out/toy_results.json`` and ``out/toy_entanglement.png``."""
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "toy_results.json"
    path.write_text(json.dumps(_rounded(results), indent=1) + "\n", encoding="utf-8")
    plot_entanglement(results, out / "toy_entanglement.png")
    return path
