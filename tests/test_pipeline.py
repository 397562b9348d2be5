"""Prepared-data records and the mixture pipeline: exact shares, packing, state, sharding."""

import json
import math
from fractions import Fraction

import numpy as np
import pytest

from jaxlm.config import ConfigError, from_dict
from jaxlm.data import records
from jaxlm.data.pipeline import (
    PipelineConfig,
    TagConfig,
    TagTransform,
    apportion_rows,
    build_pipeline,
    to_global_array,
)

EOS, PAD = 0, 1


# ---------------------------------------------------------------------------------------
# Fixtures: a prepared dataset whose documents identify themselves
# ---------------------------------------------------------------------------------------


def doc_tokens(source_index: int, doc_index: int, length: int) -> np.ndarray:
    """Every token of a document is its id ``2 + 50*source + doc`` (so rows can be traced)."""
    return np.full(length, 2 + 50 * source_index + doc_index, np.int64)


def make_dataset(root, sources, *, vocab_size=256, num_shards=2, tokenizer=None, seed=0):
    """``sources``: {name: list of document lengths}. Returns the dataset directory."""
    rng = np.random.default_rng(seed)
    infos = {}
    for s, (name, lengths) in enumerate(sources.items()):
        docs = [
            (doc_tokens(s, j, n), {"doc_id": f"{name}-{j}", "source": name, "toxicity": float(rng.random())})
            for j, n in enumerate(lengths)
        ]
        stats = records.write_source(root / name, docs, num_shards=num_shards)
        infos[name] = records.SourceInfo(
            name, root / name, stats["num_documents"], stats["num_tokens"], "uint16", vocab_size, EOS, PAD
        )
    records.write_manifest(root, infos, tokenizer=tokenizer)
    return root


def lengths(n, mean, seed):
    return [int(x) for x in np.random.default_rng(seed).integers(1, 2 * mean, n)]


@pytest.fixture
def three_sources(tmp_path):
    return make_dataset(
        tmp_path / "data",
        {"books": lengths(12, 150, 1), "posts": lengths(40, 12, 2), "news": lengths(20, 40, 3)},
    )


def config(dataset, sources, **changes):
    data = {"dataset": str(dataset), "sources": sources, "seq_len": 32, "batch_size": 16, "seed": 3}
    data.update(changes)
    return from_dict(PipelineConfig, data)


def take(pipeline, n):
    return [next(pipeline) for _ in range(n)]


