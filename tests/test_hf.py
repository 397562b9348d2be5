"""HF interop: jaxlm.hf loads/saves OlmoForCausalLM checkpoints with transformers' logits."""

import json

import jax
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxlm import hf, model  # noqa: E402
from jaxlm.config import model_preset  # noqa: E402

SMALL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    rope_theta=500.0,
    pad_token_id=None,
    bos_token_id=None,
    eos_token_id=None,
)
CASES = {
    "tied": dict(tie_word_embeddings=True),
    # Grouped-query attention, head_dim != hidden/heads, separate lm_head.
    "gqa_untied": dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
}
TOLERANCE = 1e-4


def hf_model(case: str, seed: int = 0, std: float = 0.15):
    """A random fp32 OlmoForCausalLM; weights large enough that attention is far from uniform."""
    torch.manual_seed(seed)
    config = transformers.OlmoConfig(**SMALL, **CASES[case])
    m = transformers.OlmoForCausalLM(config).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, std)
    return m


def hf_logits(m, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return m(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def random_tokens(seed: int = 0, shape=(2, 24)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, SMALL["vocab_size"], shape).astype(np.int32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_matches_transformers(tmp_path, case):
    m = hf_model(case)
    m.save_pretrained(tmp_path)
    config, params = hf.load(tmp_path)
    assert config.tie_embeddings == CASES[case]["tie_word_embeddings"]
    assert config.resolved_kv_heads == CASES[case].get("num_key_value_heads", 4)
    assert config.norm == "nonparametric" and config.rope_theta == 500.0
    shapes = jax.tree.map(lambda s: s.shape, model.param_shapes(config))
    assert jax.tree.map(np.shape, params) == shapes

    tokens = random_tokens()
    ours = np.asarray(model.forward(config, params, tokens).logits)
    reference = hf_logits(m, tokens)
    assert np.abs(ours - reference).max() <= TOLERANCE
    # The comparison is sensitive to the position encoding: RoPE is relative, so stretch
    # the distances (a uniform shift would change nothing).
    positions = np.broadcast_to(2 * np.arange(tokens.shape[1]), tokens.shape)
    shifted = np.asarray(model.forward(config, params, tokens, positions=positions).logits)
    assert np.abs(shifted - reference).max() > 100 * TOLERANCE


@pytest.mark.parametrize("case", sorted(CASES))
def test_save_reloads_in_transformers(tmp_path, case):
    config = hf.config_from_hf({"model_type": "olmo", **SMALL, **CASES[case]}, init_std=0.15)
    params = model.init_params(config, 1)
    hf.save(config, params, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["architectures"] == ["OlmoForCausalLM"]
    assert written["pad_token_id"] is None and written["eos_token_id"] is None

    m, info = transformers.OlmoForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert m.config.num_key_value_heads == config.resolved_kv_heads
    tokens = random_tokens(seed=1)
    ours = np.asarray(model.forward(config, params, tokens).logits)
    assert np.abs(ours - hf_logits(m.eval(), tokens)).max() <= TOLERANCE

    # And back: jaxlm reads its own output exactly.
    config_again, params_again = hf.load(tmp_path, init_std=0.15)
    assert config_again == config
    jax.tree.map(np.testing.assert_array_equal, params_again, params)


def test_sharded_bfloat16_checkpoint(tmp_path):
    m = hf_model("gqa_untied")
    m.save_pretrained(tmp_path / "fp32")
    m.to(torch.bfloat16).save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 3

    _, fp32 = hf.load(tmp_path / "fp32")
    config, params = hf.load(tmp_path / "sharded")
    assert config.n_kv_heads == 2 and not config.tie_embeddings
    rounded = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32), fp32)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(rounded)):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)


def test_save_bfloat16_roundtrip(tmp_path):
    config = model_preset("tiny")
    params = model.init_params(config, 0)
    hf.save(config, params, tmp_path, dtype="bfloat16", token_ids={"eos_token_id": 3})
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == 3
    loaded_config, loaded = hf.load(tmp_path, init_std=config.init_std)
    assert loaded_config == config
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(got, np.asarray(want).astype(ml_dtypes.bfloat16).astype(np.float32))


def _hf_dict(**changes):
    return {"model_type": "olmo", "architectures": ["OlmoForCausalLM"], **SMALL, **changes}


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(model_type="mamba"), "model_type"),
        (dict(architectures=["LlamaForCausalLM"]), "architectures"),
        (dict(attention_bias="yes"), "attention_bias"),
        (dict(clip_qkv=8.0), "clip_qkv"),
        (dict(hidden_act="relu"), "hidden_act"),
        (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_type"),
        (dict(rope_scaling={"type": "linear"}), "factor"),
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 500.0, "factor": 2.0}), "rope_type"),
        (dict(num_attention_heads=5), "num_attention_heads"),
        (dict(num_key_value_heads=3), "n_kv_heads"),
        (dict(hidden_size="64"), "hidden_size"),
    ],
)
def test_unsupported_configs_are_refused(changes, field):
    with pytest.raises(ValueError, match=field) as err:
        hf.config_from_hf(_hf_dict(**changes))
    if field in changes:
        assert repr(changes[field]) in str(err.value)


