"""Decoder-only transformer in Flax Linen (OLMo-style by default; other HF families through
``ModelConfig``'s architecture options), used functionally.

``forward(config, params, tokens, ...)`` is the pure entry point. Everything that varies
per call is an explicit argument or output: the KV cache (``KVCache``), the activation edits
of an intervention (``ResolvedIntervention``) and captured activations.

Sites (TransformerLens names in brackets):
  ``head_out``   each head's attention output before the output projection, [B, T, H, D]
                 (``hook_z``).
  ``resid_pre``  the residual stream entering a block, [B, T, d_model].
  ``resid_mid``  the residual stream after attention's residual add, before the MLP.
  ``resid_post`` the residual stream leaving a block (after the MLP's residual add).
They mean the same in every architecture ``ModelConfig`` can express, with one difference:
with ``parallel_residual`` (GPT-NeoX) the MLP reads the block input, so ``resid_mid`` (block
input + attention output) feeds only the MLP's residual add, not the MLP itself.
Captures come back stacked over layers: ``captures[name]`` is ``[L, B, T, ...]``; they hold
the values after any edit at that site (what the rest of the model sees).

Edits (``ResolvedEdit``) are data: a site, an operation and per-layer arrays, with the
positions of this call they touch and one scale for the whole intervention. The model
applies them where the site is computed, in float32 (cast back to the compute dtype), and
knows nothing of the method that built them (``jaxlm.intervene`` does):

  ``add``      x += s * v
  ``project``  x -= s * ((x . u) - c) u          (u unit norm; c = 0: directional ablation)
  ``erase``    x -= s * P (x - mu)               (LEACE's oblique projection; residual sites)

with ``s = scale * gate[layer (, head)] * position_mask[b, t]``: at ``scale = 0`` every
operation leaves its site's values as they were (a program with edits may still fuse, and
so round, its other float32 ops differently from one without: ~1e-6 on the logits).

Parameters baked from an intervention (``jaxlm.intervene.bake_into_params``) are optional and
absent from ``init_params``: ``attention.out_bias`` [L, d_model] after the output projection,
and ``{site}_bias`` [L, d_model] at ``params["layers"]`` for each residual site, added to the
site's values before that site's edits (``resid_pre``: the block input; ``resid_mid``: after
attention's residual add; ``resid_post``: after the MLP's).

Layers are one block scanned over a leading ``layers`` parameter axis (fast compiles at
any depth); parameters are float32, compute runs in ``config.dtype``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

from jaxlm.config import ModelConfig

Array = jax.Array
Params = Any

SITES = ("head_out", "resid_pre", "resid_mid", "resid_post")
# Attention logits of masked pairs: finite, so a fully masked (padding) row stays finite.
_MASK_VALUE = -1e30


@struct.dataclass
class KVCache:
    """Keys/values of every layer, in slots ``[0, max_len)``; slots ``>= index`` are empty.

    ``segment_ids[b, s]`` is the segment of the token in slot ``s`` (0 = empty or padding:
    never attended to). A query attends to slots at or before its own slot whose segment
    equals its own, so ragged (left-padded) prompts and packed rows both work.
    """

    k: Array  # [L, B, S, H_kv, D]
    v: Array  # [L, B, S, H_kv, D]
    segment_ids: Array  # [B, S] int32
    index: Array  # [] int32: next slot to write

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


EDIT_OPS = ("add", "project", "erase")
# The per-layer arrays of each operation (a leading layers axis; then [H, D] at head_out, [d] or [d, d] at
# a residual site; ``c`` is [L, H] at head_out and [L] at a residual site).
EDIT_ARRAYS = {"add": ("v",), "project": ("u", "c"), "erase": ("P", "mu")}


@struct.dataclass
class ResolvedEdit:
    """One edit of one forward call: ``op`` at ``site`` on the positions ``position_mask``.

    ``gate`` is the layer mask ([L]) or layer x head mask ([L, H], ``head_out``) as 0/1 floats.
    """

    arrays: dict[str, Array]  # EDIT_ARRAYS[op] -> [L, ...] float32
    gate: Array  # [L] or [L, H] float32
    position_mask: Array  # [B, T] bool (broadcastable)
    site: str = struct.field(pytree_node=False)
    op: str = struct.field(pytree_node=False)


@struct.dataclass
class ResolvedIntervention:
    """The edits of one forward call and the one scale they share (``0`` = identity)."""

    edits: tuple[ResolvedEdit, ...]
    scale: Array  # [] float32


@struct.dataclass
class ModelOutput:
    logits: Array  # [B, T, V] float32
    cache: KVCache | None
    captures: dict[str, Array]  # site -> [L, B, T, ...]


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def _normal(std: float) -> Callable:
    return nn.initializers.normal(stddev=std)


def dense(x: Array, w: Array, in_dims: int = 1) -> Array:
    """Contract the last ``in_dims`` axes of ``x`` with the first ``in_dims`` axes of ``w``.

    Written as one 2-D matmul: XLA:CPU runs the backward pass of a 2-D dot several times
    faster than that of the equivalent multi-axis einsum.
    """
    lead, contract = x.shape[: x.ndim - in_dims], x.shape[x.ndim - in_dims :]
    out = w.shape[in_dims:]
    k = int(np.prod(contract))
    y = x.reshape(-1, k) @ w.reshape(k, -1).astype(x.dtype)
    return y.reshape(*lead, *out)


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], init: Callable) -> Array:
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


class Norm(nn.Module):
    """LayerNorm without parameters (OLMo-1B), with scale and bias, or RMSNorm; fp32 inside."""

    kind: str
    eps: float

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dim = x.shape[-1]
        h = x.astype(jnp.float32)
        if self.kind == "rmsnorm":
            h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        else:
            mean = jnp.mean(h, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
            h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        if self.kind in ("layernorm", "rmsnorm"):
            h = h * _param(self, "scale", (dim,), ("norm",), nn.initializers.ones)
        if self.kind == "layernorm":
            h = h + _param(self, "bias", (dim,), ("norm",), nn.initializers.zeros)
        return h.astype(x.dtype)


def rope_frequencies(config: ModelConfig) -> np.ndarray:
    """[rotary_dim / 2] float32 inverse frequencies ``theta^(-2i/rotary_dim)``, scaled as
    ``config.rope_scaling`` says (HF ``modeling_rope_utils``: default, linear, llama3)."""
    dim = config.resolved_rotary_dim
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))))
    inv_freq = inv_freq.astype(np.float32)
    factor = np.float32(config.rope_scaling_factor)
    if config.rope_scaling == "linear":
        return (inv_freq / factor).astype(np.float32)
    if config.rope_scaling == "llama3":
        low, high = np.float32(config.rope_low_freq_factor), np.float32(config.rope_high_freq_factor)
        old_len = np.float32(config.rope_original_max_len)
        wavelen = np.float32(2 * np.pi) / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope(x: Array, positions: Array, inv_freq: np.ndarray | Array) -> Array:
    """Rotary embedding, half-split convention (as HF ``rotate_half``), of the first
    ``2 * len(inv_freq)`` dims of each head (all of them unless the rotary is partial);
    x is [B, T, H, D]."""
    rotary = 2 * inv_freq.shape[0]
    half = rotary // 2
    angles = positions.astype(jnp.float32)[:, :, None, None] * jnp.asarray(inv_freq, jnp.float32)  # [B, T, 1, R/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:rotary].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
    return out if rotary == x.shape[-1] else jnp.concatenate([out, x[..., rotary:]], axis=-1)


def rms_scale(x: Array, scale: Array, eps: float, axes: tuple[int, ...]) -> Array:
    """RMSNorm of ``x`` over ``axes`` (float32 inside) times ``scale``, back in ``x``'s dtype."""
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=axes, keepdims=True) + eps)
    return (h * scale).astype(x.dtype)