def same_batches(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


# ---------------------------------------------------------------------------------------
# Records, shards, manifest
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,top", [("uint16", 65535), ("uint32", 2**32 - 1)])
def test_record_round_trip(dtype, top):
    tokens = np.array([0, 5, top], np.int64)
    meta = {"doc_id": "ü-1", "source": "pol", "toxicity": 0.25, "extra": [1, 2]}
    data = records.encode_record(tokens, meta, token_dtype=dtype)
    ids, back = records.decode_record(data)
    assert ids.dtype == np.dtype(dtype) and ids.tolist() == tokens.tolist()
    assert back == meta
    assert records.decode_tokens(data).tolist() == tokens.tolist()
    assert records.token_dtype_for_vocab(65536) == "uint16" and records.token_dtype_for_vocab(65537) == "uint32"


def test_record_errors():
    good = records.encode_record([1, 2, 3], {"doc_id": "a", "source": "s"})
    with pytest.raises(records.RecordError, match="truncated"):
        records.decode_record(good[:-1])
    with pytest.raises(records.RecordError, match="magic"):
        records.decode_record(b"XXXX" + good[4:])
    with pytest.raises(records.RecordError, match="does not fit in uint16"):
        records.encode_record([70000], {"doc_id": "a", "source": "s"}, token_dtype="uint16")
    with pytest.raises(records.RecordError, match="meta.doc_id"):
        records.encode_record([1], {"source": "s"})
    with pytest.raises(records.RecordError, match="meta.toxicity"):
        records.encode_record([1], {"doc_id": "a", "source": "s", "toxicity": float("nan")})


def test_shard_writer_is_atomic(tmp_path):
    source = tmp_path / "src"
    with pytest.raises(RuntimeError):
        with records.ShardWriter(source, 0, 1) as writer:
            writer.write([1, 2], {"doc_id": "a", "source": "src"})
            raise RuntimeError("killed")
    assert list(source.iterdir()) == []  # neither a shard nor a temporary file
    writer = records.ShardWriter(source, 0, 2)
    writer.write([1, 2], {"doc_id": "a", "source": "src"})  # "interrupted": never closed
    with pytest.raises(records.RecordError, match="no shards"):
        records.shard_paths(source)
    writer.abort()
    with records.ShardWriter(source, 1, 2) as writer:
        writer.write([1, 2], {"doc_id": "a", "source": "src"})
    with pytest.raises(records.RecordError, match="incomplete shard set.*shard-00000-of-00002"):
        records.open_source(source)
    with records.ShardWriter(source, 0, 2) as writer:
        writer.write([3, 4, 5], {"doc_id": "b", "source": "src"})
    data = records.open_source(source)
    assert len(data) == 2 and [records.decode_tokens(data[i]).tolist() for i in range(2)] == [[3, 4, 5], [1, 2]]


def test_manifest_round_trip_and_field_errors(tmp_path):
    root = make_dataset(tmp_path / "d", {"a": [3, 4], "b": [5]}, tokenizer="tokenizer.json")
    manifest = records.read_manifest(root)
    assert set(manifest.sources) == {"a", "b"} and manifest.tokenizer == (root / "tokenizer.json").resolve()
    a = manifest.sources["a"]
    assert (a.num_documents, a.num_tokens, a.token_dtype, a.vocab_size, a.eos_id) == (2, 7, "uint16", 256, EOS)
    assert records.iter_prepared_tokens(root / "b", 100).tolist() == [2 + 50, 52, 52, 52, 52, EOS]

    data = json.loads((root / "manifest.json").read_text())
    del data["sources"]["b"]["eos_id"]
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(records.ManifestError, match=r"sources\.b: missing field 'eos_id'"):
        records.read_manifest(root)
    data["sources"]["b"]["eos_id"] = 999
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(records.ManifestError, match=r"sources\.b\.eos_id: expected a token id in \[0, 256\)"):
        records.read_manifest(root)
    with pytest.raises(records.ManifestError, match="no manifest"):
        records.read_manifest(tmp_path / "elsewhere")


# ---------------------------------------------------------------------------------------
# Apportionment
# ---------------------------------------------------------------------------------------


def test_apportionment_stays_within_one_row_of_target():
    rng = np.random.default_rng(0)
    for trial in range(60):
        k = int(rng.integers(2, 7))
        raw = rng.dirichlet(np.full(k, 0.3))
        raw[rng.integers(0, k)] = 0.0 if trial % 2 else raw[0]
        weights = [Fraction(repr(round(float(x), 4))) for x in raw]
        if sum(weights) == 0:
            continue
        weights = [w / sum(weights) for w in weights]
        active = sum(w > 0 for w in weights)
        bound = 1 - Fraction(1, 2 * active - 2) if active > 1 else 0
        chosen = apportion_rows(weights, [0] * k, 0, 200)
        counts = np.zeros(k, int)
        for n, i in enumerate(chosen, 1):
            assert weights[i] > 0
            counts[i] += 1
            assert all(abs(counts[j] - n * weights[j]) <= bound for j in range(k))
        # continuing from a saved position gives the same rows
        assert apportion_rows(weights, list(np.bincount(chosen[:77], minlength=k)), 77, 123) == chosen[77:]


# ---------------------------------------------------------------------------------------
# Mixture
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights",
    [
        {"books": 0.9, "posts": 0.1},
        {"books": 0.0, "posts": 1.0},
        {"books": 0.5, "posts": 0.3, "news": 0.2},
        {"books": 0.7, "posts": 0.0, "news": 0.3},
        {"books": 1 / 3, "posts": 1 / 3, "news": 1 / 3},
    ],
)
def test_exact_token_shares(three_sources, weights):
    pipeline = build_pipeline(config(three_sources, weights))
    names = pipeline.source_names
    counts = np.zeros(len(names), int)
    for step in range(100):
        batch = next(pipeline)
        assert (batch["segment_ids"] > 0).all()  # no padding: every row holds seq_len tokens
        counts += np.bincount(batch["source_ids"], minlength=len(names))
        rows = 16 * (step + 1)
        for i, name in enumerate(names):  # after every batch, within one row of the target
            assert abs(counts[i] - rows * weights[name]) < 1, (step, name)
    shares = pipeline.realised_shares()
    for i, name in enumerate(names):
        assert abs(shares[name] - weights[name]) < 0.01
        assert shares[name] == counts[i] / counts.sum()
        if weights[name] == 0:
            assert counts[i] == 0


