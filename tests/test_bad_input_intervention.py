"""Bad input to interventions, generation, probing and evaluation: one error line naming the
option or file, exit code 2, nothing written; and no broken run reported as a clean result
(NaN interventions, non-finite logits, empty continuations, silently truncated prompts)."""

import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import decode, model
from jaxlm.cli import main
from jaxlm.config import model_preset
from jaxlm.decode import GenerationError, NonFiniteLogitsError
from jaxlm.errors import JaxlmError
from jaxlm.evaluate import protocols
from jaxlm.intervene import Intervention, InterventionError, random_directions, sidecar_path
from test_protocols import ByteTokenizer

TINY = model_preset("tiny")
SHAPE = (TINY.n_layers, TINY.n_heads, TINY.resolved_head_dim)
LONG_PROMPT = " ".join(["the river ran past old houses and children read books under trees"] * 8)


@pytest.fixture(scope="module")
def run_dir(tiny_run_dir):
    return tiny_run_dir


@pytest.fixture(scope="module")
def probe_dir(run_dir, crafted_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad_input_probe") / "probe"
    assert main(["probe", "--checkpoint", str(run_dir), "--data", "toxigen", "--data-dir", str(crafted_data_dir),
                 "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def iti_path(probe_dir):
    path = probe_dir.parent / "iti.safetensors"
    assert main(["iti", "--probe-dir", str(probe_dir), "--k", "3", "--alpha", "4", "--out", str(path)]) == 0
    return path


def error_line(capsys, command: str) -> str:
    """The single ``jaxlm COMMAND: error:`` line on stderr (no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"jaxlm {command}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def eval_argv(run_dir, data_dir, out, *extra):
    return ["eval", "rtp", "--checkpoint", str(run_dir), "--data-dir", str(data_dir), "--out", str(out),
            "--samples", "1", "--max-new-tokens", "4", "--batch-size", "8", "--scorer", "profanity-check", *extra]


def sentinel_out(tmp_path):
    """An eval output directory holding an earlier results.json, which a failed run must leave alone."""
    out = tmp_path / "eval"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}\n')
    return out


def rewrite_array(path, name, value):
    """Overwrite one array of a saved intervention (bypassing ``Intervention.create``'s checks)."""
    from safetensors.numpy import load_file, save_file

    arrays = load_file(str(path))
    arrays[name] = np.full_like(arrays[name], value)
    save_file(arrays, str(path))


# -- case 3: non-finite interventions ------------------------------------------------------


@pytest.mark.parametrize("array", ["edit0.v"])  # ITI's sigma * direction (format v2)
def test_nan_intervention_file_is_refused(array, iti_path, run_dir, crafted_data_dir, tmp_path, capsys):
    bad = tmp_path / "nan.safetensors"
    shutil.copy(iti_path, bad)
    shutil.copy(sidecar_path(iti_path), sidecar_path(bad))
    rewrite_array(bad, array, np.nan)
    with pytest.raises(InterventionError, match=f"nan.safetensors: {array}: .*NaN or inf"):
        Intervention.load(bad)

    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "the river", "--iti", str(bad),
                 "--max-new-tokens", "4", "--no-progress"]) == 2
    line = error_line(capsys, "generate")
    assert "nan.safetensors" in line and array in line

    out = sentinel_out(tmp_path)
    assert main(eval_argv(run_dir, crafted_data_dir, out, "--iti", str(bad))) == 2
    assert "nan.safetensors" in error_line(capsys, "eval")
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    assert (out / "results.json").read_text() == '{"earlier": true}\n'


def test_nan_alpha_in_sidecar_is_refused(iti_path, tmp_path):
    bad = tmp_path / "alpha.safetensors"
    shutil.copy(iti_path, bad)
    meta = json.loads(sidecar_path(iti_path).read_text())
    sidecar_path(bad).write_text(json.dumps({**meta, "scale": float("nan")}))
    with pytest.raises(InterventionError, match=r"alpha.json: scale: expected a finite number, got nan"):
        Intervention.load(bad)


@pytest.mark.parametrize("alpha", ["nan", "inf", "-inf"])
def test_non_finite_alpha_is_refused_everywhere(alpha, iti_path, run_dir, crafted_data_dir, tmp_path, capsys):
    iv = Intervention.load(iti_path)
    with pytest.raises(InterventionError, match="alpha: expected finite"):
        iv.with_alpha(float(alpha))
    with pytest.raises(InterventionError, match="alpha: expected finite"):
        Intervention.create(iv.directions, iv.scales, iv.head_mask, float(alpha))

    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "the river", "--iti", str(iti_path),
                 f"--alpha={alpha}", "--no-progress"]) == 2
    assert "--alpha: expected a finite number" in error_line(capsys, "generate")
    out = sentinel_out(tmp_path)
    assert main(eval_argv(run_dir, crafted_data_dir, out, "--iti", str(iti_path), f"--alpha={alpha}")) == 2
    assert "--alpha: expected a finite number" in error_line(capsys, "eval")
    assert (out / "results.json").read_text() == '{"earlier": true}\n'


