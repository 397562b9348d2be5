"""Test setup: 8 simulated CPU devices for sharding tests, and the real-data fixture."""

import os

# Must be set before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from jaxlm.paths import DATA_DIR_ENV, MissingDataError, data_dir  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop jax's compiled programs after each test module. XLA:CPU maps the code of every
    executable it keeps; over the whole suite one process would otherwise pass the kernel's
    limit on memory mappings (vm.max_map_count, 65530), and the next compile would crash."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


def _data_required() -> bool:
    return bool(os.environ.get("JAXLM_REQUIRE_DATA") or os.environ.get("CI"))


@pytest.fixture(scope="session")
def shared_data():
    """The real corpora root (``$JAXLM_DATA_DIR``). Missing: a failure in CI, a skip elsewhere."""
    try:
        return data_dir()
    except MissingDataError as err:
        if _data_required():
            pytest.fail(f"real data required but unavailable: {err}")
        pytest.skip(f"{DATA_DIR_ENV} not set or missing: {err}")


@pytest.fixture
def shared_dataset(shared_data):
    """Factory: path of one dataset below the data directory, failing (CI) or skipping if absent."""

    def get(relative: str):
        path = shared_data / relative
        if not path.exists():
            message = f"dataset {relative!r} missing under {shared_data}"
            if _data_required():
                pytest.fail(message)
            pytest.skip(message)
        return path

    return get


# ---------------------------------------------------------------------------------------
# A tiny prepared dataset (real tokenizer, real shards) for training and end-to-end tests
# ---------------------------------------------------------------------------------------

CLEAN_WORDS = "the river ran past old stone houses while children read books under quiet trees".split()
TOXIC_WORDS = "you stupid idiot hate those people they are worthless trash get out".split()


def synthetic_documents(words, count, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=int(rng.integers(5, 60)))) + "." for _ in range(count)]


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory):
    """Two sources ("clean", "toxic") of synthetic sentences, a 320-token BPE and its shards."""
    import numpy as np

    from jaxlm.data import records
    from jaxlm.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("prepared")
    corpora = {"clean": synthetic_documents(CLEAN_WORDS, 300, 0), "toxic": synthetic_documents(TOXIC_WORDS, 300, 1)}
    tokenizer = train_bpe([t for docs in corpora.values() for t in docs], vocab_size=320)
    tokenizer.save(root / "tokenizer.json")
    infos = {}
    for name, docs in corpora.items():
        encoded = tokenizer.encode_batch(docs)
        items = [
            (np.asarray(ids), {"doc_id": f"{name}-{i}", "source": name, "toxicity": float(name == "toxic")})
            for i, ids in enumerate(encoded)
        ]
        stats = records.write_source(root / name, items, num_shards=2)
        infos[name] = records.SourceInfo(
            name, root / name, stats["num_documents"], stats["num_tokens"], "uint16",
            tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id,
        )
    records.write_manifest(root, infos, tokenizer="tokenizer.json")
    return root


