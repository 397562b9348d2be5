"""The tensor table and config fields shared by the Llama-shaped families (OLMo, OLMo-2,
Llama, Qwen2, Qwen3): ``model.layers.N.self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``,
their optional biases and norms. A family module only says which options its config sets.

  ===============================================  ==========================================
  HF tensor (torch ``Linear``: ``[out, in]``)       jaxlm parameter (layers stacked on axis 0)
  ===============================================  ==========================================
  model.embed_tokens.weight [V, d]                 embedding [V, d]
  model.layers.N.self_attn.q_proj [H*D, d] (+bias)  layers.attention.q [L, d, H, D] (q_bias [L, H, D])
  ...k_proj / v_proj [Hkv*D, d] (+bias)            layers.attention.k / v [L, d, Hkv, D]
  ...o_proj [d, H*D] (+bias)                       layers.attention.out [L, H, D, d] (out_bias)
  ...q_norm / k_norm [H*D] or [D]                  layers.attention.q_norm / k_norm [L, H, D] or [L, D]
  ...mlp.gate_proj / up_proj [F, d] (+bias)         layers.mlp.gate / up [L, d, F]
  ...mlp.down_proj [d, F] (+bias)                  layers.mlp.down [L, F, d]
  ...input_layernorm [d]                           layers.attention_norm.scale (pre-norm)
  ...post_attention_layernorm [d]                  layers.mlp_norm.scale (pre-norm) or
                                                   layers.post_attention_norm.scale (post-norm)
  ...post_feedforward_layernorm [d]                layers.post_mlp_norm.scale (post-norm)
  model.norm.weight [d]                            final_norm.scale
  lm_head.weight [V, d] (untied only)              lm_head [d, V]
  ===============================================  ==========================================
"""

from __future__ import annotations

from typing import Any, Mapping

from jaxlm.config import ModelConfig
from jaxlm.hf import io
from jaxlm.hf.family import Tensor, linear, linear_from_heads, reshaped

REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_HF_ACTIVATION = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def refuse_sliding_window(hf: Mapping[str, Any]) -> None:
    """Qwen-style configs: only full attention in every layer."""
    if hf.get("use_sliding_window"):
        raise io.refuse("use_sliding_window", hf["use_sliding_window"], "false (jaxlm has no sliding-window attention)")
    kinds = sorted(set(hf.get("layer_types") or ["full_attention"]) - {"full_attention"})
    if kinds:
        raise io.refuse("layer_types", kinds, "'full_attention' in every layer")


def shape_fields(hf: Mapping[str, Any], default_positions: int, default_tied: bool) -> dict[str, Any]:
    """Sizes, heads, positions, RoPE and tying of a Llama-shaped config."""
    io.require(hf, REQUIRED)
    d_model, n_heads = io.int_field(hf, "hidden_size"), io.int_field(hf, "num_attention_heads")
    tied = {**{"tie_word_embeddings": default_tied}, **hf}
    return dict(
        vocab_size=io.int_field(hf, "vocab_size"),
        d_model=d_model,
        n_layers=io.int_field(hf, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=io.kv_heads_field(hf, n_heads),
        head_dim=io.head_dim_field(hf, d_model, n_heads),
        mlp_hidden=io.int_field(hf, "intermediate_size"),
        max_seq_len=io.int_field({"max_position_embeddings": default_positions, **hf}, "max_position_embeddings"),
        tie_embeddings=io.bool_field(tied, "tie_word_embeddings"),
        mlp_activation=io.activation_field(hf, "hidden_act", "silu"),
        position_embedding="rope",
        **io.rope_fields(hf),
    )


def shape_to_hf(config: ModelConfig) -> dict[str, Any]:
    hf = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.resolved_kv_heads,
        "head_dim": config.resolved_head_dim,
        "hidden_act": _HF_ACTIVATION[config.mlp_activation],
        "max_position_embeddings": config.max_seq_len,
        "rope_parameters": io.rope_to_hf(config),
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_embeddings,
    }
    if config.rope_scaling == "none":  # transformers 4.x readers
        hf.update(rope_theta=config.rope_theta, rope_scaling=None)
    return hf


def tensors(config: ModelConfig) -> list[Tensor]:
    d, f, v = config.d_model, config.mlp_hidden, config.vocab_size
    h, kv, hd = config.n_heads, config.resolved_kv_heads, config.resolved_head_dim
    layer = "model.layers.{layer}."
    table = [
        reshaped("model.embed_tokens.weight", "embedding", (v, d), (v, d)),
        linear(f"{layer}self_attn.q_proj.weight", "attention.q", d, (h, hd)),
        linear(f"{layer}self_attn.k_proj.weight", "attention.k", d, (kv, hd)),
        linear(f"{layer}self_attn.v_proj.weight", "attention.v", d, (kv, hd)),
        linear_from_heads(f"{layer}self_attn.o_proj.weight", "attention.out", (h, hd), d),
        linear(f"{layer}mlp.up_proj.weight", "mlp.up", d, (f,)),
        linear_from_heads(f"{layer}mlp.down_proj.weight", "mlp.down", (f,), d),
    ]
    if config.gated_mlp:
        table.append(linear(f"{layer}mlp.gate_proj.weight", "mlp.gate", d, (f,)))
    if config.qkv_bias:
        table += [reshaped(f"{layer}self_attn.{x}_proj.bias", f"attention.{x}_bias", (n * hd,), (n, hd))
                  for x, n in (("q", h), ("k", kv), ("v", kv))]
    if config.out_bias:
        table.append(reshaped(f"{layer}self_attn.o_proj.bias", "attention.out_bias", (d,), (d,)))
    if config.mlp_bias:
        table += [reshaped(f"{layer}mlp.up_proj.bias", "mlp.up_bias", (f,), (f,)),
                  reshaped(f"{layer}mlp.down_proj.bias", "mlp.down_bias", (d,), (d,))]
        if config.gated_mlp:
            table.append(reshaped(f"{layer}mlp.gate_proj.bias", "mlp.gate_bias", (f,), (f,)))
    if config.qk_norm == "projection":
        table += [reshaped(f"{layer}self_attn.q_norm.weight", "attention.q_norm", (h * hd,), (h, hd)),
                  reshaped(f"{layer}self_attn.k_norm.weight", "attention.k_norm", (kv * hd,), (kv, hd))]
    elif config.qk_norm == "head":
        table += [reshaped(f"{layer}self_attn.{x}_norm.weight", f"attention.{x}_norm", (hd,), (hd,)) for x in "qk"]
    if config.norm != "nonparametric":
        if config.norm_position == "pre":
            norms = {"input_layernorm": "attention_norm", "post_attention_layernorm": "mlp_norm"}
        else:
            norms = {"post_attention_layernorm": "post_attention_norm", "post_feedforward_layernorm": "post_mlp_norm"}
        table += [reshaped(f"{layer}{name}.weight", f"{ours}.scale", (d,), (d,)) for name, ours in norms.items()]
        table.append(reshaped("model.norm.weight", "final_norm.scale", (d,), (d,)))
    if not config.tie_embeddings:
        table.append(linear("lm_head.weight", "lm_head", d, (v,)))
    return table
