"""Prompt/response data (jaxlm.data.examples): masks, packing, cuts and drops, epochs, resume,
processes, bad input, preference pairs."""

import gzip
import json
from collections import Counter

import numpy as np
import pytest

from jaxlm.config import ConfigError, from_dict
from jaxlm.data import DataError
from jaxlm.data.examples import (
    PAIR_KEYS,
    ExampleDataConfig,
    ExampleDataError,
    build_example_pipeline,
    preference_arrays,
    read_examples,
    source_name,
)
from jaxlm.data.records import file_sha256
from jaxlm.tokenizer import train_bpe

WORDS = "the river ran past old stone houses while children read books under quiet trees you stupid idiot".split()


def sentence(rng, low=2, high=6) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(low, high))))


def sft_rows(count, seed, tag):
    rng = np.random.default_rng(seed)
    return [{"prompt": f"{tag} {i}: {sentence(rng)}", "response": " " + sentence(rng)} for i in range(count)]


def pair_rows(count, seed):
    rng = np.random.default_rng(seed)
    return [
        {"prompt": f"q{i} {sentence(rng)}", "chosen": " kind " + sentence(rng), "rejected": " mean " + sentence(rng)}
        for i in range(count)
    ]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    texts = [sentence(rng) for _ in range(300)] + [f"alpha beta q{i} {i}:" for i in range(40)]
    return train_bpe(texts, vocab_size=400).save(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_file):
    from jaxlm.tokenizer import Tokenizer

    return Tokenizer.load(tokenizer_file)


@pytest.fixture
def two_sources(tmp_path):
    return (
        write_jsonl(tmp_path / "alpha.jsonl", sft_rows(13, 1, "alpha")),
        write_jsonl(tmp_path / "beta.jsonl", sft_rows(7, 2, "beta")),
    )


def sft_config(paths, **changes):
    data = {"paths": [str(p) for p in paths], "format": "sft", "seq_len": 48, "batch_size": 4, **changes}
    return from_dict(ExampleDataConfig, data, "examples")


def take(pipeline, n):
    return [next(pipeline) for _ in range(n)]


def segments(batch, prefix=""):
    """(row, segment id, tokens, mask) of every example placed in a batch."""
    out = []
    tokens, seg, mask = batch[f"{prefix}tokens"], batch[f"{prefix}segment_ids"], batch[f"{prefix}loss_mask"]
    for r in range(tokens.shape[0]):
        for s in range(1, int(seg[r].max()) + 1):
            where = seg[r] == s
            out.append((r, s, tokens[r][where], mask[r][where]))
    return out


def expected_sequence(tokenizer, row, response="response"):
    return tokenizer.encode(row["prompt"]) + tokenizer.encode(row[response]) + [tokenizer.eos_id]


# ---------------------------------------------------------------------------------------
# Masks and tokens
# ---------------------------------------------------------------------------------------


def test_mask_marks_exactly_the_response_and_its_eos(tmp_path, tokenizer_file, tokenizer):
    rows = sft_rows(6, 3, "alpha")
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    pipeline = build_example_pipeline(sft_config([path], pack=False, batch_size=6), tokenizer_file)
    batch = next(pipeline)
    by_prompt = {r["prompt"]: r for r in rows}
    assert set(batch) == {"tokens", "segment_ids", "positions", "loss_mask", "source_ids"}
    assert all(v.dtype == np.int32 for v in batch.values())
    for r in range(6):
        real = batch["segment_ids"][r] == 1
        n = int(real.sum())
        assert real[:n].all() and not real[n:].any()  # one example, then padding
        mask = batch["loss_mask"][r].astype(bool)
        prompt = tokenizer.decode(batch["tokens"][r][real & ~mask])
        row = by_prompt[prompt]
        assert tokenizer.decode(batch["tokens"][r][mask], skip_special_tokens=False) == row["response"] + "<|endoftext|>"
        assert batch["tokens"][r][:n].tolist() == expected_sequence(tokenizer, row)  # separate tokenization
        assert (batch["tokens"][r][n:] == tokenizer.pad_id).all() and not mask[n:].any()
        assert batch["positions"][r][:n].tolist() == list(range(n))
        assert mask[0] == 0 and mask[n - 1] == 1