def test_missing_required_field_is_named():
    data = _hf_dict()
    del data["intermediate_size"]
    with pytest.raises(ValueError, match="intermediate_size"):
        hf.config_from_hf(data)


def test_hf_defaults_and_legacy_rope_fields():
    data = _hf_dict()
    for key in ("max_position_embeddings", "rope_theta"):
        del data[key]
    config = hf.config_from_hf(data)
    # transformers' OlmoConfig defaults: untied head, 2048 positions, theta 10000.
    assert not config.tie_embeddings and config.max_seq_len == 2048 and config.rope_theta == 10000.0
    new_style = hf.config_from_hf(_hf_dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0}))
    assert new_style.rope_theta == 500.0
    with pytest.raises(ValueError, match="rope_theta"):
        hf.config_from_hf(_hf_dict(rope_parameters={"rope_type": "default", "rope_theta": 1000.0}))


def test_olmo_1b_config_in_transformers_4_format():
    """An OLMo-1B config.json as transformers 4.x writes it (rope_theta, torch_dtype, pretraining_tp)."""
    legacy = {
        "architectures": ["OlmoForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": None, "clip_qkv": None, "eos_token_id": 50279, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
        "max_position_embeddings": 2048, "model_type": "olmo", "num_attention_heads": 16,
        "num_hidden_layers": 16, "num_key_value_heads": 16, "pad_token_id": 1, "pretraining_tp": 1,
        "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "float32",
        "transformers_version": "4.40.0", "use_cache": True, "vocab_size": 50304,
    }  # fmt: skip
    assert hf.config_from_hf(legacy) == model_preset("olmo-1b", dtype="float32")
    assert hf.config_from_hf(legacy, dtype="bfloat16") == model_preset("olmo-1b")
    assert hf.special_token_ids(legacy) == {"bos_token_id": None, "eos_token_id": 50279, "pad_token_id": 1}


def test_config_to_hf_roundtrip_and_refusals():
    for config in (model_preset("olmo-1b", dtype="float32"), model_preset("tiny", n_kv_heads=2, head_dim=16)):
        assert hf.config_from_hf(hf.config_to_hf(config), init_std=config.init_std) == config
        assert transformers.OlmoConfig.from_dict(hf.config_to_hf(config)).rope_parameters["rope_theta"] == config.rope_theta
    with pytest.raises(ValueError, match="model.norm.*rmsnorm"):
        hf.config_to_hf(model_preset("tiny", norm="rmsnorm"))
    with pytest.raises(ValueError, match="model.norm_eps"):
        hf.config_to_hf(model_preset("tiny", norm_eps=1e-6))
    with pytest.raises(ValueError, match="model.position_embedding"):
        hf.config_to_hf(model_preset("tiny", position_embedding="learned"))
    with pytest.raises(ValueError, match="token_ids.eos_token_id"):
        hf.config_to_hf(model_preset("tiny"), token_ids={"eos_token_id": 10_000})


def test_save_refuses_params_hf_cannot_hold(tmp_path):
    config = model_preset("tiny")
    params = model.init_params(config, 0)

    def with_layer_param(group, name, value):
        layers = {**params["layers"], group: {**params["layers"][group], name: value}}
        return {**params, "layers": layers}

    baked = with_layer_param("attention", "out_bias", np.zeros((2, 32)))  # as jaxlm.intervene bakes
    with pytest.raises(ValueError, match="layers.attention.out_bias"):
        hf.save(config, baked, tmp_path)
    with pytest.raises(ValueError, match="layers.mlp.up has shape"):
        hf.save(config, with_layer_param("mlp", "up", np.zeros((2, 32, 65))), tmp_path)
    with pytest.raises(ValueError, match="rmsnorm"):
        hf.save(model_preset("tiny", norm="rmsnorm"), params, tmp_path)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    config = model_preset("tiny")
    hf.save(config, model.init_params(config, 0), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.layers.0.self_attn.q_norm.weight"] = np.ones(32, np.float32)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing tensor.*model.layers.1.mlp.up_proj.weight") as err:
        hf.load(tmp_path)
    assert "unexpected tensor(s): model.layers.0.self_attn.q_norm.weight" in str(err.value)


def test_misshapen_tensor_and_missing_files_are_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    config = model_preset("tiny")
    hf.save(config, model.init_params(config, 0), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 32), np.float32)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj.weight has shape \(16, 32\), expected \(32, 32\)"):
        hf.load(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors.index.json"):
        hf.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load(tmp_path / "nowhere")
