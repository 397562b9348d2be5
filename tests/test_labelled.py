"""Labelled text sets: loaders on crafted fixtures (same layout as the data directory), specs, real counts."""

import csv
import gzip
import json
import math

import numpy as np
import pytest

import jaxlm.data.labelled as labelled
from jaxlm.data.labelled import (
    RTP_PARTS,
    TOXIGEN_EVAL_FRACTION,
    DataSpec,
    LabelledDataError,
    LabelledSet,
    load_davidson,
    load_labelled,
    load_rtp,
    load_toxigen,
    parse_data_spec,
    rtp_part,
    split_toxigen_prompt,
    toxigen_eval_set,
    toxigen_rank,
    toxigen_split,
)
from jaxlm.paths import MissingDataError


def _write(path, text, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def _prompt(*sentences):
    return "\\n".join(f"- {s}" for s in sentences) + "\\n-"


@pytest.fixture
def data_dir(tmp_path):
    root = tmp_path / "data"
    prompts = root / "labelled" / "toxigen" / "prompts"
    _write(prompts / "hate_alpha_1k.txt.gz", "\n".join([_prompt("bad a1", "bad a2"), _prompt("bad a2", "bad a3")]) + "\n", gz=True)
    _write(prompts / "hate_beta_1k.txt", _prompt("bad b1", "bad a1") + "\n")
    _write(prompts / "neutral_alpha_1k.txt.gz", _prompt("good a1", "good a2") + "\n", gz=True)
    _write(prompts / "neutral_beta_1k.txt", _prompt("good b1") + "\n" + _prompt("shared text") + "\n")
    _write(prompts / "hate_gamma_1k.txt", _prompt("shared text", "bad g1") + "\n")
    _write(prompts / "README.md", "not a prompt file")

    rows = [["", "count", "hate_speech", "offensive_language", "neither", "class", "tweet"]]
    tweets = [(0, "hateful, \"quoted\" tweet"), (1, "offensive tweet\nwith a newline"), (2, "plain tweet"), (2, "another plain")]
    rows += [[str(i), "3", "0", "0", "3", str(cls), text] for i, (cls, text) in enumerate(tweets)]
    davidson = root / "labelled" / "davidson" / "labeled_data.csv.gz"
    davidson.parent.mkdir(parents=True)
    with gzip.open(davidson, "wt", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows(rows)

    def record(prompt, p_tox, cont, c_tox):
        return json.dumps({"prompt": {"text": prompt, "toxicity": p_tox}, "continuation": {"text": cont, "toxicity": c_tox}})

    rtp = root / "eval" / "rtp"
    _write(rtp / "toxic.jsonl", "\n".join([record("toxic prompt", 0.9, " mild continuation", 0.3), record("edge prompt", 0.5, " clean end", 0.05)]) + "\n")
    _write(rtp / "nontoxic.jsonl", "\n".join([record("calm prompt", 0.1, " nasty end", 0.8), record("unscored", None, " also calm", 0.19)]) + "\n")
    return root


def test_split_toxigen_prompt_strips_bullets_and_trailing_dash():
    assert split_toxigen_prompt(_prompt("one", "two - with dash") + "\n") == ["one", "two - with dash"]


def test_toxigen_labels_groups_and_dedupe(data_dir):
    data = load_toxigen(data_dir, part="all")
    by_text = dict(zip(data.texts, zip(data.labels.tolist(), data.groups)))
    assert by_text["bad a1"] == (1, "alpha")  # first file wins; repeated in hate_beta
    assert by_text["bad b1"] == (1, "beta")
    assert by_text["good b1"] == (0, "beta")
    assert "shared text" not in by_text  # occurs with both labels: dropped
    assert len(set(data.texts)) == len(data.texts) == 8
    assert data.class_counts() == {0: 3, 1: 5}
    assert all(not t.startswith("-") and "\\n" not in t for t in data.texts)
    beta = load_toxigen(data_dir, groups=["beta"], part="all")  # without gamma, "shared text" is unambiguous
    assert dict(zip(beta.texts, beta.labels.tolist())) == {"bad b1": 1, "bad a1": 1, "good b1": 0, "shared text": 0}
    with pytest.raises(LabelledDataError, match="unknown group.*delta"):
        load_toxigen(data_dir, groups=["delta"])


SYNTHETIC_SENTENCES = [f"synthetic statement {i} about group {i % 7}" for i in range(600)]


def test_toxigen_split_holds_out_the_first_ranked_30_percent_of_each_file(monkeypatch):
    files = [SYNTHETIC_SENTENCES[:100], SYNTHETIC_SENTENCES[100:137] * 2, SYNTHETIC_SENTENCES[200:201]]
    held_out = toxigen_eval_set(files)
    assert held_out == toxigen_eval_set(files) and held_out <= set(SYNTHETIC_SENTENCES[:201])
    for sentences in files:
        unique = sorted(set(sentences), key=toxigen_rank)
        count = math.ceil(TOXIGEN_EVAL_FRACTION * len(unique))  # 30, 12 (37 unique, each twice), 1
        assert toxigen_eval_set([sentences]) == set(unique[:count])
        assert len(held_out & set(unique)) == count  # the files share no sentence: no union effect
    monkeypatch.setattr(labelled, "TOXIGEN_SPLIT_VERSION", labelled.TOXIGEN_SPLIT_VERSION + 1)
    assert toxigen_eval_set(files) != held_out  # the version salts the rank
    assert len(toxigen_eval_set(files)) == len(held_out)


def test_every_toxigen_file_holds_out_at_least_one_sentence():
    for n in (1, 2, 3):
        sentences = SYNTHETIC_SENTENCES[10 * n : 10 * n + n]
        first = min(sentences, key=toxigen_rank)
        assert toxigen_eval_set([sentences]) == {first}  # ceil(0.3 n) == 1
        assert toxigen_eval_set([sentences, sentences[-1:] * 4]) == {first, sentences[-1]}  # a 1-sentence file too
    assert toxigen_eval_set([[], SYNTHETIC_SENTENCES[:3]]) == {min(SYNTHETIC_SENTENCES[:3], key=toxigen_rank)}


def test_a_sentence_held_out_by_one_file_is_eval_in_every_file(tmp_path):
    by_rank = sorted(SYNTHETIC_SENTENCES[:20], key=toxigen_rank)
    shared, others = by_rank[-1], by_rank[:9]  # shared ranks last in file b: b alone keeps it for probes
    assert shared not in toxigen_eval_set([others + [shared]])
    root = tmp_path / "union"
    prompts = root / "labelled" / "toxigen" / "prompts"
    _write(prompts / "hate_a_1k.txt", _prompt(shared) + "\n")  # its only sentence: held out by file a
    _write(prompts / "hate_b_1k.txt", "\n".join(_prompt(s, shared) for s in others) + "\n")
    _write(prompts / "neutral_b_1k.txt", _prompt(*SYNTHETIC_SENTENCES[300:310]) + "\n")
    by_file, held_out = toxigen_split(prompts)
    assert by_file[prompts / "hate_b_1k.txt"] == [others[0], shared, *others[1:]]  # unique, first-seen order
    assert held_out == toxigen_eval_set(list(by_file.values())) and shared in held_out
    assert len(held_out & set(others)) == 3  # file b still holds out its own ceil(0.3 * 10) first-ranked
    assert shared not in load_toxigen(root, groups=["b"]).texts  # excluded from b's probe part too
    assert shared in load_toxigen(root, groups=["b"], part="eval").texts
    assert toxigen_split(prompts)[1] == toxigen_split(prompts)[1]  # the split never depends on groups read


@pytest.fixture
def many_toxigen(tmp_path):
    """Two ToxiGen files of 120 sentences each (three per prompt line), a few repeated."""
    root = tmp_path / "many"
    prompts = root / "labelled" / "toxigen" / "prompts"
    for kind, offset in (("hate", 0), ("neutral", 300)):
        sentences = SYNTHETIC_SENTENCES[offset : offset + 120]
        lines = [_prompt(*sentences[i : i + 3]) for i in range(0, 120, 3)] + [_prompt(*sentences[:3])]
        _write(prompts / f"{kind}_g_1k.txt", "\n".join(lines) + "\n")
    return root


def test_load_toxigen_parts_are_disjoint_and_add_up(many_toxigen):
    probe, held_out, every = (load_toxigen(many_toxigen, part=part) for part in ("probe", "eval", "all"))
    assert load_toxigen(many_toxigen).texts == probe.texts  # probe by default
    assert len(every) == 240 and len(probe) + len(held_out) == len(every)
    assert set(probe.texts).isdisjoint(held_out.texts) and set(probe.texts) | set(held_out.texts) == set(every.texts)
    _, eval_set = toxigen_split(many_toxigen / "labelled" / "toxigen" / "prompts")
    assert set(held_out.texts) == eval_set and eval_set.isdisjoint(probe.texts)  # membership is toxigen_split's
    assert len(eval_set) == 2 * math.ceil(TOXIGEN_EVAL_FRACTION * 120)  # 36 per file, no sentence shared
    assert probe.class_counts()[1] + held_out.class_counts()[1] == every.class_counts()[1] == 120
    assert load_labelled("toxigen:part=eval", many_toxigen).texts == held_out.texts
    with pytest.raises(LabelledDataError, match="toxigen: part must be one of probe, eval, all; got 'test'"):
        load_toxigen(many_toxigen, part="test")


def test_rtp_split_keeps_only_the_named_parts(data_dir):
    # prompt parts in the fixture: toxic -> redteam, edge -> redteam, calm -> eval, unscored -> posttrain
    assert [rtp_part(t) for t in ("toxic prompt", "edge prompt", "calm prompt", "unscored")] == ["redteam", "redteam", "eval", "posttrain"]
    assert load_rtp(data_dir).texts == load_rtp(data_dir, rtp_parts=RTP_PARTS).texts
    held_out = load_rtp(data_dir, rtp_parts=("posttrain", "redteam"))
    assert dict(zip(held_out.texts, held_out.labels.tolist())) == {"toxic prompt": 1, "edge prompt": 1, "clean end": 0, "also calm": 0}
    evaluation = load_rtp(data_dir, rtp_parts=("eval",))
    assert dict(zip(evaluation.texts, evaluation.labels.tolist())) == {"calm prompt": 0, "nasty end": 1}  # a record stays together
    assert load_labelled("rtp:split=posttrain+redteam", data_dir).texts == held_out.texts
    with pytest.raises(LabelledDataError, match="rtp: split must be among eval, posttrain, redteam; got \\['train'\\]"):
        load_rtp(data_dir, rtp_parts=("train",))


def test_davidson_classes_are_configurable(data_dir):
    data = load_davidson(data_dir)
    assert data.labels.tolist() == [1, 1, 0, 0]
    assert data.texts[0] == 'hateful, "quoted" tweet'
    assert data.texts[1] == "offensive tweet\nwith a newline"
    assert data.groups == ("hate", "offensive", "neither", "neither")
    assert load_davidson(data_dir, toxic_classes=(0,)).labels.tolist() == [1, 0, 0, 0]
    with pytest.raises(LabelledDataError, match="subset of 0, 1, 2"):
        load_davidson(data_dir, toxic_classes=(3,))


def test_rtp_thresholds_parts_and_unscored(data_dir):
    data = load_rtp(data_dir)
    labelled = dict(zip(data.texts, data.labels.tolist()))
    assert labelled == {"toxic prompt": 1, "edge prompt": 1, "clean end": 0, "calm prompt": 0, "nasty end": 1, "also calm": 0}
    assert set(data.groups) == {"prompt", "continuation"}
    prompts_only = load_rtp(data_dir, parts=("prompt",), toxic_threshold=0.6)
    assert dict(zip(prompts_only.texts, prompts_only.labels.tolist())) == {"toxic prompt": 1, "calm prompt": 0}


def test_errors_name_the_file(data_dir, tmp_path):
    davidson = data_dir / "labelled" / "davidson" / "labeled_data.csv.gz"
    with gzip.open(davidson, "wt", encoding="utf-8") as handle:
        handle.write("id,label,text\n1,0,hello\n")
    with pytest.raises(LabelledDataError, match=r"labeled_data\.csv\.gz.*missing column"):
        load_davidson(data_dir)
    (data_dir / "eval" / "rtp" / "toxic.jsonl").write_text('{"prompt": {"text": "x", "toxicity": 0.9}}\nnot json\n')
    with pytest.raises(LabelledDataError, match=r"toxic\.jsonl:1: .*continuation"):
        load_rtp(data_dir)
    with pytest.raises(LabelledDataError, match=r"toxic\.jsonl:2: invalid JSON"):
        load_rtp(data_dir, parts=("prompt",))
    (data_dir / "eval" / "rtp" / "toxic.jsonl").write_text('{"prompt": {"text": "x", "toxicity": 0.9}}\n')
    (data_dir / "eval" / "rtp" / "nontoxic.jsonl").unlink()
    with pytest.raises(MissingDataError, match="nontoxic.jsonl"):
        load_rtp(data_dir, parts=("prompt",))
    bad = data_dir / "labelled" / "toxigen" / "prompts" / "hate_beta_1k.txt"
    bad.write_text(_prompt("fine") + "\nno dash\\n-\n")
    with pytest.raises(LabelledDataError, match=r"hate_beta_1k\.txt:2: not a ToxiGen prompt"):
        load_toxigen(data_dir)
    empty = tmp_path / "empty"
    (empty / "labelled" / "toxigen" / "prompts").mkdir(parents=True)
    with pytest.raises(MissingDataError, match="no ToxiGen prompt files"):
        load_toxigen(empty)
    with pytest.raises(MissingDataError, match="davidson"):
        load_davidson(empty)


def test_parse_data_spec():
    spec = parse_data_spec("davidson:limit=100:balanced,seed=3:toxic_classes=0+1")
    assert spec == DataSpec("davidson", limit=100, balanced=True, seed=3, options=(("toxic_classes", (0, 1)),))
    assert parse_data_spec(str(spec)) == spec
    assert parse_data_spec("rtp:parts=prompt:toxic=0.7").options == (("parts", ("prompt",)), ("toxic", 0.7))
    with pytest.raises(LabelledDataError, match="unknown dataset 'pile'"):
        parse_data_spec("pile")
    with pytest.raises(LabelledDataError, match="unknown option 'groups' for rtp"):
        parse_data_spec("rtp:groups=a")
    with pytest.raises(LabelledDataError, match="limit expects an integer"):
        parse_data_spec("toxigen:limit=many")
    with pytest.raises(LabelledDataError, match="limit must be positive"):
        parse_data_spec("toxigen:limit=0")
    spec = parse_data_spec("toxigen:part=eval:groups=a+b")
    assert spec.options == (("part", "eval"), ("groups", ("a", "b"))) and parse_data_spec(str(spec)) == spec
    spec = parse_data_spec("rtp:split=posttrain+redteam:parts=prompt")
    assert spec.options == (("split", ("posttrain", "redteam")), ("parts", ("prompt",))) and parse_data_spec(str(spec)) == spec
    with pytest.raises(LabelledDataError, match=r"^data spec 'toxigen:part=test': part expects one of probe, eval, all, got 'test'$"):
        parse_data_spec("toxigen:part=test")
    with pytest.raises(LabelledDataError, match=r"^data spec 'rtp:split=eval\+train': split expects names among eval, posttrain, redteam"):
        parse_data_spec("rtp:split=eval+train")
    with pytest.raises(LabelledDataError, match="unknown option 'split' for toxigen"):
        parse_data_spec("toxigen:split=eval")


def test_sampling_is_seeded_balanced_and_ordered():
    labels = np.array([1] * 30 + [0] * 10)
    data = LabelledSet(texts=tuple(f"t{i}" for i in range(40)), labels=labels, name="synthetic")
    balanced = data.sample(balanced=True, seed=1)
    assert balanced.class_counts() == {0: 10, 1: 10}
    assert list(balanced.texts) == sorted(balanced.texts, key=lambda t: int(t[1:]))  # original order kept
    assert data.sample(8, balanced=True, seed=1).class_counts() == {0: 4, 1: 4}
    assert data.sample(12, seed=5).texts == data.sample(12, seed=5).texts
    assert data.sample(12, seed=5).texts != data.sample(12, seed=6).texts
    assert data.sample(100) is data
    with pytest.raises(LabelledDataError, match="labels must be 0 or 1"):
        LabelledSet(texts=("a",), labels=np.array([2]))


def test_load_labelled_applies_spec_and_overrides(data_dir):
    data = load_labelled("toxigen:balanced:seed=2:part=all", data_dir)
    assert data.class_counts() == {0: 3, 1: 3}
    assert data.name == "toxigen:balanced=true:seed=2:part=all"
    assert len(load_labelled("davidson", data_dir, limit=2)) == 2


@pytest.mark.data
def test_real_labelled_sets(shared_dataset):
    root = shared_dataset("labelled/toxigen/prompts").parents[2]
    shared_dataset("labelled/davidson/labeled_data.csv.gz")
    shared_dataset("eval/rtp/toxic.jsonl")
    toxigen = load_toxigen(root)
    assert min(toxigen.class_counts().values()) > 100
    assert len(set(toxigen.texts)) == len(toxigen)
    assert all(t and not t.startswith("- ") and "\\n" not in t for t in toxigen.texts)
    by_file, held_out = toxigen_split(shared_dataset("labelled/toxigen/prompts"))
    assert all(held_out & set(sentences) for sentences in by_file.values())  # every file can be evaluated
    assert held_out.isdisjoint(toxigen.texts)
    davidson = load_davidson(root)
    # Class totals as documented in the data README (hate + offensive vs neither).
    assert davidson.class_counts() == {0: 4163, 1: 1430 + 19190}
    rtp = load_rtp(root)
    assert min(rtp.class_counts().values()) > 100
    assert set(rtp.groups) == {"prompt", "continuation"}