def test_deterministic_and_seeded(three_sources):
    weights = {"books": 0.5, "posts": 0.3, "news": 0.2}
    a = take(build_pipeline(config(three_sources, weights)), 12)
    b = take(build_pipeline(config(three_sources, weights, prefetch=0, read_threads=2)), 12)
    c = take(build_pipeline(config(three_sources, weights, seed=4)), 12)
    assert same_batches(a, b)
    assert not same_batches(a, c)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_equality(three_sources, prefetch):
    cfg = config(three_sources, {"books": 0.5, "posts": 0.3, "news": 0.2}, prefetch=prefetch)
    pipeline = build_pipeline(cfg)
    take(pipeline, 7)
    state = pipeline.get_state()
    assert json.loads(json.dumps(state)) == state  # plain JSON
    expected = take(pipeline, 5)
    resumed = build_pipeline(cfg, state=json.loads(json.dumps(state)))
    assert resumed.step == 7 and resumed.realised_rows() == state["rows_per_source"]
    assert same_batches(take(resumed, 5), expected)
    pipeline.set_state(state)  # set_state on a live pipeline rewinds it too
    assert same_batches(take(pipeline, 5), expected)


def test_resume_at_a_document_boundary(tmp_path):
    # Documents of seq_len tokens (with EOS) end exactly at row ends, so the saved packer
    # state has no remainder; grain's packer needs its (-1, -1) slices back as tuples after JSON.
    root = make_dataset(tmp_path / "d", {"a": [31] * 6, "b": [15] * 6})
    cfg = config(root, {"a": 0.5, "b": 0.5}, batch_size=4)
    pipeline = build_pipeline(cfg)
    take(pipeline, 3)
    state = json.loads(json.dumps(pipeline.get_state()))
    assert state["streams"]["a"]["remainder_slices"]["tokens"] == [-1, -1]
    expected = take(pipeline, 4)
    assert same_batches(take(build_pipeline(cfg, state=state), 4), expected)


def rows_by_source(batches, names):
    out = {name: [] for name in names}
    for batch in batches:
        for row, source in zip(batch["tokens"], batch["source_ids"]):
            out[names[source]].append(row)
    return out


def test_mixture_change_on_resume_keeps_stream_positions(three_sources):
    old = config(three_sources, {"books": 0.5, "posts": 0.5, "news": 0.0})
    new = config(three_sources, {"books": 0.25, "posts": 0.25, "news": 0.5})
    pipeline = build_pipeline(old)
    take(pipeline, 7)
    state = pipeline.get_state()
    continued = rows_by_source(take(pipeline, 40), old.source_names)  # the old mixture goes on

    resumed = build_pipeline(new, state=state)
    batches = take(resumed, 8)
    for batch in batches:  # the new weights from the saved step on, exactly
        assert np.bincount(batch["source_ids"], minlength=3).tolist() == [4, 4, 8]
    after = rows_by_source(batches, new.source_names)
    for name in ("books", "posts"):  # each source continues where it stopped
        assert all(np.array_equal(x, y) for x, y in zip(after[name], continued[name]))
    fresh = build_pipeline(config(three_sources, {"news": 1.0, "books": 0, "posts": 0}))
    fresh_news = rows_by_source(take(fresh, 4), fresh.source_names)["news"]
    assert all(np.array_equal(x, y) for x, y in zip(after["news"], fresh_news))  # news starts fresh
    rows = resumed.realised_rows()
    assert rows == {"books": 7 * 8 + 32, "posts": 7 * 8 + 32, "news": 64}


