"""Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``): Llama blocks with biases on q/k/v (none on the
output projection); full attention only (a sliding window is refused)."""

from __future__ import annotations

from typing import Any, Mapping

from jaxlm.config import ModelConfig
from jaxlm.hf import llama_like
from jaxlm.hf.family import Family


def fields_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    llama_like.refuse_sliding_window(hf)
    return dict(llama_like.shape_fields(hf, 32768, False), norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                qkv_bias=True)


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    return dict(llama_like.shape_to_hf(config), rms_norm_eps=config.norm_eps, use_sliding_window=False)


FAMILY = Family("qwen2", "qwen2", "Qwen2ForCausalLM", fields_from_hf, config_to_hf, llama_like.tensors,
                embedding="model.embed_tokens.weight")
