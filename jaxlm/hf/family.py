"""One HF family = a config mapping plus a table of tensors (HF name <-> jaxlm parameters).

A family module (``jaxlm/hf/<family>.py``) declares a ``Family``: how its ``config.json`` maps
onto ``ModelConfig`` fields and back, and, for a given config, the ``Tensor`` table that says
which HF tensor holds which jaxlm parameter(s) in which layout. Reading, writing, shape checks
and the exactness check of an export are written once, here, for every family.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from jaxlm.config import ConfigError, ModelConfig
from jaxlm.hf import io
from jaxlm.hf.io import HFError

LAYER = "{layer}"  # placeholder of the layer index in per-layer HF names
# ModelConfig fields HF config.json does not carry: they stay as the caller chose.
JAXLM_ONLY_FIELDS = ("dtype", "remat", "scan_layers", "init_std")


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One HF tensor and the jaxlm parameter(s) it holds.

    ``params`` are dotted paths (``"embedding"``, or ``"attention.q"`` under ``layers`` for a
    per-layer tensor, whose ``hf`` name contains ``{layer}``). ``to_jaxlm`` maps the HF array to
    one array per param (one layer's slice); ``to_hf`` maps them back.
    """

    hf: str
    params: tuple[str, ...]
    hf_shape: tuple[int, ...]
    to_jaxlm: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]

    @property
    def per_layer(self) -> bool:
        return LAYER in self.hf


def linear(hf: str, param: str, in_dim: int, out_shape: tuple[int, ...]) -> Tensor:
    """A torch ``Linear`` weight ``[out, in]`` (``out`` flattened head-major) <-> jaxlm ``[in, *out_shape]``."""
    out = int(np.prod(out_shape))
    return Tensor(hf, (param,), (out, in_dim),
                  lambda w: (w.T.reshape(in_dim, *out_shape),),
                  lambda p: p.reshape(in_dim, out).T)


def linear_from_heads(hf: str, param: str, in_shape: tuple[int, ...], out_dim: int) -> Tensor:
    """A torch ``Linear`` weight ``[out, H * D]`` reading heads <-> jaxlm ``[H, D, out]``."""
    size = int(np.prod(in_shape))
    return Tensor(hf, (param,), (out_dim, size),
                  lambda w: (w.T.reshape(*in_shape, out_dim),),
                  lambda p: p.reshape(size, out_dim).T)


def reshaped(hf: str, param: str, hf_shape: tuple[int, ...], shape: tuple[int, ...]) -> Tensor:
    """Same values, only the shape differs (biases, norm scales, Conv1D ``[in, out]`` weights)."""
    return Tensor(hf, (param,), hf_shape, lambda w: (w.reshape(shape),), lambda p: p.reshape(hf_shape))


def layer_norm(hf: str, param: str, d: int) -> list[Tensor]:
    """A LayerNorm with bias: ``<hf>.weight`` / ``<hf>.bias`` [d] <-> ``<param>.scale`` / ``<param>.bias``."""
    return [reshaped(f"{hf}.weight", f"{param}.scale", (d,), (d,)), reshaped(f"{hf}.bias", f"{param}.bias", (d,), (d,))]


@dataclasses.dataclass(frozen=True)
class Family:
    """How one HF architecture maps onto jaxlm.

    ``fields_from_hf(hf_config)`` gives ``ModelConfig`` fields (refusing, with ``HFError``, what
    jaxlm does not compute identically); ``config_to_hf(config)`` the ``config.json`` mapping;
    ``tensors(config)`` the tensor table. ``prefix`` is the base model's name prefix that a
    checkpoint of the bare base model (no LM head) leaves out; ``ignored`` are name suffixes of
    buffers some transformers versions saved (recomputed, not weights).
    """

    name: str
    model_type: str
    architecture: str
    fields_from_hf: Callable[[Mapping[str, Any]], dict[str, Any]]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    tensors: Callable[[ModelConfig], list[Tensor]]
    embedding: str
    lm_head: str = "lm_head.weight"
    prefix: str = "model."
    ignored: tuple[str, ...] = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------