def test_add_eos_false_and_empty_prompt(tmp_path, tokenizer_file, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "", "response": " the river"}])
    pipeline = build_example_pipeline(sft_config([path], pack=False, batch_size=1, add_eos=False), tokenizer_file)
    batch = next(pipeline)
    n = int((batch["segment_ids"][0] > 0).sum())
    assert batch["tokens"][0][:n].tolist() == [tokenizer.eos_id] + tokenizer.encode(" the river")
    assert batch["loss_mask"][0][:n].tolist() == [0] + [1] * (n - 1)
    assert pipeline.summary()["totals"]["empty_prompt"] == 1


# ---------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------


def test_packing_keeps_whole_examples_with_aligned_segments(two_sources, tokenizer_file, tokenizer):
    config = sft_config(two_sources, seq_len=40, batch_size=3)
    pipeline = build_example_pipeline(config, tokenizer_file)
    rows = [json.loads(line) for p in two_sources for line in p.read_text().splitlines()]
    whole = {tuple(expected_sequence(tokenizer, r)): (r, 0 if r["prompt"].startswith("alpha") else 1) for r in rows}
    previous_used = None
    for batch in take(pipeline, 6):
        for r in range(3):
            seg, pos = batch["segment_ids"][r], batch["positions"][r]
            used = int((seg > 0).sum())
            assert (seg[:used] > 0).all() and (seg[used:] == 0).all()  # padding only at the end
            assert np.all(np.diff(seg[:used]) >= 0) and set(seg[:used]) == set(range(1, seg.max() + 1))
            assert (batch["tokens"][r][used:] == tokenizer.pad_id).all() and not batch["loss_mask"][r][used:].any()
            placed = [s for s in segments({k: v[r : r + 1] for k, v in batch.items()})]
            for _, s, tokens, mask in placed:
                row, source = whole[tuple(tokens.tolist())]  # a whole example, never a piece
                n_prompt = len(tokenizer.encode(row["prompt"]))
                assert mask.tolist() == [0] * n_prompt + [1] * (len(tokens) - n_prompt)
                assert pos[seg == s].tolist() == list(range(len(tokens)))
                if s == 1:
                    assert batch["source_ids"][r] == source
            if previous_used is not None:  # greedy: this row's first example did not fit in the last row
                assert previous_used + len(placed[0][2]) > 40
            previous_used = used
    assert max(int(b) for b in batch["segment_ids"].max(axis=1)) >= 2  # packing happened


def test_every_example_once_per_epoch_and_epochs_differ(two_sources, tokenizer_file):
    config = sft_config(two_sources, pack=False, batch_size=5)  # 20 examples: 4 batches an epoch
    pipeline = build_example_pipeline(config, tokenizer_file)

    def epoch_examples():
        return [tuple(t.tolist()) for b in take(pipeline, 4) for _, _, t, _ in segments(b)]

    first, second = epoch_examples(), epoch_examples()
    assert len(set(first)) == 20 and Counter(first) == Counter(second)
    assert first != second
    assert pipeline.get_state()["epoch"] == 1


def test_packed_stream_spans_epochs_and_keeps_every_example(two_sources, tokenizer_file):
    pipeline = build_example_pipeline(sft_config(two_sources, seq_len=64, batch_size=2), tokenizer_file)
    placed = Counter()
    while pipeline.get_state()["epoch"] < 3:
        for _, _, tokens, _ in segments(next(pipeline)):
            placed[tuple(tokens.tolist())] += 1
    state = pipeline.get_state()
    assert len(placed) == 20 and sum(placed.values()) == 3 * 20 + state["position"]
    assert set(placed.values()) <= {3, 4}


