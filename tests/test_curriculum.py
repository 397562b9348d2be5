"""Curricula in the data pipeline (documents in score order, bucket by bucket), resume
mid-curriculum, configs without curricula unchanged, and the token-budget arithmetic."""

import hashlib
import logging

import numpy as np
import pytest

from jaxlm.config import ConfigError, from_dict, to_dict
from jaxlm.data import DataError, records
from jaxlm.data.pipeline import (
    CurriculumConfig,
    PipelineConfig,
    build_pipeline,
    coverage_warnings,
    curriculum_buckets,
    planned_source_tokens,
    source_stream,
)

EOS, PAD, VOCAB = 0, 1, 256
FIRST_ID = {"ranked": 2, "plain": 100}  # every token of document j of a source is FIRST_ID + j
COUNTS = {"ranked": 40, "plain": 30}
SCORE = "quality.wiki"


def make_dataset(root, *, unscored=()):
    """``ranked`` (40 documents with a ``quality.wiki`` score, except those in ``unscored``)
    and ``plain`` (30, toxicity only); documents of 2-9 tokens that identify themselves."""
    rng = np.random.default_rng(7)
    infos = {}
    for name in ("ranked", "plain"):
        docs = []
        for j in range(COUNTS[name]):
            meta = {"doc_id": f"{name}-{j}", "source": name, "toxicity": float(rng.random())}
            if name == "ranked":
                score = float(rng.random())
                if j not in unscored:
                    meta[SCORE] = score
            docs.append((np.full(int(rng.integers(2, 10)), FIRST_ID[name] + j), meta))
        stats = records.write_source(root / name, docs, num_shards=2)
        infos[name] = records.SourceInfo(
            name, root / name, stats["num_documents"], stats["num_tokens"], "uint16", VOCAB, EOS, PAD
        )
    records.write_manifest(root, infos)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("curriculum") / "data")


def scores_of(dataset, name="ranked"):
    """``quality.wiki`` of each document by index (NaN where absent)."""
    return np.array([meta.get(SCORE, np.nan) for _, meta in records.iter_documents(dataset / name)])


def doc_ids(dataset, name="ranked"):
    """Document index by stored position (the shards interleave documents round-robin)."""
    return [int(meta["doc_id"].split("-")[1]) for _, meta in records.iter_documents(dataset / name)]


def config(dataset, **changes):
    data = {"dataset": str(dataset), "sources": {"ranked": 0.5, "plain": 0.5}, "seq_len": 16, "batch_size": 8, "seed": 5}
    data.update(changes)
    return from_dict(PipelineConfig, data)


def streamed_documents(dataset, curriculum, n_docs, *, seed=5, name="ranked"):
    """The first ``n_docs`` documents (their ``j``) of a source's packed stream."""
    info = records.read_manifest(dataset).sources[name]
    buckets = curriculum_buckets(scores_of(dataset, name), curriculum)
    rows = iter(source_stream(info, seq_len=16, seed=seed, buckets=buckets))
    tokens, docs = [], []
    while len(docs) < n_docs:
        tokens += next(rows)["tokens"].tolist()
        text = " ".join(map(str, tokens)).split(f" {EOS} ")
        docs = [int(piece.split()[0]) - FIRST_ID[name] for piece in text[:-1] if piece.strip()]
    return docs[:n_docs]


# ---------------------------------------------------------------------------------------
# Order
# ---------------------------------------------------------------------------------------


def expected_bucket_sets(dataset, curriculum):
    """The documents (``j``) of each bucket, in visiting order."""
    ids = doc_ids(dataset)
    return [{ids[i] for i in bucket} for bucket in curriculum_buckets(scores_of(dataset), curriculum)]


@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_stream_visits_buckets_in_score_order_shuffled_within(dataset, order):
    curriculum = CurriculumConfig(score=SCORE, order=order, buckets=10)
    buckets = expected_bucket_sets(dataset, curriculum)
    assert [len(b) for b in buckets] == [4] * 10
    by_j = dict(zip(doc_ids(dataset), scores_of(dataset)))
    lows = [min(by_j[j] for j in b) for b in buckets]
    assert lows == sorted(lows, reverse=order == "descending")  # the buckets follow the score

    docs = streamed_documents(dataset, curriculum, 2 * 40)
    epochs = [docs[:40], docs[40:]]
    for epoch in epochs:
        assert [set(epoch[4 * b : 4 * b + 4]) for b in range(10)] == buckets
    sorted_within = [epochs[0][4 * b : 4 * b + 4] == sorted(epochs[0][4 * b : 4 * b + 4], key=by_j.get,
                                                           reverse=order == "descending") for b in range(10)]
    assert not all(sorted_within)  # shuffled within the buckets
    assert epochs[0] != epochs[1]  # the next epoch: the same curriculum, a new within-bucket order
    assert streamed_documents(dataset, curriculum, 40) == epochs[0]  # deterministic given the seed
    other_seed = streamed_documents(dataset, curriculum, 40, seed=6)
    assert other_seed != epochs[0] and [set(other_seed[4 * b : 4 * b + 4]) for b in range(10)] == buckets