def attention_mask(q_slots: Array, q_segments: Array, kv_segments: Array) -> Array:
    """[B, T, S] bool: causal over slots, same segment, never an empty/padding slot."""
    kv_slots = jnp.arange(kv_segments.shape[1])
    causal = kv_slots[None, None, :] <= q_slots[None, :, None]
    same = q_segments[:, :, None] == kv_segments[:, None, :]
    return causal & same & (kv_segments[:, None, :] != 0)


def attend(q: Array, k: Array, v: Array, mask: Array, implementation: str = "softmax") -> Array:
    """Softmax attention (fp32 logits): q [B, T, H, D], k/v [B, S, H_kv, D], mask [B, T, S] -> [B, T, H, D].

    Query heads are grouped onto key/value heads (GQA) only when there are fewer of those:
    the plain 4-D layout is faster on CPU. ``implementation`` ``"xla"`` or ``"cudnn"`` calls
    ``jax.nn.dot_product_attention`` instead (``ModelConfig.attention``).
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    scale = 1.0 / np.sqrt(d)
    if implementation != "softmax":
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale, implementation=implementation)
    if kv == h:
        logits = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) * scale
        logits = jnp.where(mask[:, None], logits, _MASK_VALUE)
        probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
        return jnp.einsum("bhts,bshd->bthd", probs, v)
    qg = q.reshape(b, t, kv, h // kv, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k).astype(jnp.float32) * scale
    logits = jnp.where(mask[:, None, None], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, q_slots, q_segments, kv_segments, layer_cache, edit_head_out):
        cfg = self.config
        dtype = _dtype(cfg.dtype)
        h, kv, d = cfg.n_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim
        init = _normal(cfg.init_std)
        wq = _param(self, "q", (cfg.d_model, h, d), ("embed", "heads", "kv"), init)
        wk = _param(self, "k", (cfg.d_model, kv, d), ("embed", "kv_heads", "kv"), init)
        wv = _param(self, "v", (cfg.d_model, kv, d), ("embed", "kv_heads", "kv"), init)
        wo = _param(self, "out", (h, d, cfg.d_model), ("heads", "kv", "embed"), init)

        q, k, v = dense(x, wq), dense(x, wk), dense(x, wv)
        if cfg.qkv_bias:
            zeros = nn.initializers.zeros
            q = q + _param(self, "q_bias", (h, d), ("heads", "kv"), zeros).astype(dtype)
            k = k + _param(self, "k_bias", (kv, d), ("kv_heads", "kv"), zeros).astype(dtype)
            v = v + _param(self, "v_bias", (kv, d), ("kv_heads", "kv"), zeros).astype(dtype)
        if cfg.qk_norm == "projection":  # over all heads of the projection (OLMo-2)
            ones = nn.initializers.ones
            q = rms_scale(q, _param(self, "q_norm", (h, d), ("heads", "kv"), ones), cfg.norm_eps, (-2, -1))
            k = rms_scale(k, _param(self, "k_norm", (kv, d), ("kv_heads", "kv"), ones), cfg.norm_eps, (-2, -1))
        elif cfg.qk_norm == "head":  # each head on its own, one scale shared by the heads (Qwen3)
            ones = nn.initializers.ones
            q = rms_scale(q, _param(self, "q_norm", (d,), ("kv",), ones), cfg.norm_eps, (-1,))
            k = rms_scale(k, _param(self, "k_norm", (d,), ("kv",), ones), cfg.norm_eps, (-1,))
        if cfg.position_embedding == "rope":
            inv_freq = rope_frequencies(cfg)
            q = rope(q, positions, inv_freq)
            k = rope(k, positions, inv_freq)

        new_cache = None
        if layer_cache is not None:
            cache_k, cache_v, index = layer_cache
            k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, index, 0, 0))
            new_cache = (k, v)
            k, v = k.astype(dtype), v.astype(dtype)

        head_out = attend(q, k, v, attention_mask(q_slots, q_segments, kv_segments), cfg.attention)
        head_out = nn.with_logical_constraint(
            head_out, ("activation_batch", "activation_length", "activation_heads", "activation_kv")
        )

        head_out = edit_head_out(head_out)  # the `head_out` intervention site

        out = dense(head_out, wo, in_dims=2)
        if cfg.out_bias:  # the family's own bias (jaxlm.intervene bakes into the same parameter)
            out = out + _param(self, "out_bias", (cfg.d_model,), ("embed",), nn.initializers.zeros).astype(dtype)
        elif self.has_variable("params", "out_bias"):  # only in params baked by jaxlm.intervene
            out = out + self.get_variable("params", "out_bias").astype(dtype)
        return out, head_out, new_cache


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


class Mlp(nn.Module):
    """``down(act(gate(x)) * up(x))`` (gated, SwiGLU by default) or ``down(act(up(x)))``."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dtype = x.dtype
        init, zeros = _normal(cfg.init_std), nn.initializers.zeros

        def project(name: str, w_shape, axes, bias_shape, bias_axes, h):
            out = dense(h, _param(self, name, w_shape, axes, init))
            if cfg.mlp_bias:
                out = out + _param(self, f"{name}_bias", bias_shape, bias_axes, zeros).astype(dtype)
            return out

        hidden_in = ((cfg.d_model, cfg.mlp_hidden), ("embed", "mlp"), (cfg.mlp_hidden,), ("mlp",))
        activation = _ACTIVATIONS[cfg.mlp_activation]
        if cfg.gated_mlp:
            hidden = activation(project("gate", *hidden_in, x)) * project("up", *hidden_in, x)
        else:
            hidden = activation(project("up", *hidden_in, x))
        hidden = nn.with_logical_constraint(hidden, ("activation_batch", "activation_length", "activation_mlp"))
        return project("down", (cfg.mlp_hidden, cfg.d_model), ("mlp", "embed"), (cfg.d_model,), ("embed",), hidden)