def test_same_seed_same_batches_other_seed_other_order(two_sources, tokenizer_file):
    a = take(build_example_pipeline(sft_config(two_sources), tokenizer_file), 5)
    b = take(build_example_pipeline(sft_config(two_sources), tokenizer_file), 5)
    c = take(build_example_pipeline(sft_config(two_sources, seed=1), tokenizer_file), 5)
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))


def test_realised_shares_count_trained_tokens_per_source(two_sources, tokenizer_file, tokenizer):
    pipeline = build_example_pipeline(sft_config(two_sources), tokenizer_file)
    assert pipeline.realised_shares() == {"alpha": 0.0, "beta": 0.0}
    trained = Counter()
    for batch in take(pipeline, 7):
        for _, _, tokens, mask in segments(batch):
            source = "alpha" if tokenizer.decode(tokens[:2]).startswith("alpha") else "beta"
            trained[source] += int(mask.sum())
    total = sum(trained.values())
    assert pipeline.realised_shares() == pytest.approx({k: v / total for k, v in trained.items()})
    assert sum(pipeline.realised_rows().values()) == 7 * 4


# ---------------------------------------------------------------------------------------
# Too long, drops, summary
# ---------------------------------------------------------------------------------------


def test_cut_prompt_keeps_the_last_prompt_tokens_and_the_whole_response(tmp_path, tokenizer_file, tokenizer):
    long_prompt = " ".join(WORDS * 3)
    rows = [
        {"prompt": long_prompt, "response": " the river ran"},
        {"prompt": "short", "response": " " + " ".join(WORDS * 3)},  # does not fit even alone
        {"prompt": "fits", "response": " quiet trees"},
        {"prompt": "blank", "response": "  \n"},
    ]
    path = write_jsonl(tmp_path / "cut.jsonl", rows)
    pipeline = build_example_pipeline(sft_config([path], seq_len=24, pack=False, batch_size=2), tokenizer_file)
    response = tokenizer.encode(" the river ran") + [tokenizer.eos_id]
    kept_prompt = tokenizer.encode(long_prompt)[-(24 - len(response)) :]
    sequences = {tuple(t.tolist()) for _, _, t, _ in segments(next(pipeline))}
    assert tuple(kept_prompt + response) in sequences
    assert tuple(expected_sequence(tokenizer, rows[2])) in sequences
    summary = pipeline.summary()
    (file,) = summary["files"]
    assert file["rows"] == 4 and file["kept"] == 2 and file["prompt_cut"] == 1
    assert file["dropped"] == {"empty_response": 1, "response_too_long": 1}
    assert summary["totals"]["dropped"] == file["dropped"]

    dropping = build_example_pipeline(sft_config([path], seq_len=24, too_long="drop"), tokenizer_file)
    assert dropping.summary()["files"][0]["dropped"] == {"empty_response": 1, "too_long": 2}
    assert dropping.num_examples == 1


def test_summary_is_json_and_fingerprints_the_dataset_not_the_stream(two_sources, tokenizer_file, tmp_path):
    pipeline = build_example_pipeline(sft_config(two_sources), tokenizer_file)
    summary = json.loads(json.dumps(pipeline.summary()))
    assert [f["sha256"] for f in summary["files"]] == [file_sha256(p) for p in two_sources]
    assert summary["totals"]["rows"] == summary["totals"]["kept"] == 20
    assert summary["tokens"]["response"]["min"] >= 2 and set(summary["tokens"]) == {"prompt", "response"}
    assert summary["settings"]["pack"] is True and summary["fingerprint"] == pipeline.fingerprint
    same = build_example_pipeline(sft_config(two_sources, seed=5, batch_size=2, pack=False), tokenizer_file)
    assert same.fingerprint == pipeline.fingerprint
    assert build_example_pipeline(sft_config(two_sources, add_eos=False), tokenizer_file).fingerprint != pipeline.fingerprint
    moved = [tmp_path / "moved" / p.name for p in two_sources]
    moved[0].parent.mkdir()
    for src, dst in zip(two_sources, moved):
        dst.write_bytes(src.read_bytes())
    assert build_example_pipeline(sft_config(moved), tokenizer_file).fingerprint == pipeline.fingerprint


