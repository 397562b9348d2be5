"""Inference-Time Intervention (ITI, Li et al. 2023) at the ``head_out`` site.

An ``Intervention`` shifts selected heads' outputs (before the output projection) by
``alpha * sigma[l, h] * direction[l, h]`` at the positions its ``position_mode`` names:

  ``last``       the last real prompt position during prefill, then every generated position
                 (what the honest_llama reference does: the last position of each forward call);
  ``all``        every non-pad position, prompt and generated (the CE/KL side metric);
  ``generated``  generated positions only (nothing during prefill).

It is a pytree of arrays (directions ``[L, H, D]`` unit norm, scales ``[L, H]`` = sigma,
head_mask ``[L, H]`` bool = the top-K heads, alpha ``[]``) plus the static mode, so a jitted
decode program takes it as an ordinary argument: a new alpha or new directions never
recompile, and alpha = 0 is exactly the un-intervened model.

Files: ``NAME.safetensors`` (arrays ``directions``, ``scales``, ``head_mask``) and a JSON
sidecar ``NAME.json`` (``alpha``, ``position_mode``, ``k``, free-form ``provenance``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxlm.config import ModelConfig
from jaxlm.errors import JaxlmError
from jaxlm.model import HeadIntervention, Params

Array = jax.Array

POSITION_MODES = ("last", "all", "generated")
DIRECTION_KINDS = ("mass_mean", "probe", "random")
FORMAT = "jaxlm-iti-v1"
_ARRAY_NAMES = ("directions", "scales", "head_mask")


class InterventionError(JaxlmError, ValueError):
    """An intervention file or array is malformed or does not fit the model; says what and where."""


@struct.dataclass
class Intervention:
    """ITI: ``head_out[l, :, t, h] += alpha * scales[l, h] * head_mask[l, h] * directions[l, h]``."""

    directions: Array  # [L, H, D] float32, unit norm per head
    scales: Array  # [L, H] float32: sigma, the spread of activations along the direction
    head_mask: Array  # [L, H] bool: the intervened heads (top K)
    alpha: Array  # [] float32: strength in units of sigma
    position_mode: str = struct.field(pytree_node=False, default="last")

    @classmethod
    def create(
        cls, directions: Any, scales: Any, head_mask: Any, alpha: float | Array = 0.0, position_mode: str = "last"
    ) -> "Intervention":
        """Build one with canonical dtypes (so equal shapes always share a compiled program)."""
        if position_mode not in POSITION_MODES:
            raise InterventionError(
                f"position_mode: expected one of {', '.join(POSITION_MODES)}, got {position_mode!r}"
            )
        directions = jnp.asarray(directions, jnp.float32)
        scales = jnp.asarray(scales, jnp.float32)
        head_mask = jnp.asarray(head_mask).astype(bool)
        if directions.ndim != 3:
            raise InterventionError(f"directions: expected shape [L, H, D], got {tuple(directions.shape)}")
        for name, array in (("scales", scales), ("head_mask", head_mask)):
            if array.shape != directions.shape[:2]:
                raise InterventionError(
                    f"{name}: expected shape [L, H] = {tuple(directions.shape[:2])} (from directions), "
                    f"got {tuple(array.shape)}"
                )
        alpha = jnp.asarray(alpha, jnp.float32)
        if alpha.shape != ():
            raise InterventionError(f"alpha: expected a scalar, got shape {tuple(alpha.shape)}")
        for name, array in (("directions", directions), ("scales", scales), ("alpha", alpha)):
            check_finite(name, array)
        return cls(directions=directions, scales=scales, head_mask=head_mask, alpha=alpha, position_mode=position_mode)

    @classmethod
    def zeros(cls, config: ModelConfig, position_mode: str = "last") -> "Intervention":
        """The identity (no heads, alpha 0) with the model's shapes: the baseline program's argument."""
        l, h, d = config.n_layers, config.n_heads, config.resolved_head_dim
        return cls.create(jnp.zeros((l, h, d)), jnp.zeros((l, h)), jnp.zeros((l, h), bool), 0.0, position_mode)

    # -- shapes and conversions ------------------------------------------------------------

    @property
    def k(self) -> int:
        """Number of intervened heads."""
        return int(np.sum(np.asarray(self.head_mask)))

    def with_alpha(self, alpha: float | Array) -> "Intervention":
        """The same heads and directions at strength ``alpha`` (a finite number)."""
        alpha = jnp.asarray(alpha, jnp.float32)
        check_finite("alpha", alpha)
        return self.replace(alpha=alpha)

    def with_mode(self, position_mode: str) -> "Intervention":
        return Intervention.create(self.directions, self.scales, self.head_mask, self.alpha, position_mode)

    def head_shift(self) -> Array:
        """``[L, H, D]``: ``scales * head_mask * directions``, the shift per unit of alpha."""
        gate = self.scales * self.head_mask.astype(jnp.float32)
        return gate[:, :, None] * self.directions

    def as_head_intervention(self, position_mask: Array) -> HeadIntervention:
        """The model-level shift for one forward call whose shifted positions are ``position_mask`` [B, T]."""
        return HeadIntervention(shift=self.head_shift(), position_mask=position_mask.astype(bool), scale=self.alpha)

    def prefill_positions(self, prompt_mask: Array) -> Array:
        """[B, T] bool: the prompt positions this mode shifts (``prompt_mask`` marks real tokens)."""
        prompt_mask = prompt_mask.astype(bool)
        if self.position_mode == "all":
            return prompt_mask
        if self.position_mode == "generated":
            return jnp.zeros_like(prompt_mask)
        t = prompt_mask.shape[1]
        last = (t - 1) - jnp.argmax(prompt_mask[:, ::-1], axis=1)  # last real position per row
        return (jnp.arange(t)[None, :] == last[:, None]) & jnp.any(prompt_mask, axis=1, keepdims=True)

    def for_prefill(self, prompt_mask: Array) -> HeadIntervention:
        """The shift for a forward over whole prompts (also a plain forward over texts, e.g. mode ``all``)."""
        return self.as_head_intervention(self.prefill_positions(prompt_mask))

    def for_decode_step(self, batch_size: int) -> HeadIntervention:
        """The shift for one decode step (one new position per row): every mode shifts it."""
        return self.as_head_intervention(jnp.ones((batch_size, 1), bool))

    # -- checks and files ------------------------------------------------------------------

    def check_compatible(self, config: ModelConfig) -> None:
        """Raise ``InterventionError`` naming each array axis that does not match the model."""
        expected = {
            "L": ("n_layers", config.n_layers),
            "H": ("n_heads", config.n_heads),
            "D": ("head_dim", config.resolved_head_dim),
        }
        problems = []
        for name, axes in (("directions", "LHD"), ("scales", "LH"), ("head_mask", "LH")):
            shape = tuple(getattr(self, name).shape)
            if len(shape) != len(axes):
                problems.append(f"{name} has shape {shape}, expected [{', '.join(axes)}]")
                continue
            for axis, (letter, size) in enumerate(zip(axes, shape)):
                field, want = expected[letter]
                if size != want:
                    problems.append(
                        f"{name} axis {axis} ({letter}) is {size} but the model has {field}={want}"
                    )
        if problems:
            model_shape = (config.n_layers, config.n_heads, config.resolved_head_dim)
            raise InterventionError(
                f"intervention of shape [L, H, D] = {tuple(self.directions.shape)} does not fit the model's "
                f"{model_shape}: " + "; ".join(problems)
            )

    def save(self, path: str | Path, provenance: dict[str, Any] | None = None) -> Path:
        """Write ``path`` (.safetensors) and its ``.json`` sidecar; returns the .safetensors path."""
        from safetensors.numpy import save_file

        path = _safetensors_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "directions": np.asarray(self.directions, np.float32),
            "scales": np.asarray(self.scales, np.float32),
            "head_mask": np.asarray(self.head_mask, bool),
        }
        save_file(arrays, str(path))
        l, h, d = arrays["directions"].shape
        sidecar = {
            "format": FORMAT,
            "alpha": float(self.alpha),
            "position_mode": self.position_mode,
            "k": self.k,
            "shape": {"n_layers": l, "n_heads": h, "head_dim": d},
            "provenance": provenance or {},
        }
        sidecar_path(path).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, config: ModelConfig | None = None) -> "Intervention":
        """Read a saved intervention; with ``config``, also check it fits that model."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        path = _safetensors_path(path)
        if not path.is_file():
            raise InterventionError(f"{path}: no such intervention file")
        try:
            arrays = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise InterventionError(f"{path}: not a readable safetensors file ({err})") from err
        missing = [name for name in _ARRAY_NAMES if name not in arrays]
        if missing:
            raise InterventionError(f"{path}: missing array(s) {missing}; found {sorted(arrays)}")
        meta = read_sidecar(path)
        for field in ("alpha", "position_mode"):
            if field not in meta:
                raise InterventionError(f"{sidecar_path(path)}: missing field {field!r}")
        alpha = meta["alpha"]
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            raise InterventionError(f"{sidecar_path(path)}: alpha: expected a finite number, got {alpha!r}")
        try:
            intervention = cls.create(
                arrays["directions"], arrays["scales"], arrays["head_mask"], meta["alpha"], meta["position_mode"]
            )
        except InterventionError as err:
            raise InterventionError(f"{path}: {err}") from err
        if config is not None:
            try:
                intervention.check_compatible(config)
            except InterventionError as err:
                raise InterventionError(f"{path}: {err}") from err
        return intervention

    # -- construction from activations -----------------------------------------------------

    @classmethod
    def from_activations(
        cls,
        acts: Any,
        labels: Any,
        accuracy: Any,
        k: int,
        alpha: float = 0.0,
        position_mode: str = "last",
        direction: str = "mass_mean",
        *,
        wanted_label: int = 0,
        probe_weights: Any = None,
        key: Array | int | None = None,
    ) -> "Intervention":
        """ITI from head activations ``acts`` [N, L, H, D] with binary ``labels`` [N].

        Heads: the ``k`` best by ``accuracy`` [L, H]. Directions point toward ``wanted_label``
        (0 = non-toxic in jaxlm's labelled sets): the mass-mean shift, the probe weights
        [L, H, D] oriented toward the wanted class, or random (``key``: the ablation).
        Scales: sigma of ``acts`` along each direction.
        """
        acts, labels = _check_acts(acts, labels)
        n, l, h, d = acts.shape
        if direction == "mass_mean":
            directions = mass_mean_directions(acts, labels, wanted_label)
        elif direction == "probe":
            if probe_weights is None:
                raise InterventionError("direction='probe' needs probe_weights [L, H, D]")
            directions = probe_directions(probe_weights)
            if directions.shape != (l, h, d):
                raise InterventionError(
                    f"probe_weights: expected shape {(l, h, d)} to match the activations, got {directions.shape}"
                )
            toward = _class_mean_difference(acts, labels, wanted_label)
            sign = np.where(np.einsum("lhd,lhd->lh", toward, directions) < 0, -1.0, 1.0)
            directions = directions * sign[:, :, None].astype(np.float32)
        elif direction == "random":
            if key is None:
                raise InterventionError("direction='random' needs key (a jax PRNG key or an int seed)")
            directions = np.asarray(random_directions(key, l, h, d))
        else:
            raise InterventionError(f"direction: expected one of {', '.join(DIRECTION_KINDS)}, got {direction!r}")
        accuracy = np.asarray(accuracy)
        if accuracy.shape != (l, h):
            raise InterventionError(f"accuracy: expected shape [L, H] = {(l, h)}, got {accuracy.shape}")
        return cls.create(directions, sigma_along(acts, directions), top_k_heads(accuracy, k), alpha, position_mode)


