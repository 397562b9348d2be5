"""GPT-2 (``GPT2LMHeadModel``): learned positions, LayerNorm with bias, a GELU (tanh) MLP and
biases everywhere, stored as ``Conv1D`` weights ``[in, out]`` with a fused q/k/v projection.

  ==============================================  ==========================================
  HF tensor (``Conv1D``: ``[in, out]``)           jaxlm parameter
  ==============================================  ==========================================
  transformer.wte.weight [V, d]                   embedding (tied with the LM head)
  transformer.wpe.weight [P, d]                   position_embedding [P, d]
  transformer.h.N.attn.c_attn [d, 3d] (+bias)     layers.attention.q / k / v [L, d, H, D] (+biases)
  ...attn.c_proj [d, d] (+bias)                   layers.attention.out [L, H, D, d] (out_bias)
  ...mlp.c_fc [d, F] / mlp.c_proj [F, d] (+bias)  layers.mlp.up [L, d, F] / down [L, F, d]
  ...ln_1 / ln_2 (weight, bias)                   layers.attention_norm / mlp_norm (scale, bias)
  transformer.ln_f                                final_norm
  ==============================================  ==========================================
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.hf import io
from jaxlm.hf.family import Family, Tensor, layer_norm, linear, reshaped

REQUIRED = ("vocab_size", "n_embd", "n_layer", "n_head")
_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu")  # the HF activation names this family accepts
_HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu"}


def fields_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    io.require(hf, REQUIRED)
    full = {"n_positions": 1024, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "tie_word_embeddings": True, **hf}
    if full["scale_attn_weights"] is not True:
        raise io.refuse("scale_attn_weights", full["scale_attn_weights"], "true (scores scaled by 1/sqrt(head_dim))")
    if full["scale_attn_by_inverse_layer_idx"] is not False:
        raise io.refuse("scale_attn_by_inverse_layer_idx", full["scale_attn_by_inverse_layer_idx"], "false")
    d_model, n_heads = io.int_field(hf, "n_embd"), io.int_field(hf, "n_head")
    if d_model % n_heads:
        raise io.refuse("n_head", n_heads, f"a divisor of n_embd ({d_model})")
    inner = full["n_inner"]
    return dict(
        vocab_size=io.int_field(hf, "vocab_size"), d_model=d_model, n_layers=io.int_field(hf, "n_layer"),
        n_heads=n_heads, mlp_hidden=4 * d_model if inner is None else io.int_field(full, "n_inner"),
        max_seq_len=io.int_field(full, "n_positions"), position_embedding="learned",
        norm="layernorm", norm_eps=float(full["layer_norm_epsilon"]),
        tie_embeddings=io.bool_field(full, "tie_word_embeddings"),
        qkv_bias=True, out_bias=True, mlp_bias=True, gated_mlp=False,
        mlp_activation=io.activation_field(full, "activation_function", "gelu_new", _ACTIVATIONS),
    )


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": config.vocab_size, "n_embd": config.d_model, "n_layer": config.n_layers,
        "n_head": config.n_heads, "n_inner": config.mlp_hidden, "n_positions": config.max_seq_len,
        "activation_function": _HF_ACTIVATION.get(config.mlp_activation, "gelu_new"),  # else: the check names it
        "layer_norm_epsilon": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
    }


def _fused_qkv(name: str, d: int, h: int, hd: int, weight: bool) -> Tensor:
    """``c_attn``: output columns ordered [(q, k, v), head, dim]."""
    params = ("attention.q", "attention.k", "attention.v") if weight else \
        ("attention.q_bias", "attention.k_bias", "attention.v_bias")
    if weight:
        return Tensor(name, params, (d, 3 * d),
                      lambda w: tuple(w.reshape(d, 3, h, hd)[:, j] for j in range(3)),
                      lambda q, k, v: np.stack([q, k, v], axis=1).reshape(d, 3 * d))
    return Tensor(name, params, (3 * d,),
                  lambda b: tuple(b.reshape(3, h, hd)[j] for j in range(3)),
                  lambda q, k, v: np.stack([q, k, v]).reshape(3 * d))


def tensors(config: ModelConfig) -> list[Tensor]:
    d, f, v, h = config.d_model, config.mlp_hidden, config.vocab_size, config.n_heads
    hd = config.resolved_head_dim
    layer = "transformer.h.{layer}."
    table = [
        reshaped("transformer.wte.weight", "embedding", (v, d), (v, d)),
        reshaped("transformer.wpe.weight", "position_embedding", (config.max_seq_len, d), (config.max_seq_len, d)),
        _fused_qkv(f"{layer}attn.c_attn.weight", d, h, hd, weight=True),
        _fused_qkv(f"{layer}attn.c_attn.bias", d, h, hd, weight=False),
        reshaped(f"{layer}attn.c_proj.weight", "attention.out", (d, d), (h, hd, d)),
        reshaped(f"{layer}attn.c_proj.bias", "attention.out_bias", (d,), (d,)),
        reshaped(f"{layer}mlp.c_fc.weight", "mlp.up", (d, f), (d, f)),
        reshaped(f"{layer}mlp.c_fc.bias", "mlp.up_bias", (f,), (f,)),
        reshaped(f"{layer}mlp.c_proj.weight", "mlp.down", (f, d), (f, d)),
        reshaped(f"{layer}mlp.c_proj.bias", "mlp.down_bias", (d,), (d,)),
    ]
    table += layer_norm(f"{layer}ln_1", "attention_norm", d) + layer_norm(f"{layer}ln_2", "mlp_norm", d)
    table += layer_norm("transformer.ln_f", "final_norm", d)
    if not config.tie_embeddings:
        table.append(linear("lm_head.weight", "lm_head", d, (v,)))
    return table


FAMILY = Family("gpt2", "gpt2", "GPT2LMHeadModel", fields_from_hf, config_to_hf, tensors,
                embedding="transformer.wte.weight", prefix="transformer.",
                ignored=(".attn.bias", ".attn.masked_bias"))