_RESID_AXES = ("activation_batch", "activation_length", "activation_embed")


def apply_edit(x: Array, op: str, arrays: dict[str, Array], gate: Array, position_mask: Array, scale: Array) -> Array:
    """One layer's edit of ``x`` (float32: [B, T, d] at a residual site, [B, T, H, D] at ``head_out``).

    ``arrays`` and ``gate`` are this layer's slices (``gate``: [] or [H]); ``position_mask`` [B, T].
    """
    heads = x.ndim == 4
    where = position_mask.astype(jnp.float32)[:, :, None, None] if heads else position_mask.astype(jnp.float32)[:, :, None]
    s = scale * where * (gate[:, None] if heads else gate)  # [B, T, (H,) 1]
    if op == "add":
        return x + s * arrays["v"]
    if op == "project":
        u = arrays["u"]
        along = jnp.sum(x * u, axis=-1, keepdims=True) - jnp.expand_dims(arrays["c"], -1)
        return x - s * along * u
    if op == "erase":
        return x - s * dense(x - arrays["mu"], arrays["P"].T)
    raise ValueError(f"unknown edit op {op!r}; valid ops: {', '.join(EDIT_OPS)}")


class Block(nn.Module):
    """One block (pre- or post-norm, sequential or parallel residual; see ``ModelConfig``);
    called by ``nn.scan`` with per-layer inputs ``xs``.

    ``edits`` is the static (site, op) of each edit; their per-layer arrays and gates come in
    ``xs``, their position masks and the scale in ``shared``.
    """

    config: ModelConfig
    capture: tuple[str, ...] = ()
    edits: tuple[tuple[str, str], ...] = ()

    @nn.compact
    def __call__(self, x, xs, shared):
        cfg = self.config
        layer_cache, edit_layers = xs
        positions, q_slots, q_segments, kv_segments, edit_masks, scale = shared

        def edit(site: str, h: Array) -> Array:
            """``h`` after this layer's edits at ``site``, in order (float32 math, cast back)."""
            here = [i for i, (edit_site, _) in enumerate(self.edits) if edit_site == site]
            if not here:
                return h
            out = h.astype(jnp.float32)
            for i in here:
                arrays, gate = edit_layers[i]
                out = apply_edit(out, self.edits[i][1], arrays, gate, edit_masks[i], scale)
            return out.astype(h.dtype)

        def bias(site: str, h: Array) -> Array:
            """``h`` plus this layer's ``{site}_bias`` [d_model] (only in params baked by jaxlm.intervene)."""
            name = f"{site}_bias"
            if not self.has_variable("params", name):
                return h
            return h + self.get_variable("params", name).astype(h.dtype)

        captured = {}
        x = edit("resid_pre", bias("resid_pre", x))
        if "resid_pre" in self.capture:
            captured["resid_pre"] = x
        pre = cfg.norm_position == "pre"

        def pre_norm(name: str, h: Array) -> Array:
            return Norm(cfg.norm, cfg.norm_eps, name=name)(h) if pre else h

        def post_norm(name: str, h: Array) -> Array:
            return h if pre else Norm(cfg.norm, cfg.norm_eps, name=f"post_{name}")(h)

        with jax.named_scope("attention"):
            attn, head_out, new_cache = Attention(cfg, name="attention")(
                pre_norm("attention_norm", x),
                positions, q_slots, q_segments, kv_segments, layer_cache, lambda h: edit("head_out", h),
            )
            mlp_in = pre_norm("mlp_norm", x) if cfg.parallel_residual else None  # reads the block input
            x = nn.with_logical_constraint(
                edit("resid_mid", bias("resid_mid", x + post_norm("attention_norm", attn))), _RESID_AXES
            )
        if "head_out" in self.capture:
            captured["head_out"] = head_out
        if "resid_mid" in self.capture:
            captured["resid_mid"] = x
        with jax.named_scope("mlp"):
            if mlp_in is None:
                mlp_in = pre_norm("mlp_norm", x)
            x = x + post_norm("mlp_norm", Mlp(cfg, name="mlp")(mlp_in))
            x = nn.with_logical_constraint(edit("resid_post", bias("resid_post", x)), _RESID_AXES)
        if "resid_post" in self.capture:
            captured["resid_post"] = x
        return x, (new_cache, captured)


