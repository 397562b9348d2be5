"""The declared filter/transform chain of `jaxlm data prepare`: per-step drops, dedup, CQF
selection, Perm(k), hooks, held-out handling, fingerprints and reuse, and `jaxlm data inspect`."""

import collections
import json
import textwrap

import numpy as np
import pytest

from jaxlm.cli import main
from jaxlm.config import ConfigError, from_dict
from jaxlm.data import records
from jaxlm.data.prepare import prepare
from jaxlm.data.recipe import Recipe

PROSE = (
    "the river ran past old stone houses and the children of the town walked to school with their books "
    "while the baker opened his shop and the light came over the hills that stood to the east of the valley"
).split()
FORMAL = "analysis theorem proof lemma corollary measure integral function space operator".split()
CHAT = "lol omg yeah dude wtf tbh idk bro nah gonna".split()


def prose(rng, words=80) -> str:
    return " ".join(rng.choice(PROSE, size=words)) + "."


def styled(rng, vocabulary, words=60) -> str:
    """Prose with about a third of its words from ``vocabulary``: passes the Gopher rules."""
    base = list(rng.choice(PROSE, size=words))
    for i in rng.choice(words, size=words // 3, replace=False):
        base[i] = str(rng.choice(vocabulary))
    return " ".join(base) + "."


def write_jsonl(path, texts, prefix):
    path.write_text("".join(json.dumps({"id": f"{prefix}{i}", "text": t}) + "\n" for i, t in enumerate(texts)))


@pytest.fixture
def corpus(tmp_path):
    """``web.jsonl``: 30 prose documents, 4 junk ones (too short / symbols), 3 exact duplicates
    (case and spacing changed), 2 near duplicates; ``styled.jsonl``: 40 formal and 40 chat
    documents; ``hq.jsonl``: 40 formal ones for the classifier."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    root.mkdir()
    web = [prose(rng) for _ in range(30)]
    junk = ["too short to keep", "# # # # " * 20 + " ".join(PROSE[:60]), "lol", "ok then"]
    exact = [web[0].upper(), "  " + web[1].replace(" ", "   "), web[2]]
    near = []
    for source in (web[3], web[4]):
        words = source.split()
        words[10] = "changed"
        near.append(" ".join(words))
    write_jsonl(root / "web.jsonl", web + junk + exact + near, "w")
    formal = [styled(rng, FORMAL) for _ in range(40)]
    chat = [styled(rng, CHAT) for _ in range(40)]
    mixed = [t for pair in zip(formal, chat) for t in pair]
    write_jsonl(root / "styled.jsonl", mixed, "s")
    write_jsonl(root / "hq.jsonl", [styled(rng, FORMAL) for _ in range(40)], "h")
    return root


def source(path, **chain):
    return {"reader": "jsonl", "paths": [path], "args": {"text_field": "text", "id_field": "id"}, **chain}


CLASSIFIER = {
    "positive": source("hq.jsonl"),
    "negative_sources": ["styled"],
    "negative_documents": 40,
    "settings": {"model": "logreg", "holdout_fraction": 0.2},
}


def make_recipe(sources, classifiers=None, toxicity=False) -> Recipe:
    data = {"sources": sources, "tokenizer": {"vocab_size": 300, "sample_chars": 20000}, "toxicity": {"enabled": toxicity}}
    if classifiers:
        data["classifiers"] = classifiers
    return from_dict(Recipe, data)


def run(recipe, out, corpus):
    return prepare(recipe, out, data_dir=corpus, workers=0, progress=False)


def documents(out, name):
    return list(records.iter_documents(out / name))


def entry(out, name):
    return json.loads((out / "manifest.json").read_text())["sources"][name]


# ---------------------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------------------


def test_each_filter_drops_what_it_should_and_counts_it_per_step(corpus, tmp_path):
    filters = [
        {"heuristic": {"preset": "gopher", "min_words": 20}},
        {"dedup": {}},
        {"near_dedup": {"threshold": 0.7, "num_perm": 128}},
    ]
    out = tmp_path / "out"
    run(make_recipe({"web": source("web.jsonl", filters=filters)}), out, corpus)
    kept = [meta["doc_id"] for _, meta in documents(out, "web")]
    assert kept == [f"w{i}" for i in range(30)]  # every junk, duplicate and near duplicate gone, order kept
    made = entry(out, "web")
    chain = made["chain"]
    assert [s["documents_in"] for s in chain] == [39, 35, 32]
    assert [s["dropped"] for s in chain] == [4, 3, 2]
    assert chain[0]["reasons"] == {"heuristic.min_words": 3, "heuristic.min_mean_word_length": 1}
    assert chain[1]["reasons"] == {"dedup": 3} and chain[2]["reasons"] == {"near_dedup": 2}
    assert made["dropped"]["dedup"] == 3 and made["dropped"]["near_dedup"] == 2
    assert sum(v for k, v in made["dropped"].items() if k.startswith("heuristic.")) == 4


def test_toxicity_threshold_keeps_the_scores_in_range(corpus, tmp_path):
    rude = ["you are a stupid fucking idiot and everyone hates you " * 3, "fuck off you worthless piece of shit " * 3]
    write_jsonl(corpus / "mixed.jsonl", [prose(np.random.default_rng(1)) for _ in range(6)] + rude, "m")
    out = tmp_path / "out"
    run(make_recipe({"m": source("mixed.jsonl", filters=[{"toxicity": {"max": 0.5}}])}, toxicity=True), out, corpus)
    kept = documents(out, "m")
    assert len(kept) == 6 and all(meta["toxicity"] <= 0.5 for _, meta in kept)
    assert entry(out, "m")["chain"][0]["reasons"] == {"toxicity": 2}


# ---------------------------------------------------------------------------------------
# Classifier-based quality filtering
# ---------------------------------------------------------------------------------------


def test_cqf_keeps_exactly_the_top_fraction_by_score_and_reuses_its_classifier(corpus, tmp_path):
    scored = tmp_path / "scored"
    recipe = make_recipe({"styled": source("styled.jsonl", filters=[{"quality": {"classifier": "wiki"}}])},
                         {"wiki": CLASSIFIER})
    run(recipe, scored, corpus)
    everything = documents(scored, "styled")
    assert len(everything) == 80
    scores = np.asarray([meta["quality.wiki"] for _, meta in everything])
    percentiles = np.asarray([meta["quality.wiki.percentile"] for _, meta in everything])
    assert sorted(np.round(percentiles * 80).astype(int)) == list(range(80))
    formal = np.asarray([int(meta["doc_id"][1:]) % 2 == 0 for _, meta in everything])
    assert scores[formal].mean() > scores[~formal].mean() + 0.2  # the classifier learned the HQ style

    top = tmp_path / "top"
    recipe = make_recipe({"styled": source("styled.jsonl", filters=[{"quality": {"classifier": "wiki", "top": 0.25}}])},
                         {"wiki": CLASSIFIER})
    run(recipe, top, corpus)
    kept = [meta["doc_id"] for _, meta in documents(top, "styled")]
    order = np.lexsort((np.arange(80), scores))[::-1][:20]
    assert kept == [everything[i][1]["doc_id"] for i in sorted(order)]  # top 20 by score, in stored order
    assert entry(top, "styled")["chain"][0] == {
        "step": "quality wiki top 0.25", "documents_in": 80, "dropped": 60, "reasons": {"quality.wiki": 60}
    }
    manifest = json.loads((top / "manifest.json").read_text())
    assert manifest["classifiers"]["wiki"]["positive_documents"] == 40
    assert manifest["sources"]["styled"]["scores"]["quality.wiki"]["n"] == 20

    trained = (top / "classifiers" / "wiki" / "training.json").stat().st_mtime_ns
    again = run(recipe, top, corpus)
    assert again.up_to_date
    band = make_recipe(
        {"styled": source("styled.jsonl", filters=[{"quality": {"classifier": "wiki", "band": [0.5, 0.75]}}])},
        {"wiki": CLASSIFIER},
    )
    run(band, top, corpus)  # the chain changed: rebuilt, with the same classifier
    assert (top / "classifiers" / "wiki" / "training.json").stat().st_mtime_ns == trained
    kept = {meta["doc_id"] for _, meta in documents(top, "styled")}
    assert kept == {everything[i][1]["doc_id"] for i in range(80) if 0.5 <= percentiles[i] < 0.75}
    threshold = float(np.sort(scores)[50])
    above = make_recipe(
        {"styled": source("styled.jsonl", filters=[{"quality": {"classifier": "wiki", "min_score": threshold}}])},
        {"wiki": CLASSIFIER},
    )
    run(above, top, corpus)
    kept = {meta["doc_id"] for _, meta in documents(top, "styled")}
    assert kept == {everything[i][1]["doc_id"] for i in range(80) if scores[i] >= threshold} and len(kept) >= 30


# ---------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------


def test_perm_permutes_exactly_a_fraction_and_keeps_each_documents_tokens(corpus, tmp_path):
    plain, permuted = tmp_path / "plain", tmp_path / "perm"
    run(make_recipe({"web": source("web.jsonl")}), plain, corpus)
    recipe = make_recipe({"web": source("web.jsonl", transforms=[{"perm": {"fraction": 0.25, "seed": 3}}])})
    run(recipe, permuted, corpus)
    before, after = documents(plain, "web"), documents(permuted, "web")
    assert [m["doc_id"] for _, m in before] == [m["doc_id"] for _, m in after]
    flags = [meta["permuted"] for _, meta in after]
    assert sum(flags) == round(0.25 * len(after))
    assert entry(permuted, "web")["chain"] == [
        {"step": "perm 0.25", "documents_in": len(after), "permuted": sum(flags), "dropped": 0, "reasons": {}}
    ]
    for (ids_a, _), (ids_b, meta) in zip(before, after):
        assert sorted(ids_a.tolist()) == sorted(ids_b.tolist())
        assert (ids_a.tolist() != ids_b.tolist()) == meta["permuted"] or len(set(ids_a.tolist())) == 1
    again = tmp_path / "again"
    run(recipe, again, corpus)
    assert [ids.tolist() for ids, _ in documents(again, "web")] == [ids.tolist() for ids, _ in after]


def test_hook_rewrites_or_drops_text_and_its_source_is_fingerprinted(corpus, tmp_path, monkeypatch):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "myhooks.py").write_text(textwrap.dedent('''
        def shout(text, meta, marker="!"):
            return None if "school" in text else text.upper() + marker
    '''))
    monkeypatch.syspath_prepend(str(hooks))
    out = tmp_path / "out"
    recipe = make_recipe(
        {"web": source("web.jsonl", transforms=[{"hook": {"function": "myhooks:shout", "args": {"marker": "?"}}}])}
    )
    run(recipe, out, corpus)
    tokenizer = __import__("jaxlm.tokenizer", fromlist=["Tokenizer"]).Tokenizer.load(out / "tokenizer.json")
    texts = [tokenizer.decode(ids.tolist()) for ids, _ in documents(out, "web")]
    assert texts and all(t.endswith("?") and t == t.upper() for t in texts)
    raw = [json.loads(line)["text"] for line in (corpus / "web.jsonl").read_text().splitlines()]
    dropped = sum("school" in t for t in raw)
    assert entry(out, "web")["dropped"]["hook.shout"] == dropped and len(texts) == len(raw) - dropped
    assert run(recipe, out, corpus).up_to_date
    (hooks / "myhooks.py").write_text((hooks / "myhooks.py").read_text() + "\n# edited\n")
    assert run(recipe, out, corpus).built == ("web",)


def test_held_out_chain_decides_what_the_valid_split_goes_through(corpus, tmp_path):
    filters = [{"heuristic": {"preset": "gopher", "min_words": 20}}]
    counts = {}
    for mode in ("all", "none"):
        out = tmp_path / mode
        spec = source("web.jsonl", filters=filters, valid_fraction=0.25, held_out_chain=mode)
        run(make_recipe({"web": spec}), out, corpus)
        counts[mode] = (len(documents(out, "web")), len(documents(out, "web@valid")))
    total = 41
    held = round(total * 0.25)
    assert counts["none"][1] == held  # unfiltered held-out set
    assert counts["all"][1] < held and counts["all"][0] == counts["none"][0]


# ---------------------------------------------------------------------------------------
# Fingerprints, reuse, validation, inspect
# ---------------------------------------------------------------------------------------


def test_fingerprints_change_when_and_only_when_a_chain_step_changes(corpus, tmp_path):
    out = tmp_path / "out"
    base = {"web": source("web.jsonl"), "styled": source("styled.jsonl")}
    first = run(make_recipe(base), out, corpus)
    fps = {name: entry(out, name)["fingerprint"] for name in base}
    assert run(make_recipe({"web": source("web.jsonl", filters=[], transforms=[]), "styled": base["styled"]}),
               out, corpus).up_to_date  # an empty chain is no chain: same fingerprint
    changed = {"web": source("web.jsonl", filters=[{"dedup": {}}]), "styled": base["styled"]}
    result = run(make_recipe(changed), out, corpus)
    assert result.built == ("web",) and result.reused == ("styled",)
    assert entry(out, "styled")["fingerprint"] == fps["styled"] and entry(out, "web")["fingerprint"] != fps["web"]
    tweaked = {"web": source("web.jsonl", filters=[{"dedup": {"normalize": False}}]), "styled": base["styled"]}
    assert run(make_recipe(tweaked), out, corpus).built == ("web",)
    assert run(make_recipe(base), out, corpus).built == ("web",)
    assert entry(out, "web")["fingerprint"] == fps["web"] and first.built == ("web", "styled")


@pytest.mark.parametrize(
    "sources, classifiers, message",
    [
        ({"web": source("web.jsonl", filters=[{"quality": {"classifier": "wiki"}}, {"dedup": {}}])}, {"wiki": CLASSIFIER},
         "must come after every per-document filter"),
        ({"web": source("web.jsonl", filters=[{"quality": {"classifier": "nope"}}])}, None, "unknown classifier 'nope'"),
        ({"web": source("web.jsonl", filters=[{"dedup": {}, "near_dedup": {}}])}, None, "exactly one of"),
        ({"web": source("web.jsonl", transforms=[{"perm": {"fraction": 0.5}}, {"perm": {"fraction": 0.1}}])}, None,
         "at most one perm"),
        ({"web": source("web.jsonl", filters=[{"toxicity": {"max": 0.5}}])}, None, "needs toxicity.enabled"),
        ({"web": source("web.jsonl", filters=[{"quality": {"classifier": "wiki", "top": 1.5}}])}, {"wiki": CLASSIFIER},
         "quality.top"),
    ],
)
def test_bad_chains_are_one_line_config_errors(sources, classifiers, message):
    with pytest.raises(ConfigError, match=message):
        make_recipe(sources, classifiers)


def test_inspect_shows_each_steps_drops_and_the_score_distribution(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    filters = [{"dedup": {}}, {"quality": {"classifier": "wiki", "top": 0.5}}]
    styled = source("styled.jsonl", filters=filters, transforms=[{"perm": {"fraction": 0.25}}])
    recipe = make_recipe({"styled": styled, "web": source("web.jsonl")}, {"wiki": CLASSIFIER})
    run(recipe, out, corpus)
    kept = documents(out, "styled")
    assert len(kept) == 40 and sum(meta["permuted"] for _, meta in kept) == 10  # dedup + top 50% + Perm(0.25)
    assert main(["data", "inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "chain of styled:" in shown and "quality wiki top 0.5" in shown and "dedup" in shown
    assert "perm 0.25" in shown and "permuted         10" in shown
    assert "styled quality.wiki: mean" in shown and "classifier wiki: trained, 40 HQ vs 40 pool documents" in shown
    assert main(["data", "inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    steps = report["manifest"]["sources"]["styled"]["chain"]
    assert collections.Counter(s["step"] for s in steps) == {"dedup": 1, "quality wiki top 0.5": 1, "perm 0.25": 1}
