"""Damaged or mismatched prepared data, and mistakes around `jaxlm data`: one line, exit 2, nothing lost.

Each test starts from a copy of one dataset prepared once for the module (two JSONL
sources of the crafted corpora, a 300-token BPE, no toxicity scorer) and damages it the way
a user or a disk would.
"""

import errno
import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxlm.cli import main
from jaxlm.config import from_dict
from jaxlm.data import DataError, records, sources
from jaxlm.data.pipeline import PipelineConfig, build_pipeline
from jaxlm.data.prepare import prepare
from jaxlm.data.recipe import load_recipe
from jaxlm.errors import DirectoryLock

RECIPE = {
    "sources": {
        name: {"reader": "jsonl", "paths": [f"corpora/{name}.jsonl"], "args": {"text_field": "text", "id_field": "id"}}
        for name in ("clean", "toxic")
    },
    "tokenizer": {"vocab_size": 300, "sample_chars": 20000},
    "toxicity": {"enabled": False},
}


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return path


@pytest.fixture(scope="module")
def prepared_once(crafted_data_dir, recipe_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("once") / "prepared"
    prepare(load_recipe(recipe_path), out, data_dir=crafted_data_dir, workers=0, progress=False)
    return out


@pytest.fixture
def dataset(prepared_once, tmp_path):
    """A private copy of the prepared dataset."""
    out = tmp_path / "prepared"
    shutil.copytree(prepared_once, out)
    (out / ".lock").unlink(missing_ok=True)
    return out


def prepare_cli(recipe_path, out, data_dir, *extra):
    return main(["data", "prepare", str(recipe_path), "--out", str(out), "--data-dir", str(data_dir),
                 "--workers", "0", "--no-progress", *extra])


def pipeline_config(out, **changes):
    data = {"dataset": str(out), "sources": {"clean": 0.5, "toxic": 0.5}, "seq_len": 32, "batch_size": 8,
            "prefetch": 0}
    data.update(changes)
    return from_dict(PipelineConfig, data)


def inspect_cli(tmp_path, out, *extra):
    config = tmp_path / "data.yaml"
    config.write_text(yaml.safe_dump({"dataset": str(out), "sources": {"clean": 0.5, "toxic": 0.5},
                                      "seq_len": 32, "batch_size": 8}))
    return main(["data", "inspect", str(config), "--batches", "2", *extra])


def one_error_line(capsys, command) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"jaxlm {command}: error: ") and "Traceback" not in err, err
    return err


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` (but the lock file) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def first_shard(out: Path, source: str) -> Path:
    return records.shard_paths(out / source)[0]


def edit_manifest(out: Path, change) -> None:
    path = out / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def draw(pipeline, batches):
    try:
        for _ in range(batches):
            next(pipeline)
    finally:
        pipeline.close()


# ---------------------------------------------------------------------------------------
# Case 4: shard sizes and checksums in the manifest
# ---------------------------------------------------------------------------------------


def test_manifest_records_every_shard_and_the_tokenizer(dataset, tiny_prepared):
    for root in (dataset, tiny_prepared):  # written by prepare, and by write_source/write_manifest
        manifest = records.read_manifest(root)
        assert manifest.data["tokenizer_sha256"] == records.tokenizer_fingerprint(root / "tokenizer.json")
        for info in manifest.sources.values():
            paths = records.shard_paths(info.directory)
            assert [f.name for f in info.files] == [p.name for p in paths]
            for path, file in zip(paths, info.files):
                assert (file.bytes, file.sha256) == (path.stat().st_size, records.file_sha256(path))
            ids = [records.decode_tokens(r) for r in (records.open_source(info.directory)[i] for i in range(info.num_documents))]
            assert info.max_token_id == max(int(x.max()) for x in ids if x.size)
            assert sum(f.tokens for f in info.files) == info.num_tokens == sum(x.size for x in ids)


def test_truncated_shard_is_rebuilt_not_up_to_date(dataset, recipe_path, crafted_data_dir, capsys, caplog):
    shard = first_shard(dataset, "toxic")
    shard.write_bytes(shard.read_bytes()[:1000])
    clean = snapshot(dataset / "clean")
    caplog.set_level("INFO", logger="jaxlm.data.prepare")
    assert prepare_cli(recipe_path, dataset, crafted_data_dir) == 0
    assert "built toxic; reused clean" in capsys.readouterr().out
    assert f"{shard}: 1000 bytes, the manifest records" in caplog.text  # which source, and why
    assert snapshot(dataset / "clean") == clean
    records.verify_dataset(records.read_manifest(dataset), checksums=True)
    draw(build_pipeline(pipeline_config(dataset)), 3)


def test_truncated_shard_fails_to_open_naming_the_shard(dataset, tmp_path, capsys):
    shard = first_shard(dataset, "clean")
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(DataError, match=f"{shard}: 1000 bytes, the manifest records \\d+"):
        build_pipeline(pipeline_config(dataset))
    with pytest.raises(DataError, match=str(shard)):  # an eval set read from a prepared source
        records.iter_prepared_tokens(dataset / "clean", 100)
    assert inspect_cli(tmp_path, dataset) == 2
    assert str(shard) in one_error_line(capsys, "data inspect")


def test_manifest_without_checksums_still_opens_and_is_rebuilt_on_prepare(dataset, recipe_path, crafted_data_dir, capsys):
    def strip(data):
        del data["tokenizer_sha256"]
        for entry in data["sources"].values():
            del entry["files"], entry["max_token_id"]

    edit_manifest(dataset, strip)
    draw(build_pipeline(pipeline_config(dataset)), 3)
    assert prepare_cli(recipe_path, dataset, crafted_data_dir) == 0
    assert "built clean, toxic; reused nothing" in capsys.readouterr().out
    assert all(info.files for info in records.read_manifest(dataset).sources.values())


def test_shard_of_an_old_manifest_unreadable_at_open_names_the_shard(dataset):
    edit_manifest(dataset, lambda data: [entry.pop("files") for entry in data["sources"].values()])
    shard = first_shard(dataset, "toxic")
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(DataError, match=f"{shard}: not a readable ArrayRecord shard"):
        build_pipeline(pipeline_config(dataset))


# ---------------------------------------------------------------------------------------
# Case 5: the dataset's tokenizer
# ---------------------------------------------------------------------------------------


def test_swapped_tokenizer_is_refused_and_replaced_on_prepare(dataset, tiny_prepared, tmp_path, recipe_path,
                                                               crafted_data_dir, capsys):
    tokenizer = dataset / "tokenizer.json"
    expected = json.loads((dataset / "manifest.json").read_text())["tokenizer_sha256"]
    shutil.copyfile(tiny_prepared / "tokenizer.json", tokenizer)  # another dataset's tokenizer
    found = records.tokenizer_fingerprint(tokenizer)
    with pytest.raises(DataError) as caught:
        build_pipeline(pipeline_config(dataset))
    message = str(caught.value)
    assert all(part in message for part in (str(tokenizer), str(dataset / "manifest.json"), found, expected))
    assert inspect_cli(tmp_path, dataset) == 2
    assert expected in one_error_line(capsys, "data inspect")

    assert prepare_cli(recipe_path, dataset, crafted_data_dir) == 0  # retrains (the file is not the recorded one)
    assert "tokenizer trained" in capsys.readouterr().out
    assert records.tokenizer_fingerprint(tokenizer) == expected  # same sample, same seed: the same tokenizer
    draw(build_pipeline(pipeline_config(dataset)), 2)


def test_missing_tokenizer_named_by_the_manifest_is_refused(dataset):
    (dataset / "tokenizer.json").unlink()
    with pytest.raises(DataError, match=f"{dataset / 'tokenizer.json'}: missing"):
        build_pipeline(pipeline_config(dataset))


# ---------------------------------------------------------------------------------------
# Case 13: garbled bytes, a full disk, two prepares, a lowered vocab_size, wrong counts
# ---------------------------------------------------------------------------------------


def garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for k in range(100, 400):  # the first chunk's header and data (same size: only a checksum notices)
        data[k] ^= 0x5A
    path.write_bytes(bytes(data))


def test_garbled_shard_bytes_are_named_at_read_and_by_inspect(dataset, tmp_path, capsys):
    shard = first_shard(dataset, "clean")
    garble(shard)
    source = records.open_source(dataset / "clean", records.read_manifest(dataset).sources["clean"])
    with pytest.raises(DataError, match=f"{shard}: record 0 \\(document 0 of clean\\) is unreadable"):
        source[0]
    with pytest.raises(DataError, match=f"{shard}: record \\d+ \\(document \\d+ of clean\\) is unreadable"):
        draw(build_pipeline(pipeline_config(dataset, sources={"clean": 1.0}, read_threads=2)), 200)
    assert inspect_cli(tmp_path, dataset) == 2
    assert f"{shard}: sha256 " in one_error_line(capsys, "data inspect")


def test_full_disk_during_prepare_cleans_up_and_keeps_the_previous_dataset(
    dataset, recipe_path, crafted_data_dir, monkeypatch, capsys
):
    before = snapshot(dataset)
    calls = {"n": 0}
    write = records.ShardWriter.write

    def full_disk(self, tokens, meta):
        calls["n"] += 1
        if calls["n"] > 50:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, tokens, meta)

    monkeypatch.setattr(records.ShardWriter, "write", full_disk)
    # A changed recipe (fewer clean documents, a new tokenizer sample): everything is rebuilt.
    assert prepare_cli(recipe_path, dataset, crafted_data_dir, "sources.clean.max_documents=150") == 2
    err = one_error_line(capsys, "data prepare")
    assert "no space left on device" in err and f"{dataset / 'clean' / '.staging'}" in err
    assert snapshot(dataset) == before  # manifest, tokenizer, shards: as they were
    assert not list(dataset.rglob(".staging")) and not list(dataset.rglob("*.tmp*"))
    assert not (dataset / ".tokenizer.json.staged").exists()
    draw(build_pipeline(pipeline_config(dataset)), 2)


def test_second_prepare_into_a_locked_directory_exits_2_naming_the_holder(
    dataset, recipe_path, crafted_data_dir, capsys
):
    before = snapshot(dataset)
    with DirectoryLock(dataset, "data prepare"):  # as if another prepare were running
        assert prepare_cli(recipe_path, dataset, crafted_data_dir, "sources.clean.max_documents=150") == 2
    err = one_error_line(capsys, "data prepare")
    assert f"in use by another data prepare (pid {os.getpid()})" in err
    assert snapshot(dataset) == before


def test_lowered_vocab_size_is_refused_before_training(dataset):
    def lower(data):
        data["sources"]["clean"]["vocab_size"] = 100

    edit_manifest(dataset, lower)
    with pytest.raises(DataError, match=r"sources\.clean\.vocab_size: 100, but the shards hold token id \d+"):
        build_pipeline(pipeline_config(dataset))

    def without_records(data):  # an older manifest: no max_token_id, no shard records
        data["sources"]["clean"].pop("files")
        data["sources"]["clean"].pop("max_token_id")

    edit_manifest(dataset, without_records)
    with pytest.raises(DataError, match=rf"sources\.clean\.vocab_size is 100, but {dataset / 'tokenizer.json'} has \d+"):
        build_pipeline(pipeline_config(dataset, sources={"clean": 1.0}))

    def without_tokenizer(data):
        del data["tokenizer"], data["tokenizer_sha256"]

    edit_manifest(dataset, without_tokenizer)
    with pytest.raises(DataError, match=r"clean: a document holds token id \d+, but the manifest's sources\.clean\.vocab_size is 100"):
        draw(build_pipeline(pipeline_config(dataset, sources={"clean": 1.0})), 5)


def test_wrong_document_or_token_counts_are_refused(dataset):
    documents = json.loads((dataset / "manifest.json").read_text())["sources"]["clean"]["num_documents"]

    def more_documents(data):
        data["sources"]["clean"]["num_documents"] += 1

    edit_manifest(dataset, more_documents)
    with pytest.raises(DataError, match=rf"sources\.clean\.num_documents: the manifest lists {documents + 1} documents but the shards in 'clean' hold {documents}"):
        build_pipeline(pipeline_config(dataset))

    def fewer_tokens(data):
        data["sources"]["clean"]["num_documents"] -= 1
        data["sources"]["clean"]["num_tokens"] -= 5

    edit_manifest(dataset, fewer_tokens)
    with pytest.raises(DataError, match=r"sources\.clean\.num_tokens: the manifest lists \d+ tokens but the shards"):
        records.read_manifest(dataset)

    def old_and_wrong(data):
        data["sources"]["clean"].pop("files")
        data["sources"]["clean"]["num_documents"] += 2

    edit_manifest(dataset, old_and_wrong)
    with pytest.raises(DataError, match=rf"lists {documents + 2} documents but the shards in .*clean hold {documents}"):
        build_pipeline(pipeline_config(dataset))


def test_dataset_path_typo_exits_2_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "prepard"
    with pytest.raises(DataError, match=f"{missing / 'manifest.json'}: no manifest \\(the dataset directory does not exist\\)"):
        build_pipeline(pipeline_config(missing))
    assert inspect_cli(tmp_path, missing) == 2
    assert str(missing) in one_error_line(capsys, "data inspect")


def test_eval_text_with_bad_utf8_or_truncated_gzip_names_the_file(tmp_path):
    bad_utf8 = tmp_path / "valid.txt"
    bad_utf8.write_bytes(b"fine line\ncaf\xe9\n")
    with pytest.raises(DataError, match=f"{bad_utf8}: invalid UTF-8 at line 2"):
        sources.read_text(bad_utf8)
    truncated = tmp_path / "test.txt.gz"
    truncated.write_bytes(gzip.compress(("the river ran past old stone houses. " * 200).encode())[:80])
    with pytest.raises(DataError, match=f"{truncated}: corrupt or truncated gzip"):
        sources.read_text(truncated)


@pytest.mark.parametrize(
    "argv, option",
    [
        (["data", "prepare", "recipe.yaml", "--workers", "-1"], "--workers: expected an integer >= 0, got -1"),
        (["data", "inspect", "data.yaml", "--batches", "0"], "--batches: expected an integer >= 1, got 0"),
        (["data", "inspect", "data.yaml", "--samples", "-1"], "--samples: expected an integer >= 0, got -1"),
    ],
    ids=["workers", "batches", "samples"],
)
def test_bad_numeric_options_exit_2_naming_the_option(argv, option, capsys):
    assert main(argv) == 2
    assert option in one_error_line(capsys, " ".join(argv[:2]))


def test_shard_writer_failure_names_the_file_and_leaves_no_shard(tmp_path, monkeypatch):
    """A write error array_record reports bare (its RuntimeError) names the shard being written."""
    source = tmp_path / "src"
    writer = records.ShardWriter(source, 0, 1)

    class Failing:
        def write(self, record):
            raise RuntimeError("write failed")

        def close(self):
            pass

    monkeypatch.setattr(writer, "_writer", Failing())
    with pytest.raises(DataError, match=f"{writer.tmp_path}: cannot write the shard \\(write failed\\)"):
        with writer:
            writer.write(np.arange(3), {"doc_id": "a", "source": "src"})
    assert list(source.iterdir()) == []