def test_buckets_are_equal_count_and_missing_scores_go_first_or_last():
    scores = np.array([0.5, np.nan, 0.1, 0.9, 0.3, np.nan, 0.7])
    ascending = curriculum_buckets(scores, CurriculumConfig(score="s", buckets=2, missing="last"))
    assert [b.tolist() for b in ascending] == [[2, 4, 0], [6, 3], [1, 5]]
    descending = curriculum_buckets(scores, CurriculumConfig(score="s", order="descending", buckets=3, missing="first"))
    assert [b.tolist() for b in descending] == [[1, 5], [3, 6], [0, 4], [2]]
    more_buckets_than_documents = curriculum_buckets(np.array([0.2, 0.1]), CurriculumConfig(score="s", buckets=5))
    assert [b.tolist() for b in more_buckets_than_documents] == [[1], [0]]


def test_missing_scores(tmp_path):
    data = make_dataset(tmp_path / "data", unscored={3, 17})
    with pytest.raises(DataError, match=r"source 'ranked', document 'ranked-3': no 'quality.wiki'.*missing: last"):
        build_pipeline(config(data, curricula={"ranked": {"score": SCORE}}))
    with pytest.raises(DataError, match=r"source 'plain', document 'plain-0': no 'quality.wiki'"):
        build_pipeline(config(data, curricula={"plain": {"score": SCORE}}))
    for missing, position in (("last", slice(38, 40)), ("first", slice(0, 2))):
        curriculum = CurriculumConfig(score=SCORE, buckets=9, missing=missing)
        docs = streamed_documents(data, curriculum, 40)
        assert set(docs[position]) == {3, 17} and sorted(docs) == list(range(40))


def test_non_numeric_score_and_bad_configs(tmp_path, dataset):
    with pytest.raises(DataError, match=r"document 'ranked-\d+': metadata 'doc_id' is 'ranked-\d+'.*finite number"):
        build_pipeline(config(dataset, curricula={"ranked": {"score": "doc_id"}}))
    with pytest.raises(ConfigError, match=r"data\.curricula\.news: unknown source 'news'; data.sources lists: ranked"):
        config(dataset, curricula={"news": {"score": SCORE}})
    with pytest.raises(ConfigError, match=r"data\.curricula\.ranked\.buckets: expected a positive integer, got 0"):
        config(dataset, curricula={"ranked": {"score": SCORE, "buckets": 0}})
    with pytest.raises(ConfigError, match=r"curricula\.ranked\.missing: expected one of 'error', 'last', 'first'"):
        config(dataset, curricula={"ranked": {"score": SCORE, "missing": "drop"}})


# ---------------------------------------------------------------------------------------
# The pipeline: resume, unchanged without curricula
# ---------------------------------------------------------------------------------------


def take(pipeline, n):
    return [next(pipeline) for _ in range(n)]