_REMAT_POLICIES = {
    "block": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nn.Module):
    config: ModelConfig
    capture: tuple[str, ...] = ()
    last_logits_only: bool = False  # logits of the last position only (a prefill needs no more)

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        cache: KVCache | None = None,
        intervention: ResolvedIntervention | None = None,
        token_embeddings: Array | None = None,
    ) -> ModelOutput:
        cfg = self.config
        dtype = _dtype(cfg.dtype)
        unknown = set(self.capture) - set(SITES)
        if unknown:
            raise ValueError(f"unknown capture site(s) {sorted(unknown)}; valid sites: {', '.join(SITES)}")
        b, t = tokens.shape
        q_segments = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)

        if cache is None:
            index = jnp.zeros((), jnp.int32)
            kv_segments = q_segments
            if positions is None:
                positions = positions_from_segments(q_segments)
        else:
            index = cache.index
            kv_segments = jax.lax.dynamic_update_slice(cache.segment_ids, q_segments, (0, index))
            if positions is None:
                previous = jnp.sum(cache.segment_ids != 0, axis=1)
                positions = previous[:, None] + jnp.maximum(jnp.cumsum(q_segments != 0, axis=1) - 1, 0)
        q_slots = index + jnp.arange(t, dtype=jnp.int32)

        embedding = _param(self, "embedding", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), _normal(cfg.init_std))
        if token_embeddings is None:
            x = jnp.take(embedding, tokens, axis=0).astype(dtype)
        else:
            if token_embeddings.shape != (b, t, cfg.d_model):
                raise ValueError(
                    f"token_embeddings: expected shape {(b, t, cfg.d_model)} (tokens [B, T] x d_model), "
                    f"got {tuple(token_embeddings.shape)}"
                )
            x = token_embeddings.astype(dtype)
        if cfg.position_embedding == "learned":
            table = _param(
                self, "position_embedding", (cfg.max_seq_len, cfg.d_model), ("position", "embed"), _normal(cfg.init_std)
            )
            x = x + jnp.take(table, positions, axis=0, mode="clip").astype(dtype)
        x = nn.with_logical_constraint(x, _RESID_AXES)

        edit_structure, edit_layers, edit_masks, scale = _edit_inputs(cfg, intervention, b, t)
        layer_caches = None if cache is None else (cache.k, cache.v, jnp.broadcast_to(index, (cfg.n_layers,)))

        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, prevent_cse=False, policy=_REMAT_POLICIES[cfg.remat])
        scanned = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast),
            length=cfg.n_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        shared = (positions, q_slots, q_segments, kv_segments, edit_masks, scale)
        x, (new_layer_caches, captures) = scanned(cfg, self.capture, edit_structure, name="layers")(
            x, (layer_caches, edit_layers), shared
        )

        if self.last_logits_only:
            x = x[:, -1:]
        x = Norm(cfg.norm, cfg.norm_eps, name="final_norm")(x)
        if cfg.tie_embeddings:
            logits = dense(x, embedding.T)
        else:
            head = _param(self, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), _normal(cfg.init_std))
            logits = dense(x, head)
        logits = nn.with_logical_constraint(
            logits.astype(jnp.float32), ("activation_batch", "activation_length", "activation_vocab")
        )

        new_cache = None
        if cache is not None:
            new_k, new_v = new_layer_caches
            new_cache = KVCache(k=new_k, v=new_v, segment_ids=kv_segments, index=index + t)
        return ModelOutput(logits=logits, cache=new_cache, captures=captures)