def config_from_hf(family: Family, hf_config: Mapping[str, Any], **changes: Any) -> ModelConfig:
    """The ``ModelConfig`` of ``hf_config`` (compute dtype float32); ``changes`` override
    jaxlm-only fields (e.g. ``dtype="bfloat16"``, ``remat="block"``)."""
    architectures = hf_config.get("architectures")
    if architectures is not None and list(architectures) != [family.architecture]:
        raise io.refuse("architectures", architectures, f"[{family.architecture!r}] for model_type {family.model_type!r}")
    fields = {**family.fields_from_hf(hf_config), "dtype": "float32", **changes}
    fields.setdefault("init_std", float(hf_config.get("initializer_range", 0.02)))
    try:
        return ModelConfig(**fields)
    except ConfigError as err:
        raise HFError(f"HF config maps to an invalid jaxlm config: {err}") from None


def check_representable(family: Family, config: ModelConfig) -> None:
    """Raise ``HFError`` naming each field ``family``'s HF config cannot express exactly:
    the exported ``config.json`` must read back as ``config``."""
    hf_config = family.config_to_hf(config)
    try:
        back = family.fields_from_hf(hf_config)
    except HFError as err:
        raise HFError(f"HF {family.architecture} cannot express this model exactly: {err}") from None
    wanted = {f.name: getattr(config, f.name) for f in dataclasses.fields(ModelConfig) if f.name not in JAXLM_ONLY_FIELDS}
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    got = {name: back.get(name, defaults[name]) for name in wanted}
    wrong = [name for name in wanted if got[name] != wanted[name]]
    if wrong:
        detail = "; ".join(f"model.{n} = {wanted[n]!r} (it has {got[n]!r})" for n in wrong)
        raise HFError(f"HF {family.architecture} cannot express this model exactly: {detail}")


