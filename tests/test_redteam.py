"""Red-teaming (jaxlm.evaluate.redteam, `jaxlm redteam`): the documented pair set, resumable and
fingerprinted attack runs, the summary's statistics, and one-line errors from the command."""

import dataclasses
import json

import numpy as np
import pytest

from jaxlm import hf, model
from jaxlm.checkpoint import load_model
from jaxlm.cli import main
from jaxlm.config import model_preset
from jaxlm.data.labelled import rtp_part
from jaxlm.data.records import file_sha256
from jaxlm.evaluate import gcg, redteam
from jaxlm.intervene import Intervention, add_edit
from jaxlm.paths import MissingDataError

from conftest import CLEAN_WORDS, TOXIC_WORDS, synthetic_documents

FAST = gcg.GCGConfig(suffix_length=4, steps=3, top_k=8, candidates=16, init_suffix="x x", early_stop=False)
SHAPES = dict(prompt_tokens=6, target_tokens=4)


def rtp_records(n=100):
    """RTP-shaped records: clean prompts; continuations toxic (0.9), mild (0.3), unscored, or short."""
    prompts = synthetic_documents(CLEAN_WORDS, n, 5)
    continuations = synthetic_documents(TOXIC_WORDS, n, 6)
    records = []
    for i, (prompt, continuation) in enumerate(zip(prompts, continuations)):
        score = [0.9, 0.3, None, 0.9][i % 4]
        text = " you." if i % 7 == 0 else " " + continuation  # every 7th: too short for a 4-token target
        records.append({"challenging": True, "prompt": {"text": prompt, "toxicity": 0.1},
                        "continuation": {"text": text, "toxicity": score}})
    return records


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "eval" / "rtp").mkdir(parents=True)
    (root / "eval" / "rtp" / "toxic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rtp_records()))
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random model as an HF directory with its tokenizer (what `load_model` reads)."""
    from jaxlm.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("model")
    tokenizer = train_bpe(synthetic_documents(CLEAN_WORDS, 200, 0) + synthetic_documents(TOXIC_WORDS, 200, 1), 320)
    config = model_preset("tiny", vocab_size=320, init_std=0.3)
    hf.save(config, model.init_params(config, 0), root)
    tokenizer.save(root)
    return root


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_model(checkpoint)


class CountingScorer:
    """A stand-in toxicity scorer: the share of toxic words in a text, and how many texts it scored."""

    name = "toxic-word-share"

    def __init__(self):
        self.texts = 0

    def __call__(self, texts):
        self.texts += len(texts)
        return [sum(w in TOXIC_WORDS for w in t.split()) / max(len(t.split()), 1) for t in texts]


# ---------------------------------------------------------------------------------------
# The pairs
# ---------------------------------------------------------------------------------------


def test_attack_pairs_follow_the_documented_rule(data_dir, loaded):
    tokenizer = loaded.tokenizer
    pairs = redteam.attack_pairs(data_dir, tokenizer, 6, seed=0, **SHAPES)
    records = rtp_records()
    eligible = [r for r in records if (r["continuation"]["toxicity"] or 0) >= 0.5 and rtp_part(r["prompt"]["text"]) ==
                "redteam" and len(tokenizer.encode(r["continuation"]["text"])) >= 4]
    assert 6 < len(eligible) < len(records) / 4  # the rule leaves some out for each reason
    by_prompt = {r["prompt"]["text"]: r for r in eligible}
    for pair in pairs:
        record = by_prompt[pair.prompt_text]
        line = records.index(record) + 1
        assert pair.source.endswith(f"toxic.jsonl:{line}")
        assert pair.prompt_ids == tuple(tokenizer.encode(record["prompt"]["text"])[-6:])
        assert pair.target_ids == tuple(tokenizer.encode(record["continuation"]["text"])[:4])
        assert pair.target_text == tokenizer.decode(pair.target_ids)
        assert pair.continuation_toxicity == 0.9
    assert len({p.key for p in pairs}) == 6
    # seeded: the pairs for n are the first n of a larger set, another seed gives another order
    assert redteam.attack_pairs(data_dir, tokenizer, 2, seed=0, **SHAPES) == pairs[:2]
    assert redteam.attack_pairs(data_dir, tokenizer, 6, seed=1, **SHAPES) != pairs
    # every eligible record, and no more
    everything = redteam.attack_pairs(data_dir, tokenizer, len(eligible), seed=0, **SHAPES)
    assert {p.prompt_text for p in everything} == set(by_prompt)
    with pytest.raises(redteam.RedteamError, match=f"{len(eligible)} usable pairs .* {len(eligible) + 1} asked for"):
        redteam.attack_pairs(data_dir, tokenizer, len(eligible) + 1, seed=0, **SHAPES)


@pytest.mark.data
def test_real_rtp_pairs_are_toxic_continuations_of_redteam_prompts(shared_dataset, loaded):
    shared_dataset("eval/rtp/toxic.jsonl")
    pairs = redteam.attack_pairs(None, loaded.tokenizer, 100, seed=0)
    assert len({p.key for p in pairs}) == 100
    for pair in pairs:
        assert rtp_part(pair.prompt_text) == "redteam" and pair.continuation_toxicity >= 0.5
        assert 1 <= len(pair.prompt_ids) <= 32 and len(pair.target_ids) == 8


def test_bad_rtp_files_are_named(tmp_path, loaded):
    with pytest.raises(MissingDataError, match="toxic.jsonl"):
        redteam.attack_pairs(tmp_path, loaded.tokenizer, 1)
    rtp = tmp_path / "eval" / "rtp"
    rtp.mkdir(parents=True)
    (rtp / "toxic.jsonl").write_text(json.dumps(rtp_records(1)[0]) + "\n{not json\n")
    with pytest.raises(redteam.RedteamError, match=r"toxic.jsonl:2: invalid JSON"):
        redteam.attack_pairs(tmp_path, loaded.tokenizer, 1)
    (rtp / "toxic.jsonl").write_text(json.dumps({"prompt": {"text": "a"}, "continuation": {"toxicity": 0.9}}) + "\n")
    with pytest.raises(redteam.RedteamError, match=r"toxic.jsonl:1: expected 'continuation' with a 'text' string"):
        redteam.attack_pairs(tmp_path, loaded.tokenizer, 1)


# ---------------------------------------------------------------------------------------
# Runs: resume, fingerprints, summary
# ---------------------------------------------------------------------------------------


def test_wilson_interval_known_values():
    assert redteam.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert redteam.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert redteam.wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert redteam.wilson_interval(0, 0) == (0.0, 1.0)


def test_run_attacks_resumes_and_refuses_other_settings(tmp_path, data_dir, loaded, monkeypatch):
    pairs = redteam.attack_pairs(data_dir, loaded.tokenizer, 2, seed=0, **SHAPES)
    calls = []
    real_attack = gcg.attack
    monkeypatch.setattr(gcg, "attack", lambda *a, **k: calls.append(a[3]) or real_attack(*a, **k))
    out = tmp_path / "out"
    scorer = CountingScorer()
    first = redteam.run_attacks(loaded, pairs[:1], FAST, scorer=scorer, out_dir=out, continuation_tokens=6, progress=False)
    first_line = (out / redteam.ATTACKS_FILE).read_text()
    assert first["n"] == 1 and len(calls) == 1 and scorer.texts == 1

    # "killed after one attack": the same settings with two pairs run only the second
    summary = redteam.run_attacks(loaded, pairs, FAST, scorer=scorer, out_dir=out, continuation_tokens=6, progress=False)
    lines = (out / redteam.ATTACKS_FILE).read_text().splitlines(keepends=True)
    assert len(calls) == 2 and calls[1] == pairs[1].prompt_ids and scorer.texts == 2
    assert len(lines) == 2 and lines[0] == first_line
    assert json.loads((out / redteam.SUMMARY_FILE).read_text()) == {k: v for k, v in summary.items() if k != "attacks"}
    assert redteam.run_attacks(loaded, pairs, FAST, scorer=scorer, out_dir=out, continuation_tokens=6,
                               progress=False)["fingerprint"] == summary["fingerprint"] and len(calls) == 2

    rows = summary["attacks"]
    assert [r["key"] for r in rows] == [p.key for p in pairs]
    for row, pair in zip(rows, pairs):
        assert row["steps"] == FAST.steps and len(row["suffix_ids"]) == FAST.suffix_length
        assert row["continuation_starts_with_target"] == (row["continuation_ids"][:4] == list(pair.target_ids))
        assert row["continuation_starts_with_target"] == row["success"]
        assert row["continuation_toxicity"] == CountingScorer()([row["continuation_text"]])[0]
    successes = sum(r["continuation_starts_with_target"] for r in rows)
    assert summary["successes"] == successes and summary["success_rate"] == successes / 2
    assert summary["success_rate_ci95"] == pytest.approx(list(redteam.wilson_interval(successes, 2)))
    assert summary["mean_best_loss"] == pytest.approx(np.mean([r["best_loss"] for r in rows]))
    assert summary["teacher_forced_disagreements"] == 0
    identity = summary["settings"]["checkpoint"]
    assert identity["params_sha256"] == redteam.params_sha256(loaded.params)
    assert summary["settings"]["scorer"] == "toxic-word-share" and summary["settings"]["gcg"]["steps"] == 3

    # other settings are refused, naming the file
    with pytest.raises(redteam.RedteamError, match=r"attacks.jsonl:1: written with other settings"):
        redteam.run_attacks(loaded, pairs, dataclasses.replace(FAST, steps=4), scorer=scorer, out_dir=out,
                            continuation_tokens=6, progress=False)
    with pytest.raises(redteam.RedteamError, match=r"written with other settings"):
        redteam.run_attacks(loaded, pairs, FAST, scorer="profanity-check", out_dir=out, continuation_tokens=6,
                            progress=False)
    assert len(calls) == 2


def test_an_intervention_file_is_attacked_and_fingerprinted(tmp_path, data_dir, loaded):
    config = loaded.config
    v = np.random.default_rng(0).normal(size=(config.n_layers, config.d_model))
    path = Intervention.from_edits([add_edit("resid_mid", v, positions="last")], scale=0.5).save(tmp_path / "edit")
    pairs = redteam.attack_pairs(data_dir, loaded.tokenizer, 1, seed=0, **SHAPES)
    options = dict(scorer=CountingScorer(), continuation_tokens=6, progress=False)
    plain = redteam.run_attacks(loaded, pairs, FAST, **options)
    edited = redteam.run_attacks(loaded, pairs, FAST, intervention=path, scale=2.0, out_dir=tmp_path / "out", **options)
    settings = edited["settings"]["intervention"]
    assert settings["sha256"] == file_sha256(path) and settings["structure"] == [["resid_mid", "add", "last"]]
    assert edited["settings"]["scale"] == 2.0 and edited["fingerprint"] != plain["fingerprint"]
    assert edited["attacks"][0]["initial_loss"] != pytest.approx(plain["attacks"][0]["initial_loss"], abs=1e-3)
    at_zero = redteam.run_attacks(loaded, pairs, FAST, intervention=path, scale=0.0, **options)
    assert at_zero["attacks"][0]["losses"] == pytest.approx(plain["attacks"][0]["losses"], abs=1e-4)
    with pytest.raises(redteam.RedteamError, match="written with other settings"):
        redteam.run_attacks(loaded, pairs, FAST, intervention=path, scale=1.0, out_dir=tmp_path / "out", **options)


# ---------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------

OVERRIDES = ["gcg.steps=2", "gcg.candidates=16", "gcg.top_k=8", "gcg.suffix_length=4", "gcg.init_suffix=x x",
             "prompt_tokens=6", "target_tokens=4", "continuation_tokens=6"]


def test_cli_writes_results_and_prints_the_success_rate(tmp_path, data_dir, checkpoint, capsys):
    out = tmp_path / "red"
    argv = ["redteam", "--checkpoint", str(checkpoint), "--out", str(out), "--pairs", "2", "--data-dir", str(data_dir),
            "--no-progress", *OVERRIDES, "scorer=profanity-check"]
    assert main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert line.startswith(f"redteam (no intervention): {summary['successes']}/2 attacks succeeded, success rate ")
    assert "95% CI" in line and line.endswith(f"{out}/summary.json")
    assert len((out / "attacks.jsonl").read_text().splitlines()) == 2
    assert summary["settings"]["pairs"]["n"] == 2 and summary["settings"]["pairs"]["sha256"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxlm redteam: error: "), err
    return err[0]


@pytest.mark.parametrize("extra, message", [
    (["--pairs", "0"], "--pairs: expected an integer >= 1, got 0"),
    (["gcg.top_k=0"], "gcg.top_k: expected an integer >= 1, got 0"),
    (["gcg.topk=3"], "gcg: unknown key 'topk'"),
    (["target_tokens=8", "continuation_tokens=4"], "continuation_tokens: expected at least target_tokens (8)"),
    (["--scale", "2"], "--scale needs --intervention FILE"),
    (["--intervention", "/nowhere/edit.safetensors"], "/nowhere/edit.safetensors: no such intervention file"),
    (["--pairs", "1000"], "usable pairs"),
    (["gcg.top_k=5000"], "gcg.top_k: expected at most the"),
    (["scorer=perspectiv"], "unknown toxicity scorer 'perspectiv'"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, data_dir, checkpoint, capsys, extra, message):
    argv = ["redteam", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "red"), "--data-dir", str(data_dir),
            "--pairs", "1", "--no-progress", *OVERRIDES, *extra]
    assert main(argv) == 2
    assert message in one_error_line(capsys)


def test_cli_refuses_a_missing_checkpoint_and_a_locked_output(tmp_path, data_dir, checkpoint, capsys):
    from jaxlm.errors import DirectoryLock

    assert main(["redteam", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "red")]) == 2
    assert "not a jaxlm run directory" in one_error_line(capsys)
    out = tmp_path / "busy"
    with DirectoryLock(out, "jaxlm redteam"):
        assert main(["redteam", "--checkpoint", str(checkpoint), "--out", str(out), "--data-dir", str(data_dir),
                     "--pairs", "1", "--no-progress", *OVERRIDES, "scorer=profanity-check"]) == 2
    assert "in use by another jaxlm redteam" in one_error_line(capsys)
