"""Parity with transformers for every HF family ``jaxlm.hf`` imports.

Each family gets two tiny random-weight fp32 models built by transformers: one with grouped-query
attention and an untied head where the family has them, one plain/tied, each switching on the
family's options (llama3 RoPE scaling and biases, a head_dim != hidden/heads, partial rotary and
the sequential residual, ...). Per model: logits, greedy generation, the ``head_out`` site
against the input of HF's output projection, ITI- and CAA-style edits against the equivalent
torch hooks, and export -> import round trips; then bf16 and sharded checkpoints,
``checkpoint.load_model``, and the configs and checkpoints that are refused.
(tests/test_hf.py covers OLMo-1 details; tests/test_intervention_protocol.py the edit math.)
"""

import copy
import dataclasses
import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import CLEAN_WORDS, synthetic_documents  # noqa: E402

from jaxlm import decode, hf, model  # noqa: E402
from jaxlm.checkpoint import load_model  # noqa: E402
from jaxlm.config import model_preset  # noqa: E402
from jaxlm.hf import HFError  # noqa: E402
from jaxlm.intervene import Intervention, add_edit  # noqa: E402

TOLERANCE = 1e-4  # relative: max |ours - theirs| / max |theirs|
N_NEW = 8
PROMPT_SHAPE = (2, 24)
WEIGHT_STD = 0.15
NO_SPECIAL_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, **NO_SPECIAL_TOKENS)
GPT2_BASE = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, **NO_SPECIAL_TOKENS)
# Llama 3.1 scaling with a short original context, so the 24-token prompts reach the scaled band.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# case -> (family, HF config kwargs, ModelConfig fields the import must produce)
CASES = {
    "olmo-gqa": ("olmo", dict(BASE, num_key_value_heads=2, tie_word_embeddings=False),
                 dict(n_kv_heads=2, tie_embeddings=False, norm="nonparametric")),
    "olmo-tied": ("olmo", dict(BASE, tie_word_embeddings=True), dict(n_kv_heads=None, tie_embeddings=True)),
    "olmo2-gqa": ("olmo2", dict(BASE, num_key_value_heads=2, tie_word_embeddings=False),
                  dict(n_kv_heads=2, norm_position="post", qk_norm="projection", qkv_bias=False)),
    "olmo2-tied-bias": ("olmo2", dict(BASE, tie_word_embeddings=True, attention_bias=True),
                        dict(tie_embeddings=True, qkv_bias=True, out_bias=True)),
    "llama-gqa": ("llama", dict(BASE, num_key_value_heads=2, tie_word_embeddings=False),
                  dict(n_kv_heads=2, norm="rmsnorm", rope_scaling="none", qkv_bias=False, mlp_bias=False)),
    "llama-tied-llama3-bias": ("llama", dict(BASE, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE,
                                             attention_bias=True, mlp_bias=True),
                               dict(tie_embeddings=True, rope_scaling="llama3", rope_original_max_len=16,
                                    rope_scaling_factor=8.0, qkv_bias=True, out_bias=True, mlp_bias=True)),
    "qwen2-gqa": ("qwen2", dict(BASE, num_key_value_heads=2, tie_word_embeddings=False),
                  dict(n_kv_heads=2, qkv_bias=True, out_bias=False)),
    "qwen2-tied": ("qwen2", dict(BASE, num_key_value_heads=4, tie_word_embeddings=True), dict(tie_embeddings=True, qkv_bias=True)),
    "qwen3-gqa-head-dim": ("qwen3", dict(BASE, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False),
                           dict(n_kv_heads=2, head_dim=24, qk_norm="head")),
    "qwen3-tied": ("qwen3", dict(BASE, num_key_value_heads=4, head_dim=16, tie_word_embeddings=True),
                   dict(head_dim=None, tie_embeddings=True, qk_norm="head")),
    "gpt_neox-untied": ("gpt_neox", dict(BASE, tie_word_embeddings=False),
                        dict(rotary_dim=4, parallel_residual=True, norm="layernorm", gated_mlp=False)),
    "gpt_neox-tied-sequential": ("gpt_neox", dict(BASE, tie_word_embeddings=True, use_parallel_residual=False),
                                 dict(rotary_dim=4, parallel_residual=False, tie_embeddings=True)),
    "gpt2": ("gpt2", dict(GPT2_BASE), dict(position_embedding="learned", mlp_hidden=256, mlp_activation="gelu_tanh")),
    "gpt2-inner-gelu": ("gpt2", dict(GPT2_BASE, n_inner=96, activation_function="gelu"),
                        dict(mlp_hidden=96, mlp_activation="gelu", tie_embeddings=True)),
}
ALL_CASES = sorted(CASES)
# The first case of each family (GQA / untied where the family has them) also runs the edit tests.
FIRST_SHAPES = sorted({family: name for name, (family, _, _) in reversed(CASES.items())}.values())


