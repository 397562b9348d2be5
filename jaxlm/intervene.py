"""Interventions: activation edits applied inside the model's forward, at its sites.

An ``Intervention`` is a tuple of ``Edit``s and ONE scalar ``scale`` shared by all of them.
Each edit has a static *site* (``head_out`` [B, T, H, D]; ``resid_pre``, ``resid_mid``,
``resid_post`` [B, T, d_model]), a static *operation*, a layer mask ``[L]`` (and a head mask
``[L, H]`` at ``head_out``), its per-layer arrays and a static *position policy*:

  ``add``      x += scale * v                      v: [L, H, D] (head_out) or [L, d]
  ``project``  x -= scale * ((x . u) - c) u        u unit: [L, H, D] or [L, d]; c: [L, H] or [L]
               (c = 0: directional ablation, Arditi et al. 2024; c = a class mean: clamp)
  ``erase``    x -= scale * P (x - mu)             P: [L, d, d], mu: [L, d] (LEACE; residual sites)

Position policies (which positions of each forward call an edit touches):

  ``last``       the last real position of the prefill, then every generated position: the
                 last position of every forward call, the honest_llama ITI rule;
  ``all``        every real position, prompt and generated (the CE/KL side metrics);
  ``prompt``     the real prompt positions only (nothing during decoding);
  ``generated``  generated positions only (nothing during the prefill).

A plain forward over texts (scoring) counts as a prefill. ``scale = 0`` is exactly the
identity for every operation, and the arrays and scale are ordinary pytree leaves, so a
jitted prefill/decode program serves a whole strength sweep (and any arrays of the same
shapes): only the static structure (sites, operations, policies) selects a program.
``method`` (``iti``, ``caa``, ...) is provenance; ``program_form`` drops it so that methods
with the same structure share programs. The model receives the per-call resolved form
(``for_prefill``, ``for_decode_step``) and never knows which method built an edit.

Builders (``BUILDERS``, ``build_intervention(method, acts, labels, **settings)``) make them from
labelled activations: ``iti``, ``caa`` (Rimsky et al. 2024), ``ablate`` (Arditi et al. 2024),
``leace`` (Belrose et al. 2023) and ``random`` (norm-matched random directions, the control).

ITI (Li et al. 2023) is one ``add`` edit at ``head_out`` with ``v = sigma * direction`` and
the top-K heads as head mask, at ``scale = alpha``: ``Intervention.create`` /
``from_activations`` build it, and ``alpha``, ``k``, ``directions``, ``scales``,
``head_mask``, ``head_shift`` read it.

Baking (``bake_into_params``): the edits that a change of parameters reproduces exactly (policy
``all``; adds and projections at head_out, adds at residual sites, the scale-1 ablation of one
direction from every residual write as weight orthogonalisation) become parameters; every other
edit is refused with the reason.

Files: ``NAME.safetensors`` + JSON sidecar ``NAME.json``. Format ``jaxlm-intervention-v2``:
arrays ``edit{i}.{name}`` (the op's arrays, ``layer_mask``, ``head_mask``); the sidecar holds
``format``, ``method``, ``scale``, ``edits`` (site, op, positions and array names per edit),
``shape`` (the model dimensions the arrays fit), ``k`` and free-form ``provenance``. ITI
files of format ``jaxlm-iti-v1`` (arrays ``directions``, ``scales``, ``head_mask``; sidecar
``alpha``, ``position_mode``) still load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxlm import concepts
from jaxlm.config import ModelConfig
from jaxlm.errors import JaxlmError
from jaxlm.model import EDIT_ARRAYS, EDIT_OPS, SITES, Params, ResolvedEdit, ResolvedIntervention

Array = jax.Array

OPS = EDIT_OPS
RESIDUAL_SITES = tuple(site for site in SITES if site != "head_out")
POSITIONS = ("last", "all", "prompt", "generated")
POSITION_MODES = POSITIONS  # the ITI name of the same thing
DIRECTION_KINDS = ("mass_mean", "probe", "random")
FORMAT = "jaxlm-intervention-v2"
FORMAT_V1 = "jaxlm-iti-v1"
_V1_ARRAYS = ("directions", "scales", "head_mask")
_AXIS_NAMES = {"L": "n_layers", "H": "n_heads", "D": "head_dim", "d": "d_model"}


class InterventionError(JaxlmError, ValueError):
    """An intervention file or array is malformed or does not fit the model; says what and where."""


def array_axes(site: str, name: str) -> str:
    """The axes of array ``name`` of an edit at ``site``, one letter each (L layers, H heads,
    D head_dim, d d_model)."""
    if name == "layer_mask":
        return "L"
    if name == "head_mask":
        return "LH"
    if site == "head_out":
        return {"v": "LHD", "u": "LHD", "c": "LH"}[name]
    return {"v": "Ld", "u": "Ld", "c": "L", "P": "Ldd", "mu": "Ld"}[name]


def model_axes(config: ModelConfig) -> dict[str, int]:
    return {"L": config.n_layers, "H": config.n_heads, "D": config.resolved_head_dim, "d": config.d_model}


# ---------------------------------------------------------------------------------------
# Position policies
# ---------------------------------------------------------------------------------------


def _check_positions(positions: str) -> None:
    if positions not in POSITIONS:
        raise InterventionError(f"position_mode: expected one of {', '.join(POSITIONS)}, got {positions!r}")


def last_real_position(real: Array) -> Array:
    """[B, T] bool: the last True of each row of ``real`` (none for an all-False row)."""
    real = real.astype(bool)
    t = real.shape[1]
    last = (t - 1) - jnp.argmax(real[:, ::-1], axis=1)
    return (jnp.arange(t)[None, :] == last[:, None]) & jnp.any(real, axis=1, keepdims=True)


def prefill_positions(positions: str, prompt_mask: Array) -> Array:
    """[B, T] bool: the positions of a forward over whole prompts (``prompt_mask``: real tokens)
    that policy ``positions`` touches."""
    real = jnp.asarray(prompt_mask).astype(bool)
    if positions in ("all", "prompt"):
        return real
    if positions == "generated":
        return jnp.zeros_like(real)
    return last_real_position(real)


def decode_positions(positions: str, batch_size: int) -> Array:
    """[B, 1] bool: whether policy ``positions`` touches a decode step's one new position."""
    return jnp.full((batch_size, 1), positions != "prompt")


# ---------------------------------------------------------------------------------------
# Edits
# ---------------------------------------------------------------------------------------