def test_gzip_files_and_expanded_paths(tmp_path, tokenizer_file, monkeypatch):
    rows = sft_rows(3, 4, "alpha")
    gz = tmp_path / "posts.jsonl.gz"
    gz.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    monkeypatch.setenv("EXAMPLES_DIR", str(tmp_path))
    pipeline = build_example_pipeline(sft_config(["$EXAMPLES_DIR/posts.jsonl.gz"]), tokenizer_file)
    assert pipeline.source_names == ("posts",) and pipeline.num_examples == 3
    assert source_name("a/b.c.jsonl") == "b.c" and source_name("x/plain") == "plain"


# ---------------------------------------------------------------------------------------
# Resumption and processes
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("pack", [True, False])
def test_resume_gives_the_same_following_batches(two_sources, tokenizer_file, pack):
    config = sft_config(two_sources, pack=pack, batch_size=3)
    uninterrupted = take(build_example_pipeline(config, tokenizer_file), 14)  # spans epochs
    first = build_example_pipeline(config, tokenizer_file)
    take(first, 7)  # 21 rows of 20 examples: into the second epoch even unpacked
    state = json.loads(json.dumps(first.get_state()))
    assert state["epoch"] >= 1
    resumed = build_example_pipeline(config, tokenizer_file, state=state)
    assert resumed.step == 7 and resumed.realised_shares() == first.realised_shares()
    for expected, got in zip(uninterrupted[7:], take(resumed, 7)):
        assert all(np.array_equal(expected[k], got[k]) for k in expected)


def test_state_of_other_data_or_settings_is_refused(two_sources, tokenizer_file):
    pipeline = build_example_pipeline(sft_config(two_sources), tokenizer_file)
    next(pipeline)
    state = pipeline.get_state()
    rows = sft_rows(7, 2, "beta")
    rows[0]["response"] = " changed"
    write_jsonl(two_sources[1], rows)
    with pytest.raises(DataError, match=r"another dataset.*source 'beta' has other contents"):
        build_example_pipeline(sft_config(two_sources), tokenizer_file, state=state)
    with pytest.raises(ExampleDataError, match=r"examples.seq_len.*seq_len=48.*says 32"):
        build_example_pipeline(sft_config(two_sources, seq_len=32), tokenizer_file).set_state(state)
    with pytest.raises(ExampleDataError, match=r"examples.seed"):
        build_example_pipeline(sft_config(two_sources, seed=3), tokenizer_file).set_state(state)
    with pytest.raises(ExampleDataError, match=r"not the state of a prompt/response pipeline"):
        pipeline.set_state({"version": 1, "seq_len": 48, "seed": 0, "step": 2, "phase": {}, "streams": {}})


@pytest.mark.parametrize("fmt", ["sft", "preference"])
def test_two_processes_split_the_global_batch(tmp_path, two_sources, tokenizer_file, fmt):
    if fmt == "sft":
        config = sft_config(two_sources)
    else:
        path = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(9, 5))
        config = sft_config([path], format="preference")
    whole = take(build_example_pipeline(config, tokenizer_file), 3)
    parts = [take(build_example_pipeline(config, tokenizer_file, process_index=p, process_count=2), 3) for p in (0, 1)]
    for full, p0, p1 in zip(whole, *parts):
        assert set(p0) == set(full) and all(len(v) == 2 for v in p0.values())
        for key in full:
            assert np.array_equal(np.concatenate([p0[key], p1[key]]), full[key])
    with pytest.raises(ConfigError, match="divide evenly"):
        build_example_pipeline(sft_config(two_sources, batch_size=3), tokenizer_file, process_index=0, process_count=2)