def export_config(family: Family, config: ModelConfig, *, dtype: str = "float32",
                  token_ids: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` mapping of ``config`` as ``family``, with bos/eos/pad ids and the stored dtype."""
    check_representable(family, config)
    return {"architectures": [family.architecture], "model_type": family.model_type,
            **family.config_to_hf(config), "initializer_range": config.init_std, "use_cache": True,
            "dtype": dtype, **io.token_id_fields(config.vocab_size, token_ids)}


# ---------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------


def _expected(family: Family, config: ModelConfig) -> dict[str, tuple[Tensor, int | None]]:
    """HF tensor name -> (its table entry, layer or None)."""
    names: dict[str, tuple[Tensor, int | None]] = {}
    for tensor in family.tensors(config):
        if tensor.per_layer:
            for layer in range(config.n_layers):
                names[tensor.hf.replace(LAYER, str(layer))] = (tensor, layer)
        else:
            names[tensor.hf] = (tensor, None)
    return names


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _canonical_names(family: Family, files: dict[str, Path], expected: Mapping[str, Any]) -> dict[str, str]:
    """Stored name -> expected name: a bare base model's checkpoint lacks ``family.prefix``."""
    names = {}
    for name in files:
        if name not in expected and family.prefix and f"{family.prefix}{name}" in expected:
            names[name] = f"{family.prefix}{name}"
        else:
            names[name] = name
    return names


def load_weights(family: Family, config: ModelConfig, path: Path) -> dict:
    """float32 jaxlm params (numpy) of the checkpoint at ``path``; missing, unexpected or
    misshapen tensors raise ``HFError`` naming them."""
    from safetensors import safe_open
    from tqdm import tqdm

    files = io.weight_files(path)
    expected = _expected(family, config)
    canonical = _canonical_names(family, files, expected)
    stored = {canonical[name]: (name, file) for name, file in files.items()}
    tied_head = config.tie_embeddings and family.lm_head in stored
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(n for n in set(stored) - set(expected)
                        if not n.endswith(family.ignored) and not (tied_head and n == family.lm_head))
    if missing or unexpected:
        parts = [f"missing tensor(s): {', '.join(missing)}"] if missing else []
        parts += [f"unexpected tensor(s): {', '.join(unexpected)}"] if unexpected else []
        raise HFError(f"{path}: checkpoint does not match its config.json ({family.architecture}): {'; '.join(parts)}")

    params: dict[str, Any] = {}
    stacks: dict[str, np.ndarray] = {}
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(stored[name][1], []).append(name)
    with tqdm(total=len(expected), desc="load HF weights", unit="tensor", disable=config.num_params() < 50_000_000) as bar:
        for file, names in by_file.items():
            with safe_open(file, framework="numpy") as handle:
                for name in names:
                    tensor, layer = expected[name]
                    values = tensor.to_jaxlm(io.read_float_tensor(handle, file, stored[name][0], tensor.hf_shape))
                    for param, value in zip(tensor.params, values):
                        if layer is None:
                            _set(params, param, np.ascontiguousarray(value, np.float32))
                            continue
                        if param not in stacks:
                            stacks[param] = np.empty((config.n_layers, *value.shape), np.float32)
                        stacks[param][layer] = value
                    bar.update()
    for param, stack in stacks.items():
        _set(params, f"layers.{param}", stack)
    if tied_head:  # a redundant copy of the tied head is fine if it really is a copy
        name, file = stored[family.lm_head]
        with safe_open(file, framework="numpy") as handle:
            head = handle.get_tensor(name)
        if head.shape != params["embedding"].shape or not np.array_equal(head.astype(np.float32), params["embedding"]):
            raise HFError(f"{file}: {family.lm_head} differs from {family.embedding} but config.json has "
                          "tie_word_embeddings=true")
    return params


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def hf_tensors(family: Family, config: ModelConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The HF tensors (float32 numpy) of jaxlm ``params``; parameters the family has no tensor
    for (baked intervention biases) or missing/misshapen ones raise ``HFError``."""
    import jax

    from jaxlm.model import param_shapes

    expected = {name: tuple(s.shape) for name, s in _flatten(param_shapes(config)).items()}
    given = _flatten(params)
    unexpected = sorted(set(given) - set(expected))
    if unexpected:
        baked = any(name.endswith("_bias") for name in unexpected)
        hint = (f" (HF {family.architecture} has no such biases: export the unbaked params and apply the "
                "intervention at runtime)" if baked else "")
        raise HFError(f"params: {', '.join(unexpected)} cannot be represented in an HF {family.architecture} "
                      f"checkpoint{hint}")
    missing = sorted(set(expected) - set(given))
    if missing:
        raise HFError(f"params: missing {', '.join(missing)} for this config")
    for name, shape in expected.items():
        if tuple(np.shape(given[name])) != shape:
            raise HFError(f"params: {name} has shape {tuple(np.shape(given[name]))}, expected {shape}")

    host = {name: np.asarray(jax.device_get(value), np.float32) for name, value in given.items()}
    tensors = {}
    for tensor in family.tensors(config):
        if tensor.per_layer:
            for layer in range(config.n_layers):
                values = [host[f"layers.{p}"][layer] for p in tensor.params]
                tensors[tensor.hf.replace(LAYER, str(layer))] = tensor.to_hf(*values)
        else:
            tensors[tensor.hf] = tensor.to_hf(*[host[p] for p in tensor.params])
    return tensors


def save(family: Family, config: ModelConfig, params: Mapping[str, Any], path: str | os.PathLike, *,
         dtype: str = "float32", token_ids: Mapping[str, Any] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``<family.architecture>.from_pretrained`` loads."""
    hf_config = export_config(family, config, dtype=dtype, token_ids=token_ids)
    return io.write_checkpoint(path, hf_config, hf_tensors(family, config, params), dtype)
