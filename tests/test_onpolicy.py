"""jaxlm.onpolicy (``jaxlm posttrain data``): the prompt pool, selection, the written build, resume,
the CLI; and ``protocols.read_rtp``'s parts (RTP's fixed eval / posttrain split)."""

import dataclasses
import json

import numpy as np
import pytest

from jaxlm import onpolicy
from jaxlm.config import ConfigError, from_dict, model_preset
from jaxlm.data.labelled import rtp_part
from jaxlm.evaluate import protocols, toxicity
from jaxlm.evaluate.scorer import ToxicityScorer

POST_WORDS = "the river ran past old stone houses while children read books you stupid idiot hate those people".split()
POST_LENGTHS = (4, 30, 40, 6, 35, 50, 3, 45, 33, 60, 8, 38)  # words per post; every other post is held out
OPENING, MIN_POST = 8, 30


def vowel_share(text: str) -> float:
    letters = [c for c in text.lower() if c.isalpha()]
    return sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0


class VowelScorer(ToxicityScorer):
    """A stand-in scorer: a function of the text (its share of vowels among letters)."""

    name = "fake-vowels"

    def score_batch(self, texts):
        return np.array([vowel_share(t) for t in texts])


@pytest.fixture
def fake_scorer(monkeypatch):
    monkeypatch.setitem(toxicity.BACKENDS, VowelScorer.name, VowelScorer)
    return VowelScorer.name


@pytest.fixture(scope="module")
def pol_dataset(tmp_path_factory):
    """A prepared dataset (real `prepare`) whose source "pol" holds half its posts out as "pol@valid"."""
    from jaxlm.data.prepare import prepare
    from jaxlm.data.recipe import Recipe

    root = tmp_path_factory.mktemp("pol")
    rng = np.random.default_rng(0)
    posts = [" ".join(rng.choice(POST_WORDS, size=n)) for n in POST_LENGTHS]
    (root / "pol.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in enumerate(posts)))
    recipe = from_dict(Recipe, {
        "sources": {"pol": {"reader": "jsonl", "paths": ["pol.jsonl"], "args": {"text_field": "text", "id_field": "id"},
                            "valid_fraction": 0.5}},
        "tokenizer": {"vocab_size": 300, "sample_chars": 20000}, "toxicity": {"enabled": False}})
    prepare(recipe, root / "prepared", data_dir=root, workers=0, progress=False)
    return root / "prepared"


@pytest.fixture(scope="module")
def tiny_model(pol_dataset):
    from jaxlm import model
    from jaxlm.checkpoint import LoadedModel
    from jaxlm.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(pol_dataset / "tokenizer.json")
    config = model_preset("tiny", vocab_size=tokenizer.vocab_size)
    return LoadedModel(config, model.init_params(config, 0), tokenizer, None, pol_dataset / "model")


def small_config(data_dir, prepared, **changes) -> onpolicy.OnPolicyConfig:
    settings = {"rtp_prompts": None, "pol_prompts": None, "dataset": str(prepared), "opening_tokens": OPENING,
                "min_post_tokens": MIN_POST, "data_dir": str(data_dir), "samples_per_prompt": 4, "max_new_tokens": 6,
                "batch_size": 32, "scorer": "profanity-check", "min_gap": 0.05}
    return from_dict(onpolicy.OnPolicyConfig, {**settings, **changes})


def rtp_texts(data_dir, part):
    """Every RTP prompt text of ``part`` (None: all), by file, read straight from the files."""
    texts = {}
    for label in ("toxic", "nontoxic"):
        lines = (data_dir / "eval" / "rtp" / f"{label}.jsonl").read_text().splitlines()
        texts[label] = [t for t in (json.loads(line)["prompt"]["text"] for line in lines) if part in (None, rtp_part(t))]
    return texts


def outputs(directory) -> dict[str, int]:
    """Modification times of the build's files (not the lock)."""
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir() if not p.name.startswith(".")}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- read_rtp parts ------------------------------------------------------------------------------


