"""Llama 2/3 (``LlamaForCausalLM``): pre-norm RMSNorm, SwiGLU, GQA, optional attention and
MLP biases, RoPE plain, linear or Llama 3.1 scaled (``rope_type: llama3``)."""

from __future__ import annotations

from typing import Any, Mapping

from jaxlm.config import ModelConfig
from jaxlm.hf import io, llama_like
from jaxlm.hf.family import Family


def fields_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    hf_full = {"attention_bias": False, "mlp_bias": False, **hf}
    bias = io.bool_field(hf_full, "attention_bias")
    return dict(llama_like.shape_fields(hf, 2048, False), norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                qkv_bias=bias, out_bias=bias, mlp_bias=io.bool_field(hf_full, "mlp_bias"))


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    return dict(llama_like.shape_to_hf(config), rms_norm_eps=config.norm_eps, attention_bias=config.qkv_bias,
                mlp_bias=config.mlp_bias, pretraining_tp=1)


FAMILY = Family("llama", "llama", "LlamaForCausalLM", fields_from_hf, config_to_hf, llama_like.tensors,
                embedding="model.embed_tokens.weight")
