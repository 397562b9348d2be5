"""Bring your own model: every HF family jaxlm imports runs through the command line
(probe -> steer -> generate -> eval -> export), and continued pretraining starts from an HF
checkpoint with its tokenizer (a dataset tokenized otherwise is refused)."""

import json
import shutil

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxlm import hf, model  # noqa: E402
from jaxlm.cli import main  # noqa: E402

VOCAB = 320  # the tiny prepared dataset's tokenizer (tests/conftest.py)
LLAMA_SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
FAMILIES = {
    "olmo": ("OlmoConfig", "OlmoForCausalLM", LLAMA_SHAPE),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", LLAMA_SHAPE),
    "llama": ("LlamaConfig", "LlamaForCausalLM", LLAMA_SHAPE),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", LLAMA_SHAPE),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**LLAMA_SHAPE, "head_dim": 16}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=64)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
}


def save_family(name: str, path, tokenizer_file):
    """A random-weight HF model of ``name`` saved by transformers, with the dataset's tokenizer."""
    config_cls, model_cls, shape = FAMILIES[name]
    torch.manual_seed(0)
    m = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**shape, bos_token_id=None, eos_token_id=0,
                                                                         pad_token_id=1))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.1)
    m.eval().save_pretrained(path)
    shutil.copy(tokenizer_file, path / "tokenizer.json")
    return m