def test_read_rtp_parts_split_the_prompts_and_limit_within_the_part(crafted_data_dir, tmp_path):
    directory = crafted_data_dir / "eval" / "rtp"
    everything = protocols.read_rtp(directory, part=None)
    evaluated = protocols.read_rtp(directory)
    posttrain = protocols.read_rtp(directory, part="posttrain")
    attack = [p for p in everything if rtp_part(p.text) == "redteam"]
    assert protocols.read_rtp(directory, part="eval") == evaluated
    assert [p.text for p in evaluated] == rtp_texts(crafted_data_dir, "eval")["toxic"] + rtp_texts(crafted_data_dir, "eval")["nontoxic"]
    assert {p.text for p in evaluated}.isdisjoint(p.text for p in posttrain)
    assert sorted(p.text for p in evaluated + posttrain + attack) == sorted(p.text for p in everything)
    assert (len(evaluated), len(posttrain), len(attack), len(everything)) == (8, 4, 1, 13)
    assert all(rtp_part(p.text) == "posttrain" for p in posttrain)

    limited = protocols.read_rtp(directory, limit=3, seed=1)
    assert [p.label for p in limited] == ["toxic"] * 3 + ["nontoxic"] * 3  # 3 of each file's 4 eval prompts
    assert {p.text for p in limited} <= {p.text for p in evaluated}
    assert limited == protocols.read_rtp(directory, limit=3, seed=1)
    one = protocols.read_rtp(directory, limit=1, seed=2, part="posttrain")
    assert [p.label for p in one] == ["toxic", "nontoxic"] and {p.text for p in one} <= {p.text for p in posttrain}

    with pytest.raises(protocols.EvaluationError, match="part: expected one of 'eval', 'posttrain', 'redteam' or None"):
        protocols.read_rtp(directory, part="train")
    only_posttrain = tmp_path / "rtp"
    only_posttrain.mkdir()
    for label in ("toxic", "nontoxic"):
        texts = rtp_texts(crafted_data_dir, "posttrain")[label]
        (only_posttrain / f"{label}.jsonl").write_text("".join(json.dumps({"prompt": {"text": t}}) + "\n" for t in texts))
    with pytest.raises(protocols.EvaluationError, match=r"toxic.jsonl: none of its 2 prompts is in RTP's 'eval' part"):
        protocols.read_rtp(only_posttrain)


# -- the pool ------------------------------------------------------------------------------------


def test_pool_is_rtp_posttrain_and_held_out_pol_openings(crafted_data_dir, pol_dataset, tiny_model):
    from jaxlm.data import records

    pool = onpolicy.prompt_pool(small_config(crafted_data_dir, pol_dataset))
    rtp = [p for p in pool.prompts if p.source == "rtp"]
    expected = rtp_texts(crafted_data_dir, "posttrain")
    assert [(p.text, p.group) for p in rtp] == [(t, g) for g in ("toxic", "nontoxic") for t in expected[g]]
    eval_texts = {p.text for p in protocols.read_rtp(crafted_data_dir / "eval" / "rtp", part="eval")}
    assert not eval_texts & {p.text for p in pool.prompts}

    valid = {meta["doc_id"]: ids for ids, meta in records.iter_documents(pol_dataset / "pol@valid")}
    trained = {meta["doc_id"] for _, meta in records.iter_documents(pol_dataset / "pol")}
    long_posts = sorted(doc for doc, ids in valid.items() if ids.size >= MIN_POST)
    pol = [p for p in pool.prompts if p.source == "pol"]
    assert sorted(p.meta["doc_id"] for p in pol) == long_posts and not trained & set(long_posts)
    for prompt in pol:
        assert prompt.group == "pol"
        assert prompt.text == tiny_model.tokenizer.decode(valid[prompt.meta["doc_id"]][:OPENING].tolist())
    assert pool.counts["pol"] | {"dataset": None} == {
        "dataset": None, "split": "pol@valid", "held_out_from": "pol", "posts": len(valid), "eligible": len(long_posts),
        "drawn": len(long_posts), "blank_openings": 0}
    assert pool.counts["prompts"] == {"rtp": 4, "pol": len(long_posts)}
    assert pool.counts["rtp"]["drawn"] == {"toxic": 2, "nontoxic": 2}
    assert 0 < len(long_posts) < len(valid)  # the fixture has posts on both sides of min_post_tokens

    drawn = onpolicy.prompt_pool(small_config(crafted_data_dir, pol_dataset, rtp_prompts=1, pol_prompts=2, seed=3))
    assert drawn == onpolicy.prompt_pool(small_config(crafted_data_dir, pol_dataset, rtp_prompts=1, pol_prompts=2, seed=3))
    assert drawn.counts["prompts"] == {"rtp": 2, "pol": 2} and all(p in pool.prompts for p in drawn.prompts)
    assert drawn.counts["pol"]["eligible"] == len(long_posts) and drawn.counts["pol"]["drawn"] == 2