def hf_class(family):
    return getattr(transformers, hf.FAMILIES[family].architecture)


def build_hf_model(family, kwargs, seed=0):
    """A random fp32 model: every weight N(0, 0.15), norm scales 1 + N(0, 0.15) (scales near 0
    would shrink q and k until attention is nearly uniform, hiding position and mask bugs)."""
    torch.manual_seed(seed)
    cls = hf_class(family)
    m = cls(cls.config_class(**kwargs)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(0.0, WEIGHT_STD)
            if p.ndim == 1 and ("norm" in name or ".ln_" in name) and name.endswith(".weight"):
                p.add_(1.0)
    return m


def hf_blocks(m, family):
    return {"gpt2": lambda: m.transformer.h, "gpt_neox": lambda: m.gpt_neox.layers}.get(family, lambda: m.model.layers)()


def hf_out_projection(block, family):
    """The module HF feeds each layer's concatenated heads [B, T, H * D] (head-major) into."""
    return {"gpt2": lambda: block.attn.c_proj, "gpt_neox": lambda: block.attention.dense}.get(
        family, lambda: block.self_attn.o_proj)()


def relative_error(ours, theirs):
    return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())


def with_hooks(hooks, fn):
    """``fn()`` with torch ``hooks`` [(module, "pre" | "post", hook)] registered."""
    handles = [module.register_forward_pre_hook(hook) if kind == "pre" else module.register_forward_hook(hook)
               for module, kind, hook in hooks]
    try:
        with torch.inference_mode():
            return fn()
    finally:
        for handle in handles:
            handle.remove()


def hf_forward(m, family, tokens):
    """HF logits and the inputs of every layer's output projection, [L, B, T, H * D]."""
    inputs = []
    hooks = [(hf_out_projection(block, family), "pre", lambda module, args: inputs.append(args[0].clone()))
             for block in hf_blocks(m, family)]
    logits = with_hooks(hooks, lambda: m(torch.from_numpy(tokens).long()).logits)
    return logits.numpy(), np.stack([x.numpy() for x in inputs])


def hf_generate(m, tokens, hooks=()):
    """transformers' greedy tokens [B, N_NEW] and their log-probabilities, with ``hooks``."""
    ids = torch.from_numpy(tokens).long()
    out = with_hooks(hooks, lambda: m.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N_NEW, min_new_tokens=N_NEW,
        eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True))
    new = out.sequences[:, tokens.shape[1]:]
    logprobs = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)
    return new.numpy(), torch.gather(logprobs, -1, new[..., None])[..., 0].numpy()


def jaxlm_generate(built, intervention=None):
    out = decode.generate(built.config, built.params, built.tokens, max_new_tokens=N_NEW, intervention=intervention,
                          return_logprobs=True)
    return np.asarray(out.tokens), np.asarray(out.logprobs)


