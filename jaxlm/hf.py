"""Hugging Face interop: read and write ``OlmoForCausalLM`` checkpoints without torch.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards
``model-XXXXX-of-YYYYY.safetensors`` listed in ``model.safetensors.index.json``.

HF OLMo (transformers ``modeling_olmo.py``) computes exactly jaxlm's ``norm="nonparametric"``
block: ``F.layer_norm(x.float(), no weight, no bias, eps=1e-5)`` before attention, before the
MLP and at the end; half-split RoPE (``rotate_half``) with ``inv_freq = theta^(-2i/D)``;
SwiGLU ``down(silu(gate(x)) * up(x))``; no biases; query head ``h`` reads key/value head
``h // (H / H_kv)``. Only the weight layout differs: torch ``Linear`` weights are
``[out, in]`` with heads flattened head-major, jaxlm stacks layers on a leading axis:

  ==========================================  =================================
  HF tensor                                   jaxlm parameter
  ==========================================  =================================
  model.embed_tokens.weight [V, d]            embedding [V, d]
  model.layers.N.self_attn.q_proj [H*D, d]    layers.attention.q [L, d, H, D]
  model.layers.N.self_attn.k_proj [Hkv*D, d]  layers.attention.k [L, d, Hkv, D]
  model.layers.N.self_attn.v_proj [Hkv*D, d]  layers.attention.v [L, d, Hkv, D]
  model.layers.N.self_attn.o_proj [d, H*D]    layers.attention.out [L, H, D, d]
  model.layers.N.mlp.gate_proj [F, d]         layers.mlp.gate [L, d, F]
  model.layers.N.mlp.up_proj [F, d]           layers.mlp.up [L, d, F]
  model.layers.N.mlp.down_proj [d, F]         layers.mlp.down [L, F, d]
  lm_head.weight [V, d] (untied only)         lm_head [d, V]
  ==========================================  =================================
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jaxlm.config import ConfigError, ModelConfig

ARCHITECTURE = "OlmoForCausalLM"
MODEL_TYPE = "olmo"
OLMO_NORM_EPS = 1e-5  # hard-coded in transformers' OlmoLayerNorm
CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SPECIAL_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
SAVE_DTYPES = ("float32", "bfloat16", "float16")
_FLOAT_DTYPES = ("float64", "float32", "bfloat16", "float16")

# OlmoConfig's defaults for fields a config.json may leave out (HF applies the same ones).
_HF_DEFAULTS = {
    "num_key_value_heads": None,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "clip_qkv": None,
    "rope_scaling": None,
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_DEFAULT_ROPE_THETA = 10000.0

# Per-layer HF tensors: (name suffix, jaxlm group, jaxlm name).
_LAYER_TENSORS = (
    ("self_attn.q_proj.weight", "attention", "q"),
    ("self_attn.k_proj.weight", "attention", "k"),
    ("self_attn.v_proj.weight", "attention", "v"),
    ("self_attn.o_proj.weight", "attention", "out"),
    ("mlp.gate_proj.weight", "mlp", "gate"),
    ("mlp.up_proj.weight", "mlp", "up"),
    ("mlp.down_proj.weight", "mlp", "down"),
)
_EMBED = "model.embed_tokens.weight"
_LM_HEAD = "lm_head.weight"


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------


def _refuse(field: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"HF config field {field!r} = {value!r} is not supported by jaxlm: expected {expected}")


def _int_field(hf: Mapping[str, Any], key: str) -> int:
    value = hf[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"HF config field {key!r}: expected an integer, got {value!r}")
    return value


def _rope_theta(hf: Mapping[str, Any]) -> float:
    """RoPE base from ``rope_parameters`` (transformers 5) or legacy ``rope_theta``/``rope_scaling``."""
    if hf.get("rope_scaling") is not None:
        raise _refuse("rope_scaling", hf["rope_scaling"], "null (plain RoPE)")
    legacy = hf.get("rope_theta")
    params = hf.get("rope_parameters")
    if params is None:
        return float(legacy) if legacy is not None else _DEFAULT_ROPE_THETA
    if not isinstance(params, Mapping):
        raise _refuse("rope_parameters", params, "a mapping")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise _refuse("rope_parameters.rope_type", rope_type, "'default' (plain RoPE)")
    extra = sorted(set(params) - {"rope_type", "type", "rope_theta"})
    if extra:
        raise _refuse(f"rope_parameters.{extra[0]}", params[extra[0]], "absent (only rope_type and rope_theta)")
    theta = params.get("rope_theta", legacy if legacy is not None else _DEFAULT_ROPE_THETA)
    if legacy is not None and float(legacy) != float(theta):
        raise ValueError(f"HF config: rope_theta ({legacy}) disagrees with rope_parameters.rope_theta ({theta})")
    return float(theta)


def config_from_hf(hf_config: Mapping[str, Any], **changes: Any) -> ModelConfig:
    """The ``ModelConfig`` of an HF ``OlmoForCausalLM`` ``config.json`` (compute dtype float32).

    ``changes`` override jaxlm-only fields (e.g. ``dtype="bfloat16"``, ``remat="block"``).
    Anything HF OLMo can express but jaxlm does not compute identically is refused with a
    ``ValueError`` naming the field and its value.
    """
    hf = {**_HF_DEFAULTS, **hf_config}
    if hf.get("model_type") != MODEL_TYPE:
        raise _refuse("model_type", hf.get("model_type"), f"{MODEL_TYPE!r}")
    architectures = hf.get("architectures")
    if architectures is not None and list(architectures) != [ARCHITECTURE]:
        raise _refuse("architectures", architectures, f"[{ARCHITECTURE!r}]")
    missing = [key for key in _REQUIRED if key not in hf_config]
    if missing:
        raise ValueError(f"HF config: missing required field(s) {', '.join(missing)}")
    if hf["hidden_act"] != "silu":
        raise _refuse("hidden_act", hf["hidden_act"], "'silu' (SwiGLU MLP)")
    if hf["attention_bias"]:
        raise _refuse("attention_bias", hf["attention_bias"], "false (jaxlm has no attention biases)")
    if hf["clip_qkv"] is not None:
        raise _refuse("clip_qkv", hf["clip_qkv"], "null (jaxlm does not clip q/k/v)")
    if not isinstance(hf["tie_word_embeddings"], bool):
        raise _refuse("tie_word_embeddings", hf["tie_word_embeddings"], "true or false")

    d_model, n_heads = _int_field(hf, "hidden_size"), _int_field(hf, "num_attention_heads")
    head_dim = hf.get("head_dim")
    if head_dim is not None:
        head_dim = _int_field(hf, "head_dim")
        if head_dim == d_model // n_heads and d_model % n_heads == 0:
            head_dim = None  # the derived value: keep the config canonical
    elif n_heads <= 0 or d_model % n_heads:
        raise _refuse("num_attention_heads", n_heads, f"a divisor of hidden_size ({d_model}) when head_dim is absent")
    n_kv = hf["num_key_value_heads"]
    if n_kv is not None:
        n_kv = _int_field(hf, "num_key_value_heads")
        if n_kv == n_heads:
            n_kv = None

    fields = dict(
        vocab_size=_int_field(hf, "vocab_size"),
        d_model=d_model,
        n_layers=_int_field(hf, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        mlp_hidden=_int_field(hf, "intermediate_size"),
        max_seq_len=_int_field(hf, "max_position_embeddings"),
        rope_theta=_rope_theta(hf),
        position_embedding="rope",
        norm="nonparametric",
        norm_eps=OLMO_NORM_EPS,
        tie_embeddings=hf["tie_word_embeddings"],
        init_std=float(hf["initializer_range"]),
        dtype="float32",
    )
    fields.update(changes)
    try:
        return ModelConfig(**fields)
    except ConfigError as err:
        raise ValueError(f"HF config maps to an invalid jaxlm config: {err}") from None


def special_token_ids(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """``bos_token_id``/``eos_token_id``/``pad_token_id`` of an HF config (None where absent)."""
    return {key: hf_config.get(key) for key in SPECIAL_TOKEN_KEYS}


def check_hf_representable(config: ModelConfig) -> None:
    """Raise ``ValueError`` naming the field if HF ``OlmoForCausalLM`` cannot compute ``config``."""
    if config.norm != "nonparametric":
        raise ValueError(f"model.norm = {config.norm!r}: HF OLMo only has the non-parametric LayerNorm ('nonparametric')")
    if config.norm_eps != OLMO_NORM_EPS:
        raise ValueError(f"model.norm_eps = {config.norm_eps}: HF OLMo's LayerNorm eps is fixed at {OLMO_NORM_EPS}")
    if config.position_embedding != "rope":
        raise ValueError(f"model.position_embedding = {config.position_embedding!r}: HF OLMo only has RoPE ('rope')")


def config_to_hf(config: ModelConfig, *, dtype: str = "float32", token_ids: Mapping[str, Any] | None = None) -> dict:
    """The HF ``config.json`` mapping of ``config``; ``token_ids`` sets bos/eos/pad ids (default null)."""
    check_hf_representable(config)
    ids = {key: None for key in SPECIAL_TOKEN_KEYS}
    for key, value in (token_ids or {}).items():
        if key not in ids:
            raise ValueError(f"token_ids: unknown key {key!r}; valid keys: {', '.join(SPECIAL_TOKEN_KEYS)}")
        if value is not None and not 0 <= value < config.vocab_size:
            raise ValueError(f"token_ids.{key} = {value}: expected an id in [0, {config.vocab_size})")
        ids[key] = value
    hf = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.resolved_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "initializer_range": config.init_std,
        # rope_parameters is transformers 5's field; rope_theta/rope_scaling keep 4.x readers right.
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "clip_qkv": None,
        "tie_word_embeddings": config.tie_embeddings,
        "use_cache": True,
        "dtype": dtype,
        **ids,
    }
    if config.head_dim is not None and config.head_dim * config.n_heads != config.d_model:
        hf["head_dim"] = config.head_dim
    return hf


# ---------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------


def _expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, f, v = config.d_model, config.mlp_hidden, config.vocab_size
    h, kv, hd = config.n_heads, config.resolved_kv_heads, config.resolved_head_dim
    per_layer = {
        "self_attn.q_proj.weight": (h * hd, d),
        "self_attn.k_proj.weight": (kv * hd, d),
        "self_attn.v_proj.weight": (kv * hd, d),
        "self_attn.o_proj.weight": (d, h * hd),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
    }
    shapes = {_EMBED: (v, d)}
    for layer in range(config.n_layers):
        for suffix, shape in per_layer.items():
            shapes[f"model.layers.{layer}.{suffix}"] = shape
    if not config.tie_embeddings:
        shapes[_LM_HEAD] = (v, d)
    return shapes


def _to_jaxlm(suffix: str, weight: np.ndarray, config: ModelConfig) -> np.ndarray:
    """One layer's HF ``[out, in]`` weight in jaxlm's per-layer layout."""
    d, h, kv, hd = config.d_model, config.n_heads, config.resolved_kv_heads, config.resolved_head_dim
    if suffix == "self_attn.q_proj.weight":
        return weight.T.reshape(d, h, hd)
    if suffix in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
        return weight.T.reshape(d, kv, hd)
    if suffix == "self_attn.o_proj.weight":
        return weight.T.reshape(h, hd, d)
    return weight.T  # gate/up [F, d] -> [d, F]; down [d, F] -> [F, d]


def _to_hf(suffix: str, weight: np.ndarray) -> np.ndarray:
    """Inverse of ``_to_jaxlm`` for one layer."""
    if suffix == "self_attn.o_proj.weight":
        h, hd, d = weight.shape
        return weight.reshape(h * hd, d).T
    if weight.ndim == 3:  # q/k/v [d, H, D]
        d, heads, hd = weight.shape
        return weight.reshape(d, heads * hd).T
    return weight.T


def read_hf_config(path: str | os.PathLike) -> dict:
    """``config.json`` of a checkpoint directory, with errors naming the file."""
    file = Path(path) / CONFIG_FILE
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: no HF config (expected an OlmoForCausalLM checkpoint directory)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: invalid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _weight_files(path: Path) -> dict[str, Path]:
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
        raise ValueError(f"{index}: expected a JSON object with a 'weight_map' ({err!r})") from None
    files = {name: path / shard for name, shard in weight_map.items()}
    absent = sorted({str(p.name) for p in files.values() if not p.exists()})
    if absent:
        raise FileNotFoundError(f"{index}: shard(s) listed but missing: {', '.join(absent)}")
    return files


def _ignorable(name: str) -> bool:
    # Older transformers versions saved RoPE's (deterministic, recomputed) frequency buffer.
    return name.endswith("rotary_emb.inv_freq")


def load_olmo(path: str | os.PathLike, **changes: Any) -> tuple[ModelConfig, dict]:
    """Read an HF ``OlmoForCausalLM`` checkpoint directory as (``ModelConfig``, float32 params).

    No torch needed: tensors are read with safetensors' numpy API (bf16/fp16 are upcast).
    ``changes`` override jaxlm-only config fields (see ``config_from_hf``). Missing,
    unexpected or misshapen tensors raise ``ValueError`` naming them.
    """
    import jax
    from safetensors import safe_open
    from tqdm import tqdm

    path = Path(path)
    config = config_from_hf(read_hf_config(path), **changes)
    files = _weight_files(path)
    expected = _expected_hf_shapes(config)
    tied_head = config.tie_embeddings and _LM_HEAD in files
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(n for n in set(files) - set(expected) if not _ignorable(n) and not (tied_head and n == _LM_HEAD))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensor(s): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected tensor(s): {', '.join(unexpected)}")
        raise ValueError(f"{path}: checkpoint does not match its config.json: {'; '.join(parts)}")

    n_layers = config.n_layers
    stacked = {
        group: {name: None for s, g, name in _LAYER_TENSORS if g == group} for group in ("attention", "mlp")
    }
    params: dict[str, Any] = {"layers": stacked}
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)

    with tqdm(total=len(expected), desc="load HF weights", unit="tensor", disable=config.num_params() < 50_000_000) as bar:
        for file, names in by_file.items():
            with safe_open(file, framework="numpy") as f:
                for name in names:
                    tensor = f.get_tensor(name)
                    if tuple(tensor.shape) != expected[name]:
                        raise ValueError(
                            f"{file}: tensor {name} has shape {tuple(tensor.shape)}, "
                            f"expected {expected[name]} from config.json"
                        )
                    if str(tensor.dtype) not in _FLOAT_DTYPES:
                        raise ValueError(f"{file}: tensor {name} has dtype {tensor.dtype}, expected a float type")
                    tensor = tensor.astype(np.float32)
                    if name == _EMBED:
                        params["embedding"] = tensor
                    elif name == _LM_HEAD:
                        params["lm_head"] = np.ascontiguousarray(tensor.T)
                    else:
                        layer_str, suffix = name[len("model.layers.") :].split(".", 1)
                        group, key = next((g, k) for s, g, k in _LAYER_TENSORS if s == suffix)
                        value = _to_jaxlm(suffix, tensor, config)
                        if stacked[group][key] is None:
                            stacked[group][key] = np.empty((n_layers, *value.shape), np.float32)
                        stacked[group][key][int(layer_str)] = value
                    bar.update()
    if tied_head:  # a redundant copy of the tied head is fine if it really is a copy
        _check_tied_copy(files[_LM_HEAD], params["embedding"])
    return config, jax.tree.map(jax.numpy.asarray, params)


def _check_tied_copy(file: Path, embedding: np.ndarray) -> None:
    from safetensors import safe_open

    with safe_open(file, framework="numpy") as f:
        head = f.get_tensor(_LM_HEAD)
    if head.shape != embedding.shape or not np.array_equal(head.astype(np.float32), embedding):
        raise ValueError(f"{file}: {_LM_HEAD} differs from {_EMBED} but config.json has tie_word_embeddings=true")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def save_olmo(
    config: ModelConfig,
    params: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    token_ids: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``OlmoForCausalLM.from_pretrained`` loads.

    ``dtype`` is the stored tensor type (float32, bfloat16 or float16); ``token_ids`` sets
    bos/eos/pad ids in config.json. Tied embeddings write no ``lm_head.weight`` (HF ties it).
    """
    import jax
    import ml_dtypes
    from safetensors.numpy import save_file

    from jaxlm.model import param_shapes

    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype = {dtype!r}: expected one of {', '.join(SAVE_DTYPES)}")
    hf_config = config_to_hf(config, dtype=dtype, token_ids=token_ids)
    expected = {name: tuple(s.shape) for name, s in _flatten(param_shapes(config)).items()}
    given = _flatten(params)
    unexpected = sorted(set(given) - set(expected))
    if unexpected:
        baked = [name for name in unexpected if name.endswith("_bias")]
        hint = (" (HF OLMo has no biases: export the unbaked params and apply the intervention at runtime)"
                if baked else "")
        raise ValueError(f"params: {', '.join(unexpected)} cannot be represented in an HF OLMo checkpoint{hint}")
    missing = sorted(set(expected) - set(given))
    if missing:
        raise ValueError(f"params: missing {', '.join(missing)} for this config")
    for name, shape in expected.items():
        if tuple(np.shape(given[name])) != shape:
            raise ValueError(f"params: {name} has shape {tuple(np.shape(given[name]))}, expected {shape}")

    store_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]

    def host(name: str) -> np.ndarray:
        return np.asarray(jax.device_get(given[name]), np.float32)

    tensors = {_EMBED: host("embedding")}
    for suffix, group, key in _LAYER_TENSORS:
        stacked = host(f"layers.{group}.{key}")
        for layer in range(config.n_layers):
            tensors[f"model.layers.{layer}.{suffix}"] = _to_hf(suffix, stacked[layer])
    if not config.tie_embeddings:
        tensors[_LM_HEAD] = host("lm_head").T
    tensors = {name: np.ascontiguousarray(t.astype(store_dtype)) for name, t in tensors.items()}

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / SINGLE_FILE, metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    return path


__all__ = [
    "config_from_hf",
    "config_to_hf",
    "check_hf_representable",
    "load_olmo",
    "read_hf_config",
    "save_olmo",
    "special_token_ids",
]
