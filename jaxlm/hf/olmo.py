"""OLMo-1 (``OlmoForCausalLM``): pre-norm with LayerNorm without scale or bias (eps fixed at
1e-5 in transformers' ``OlmoLayerNorm``), SwiGLU, optional q/k/v/o biases; no norm tensors."""

from __future__ import annotations

from typing import Any, Mapping

from jaxlm.config import ModelConfig
from jaxlm.hf import io, llama_like
from jaxlm.hf.family import Family

NORM_EPS = 1e-5


def fields_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    if hf.get("clip_qkv") is not None:
        raise io.refuse("clip_qkv", hf["clip_qkv"], "null (jaxlm does not clip q/k/v)")
    bias = io.bool_field({"attention_bias": False, **hf}, "attention_bias")
    return dict(llama_like.shape_fields(hf, 2048, False), norm="nonparametric", norm_eps=NORM_EPS,
                qkv_bias=bias, out_bias=bias)


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    return dict(llama_like.shape_to_hf(config), attention_bias=config.qkv_bias, clip_qkv=None)


FAMILY = Family("olmo", "olmo", "OlmoForCausalLM", fields_from_hf, config_to_hf, llama_like.tensors,
                embedding="model.embed_tokens.weight")
