"""OLMo-2 (``Olmo2ForCausalLM``): post-norm blocks (RMSNorm of each sublayer's output before
its residual add, no input norms), RMSNorm of q and k over each projection's whole output
(``qk_norm="projection"``), SwiGLU, optional q/k/v/o biases."""

from __future__ import annotations

from typing import Any, Mapping

from jaxlm.config import ModelConfig
from jaxlm.hf import io, llama_like
from jaxlm.hf.family import Family


def fields_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    bias = io.bool_field({"attention_bias": False, **hf}, "attention_bias")
    return dict(llama_like.shape_fields(hf, 2048, False), norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                norm_position="post", qk_norm="projection", qkv_bias=bias, out_bias=bias)


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    return dict(llama_like.shape_to_hf(config), rms_norm_eps=config.norm_eps, attention_bias=config.qkv_bias)


FAMILY = Family("olmo2", "olmo2", "Olmo2ForCausalLM", fields_from_hf, config_to_hf, llama_like.tensors,
                embedding="model.embed_tokens.weight")