def _edit_inputs(config: ModelConfig, intervention: ResolvedIntervention | None, b: int, t: int):
    """(static (site, op) per edit, per-layer (arrays, gate) per edit, [B, T] masks, scale) for the scan."""
    if intervention is None or not intervention.edits:
        return (), (), (), jnp.zeros((), jnp.float32)
    structure, layers, masks = [], [], []
    for e in intervention.edits:
        if e.site not in SITES:
            raise ValueError(f"edit site {e.site!r}: valid sites are {', '.join(SITES)}")
        if e.op not in EDIT_OPS or (e.op == "erase" and e.site == "head_out"):
            raise ValueError(f"edit op {e.op!r} at {e.site}: valid ops are {', '.join(EDIT_OPS)} (erase: residual sites)")
        arrays = {name: jnp.asarray(e.arrays[name], jnp.float32) for name in EDIT_ARRAYS[e.op]}
        for name, array in arrays.items():
            if array.shape[0] != config.n_layers:
                raise ValueError(f"edit {e.op} at {e.site}: {name} has {array.shape[0]} layers, the model {config.n_layers}")
        structure.append((e.site, e.op))
        layers.append((arrays, jnp.asarray(e.gate, jnp.float32)))
        masks.append(jnp.broadcast_to(jnp.asarray(e.position_mask, bool), (b, t)))
    return tuple(structure), tuple(layers), tuple(masks), jnp.asarray(intervention.scale, jnp.float32)


