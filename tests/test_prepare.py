"""`jaxlm data prepare` / `jaxlm data inspect` on crafted corpora, and once on a real subset."""

import csv
import gzip
import io
import json
import re
from pathlib import Path

import pytest
import yaml

from jaxlm.cli import main
from jaxlm.config import ConfigError, from_dict, load
from jaxlm.data import DataError, records
from jaxlm.data.pipeline import PipelineConfig, build_pipeline
from jaxlm.data.inputs import held_out_flags
from jaxlm.data.prepare import prepare, sample_texts
from jaxlm.data.recipe import Recipe, load_recipe
from jaxlm.data.sources import Document, read_4chan_csv, read_gutenberg, read_jsonl
from jaxlm.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]

BOOK_ONE = (
    "The Project Gutenberg EBook of A Quiet River\n\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK A QUIET RIVER ***\n\n"
    "Chapter I\n\nThe river ran past old stone houses while the children read under the trees.\n"
    + "They walked along the water every morning and counted the boats. " * 60
    + "\n\n*** END OF THIS PROJECT GUTENBERG EBOOK A QUIET RIVER ***\nLicence text.\n"
)
BOOK_TWO = "Chapter 1\n\nA small bridge of grey stone crossed the brook near the mill.\n" + (
    "The miller's daughter sang while the wheel turned slowly in the autumn light. " * 80
)
POSTS = [  # (no, comment html, thread, subject)
    (100, "Good morning, anyone here reading history books?", 100, "History thread"),
    (101, '<a href="#p100" class="quotelink">&gt;&gt;100</a><br>Yes, the old ones &amp; the new.', 100, ""),
    (102, "", 100, ""),  # image-only post: dropped as empty
    (103, '<span class="quote">&gt;implying</span><br>you are a stupid fucking idiot, shut up', 100, ""),
    (104, "I really like long walks by the river in autumn.", 104, ""),
    (101, "a repeated post number", 100, ""),  # duplicate id: dropped
    (105, "fuck off you worthless piece of shit", 104, ""),
]
NOTES = [{"id": f"n{i}", "body": f"note number {i}: the garden needs water and the fence needs paint."} for i in range(8)]
NOTES[3]["body"] = "   "  # empty document: dropped


def pol_csv(posts) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["", "name", "comment", "time", "country", "thread", "subject", "threadtime"])
    for i, (no, comment, thread, subject) in enumerate(posts):
        writer.writerow([no, "Anonymous", comment, f"2026-02-07 10:00:{i:02d}", "GB", thread, subject, "2026-02-07 09:00:00"])
    return gzip.compress(buffer.getvalue().encode())


@pytest.fixture
def corpus(tmp_path):
    """A data directory: two books (one plain, one gzip), a day of /pol/ posts, a JSONL of notes."""
    root = tmp_path / "data"
    (root / "books" / "Author A").mkdir(parents=True)
    (root / "books" / "Author B").mkdir(parents=True)
    (root / "books" / "Author A" / "A Quiet River.txt").write_text(BOOK_ONE)
    (root / "books" / "Author B" / "The Mill.txt.gz").write_bytes(gzip.compress(BOOK_TWO.encode()))
    (root / "pol").mkdir()
    (root / "pol" / "pol_2026-02-07.csv.gz").write_bytes(pol_csv(POSTS))
    (root / "notes.jsonl").write_text("".join(json.dumps(n) + "\n" for n in NOTES))
    return root


def recipe_data(**changes):
    data = {
        "sources": {
            "books": {"reader": "gutenberg", "paths": "books"},
            "pol": {"reader": "4chan_csv", "paths": ["pol"]},
            "notes": {"reader": "jsonl", "paths": ["notes.jsonl"], "args": {"text_field": "body", "id_field": "id"}},
        },
        "tokenizer": {"vocab_size": 300, "sample_chars": 20000},
    }
    data.update(changes)
    return data


