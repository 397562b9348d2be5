"""GPT-NeoX / Pythia (``GPTNeoXForCausalLM``): LayerNorm with bias, a fused q/k/v projection,
partial rotary (the first ``rotary_pct`` of each head's dims), a GELU MLP with biases, and
(by default) the parallel residual ``x + attn(ln1(x)) + mlp(ln2(x))``.

  ===================================================  ======================================
  HF tensor                                            jaxlm parameter
  ===================================================  ======================================
  gpt_neox.embed_in.weight [V, d]                      embedding
  gpt_neox.layers.N.attention.query_key_value [3d, d]  layers.attention.q / k / v [L, d, H, D]
    (rows head-major: head h holds its q, k, v rows)     (+ q_bias / k_bias / v_bias [L, H, D])
  ...attention.dense [d, d] (+bias)                    layers.attention.out [L, H, D, d] (out_bias)
  ...input_layernorm / post_attention_layernorm        layers.attention_norm / mlp_norm (scale, bias)
  ...mlp.dense_h_to_4h [F, d] / dense_4h_to_h [d, F]   layers.mlp.up [L, d, F] / down [L, F, d] (+biases)
  gpt_neox.final_layer_norm                            final_norm
  embed_out.weight [V, d]                              lm_head [d, V] (untied)
  ===================================================  ======================================

With the parallel residual, ``resid_mid`` (block input + attention output) is not the MLP's
input: the MLP reads the block input (see ``jaxlm.model``).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.hf import io
from jaxlm.hf.family import Family, Tensor, layer_norm, linear, linear_from_heads, reshaped

REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh")  # the HF activation names this family accepts
_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new"}


def fields_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    io.require(hf, REQUIRED)
    d_model, n_heads = io.int_field(hf, "hidden_size"), io.int_field(hf, "num_attention_heads")
    if d_model % n_heads:
        raise io.refuse("num_attention_heads", n_heads, f"a divisor of hidden_size ({d_model})")
    activation = io.activation_field(hf, "hidden_act", "gelu", _ACTIVATIONS)
    full = {"attention_bias": True, "use_parallel_residual": True, "tie_word_embeddings": False, **hf}
    theta_key = "rotary_emb_base" if "rotary_emb_base" in hf and "rope_parameters" not in hf else "rope_theta"
    rope = io.rope_fields(hf, theta_key=theta_key, partial=True)
    fraction = rope.pop("rotary_fraction", hf.get("rotary_pct", 0.25))
    head_dim = d_model // n_heads
    rotary_dim = int(head_dim * fraction)
    bias = io.bool_field(full, "attention_bias")
    return dict(
        vocab_size=io.int_field(hf, "vocab_size"), d_model=d_model, n_layers=io.int_field(hf, "num_hidden_layers"),
        n_heads=n_heads, mlp_hidden=io.int_field(hf, "intermediate_size"),
        max_seq_len=io.int_field({"max_position_embeddings": 2048, **hf}, "max_position_embeddings"),
        position_embedding="rope", rotary_dim=None if rotary_dim == head_dim else rotary_dim, **rope,
        norm="layernorm", norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        tie_embeddings=io.bool_field(full, "tie_word_embeddings"),
        qkv_bias=bias, out_bias=bias, mlp_bias=True, gated_mlp=False, mlp_activation=activation,
        parallel_residual=io.bool_field(full, "use_parallel_residual"),
    )


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    head_dim = config.d_model // config.n_heads
    return {
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "intermediate_size": config.mlp_hidden,
        "hidden_act": _HF_ACTIVATION.get(config.mlp_activation, "gelu"),  # else: the check names it
        "max_position_embeddings": config.max_seq_len,
        "rope_parameters": io.rope_to_hf(config, partial_rotary_factor=config.resolved_rotary_dim / head_dim),
        "layer_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
        "use_parallel_residual": config.parallel_residual, "attention_bias": config.qkv_bias,
        "attention_dropout": 0.0, "hidden_dropout": 0.0,
    }


def _fused_qkv(name: str, d: int, h: int, hd: int, weight: bool) -> Tensor:
    """``query_key_value``: output rows (or bias entries) ordered [head, (q, k, v), dim]."""
    if weight:
        def to_jaxlm(w):
            per = w.reshape(h, 3, hd, d)
            return tuple(np.transpose(per[:, j], (2, 0, 1)) for j in range(3))  # [d, H, D] each

        def to_hf(q, k, v):
            return np.stack([np.transpose(x, (1, 2, 0)) for x in (q, k, v)], axis=1).reshape(3 * h * hd, d)

        return Tensor(name, ("attention.q", "attention.k", "attention.v"), (3 * h * hd, d), to_jaxlm, to_hf)
    return Tensor(name, ("attention.q_bias", "attention.k_bias", "attention.v_bias"), (3 * h * hd,),
                  lambda b: tuple(b.reshape(h, 3, hd)[:, j] for j in range(3)),
                  lambda q, k, v: np.stack([q, k, v], axis=1).reshape(3 * h * hd))


def tensors(config: ModelConfig) -> list[Tensor]:
    d, f, v, h = config.d_model, config.mlp_hidden, config.vocab_size, config.n_heads
    hd = config.resolved_head_dim
    layer = "gpt_neox.layers.{layer}."
    table = [
        reshaped("gpt_neox.embed_in.weight", "embedding", (v, d), (v, d)),
        _fused_qkv(f"{layer}attention.query_key_value.weight", d, h, hd, weight=True),
        linear_from_heads(f"{layer}attention.dense.weight", "attention.out", (h, hd), d),
        linear(f"{layer}mlp.dense_h_to_4h.weight", "mlp.up", d, (f,)),
        linear_from_heads(f"{layer}mlp.dense_4h_to_h.weight", "mlp.down", (f,), d),
        reshaped(f"{layer}mlp.dense_h_to_4h.bias", "mlp.up_bias", (f,), (f,)),
        reshaped(f"{layer}mlp.dense_4h_to_h.bias", "mlp.down_bias", (d,), (d,)),
    ]
    if config.qkv_bias:
        table.append(_fused_qkv(f"{layer}attention.query_key_value.bias", d, h, hd, weight=False))
    if config.out_bias:
        table.append(reshaped(f"{layer}attention.dense.bias", "attention.out_bias", (d,), (d,)))
    table += layer_norm(f"{layer}input_layernorm", "attention_norm", d)
    table += layer_norm(f"{layer}post_attention_layernorm", "mlp_norm", d)
    table += layer_norm("gpt_neox.final_layer_norm", "final_norm", d)
    if not config.tie_embeddings:
        table.append(linear("embed_out.weight", "lm_head", d, (v,)))
    return table


FAMILY = Family("gpt_neox", "gpt_neox", "GPTNeoXForCausalLM", fields_from_hf, config_to_hf, tensors,
                embedding="gpt_neox.embed_in.weight", lm_head="embed_out.weight", prefix="gpt_neox.",
                ignored=("rotary_emb.inv_freq", ".attention.bias", ".attention.masked_bias"))