def positions_from_segments(segment_ids: Array) -> Array:
    """Position of each token within its segment (restarts where the segment id changes)."""
    t = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    is_start = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    start = jax.lax.cummax(jnp.where(is_start, idx, 0), axis=1)
    return idx - start


# ---------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------


def forward(
    config: ModelConfig,
    params: Params,
    tokens: Array,
    *,
    positions: Array | None = None,
    segment_ids: Array | None = None,
    cache: KVCache | None = None,
    intervention: ResolvedIntervention | None = None,
    capture: tuple[str, ...] | list[str] = (),
    last_logits_only: bool = False,
    token_embeddings: Array | None = None,
) -> ModelOutput:
    """Run the model: ``tokens`` [B, T] int -> ``ModelOutput`` (float32 logits [B, T, V], or
    [B, 1, V] for the last position with ``last_logits_only``: the LM head is skipped elsewhere).

    ``segment_ids`` [B, T] (0 = padding) keep packed documents apart; ``positions`` default
    to the position within each segment (continuing from the cache when one is given).
    With ``cache``, the tokens are written at ``cache.index`` and the updated cache returned.
    ``intervention``: the edits of this call (``jaxlm.intervene.Intervention.for_prefill`` etc.).
    ``token_embeddings`` [B, T, d_model]: used instead of the embedding lookup of ``tokens``
    (which then only give the shape), e.g. ``one_hot @ params["embedding"]`` so gradients
    reach a one-hot token matrix (GCG); learned position embeddings are still added.
    """
    model = Transformer(config, capture=tuple(capture), last_logits_only=last_logits_only)
    return model.apply({"params": params}, tokens, positions, segment_ids, cache, intervention, token_embeddings)