@dataclasses.dataclass
class Built:
    """One case: the HF model and its checkpoint, what jaxlm loads, and both forwards on ``tokens``."""

    name: str
    family: str
    hf_model: object
    path: object
    config: object
    params: dict
    tokens: np.ndarray
    hf_logits: np.ndarray
    hf_head_in: np.ndarray  # [L, B, T, H * D]
    logits: np.ndarray
    head_out: np.ndarray  # [L, B, T, H, D]


@pytest.fixture(scope="module")
def built(request, tmp_path_factory):
    name = request.param
    family, kwargs, _ = CASES[name]
    m = build_hf_model(family, kwargs)
    path = tmp_path_factory.mktemp(name)
    m.save_pretrained(path)
    config, params = hf.load(path)
    seed = ALL_CASES.index(name)
    tokens = np.random.default_rng(seed).integers(0, BASE["vocab_size"], PROMPT_SHAPE).astype(np.int32)
    hf_logits, hf_head_in = hf_forward(m, family, tokens)
    out = model.forward(config, params, tokens, capture=("head_out",))
    return Built(name, family, m, path, config, params, tokens, hf_logits, hf_head_in,
                 np.asarray(out.logits), np.asarray(out.captures["head_out"]))


every_case = pytest.mark.parametrize("built", ALL_CASES, indirect=True)
first_shapes = pytest.mark.parametrize("built", FIRST_SHAPES, indirect=True)


# -- forward, generation and the head_out site ----------------------------------------------


@every_case
def test_import_sets_the_family_options_and_matches_logits(built):
    for field, value in CASES[built.name][2].items():
        assert getattr(built.config, field) == value, field
    assert built.config.vocab_size == 128 and built.config.n_layers == 2 and built.config.n_heads == 4
    assert jax.tree.map(np.shape, built.params) == jax.tree.map(lambda s: s.shape, model.param_shapes(built.config))
    assert relative_error(built.logits, built.hf_logits) <= TOLERANCE


@pytest.mark.parametrize("built", ["llama-tied-llama3-bias"], indirect=True)
def test_parity_depends_on_the_llama3_scaling_and_positions(built):
    """The comparison can fail: unscaled RoPE, or stretched positions, are far from transformers."""
    unscaled = dataclasses.replace(built.config, rope_scaling="none", rope_scaling_factor=1.0)
    logits = np.asarray(model.forward(unscaled, built.params, built.tokens).logits)
    assert relative_error(logits, built.hf_logits) > 100 * TOLERANCE
    positions = np.broadcast_to(2 * np.arange(built.tokens.shape[1]), built.tokens.shape)
    stretched = np.asarray(model.forward(built.config, built.params, built.tokens, positions=positions).logits)
    assert relative_error(stretched, built.hf_logits) > 100 * TOLERANCE


@every_case
def test_greedy_generation_is_token_identical(built):
    tokens, logprobs = jaxlm_generate(built)
    hf_tokens, hf_logprobs = hf_generate(built.hf_model, built.tokens)
    np.testing.assert_array_equal(tokens, hf_tokens)
    np.testing.assert_allclose(logprobs, hf_logprobs, rtol=0, atol=1e-4)


@every_case
def test_head_out_is_the_input_of_the_output_projection(built):
    n_layers, batch, length, heads, head_dim = built.head_out.shape
    assert (n_layers, batch, length, heads) == (2, *PROMPT_SHAPE, 4)
    assert head_dim == built.config.resolved_head_dim
    flat = built.head_out.reshape(n_layers, batch, length, heads * head_dim)
    assert relative_error(flat, built.hf_head_in) <= TOLERANCE


# -- ITI- and CAA-style edits against torch hooks --------------------------------------------


SCALE = 1.5