def test_schedule_switches_at_the_stated_step(three_sources):
    cfg = config(
        three_sources,
        {"books": 1.0, "posts": 0.0, "news": 0.0},
        schedule=[{"step": 5, "weights": {"posts": 1.0}}, {"step": 8, "weights": {"books": 0.5, "news": 0.5}}],
    )
    pipeline = build_pipeline(cfg)
    per_step = [np.bincount(b["source_ids"], minlength=3).tolist() for b in take(pipeline, 11)]
    assert per_step == [[16, 0, 0]] * 5 + [[0, 16, 0]] * 3 + [[8, 0, 8]] * 3
    assert pipeline.target_shares(0, 10) == pytest.approx({"books": 0.6, "posts": 0.3, "news": 0.1})
    late = build_pipeline(cfg, start_step=6)  # a fresh pipeline placed in the schedule
    assert np.bincount(next(late)["source_ids"], minlength=3).tolist() == [0, 16, 0]


# ---------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------


def test_packing_segments_positions_and_documents(tmp_path):
    doc_lengths = [5, 70, 1, 9, 33, 2, 12, 40]
    root = make_dataset(tmp_path / "d", {"only": doc_lengths})
    pipeline = build_pipeline(config(root, {"only": 1.0}, batch_size=4))
    stream = []
    for batch in take(pipeline, 6):
        for tokens, segments, positions in zip(batch["tokens"], batch["segment_ids"], batch["positions"]):
            assert segments[0] == 1 and (np.diff(segments) >= 0).all() and (np.diff(segments) <= 1).all()
            for seg in np.unique(segments):
                where = np.flatnonzero(segments == seg)
                assert positions[where].tolist() == list(range(where.size))  # restart per piece
                piece = tokens[where]
                assert len(set(piece[piece != EOS].tolist())) <= 1  # one document per segment
                assert (piece[:-1] != EOS).all()  # EOS only ends a piece
            stream.append(tokens)
    # the rows concatenate to whole documents, each followed by EOS, every document once per epoch
    flat = np.concatenate(stream)
    docs = np.split(flat, np.flatnonzero(flat == EOS) + 1)[:-1]
    first_epoch = docs[: len(doc_lengths)]
    assert sorted((int(d[0]) - 2, d.size - 1) for d in first_epoch) == list(enumerate(doc_lengths))
    assert [int(d[0]) for d in first_epoch] != sorted(int(d[0]) for d in first_epoch)  # shuffled
    second = docs[len(doc_lengths) : 2 * len(doc_lengths)]
    assert [int(d[0]) for d in second] != [int(d[0]) for d in first_epoch]  # reshuffled per epoch


def test_packed_rows_do_not_attend_across_documents(tmp_path):
    import jax

    from jaxlm import model
    from jaxlm.config import model_preset

    cfg = model_preset("tiny")
    root = make_dataset(tmp_path / "d", {"only": [7, 11, 4, 9, 20]})
    batch = next(build_pipeline(config(root, {"only": 1.0}, batch_size=1)))
    tokens, segments = batch["tokens"][0], batch["segment_ids"][0]
    assert segments.max() >= 3
    rows, spans = [tokens], []
    for seg in np.unique(segments):  # each piece alone, right-padded (segment 0)
        where = np.flatnonzero(segments == seg)
        alone = np.zeros_like(tokens)
        alone[: where.size] = tokens[where]
        rows.append(alone)
        spans.append(where)
    segment_ids = np.stack([segments] + [(np.arange(32) < s.size).astype(np.int32) for s in spans])
    positions = np.stack([batch["positions"][0]] + [np.where(np.arange(32) < s.size, np.arange(32), 0) for s in spans])
    params = model.init_params(cfg, 0)
    logits = jax.jit(lambda p, t, s, q: model.forward(cfg, p, t, positions=q, segment_ids=s).logits)(
        params, np.stack(rows), segment_ids.astype(np.int32), positions.astype(np.int32)
    )
    logits = np.asarray(logits)
    for k, where in enumerate(spans, 1):
        np.testing.assert_allclose(logits[0, where], logits[k, : where.size], atol=1e-5)


