"""Hugging Face interop: read and write HF checkpoints of common families without torch.

One module per family maps its ``config.json`` and tensor names onto ``ModelConfig`` and
jaxlm's parameter tree (``jaxlm.hf.family``); reading, writing and the checks are shared:

  =========  ======================  ==========================================================
  family     architecture            what it sets in ``ModelConfig``
  =========  ======================  ==========================================================
  olmo       OlmoForCausalLM         norm nonparametric (the default block)
  olmo2      Olmo2ForCausalLM        rmsnorm, norm_position post, qk_norm projection
  llama      LlamaForCausalLM        rmsnorm, GQA, rope_scaling linear / llama3, biases
  qwen2      Qwen2ForCausalLM        rmsnorm, qkv_bias
  qwen3      Qwen3ForCausalLM        rmsnorm, qk_norm head, head_dim
  gpt_neox   GPTNeoXForCausalLM      layernorm, rotary_dim, parallel_residual, gelu MLP, biases
  gpt2       GPT2LMHeadModel         layernorm, learned positions, gelu_tanh MLP, biases
  =========  ======================  ==========================================================

``load(dir)`` recognises the family from ``config.json`` (``model_type``, checked against
``architectures``); anything the family can express that jaxlm does not compute identically
(sliding windows, YaRN, clipped q/k/v, ...) is an ``HFError`` naming the field. ``save``
exports to any family that expresses the model exactly (its config reads back unchanged).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from jaxlm.config import ModelConfig
from jaxlm.hf import family as _family
from jaxlm.hf import gpt2, gpt_neox, llama, olmo, olmo2, qwen2, qwen3
from jaxlm.hf.family import Family
from jaxlm.hf.io import CONFIG_FILE, HFError, is_hf_checkpoint, read_hf_config, special_token_ids

FAMILIES: dict[str, Family] = {
    m.FAMILY.model_type: m.FAMILY for m in (olmo, olmo2, llama, qwen2, qwen3, gpt_neox, gpt2)
}


def family_of(hf_config: Mapping[str, Any]) -> Family:
    """The family of an HF ``config.json`` mapping (by ``model_type``)."""
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        architectures = hf_config.get("architectures")
        raise HFError(
            f"HF config: model_type {model_type!r} (architectures {architectures}) is not supported; "
            f"supported: {', '.join(f'{t} ({f.architecture})' for t, f in FAMILIES.items())}"
        )
    return FAMILIES[model_type]


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise HFError(f"unknown HF family {name!r}; valid families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def config_from_hf(hf_config: Mapping[str, Any], **changes: Any) -> ModelConfig:
    """The ``ModelConfig`` of an HF ``config.json`` mapping (compute dtype float32); ``changes``
    override jaxlm-only fields (e.g. ``dtype="bfloat16"``, ``remat="block"``)."""
    return _family.config_from_hf(family_of(hf_config), hf_config, **changes)


def config_to_hf(config: ModelConfig, family: str = "olmo", *, dtype: str = "float32",
                 token_ids: Mapping[str, Any] | None = None) -> dict:
    """The HF ``config.json`` mapping of ``config`` as ``family``; ``HFError`` naming each field
    that family cannot express; ``token_ids`` sets bos/eos/pad ids (default null)."""
    return _family.export_config(get_family(family), config, dtype=dtype, token_ids=token_ids)


def check_hf_representable(config: ModelConfig, family: str = "olmo") -> None:
    """Raise ``HFError`` naming the fields ``family`` cannot express exactly."""
    _family.check_representable(get_family(family), config)


def with_baked_output_bias(config: ModelConfig, params: Mapping[str, Any], family: str) -> tuple[ModelConfig, dict]:
    """(config, params) in which a baked ``attention.out_bias`` (``jaxlm.intervene.bake_into_params``
    of a ``head_out`` edit) is the model's own output-projection bias, so ``family`` can store it.

    Families with one switch for all attention biases (Llama, OLMo, OLMo-2, Qwen3) get zero q/k/v
    biases alongside; the model computes the same function. A family without an output bias
    (Qwen2) keeps the config, and ``save`` names the bias it cannot store.
    """
    import dataclasses

    import jax.numpy as jnp

    attention = params["layers"]["attention"]
    if config.out_bias or "out_bias" not in attention:
        return config, dict(params)
    fam = get_family(family)
    for qkv in (False, True):
        candidate = dataclasses.replace(config, out_bias=True, qkv_bias=config.qkv_bias or qkv)
        try:
            _family.check_representable(fam, candidate)
        except HFError:
            continue
        attention = dict(attention)
        if candidate.qkv_bias and not config.qkv_bias:
            heads = {"q": config.n_heads, "k": config.resolved_kv_heads, "v": config.resolved_kv_heads}
            for name, n in heads.items():
                attention[f"{name}_bias"] = jnp.zeros((config.n_layers, n, config.resolved_head_dim), jnp.float32)
        return candidate, {**params, "layers": {**params["layers"], "attention": attention}}
    return config, dict(params)


def load(path: str | os.PathLike, *, mesh: Any = None, **changes: Any) -> tuple[ModelConfig, dict]:
    """Read an HF checkpoint directory of any supported family as (``ModelConfig``, float32 params).

    No torch needed: tensors are read with safetensors' numpy API (bf16/fp16 are upcast).
    ``changes`` override jaxlm-only config fields (see ``config_from_hf``). ``mesh`` (a
    ``jax.sharding.Mesh``): each tensor goes straight from host memory into its training
    sharding on it (``jaxlm.sharding.param_shardings``); None: the default device.
    """
    import jax

    from jaxlm import sharding

    path = Path(path)
    fam, config = _read_config(path, changes)
    shardings = None if mesh is None else sharding.param_shardings(config, mesh)  # a misfit mesh fails before the read
    params = _family.load_weights(fam, config, path)
    if shardings is None:
        return config, jax.tree.map(jax.numpy.asarray, params)
    return config, sharding.shard(params, shardings)


def load_config(path: str | os.PathLike, **changes: Any) -> ModelConfig:
    """The ``ModelConfig`` of an HF checkpoint directory (its ``config.json``), errors naming the file."""
    return _read_config(Path(path), changes)[1]


def _read_config(path: Path, changes: Mapping[str, Any]) -> tuple[Family, ModelConfig]:
    hf_config = read_hf_config(path)
    try:
        fam = family_of(hf_config)
        return fam, _family.config_from_hf(fam, hf_config, **changes)
    except HFError as err:
        raise HFError(f"{path / CONFIG_FILE}: {err}") from None


def save(config: ModelConfig, params: Mapping[str, Any], path: str | os.PathLike, *, family: str = "olmo",
         dtype: str = "float32", token_ids: Mapping[str, Any] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that the family's HF class ``from_pretrained`` loads.

    ``dtype`` is the stored tensor type (float32, bfloat16 or float16); ``token_ids`` sets
    bos/eos/pad ids in config.json. A tied embedding writes no LM head tensor (HF ties it).
    """
    return _family.save(get_family(family), config, params, path, dtype=dtype, token_ids=token_ids)


__all__ = [
    "FAMILIES",
    "Family",
    "HFError",
    "check_hf_representable",
    "config_from_hf",
    "config_to_hf",
    "family_of",
    "get_family",
    "is_hf_checkpoint",
    "load",
    "load_config",
    "read_hf_config",
    "save",
    "special_token_ids",
    "with_baked_output_bias",
]