# ---------------------------------------------------------------------------------------
# Directions, scales, heads
# ---------------------------------------------------------------------------------------


def check_finite(name: str, array: Any) -> None:
    """``InterventionError`` when ``array`` holds NaN or inf: such a shift turns every logit into
    NaN, and the generated text into empty strings that a toxicity scorer rates as harmless.
    Traced values (inside ``jit``) are not checked."""
    if isinstance(array, jax.core.Tracer):
        return
    values = np.asarray(array)
    bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
    if bad:
        what = f"{float(values)}" if values.ndim == 0 else f"{bad} of {values.size} values are NaN or inf"
        raise InterventionError(f"{name}: expected finite numbers, got {what}")


def _unit(vectors: np.ndarray) -> np.ndarray:
    """Unit norm along the last axis; an all-zero vector stays zero."""
    norm = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def _check_acts(acts: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    acts, labels = np.asarray(acts), np.asarray(labels)
    if acts.ndim != 4:
        raise InterventionError(f"acts: expected shape [N, L, H, D], got {acts.shape}")
    if labels.shape != (acts.shape[0],):
        raise InterventionError(f"labels: expected shape [N] = ({acts.shape[0]},), got {labels.shape}")
    return acts, labels


def _class_mean_difference(acts: np.ndarray, labels: np.ndarray, wanted_label: int) -> np.ndarray:
    wanted = labels == wanted_label
    if not wanted.any() or wanted.all():
        raise InterventionError(
            f"labels: need examples of both the wanted label {wanted_label} and another label, "
            f"got {int(wanted.sum())} wanted of {len(labels)}"
        )
    mean_wanted = acts[wanted].astype(np.float64).mean(axis=0)
    mean_other = acts[~wanted].astype(np.float64).mean(axis=0)
    return mean_wanted - mean_other


def mass_mean_directions(acts: Any, labels: Any, wanted_label: int = 0) -> np.ndarray:
    """[L, H, D] unit vectors: mean activation of the wanted class minus that of the rest."""
    acts, labels = _check_acts(acts, labels)
    return _unit(_class_mean_difference(acts, labels, wanted_label))


def probe_directions(probe_weights: Any) -> np.ndarray:
    """[L, H, D] unit vectors along per-head probe weights (pointing to the probe's positive class)."""
    weights = np.asarray(probe_weights, np.float64)
    if weights.ndim != 3:
        raise InterventionError(f"probe_weights: expected shape [L, H, D], got {weights.shape}")
    return _unit(weights)


def random_directions(key: Array | int, n_layers: int, n_heads: int, head_dim: int) -> Array:
    """[L, H, D] isotropic random unit vectors (the ablation)."""
    if isinstance(key, int):
        key = jax.random.key(key)
    v = jax.random.normal(key, (n_layers, n_heads, head_dim), jnp.float32)
    return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


def sigma_along(acts: Any, directions: Any) -> np.ndarray:
    """[L, H]: standard deviation (over N) of ``acts`` [N, L, H, D] projected on ``directions`` [L, H, D]."""
    acts = np.asarray(acts)
    directions = np.asarray(directions, np.float64)
    if acts.ndim != 4 or acts.shape[1:] != directions.shape:
        raise InterventionError(
            f"sigma_along: acts {acts.shape} and directions {directions.shape} must be [N, L, H, D] and [L, H, D]"
        )
    projections = np.einsum("nlhd,lhd->nlh", acts.astype(np.float64), directions)
    return projections.std(axis=0).astype(np.float32)


def top_k_heads(accuracy: Any, k: int) -> np.ndarray:
    """[L, H] bool: the ``k`` heads of highest ``accuracy`` (ties: lower layer, then head, first; NaN last)."""
    accuracy = np.asarray(accuracy, np.float64)
    if accuracy.ndim != 2:
        raise InterventionError(f"accuracy: expected shape [L, H], got {accuracy.shape}")
    if not 0 <= k <= accuracy.size:
        raise InterventionError(f"k: expected 0 <= k <= L*H = {accuracy.size}, got {k}")
    scores = np.where(np.isnan(accuracy), -np.inf, accuracy).ravel()
    chosen = np.argsort(-scores, kind="stable")[:k]
    mask = np.zeros(accuracy.size, bool)
    mask[chosen] = True
    return mask.reshape(accuracy.shape)


# ---------------------------------------------------------------------------------------
# Baked-in form
# ---------------------------------------------------------------------------------------


def output_bias(config: ModelConfig, params: Params, intervention: Intervention) -> Array:
    """[L, d_model]: ``sum_h W_o[l, h] . (alpha * shift)[l, h]``, the shift folded through the output projection."""
    intervention.check_compatible(config)
    shift = intervention.alpha * intervention.head_shift()
    w_out = params["layers"]["attention"]["out"]  # [L, H, D, d_model]
    return jnp.einsum("lhd,lhdm->lm", shift, w_out.astype(jnp.float32))


def bake_into_params(config: ModelConfig, params: Params, intervention: Intervention) -> Params:
    """Params whose attention adds ``output_bias`` after the output projection (``out_bias`` [L, d_model]).

    Equivalent to ``intervention`` in mode ``all`` on every position (padding included,
    which nothing attends to). The input is not modified; an existing ``out_bias`` is added to.
    """
    bias = output_bias(config, params, intervention)
    attention = dict(params["layers"]["attention"])
    if "out_bias" in attention:
        bias = attention["out_bias"] + bias
    attention["out_bias"] = bias
    return {**params, "layers": {**params["layers"], "attention": attention}}


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------


def _safetensors_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")


def sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar next to an intervention's ``.safetensors`` file."""
    return _safetensors_path(path).with_suffix(".json")


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The sidecar of a saved intervention (alpha, position_mode, k, shape, provenance)."""
    meta_path = sidecar_path(path)
    if not meta_path.is_file():
        raise InterventionError(f"{meta_path}: missing JSON sidecar of {_safetensors_path(path)}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise InterventionError(f"{meta_path}: invalid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise InterventionError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    return meta
