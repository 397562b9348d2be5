"""Frozen dataclass configs: YAML loading, ``key.sub=value`` overrides, validation, presets.

Every config in jaxlm is a frozen dataclass. ``from_dict`` builds one from plain data
(YAML), checking each field against its type annotation; an unknown key is an error
that names it and lists the valid keys; a bad value names the dotted field path and
what was expected. Value checks that involve several fields live in ``__post_init__``
and raise ``ConfigError`` too.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from jaxlm.errors import JaxlmError

T = TypeVar("T")


class ConfigError(JaxlmError, ValueError):
    """A config file, override or field value is invalid; the message names the field."""


# ---------------------------------------------------------------------------------------
# Generic machinery
# ---------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (tuple, list):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp``; returns the value in its canonical form."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None  # ``section: null`` switches an optional section off (not its defaults)
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, where)
            except ConfigError as err:
                errors.append((option, err))
        # ``X | None`` given a non-null value: X's own error is the informative one.
        non_null = [err for option, err in errors if option is not type(None)]
        if value is not None and len(non_null) == 1:
            raise non_null[0]
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            items = tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        else:
            items = tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)) if args else tuple(value)
        return items if origin is tuple else list(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_t, val_t = typing.get_args(tp) or (Any, Any)
        return {
            _coerce(k, key_t, f"{where}.<key>"): _coerce(v, val_t, f"{where}.{k}") for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected a boolean (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def from_dict(cls: type[T], data: Any, where: str = "", defaults: Any = None) -> T:
    """Build dataclass ``cls`` from a mapping, validating keys and value types.

    Missing keys take their values from ``defaults`` (an instance of ``cls``) when given, else
    from the class; a nested section given in part merges with its field's default, so
    ``read: {invalid_utf8: drop}`` keeps the default ``read.max_chars``. A mapping may carry
    ``preset: NAME`` when ``cls`` has presets (see ``PRESETS``): the preset's values are then
    the defaults, the other keys override them.
    """
    label = where or cls.__name__
    if data is None:
        data = {}
    if isinstance(data, str) and cls in PRESETS:
        data = {"preset": data}
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping of {cls.__name__} fields, got {data!r}")
    data = dict(data)
    init_fields = [f for f in dataclasses.fields(cls) if f.init]
    base: dict[str, Any] = {f.name: getattr(defaults, f.name) for f in init_fields} if defaults is not None else {}
    if "preset" in data and cls in PRESETS:
        name = data.pop("preset")
        presets = PRESETS[cls]
        if name not in presets:
            raise ConfigError(f"{label}.preset: unknown preset {name!r}; valid presets: {', '.join(presets)}")
        base = {f.name: getattr(presets[name], f.name) for f in init_fields}
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(
            f"{label}: unknown key {', '.join(map(repr, unknown))}; valid keys: {', '.join(types_)}"
        )
    kwargs = dict(base)
    for key, value in data.items():
        field_where = f"{where}.{key}" if where else key
        section_default = base[key] if key in base else _field_default(cls, key)
        if isinstance(value, dict) and dataclasses.is_dataclass(section_default) and "preset" not in value:
            kwargs[key] = from_dict(type(section_default), value, field_where, defaults=section_default)
        else:
            kwargs[key] = _coerce(value, types_[key], field_where)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{label}: {err}") from None


def _field_default(cls: type, name: str) -> Any:
    """The default value of field ``name`` of dataclass ``cls`` (None when it has none)."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def to_dict(config: Any) -> Any:
    """Plain-data (YAML/JSON-safe) form of a config dataclass.

    Fields a class lists in ``OMIT_AT_DEFAULT`` are left out while they hold their default
    (``from_dict`` restores it): options added later keep older configs, their fingerprints
    and the run directories that recorded them valid.
    """
    if dataclasses.is_dataclass(config):
        omit = getattr(config, "OMIT_AT_DEFAULT", ())
        return {
            f.name: to_dict(getattr(config, f.name))
            for f in dataclasses.fields(config)
            if not (f.name in omit and getattr(config, f.name) == f.default)
        }
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"model.n_layers=4"`` -> (["model", "n_layers"], 4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {text!r}: empty key segment")
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw.strip() else ""
    except ConfigError as err:
        raise ConfigError(f"override {text!r}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from None
    return path, value


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``key.sub=value`` overrides to plain config data (returns a new dict)."""
    import copy

    data = copy.deepcopy(data) if data else {}
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if isinstance(child, str):  # `model: tiny` shorthand becomes a mapping
                child = {"preset": child}
            elif child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a mapping")
            node[part] = child
            node = child
        node[path[-1]] = value
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"line {line}: duplicate key {key!r} (first given on line {seen[key]})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping (duplicate keys are errors), with errors that name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {err.start}); expected a YAML file") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level, got {type(data).__name__}")
    return data


def load(
    cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (), where: str = ""
) -> T:
    """Load ``cls`` from a YAML file (optional) plus command-line overrides."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    try:
        return from_dict(cls, data, where)
    except ConfigError as err:
        if path is not None:
            raise ConfigError(f"{path}: {err}") from None
        raise


def dump_yaml(config: Any, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------

DType = Literal["float32", "bfloat16", "float16"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer: OLMo-1 by default, other HF families through named options.

    Default blocks are pre-norm: norm -> causal attention (RoPE, optional GQA) -> residual ->
    norm -> SwiGLU MLP -> residual; ``norm="nonparametric"`` is OLMo-1B's LayerNorm without
    scale or bias. The architecture options below default to that block; each changes one
    thing and the rest of the code ignores them (``jaxlm.hf`` maps each HF family onto them):

    - ``norm_position``: ``"pre"`` normalises each sublayer's input; ``"post"`` normalises its
      output before the residual add (OLMo-2).
    - ``qk_norm``: RMSNorm of queries and keys before RoPE, over each projection's whole
      output (``"projection"``, OLMo-2) or over each head (``"head"``, Qwen3).
    - ``qkv_bias`` (Qwen2, GPT-NeoX, GPT-2), ``out_bias`` (the attention output projection),
      ``mlp_bias``: biases on those projections.
    - ``mlp_activation`` and ``gated_mlp``: ``down(act(gate(x)) * up(x))`` when gated, else
      ``down(act(up(x)))`` (GPT-NeoX ``gelu``, GPT-2 ``gelu_tanh``).
    - ``parallel_residual``: ``x + attn(norm1(x)) + mlp(norm2(x))`` (GPT-NeoX).
    - ``rotary_dim``: rotate only the first ``rotary_dim`` dims of each head (GPT-NeoX's
      partial rotary); None rotates all of them.
    - ``rope_scaling``: ``"linear"`` divides every frequency by ``rope_scaling_factor``;
      ``"llama3"`` is Llama 3.1's frequency-dependent scaling (``rope_low_freq_factor``,
      ``rope_high_freq_factor``, ``rope_original_max_len``).
    """

    vocab_size: int = 50304
    d_model: int = 2048
    n_layers: int = 16
    n_heads: int = 16
    n_kv_heads: int | None = None  # None: n_heads (multi-head); fewer: grouped-query
    head_dim: int | None = None  # None: d_model // n_heads
    mlp_hidden: int = 8192
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    # "rope": rotary (OLMo); "learned": a trained [max_seq_len, d_model] table added to the
    # token embedding; "none": no position signal beyond the causal mask.
    position_embedding: Literal["rope", "learned", "none"] = "rope"
    norm: Literal["nonparametric", "layernorm", "rmsnorm"] = "nonparametric"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    dtype: DType = "float32"  # compute dtype; parameters are always float32
    remat: Literal["none", "block", "minimal"] = "none"  # rematerialisation per block
    scan_layers: bool = True  # one compiled block scanned over layers (fast compile)
    # "softmax": jaxlm's own attention (float32 logits); "xla" / "cudnn": jax.nn.dot_product_attention
    # with that implementation ("cudnn": the fused flash kernel on NVIDIA GPUs, bf16/fp16 only).
    attention: Literal["softmax", "xla", "cudnn"] = "softmax"
    # Architecture options (see the class docstring).
    norm_position: Literal["pre", "post"] = "pre"
    qk_norm: Literal["none", "projection", "head"] = "none"
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    mlp_activation: Literal["silu", "gelu", "gelu_tanh"] = "silu"
    gated_mlp: bool = True
    parallel_residual: bool = False
    rotary_dim: int | None = None
    rope_scaling: Literal["none", "linear", "llama3"] = "none"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192

    OMIT_AT_DEFAULT: typing.ClassVar[tuple[str, ...]] = (
        "norm_position", "qk_norm", "qkv_bias", "out_bias", "mlp_bias", "mlp_activation", "gated_mlp",
        "parallel_residual", "rotary_dim", "rope_scaling", "rope_scaling_factor", "rope_low_freq_factor",
        "rope_high_freq_factor", "rope_original_max_len", "attention",
    )

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_hidden", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}: expected a positive integer, got {getattr(self, name)}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"model.n_heads: d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}) "
                "unless head_dim is set"
            )
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            raise ConfigError(
                f"model.n_kv_heads: expected a positive divisor of n_heads ({self.n_heads}), got {self.n_kv_heads}"
            )
        if self.position_embedding == "rope" and self.resolved_rotary_dim % 2:
            what = "rotary_dim" if self.rotary_dim is not None else "head_dim"
            raise ConfigError(f"model.{what}: RoPE needs an even number of rotated dims, got {self.resolved_rotary_dim}")
        if self.rotary_dim is not None and not 0 < self.rotary_dim <= self.resolved_head_dim:
            raise ConfigError(f"model.rotary_dim: expected 1..head_dim ({self.resolved_head_dim}), got {self.rotary_dim}")
        if self.rope_theta <= 0:
            raise ConfigError(f"model.rope_theta: expected a positive number, got {self.rope_theta}")
        if self.rope_scaling != "none" and self.rope_scaling_factor <= 0:
            raise ConfigError(f"model.rope_scaling_factor: expected a positive number, got {self.rope_scaling_factor}")
        if self.rope_scaling == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ConfigError(
                "model.rope_low_freq_factor / rope_high_freq_factor: expected 0 < low < high, got "
                f"{self.rope_low_freq_factor} and {self.rope_high_freq_factor}"
            )
        if self.rope_original_max_len <= 0:
            raise ConfigError(f"model.rope_original_max_len: expected a positive integer, got {self.rope_original_max_len}")
        if self.norm_position == "post" and self.parallel_residual:
            raise ConfigError("model.norm_position = 'post' with parallel_residual: no family computes it; choose one")

    @property
    def resolved_rotary_dim(self) -> int:
        return self.rotary_dim if self.rotary_dim is not None else self.resolved_head_dim

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def resolved_kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    def num_params(self, include_embeddings: bool = True) -> int:
        d, h, kv, hd, f = self.d_model, self.n_heads, self.resolved_kv_heads, self.resolved_head_dim, self.mlp_hidden
        attn = d * hd * (h + 2 * kv) + h * hd * d
        attn += hd * (h + 2 * kv) * self.qkv_bias + d * self.out_bias
        attn += {"none": 0, "projection": hd * (h + kv), "head": 2 * hd}[self.qk_norm]
        mlp = (3 if self.gated_mlp else 2) * d * f + ((2 * f if self.gated_mlp else f) + d) * self.mlp_bias
        norms = 0 if self.norm == "nonparametric" else (2 if self.norm == "layernorm" else 1) * d * (2 * self.n_layers + 1)
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        if self.position_embedding == "learned":
            embed += self.max_seq_len * d
        return self.n_layers * (attn + mlp) + norms + (embed if include_embeddings else 0)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), 6N plus attention (PaLM appendix B)."""
        t = seq_len or self.max_seq_len
        n = self.num_params(include_embeddings=False) + self.vocab_size * self.d_model
        attn = 12 * self.n_layers * self.n_heads * self.resolved_head_dim * t
        return 6.0 * n + attn


MODEL_PRESETS: dict[str, ModelConfig] = {
    # Unit tests: compiles and runs in well under a second on CPU.
    "tiny": ModelConfig(
        vocab_size=256, d_model=32, n_layers=2, n_heads=4, mlp_hidden=64, max_seq_len=64, init_std=0.1
    ),
    # Laptop / CI-scale science: 8.4M parameters (2.1M of them the tied embedding).
    "cpu-small": ModelConfig(
        vocab_size=8192, d_model=256, n_layers=6, n_heads=8, mlp_hidden=1024, max_seq_len=256
    ),
    # ~150M parameters for a single GPU.
    "gpu-150m": ModelConfig(
        vocab_size=50304, d_model=768, n_layers=12, n_heads=12, mlp_hidden=3072, max_seq_len=1024, dtype="bfloat16"
    ),
    # A ~100M-parameter Llama-shaped model (RMSNorm, GQA, untied head; the HF llama family's
    # block): the bring-your-own-model benchmark (tools/bench_model.py --family llama).
    "llama-100m": ModelConfig(
        vocab_size=16384, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, mlp_hidden=2048, max_seq_len=1024,
        rope_theta=500000.0, norm="rmsnorm", norm_eps=1e-6, tie_embeddings=False,
    ),
    # The official OLMo-1B architecture (allenai/OLMo-1B-hf config.json).
    "olmo-1b": ModelConfig(
        vocab_size=50304,
        d_model=2048,
        n_layers=16,
        n_heads=16,
        mlp_hidden=8192,
        max_seq_len=2048,
        rope_theta=10000.0,
        norm="nonparametric",
        tie_embeddings=True,
        dtype="bfloat16",
    ),
}

# Presets per config class; ``from_dict`` resolves ``preset: NAME`` (or a bare name) through it.
PRESETS: dict[type, dict[str, Any]] = {ModelConfig: MODEL_PRESETS}


def model_preset(name: str, **changes: Any) -> ModelConfig:
    """A model preset by name, optionally with fields changed (validated)."""
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; valid presets: {', '.join(MODEL_PRESETS)}")
    return dataclasses.replace(MODEL_PRESETS[name], **changes)


# ---------------------------------------------------------------------------------------
# Device mesh
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape over axes (data, fsdp, tensor). -1 means "all remaining devices"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1:
            raise ConfigError("mesh: at most one of data/fsdp/tensor may be -1")
        for name, size in zip(("data", "fsdp", "tensor"), sizes):
            if size == 0 or size < -1:
                raise ConfigError(f"mesh.{name}: expected a positive integer or -1, got {size}")

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        known = 1
        for s in sizes:
            if s != -1:
                known *= s
        if -1 in sizes:
            if num_devices % known:
                raise ConfigError(f"mesh: {num_devices} devices are not divisible by the fixed axes' product {known}")
            sizes[sizes.index(-1)] = num_devices // known
        if sizes[0] * sizes[1] * sizes[2] != num_devices:
            raise ConfigError(
                f"mesh: data*fsdp*tensor = {sizes[0] * sizes[1] * sizes[2]} but {num_devices} devices are available"
            )
        return tuple(sizes)  # type: ignore[return-value]