@struct.dataclass
class Edit:
    """One operation at one site: ``arrays`` (EDIT_ARRAYS[op], float32, a leading layers axis),
    ``layer_mask`` [L] bool, ``head_mask`` [L, H] bool at ``head_out`` (None elsewhere)."""

    arrays: dict[str, Array]
    layer_mask: Array
    head_mask: Array | None
    site: str = struct.field(pytree_node=False)
    op: str = struct.field(pytree_node=False)
    positions: str = struct.field(pytree_node=False, default="last")

    @classmethod
    def create(
        cls, site: str, op: str, arrays: dict[str, Any], *, layer_mask: Any = None, head_mask: Any = None,
        positions: str = "last",
    ) -> "Edit":
        """Validate and canonicalise (float32 arrays, bool masks): names the offending array."""
        if site not in SITES:
            raise InterventionError(f"site: expected one of {', '.join(SITES)}, got {site!r}")
        if op not in OPS:
            raise InterventionError(f"op: expected one of {', '.join(OPS)}, got {op!r}")
        if op == "erase" and site == "head_out":
            raise InterventionError(f"op erase: only at a residual site ({', '.join(RESIDUAL_SITES)}), got head_out")
        _check_positions(positions)
        wanted = EDIT_ARRAYS[op]
        if set(arrays) != set(wanted):
            raise InterventionError(f"{op} at {site}: expected arrays {list(wanted)}, got {sorted(arrays)}")
        converted = {name: jnp.asarray(arrays[name], jnp.float32) for name in wanted}
        main = converted[wanted[0]]
        n_layers = main.shape[0] if main.ndim else 0
        if layer_mask is None:
            layer_mask = np.ones(n_layers, bool)
        masks = {"layer_mask": jnp.asarray(layer_mask).astype(bool)}
        if site == "head_out":
            if head_mask is None:
                head_mask = np.ones(main.shape[:2] if main.ndim >= 2 else (n_layers, 0), bool)
            masks["head_mask"] = jnp.asarray(head_mask).astype(bool)
        elif head_mask is not None:
            raise InterventionError(f"head_mask: only edits at head_out have one, this edit is at {site}")
        _check_consistent_shapes(site, {**converted, **masks})
        for name, array in converted.items():
            check_finite(name, array)
        if op == "project":
            _check_unit("u", converted["u"])
        return cls(arrays=converted, layer_mask=masks["layer_mask"], head_mask=masks.get("head_mask"),
                   site=site, op=op, positions=positions)

    def named_arrays(self) -> dict[str, Array]:
        """The op's arrays and the masks, by name (as saved)."""
        masks = {"layer_mask": self.layer_mask}
        if self.head_mask is not None:
            masks["head_mask"] = self.head_mask
        return {**self.arrays, **masks}

    def gate(self) -> Array:
        """[L] (residual) or [L, H] (head_out) float32: 1 where the edit acts."""
        gate = self.layer_mask
        if self.head_mask is not None:
            gate = gate[:, None] & self.head_mask
        return gate.astype(jnp.float32)

    def units(self) -> int:
        """Number of (layer, head) pairs (head_out) or layers (residual sites) the edit acts on."""
        return int(np.sum(np.asarray(self.gate())))

    def with_positions(self, positions: str) -> "Edit":
        _check_positions(positions)
        return self.replace(positions=positions)

    def resolve(self, position_mask: Array) -> ResolvedEdit:
        return ResolvedEdit(arrays=self.arrays, gate=self.gate(), position_mask=position_mask,
                            site=self.site, op=self.op)


def _check_consistent_shapes(site: str, arrays: dict[str, Array]) -> None:
    """Every array has its axes (``array_axes``), and each axis letter one size across arrays."""
    sizes: dict[str, tuple[int, str]] = {}
    for name, array in arrays.items():
        axes = array_axes(site, name)
        shape = tuple(array.shape)
        if len(shape) != len(axes):
            raise InterventionError(f"{name}: expected shape [{', '.join(axes)}] at {site}, got {shape}")
        for letter, size in zip(axes, shape):
            if letter in sizes and sizes[letter][0] != size:
                want = tuple(sizes.get(a, (n, ""))[0] for a, n in zip(axes, shape))
                raise InterventionError(
                    f"{name}: expected shape [{', '.join(axes)}] = {want} (axis {letter} from "
                    f"{sizes[letter][1]}), got {shape}"
                )
            sizes.setdefault(letter, (size, name))


def _check_unit(name: str, u: Array) -> None:
    """Directions to project along must be unit vectors (or zero, an unused layer)."""
    if isinstance(u, jax.core.Tracer):
        return
    norms = np.linalg.norm(np.asarray(u, np.float64), axis=-1)
    bad = ~((np.abs(norms - 1.0) <= 1e-3) | (norms == 0.0))
    if bad.any():
        raise InterventionError(
            f"{name}: expected unit vectors (or zero) along the last axis; {int(bad.sum())} of {bad.size} "
            f"have another norm (e.g. {float(norms[bad][0]):.4g})"
        )


def _per_layer(value: Any, shape: tuple[int, ...]) -> np.ndarray:
    return np.broadcast_to(np.asarray(value, np.float32), shape).copy()


def add_edit(site: str, v: Any, *, layer_mask: Any = None, head_mask: Any = None, positions: str = "all") -> Edit:
    """``x += scale * v`` at ``site`` (v: [L, H, D] at head_out, [L, d_model] elsewhere)."""
    return Edit.create(site, "add", {"v": v}, layer_mask=layer_mask, head_mask=head_mask, positions=positions)


def project_edit(
    site: str, u: Any, c: Any = 0.0, *, layer_mask: Any = None, head_mask: Any = None, positions: str = "all"
) -> Edit:
    """``x -= scale * ((x . u) - c) u``; ``u`` is normalised here, ``c`` (a number or [L] / [L, H]) broadcast."""
    u = np.asarray(u, np.float32)
    return Edit.create(site, "project", {"u": concepts.unit(u), "c": _per_layer(c, u.shape[:-1])},
                       layer_mask=layer_mask, head_mask=head_mask, positions=positions)


def erase_edit(site: str, P: Any, mu: Any, *, layer_mask: Any = None, positions: str = "all") -> Edit:
    """``x -= scale * P (x - mu)`` at a residual site (P: [L, d, d], mu: [L, d])."""
    return Edit.create(site, "erase", {"P": P, "mu": mu}, layer_mask=layer_mask, positions=positions)


# ---------------------------------------------------------------------------------------
# Interventions
# ---------------------------------------------------------------------------------------


