"""Shared HF checkpoint IO: ``config.json``, safetensors files (single or sharded), config fields.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards
``model-XXXXX-of-YYYYY.safetensors`` listed in ``model.safetensors.index.json``. Tensors are
read with safetensors' numpy API (no torch); bf16/fp16 are upcast to float32.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jaxlm.errors import JaxlmError

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SPECIAL_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
SAVE_DTYPES = ("float32", "bfloat16", "float16")
FLOAT_DTYPES = ("float64", "float32", "bfloat16", "float16")
DEFAULT_ROPE_THETA = 10000.0


class HFError(JaxlmError, ValueError):
    """An HF checkpoint or config that jaxlm cannot read or write exactly; the message names the field."""


def refuse(field: str, value: Any, expected: str) -> HFError:
    return HFError(f"HF config field {field!r} = {value!r} is not supported by jaxlm: expected {expected}")


def int_field(hf: Mapping[str, Any], key: str) -> int:
    value = hf[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise HFError(f"HF config field {key!r}: expected an integer, got {value!r}")
    return value


def require(hf: Mapping[str, Any], keys: tuple[str, ...]) -> None:
    missing = [key for key in keys if key not in hf]
    if missing:
        raise HFError(f"HF config: missing required field(s) {', '.join(missing)}")


def bool_field(hf: Mapping[str, Any], key: str) -> bool:
    if not isinstance(hf[key], bool):
        raise refuse(key, hf[key], "true or false")
    return hf[key]


# HF activation names -> ModelConfig.mlp_activation (the two tanh names are the same function).
ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def activation_field(hf: Mapping[str, Any], key: str, default: str, allowed: tuple[str, ...] = tuple(ACTIVATIONS)) -> str:
    """``ModelConfig.mlp_activation`` of ``hf[key]`` (``default`` when absent), one of the HF names ``allowed``."""
    name = hf.get(key, default)
    if name not in allowed:
        raise refuse(key, name, f"one of {', '.join(allowed)}")
    return ACTIVATIONS[name]


def head_dim_field(hf: Mapping[str, Any], d_model: int, n_heads: int) -> int | None:
    """``head_dim`` as a ``ModelConfig`` field: None when absent or equal to d_model / heads."""
    head_dim = hf.get("head_dim")
    if head_dim is not None:
        head_dim = int_field(hf, "head_dim")
        return None if head_dim * n_heads == d_model else head_dim
    if n_heads <= 0 or d_model % n_heads:
        raise refuse("num_attention_heads", n_heads, f"a divisor of hidden_size ({d_model}) when head_dim is absent")
    return None


def kv_heads_field(hf: Mapping[str, Any], n_heads: int) -> int | None:
    n_kv = hf.get("num_key_value_heads")
    if n_kv is None:
        return None
    n_kv = int_field(hf, "num_key_value_heads")
    return None if n_kv == n_heads else n_kv


_ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}
_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}


def rope_fields(hf: Mapping[str, Any], *, theta_key: str = "rope_theta", partial: bool = False) -> dict[str, Any]:
    """``ModelConfig`` RoPE fields from ``rope_parameters`` (transformers 5) or the legacy
    ``rope_theta`` / ``rope_scaling`` (4.x); ``partial`` allows ``partial_rotary_factor``
    (returned as ``rotary_fraction``, which the family turns into ``rotary_dim``).

    Types jaxlm computes exactly: default, linear, llama3; others (dynamic, yarn, longrope)
    are refused with the field named.
    """
    legacy_theta = hf.get(theta_key)
    scaling, params = hf.get("rope_scaling"), hf.get("rope_parameters")
    if params is None:
        params = dict(scaling) if isinstance(scaling, Mapping) else {}
        if scaling is not None and not isinstance(scaling, Mapping):
            raise refuse("rope_scaling", scaling, "a mapping or null")
        where = "rope_scaling"
    else:
        if not isinstance(params, Mapping):
            raise refuse("rope_parameters", params, "a mapping")
        where = "rope_parameters"
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise refuse(f"{where}.rope_type", rope_type, f"one of {', '.join(_ROPE_TYPES)} (RoPE types jaxlm computes)")
    allowed = {"rope_type", "type", "rope_theta"} | _ROPE_KEYS[rope_type] | ({"partial_rotary_factor"} if partial else set())
    extra = sorted(set(params) - allowed)
    if extra:
        raise refuse(f"{where}.{extra[0]}", params[extra[0]], f"absent for rope_type {rope_type!r}")
    missing = sorted(_ROPE_KEYS[rope_type] - set(params))
    if missing:
        raise HFError(f"HF config: {where} of rope_type {rope_type!r} lacks {', '.join(missing)}")
    theta = params.get("rope_theta", legacy_theta if legacy_theta is not None else DEFAULT_ROPE_THETA)
    if legacy_theta is not None and float(legacy_theta) != float(theta):
        raise HFError(f"HF config: {theta_key} ({legacy_theta}) disagrees with {where}.rope_theta ({theta})")
    fields: dict[str, Any] = {"rope_theta": float(theta), "rope_scaling": _ROPE_TYPES[rope_type]}
    if rope_type != "default":
        fields["rope_scaling_factor"] = float(params["factor"])
    if rope_type == "llama3":
        fields.update(rope_low_freq_factor=float(params["low_freq_factor"]),
                      rope_high_freq_factor=float(params["high_freq_factor"]),
                      rope_original_max_len=int(params["original_max_position_embeddings"]))
    if partial and "partial_rotary_factor" in params:
        fields["rotary_fraction"] = float(params["partial_rotary_factor"])
    return fields


def rope_to_hf(config: Any, **extra: Any) -> dict[str, Any]:
    """``rope_parameters`` (transformers 5) of ``config``, plus ``extra`` keys."""
    params: dict[str, Any] = {"rope_type": "default" if config.rope_scaling == "none" else config.rope_scaling,
                              "rope_theta": config.rope_theta, **extra}
    if config.rope_scaling != "none":
        params["factor"] = config.rope_scaling_factor
    if config.rope_scaling == "llama3":
        params.update(low_freq_factor=config.rope_low_freq_factor, high_freq_factor=config.rope_high_freq_factor,
                      original_max_position_embeddings=config.rope_original_max_len)
    return params


def special_token_ids(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """``bos_token_id``/``eos_token_id``/``pad_token_id`` of an HF config (None where absent)."""
    return {key: hf_config.get(key) for key in SPECIAL_TOKEN_KEYS}


def token_id_fields(vocab_size: int, token_ids: Mapping[str, Any] | None) -> dict[str, Any]:
    """bos/eos/pad ids for a written ``config.json`` (null unless given), each checked against the vocabulary."""
    ids = {key: None for key in SPECIAL_TOKEN_KEYS}
    for key, value in (token_ids or {}).items():
        if key not in ids:
            raise HFError(f"token_ids: unknown key {key!r}; valid keys: {', '.join(SPECIAL_TOKEN_KEYS)}")
        if value is not None and not 0 <= value < vocab_size:
            raise HFError(f"token_ids.{key} = {value}: expected an id in [0, {vocab_size})")
        ids[key] = value
    return ids


def read_hf_config(path: str | os.PathLike) -> dict:
    """``config.json`` of a checkpoint directory, with errors naming the file."""
    file = Path(path) / CONFIG_FILE
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: no HF config (expected an HF checkpoint directory)") from None
    except json.JSONDecodeError as err:
        raise HFError(f"{file}: invalid JSON ({err})") from None
    if not isinstance(data, dict):
        raise HFError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def is_hf_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).exists() and ((path / SINGLE_FILE).exists() or (path / INDEX_FILE).exists())


def weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it (single file, or the shard index)."""
    from safetensors import safe_open

    single, index = path / SINGLE_FILE, path / INDEX_FILE
    if single.exists():
        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    if not index.exists():
        present = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        raise FileNotFoundError(
            f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are supported); "
            f"found: {', '.join(present) or 'nothing'}"
        )
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise HFError(f"{index}: expected a JSON object with a 'weight_map' ({err!r})") from None
    files = {name: path / shard for name, shard in weight_map.items()}
    absent = sorted({str(p.name) for p in files.values() if not p.exists()})
    if absent:
        raise FileNotFoundError(f"{index}: shard(s) listed but missing: {', '.join(absent)}")
    return files


def read_float_tensor(handle: Any, file: Path, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """One tensor as float32, checked against the shape ``config.json`` implies."""
    tensor = handle.get_tensor(name)
    if tuple(tensor.shape) != shape:
        raise HFError(f"{file}: tensor {name} has shape {tuple(tensor.shape)}, expected {shape} from config.json")
    if str(tensor.dtype) not in FLOAT_DTYPES:
        raise HFError(f"{file}: tensor {name} has dtype {tensor.dtype}, expected a float type")
    return tensor.astype(np.float32)


def write_checkpoint(path: str | os.PathLike, hf_config: dict, tensors: Mapping[str, np.ndarray], dtype: str) -> Path:
    """``config.json`` + ``model.safetensors`` (tensors stored as ``dtype``)."""
    import ml_dtypes
    from safetensors.numpy import save_file

    if dtype not in SAVE_DTYPES:
        raise HFError(f"dtype = {dtype!r}: expected one of {', '.join(SAVE_DTYPES)}")
    store = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({name: np.ascontiguousarray(t.astype(store)) for name, t in tensors.items()}, path / SINGLE_FILE,
              metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    return path