def _abstract_variables(config: ModelConfig) -> Any:
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(lambda: Transformer(config).init(jax.random.key(0), jnp.zeros(tokens.shape, tokens.dtype)))


def init_params(config: ModelConfig, rng: Array | int = 0) -> Params:
    """Fresh float32 parameters (a plain nested dict of arrays)."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    variables = Transformer(config).init(rng, jnp.zeros((1, 1), jnp.int32))
    return nn.unbox(variables["params"])


def param_logical_axes(config: ModelConfig) -> Any:
    """Tree (same structure as params) of ``PartitionSpec`` with logical axis names."""
    return nn.get_partition_spec(_abstract_variables(config))["params"]


def param_shapes(config: ModelConfig) -> Any:
    """Tree of ``ShapeDtypeStruct`` for the params, without allocating them."""
    return nn.unbox(_abstract_variables(config))["params"]


def init_cache(config: ModelConfig, batch_size: int, max_len: int | None = None, dtype: str | None = None) -> KVCache:
    """An empty cache with ``max_len`` slots (default: the model's context length), laid out
    per ``CACHE_LOGICAL_AXES`` when traced under ``jaxlm.sharding.activation_sharding``."""
    max_len = max_len or config.max_seq_len
    shape = (config.n_layers, batch_size, max_len, config.resolved_kv_heads, config.resolved_head_dim)
    kv_dtype = _dtype(dtype or config.dtype)
    return constrain_cache(KVCache(
        k=jnp.zeros(shape, kv_dtype),
        v=jnp.zeros(shape, kv_dtype),
        segment_ids=jnp.zeros((batch_size, max_len), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    ))


def constrain_cache(cache: KVCache) -> KVCache:
    """``cache`` constrained to ``CACHE_LOGICAL_AXES`` (batch over the data axes, kv heads over
    ``tensor``) under logical-axis rules; unchanged without them (one device)."""
    return nn.with_logical_constraint(cache, CACHE_LOGICAL_AXES)


CACHE_LOGICAL_AXES = KVCache(
    k=jax.sharding.PartitionSpec("layers", "cache_batch", "cache_length", "cache_heads", "cache_kv"),
    v=jax.sharding.PartitionSpec("layers", "cache_batch", "cache_length", "cache_heads", "cache_kv"),
    segment_ids=jax.sharding.PartitionSpec("cache_batch", "cache_length"),
    index=jax.sharding.PartitionSpec(),
)