def iti_edit(built):
    """An add at head_out on heads 0 and 2 of layer 1, and the pre-hook on that layer's output
    projection adding the same (flattened, head-major) vector."""
    n_layers, heads, head_dim = built.config.n_layers, built.config.n_heads, built.config.resolved_head_dim
    chosen = np.zeros((n_layers, heads), bool)
    chosen[1, [0, 2]] = True
    v = np.where(chosen[..., None], 2.0 * np.random.default_rng(5).normal(size=(n_layers, heads, head_dim)), 0.0)
    edit = add_edit("head_out", v, layer_mask=chosen.any(axis=1), head_mask=chosen, positions="all")
    shift = torch.from_numpy(SCALE * v[1].reshape(heads * head_dim)).float()
    module = hf_out_projection(hf_blocks(built.hf_model, built.family)[1], built.family)
    return edit, (module, "pre", lambda mod, args: (args[0] + shift, *args[1:]))


def caa_edit(built):
    """An add at resid_post of layer 0, and the forward hook adding it to that decoder layer's output."""
    n_layers, d_model = built.config.n_layers, built.config.d_model
    v = np.zeros((n_layers, d_model))
    v[0] = 2.0 * np.random.default_rng(6).normal(size=d_model)
    edit = add_edit("resid_post", v, layer_mask=np.arange(n_layers) == 0, positions="all")
    shift = torch.from_numpy(SCALE * v[0]).float()

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + shift, *output[1:])
        return output + shift

    return edit, (hf_blocks(built.hf_model, built.family)[0], "post", hook)


@first_shapes
@pytest.mark.parametrize("make_edit", [iti_edit, caa_edit], ids=["iti_head_out", "caa_resid_post"])
def test_edits_match_transformers_hooks(built, make_edit):
    edit, hook = make_edit(built)
    tokens, logprobs = jaxlm_generate(built, Intervention.from_edits([edit], scale=SCALE))
    hf_tokens, hf_logprobs = hf_generate(built.hf_model, built.tokens, [hook])
    np.testing.assert_array_equal(tokens, hf_tokens)
    np.testing.assert_allclose(logprobs, hf_logprobs, rtol=0, atol=1e-4)
    unedited, _ = hf_generate(built.hf_model, built.tokens)
    assert (tokens != unedited).any()  # the edit mattered


# -- export -> import ----------------------------------------------------------------------


@every_case
def test_export_round_trip_is_exact_in_both_directions(built, tmp_path):
    hf.save(built.config, built.params, tmp_path, family=built.family)
    config, params = hf.load(tmp_path)
    assert config == built.config
    jax.tree.map(np.testing.assert_array_equal, params, built.params)

    m, info = hf_class(built.family).from_pretrained(tmp_path, output_loading_info=True)
    problems = ("missing_keys", "unexpected_keys", "mismatched_keys")
    assert {key: sorted(map(str, info[key])) for key in problems} == {key: [] for key in problems}
    with torch.inference_mode():
        logits = m.eval()(torch.from_numpy(built.tokens).long()).logits.numpy()
    assert relative_error(logits, built.hf_logits) <= 1e-6  # the same weights: at most float32 rounding


@pytest.mark.parametrize("built", ["qwen3-gqa-head-dim"], indirect=True)
def test_bfloat16_checkpoint_loads_upcast(built, tmp_path):
    copy.deepcopy(built.hf_model).to(torch.bfloat16).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    config, params = hf.load(tmp_path)
    assert config == built.config
    rounded = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32), built.params)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(rounded)):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("built", ["gpt_neox-untied"], indirect=True)
def test_sharded_checkpoint_loads(built, tmp_path):
    built.hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 3
    config, params = hf.load(tmp_path)
    assert config == built.config
    jax.tree.map(np.testing.assert_array_equal, params, built.params)


@pytest.fixture(scope="module")
def tokenizer():
    from jaxlm.tokenizer import train_bpe

    return train_bpe(synthetic_documents(CLEAN_WORDS, 40, seed=0), 300)


@every_case
def test_load_model_reads_each_family_and_its_tokenizer(built, tokenizer, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(built.path, path)
    loaded = load_model(path)
    assert loaded.config == built.config and loaded.tokenizer is None and loaded.step is None
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.params), built.params)

    tokenizer.save(path)
    loaded = load_model(path)
    text = "the river ran past old stone houses"
    assert loaded.tokenizer.encode(text) == tokenizer.encode(text)
    assert loaded.tokenizer.eos_id == tokenizer.eos_id


