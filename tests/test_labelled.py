"""Labelled text sets: loaders on crafted fixtures (same layout as the data directory), specs, real counts."""

import csv
import gzip
import json

import numpy as np
import pytest

from jaxlm.data.labelled import (
    DataSpec,
    LabelledDataError,
    LabelledSet,
    load_davidson,
    load_labelled,
    load_rtp,
    load_toxigen,
    parse_data_spec,
    split_toxigen_prompt,
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
    data = load_toxigen(data_dir)
    by_text = dict(zip(data.texts, zip(data.labels.tolist(), data.groups)))
    assert by_text["bad a1"] == (1, "alpha")  # first file wins; repeated in hate_beta
    assert by_text["bad b1"] == (1, "beta")
    assert by_text["good b1"] == (0, "beta")
    assert "shared text" not in by_text  # occurs with both labels: dropped
    assert len(set(data.texts)) == len(data.texts) == 8
    assert data.class_counts() == {0: 3, 1: 5}
    assert all(not t.startswith("-") and "\\n" not in t for t in data.texts)
    beta = load_toxigen(data_dir, groups=["beta"])  # without gamma, "shared text" is unambiguous
    assert dict(zip(beta.texts, beta.labels.tolist())) == {"bad b1": 1, "bad a1": 1, "good b1": 0, "shared text": 0}
    with pytest.raises(LabelledDataError, match="unknown group.*delta"):
        load_toxigen(data_dir, groups=["delta"])


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
    data = load_labelled("toxigen:balanced:seed=2", data_dir)
    assert data.class_counts() == {0: 3, 1: 3}
    assert data.name == "toxigen:balanced=true:seed=2"
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
    davidson = load_davidson(root)
    # Class totals as documented in the data README (hate + offensive vs neither).
    assert davidson.class_counts() == {0: 4163, 1: 1430 + 19190}
    rtp = load_rtp(root)
    assert min(rtp.class_counts().values()) > 100
    assert set(rtp.groups) == {"prompt", "continuation"}
