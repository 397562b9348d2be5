"""Sharded inference (issue #20): a model loaded onto a mesh of the 8 simulated CPU devices with
the training shardings generates, collects activations and probes exactly as on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import CLEAN_WORDS, TOXIC_WORDS, synthetic_documents
from jaxlm import decode, hf, ops, sharding
from jaxlm.checkpoint import load_model
from jaxlm.cli import main
from jaxlm.config import ConfigError, MeshConfig
from jaxlm.intervene import Intervention, build_caa, build_iti
from jaxlm.model import CACHE_LOGICAL_AXES
from jaxlm.probe import ProbeConfig, collect_head_activations, train_probes

MESHES = {"data2-fsdp2-tensor2": MeshConfig(data=2, fsdp=2, tensor=2), "data8": MeshConfig(data=8)}
N_NEW = 6
PROMPT_LEN = 16  # every generation below pads its prompts to this length: shared programs


@pytest.fixture(scope="module")
def single(tiny_run_dir):
    return load_model(tiny_run_dir)


@pytest.fixture(scope="module", params=list(MESHES))
def sharded(request, tiny_run_dir):
    return load_model(tiny_run_dir, mesh=sharding.make_mesh(MESHES[request.param]))


@pytest.fixture(scope="module")
def texts():
    """12 clean then 12 toxic synthetic sentences (labels 0 and 1)."""
    return synthetic_documents(CLEAN_WORDS, 12, 5) + synthetic_documents(TOXIC_WORDS, 12, 6)


LABELS = np.array([0] * 12 + [1] * 12)


@pytest.fixture(scope="module")
def prompts(single, texts):
    """8 left-padded prompts: the first words of texts of both classes."""
    ids = [seq[:int(n)] for seq, n in zip(single.tokenizer.encode_batch(texts[::3]), np.arange(3, 11))]
    return decode.left_pad(ids, pad_id=single.tokenizer.pad_id, length=PROMPT_LEN)


def generate(model, prompts, rows=None, **kwargs):
    tokens, mask = prompts
    return decode.generate(model.config, model.params, tokens[:rows], prompt_mask=mask[:rows], max_new_tokens=N_NEW,
                           return_logprobs=True, **kwargs)


@pytest.fixture(scope="module")
def head_acts(single, texts):
    return collect_head_activations(single.config, single.params, single.tokenizer, texts, batch_size=6, progress=False)


# ---------------------------------------------------------------------------------------
# Loading onto a mesh
# ---------------------------------------------------------------------------------------


def test_load_model_places_the_params_with_the_training_shardings(single, sharded):
    mesh = sharding.mesh_of(sharded.params)
    assert mesh is not None and mesh.size == 8
    expected = sharding.param_shardings(sharded.config, mesh)
    for (path, leaf), want, ref in zip(jax.tree_util.tree_leaves_with_path(sharded.params), jax.tree.leaves(expected),
                                       jax.tree.leaves(single.params)):
        assert leaf.sharding == want, path
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref), err_msg=str(path))
    if mesh.shape["tensor"] == 2:  # embedding [vocab, embed]: vocab over tensor, embed over fsdp (FSDP)
        embedding = sharded.params["embedding"]
        assert embedding.sharding.spec == P("tensor", "fsdp")
        assert embedding.addressable_shards[0].data.shape == (sharded.config.vocab_size // 2, sharded.config.d_model // 2)
        assert sharded.params["layers"]["attention"]["q"].sharding.spec == P(None, "fsdp", "tensor", None)  # heads
    else:  # no parameter axis is sharded over data: every device holds all of it
        assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(sharded.params))


def test_hf_checkpoint_loads_onto_a_mesh(single, tmp_path):
    hf.save(single.config, single.params, tmp_path)
    mesh = sharding.make_mesh(MESHES["data2-fsdp2-tensor2"])
    loaded = load_model(tmp_path, mesh=mesh)
    assert jax.tree.leaves(jax.tree.map(lambda x: x.sharding, loaded.params)) == jax.tree.leaves(
        sharding.param_shardings(loaded.config, mesh))
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(load_model(tmp_path).params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_place_params_equals_loading_onto_the_mesh(single, sharded):
    placed = sharding.place_params(single.config, single.params, sharding.mesh_of(sharded.params))
    assert jax.tree.map(lambda x: x.sharding, placed) == jax.tree.map(lambda x: x.sharding, sharded.params)


@pytest.mark.parametrize("devices, mesh", [(3, MeshConfig(data=1, tensor=3)), (8, MeshConfig(data=1, tensor=8))])
def test_a_mesh_that_does_not_divide_the_model_is_one_clear_error(tiny_run_dir, single, devices, mesh):
    mesh = sharding.make_mesh(mesh, jax.devices()[:devices])
    message = rf"mesh data=1, fsdp=1, tensor={devices} does not divide the model: .*'heads' \(4\)"
    with pytest.raises(ConfigError, match=message) as err:
        load_model(tiny_run_dir, mesh=mesh)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="does not divide the model"):
        sharding.place_params(single.config, single.params, mesh)


# ---------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------


def assert_same_generation(got, want):
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-4)


@pytest.fixture(scope="module")
def iti(single, head_acts):
    probes = train_probes(head_acts, LABELS, ProbeConfig())
    return build_iti(head_acts, LABELS, accuracy=probes.accuracy, k=8, scale=20.0, positions="all")


def test_greedy_generation_equals_one_device(single, sharded, prompts, iti):
    baseline, steered = generate(single, prompts), generate(single, prompts, intervention=iti)
    assert (np.asarray(baseline.tokens) != np.asarray(steered.tokens)).any()  # the intervention matters
    assert_same_generation(generate(sharded, prompts), baseline)
    assert_same_generation(generate(sharded, prompts, intervention=iti), steered)
    # 5 prompts: filled up to the mesh's batch shards with copies of the last one, dropped again
    padded = generate(sharded, prompts, rows=5, intervention=iti)
    assert padded.tokens.shape == (5, N_NEW)
    np.testing.assert_array_equal(np.asarray(padded.tokens), np.asarray(steered.tokens)[:5])


def test_sampling_with_the_same_key_equals_one_device(single, sharded, prompts):
    kwargs = dict(temperature=1.0, top_p=0.9, rng=7, eos_id=single.tokenizer.eos_id)
    assert_same_generation(generate(sharded, prompts, **kwargs), generate(single, prompts, **kwargs))


def test_caa_generation_equals_one_device(single, sharded, prompts, texts):
    acts = ops.collect(single, texts, "resid_pre", batch_size=8, progress=False)
    caa = build_caa(acts, LABELS, layer=1, scale=4.0)
    assert_same_generation(generate(sharded, prompts, intervention=caa), generate(single, prompts, intervention=caa))


def test_the_kv_cache_is_sharded_in_prefill_and_decode(sharded, prompts):
    """The programs ``generate`` runs (the same arguments: no new compile), with the cache laid
    out per ``CACHE_LOGICAL_AXES``: batch over data x fsdp, kv heads over tensor."""
    mesh = sharding.mesh_of(sharded.params)
    tokens, mask = sharding.shard_batch(tuple(map(jnp.asarray, prompts)), mesh)
    intervention, rng = jax.device_put((Intervention.zeros(sharded.config).program_form(), jax.random.key(0)),
                                       sharding.replicated(mesh))
    settings = decode.SamplingSettings(max_new_tokens=N_NEW, return_logprobs=True)
    with sharding.activation_sharding(mesh):
        state = decode.prefill(sharded.params, tokens, mask, intervention, rng, config=sharded.config, settings=settings)
        expected = sharding.logical_to_sharding(CACHE_LOGICAL_AXES, mesh)
        for name in ("k", "v", "segment_ids"):
            array = getattr(state.cache, name)
            assert array.sharding.is_equivalent_to(getattr(expected, name), array.ndim), name
        if mesh.shape["tensor"] == 2:
            assert state.cache.k.sharding.spec == P(None, ("data", "fsdp"), None, "tensor")
        state = decode.decode(sharded.params, state, intervention, config=sharded.config, settings=settings)
    assert state.cache.k.sharding.is_equivalent_to(expected.k, 5)
    assert state.tokens.sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)


# ---------------------------------------------------------------------------------------
# Activations and probes
# ---------------------------------------------------------------------------------------


def test_collected_activations_and_probes_equal_one_device(sharded, texts, head_acts):
    # batch_size 6 is no multiple of the 4 or 8 batch shards: each batch is padded with empty rows
    acts = ops.collect(sharded, texts, "head_out", batch_size=6, progress=False)
    np.testing.assert_allclose(acts, head_acts, rtol=1e-5, atol=1e-5)
    want = train_probes(head_acts, LABELS, ProbeConfig())
    got = train_probes(acts, LABELS, ProbeConfig())
    np.testing.assert_array_equal(got.accuracy, want.accuracy)
    np.testing.assert_array_equal(got.ranking, want.ranking)
    np.testing.assert_allclose(got.weights, want.weights, rtol=1e-3, atol=1e-4)
    # the probes also read activations still on the mesh (gathered to the host)
    on_mesh = jax.device_put(acts, NamedSharding(sharding.mesh_of(sharded.params), P(("data", "fsdp"))))
    np.testing.assert_array_equal(train_probes(on_mesh, LABELS, ProbeConfig()).weights, got.weights)


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def test_cli_generate_on_a_mesh_equals_one_device(tiny_run_dir, capsys):
    base = ["generate", "--checkpoint", str(tiny_run_dir), "--prompt", "the river ran", "--prompt", "you stupid",
            "--max-new-tokens", "4", "--no-progress"]
    assert main(base) == 0
    one = capsys.readouterr().out
    assert main(base + ["--mesh", "data=2,fsdp=2,tensor=2"]) == 0
    assert capsys.readouterr().out == one
    assert main(base + ["--mesh", "tensor=8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxlm generate: error: mesh data=1, fsdp=1, tensor=8 does not divide the model")
    assert err.count("\n") == 1
    assert main(base + ["--mesh", "data=2,model=4"]) == 2
    assert "--mesh: expected data=N,fsdp=N,tensor=N" in capsys.readouterr().err