def test_pool_refuses_training_splits_and_drops_eval_prompts(crafted_data_dir, pol_dataset, monkeypatch):
    with pytest.raises(onpolicy.OnPolicyError, match=r"sources\.pol is not a held-out split"):
        onpolicy.prompt_pool(small_config(crafted_data_dir, pol_dataset, pol_source="pol"))
    with pytest.raises(onpolicy.OnPolicyError, match="no source 'gutenberg@valid'"):
        onpolicy.prompt_pool(small_config(crafted_data_dir, pol_dataset, pol_source="gutenberg@valid"))
    eval_text = rtp_texts(crafted_data_dir, "eval")["toxic"][0]
    with pytest.raises(onpolicy.OnPolicyError, match="1 prompt\\(s\\) are RTP evaluation prompts"):
        onpolicy.check_disjoint(["a fresh prompt", eval_text], [eval_text, "another"])
    onpolicy.check_disjoint(["a fresh prompt"], [eval_text])

    posttrain_text = rtp_texts(crafted_data_dir, "posttrain")["toxic"][0]
    openings = [onpolicy.PoolPrompt(eval_text, "pol", "pol"), onpolicy.PoolPrompt(posttrain_text, "pol", "pol"),
                onpolicy.PoolPrompt("a post opening", "pol", "pol")]
    monkeypatch.setattr(onpolicy, "pol_openings", lambda config: (openings, {"eligible": 3}))
    pool = onpolicy.prompt_pool(small_config(crafted_data_dir, pol_dataset))
    assert [p.text for p in pool.prompts if p.source == "pol"] == ["a post opening"]
    assert pool.counts["dropped"] == {"duplicates": {"rtp": 0, "pol": 1}, "eval_prompts": 1}


# -- config and selection ------------------------------------------------------------------------