def make_recipe(**changes) -> Recipe:
    return from_dict(Recipe, recipe_data(**changes))


def run(recipe, out, corpus, **kwargs):
    return prepare(recipe, out, data_dir=corpus, workers=kwargs.pop("workers", 0), progress=False, **kwargs)


def shard_files(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*.array_record"))}


def all_records(directory: Path) -> list[bytes]:
    source = records.open_source(directory)
    return [source[i] for i in range(len(source))]


# ---------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------


def test_prepare_writes_counted_decodable_scored_shards(corpus, tmp_path):
    out = tmp_path / "prepared"
    result = run(make_recipe(), out, corpus)
    assert not result.up_to_date and result.built == ("books", "pol", "notes") and result.tokenizer_trained
    manifest = records.read_manifest(out)
    data = manifest.data
    assert list(manifest.sources) == ["books", "pol", "notes"]
    assert manifest.tokenizer == (out / "tokenizer.json").resolve()
    tokenizer = Tokenizer.load(out / "tokenizer.json")
    assert data["tokenizer_sha256"] == tokenizer.fingerprint()

    # Counts and drops with their reasons, per source (from the readers' ReadStats).
    assert manifest.sources["books"].num_documents == 2
    assert manifest.sources["pol"].num_documents == 5
    assert data["sources"]["pol"]["dropped"] == {"duplicate_id": 1, "empty": 1}
    assert manifest.sources["notes"].num_documents == 7
    assert data["sources"]["notes"]["dropped"] == {"empty": 1}
    assert data["dropped"] == {"duplicate_id": 1, "empty": 2}
    assert [i["path"] for i in data["sources"]["books"]["inputs"]] == [
        "books/Author A/A Quiet River.txt", "books/Author B/The Mill.txt.gz"
    ]

    # Stored tokens decode back to the cleaned text exactly; no end-of-document id is stored
    # (the pipeline appends one per document).
    expected = {
        "books": {d.doc_id: d.text for d in read_gutenberg(corpus / "books", "books")},
        "pol": {d.doc_id: d.text for d in read_4chan_csv(corpus / "pol", "pol")},
        "notes": {d.doc_id: d.text for d in read_jsonl(corpus / "notes.jsonl", "body", "notes", "id")},
    }
    for name, texts in expected.items():
        info = manifest.sources[name]
        docs = list(records.iter_documents(info.directory))
        assert {m["doc_id"]: tokenizer.decode(ids) for ids, m in docs} == texts
        assert info.num_tokens == sum(ids.size for ids, _ in docs)
        assert all(tokenizer.eos_id not in ids for ids, _ in docs)
        assert all(m["source"] == name and 0.0 <= m["toxicity"] <= m["toxicity_max"] <= 1.0 for _, m in docs)
    stream = records.iter_prepared_tokens(manifest.sources["notes"].directory, 10**6)
    assert (stream == tokenizer.eos_id).sum() == 7

    # Reader metadata is kept; toxicity separates the insults from the books.
    pol = {m["doc_id"]: m for _, m in records.iter_documents(manifest.sources["pol"].directory)}
    assert pol["103"]["thread"] == 100 and pol["103"]["country"] == "GB"
    books = [m for _, m in records.iter_documents(manifest.sources["books"].directory)]
    assert {m["author"] for m in books} == {"Author A", "Author B"}
    assert min(pol["103"]["toxicity"], pol["105"]["toxicity"]) > 0.5 > max(m["toxicity"] for m in books)
    # A long book is scored in chunks: the mean is at most the worst chunk.
    assert all(m["toxicity"] <= m["toxicity_max"] for m in books)


def test_workers_and_repeat_runs_give_identical_bytes(corpus, tmp_path):
    recipe = make_recipe()
    a = run(recipe, tmp_path / "a", corpus, workers=0)
    b = run(recipe, tmp_path / "b", corpus, workers=2, task_chars=500)  # many chunks over 2 processes
    assert a.manifest["tokenizer_sha256"] == b.manifest["tokenizer_sha256"]
    assert a.manifest["fingerprint"] == b.manifest["fingerprint"]
    for name in ("books", "pol", "notes"):
        assert all_records(tmp_path / "a" / name) == all_records(tmp_path / "b" / name)


def test_rerun_is_up_to_date_and_rewrites_nothing(corpus, tmp_path, capsys):
    out = tmp_path / "prepared"
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe_data()))
    run(load_recipe(recipe_path), out, corpus)
    before = shard_files(out)
    manifest_mtime = (out / "manifest.json").stat().st_mtime_ns
    tokenizer_mtime = (out / "tokenizer.json").stat().st_mtime_ns
    assert main(["data", "prepare", str(recipe_path), "--out", str(out), "--data-dir", str(corpus), "--no-progress"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert shard_files(out) == before and before
    assert (out / "manifest.json").stat().st_mtime_ns == manifest_mtime
    assert (out / "tokenizer.json").stat().st_mtime_ns == tokenizer_mtime


def test_changed_input_rebuilds_only_its_source_with_a_given_tokenizer(corpus, tmp_path):
    first = run(make_recipe(), tmp_path / "first", corpus)
    tokenizer_path = tmp_path / "tok.json"
    tokenizer_path.write_bytes((first.out_dir / "tokenizer.json").read_bytes())
    recipe = make_recipe(tokenizer={"path": str(tokenizer_path)})
    out = tmp_path / "prepared"
    run(recipe, out, corpus)
    before = shard_files(out)
    (corpus / "pol" / "pol_2026-02-07.csv.gz").write_bytes(pol_csv(POSTS + [(106, "one more post about boats", 104, "")]))
    result = run(recipe, out, corpus)
    assert result.built == ("pol",) and set(result.reused) == {"books", "notes"} and not result.tokenizer_trained
    after = shard_files(out)
    assert {k: v for k, v in after.items() if not k.startswith("pol")} == {
        k: v for k, v in before.items() if not k.startswith("pol")
    }
    assert records.read_manifest(out).sources["pol"].num_documents == 6
    assert not (out / ".manifest.previous.json").exists()


def test_changed_input_retrains_a_sampled_tokenizer(corpus, tmp_path):
    out = tmp_path / "prepared"
    run(make_recipe(), out, corpus)
    (corpus / "notes.jsonl").write_text("".join(json.dumps({**n, "body": n["body"] + " More."}) + "\n" for n in NOTES))
    result = run(make_recipe(), out, corpus)
    assert result.tokenizer_trained and "notes" in result.built


def test_interrupted_run_leaves_the_previous_dataset_intact(corpus, tmp_path, monkeypatch):
    from jaxlm.data import encode

    out = tmp_path / "prepared"
    recipe = make_recipe()
    run(recipe, out, corpus)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # New ids, same texts: the notes are rebuilt; the retrained tokenizer is the same, so the
    # other sources stay valid.
    (corpus / "notes.jsonl").write_text("".join(json.dumps({**n, "id": n["id"] + "x"}) + "\n" for n in NOTES))

    calls = {"n": 0}
    original = encode.DocumentEncoder.__call__

    def failing(self, items, work):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-way through the notes
        return original(self, items, work)

    monkeypatch.setattr(encode.DocumentEncoder, "__call__", failing)
    with pytest.raises(KeyboardInterrupt):
        run(recipe, out, corpus, task_chars=100)
    # Nothing was committed: the previous dataset (manifest, tokenizer, every shard) is byte for
    # byte what it was, and no staged shard or tokenizer is left behind.
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == {p: b for p, b in before.items() if p.name != ".lock"}
    assert not list(out.rglob(".staging")) and not (out / ".tokenizer.json.staged").exists()
    build_pipeline(from_dict(PipelineConfig, {"dataset": str(out), "sources": {"notes": 1.0}, "prefetch": 0})).close()

    monkeypatch.setattr(encode.DocumentEncoder, "__call__", original)
    books = shard_files(out / "books")
    result = run(recipe, out, corpus)
    assert result.built == ("notes",) and result.reused == ("books", "pol")
    assert shard_files(out / "books") == books
    notes = records.iter_documents(records.read_manifest(out).sources["notes"].directory)
    assert sorted(m["doc_id"] for _, m in notes) == sorted(n["id"] + "x" for n in NOTES if n["body"].strip())


def test_sources_roll_over_to_new_shards_by_record_count(corpus, tmp_path):
    data = recipe_data()
    data["sources"]["notes"]["records_per_shard"] = 2
    out = tmp_path / "prepared"
    result = run(from_dict(Recipe, data), out, corpus)
    names = sorted(p.name for p in (out / "notes").iterdir())
    assert names == [f"shard-{i:05d}-of-00004.array_record" for i in range(4)]  # 7 documents, 2 per shard
    assert result.manifest["sources"]["notes"]["shards"] == 4 and result.manifest["sources"]["books"]["shards"] == 1
    assert len(records.open_source(out / "notes")) == 7
    assert [m["doc_id"] for _, m in records.iter_documents(out / "notes")] == [n["id"] for n in NOTES if n["body"].strip()]


def test_tfds_source_is_prepared_and_fingerprinted(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from tensorflow_datasets.core import registered

    with registered.skip_registration():

        class JaxlmPrepTinyText(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                for i, text in enumerate(["a first document", "", "a third one", "and a fourth"]):
                    yield i, {"text": text}

    tfds_dir = tmp_path / "tfds"
    JaxlmPrepTinyText(data_dir=str(tfds_dir), file_format="array_record").download_and_prepare()
    recipe = from_dict(Recipe, {
        "sources": {"tiny": {"reader": "tfds", "args": {"name": "jaxlm_prep_tiny_text", "split": "train",
                                                         "data_dir": str(tfds_dir)}}},
        "tokenizer": {"vocab_size": 270}, "toxicity": {"enabled": False},
    })
    result = prepare(recipe, tmp_path / "out", workers=0, progress=False)
    entry = result.manifest["sources"]["tiny"]
    assert entry["num_documents"] == 3 and entry["dropped"] == {"empty": 1}
    assert any(i["path"].endswith(".array_record-00000-of-00001") for i in entry["inputs"])
    assert all(m["toxicity"] is None for _, m in records.iter_documents(tmp_path / "out" / "tiny"))
    assert prepare(recipe, tmp_path / "out", workers=0, progress=False).up_to_date


# ---------------------------------------------------------------------------------------
# Held-out split, sampling
# ---------------------------------------------------------------------------------------


def test_held_out_documents_go_to_a_valid_source(corpus, tmp_path):
    data = recipe_data()
    data["sources"]["notes"]["valid_fraction"] = 0.25
    out = tmp_path / "prepared"
    run(from_dict(Recipe, data), out, corpus)
    manifest = records.read_manifest(out)
    assert manifest.sources["notes"].num_documents + manifest.sources["notes@valid"].num_documents == 7
    assert manifest.sources["notes@valid"].num_documents == round(7 * 0.25)
    assert manifest.data["sources"]["notes@valid"]["held_out_from"] == "notes"
    train = {m["doc_id"] for _, m in records.iter_documents(out / "notes")}
    valid = {m["doc_id"] for _, m in records.iter_documents(out / "notes@valid")}
    assert not train & valid and len(train | valid) == 7


def test_held_out_flags_are_exact_and_keep_parts_together():
    docs = [Document("x", "s", str(i)) for i in range(40)]
    assert sum(held for _, held in held_out_flags(docs, 0.1)) == 4
    assert sum(held for _, held in held_out_flags(docs[:5], 0.1)) == 1
    parts = [Document("a", "s", f"{i}#{p}", {"part": p, "parts": 3}) for i in range(6) for p in range(3)]
    flags = [held for _, held in held_out_flags(parts, 0.5)]
    assert all(flags[3 * i] == flags[3 * i + 1] == flags[3 * i + 2] for i in range(6)) and sum(flags) == 9


def test_tokenizer_sample_is_seeded_and_sized():
    docs = [Document(f"w{i:04d} " * 400, "s", str(i)) for i in range(200)]  # 2400 chars each
    a = sample_texts(docs, 50_000, 0, "s")
    assert a == sample_texts(docs, 50_000, 0, "s") and a != sample_texts(docs, 50_000, 1, "s")
    assert 45_000 <= sum(map(len, a)) <= 60_000
    assert len({text.split()[0] for text in a}) > 15  # drawn from across the stream, not its start
    assert sum(map(len, sample_texts(docs[:3], 50_000, 0, "s"))) == 3 * 2400  # a small source is taken whole


# ---------------------------------------------------------------------------------------
# Inspect
# ---------------------------------------------------------------------------------------


def test_inspect_reports_realised_shares_within_a_point(corpus, tmp_path, capsys):
    out = tmp_path / "prepared"
    run(make_recipe(), out, corpus)
    pipeline_config = tmp_path / "data.yaml"
    pipeline_config.write_text(yaml.safe_dump({"dataset": str(out), "sources": {"books": 0.7, "pol": 0.2, "notes": 0.1},
                                               "seq_len": 32, "batch_size": 8}))
    assert main(["data", "inspect", str(pipeline_config), "--json", "--batches", "100"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["target"] == pytest.approx({"books": 0.7, "pol": 0.2, "notes": 0.1})
    assert all(abs(report["realised"][k] - v) <= 0.01 for k, v in report["target"].items())
    assert report["manifest"]["sources"]["pol"]["dropped"] == {"duplicate_id": 1, "empty": 1}
    assert {s["source"] for s in report["samples"]} == {"books", "pol", "notes"}

    # A training config's data: section works too, with overrides; the text report names the sources.
    train_config = tmp_path / "train.yaml"
    train_config.write_text(yaml.safe_dump({"model": "tiny", "data": {"dataset": "nowhere", "sources": {"pol": 1.0}}}))
    assert main(["data", "inspect", str(train_config), f"data.dataset={out}", "data.seq_len=16", "--batches", "3"]) == 0
    text = capsys.readouterr().out
    assert "pol" in text and "100.00%" in text


# ---------------------------------------------------------------------------------------
# Bad input: one-line errors naming the file/field (exit 2), or counted drops
# ---------------------------------------------------------------------------------------


def prepare_cli(tmp_path, corpus, data, capsys) -> tuple[int, str]:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    code = main(["data", "prepare", str(path), "--out", str(tmp_path / "out"), "--data-dir", str(corpus),
                 "--workers", "0", "--no-progress"])
    return code, capsys.readouterr().err


def only(name, source, **changes):
    return recipe_data(sources={name: source}, **changes)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda c: only("pol", {"reader": "4chan_csv", "paths": ["pol/missing.csv.gz"]}),
         r"sources\.pol\.paths: .*pol/missing\.csv\.gz: no such file or directory"),
        (lambda c: (c / "pol" / "bad.csv.gz").write_bytes(pol_csv(POSTS)[:60])
         and only("pol", {"reader": "4chan_csv", "paths": ["pol/bad.csv.gz"]}),
         r"bad\.csv\.gz: corrupt or truncated gzip"),
        (lambda c: (c / "bad.jsonl").write_bytes(b'{"body": "fine"}\n{"body": "caf\xe9"}\n')
         and only("notes", {"reader": "jsonl", "paths": ["bad.jsonl"], "args": {"text_field": "body"}}),
         r"bad\.jsonl: invalid UTF-8 at line 2"),
        (lambda c: (c / "nocomment.csv").write_text(",name,time,thread\n1,a,t,1\n")
         and only("pol", {"reader": "4chan_csv", "paths": ["nocomment.csv"]}),
         r"nocomment\.csv:1: missing column\(s\) \['comment'\]"),
        (lambda c: only("notes", {"reader": "jsonl", "paths": ["notes.jsonl"], "args": {"text_field": "text"}}),
         r"notes\.jsonl:1: field 'text' missing \(available at top level: \['body', 'id'\]\)"),
        (lambda c: (c / "empty.csv").write_bytes(gzip.decompress(pol_csv([(1, "", 1, ""), (2, "<br>", 1, "")])))
         and only("pol", {"reader": "4chan_csv", "paths": ["empty.csv"]}),
         r"no documents for source 'pol' \(empty corpus; dropped \{'empty': 2\}\)"),
        (lambda c: only("pol", {"reader": "4chan_json", "paths": ["pol"]}),
         r"sources\.pol\.reader: expected one of 'gutenberg', .*got '4chan_json'"),
        (lambda c: only("notes", {"reader": "jsonl", "paths": ["notes.jsonl"], "args": {"text_fields": "body"}}),
         r"sources\.notes\.args: unknown argument 'text_fields' for reader 'jsonl'; valid arguments: text_field, id_field"),
        (lambda c: only("notes", {"reader": "jsonl", "paths": ["notes.jsonl"]}),
         r"sources\.notes\.args: reader 'jsonl' needs 'text_field'"),
        (lambda c: only("notes", {"reader": "jsonl", "paths": ["notes.jsonl"], "args": {"text_field": "body"},
                                  "valid_fraction": 0.05}),
         r"sources\.notes: no held-out documents \(7 documents read, valid_fraction 0\.05\)"),
    ],
    ids=["missing-path", "corrupt-gzip", "invalid-utf8", "missing-column", "missing-field", "empty-corpus",
         "unknown-reader", "unknown-argument", "missing-argument", "no-held-out"],
)
def test_bad_input_exits_2_with_one_line(make, expected, corpus, tmp_path, capsys):
    code, err = prepare_cli(tmp_path, corpus, make(corpus), capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("jaxlm data prepare: error: ") and "Traceback" not in err
    assert re.search(expected, err), err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_invalid_utf8_and_empty_documents_can_be_counted_drops(corpus, tmp_path):
    (corpus / "mixed.jsonl").write_bytes(b'{"body": "fine text"}\n{"body": "caf\xe9"}\n{"body": ""}\n{"body": "more"}\n')
    recipe = from_dict(Recipe, only("notes", {"reader": "jsonl", "paths": ["mixed.jsonl"], "args": {"text_field": "body"}},
                                    read={"invalid_utf8": "drop"}))
    result = run(recipe, tmp_path / "out", corpus)
    entry = result.manifest["sources"]["notes"]
    assert entry["num_documents"] == 2 and entry["dropped"] == {"empty": 1, "invalid_utf8": 1}


def test_giant_documents_are_split_or_dropped_and_counted(corpus, tmp_path):
    giant = " ".join(f"word{i}" for i in range(3000))  # ~26k characters
    (corpus / "giant.jsonl").write_text(json.dumps({"body": giant}) + "\n" + json.dumps({"body": "small one"}) + "\n")
    source = {"reader": "jsonl", "paths": ["giant.jsonl"], "args": {"text_field": "body"}}
    split = run(from_dict(Recipe, only("g", source, read={"max_chars": 5000})), tmp_path / "split", corpus)
    entry = split.manifest["sources"]["g"]
    assert entry["read"]["split"] == 1 and entry["num_documents"] > 2
    tokenizer = Tokenizer.load(tmp_path / "split" / "tokenizer.json")
    parts = sorted(
        ((m["part"], tokenizer.decode(ids)) for ids, m in records.iter_documents(tmp_path / "split" / "g") if "part" in m)
    )
    assert "".join(text for _, text in parts) == giant
    dropped = run(from_dict(Recipe, only("g", source, read={"max_chars": 5000, "too_long": "drop"})), tmp_path / "drop", corpus)
    assert dropped.manifest["sources"]["g"]["dropped"] == {"too_long": 1}
    assert dropped.manifest["sources"]["g"]["num_documents"] == 1


def test_unknown_pipeline_source_and_missing_dataset_exit_2(corpus, tmp_path, capsys):
    out = tmp_path / "prepared"
    run(make_recipe(), out, corpus)
    config = tmp_path / "data.yaml"
    config.write_text(yaml.safe_dump({"dataset": str(out), "sources": {"books": 0.9, "pool": 0.1}}))
    assert main(["data", "inspect", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown source 'pool'" in err and "books, pol, notes" in err
    assert main(["data", "inspect", str(config), f"dataset={tmp_path / 'nothing'}", "sources={books: 1.0}"]) == 2
    assert "no manifest" in capsys.readouterr().err


def test_missing_output_directory_is_a_config_error(corpus):
    with pytest.raises(ConfigError, match="no output directory"):
        prepare(make_recipe(), None, data_dir=corpus)
    with pytest.raises(DataError, match=r"data_dir: .*nowhere is not a directory"):
        prepare(make_recipe(), corpus / "unused", data_dir=corpus / "nowhere")


# ---------------------------------------------------------------------------------------
# The shipped configs, and the real corpora
# ---------------------------------------------------------------------------------------


def test_shipped_recipes_and_pipeline_config_load():
    full = load_recipe(REPO / "experiments/configs/recipe-gutenberg-pol.yaml")
    ci = load_recipe(REPO / "experiments/configs/recipe-gutenberg-pol-ci.yaml")
    assert set(full.sources) == set(ci.sources) == {"gutenberg", "pol"}
    assert full.tokenizer.vocab_size == 8192 and all(s.max_documents is None for s in full.sources.values())
    assert all(s.max_documents for s in ci.sources.values())
    pipeline = load(PipelineConfig, REPO / "experiments/configs/data-pol10.yaml")
    assert pipeline.sources == {"gutenberg": 0.9, "pol": 0.1} and pipeline.seq_len == 256


@pytest.mark.data
def test_real_subset_prepares_and_mixes_90_10(shared_dataset, tmp_path):
    from jaxlm.data.inspect import inspect_pipeline

    books = shared_dataset("clean/gutenberg")
    days = sorted(shared_dataset("toxic/pol").glob("*.csv.gz"))[:2]
    recipe = from_dict(
        Recipe,
        {
            "sources": {
                "gutenberg": {"reader": "gutenberg", "paths": str(books), "max_documents": 5},
                "pol": {"reader": "4chan_csv", "paths": [str(d) for d in days], "max_documents": 12000},
            },
            "tokenizer": {"vocab_size": 1024, "sample_chars": 300_000},
        },
    )
    result = prepare(recipe, tmp_path / "real", workers=0, progress=False)
    sources = result.manifest["sources"]
    assert sources["gutenberg"]["num_documents"] == 5 and sources["pol"]["num_documents"] == 12000
    assert sources["pol"]["dropped"].get("empty", 0) > 0  # image-only posts are counted, not kept
    assert len(sources["pol"]["inputs"]) == 2
    config = from_dict(PipelineConfig, {"dataset": str(tmp_path / "real"), "sources": {"gutenberg": 0.9, "pol": 0.1},
                                        "seq_len": 256, "batch_size": 32})
    report = inspect_pipeline(config, 100)
    assert abs(report["realised"]["pol"] - 0.1) <= 0.01 and abs(report["realised"]["gutenberg"] - 0.9) <= 0.01
    assert sources["pol"]["toxicity"]["mean"] > sources["gutenberg"]["toxicity"]["mean"]