@pytest.fixture(scope="module")
def family_dirs(tiny_prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_families")
    return {name: (save_family(name, root / name, tiny_prepared / "tokenizer.json"), root / name) for name in FAMILIES}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_probe_steer_generate_eval_export(family, family_dirs, crafted_data_dir, tmp_path, capsys):
    hf_model, checkpoint = family_dirs[family]
    common = ["--checkpoint", str(checkpoint), "--data-dir", str(crafted_data_dir), "--no-progress"]
    probe_dir = tmp_path / "probe"
    assert main(["probe", *common, "--data", "toxigen", "--out", str(probe_dir)]) == 0
    report = json.loads((probe_dir / "probe_report.json").read_text())
    assert np.asarray(report["accuracy"]).shape == (2, 4)  # layers x heads of head_out

    iti = tmp_path / "iti.safetensors"
    assert main(["steer", "--method", "iti", "--checkpoint", str(checkpoint), "--probe-dir", str(probe_dir),
                 "--k", "2", "--scale", "5", "--out", str(iti)]) == 0
    caa = tmp_path / "caa.safetensors"
    assert main(["steer", "--method", "caa", *common, "--data", "toxigen", "--layer", "1", "--site", "resid_post",
                 "--out", str(caa)]) == 0
    capsys.readouterr()

    prompt = ["--prompt", "the river ran", "--max-new-tokens", "6"]
    assert main(["generate", "--checkpoint", str(checkpoint), *prompt, "--no-progress"]) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # jaxlm's greedy continuation is transformers' own (up to an end-of-document token, where jaxlm stops)
    from jaxlm.tokenizer import Tokenizer

    ids = Tokenizer.load(checkpoint / "tokenizer.json").encode("the river ran")
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                eos_token_id=None, pad_token_id=1)
    assert plain["tokens"] and out[0, len(ids):len(ids) + len(plain["tokens"])].tolist() == plain["tokens"]
    assert main(["generate", "--checkpoint", str(checkpoint), *prompt, "--intervention", str(caa), "--scale", "40",
                 "--no-progress"]) == 0
    steered = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert steered["tokens"] != plain["tokens"]

    out = tmp_path / "eval"
    assert main(["eval", "ce", *common[:4], "--out", str(out), "--ce-docs", "2", "--ce-len", "16",
                 "--intervention", str(iti)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert np.isfinite(results["ce"]) and results["capability"]["kl"] > 0

    exported = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(checkpoint), "--family", family, "--out", str(exported)]) == 0
    reloaded = getattr(transformers, FAMILIES[family][1]).from_pretrained(exported).eval()
    tokens = torch.tensor([[0, 5, 9, 17, 33, 2]])
    with torch.inference_mode():
        np.testing.assert_allclose(reloaded(tokens).logits.numpy(), hf_model(tokens).logits.numpy(), rtol=0, atol=1e-6)
    assert (exported / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()


def test_export_bakes_iti_into_the_output_bias(family_dirs, tmp_path):
    """An ITI edit exported into Llama's attention biases gives the runtime-steered logits."""
    from jaxlm.checkpoint import load_model
    from jaxlm.intervene import Edit, Intervention

    _, checkpoint = family_dirs["llama"]
    loaded = load_model(checkpoint)
    cfg = loaded.config
    v = np.random.default_rng(0).normal(size=(cfg.n_layers, cfg.n_heads, cfg.resolved_head_dim)).astype(np.float32)
    iv = Intervention.from_edits([Edit.create("head_out", "add", {"v": v}, positions="all")], scale=2.0, method="iti")
    path = tmp_path / "iti.safetensors"
    iv.save(path)
    out = tmp_path / "baked"
    assert main(["export", "--checkpoint", str(checkpoint), "--family", "llama", "--out", str(out),
                 "--intervention", str(path)]) == 0
    written = json.loads((out / "config.json").read_text())
    assert written["attention_bias"] is True
    baked = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    tokens = np.asarray([[0, 5, 9, 17, 33, 2]], np.int32)
    steered = model.forward(cfg, loaded.params, tokens, intervention=iv.for_prefill(np.ones(tokens.shape, bool))).logits
    with torch.inference_mode():
        theirs = baked(torch.from_numpy(tokens).long()).logits.numpy()
    assert np.abs(np.asarray(steered) - theirs).max() <= 1e-4 * np.abs(theirs).max()
    plain = np.asarray(model.forward(cfg, loaded.params, tokens).logits)
    assert np.abs(plain - theirs).max() > 1e-2


def test_export_refuses_what_the_family_cannot_express(family_dirs, tmp_path, capsys):
    _, checkpoint = family_dirs["gpt_neox"]
    assert main(["export", "--checkpoint", str(checkpoint), "--family", "llama", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "LlamaForCausalLM cannot express" in err and "model.parallel_residual" in err and "Traceback" not in err
    assert main(["export", "--checkpoint", str(checkpoint), "--family", "mamba", "--out", str(tmp_path / "y")]) == 2
    assert "unknown HF family 'mamba'" in capsys.readouterr().err


def test_unsupported_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "model_type 'mamba'" in err and "supported: olmo" in err and "Traceback" not in err


def _continued_pretraining_config(root, checkpoint, dataset, **changes):
    config = {
        "init_from": str(checkpoint),
        "optimizer": {"lr": 1e-3, "warmup_steps": 0},
        "data": {"dataset": str(dataset), "sources": {"clean": 0.75, "toxic": 0.25}, "seq_len": 32, "batch_size": 8},
        "checkpoint": {"every": 4},
        "steps": 4,
        "log_every": 2,
        "tensorboard": False,
        **changes,
    }
    path = root / "cpt.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_continued_pretraining_from_an_hf_checkpoint(family_dirs, tiny_prepared, tmp_path, capsys):
    from jaxlm.checkpoint import load_model

    hf_model, checkpoint = family_dirs["qwen3"]
    config = _continued_pretraining_config(tmp_path, checkpoint, tiny_prepared)  # no model section: the HF model's
    run = tmp_path / "run"
    assert main(["train", str(config), "--run-dir", str(run), "--no-progress"]) == 0
    trained = load_model(run)
    start_config, start_params = hf.load(checkpoint)
    assert trained.config == start_config and trained.step == 4
    assert trained.config.qk_norm == "head" and trained.config.head_dim == 16
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax_leaves(trained.params), jax_leaves(start_params))]
    assert max(moved) > 0  # it trained
    record = json.loads((run / "init_from.json").read_text())
    assert record["init_from"] == str(checkpoint)
    # and the trained model exports back to the family transformers loads
    out = tmp_path / "back"
    assert main(["export", "--checkpoint", str(run), "--family", "qwen3", "--out", str(out)]) == 0
    assert transformers.Qwen3ForCausalLM.from_pretrained(out).config.head_dim == 16

    # a dataset tokenized with another tokenizer is refused, naming it
    other = tmp_path / "other_tokenizer"
    shutil.copytree(checkpoint, other)
    from jaxlm.tokenizer import train_bpe

    train_bpe(["a completely different corpus of words"] * 20, vocab_size=280).save(other / "tokenizer.json")
    config = _continued_pretraining_config(tmp_path, other, tiny_prepared)
    capsys.readouterr()
    assert main(["train", str(config), "--run-dir", str(tmp_path / "run2"), "--no-progress"]) == 2
    assert "tokenized with another tokenizer than init_from" in capsys.readouterr().err


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)