@pytest.mark.parametrize("changes, message", [
    ({"samples_per_prompt": 1}, "samples_per_prompt: expected an integer >= 2, got 1"),
    ({"min_gap": 0.0}, r"min_gap: expected a score difference in \(0, 1\]"),
    ({"temperature": 0.0}, "temperature: expected a finite number > 0"),
    ({"top_p": 1.5}, "top_p: expected 0 < top_p <= 1"),
    ({"sft_max_score": 0.0}, r"sft_max_score: expected a score in \(0, 1\] or null"),
    ({"min_post_tokens": 4}, r"min_post_tokens: expected >= opening_tokens \(8\), got 4"),
    ({"rtp_prompts": -1}, "rtp_prompts: expected an integer >= 0"),
    ({"rtp_prompts": 0, "pol_prompts": 0}, "both 0 leave no prompts"),
    ({"dataset": None}, "dataset: required for pol_prompts"),
    ({"scorer": "nope"}, "scorer: unknown toxicity scorer 'nope'"),
    ({"samples": 3}, "unknown key 'samples'"),
    ({"drop_empty": "yes"}, "drop_empty: expected a boolean"),
])
def test_config_refuses_bad_values_naming_the_field(changes, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        small_config(tmp_path, tmp_path, **changes)


def test_config_generation_settings(tmp_path):
    config = small_config(tmp_path, tmp_path, pol_prompts=0, dataset=None, temperature=0.7, seed=5)
    assert config.generation_settings() == protocols.GenerationSettings(
        samples=4, max_new_tokens=6, temperature=0.7, top_p=0.9, batch_size=32, seed=5)


def test_selection_picks_least_and_most_toxic_with_gap_max_score_and_empty_rules():
    select = onpolicy.select_samples
    texts, scores = ["", "mild", "nasty words", "   ", "fine"], [0.0, 0.3, 0.9, 0.0, 0.1]
    assert select(texts, scores, min_gap=0.2) == onpolicy.Selection(4, 2, True, True)
    assert select(texts, scores, min_gap=0.2, drop_empty=False) == onpolicy.Selection(0, 2, True, True)
    assert select(texts, scores, min_gap=0.81) == onpolicy.Selection(4, 2, True, False)
    assert select(texts, scores, min_gap=0.2, sft_max_score=0.1) == onpolicy.Selection(4, 2, False, True)
    assert select(texts, scores, min_gap=0.2, sft_max_score=0.11).sft
    assert select(["a", "b", "c", "d"], [0.5, 0.2, 0.5, 0.2], min_gap=0.3) == onpolicy.Selection(1, 0, True, True)
    assert select(["a", "b"], [0.5, 0.7], min_gap=0.2).dpo  # 0.7 - 0.5 is 0.19999999999999996 in floats
    assert not select(["a", "b"], [0.5, 0.69], min_gap=0.2).dpo
    assert select(["", " "], [0.0, 0.0], min_gap=0.2) == onpolicy.Selection(None, None, False, False)
    assert select(["", "only"], [0.0, 0.4], min_gap=0.2) == onpolicy.Selection(1, 1, True, False)


# -- the build -----------------------------------------------------------------------------------


def test_build_writes_selected_rows_matching_the_summary_and_reuses_or_refuses(
        crafted_data_dir, pol_dataset, tiny_model, fake_scorer, tmp_path):
    config = small_config(crafted_data_dir, pol_dataset, scorer=fake_scorer, min_gap=0.45, sft_max_score=0.05)
    built = onpolicy.build_detox_data(tiny_model, config, progress=False, out_dir=tmp_path / "out")
    assert not built.reused
    pool = onpolicy.prompt_pool(config)
    rows, sft, dpo = read_jsonl(built.samples_path), read_jsonl(built.sft_path), read_jsonl(built.dpo_path)
    assert [(r["prompt"], r["source"], r["group"]) for r in rows] == [(p.text, p.source, p.group) for p in pool.prompts]
    for row in rows:
        texts, scores = row["continuations"], row["scores"]
        assert len(texts) == 4 and scores == pytest.approx([vowel_share(t) for t in texts])
        candidates = [i for i, t in enumerate(texts) if t.strip()]
        if not candidates:
            assert row["chosen"] is row["rejected"] is None and not row["sft"] and not row["dpo"]
            continue
        least, most = min(scores[i] for i in candidates), max(scores[i] for i in candidates)
        assert row["chosen"] in candidates and scores[row["chosen"]] == least
        assert row["rejected"] in candidates and scores[row["rejected"]] == most
        assert row["sft"] == (least < 0.05) and row["dpo"] == (most - least >= 0.45 - 1e-9)
    assert sft == [{"prompt": r["prompt"], "response": r["continuations"][r["chosen"]], "score": r["scores"][r["chosen"]],
                    "source": r["source"], "group": r["group"]} for r in rows if r["sft"]]
    assert [(d["prompt"], d["chosen"], d["rejected"]) for d in dpo] == [
        (r["prompt"], r["continuations"][r["chosen"]], r["continuations"][r["rejected"]]) for r in rows if r["dpo"]]
    assert all(d["rejected_score"] - d["chosen_score"] >= 0.45 - 1e-9 and d["chosen"].strip() for d in dpo)

    summary = json.loads(built.summary_path.read_text())
    assert summary == built.summary
    counts = summary["counts"]
    assert counts["all"]["prompts"] == len(rows) and counts["all"]["samples"] == 4 * len(rows)
    assert counts["all"]["sft_rows"] == len(sft) and counts["all"]["dpo_pairs"] == len(dpo)
    assert counts["all"]["empty_samples"] == sum(not t.strip() for r in rows for t in r["continuations"])
    assert counts["all"]["dpo_dropped_gap"] == sum(r["chosen"] is not None and not r["dpo"] for r in rows)
    assert 0 < len(dpo) < len(rows) and 0 < len(sft) < len(rows)  # both sides of min_gap and sft_max_score
    for key in onpolicy.COUNT_KEYS:
        assert counts["rtp"][key] + counts["pol"][key] == counts["all"][key]
        assert sum(c[key] for c in summary["counts_by_group"].values()) == counts["all"][key]
    for name in ("all", "rtp", "pol"):
        c = counts[name]
        assert c["prompts"] == c["dpo_pairs"] + c["dpo_dropped_gap"] + c["no_candidates"]
        assert c["prompts"] == c["sft_rows"] + c["sft_dropped_max_score"] + c["no_candidates"]
    assert counts["rtp"]["prompts"] == 4 and set(summary["counts_by_group"]) == {"toxic", "nontoxic", "pol"}
    every = [s for r in rows for s in r["scores"]]
    assert summary["scores"]["all"]["n"] == len(every)
    assert summary["scores"]["all"]["quantiles"]["0"] == min(every) and summary["scores"]["all"]["quantiles"]["1"] == max(every)
    assert summary["scores"]["rejected"]["n"] == len(dpo) and summary["scores"]["sft"]["n"] == len(sft)
    assert summary["model"]["source"] == str(tiny_model.source) and summary["model"]["step"] is None
    assert summary["scorer"] == fake_scorer and summary["generation"]["samples"] == 4
    assert summary["pool"] == json.loads(json.dumps(pool.counts))
    assert built.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    written = outputs(built.out_dir)
    again = onpolicy.build_detox_data(tiny_model, config, progress=False, out_dir=tmp_path / "out")
    assert again.reused and again.summary == summary
    assert outputs(built.out_dir) == written
    with pytest.raises(onpolicy.OnPolicyError, match=r"out: holds a finished build with fingerprint .* choose another"):
        onpolicy.build_detox_data(tiny_model, dataclasses.replace(config, min_gap=0.3), progress=False,
                                  out_dir=tmp_path / "out")
    other = dataclasses.replace(tiny_model, params={**tiny_model.params, "embedding": tiny_model.params["embedding"] * 2})
    assert onpolicy.model_fingerprint(other) != onpolicy.model_fingerprint(tiny_model)
    with pytest.raises(onpolicy.OnPolicyError, match="holds a finished build"):
        onpolicy.build_detox_data(other, config, progress=False, out_dir=tmp_path / "out")
    assert outputs(built.out_dir) == written


# -- the CLI -------------------------------------------------------------------------------------


@pytest.fixture
def posttrain_data():
    """``jaxlm posttrain data ARGS`` through ``jaxlm.cli.main``."""
    from jaxlm import cli

    return lambda *argv: cli.main(["posttrain", "data", *map(str, argv)])


def test_cli_builds_what_the_library_builds_and_refuses_bad_input_in_one_line(
        crafted_data_dir, pol_dataset, tiny_model, tmp_path, posttrain_data, capsys):
    from jaxlm import hf

    checkpoint = tmp_path / "hf"
    hf.save(tiny_model.config, tiny_model.params, checkpoint)
    tiny_model.tokenizer.save(checkpoint / "tokenizer.json")
    config = small_config(crafted_data_dir, pol_dataset, rtp_prompts=1, pol_prompts=1)
    (tmp_path / "onpolicy.yaml").write_text(f"dataset: {pol_dataset}\nopening_tokens: {OPENING}\nmin_post_tokens: {MIN_POST}\n")
    argv = [tmp_path / "onpolicy.yaml", "--checkpoint", checkpoint, "--out", tmp_path / "cli", "--data-dir", crafted_data_dir,
            "--no-progress", "rtp_prompts=1", "pol_prompts=1", "samples_per_prompt=4", "max_new_tokens=6", "batch_size=32",
            "scorer=profanity-check", "min_gap=0.05"]
    assert posttrain_data(*argv) == 0
    printed = capsys.readouterr().out
    library = onpolicy.build_detox_data(tiny_model, config, progress=False, out_dir=tmp_path / "library")
    assert read_jsonl(tmp_path / "cli" / "samples.jsonl") == read_jsonl(library.samples_path)
    cli_summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert cli_summary["settings"] == library.summary["settings"] and cli_summary["counts"] == library.summary["counts"]
    assert f"all: {library.summary['counts']['all']['prompts']} prompts" in printed and "written:" in printed
    assert posttrain_data(*argv) == 0 and "up to date" in capsys.readouterr().out

    def one_error_line(*args) -> str:
        assert posttrain_data(*args) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("jaxlm posttrain") and "Traceback" not in err
        return err

    assert "onpolicy.yaml: samples_per_prompt: expected an integer >= 2, got 1" in one_error_line(*argv, "samples_per_prompt=1")
    assert "holds a finished build" in one_error_line(*argv, "min_gap=0.3")
    assert "not a jaxlm run directory" in one_error_line(
        "--checkpoint", tmp_path / "missing", "--out", tmp_path / "x", f"dataset={pol_dataset}")
    assert "unknown key 'nope'" in one_error_line(
        "nope=1", "--checkpoint", checkpoint, "--out", tmp_path / "y", f"dataset={pol_dataset}")
