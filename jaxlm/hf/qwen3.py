"""Qwen3 (``Qwen3ForCausalLM``): Llama blocks with RMSNorm of q and k per head (one scale
shared by the heads, ``qk_norm="head"``), an explicit ``head_dim``, optional q/k/v/o biases;
full attention only."""

from __future__ import annotations

from typing import Any, Mapping

from jaxlm.config import ModelConfig
from jaxlm.hf import io, llama_like
from jaxlm.hf.family import Family


def fields_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    llama_like.refuse_sliding_window(hf)
    bias = io.bool_field({"attention_bias": False, **hf}, "attention_bias")
    return dict(llama_like.shape_fields(hf, 32768, False), norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                qk_norm="head", qkv_bias=bias, out_bias=bias)


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    return dict(llama_like.shape_to_hf(config), rms_norm_eps=config.norm_eps, attention_bias=config.qkv_bias,
                use_sliding_window=False)


FAMILY = Family("qwen3", "qwen3", "Qwen3ForCausalLM", fields_from_hf, config_to_hf, llama_like.tensors,
                embedding="model.embed_tokens.weight")