# -- refusals ---------------------------------------------------------------------------------


def refusal(tmp_path, hf_config):
    """The message of the ``HFError`` that ``hf.load`` raises for a checkpoint with ``hf_config``."""
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    with pytest.raises(HFError) as err:
        hf.load(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "config.json") in message
    return message


def hf_config_dict(family, **kwargs):
    cls = hf_class(family)
    return {**cls.config_class(**kwargs).to_dict(), "architectures": [cls.__name__]}


def test_qwen2_sliding_window_is_refused(tmp_path):
    message = refusal(tmp_path, hf_config_dict("qwen2", **BASE, use_sliding_window=True, sliding_window=16))
    assert "'use_sliding_window' = True" in message


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 32},
    {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
], ids=lambda rope: rope["rope_type"])
def test_llama_rope_types_jaxlm_does_not_compute_are_refused(tmp_path, rope):
    config = dict(hf_config_dict("llama", **BASE), rope_parameters=rope)
    message = refusal(tmp_path, config)
    assert f"'rope_parameters.rope_type' = {rope['rope_type']!r}" in message
    assert "default, linear, llama3" in message


def test_gpt2_inverse_layer_idx_scaling_is_refused(tmp_path):
    message = refusal(tmp_path, hf_config_dict("gpt2", **GPT2_BASE, scale_attn_by_inverse_layer_idx=True))
    assert "'scale_attn_by_inverse_layer_idx' = True" in message


def test_unknown_model_type_names_it_and_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    with pytest.raises(HFError, match="'mamba'") as err:
        hf.load(tmp_path)
    for model_type, family in hf.FAMILIES.items():
        assert f"{model_type} ({family.architecture})" in str(err.value)
    assert len(hf.FAMILIES) == 7


@pytest.mark.parametrize("built", ["llama-gqa"], indirect=True)
def test_a_missing_tensor_is_named(built, tmp_path):
    from safetensors.numpy import load_file, save_file

    path = tmp_path / "ckpt"
    shutil.copytree(built.path, path)
    tensors = load_file(path / "model.safetensors")
    gone = "model.layers.1.self_attn.k_proj.weight"
    del tensors[gone]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HFError, match=f"missing tensor\\(s\\): {gone}$"):
        hf.load(path)


def zero_params(config):
    return jax.tree.map(lambda s: np.zeros(s.shape, np.float32), model.param_shapes(config))


def neox_shaped_config():
    return hf.config_from_hf(hf_config_dict("gpt_neox", **BASE))


@pytest.mark.parametrize("make_config", [neox_shaped_config, lambda: model_preset("tiny")],
                         ids=["gpt_neox_shaped", "default_preset"])
def test_gpt2_export_of_a_rope_model_names_position_embedding(tmp_path, make_config):
    config = make_config()
    with pytest.raises(HFError) as err:
        hf.save(config, zero_params(config), tmp_path / "out", family="gpt2")
    assert "model.position_embedding = 'rope' (it has 'learned')" in str(err.value)
    if make_config is not neox_shaped_config:  # a SwiGLU model: the activation is named too
        assert "model.mlp_activation = 'silu' (it has 'gelu_tanh')" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_neox_shaped_model_exported_as_llama_names_the_differing_fields(tmp_path):
    config = neox_shaped_config()
    with pytest.raises(HFError, match="HF LlamaForCausalLM cannot express this model exactly: ") as err:
        hf.save(config, zero_params(config), tmp_path / "out", family="llama")
    message = str(err.value).split("exactly: ", 1)[1]
    named = {part.split(" = ")[0] for part in message.split("; ")}
    assert named == {"model.norm", "model.gated_mlp", "model.parallel_residual", "model.rotary_dim"}
    assert "model.rotary_dim = 4 (it has None)" in message
    assert not (tmp_path / "out").exists()