@struct.dataclass
class Intervention:
    """Edits sharing one strength: ``scale = 0`` is the identity, whatever the edits."""

    edits: tuple[Edit, ...]
    scale: Array  # [] float32
    method: str = struct.field(pytree_node=False, default="custom")

    @classmethod
    def from_edits(cls, edits: Sequence[Edit], scale: float | Array = 1.0, method: str = "custom") -> "Intervention":
        edits = tuple(edits)
        if not edits:
            raise InterventionError("edits: an intervention needs at least one edit")
        for i, edit in enumerate(edits):
            if not isinstance(edit, Edit):
                raise InterventionError(f"edits[{i}]: expected an Edit, got {type(edit).__name__}")
        n_layers = {int(edit.layer_mask.shape[0]) for edit in edits}
        if len(n_layers) > 1:
            raise InterventionError(f"edits: layer masks of different lengths {sorted(n_layers)} (one model has one depth)")
        return cls(edits=edits, scale=_scalar("scale", scale), method=method)

    # -- ITI ---------------------------------------------------------------------------------

    @classmethod
    def create(
        cls, directions: Any, scales: Any, head_mask: Any, alpha: float | Array = 0.0, position_mode: str = "last"
    ) -> "Intervention":
        """ITI: ``head_out[l, :, t, h] += alpha * scales[l, h] * directions[l, h]`` on the heads of ``head_mask``."""
        _check_positions(position_mode)
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
        alpha = _scalar("alpha", alpha)
        for name, array in (("directions", directions), ("scales", scales)):
            check_finite(name, array)
        edit = Edit.create("head_out", "add", {"v": scales[:, :, None] * directions}, head_mask=head_mask,
                           positions=position_mode)
        return cls(edits=(edit,), scale=alpha, method="iti")

    @classmethod
    def zeros(cls, config: ModelConfig, position_mode: str = "last") -> "Intervention":
        """The identity (ITI-shaped: no heads, alpha 0) with the model's shapes: the baseline program's argument."""
        l, h, d = config.n_layers, config.n_heads, config.resolved_head_dim
        return cls.create(jnp.zeros((l, h, d)), jnp.zeros((l, h)), jnp.zeros((l, h), bool), 0.0, position_mode)

    def _iti_edit(self) -> Edit:
        if len(self.edits) != 1 or (self.edits[0].site, self.edits[0].op) != ("head_out", "add"):
            structure = ", ".join(f"{e.op} at {e.site}" for e in self.edits)
            raise InterventionError(f"expected an ITI intervention (one add edit at head_out), got: {structure}")
        return self.edits[0]

    @property
    def directions(self) -> Array:
        """[L, H, D] ITI directions (unit norm; zero where sigma is 0)."""
        v = self._iti_edit().arrays["v"]
        norm = jnp.linalg.norm(v, axis=-1, keepdims=True)
        return v / jnp.where(norm > 0, norm, 1.0)

    @property
    def scales(self) -> Array:
        """[L, H] ITI sigmas (the norm of each head's shift per unit of alpha)."""
        return jnp.linalg.norm(self._iti_edit().arrays["v"], axis=-1)

    @property
    def head_mask(self) -> Array:
        """[L, H] bool: the heads an ITI intervention shifts."""
        return self._iti_edit().gate().astype(bool)

    def head_shift(self) -> Array:
        """[L, H, D]: the ITI shift per unit of alpha on its heads (``scales * head_mask * directions``)."""
        edit = self._iti_edit()
        return edit.gate()[:, :, None] * edit.arrays["v"]

    # -- strength, positions, structure ------------------------------------------------------

    @property
    def alpha(self) -> Array:
        """The scale (ITI's alpha, in units of sigma)."""
        return self.scale

    def with_scale(self, scale: float | Array) -> "Intervention":
        """The same edits at strength ``scale`` (a finite number; traced values pass unchecked)."""
        return self.replace(scale=_scalar("scale", scale))

    def with_alpha(self, alpha: float | Array) -> "Intervention":
        return self.replace(scale=_scalar("alpha", alpha))

    @property
    def position_mode(self) -> str:
        """The edits' position policy (policies joined by ``+`` when they differ)."""
        policies = list(dict.fromkeys(edit.positions for edit in self.edits))
        return "+".join(policies)

    def with_mode(self, position_mode: str) -> "Intervention":
        """Every edit with position policy ``position_mode``."""
        return self.replace(edits=tuple(edit.with_positions(position_mode) for edit in self.edits))

    with_positions = with_mode

    @property
    def k(self) -> int:
        """Units acted on: (layer, head) pairs of head_out edits plus layers of residual edits."""
        return sum(edit.units() for edit in self.edits)

    def structure(self) -> tuple[tuple[str, str, str], ...]:
        """(site, op, positions) per edit: what selects a compiled program."""
        return tuple((e.site, e.op, e.positions) for e in self.edits)

    def program_form(self) -> "Intervention":
        """Canonical dtypes and no method name: equal structures and shapes share compiled programs."""
        edits = tuple(
            e.replace(arrays={n: jnp.asarray(a, jnp.float32) for n, a in e.arrays.items()},
                      layer_mask=jnp.asarray(e.layer_mask).astype(bool),
                      head_mask=None if e.head_mask is None else jnp.asarray(e.head_mask).astype(bool))
            for e in self.edits
        )
        return Intervention(edits=edits, scale=jnp.asarray(self.scale, jnp.float32), method="")

    # -- the per-call form the model applies -------------------------------------------------

    def resolve(self, position_mask_for: Callable[[str], Array]) -> ResolvedIntervention:
        """Each edit on ``position_mask_for(its policy)`` [B, T]."""
        return ResolvedIntervention(
            edits=tuple(e.resolve(position_mask_for(e.positions)) for e in self.edits), scale=self.scale
        )

    def prefill_positions(self, prompt_mask: Array) -> Array:
        """[B, T] bool: the prompt positions the (single) policy touches (``prompt_mask``: real tokens)."""
        if "+" in self.position_mode:
            raise InterventionError(f"prefill_positions: the edits have several policies ({self.position_mode})")
        return prefill_positions(self.position_mode, prompt_mask)

    def for_prefill(self, prompt_mask: Array) -> ResolvedIntervention:
        """The edits of a forward over whole prompts (or a plain forward over texts)."""
        return self.resolve(lambda positions: prefill_positions(positions, prompt_mask))

    def for_decode_step(self, batch_size: int) -> ResolvedIntervention:
        """The edits of one decode step (one new position per row)."""
        return self.resolve(lambda positions: decode_positions(positions, batch_size))

    def for_sequence(self, prompt_mask: Array, n_generated: int) -> ResolvedIntervention:
        """The edits of one uncached forward over prompts + ``n_generated`` generated tokens that
        touches the positions a prefill and its decode steps touch."""
        b = prompt_mask.shape[0]
        return self.resolve(lambda positions: jnp.concatenate(
            [prefill_positions(positions, prompt_mask), jnp.broadcast_to(decode_positions(positions, b), (b, n_generated))],
            axis=1,
        ))

    def at_positions(self, position_mask: Array) -> ResolvedIntervention:
        """Every edit on ``position_mask`` [B, T], whatever its policy."""
        mask = jnp.asarray(position_mask).astype(bool)
        return self.resolve(lambda _: mask)

    as_head_intervention = at_positions  # the name of the ITI-only days

    # -- checks and files --------------------------------------------------------------------

    def check_compatible(self, config: ModelConfig) -> None:
        """Raise ``InterventionError`` naming each array axis that does not match the model."""
        want = model_axes(config)
        messages = []
        for i, edit in enumerate(self.edits):
            problems = []
            for name, array in edit.named_arrays().items():
                axes, shape = array_axes(edit.site, name), tuple(array.shape)
                if len(shape) != len(axes):
                    problems.append(f"edit{i}.{name} has shape {shape}, expected [{', '.join(axes)}]")
                    continue
                for axis, (letter, size) in enumerate(zip(axes, shape)):
                    if size != want[letter]:
                        problems.append(
                            f"edit{i}.{name} axis {axis} ({letter}) is {size} but the model has "
                            f"{_AXIS_NAMES[letter]}={want[letter]}"
                        )
            if problems:
                axes = array_axes(edit.site, EDIT_ARRAYS[edit.op][0])
                shape = tuple(edit.arrays[EDIT_ARRAYS[edit.op][0]].shape)
                model_shape = tuple(want[a] for a in axes)
                messages.append(
                    f"edit {i} ({edit.op} at {edit.site}) of shape [{', '.join(axes)}] = {shape} does not fit "
                    f"the model's {model_shape}: " + "; ".join(problems)
                )
        if messages:
            raise InterventionError(" | ".join(messages))

    def save(self, path: str | Path, provenance: dict[str, Any] | None = None) -> Path:
        """Write ``path`` (.safetensors) and its ``.json`` sidecar (format v2); returns the .safetensors path."""
        from safetensors.numpy import save_file

        path = _safetensors_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays, edits, shape = {}, [], {}
        for i, edit in enumerate(self.edits):
            names = {}
            for name, array in edit.named_arrays().items():
                key = f"edit{i}.{name}"
                value = np.asarray(array)
                arrays[key] = value.astype(bool) if name.endswith("_mask") else value.astype(np.float32)
                names[name] = key
                for letter, size in zip(array_axes(edit.site, name), value.shape):
                    shape[_AXIS_NAMES[letter]] = int(size)
            edits.append({"site": edit.site, "op": edit.op, "positions": edit.positions, "arrays": names})
        save_file(arrays, str(path))
        sidecar = {
            "format": FORMAT,
            "method": self.method,
            "scale": float(self.scale),
            "edits": edits,
            "position_mode": self.position_mode,
            "k": self.k,
            "shape": shape,
            "provenance": provenance or {},
        }
        sidecar_path(path).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, config: ModelConfig | None = None) -> "Intervention":
        """Read a saved intervention (v2, or an ITI v1 file); with ``config``, also check it fits that model."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        path = _safetensors_path(path)
        if not path.is_file():
            raise InterventionError(f"{path}: no such intervention file")
        try:
            arrays = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise InterventionError(f"{path}: not a readable safetensors file ({err})") from err
        meta = read_sidecar(path)
        fmt = meta.get("format")
        if fmt == FORMAT_V1:
            intervention = _load_v1(path, arrays, meta)
        elif fmt == FORMAT:
            intervention = _load_v2(path, arrays, meta)
        else:
            raise InterventionError(
                f"{sidecar_path(path)}: format: expected {FORMAT!r} (or {FORMAT_V1!r}), got {fmt!r}"
            )
        if config is not None:
            try:
                intervention.check_compatible(config)
            except InterventionError as err:
                raise InterventionError(f"{path}: {err}") from err
        return intervention

    # -- ITI from activations ----------------------------------------------------------------

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


def _scalar(name: str, value: Any) -> Array:
    value = jnp.asarray(value, jnp.float32)
    if value.shape != ():
        raise InterventionError(f"{name}: expected a scalar, got shape {tuple(value.shape)}")
    check_finite(name, value)
    return value


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


def _check_acts(acts: Any, labels: Any, layout: str = "[N, L, H, D]") -> tuple[np.ndarray, np.ndarray]:
    """``acts`` of ``layout`` (head activations, or residual ``[N, L, d_model]``) and labels ``[N]``."""
    acts, labels = np.asarray(acts), np.asarray(labels)
    if acts.ndim != layout.count(",") + 1:
        raise InterventionError(f"acts: expected shape {layout}, got {acts.shape}")
    if labels.shape != (acts.shape[0],):
        raise InterventionError(f"labels: expected shape [N] = ({acts.shape[0]},), got {labels.shape}")
    return acts, labels


def _class_mean_difference(acts: np.ndarray, labels: np.ndarray, wanted_label: int) -> np.ndarray:
    """``concepts.mean_difference`` with its errors as ``InterventionError``."""
    try:
        return concepts.mean_difference(acts, labels, wanted_label)
    except concepts.ConceptError as err:
        raise InterventionError(str(err)) from None


def mass_mean_directions(acts: Any, labels: Any, wanted_label: int = 0) -> np.ndarray:
    """[L, H, D] unit vectors: mean activation of the wanted class minus that of the rest."""
    acts, labels = _check_acts(acts, labels)
    return concepts.unit(_class_mean_difference(acts, labels, wanted_label))


def probe_directions(probe_weights: Any) -> np.ndarray:
    """[L, H, D] unit vectors along per-head probe weights (pointing to the probe's positive class)."""
    weights = np.asarray(probe_weights, np.float64)
    if weights.ndim != 3:
        raise InterventionError(f"probe_weights: expected shape [L, H, D], got {weights.shape}")
    return concepts.unit(weights)


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
    return concepts.sigma_along(acts, directions)


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
#
# An edit bakes when parameters can be changed so that the plain model computes what the runtime
# edit computes at every position (policy ``all``; padding positions change too, but nothing
# attends to them). ``bake_into_params`` bakes these and refuses every other edit:
#
#   add at head_out          -> attention.out_bias [L, d] += scale * sum_h (gate * v)[l, h] . W_o[l, h]
#   project at head_out      -> W_o[l, h] <- (I - s u u^T) W_o[l, h] (+ s c u . W_o[l, h] into out_bias):
#                               head_out feeds only the output projection, so any scale and c bake
#   add at a residual site   -> layers.{site}_bias [L, d] += scale * gate * v
#   project, c = 0, scale 1, of one direction u at every residual write (``ablation_edits``)
#                            -> weight orthogonalisation (Arditi et al. 2024): every matrix and bias
#                               that writes the stream gets W <- (I - u u^T) W (``orthogonalise_params``)
#
# Residual projection at another scale s does not bake: the runtime edit scales the stream's
# component along u by (1 - s) after every write, so an early write's component is scaled once
# per later write, while a projected weight scales each write once; only s = 0 (the identity)
# and s = 1 (idempotent) agree. ``erase`` (LEACE) and clamps (c != 0) act on the whole stream at
# one layer, not on a write, and are refused too. Orthogonalising a tied embedding would also
# change the unembedding: untie it first (``untie_embeddings``).

BAKED_RESIDUAL_BIASES = tuple(f"{site}_bias" for site in RESIDUAL_SITES)  # at params["layers"]
_ORTHOGONAL_TOLERANCE = 1e-6  # |b . u| / (1 + |b|) below this: a bias already free of u
_ABLATION_WRITES = (("resid_pre", "layer 0 (the embedding)"), ("resid_mid", "every layer"),
                    ("resid_post", "every layer"))


def _unbakeable(i: int, edit: Edit, why: str) -> InterventionError:
    return InterventionError(
        f"edit {i} ({edit.op} at {edit.site}, positions {edit.positions}) cannot be baked into parameters: {why}"
    )


def project_out(w: Array, u: Array) -> Array:
    """``w`` with its component along the unit vector ``u`` [d] removed from its last axis:
    ``w - (w . u) u^T`` (``(I - u u^T) W`` for a matrix whose rows are written to the stream)."""
    w = jnp.asarray(w, jnp.float32)
    return w - jnp.einsum("...d,d->...", w, u)[..., None] * u


def output_bias(config: ModelConfig, params: Params, intervention: Intervention) -> Array:
    """[L, d_model]: ``scale * sum_h W_o[l, h] . (gate * v)[l, h]`` over the ``add`` edits at ``head_out``,
    folded through the output projection."""
    intervention.check_compatible(config)
    w_out = params["layers"]["attention"]["out"].astype(jnp.float32)  # [L, H, D, d_model]
    bias = jnp.zeros((config.n_layers, config.d_model), jnp.float32)
    for i, edit in enumerate(intervention.edits):
        if (edit.site, edit.op) != ("head_out", "add"):
            raise InterventionError(
                f"edit {i} ({edit.op} at {edit.site}): only add edits at head_out fold into the output-projection bias"
            )
        shift = intervention.scale * edit.gate()[:, :, None] * edit.arrays["v"]
        bias = bias + jnp.einsum("lhd,lhdm->lm", shift, w_out)
    return bias


def residual_biases(config: ModelConfig, intervention: Intervention) -> dict[str, Array]:
    """``{site}_bias`` [L, d_model] = ``scale * gate * v`` summed over the ``add`` edits at each residual
    site (only the sites that have one)."""
    intervention.check_compatible(config)
    biases: dict[str, Array] = {}
    for i, edit in enumerate(intervention.edits):
        if edit.op != "add" or edit.site not in RESIDUAL_SITES:
            raise InterventionError(
                f"edit {i} ({edit.op} at {edit.site}): only add edits at a residual site fold into a residual bias"
            )
        name = f"{edit.site}_bias"
        shift = intervention.scale * edit.gate()[:, None] * edit.arrays["v"]
        biases[name] = biases.get(name, jnp.zeros((config.n_layers, config.d_model), jnp.float32)) + shift
    return biases


def head_out_map(config: ModelConfig, edits: Sequence[Edit], scale: Array) -> tuple[Array, Array]:
    """The ``add`` / ``project`` edits at ``head_out``, applied in order, as one affine map per head:
    ``head_out[l, h] -> A[l, h] @ head_out[l, h] + b[l, h]`` (A [L, H, D, D], b [L, H, D])."""
    l, h, d = config.n_layers, config.n_heads, config.resolved_head_dim
    a = jnp.broadcast_to(jnp.eye(d, dtype=jnp.float32), (l, h, d, d))
    b = jnp.zeros((l, h, d), jnp.float32)
    for edit in edits:
        s = scale * edit.gate()  # [L, H]
        if edit.op == "add":
            b = b + s[:, :, None] * edit.arrays["v"]
            continue
        u, c = edit.arrays["u"], edit.arrays["c"]  # x -> x - s (x . u) u + s c u
        outer = s[:, :, None, None] * jnp.einsum("lhe,lhd->lhed", u, u)
        a = a - jnp.einsum("lhef,lhfd->lhed", outer, a)
        b = b - jnp.einsum("lhef,lhf->lhe", outer, b) + (s * c)[:, :, None] * u
    return a, b


def untie_embeddings(config: ModelConfig, params: Params) -> tuple[ModelConfig, Params]:
    """The same model with a separate unembedding: ``tie_embeddings=False`` and ``lm_head`` =
    ``embedding^T`` (needed before orthogonalising the embedding); an untied model is returned as is."""
    import dataclasses

    if not config.tie_embeddings:
        return config, params
    lm_head = jnp.asarray(params["embedding"], jnp.float32).T
    return dataclasses.replace(config, tie_embeddings=False), {**params, "lm_head": lm_head}


def orthogonalise_params(config: ModelConfig, params: Params, u: Any) -> Params:
    """Weight orthogonalisation (Arditi et al. 2024): every parameter that writes the residual stream
    with its component along the unit vector ``u`` [d_model] removed (``project_out``): the embedding
    rows (and a learned position table), each attention output projection, each MLP down projection,
    their biases and every baked bias (``attention.out_bias``, ``mlp.down_bias``, ``layers.{site}_bias``).

    Equals projecting ``u`` out (scale 1, c = 0) at every residual site of every layer. A tied
    embedding is refused (its transpose is also the unembedding): ``untie_embeddings`` first.
    """
    u = jnp.asarray(u, jnp.float32)
    if u.shape != (config.d_model,):
        raise InterventionError(f"u: expected shape [d_model] = ({config.d_model},), got {tuple(u.shape)}")
    check_finite("u", u)
    if not abs(float(jnp.linalg.norm(u)) - 1.0) <= 1e-3:
        raise InterventionError(f"u: expected a unit vector, got norm {float(jnp.linalg.norm(u)):.4g}")
    if config.norm_position != "pre":
        raise InterventionError(
            f"model.norm_position = {config.norm_position!r}: each sublayer's output is normalised before it "
            "is written to the stream, so no change of the writing weights removes u from the write; "
            "apply the ablation at runtime instead"
        )
    if config.tie_embeddings:
        raise InterventionError(
            "model.tie_embeddings = true: orthogonalising the embedding would also change the unembedding "
            "(the logits read the same matrix); untie it first with jaxlm.intervene.untie_embeddings(config, "
            "params), which adds lm_head = embedding^T and returns the untied config"
        )
    out = {**params, "embedding": project_out(params["embedding"], u)}
    if "position_embedding" in params:
        out["position_embedding"] = project_out(params["position_embedding"], u)
    layers = dict(params["layers"])
    attention, mlp = dict(layers["attention"]), dict(layers["mlp"])
    attention["out"] = project_out(attention["out"], u)
    if "out_bias" in attention:
        attention["out_bias"] = project_out(attention["out_bias"], u)
    mlp["down"] = project_out(mlp["down"], u)
    if "down_bias" in mlp:
        mlp["down_bias"] = project_out(mlp["down_bias"], u)
    layers.update(attention=attention, mlp=mlp)
    for name in BAKED_RESIDUAL_BIASES:
        if name in layers:
            layers[name] = project_out(layers[name], u)
    out["layers"] = layers
    return out


def _ablation_direction(
    config: ModelConfig, params: Params, intervention: Intervention, projects: list[tuple[int, Edit]]
) -> Array | None:
    """The one direction the residual ``project`` edits remove from every write (None at scale 0, the
    identity); ``InterventionError`` when they do not bake exactly."""
    scale = float(intervention.scale)
    if scale == 0.0:
        return None
    first_i, first = projects[0]
    if scale != 1.0:
        raise _unbakeable(
            first_i, first,
            f"residual projection bakes only at scale 1 (or 0), got {scale:g}: x - s (x . u) u is idempotent "
            "only for s in {0, 1}, and the runtime edit rescales the stream's component along u after every "
            "write, which no change of the writing weights reproduces",
        )
    u = None
    covered: dict[str, set[int]] = {site: set() for site in RESIDUAL_SITES}
    for i, edit in projects:
        layers = np.flatnonzero(np.asarray(edit.layer_mask))
        for layer in layers:
            if float(edit.arrays["c"][layer]) != 0.0:
                raise _unbakeable(i, edit, f"c = {float(edit.arrays['c'][layer]):g} at layer {layer}: a clamp "
                                           "(c != 0) sets the stream's component, only c = 0 (ablation) bakes")
            here = edit.arrays["u"][layer]
            if u is None:
                u = here
            elif not np.allclose(np.asarray(here), np.asarray(u), atol=1e-6):
                raise _unbakeable(i, edit, f"u at layer {layer} differs from the first projected direction: "
                                           "only one direction projected out of every write bakes")
            covered[edit.site].add(int(layer))
    needed = {"resid_pre": {0}, "resid_mid": set(range(config.n_layers)), "resid_post": set(range(config.n_layers))}
    missing = [f"{site} layer(s) {sorted(needed[site] - covered[site])}" for site in needed if needed[site] - covered[site]]
    if u is None or missing:
        edits = ", ".join(f"edit {i} ({e.op} at {e.site})" for i, e in projects)
        where = "; ".join(f"{site} at {which}" for site, which in _ABLATION_WRITES)
        raise InterventionError(
            f"{edits} cannot be baked into parameters: a projection bakes only when it acts at every residual "
            f"write ({where}: jaxlm.intervene.ablation_edits); missing: {', '.join(missing) or 'every layer'}"
        )
    pre_bias = params["layers"].get("resid_pre_bias")
    if pre_bias is not None:
        along = np.abs(np.asarray(pre_bias, np.float64) @ np.asarray(u, np.float64))
        size = 1.0 + np.linalg.norm(np.asarray(pre_bias), axis=-1)
        unprojected = [l for l in range(1, config.n_layers) if l not in covered["resid_pre"]
                       and along[l] / size[l] > _ORTHOGONAL_TOLERANCE]
        if unprojected:
            raise _unbakeable(first_i, first, f"params layers.resid_pre_bias has a component along u at layer(s) "
                                              f"{unprojected}, which the edits leave in the stream there but "
                                              "orthogonalised weights would remove")
    return u


def bake_into_params(config: ModelConfig, params: Params, intervention: Intervention) -> Params:
    """Params whose plain forward equals the forward with ``intervention`` (policy ``all``: every
    position, padding included, which nothing attends to), for the edits that bake exactly:

    - ``add`` / ``project`` at ``head_out`` -> the output projection ``attention.out`` (projections)
      and its bias ``attention.out_bias`` [L, d_model];
    - ``add`` at a residual site -> ``layers.{site}_bias`` [L, d_model];
    - ``project`` (c = 0) of one direction at every residual write at scale 1 (``build_ablate``,
      ``ablation_edits``) -> ``orthogonalise_params`` (untied embeddings only: ``untie_embeddings``).

    Every other edit raises ``InterventionError`` naming it and why: other position policies,
    ``erase``, residual projections at another scale, of several directions, with c != 0 or missing
    a write, and residual adds together with residual projections (the projections would remove
    part of a shift added before them). Biases already in ``params`` are added to; the input is not
    modified.
    """
    intervention.check_compatible(config)
    heads, resid_adds, resid_projects = [], [], []
    for i, edit in enumerate(intervention.edits):
        if edit.positions != "all":
            raise _unbakeable(i, edit, f"parameters act at every position, so only position policy 'all' bakes "
                                       f"({edit.positions!r} touches some positions only)")
        if edit.op == "erase":
            raise _unbakeable(i, edit, "erase (LEACE) acts on the whole residual stream at one layer, not on one "
                                       "write: no change of the weights reproduces it")
        if edit.site == "head_out":
            heads.append(edit)
        elif edit.op == "add":
            resid_adds.append((i, edit))
        else:
            resid_projects.append((i, edit))
    if resid_adds and resid_projects:
        i, edit = resid_adds[0]
        raise _unbakeable(i, edit, "an add at a residual site together with residual projections: the "
                                   "projections after it would remove part of the shift, which a bias does not")
    u = _ablation_direction(config, params, intervention, resid_projects) if resid_projects else None

    layers = dict(params["layers"])
    if heads:
        attention = dict(layers["attention"])
        w_out = jnp.asarray(attention["out"], jnp.float32)  # [L, H, D, d_model]
        a, b = head_out_map(config, heads, intervention.scale)
        bias = jnp.einsum("lhd,lhdm->lm", b, w_out)
        attention["out_bias"] = attention["out_bias"] + bias if "out_bias" in attention else bias
        if any(edit.op == "project" for edit in heads):
            attention["out"] = jnp.einsum("lhed,lhem->lhdm", a, w_out)
        layers["attention"] = attention
    if resid_adds:
        for name, bias in residual_biases(config, Intervention.from_edits([e for _, e in resid_adds],
                                                                          intervention.scale)).items():
            layers[name] = layers[name] + bias if name in layers else bias
    baked = {**params, "layers": layers}
    return baked if u is None else orthogonalise_params(config, baked, u)


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
    """The sidecar of a saved intervention (format, method, scale, edits, k, shape, provenance)."""
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


def _finite_number(meta_path: Path, meta: dict[str, Any], field: str) -> float:
    if field not in meta:
        raise InterventionError(f"{meta_path}: missing field {field!r}")
    value = meta[field]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise InterventionError(f"{meta_path}: {field}: expected a finite number, got {value!r}")
    return float(value)


def _load_v1(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Intervention:
    """An ITI file of format ``jaxlm-iti-v1``."""
    missing = [name for name in _V1_ARRAYS if name not in arrays]
    if missing:
        raise InterventionError(f"{path}: missing array(s) {missing}; found {sorted(arrays)}")
    if "position_mode" not in meta:
        raise InterventionError(f"{sidecar_path(path)}: missing field 'position_mode'")
    alpha = _finite_number(sidecar_path(path), meta, "alpha")
    try:
        return Intervention.create(
            arrays["directions"], arrays["scales"], arrays["head_mask"], alpha, meta["position_mode"]
        )
    except InterventionError as err:
        raise InterventionError(f"{path}: {err}") from err


def _load_v2(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Intervention:
    meta_path = sidecar_path(path)
    scale = _finite_number(meta_path, meta, "scale")
    specs = meta.get("edits")
    if not isinstance(specs, list) or not specs:
        raise InterventionError(f"{meta_path}: edits: expected a non-empty list of edits, got {specs!r}")
    method = meta.get("method", "custom")
    if not isinstance(method, str):
        raise InterventionError(f"{meta_path}: method: expected a string, got {method!r}")
    for key, array in arrays.items():
        if array.dtype != bool:
            try:
                check_finite(key, array)
            except InterventionError as err:
                raise InterventionError(f"{path}: {err}") from err
    edits = []
    for i, spec in enumerate(specs):
        where = f"{meta_path}: edits[{i}]"
        if not isinstance(spec, dict):
            raise InterventionError(f"{where}: expected an object, got {spec!r}")
        for field, valid in (("site", SITES), ("op", OPS), ("positions", POSITIONS)):
            if spec.get(field) not in valid:
                raise InterventionError(f"{where}.{field}: expected one of {', '.join(valid)}, got {spec.get(field)!r}")
        names = spec.get("arrays")
        if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
            raise InterventionError(f"{where}.arrays: expected an object of array names, got {names!r}")
        absent = sorted(v for v in names.values() if v not in arrays)
        if absent:
            raise InterventionError(f"{path}: missing array(s) {absent} (named by {where}); found {sorted(arrays)}")
        values = {name: arrays[key] for name, key in names.items()}
        masks = {name: values.pop(name) for name in ("layer_mask", "head_mask") if name in values}
        try:
            edits.append(Edit.create(spec["site"], spec["op"], values, positions=spec["positions"], **masks))
        except InterventionError as err:
            raise InterventionError(f"{path}: edit{i}: {err}") from err
    try:
        return Intervention.from_edits(edits, scale, method)
    except InterventionError as err:
        raise InterventionError(f"{path}: {err}") from err


# ---------------------------------------------------------------------------------------
# Builders: labelled activations -> Intervention, one function per method
# ---------------------------------------------------------------------------------------
#
# A builder is ``(acts, labels, *, settings) -> Intervention`` with keyword-only settings and
# their defaults; ``BUILDERS`` maps a method name to it and ``build_intervention`` is the one
# entry point. ``acts`` are captured at the site the method needs (``BUILDER_SITE`` /
# ``builder_site``): [N, L, H, D] at head_out (iti), [N, L, d_model] at a residual site.
# Labels are binary; directions point toward ``wanted_label`` (0 = non-toxic in jaxlm's
# labelled sets). Adding a method is one builder function and one ``BUILDERS`` line.


def _check_residual_acts(acts: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    acts, labels = _check_acts(acts, labels, "[N, L, d_model] (residual activations)")
    check_finite("acts", acts)
    return acts, labels


def _check_layer(layer: int | None, n_layers: int) -> int:
    """``layer`` (None: the middle layer ``L // 2``) as an index in ``[0, L)``."""
    if layer is None:
        return n_layers // 2
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < n_layers:
        raise InterventionError(
            f"layer: expected an integer in [0, {n_layers - 1}] (the model has {n_layers} layers), got {layer!r}"
        )
    return int(layer)


def _check_residual_site(site: str) -> None:
    if site not in RESIDUAL_SITES:
        raise InterventionError(f"site: expected a residual site ({', '.join(RESIDUAL_SITES)}), got {site!r}")


def _one_layer(n_layers: int, layer: int) -> np.ndarray:
    return np.arange(n_layers) == layer


def build_iti(
    acts: Any, labels: Any, *, accuracy: Any, k: int = 30, direction: str = "mass_mean", probe_weights: Any = None,
    positions: str = "last", wanted_label: int = 0, seed: int = 0, scale: float = 8.0,
) -> Intervention:
    """ITI (Li et al. 2023): ``add`` at head_out on the ``k`` heads of best probe ``accuracy`` [L, H],
    ``v = sigma * direction`` (mass-mean, probe or random), at ``scale = alpha`` (units of sigma);
    ``Intervention.from_activations``'s numbers."""
    acts, labels = _check_acts(acts, labels)
    n_units = acts.shape[1] * acts.shape[2]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_units:
        raise InterventionError(f"k: expected an integer in [1, L*H = {n_units}], got {k!r}")
    return Intervention.from_activations(
        acts, labels, accuracy, int(k), scale, positions, direction, wanted_label=wanted_label,
        probe_weights=probe_weights, key=seed,
    )


def build_caa(
    acts: Any, labels: Any, *, layer: int | None = None, site: str = "resid_pre", positions: str = "all",
    wanted_label: int = 0, scale: float = 1.0,
) -> Intervention:
    """Contrastive activation addition (Rimsky et al. 2024; ActAdd): ``add`` the class mean difference
    (wanted minus other) of the residual ``acts`` [N, L, d] at ``layer`` (default: the middle one), at
    that layer only, on prompt and generated positions; ``scale`` is the multiplier."""
    acts, labels = _check_residual_acts(acts, labels)
    _check_residual_site(site)
    n_layers = acts.shape[1]
    layer = _check_layer(layer, n_layers)
    v = np.zeros(acts.shape[1:], np.float32)
    v[layer] = concepts.mean_difference(acts[:, layer], labels, wanted_label)
    edit = add_edit(site, v, layer_mask=_one_layer(n_layers, layer), positions=positions)
    return Intervention.from_edits([edit], scale, method="caa")


def ablation_edits(u: Any, n_layers: int, positions: str = "all") -> list[Edit]:
    """``project`` of the one direction ``u`` [d] (c = 0) at every residual write: the embedding
    (``resid_pre`` of layer 0), each attention output (``resid_mid``) and each MLP output
    (``resid_post``): nothing the model writes keeps a component along ``u``."""
    every = np.broadcast_to(concepts.unit(u), (n_layers, np.shape(u)[-1]))
    return [project_edit("resid_pre", every, layer_mask=_one_layer(n_layers, 0), positions=positions),
            project_edit("resid_mid", every, positions=positions),
            project_edit("resid_post", every, positions=positions)]


def build_ablate(
    acts: Any, labels: Any, *, layer: int | None = None, site: str = "resid_pre", positions: str = "all",
    wanted_label: int = 0, scale: float = 1.0,
) -> Intervention:
    """Directional ablation (Arditi et al. 2024): the unit mean-difference direction of the residual
    ``acts`` [N, L, d] (read at ``site``) at ``layer`` (default: the middle one), projected out of
    every residual write (``ablation_edits``) at every position."""
    acts, labels = _check_residual_acts(acts, labels)
    _check_residual_site(site)
    layer = _check_layer(layer, acts.shape[1])
    u = concepts.mean_difference(acts[:, layer], labels, wanted_label)
    if not np.linalg.norm(u) > 0:
        raise InterventionError(f"acts: the two classes have the same mean at layer {layer}: no direction to ablate")
    return Intervention.from_edits(ablation_edits(u, acts.shape[1], positions), scale, method="ablate")


def build_leace(
    acts: Any, labels: Any, *, layer: int | None = None, site: str = "resid_pre", positions: str = "all",
    ridge: float = 0.0, shrinkage: bool = False, scale: float = 1.0,
) -> Intervention:
    """LEACE (Belrose et al. 2023): the eraser fitted on the residual ``acts`` [N, L, d] at ``layer``
    (default: the middle one), an ``erase`` edit ``x -= scale * P (x - mu)`` at that layer only."""
    acts, labels = _check_residual_acts(acts, labels)
    _check_residual_site(site)
    n_layers, d = acts.shape[1], acts.shape[2]
    layer = _check_layer(layer, n_layers)
    eraser = concepts.leace_fit(acts[:, layer], labels, ridge=ridge, shrinkage=shrinkage)
    P, mu = np.zeros((n_layers, d, d), np.float32), np.zeros((n_layers, d), np.float32)
    P[layer], mu[layer] = eraser.P, eraser.mu
    edit = erase_edit(site, P, mu, layer_mask=_one_layer(n_layers, layer), positions=positions)
    return Intervention.from_edits([edit], scale, method="leace")


RANDOM_BASES = ("iti", "caa", "ablate")


def build_random(acts: Any, labels: Any, *, base: str = "iti", seed: int = 0, **base_settings: Any) -> Intervention:
    """The control: ``base``'s intervention (iti, caa or ablate, built with ``base_settings``) with its
    directions replaced by isotropic random ones of the same norms (``concepts.norm_matched_random``,
    deterministic in ``seed``): the same edits, masks, positions and scale."""
    if base not in RANDOM_BASES:
        raise InterventionError(f"base: expected one of {', '.join(RANDOM_BASES)}, got {base!r}")
    built = build_intervention(base, acts, labels, **base_settings)
    if base == "ablate":
        edit = built.edits[0]
        u = concepts.norm_matched_random(np.asarray(edit.arrays["u"][0]), seed)
        edits = ablation_edits(u, edit.layer_mask.shape[0], edit.positions)
    else:
        (edit,) = built.edits
        v = concepts.norm_matched_random(np.asarray(edit.arrays["v"]), seed)
        edits = [Edit.create(edit.site, "add", {"v": v}, layer_mask=edit.layer_mask, head_mask=edit.head_mask,
                             positions=edit.positions)]
    return Intervention.from_edits(edits, built.scale, method="random")


BUILDERS: dict[str, Callable[..., Intervention]] = {
    "iti": build_iti,
    "caa": build_caa,
    "ablate": build_ablate,
    "leace": build_leace,
    "random": build_random,
}


def _builder(method: str) -> Callable[..., Intervention]:
    if method not in BUILDERS:
        raise InterventionError(f"method: expected one of {', '.join(BUILDERS)}, got {method!r}")
    return BUILDERS[method]


def builder_settings(method: str, **settings: Any) -> dict[str, Any]:
    """The settings ``build_intervention(method, ...)`` uses: ``settings`` over the builder's defaults,
    array-valued ones (``accuracy``, ``probe_weights``) left out: the provenance of a built file.
    ``InterventionError`` names a setting the builder does not take."""
    import inspect

    signature = inspect.signature(_builder(method))
    if method == "random":
        base = settings.pop("base", signature.parameters["base"].default)
        seed = settings.pop("seed", signature.parameters["seed"].default)
        return {"base": base, "seed": seed, **builder_settings(base, **settings)}
    parameters = {name: p for name, p in signature.parameters.items() if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(set(settings) - set(parameters))
    if unknown:
        raise InterventionError(f"{method}: unknown setting(s) {unknown}; valid settings: {', '.join(parameters)}")
    resolved = {name: settings.get(name, p.default) for name, p in parameters.items()}
    return {name: value for name, value in resolved.items()
            if value is not inspect.Parameter.empty and not isinstance(value, (np.ndarray, jax.Array))}


def builder_site(method: str, **settings: Any) -> str:
    """The site whose activations ``method``'s builder reads (head_out for ITI and its random control)."""
    if method == "random":
        return builder_site(settings.pop("base", "iti"), **settings)
    _builder(method)
    return "head_out" if method == "iti" else settings.get("site") or "resid_pre"


def build_intervention(method: str, acts: Any, labels: Any, **settings: Any) -> Intervention:
    """The intervention of ``method`` (a ``BUILDERS`` name) from labelled activations ``acts`` (at
    ``builder_site(method, ...)``) and ``labels`` [N]; ``settings`` are the builder's keywords."""
    builder_settings(method, **settings)  # names an unknown setting
    return _builder(method)(acts, labels, **settings)