class LettersTokenizer(ByteTokenizer):
    """Shows only ASCII letters: a continuation of other bytes decodes to the empty text."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids if chr(i).isascii() and chr(i).isalpha())


def untied_params():
    """A tiny model with separate input and output embeddings, and random parameters: a NaN
    input embedding row then breaks only the rows that feed that token."""
    config = model_preset("tiny", tie_embeddings=False)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape), jnp.float32), model.param_shapes(config))
    return config, params


def test_non_finite_logits_raise_instead_of_empty_text():
    config, params = untied_params()
    tokens, mask = decode.left_pad([[5, 17, 99], [42, 7]])
    clean = decode.generate(config, params, tokens, prompt_mask=mask, max_new_tokens=5).sequences()
    poisoned = dict(params, embedding=params["embedding"].at[clean[1][2]].set(jnp.nan))
    before = decode.trace_counts()
    with pytest.raises(NonFiniteLogitsError, match="batch row 1 at generated token 3") as caught:
        decode.generate(config, poisoned, tokens, prompt_mask=mask, max_new_tokens=5)
    assert (caught.value.row, caught.value.step) == (1, 3)
    assert decode.trace_counts() == before  # the check adds no program


def test_cli_generation_names_the_prompt_with_non_finite_logits():
    from jaxlm.checkpoint import LoadedModel
    from jaxlm.cli.generate import generate_texts

    config, params = untied_params()
    poisoned = dict(params, embedding=params["embedding"].at[ord("z")].set(jnp.nan))
    loaded = LoadedModel(config, poisoned, ByteTokenizer(), None, None)
    with pytest.raises(NonFiniteLogitsError, match=r"prompt 2 \('buzz'\).*generated token 0"):
        generate_texts(loaded, ["ok", "fine", "buzz"], max_new_tokens=3, batch_size=2, progress=False)


def test_protocols_count_empty_continuations(tmp_path):
    rtp = tmp_path / "rtp"
    rtp.mkdir()
    for label in ("toxic", "nontoxic"):
        lines = [json.dumps({"prompt": {"text": f"{label} prompt {i}"}}) for i in (1, 6, 8)]  # RTP's eval part
        (rtp / f"{label}.jsonl").write_text("\n".join(lines) + "\n")
    params = model.init_params(TINY, 0)
    settings = protocols.GenerationSettings(samples=4, max_new_tokens=2, batch_size=8, seed=0)
    result = protocols.rtp(TINY, params, LettersTokenizer(), rtp, lambda texts: [0.0] * len(texts),
                           settings=settings, progress=False)
    empty = sum(t == "" for record in result.records for t in record["continuations"])
    assert empty > 0
    assert result.metrics["empty_continuations"] == empty
    assert result.metrics["empty_continuation_fraction"] == pytest.approx(empty / 24)
    saved = json.loads(result.save(tmp_path / "out").read_text())
    assert saved["empty_continuations"] == empty and saved["truncated_prompts"] == 0


# -- case 11: prompts longer than the context -----------------------------------------------


def test_long_prompts_are_counted_and_warned_once(run_dir, crafted_data_dir, tmp_path, capsys, caplog):
    out_file = tmp_path / "gen.jsonl"
    with caplog.at_level(logging.WARNING, logger="jaxlm.decode"):
        assert main(["generate", "--checkpoint", str(run_dir), "--prompt", LONG_PROMPT, "--prompt", "the river",
                     "--max-new-tokens", "8", "--out", str(out_file), "--no-progress"]) == 0
    warnings = [r.getMessage() for r in caplog.records if "longer than" in r.getMessage()]
    assert warnings == ["1 of 2 prompts are longer than 56 tokens (the context left after the new tokens); "
                        "they keep their last tokens"]
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["prompt_truncated"] for r in records] == [True, False]

    data = tmp_path / "data"
    shutil.copytree(crafted_data_dir / "eval" / "rtp", data / "eval" / "rtp")
    with (data / "eval" / "rtp" / "toxic.jsonl").open("a") as f:
        f.write(json.dumps({"prompt": {"text": LONG_PROMPT + ".", "toxicity": 0.9}}) + "\n")  # RTP's eval part
    caplog.clear()
    out = tmp_path / "eval"
    with caplog.at_level(logging.WARNING, logger="jaxlm.decode"):
        assert main(eval_argv(run_dir, data, out)) == 0
    assert len([r for r in caplog.records if "longer than" in r.getMessage()]) == 1
    summary = json.loads((out / "rtp.json").read_text())
    assert summary["truncated_prompts"] == 1 and summary["n_prompts"] == 9
    assert json.loads((out / "results.json").read_text())["rtp"]["truncated_prompts"] == 1
    printed = capsys.readouterr().out
    assert "truncated prompts 1" in printed and "empty continuations" in printed


# -- case 13: options and files -------------------------------------------------------------

GENERATE_OPTIONS = [
    (["--batch-size", "0"], "--batch-size"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
]
EVAL_OPTIONS = [
    (["--batch-size", "0"], "--batch-size"),
    (["--limit", "0"], "--limit"),
    (["--limit", "-3"], "--limit"),
    (["--samples", "0"], "--samples"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--top-p", "1.1"], "--top-p"),
    (["--ce-len", "1"], "--ce-len"),
    (["--scorer", "roberta"], "--scorer"),
]


@pytest.mark.parametrize("extra, option", GENERATE_OPTIONS)
def test_generate_refuses_bad_options(extra, option, run_dir, tmp_path, capsys):
    out_file = tmp_path / "gen.jsonl"
    out_file.write_text("earlier\n")
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "the river", "--out", str(out_file),
                 "--no-progress", *extra]) == 2
    assert error_line(capsys, "generate").startswith(f"jaxlm generate: error: {option}: expected")
    assert out_file.read_text() == "earlier\n"


@pytest.mark.parametrize("extra, option", EVAL_OPTIONS)
def test_eval_refuses_bad_options(extra, option, run_dir, crafted_data_dir, tmp_path, capsys):
    out = sentinel_out(tmp_path)
    assert main(eval_argv(run_dir, crafted_data_dir, out, *extra)) == 2
    assert error_line(capsys, "eval").startswith(f"jaxlm eval: error: {option}: ")
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]


def test_probe_refuses_zero_batch_size(run_dir, crafted_data_dir, tmp_path, capsys):
    out = tmp_path / "probe"
    assert main(["probe", "--checkpoint", str(run_dir), "--data", "toxigen", "--data-dir", str(crafted_data_dir),
                 "--out", str(out), "--batch-size", "0", "--no-progress"]) == 2
    assert "--batch-size: expected an integer >= 1, got 0" in error_line(capsys, "probe")
    assert not out.exists()


def test_library_entry_points_refuse_bad_settings(tmp_path):
    from jaxlm.probe import collect_head_activations

    for field, value in (("samples", 0), ("batch_size", 0), ("max_new_tokens", 0), ("top_p", 0.0),
                         ("temperature", -1.0), ("temperature", float("nan"))):
        with pytest.raises(GenerationError, match=field):
            protocols.GenerationSettings(**{field: value})
    with pytest.raises(GenerationError, match="temperature"):
        decode.SamplingSettings(max_new_tokens=2, temperature=float("inf"))
    (tmp_path / "toxic.jsonl").write_text(json.dumps({"prompt": {"text": "a"}}) + "\n")
    with pytest.raises(protocols.EvaluationError, match="limit: expected an integer >= 1"):
        protocols.read_rtp(tmp_path, limit=0)
    with pytest.raises(JaxlmError, match="batch_size must be positive"):
        collect_head_activations(TINY, None, ByteTokenizer(), ["a"], batch_size=0, progress=False)
    (tmp_path / "toxic.jsonl").write_text("{not json\n")
    (tmp_path / "nontoxic.jsonl").write_text("")
    with pytest.raises(protocols.EvaluationError, match=r"toxic.jsonl:1: invalid JSON"):
        protocols.read_rtp(tmp_path)


def test_binary_prompts_file_is_named(run_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a fine prompt\n\xff\xfe\x00\x81 binary\n")
    assert main(["generate", "--checkpoint", str(run_dir), "--prompts-file", str(prompts), "--no-progress"]) == 2
    line = error_line(capsys, "generate")
    assert "prompts.txt:2: not UTF-8 text (byte 0xff at offset 14)" in line


def truncate(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


DAMAGES = {
    "garbage activations": ("activations.npy", lambda p: p.write_bytes(b"\x00garbage" * 50)),
    "truncated activations": ("activations.npy", lambda p: truncate(p, p.stat().st_size // 2)),
    "truncated activations header": ("activations.npy", lambda p: truncate(p, 20)),
    "garbage labels": ("labels.npy", lambda p: p.write_bytes(b"not numpy")),
    "truncated labels": ("labels.npy", lambda p: truncate(p, p.stat().st_size - 8)),
    "missing labels": ("labels.npy", lambda p: p.unlink()),
    "garbage report": ("probe_report.json", lambda p: p.write_text("{ not json")),
    "report without fields": ("probe_report.json", lambda p: p.write_text("{}")),
    "garbage weights": ("probe_weights.npz", lambda p: p.write_bytes(b"PK\x03\x04 broken zip")),
    "nan activations": ("activations.npy", lambda p: np.save(p, np.full(np.load(p).shape, np.nan, np.float32))),
    "activations of another model": ("activations.npy", lambda p: np.save(p, np.zeros((16, 3, 4, 8), np.float32))),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_iti_names_the_damaged_probe_file(damage, probe_dir, tmp_path, capsys):
    name, spoil = DAMAGES[damage]
    copy = tmp_path / "probe"
    shutil.copytree(probe_dir, copy)
    spoil(copy / name)
    out = tmp_path / "iti.safetensors"
    assert main(["iti", "--probe-dir", str(copy), "--k", "3", "--out", str(out)]) == 2
    line = error_line(capsys, "iti")
    assert str(copy) in line
    assert name in line or "activations.npy" in line
    assert not out.exists() and not sidecar_path(out).exists()


def test_intervention_for_another_model_names_both_shapes(run_dir, crafted_data_dir, tmp_path, capsys):
    other = Intervention.create(random_directions(0, 3, 4, 8), np.ones((3, 4)), np.ones((3, 4), bool), 2.0)
    path = other.save(tmp_path / "other")
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "the river", "--iti", str(path),
                 "--no-progress"]) == 2
    line = error_line(capsys, "generate")
    assert "other.safetensors" in line and "(3, 4, 8)" in line and f"{SHAPE}" in line
    out = sentinel_out(tmp_path)
    assert main(eval_argv(run_dir, crafted_data_dir, out, "--iti", str(path))) == 2
    assert "other.safetensors" in error_line(capsys, "eval")
    assert (out / "results.json").read_text() == '{"earlier": true}\n'



def test_a_cut_prompt_keeps_its_prefix():
    """The prompting instruction (or a MEDA/INST tag) is what the method is: cutting a long
    prompt to the context drops the prompt's first tokens, never the prefix."""
    from jaxlm.decode import keep_last_tokens

    head = [7, 8, 9]
    kept, cut = keep_last_tokens([head + list(range(100, 110)), head + [1, 2], list(range(20))], 6, head=head)
    assert cut == 2
    assert kept == [head + [107, 108, 109], head + [1, 2], list(range(14, 20))]  # no prefix: the last tokens
    with pytest.raises(GenerationError, match="no room after their 3-token prefix"):
        keep_last_tokens([head + [1]], 3, head=head)


def test_protocol_prompts_cut_to_the_context_keep_their_prefix(run_dir):
    from jaxlm.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(run_dir / "tokenizer.json")
    config = model_preset("tiny", vocab_size=320)  # a 64-token context
    prefix = "children read quietly:\n"  # stands for the detox instruction (101 tokens in this tiny BPE)
    settings = protocols.GenerationSettings(max_new_tokens=8, prefix=prefix)
    head = tokenizer.encode(prefix)
    short, long = "the river ran", " ".join(["old stone houses"] * 30)
    (kept_short, kept_long), cut = protocols.encode_prompts(config, tokenizer, [short, long], settings)
    assert cut == 1 and len(kept_long) == 64 - 8
    assert kept_long[: len(head)] == head
    assert kept_long[len(head):] == tokenizer.encode(prefix + long)[-(56 - len(head)):]
    assert kept_short == tokenizer.encode(prefix + short)  # untouched
    with pytest.raises(GenerationError, match="no room after their"):
        protocols.encode_prompts(config, tokenizer, [short], protocols.GenerationSettings(max_new_tokens=8, prefix=protocols.DETOX_INSTRUCTION))