def test_peek_shapes_and_global_arrays(two_sources, tokenizer_file):
    import jax

    from jaxlm.config import MeshConfig
    from jaxlm.sharding import make_mesh

    pipeline = build_example_pipeline(sft_config(two_sources, batch_size=8), tokenizer_file)
    shapes = pipeline.peek_shapes()
    assert set(shapes) == {"tokens", "segment_ids", "positions", "loss_mask"}
    assert all(s.shape == (8, 48) and s.dtype == np.int32 for s in shapes.values())
    batch = next(pipeline)
    batch.pop("source_ids")
    placed = pipeline.to_global(batch, make_mesh(MeshConfig(data=-1)))
    assert all(isinstance(v, jax.Array) and v.shape == (8, 48) for v in placed.values())
    assert np.array_equal(np.asarray(placed["loss_mask"]), batch["loss_mask"])
    pipeline.close()
    with pytest.raises(RuntimeError, match="closed"):
        next(pipeline)


# ---------------------------------------------------------------------------------------
# Preference pairs
# ---------------------------------------------------------------------------------------


def test_preference_batches_and_arrays_in_example_index_order(tmp_path, tokenizer_file, tokenizer):
    rows = pair_rows(8, 6)
    rows.insert(3, {"prompt": "p", "chosen": " same", "rejected": " same"})
    rows.insert(5, {"prompt": "p", "chosen": " ok", "rejected": ""})
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = sft_config([path], format="preference", batch_size=3)
    pipeline = build_example_pipeline(config, tokenizer_file)
    assert pipeline.summary()["files"][0]["dropped"] == {"empty_response": 1, "identical_pair": 1, "response_too_long": 0}
    kept = [r for r in rows if r["chosen"].strip() and r["rejected"].strip() and r["chosen"] != r["rejected"]]
    arrays = preference_arrays(pipeline)
    assert set(arrays) == set(PAIR_KEYS) and all(a.shape == (8, 48) for a in arrays.values())
    for i, row in enumerate(kept):  # example_index = position among the kept rows, in file order
        for side in ("chosen", "rejected"):
            real = arrays[f"{side}_segment_ids"][i] == 1
            mask = arrays[f"{side}_loss_mask"][i].astype(bool)
            assert arrays[f"{side}_tokens"][i][real].tolist() == expected_sequence(tokenizer, row, side)
            assert tokenizer.decode(arrays[f"{side}_tokens"][i][mask], skip_special_tokens=False) == row[side] + "<|endoftext|>"
            assert not mask[~real].any() and (arrays[f"{side}_tokens"][i][~real] == tokenizer.pad_id).all()
    batch = next(pipeline)
    assert set(batch) == {*PAIR_KEYS, "example_index", "source_ids"}
    for r, index in enumerate(batch["example_index"]):
        assert all(np.array_equal(batch[k][r], arrays[k][index]) for k in PAIR_KEYS)
    again = build_example_pipeline(sft_config([path], format="preference", batch_size=2, seed=9), tokenizer_file)
    assert all(np.array_equal(preference_arrays(again)[k], arrays[k]) for k in PAIR_KEYS)
    assert set(pipeline.peek_shapes()) == {*PAIR_KEYS, "example_index"}
    with pytest.raises(ExampleDataError, match="not preference pairs"):
        preference_arrays(build_example_pipeline(sft_config([write_jsonl(tmp_path / "s.jsonl", sft_rows(2, 0, "a"))]), tokenizer_file))