def test_tags_are_prepended_by_score_bucket(tmp_path):
    root = make_dataset(tmp_path / "d", {"a": [4, 6, 3, 5], "b": [5, 2]})
    data = records.open_source(root / "a")
    scores = {}
    for i in range(len(data)):
        tokens, meta = records.decode_record(data[i])
        scores[int(tokens[0])] = meta["toxicity"]
    assert min(scores.values()) < 0.5 <= max(scores.values())  # both buckets occur
    tag = TagTransform((0.5,), ((200,), (201, 202)), sources=frozenset({"a"}))
    pipeline = build_pipeline(config(root, {"a": 0.5, "b": 0.5}, batch_size=2), tag_transform=tag)
    streams = rows_by_source(take(pipeline, 10), pipeline.source_names)
    flat_a = np.concatenate(streams["a"])
    for doc in np.split(flat_a, np.flatnonzero(flat_a == EOS) + 1)[:-1]:
        head, body = doc[doc >= 200].tolist(), doc[(doc < 200) & (doc != EOS)]
        assert head == ([201, 202] if scores[int(body[0])] >= 0.5 else [200])
        assert doc[: len(head)].tolist() == head  # prepended
    assert (np.concatenate(streams["b"]) < 200).all()  # b is not tagged

    class Tok:  # encodes each character as its code point (a stand-in for the real tokenizer)
        def encode(self, text):
            return [ord(c) for c in text]

    meda = TagTransform.from_config(TagConfig(kind="meda"), Tok())
    assert meda.bucket(0.73) == 7 and meda.tag_ids[7] == tuple(ord(c) for c in "<|toxicity:0.7|>")
    inst = TagTransform.from_config(TagConfig(kind="inst"), Tok())
    assert "".join(map(chr, inst.tag_ids[1])).startswith("The following text is toxic")
    strict = TagTransform((0.5,), ((200,), (201,)))
    with pytest.raises(records.RecordError, match="no toxicity score"):
        strict.prefix({"doc_id": "x"}, "a")


def test_tags_repeat_every_n_tokens_of_a_long_document(tmp_path):
    prefix, ids = np.array([200, 201]), np.arange(10)

    def tagged(transform, ids):
        return np.concatenate(transform.pieces(ids, prefix)).tolist()

    once = TagTransform((0.5,), ((200, 201), (202,)))
    assert tagged(once, ids) == [200, 201, *range(10)]
    every4 = TagTransform((0.5,), ((200, 201), (202,)), every=4)
    assert tagged(every4, ids) == [200, 201, 0, 1, 2, 3, 200, 201, 4, 5, 6, 7, 200, 201, 8, 9]
    assert tagged(every4, ids[:3]) == [200, 201, 0, 1, 2]  # a short document: one tag
    assert tagged(every4, ids[:0]) == [200, 201]

    root = make_dataset(tmp_path / "d", {"a": [9, 7, 12, 5]})
    tag = TagTransform((2.0,), ((200,), (201,)), every=3)  # every score is below 2: one bucket
    pipeline = build_pipeline(config(root, {"a": 1.0}, batch_size=2), tag_transform=tag)
    flat = np.concatenate(rows_by_source(take(pipeline, 6), pipeline.source_names)["a"])
    for doc in np.split(flat, np.flatnonzero(flat == EOS) + 1)[1:-1]:  # whole documents only
        body = doc[:-1]
        assert body[::4].tolist() == [200] * len(body[::4]) and (body[np.arange(body.size) % 4 != 0] < 200).all()
    with pytest.raises(ConfigError, match="data.tags.every"):
        TagConfig(kind="meda", every=0)