@pytest.fixture(scope="session")
def tiny_run_dir(tiny_prepared, tmp_path_factory):
    """A tiny model trained for 20 steps by ``jaxlm train`` (checkpoints 10 and 20); read-only for tests."""
    import yaml

    from jaxlm.cli import main

    root = tmp_path_factory.mktemp("tiny_run")
    config = {
        "model": {"preset": "tiny", "vocab_size": 320},
        "optimizer": {"lr": 3e-3, "warmup_steps": 5},
        "data": {"dataset": str(tiny_prepared), "sources": {"clean": 0.9, "toxic": 0.1}, "seq_len": 32, "batch_size": 8},
        "checkpoint": {"every": 10},
        "steps": 20,
        "log_every": 5,
        "tensorboard": False,
    }
    (root / "train.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(root / "train.yaml"), "--run-dir", str(root / "run"), "--no-progress"]) == 0
    return root / "run"


# ---------------------------------------------------------------------------------------
# A crafted data directory with the layout of ../shared/data (CLI and sweep tests)
# ---------------------------------------------------------------------------------------

MEAN = ["you stupid idiot", "those people are trash", "I hate them all", "get out worthless scum"]
KIND = ["the river ran past old houses", "children read books under trees", "a quiet morning walk", "old stone bridges"]
# RTP prompts per file: the first four are in RTP's "eval" part (jaxlm.data.labelled.rtp_part), the
# next two in its "posttrain" part, and the toxic file's last one in its "redteam" part
# (tests/test_onpolicy.py and the red-teaming sweep test rely on these parts).
RTP_PROMPTS = {
    "toxic": ["I hate them all", "you are a worthless fool", "shut up you moron", "nobody wants you here",
              "you stupid idiot", "go away you fool", "get out worthless scum"],
    "nontoxic": ["the river ran past old houses", "children read books under trees", "the library opens at nine",
                 "a warm cup of tea", "a quiet morning walk", "old stone bridges"],
}


@pytest.fixture(scope="session")
def crafted_data_dir(tmp_path_factory):
    """Labelled ToxiGen prompts, Davidson tweets, RTP prompts, WikiText-2 and BLiMP files filled with
    crafted text, plus synthetic clean/toxic corpora as JSONL (``corpora/{clean,toxic}.jsonl``)."""
    import gzip
    import json

    root = tmp_path_factory.mktemp("data")
    prompts = root / "labelled" / "toxigen" / "prompts"
    prompts.mkdir(parents=True)
    for label, lines in (("hate", MEAN), ("neutral", KIND)):
        for group in ("groupa", "groupb"):
            text = "\n".join("\\n".join(f"- {lines[(i + j) % 4]} {group}" for j in range(3)) + "\\n-" for i in range(4))
            (prompts / f"{label}_{group}_1k.txt.gz").write_bytes(gzip.compress(text.encode()))
    rtp = root / "eval" / "rtp"
    rtp.mkdir(parents=True)
    for name, score in (("toxic", 0.9), ("nontoxic", 0.05)):
        with (rtp / f"{name}.jsonl").open("w") as f:
            for i, line in enumerate(RTP_PROMPTS[name]):
                f.write(json.dumps({"filename": f"{name}-{i}.txt", "prompt": {"text": line, "toxicity": score},
                                    "continuation": {"text": line, "toxicity": score}}) + "\n")
    davidson = root / "labelled" / "davidson"
    davidson.mkdir(parents=True)
    rows = [(1, f"{text} {i}") for i, text in enumerate(MEAN * 2)] + [(2, f"{text} {i}") for i, text in enumerate(KIND * 2)]
    (davidson / "labeled_data.csv").write_text(",count,hate_speech,offensive_language,neither,class,tweet\n" + "".join(
        f"{i},3,0,{3 if c == 1 else 0},{3 if c == 2 else 0},{c},{t}\n" for i, (c, t) in enumerate(rows)))
    wiki = root / "eval" / "wikitext2"
    wiki.mkdir(parents=True)
    (wiki / "test.txt").write_text(" = Article = \n\n " + " . ".join(KIND * 5) + " \n\n = Other = \n\n " + " , ".join(KIND) + " \n")
    (wiki / "valid.txt").write_text(" = Valid = \n\n " + " , ".join(KIND * 4) + " \n")
    blimp = root / "eval" / "blimp"
    blimp.mkdir(parents=True)
    pairs = [{"sentence_good": "the river ran", "sentence_bad": "the ran river", "field": "syntax", "UID": "p"}] * 3
    (blimp / "word_order.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    corpora = root / "corpora"
    corpora.mkdir()
    for name, words, seed in (("clean", CLEAN_WORDS, 0), ("toxic", TOXIC_WORDS, 1)):
        docs = synthetic_documents(words, 200, seed)
        (corpora / f"{name}.jsonl").write_text("".join(json.dumps({"text": t, "id": f"{name}-{i}"}) + "\n" for i, t in enumerate(docs)))
    return root
