import dataclasses

import pytest

from jaxlm.config import (
    MODEL_PRESETS,
    ConfigError,
    MeshConfig,
    ModelConfig,
    apply_overrides,
    dump_yaml,
    from_dict,
    load,
    model_preset,
    to_dict,
)


def test_presets_match_the_stated_architectures():
    olmo = MODEL_PRESETS["olmo-1b"]
    assert (olmo.n_layers, olmo.n_heads, olmo.d_model, olmo.mlp_hidden) == (16, 16, 2048, 8192)
    assert (olmo.vocab_size, olmo.max_seq_len, olmo.rope_theta) == (50304, 2048, 10000.0)
    assert olmo.norm == "nonparametric" and olmo.tie_embeddings and olmo.resolved_head_dim == 128
    assert 1.1e9 < olmo.num_params() < 1.25e9  # OLMo-1B has ~1.18B parameters
    assert 1e6 < MODEL_PRESETS["cpu-small"].num_params() < 2e7


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        MODEL_PRESETS["tiny"].d_model = 3


def test_yaml_with_preset_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: tiny\nn_layers: 3\n")
    cfg = load(ModelConfig, path, ["d_model=64", "rope_theta=5e5", "n_kv_heads=2"])
    assert cfg.n_layers == 3 and cfg.d_model == 64 and cfg.rope_theta == 500000.0 and cfg.n_kv_heads == 2
    assert cfg.vocab_size == MODEL_PRESETS["tiny"].vocab_size


def test_round_trip_through_yaml(tmp_path):
    cfg = model_preset("cpu-small", n_kv_heads=4)
    dump_yaml(cfg, tmp_path / "m.yaml")
    assert load(ModelConfig, tmp_path / "m.yaml") == cfg
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg


def test_unknown_key_names_it_and_lists_valid_ones():
    with pytest.raises(ConfigError) as err:
        from_dict(ModelConfig, {"d_modle": 4})
    message = str(err.value)
    assert "'d_modle'" in message and "valid keys" in message and "d_model" in message


def test_bad_type_names_field_and_expectation():
    with pytest.raises(ConfigError, match=r"n_layers: expected an integer, got 'four'"):
        from_dict(ModelConfig, {"n_layers": "four"})
    with pytest.raises(ConfigError, match=r"tie_embeddings: expected a boolean"):
        from_dict(ModelConfig, {"tie_embeddings": "yes"})
    with pytest.raises(ConfigError, match=r"dtype: expected one of 'float32', 'bfloat16', 'float16'"):
        from_dict(ModelConfig, {"dtype": "fp8"})


def test_bad_values():
    with pytest.raises(ConfigError, match="divisible by n_heads"):
        from_dict(ModelConfig, {"d_model": 30, "n_heads": 4})
    with pytest.raises(ConfigError, match="n_kv_heads"):
        from_dict(ModelConfig, {"n_heads": 4, "n_kv_heads": 3, "d_model": 32})
    with pytest.raises(ConfigError, match="positive integer"):
        from_dict(ModelConfig, {"n_layers": 0})
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny"):
        from_dict(ModelConfig, {"preset": "huge"})


def test_nested_overrides_and_errors():
    data = apply_overrides({"model": "tiny"}, ["model.n_layers=5", "mesh.tensor=2"])
    assert data == {"model": {"preset": "tiny", "n_layers": 5}, "mesh": {"tensor": 2}}
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        apply_overrides({}, ["model.n_layers"])


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml"):
        load(ModelConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("n_layers: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load(ModelConfig, bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("n_layers: 2\nbogus: 1\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml: .*'bogus'"):
        load(ModelConfig, wrong)


def test_mesh_resolution():
    assert MeshConfig().resolve(8) == (8, 1, 1)
    assert MeshConfig(data=-1, fsdp=2, tensor=2).resolve(8) == (2, 2, 2)
    with pytest.raises(ConfigError, match="not divisible"):
        MeshConfig(fsdp=3).resolve(8)
    with pytest.raises(ConfigError, match="at most one"):
        MeshConfig(data=-1, fsdp=-1)


@dataclasses.dataclass(frozen=True)
class _Section:
    size: int = 3


@dataclasses.dataclass(frozen=True)
class _WithOptionalSection:
    section: _Section | None = _Section()
    other: _Section | None = None


def test_null_switches_an_optional_section_off_and_a_mapping_merges_with_defaults():
    assert from_dict(_WithOptionalSection, {"section": None}).section is None
    assert from_dict(_WithOptionalSection, {"other": {}}).other == _Section()
    assert from_dict(_WithOptionalSection, {"other": {"size": 5}}).other == _Section(5)
    assert from_dict(_WithOptionalSection, {}) == _WithOptionalSection()