# ---------------------------------------------------------------------------------------
# Multi-host sharding and device placement
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 4])
def test_process_shards_are_disjoint_and_cover_the_global_batch(three_sources, count):
    weights = {"books": 0.5, "posts": 0.3, "news": 0.2}
    global_batches = take(build_pipeline(config(three_sources, weights)), 4)
    parts = [
        take(build_pipeline(config(three_sources, weights), process_index=p, process_count=count), 4)
        for p in range(count)
    ]
    for step, batch in enumerate(global_batches):
        for key in batch:
            pieces = [parts[p][step][key] for p in range(count)]
            assert all(piece.shape[0] == 16 // count for piece in pieces)
            np.testing.assert_array_equal(np.concatenate(pieces), batch[key])  # covering, in order
    with pytest.raises(ConfigError, match="must divide evenly over 3 processes"):
        build_pipeline(config(three_sources, weights), process_index=0, process_count=3)


def test_to_global_array_places_rows_with_the_data_sharding(three_sources):
    import jax

    from jaxlm.config import MeshConfig
    from jaxlm.sharding import make_mesh

    pipeline = build_pipeline(config(three_sources, {"books": 0.5, "posts": 0.5, "news": 0.0}))
    batch = next(pipeline)
    mesh = make_mesh(MeshConfig(data=-1))
    placed = pipeline.to_global(batch, mesh)
    assert set(placed) == set(batch)
    for key, value in placed.items():
        assert isinstance(value, jax.Array) and value.shape == batch[key].shape
        np.testing.assert_array_equal(np.asarray(value), batch[key])
        assert len(value.sharding.device_set) == jax.device_count()
    assert placed["tokens"].addressable_shards[0].data.shape == (16 // jax.device_count(), 32)
    shapes = pipeline.peek_shapes()
    assert set(shapes) == {"tokens", "segment_ids", "positions"} and shapes["tokens"].shape == (16, 32)
    with pytest.raises(ValueError, match="rows"):
        to_global_array({"tokens": batch["tokens"][:3]}, mesh, global_batch_size=16)


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


def test_bad_weights_name_the_problem(three_sources):
    with pytest.raises(ConfigError, match="non-negative.*posts=-0.1"):
        config(three_sources, {"books": 1.1, "posts": -0.1})
    with pytest.raises(ConfigError, match=r"sum to 1, got 0.95 \(books=0.9, posts=0.05\)"):
        config(three_sources, {"books": 0.9, "posts": 0.05})
    with pytest.raises(ConfigError, match=r"schedule\[0\].weights: unknown source 'pool'"):
        config(three_sources, {"books": 1.0}, schedule=[{"step": 3, "weights": {"pool": 1.0}}])
    with pytest.raises(ConfigError, match=r"schedule\[1\].step"):
        config(
            three_sources,
            {"books": 1.0},
            schedule=[{"step": 3, "weights": {"books": 1.0}}, {"step": 3, "weights": {"books": 1.0}}],
        )
    with pytest.raises(ConfigError, match="unknown source 'pool'.*prepared sources in .*: books, posts, news"):
        build_pipeline(config(three_sources, {"books": 0.5, "pool": 0.5}))


def test_empty_source_and_broken_manifest(tmp_path):
    root = make_dataset(tmp_path / "d", {"a": [3, 4], "empty": []})
    with pytest.raises(ConfigError, match="source 'empty' is empty"):
        build_pipeline(config(root, {"a": 0.5, "empty": 0.5}))
    data = json.loads((root / "manifest.json").read_text())
    data["sources"]["a"]["num_documents"] = 5
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(records.ManifestError, match="lists 5 documents but the shards .* hold 2"):
        build_pipeline(config(root, {"a": 1.0}))
    del data["sources"]["a"]["token_dtype"]
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(records.ManifestError, match="missing field 'token_dtype'"):
        build_pipeline(config(root, {"a": 1.0}))


def test_state_from_another_packing_is_refused(three_sources):
    pipeline = build_pipeline(config(three_sources, {"books": 1.0}))
    next(pipeline)
    state = pipeline.get_state()
    with pytest.raises(ConfigError, match="seq_len=32, the config says 64"):
        build_pipeline(config(three_sources, {"books": 1.0}, seq_len=64), state=state)
    with pytest.raises(ConfigError, match="seed=3, the config says 9"):
        build_pipeline(config(three_sources, {"books": 1.0}, seed=9), state=state)


def test_weights_are_exact_fractions(three_sources):
    pipeline = build_pipeline(config(three_sources, {"books": 0.9, "posts": 0.1}, batch_size=10))
    take(pipeline, 3)
    assert pipeline.get_state()["phase"]["weights"] == {"books": "9/10", "posts": "1/10"}
    assert math.isclose(sum(pipeline.weights_at(0).values()), 1.0)


def test_weight_errors_surface_through_the_train_config():
    from jaxlm.loop import TrainConfig

    with pytest.raises(ConfigError, match=r"data.sources: weights must sum to 1, got 0.5 \(a=0.5\)"):
        from_dict(TrainConfig, {"data": {"dataset": "prepared", "sources": {"a": 0.5}}})