def same_batches(a, b):
    return len(a) == len(b) and all(all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_resume_mid_curriculum_gives_the_uninterrupted_batches(dataset):
    # ~290 tokens per epoch of "ranked", 64 of them per batch: 12 batches cross two epochs
    cfg = config(dataset, curricula={"ranked": {"score": SCORE, "order": "descending", "buckets": 5}},
                 schedule=[{"step": 8, "weights": {"ranked": 0.75, "plain": 0.25}}])
    full = build_pipeline(cfg)
    expected = take(full, 12)
    full.close()
    first = build_pipeline(cfg)
    take(first, 7)
    state = first.get_state()
    first.close()
    resumed = build_pipeline(cfg, state=state)
    assert same_batches(take(resumed, 5), expected[7:])
    resumed.close()
    plain = build_pipeline(config(dataset, schedule=[{"step": 8, "weights": {"ranked": 0.75, "plain": 0.25}}]))
    uniform = take(plain, 12)
    plain.close()
    ranked_rows = [b["tokens"][b["source_ids"] == 0] for b in expected]
    assert not all(np.array_equal(a, b["tokens"][b["source_ids"] == 0]) for a, b in zip(ranked_rows, uniform))


NO_CURRICULUM_DIGEST = "a67422aa72a4ac3be50d842e667bce6f47a095c4562a01884409b2a992c1ecff"  # before curricula existed


def test_without_curricula_batches_and_recorded_config_are_unchanged(dataset):
    cfg = config(dataset, schedule=[{"step": 6, "weights": {"ranked": 0.25, "plain": 0.75}}])
    assert cfg == config(dataset, schedule=[{"step": 6, "weights": {"ranked": 0.25, "plain": 0.75}}], curricula={})
    assert list(to_dict(cfg)) == ["dataset", "sources", "seq_len", "batch_size", "seed", "schedule", "tags",
                                  "read_threads", "prefetch"]
    with_curriculum = config(dataset, curricula={"ranked": {"score": SCORE}})
    assert to_dict(with_curriculum)["curricula"] == {
        "ranked": {"score": SCORE, "order": "ascending", "buckets": 10, "missing": "error"}
    }
    assert from_dict(PipelineConfig, to_dict(with_curriculum)) == with_curriculum
    pipeline = build_pipeline(cfg)
    digest = hashlib.sha256()
    for batch in take(pipeline, 12):
        for key in sorted(batch):
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(batch[key]).tobytes())
    pipeline.close()
    assert digest.hexdigest() == NO_CURRICULUM_DIGEST


# ---------------------------------------------------------------------------------------
# Token budget
# ---------------------------------------------------------------------------------------


def test_planned_source_tokens_arithmetic(dataset):
    cfg = config(dataset, sources={"ranked": 0.25, "plain": 0.75}, batch_size=16, seq_len=32)
    assert planned_source_tokens(cfg, 10) == {"ranked": 40 * 32, "plain": 120 * 32}
    assert planned_source_tokens(cfg, 0) == {"ranked": 0, "plain": 0}
    scheduled = config(dataset, sources={"ranked": 0.25, "plain": 0.75}, batch_size=16, seq_len=32,
                       schedule=[{"step": 4, "weights": {"ranked": 1.0}}, {"step": 20, "weights": {"plain": 1.0}}])
    assert planned_source_tokens(scheduled, 10) == {"ranked": (16 + 96) * 32, "plain": 48 * 32}
    assert planned_source_tokens(scheduled, 22) == {"ranked": (16 + 256) * 32, "plain": (48 + 32) * 32}
    pipeline = build_pipeline(scheduled)
    take(pipeline, 22)
    assert {k: v * 32 for k, v in pipeline.realised_rows().items()} == planned_source_tokens(scheduled, 22)
    pipeline.close()

    thirds = config(dataset, sources={"ranked": 1 / 3, "plain": 2 / 3}, batch_size=8, seq_len=16,
                    schedule=[{"step": 5, "weights": {"ranked": 0.6, "plain": 0.4}}])
    planned = planned_source_tokens(thirds, 11)
    assert planned == {"ranked": (13 + 29) * 16, "plain": (27 + 19) * 16}  # 40 rows at 1/3, then 48 at 0.6
    pipeline = build_pipeline(thirds)
    take(pipeline, 11)
    for name, rows in pipeline.realised_rows().items():
        assert abs(rows * 16 - planned[name]) <= 2 * 16  # within one row per phase
    pipeline.close()


def test_coverage_warning_names_repeated_sources(dataset, caplog):
    cfg = config(dataset, sources={"ranked": 0.25, "plain": 0.75})
    infos = records.read_manifest(dataset).sources
    ranked, plain = infos["ranked"], infos["plain"]
    epoch = {name: info.num_tokens + info.num_documents for name, info in infos.items()}
    steps = 2 * epoch["plain"] // (8 * 16 * 3 // 4) + 1  # "plain" a little over two epochs
    needed = planned_source_tokens(cfg, steps)
    assert needed["ranked"] <= epoch["ranked"] and needed["plain"] > 2 * epoch["plain"]
    lines = coverage_warnings(cfg, [ranked, plain], steps)
    assert len(lines) == 1 and "source 'plain' will be repeated" in lines[0]
    line = lines[0]
    assert f"draw {needed['plain']:,}" in line and f"holds {epoch['plain']:,}" in line
    assert f"{needed['plain'] / epoch['plain']:.2f} epochs" in line
    assert coverage_warnings(cfg, [ranked, plain], 1) == []

    with caplog.at_level(logging.WARNING, logger="jaxlm.data.pipeline"):
        build_pipeline(cfg, num_steps=steps).close()
    assert [r.getMessage() for r in caplog.records if r.name == "jaxlm.data.pipeline"] == lines