def test_preference_cut_fits_the_longer_response(tmp_path, tokenizer_file, tokenizer):
    row = {"prompt": " ".join(WORDS * 2), "chosen": " the river", "rejected": " old stone houses while children read"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [row])
    pipeline = build_example_pipeline(sft_config([path], format="preference", seq_len=20, batch_size=1), tokenizer_file)
    arrays = preference_arrays(pipeline)
    longer = tokenizer.encode(row["rejected"]) + [tokenizer.eos_id]
    prompt = tokenizer.encode(row["prompt"])[-(20 - len(longer)) :]
    assert arrays["rejected_tokens"][0].tolist() == prompt + longer
    chosen = prompt + tokenizer.encode(row["chosen"]) + [tokenizer.eos_id]
    assert arrays["chosen_tokens"][0][: len(chosen)].tolist() == chosen
    assert pipeline.summary()["files"][0]["prompt_cut"] == 1


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a", "response": "b"}', "not json"], r"bad\.jsonl:2: invalid JSON"),
        (['["a", "b"]'], r"bad\.jsonl:1: expected a JSON object, got list"),
        (['{"prompt": "a"}'], r"bad\.jsonl:1: missing field 'response' \(the row has: prompt\)"),
        (['{"prompt": "a", "response": 3}'], r"bad\.jsonl:1: field 'response': expected a string, got int 3"),
        (['{"prompt": null, "response": "b"}'], r"bad\.jsonl:1: field 'prompt': expected a string, got null"),
        (["", "  "], r"bad\.jsonl: no rows"),
    ],
)
def test_bad_rows_name_the_file_line_and_field(tmp_path, tokenizer_file, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ExampleDataError, match=message):
        build_example_pipeline(sft_config([path]), tokenizer_file)


def test_read_examples_uses_the_configured_fields_and_counts_drops(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"q": "a", "a": "b"}, {"q": "c", "a": " "}, {"q": "e", "a": "f"}])
    dropped = Counter()
    config = sft_config([path], prompt_field="q", response_field="a")
    assert list(read_examples(path, config, dropped)) == [(1, {"prompt": "a", "response": "b"}), (3, {"prompt": "e", "response": "f"})]
    assert dropped == {"empty_response": 1}


def test_all_rows_dropped_is_an_error(tmp_path, tokenizer_file):
    path = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "a", "response": ""}])
    with pytest.raises(ExampleDataError, match="no usable examples.*empty_response=1"):
        build_example_pipeline(sft_config([path]), tokenizer_file)


def test_missing_or_repeated_paths(tmp_path, tokenizer_file):
    with pytest.raises(ConfigError, match=r"examples.paths\[0\]: .*nope.jsonl"):
        build_example_pipeline(sft_config([tmp_path / "nope.jsonl"]), tokenizer_file)
    with pytest.raises(ConfigError, match="unset environment variable"):
        sft_config(["$JAXLM_SURELY_UNSET_VAR/x.jsonl"]).resolved_paths()
    (tmp_path / "d").mkdir()
    files = [write_jsonl(tmp_path / "x.jsonl", sft_rows(1, 0, "a")), write_jsonl(tmp_path / "d" / "x.jsonl", sft_rows(1, 0, "a"))]
    with pytest.raises(ConfigError, match="'x' occurs more than once"):
        sft_config(files).resolved_paths()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"paths": []}, r"examples.paths: expected at least one"),
        ({"format": "chat"}, r"examples.format: expected one of 'sft', 'preference'"),
        ({"seq_len": 1}, r"examples.seq_len: expected an integer >= 2"),
        ({"batch_size": 0}, r"examples.batch_size"),
        ({"seed": -1}, r"examples.seed"),
        ({"format": "preference", "pack": True}, r"examples.pack: preference pairs are always one pair per row"),
        ({"response_field": "prompt"}, r"fields must be distinct"),
        ({"too_long": "truncate"}, r"examples.too_long"),
        ({"shuffle": True}, r"examples: unknown key 'shuffle'"),
    ],
)
def test_config_errors_name_the_field(changes, message):
    data = {"paths": ["x.jsonl"], "format": "sft", "seq_len": 48, "batch_size": 4, **changes}
    with pytest.raises(ConfigError, match=message):
        from_dict(ExampleDataConfig, data, "examples")


def test_preference_config_defaults_do_not_pack():
    config = sft_config(["x.jsonl"], format="preference", pack=False)
    assert not config.packs and config.fields == {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
    assert sft_config(["x.jsonl"]).packs and not sft_config(["x.jsonl"], pack=False).packs
