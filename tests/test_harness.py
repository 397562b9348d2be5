"""The lm-evaluation-harness adapter (jaxlm.evaluate.harness) against direct jaxlm computations."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from conftest import CLEAN_WORDS, synthetic_documents
from jaxlm import model
from jaxlm.checkpoint import LoadedModel
from jaxlm.config import model_preset
from jaxlm.evaluate import capability
from jaxlm.evaluate.protocols import EvaluationError, generate_texts
from jaxlm.intervene import Intervention, add_edit
from jaxlm.tokenizer import train_bpe

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from jaxlm.evaluate.harness import JaxlmLM, run_harness  # noqa: E402

SENTENCES = [("the river ran past old stone houses", "the river ran stone past old houses"),
             ("children read books under quiet trees", "children books read under quiet trees"),
             ("old houses stood while the river ran", "old houses stood while ran the river"),
             ("the children read quiet books", "the read children quiet books"),
             ("trees stood past the old river", "trees past stood the old river"),
             ("stone houses were quiet", "stone were houses quiet")]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network: the harness and `datasets` read only local files."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


@pytest.fixture(scope="module")
def loaded():
    tokenizer = train_bpe(synthetic_documents(CLEAN_WORDS, 200, 0), vocab_size=300)
    config = model_preset("tiny", vocab_size=tokenizer.vocab_size)
    return LoadedModel(config, model.init_params(config, 0), tokenizer, None, Path("memory"))


@pytest.fixture(scope="module")
def lm(loaded):
    return JaxlmLM(loaded.config, loaded.params, loaded.tokenizer, batch_size=4, progress=False)


def request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


REFERENCE_LENGTH = 80  # reference rows are right-padded to this: one compiled forward serves them all


@pytest.fixture(scope="module")
def reference_logits(loaded):
    """[T, V] logits of one unbatched row (an optional intervention at every position), computed by
    one forward over the row right-padded to ``REFERENCE_LENGTH`` (causal: padding after a
    position cannot change its logits)."""
    forward = jax.jit(lambda params, tokens, edits: model.forward(loaded.config, params, tokens, intervention=edits).logits)

    def logits(row, intervention=None):
        tokens = np.zeros((1, REFERENCE_LENGTH), np.int32)
        tokens[0, : len(row)] = row
        edits = None if intervention is None else intervention.at_positions(np.ones_like(tokens, bool))
        return np.asarray(forward(loaded.params, tokens, edits))[0, : len(row)]

    return logits


@pytest.fixture(scope="module")
def direct_scores(reference_logits):
    """(sum of log-probs, all argmax) of the last ``n_targets`` tokens of ``row`` from the reference forward."""

    def scores(row, n_targets, intervention=None):
        logits = reference_logits(row, intervention)[:-1]
        logp = np.asarray(jax.nn.log_softmax(logits, -1))
        positions = np.arange(len(row) - n_targets - 1, len(row) - 1)
        targets = np.asarray(row)[positions + 1]
        return float(logp[positions, targets].sum()), bool((logits.argmax(-1)[positions] == targets).all())

    return scores


@pytest.fixture(scope="module")
def pair_score(loaded, direct_scores):
    """The direct log-likelihood of ``continuation`` after a non-empty ``context``."""

    def score(context, continuation):
        ctx, cont = split_pair(loaded.tokenizer, context, continuation)
        return direct_scores(ctx + cont, len(cont))[0]

    return score


def split_pair(tokenizer, context, continuation):
    """HFLM's split: trailing whitespace of the context moves onto the continuation."""
    stripped = context.rstrip()
    whole = tokenizer.encode(context + continuation)
    return whole[: len(tokenizer.encode(stripped))], whole[len(tokenizer.encode(stripped)):]


def test_loglikelihood_matches_direct_forward(loaded, lm, direct_scores):
    tok = loaded.tokenizer
    long_context = " ".join(["the old river ran past stone houses"] * 12)
    pairs = [("the river ran", " past old houses"), ("children read ", "books"), ("", "the quiet trees"),
             (long_context, " under quiet trees")]
    got = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    for (context, continuation), (logprob, _) in zip(pairs, got):
        if context:
            ctx, cont = split_pair(tok, context, continuation)
        else:
            ctx, cont = [tok.eos_id], tok.encode(continuation)
        row = (ctx + cont)[-(loaded.config.max_seq_len + 1):]
        assert logprob == pytest.approx(direct_scores(row, len(cont))[0], abs=1e-4)
    assert len(tok.encode(long_context)) > loaded.config.max_seq_len  # the last pair was cut from the left

    short = JaxlmLM(loaded.config, loaded.params, tok, max_length=8, progress=False)
    (logprob, _), = short.loglikelihood([request("loglikelihood", "the river ran past old stone", " houses")])
    ctx, cont = split_pair(tok, "the river ran past old stone", " houses")
    assert logprob == pytest.approx(direct_scores((ctx + cont)[-9:], len(cont))[0], abs=1e-4)
    with pytest.raises(EvaluationError, match="longer than max_length 8"):
        short.loglikelihood([request("loglikelihood", "the", " river ran past old stone houses while children read")])


def test_is_greedy(loaded, lm, reference_logits, direct_scores):
    context = loaded.tokenizer.encode("the river ran past")
    greedy_run = []
    for _ in range(3):  # the model's own greedy continuation, token by token
        greedy_run.append(int(np.argmax(reference_logits(context + greedy_run)[-1])))
    other = (greedy_run[0] + 1) % loaded.config.vocab_size
    after_other = int(np.argmax(reference_logits(context + [other])[-1]))  # greedy after a non-greedy token
    results = lm._loglikelihood_tokens([(None, context, greedy_run), (None, context, greedy_run[:2] + [other]),
                                        (None, context, [other]), (None, context, [other, after_other])])
    assert [greedy for _, greedy in results] == [True, False, False, False]
    assert results[0][0] == pytest.approx(direct_scores(context + greedy_run, 3)[0], abs=1e-4)


def test_loglikelihood_rolling(loaded, direct_scores):
    tok, length = loaded.tokenizer, 16
    lm = JaxlmLM(loaded.config, loaded.params, tok, max_length=length, progress=False)
    short_doc = "the river ran"
    long_doc = " ".join(synthetic_documents(CLEAN_WORDS, 3, 5))
    ids = tok.encode(long_doc)
    assert len(ids) > 2 * length and len(ids) % length  # full windows and a partial last one
    short_total, long_total, empty = lm.loglikelihood_rolling(
        [request("loglikelihood_rolling", short_doc), request("loglikelihood_rolling", long_doc),
         request("loglikelihood_rolling", "")])
    short_ids = tok.encode(short_doc)
    assert short_total == pytest.approx(direct_scores([tok.eos_id] + short_ids, len(short_ids))[0], abs=1e-4)
    assert empty == 0.0
    # Each token predicted once: windows of `length` tokens after one context token (EOS first),
    # the partial last window with a full context.
    expected, start = 0.0, 0
    while start < len(ids):
        stop = min(start + length, len(ids))
        row = [tok.eos_id] + ids[:stop] if start == 0 else ids[start - 1 : stop] if stop - start == length else ids[stop - length - 1 : stop]
        expected += direct_scores(row, stop - start)[0]
        start = stop
    assert long_total == pytest.approx(expected, abs=1e-3)


def test_generate_until_is_greedy_decode_cut_at_stop(loaded, lm):
    contexts = ["the river ran", "children read books"]
    full = [r["completion"] for r in generate_texts(loaded, contexts, max_new_tokens=12, progress=False)]
    stop = full[0][len(full[0]) // 2]
    assert stop in full[0]
    requests = [request("generate_until", contexts[0], {"until": [stop], "max_gen_toks": 12, "do_sample": False}),
                request("generate_until", contexts[1], {"until": ["\x00"], "max_gen_toks": 12})]
    assert lm.generate_until(requests) == [full[0].split(stop)[0], full[1]]
    with pytest.raises(EvaluationError, match="num_beams"):
        lm.generate_until([request("generate_until", "the", {"until": ["."], "num_beams": 2})])


def test_intervention_scale_zero_is_identity_and_an_add_edit_changes_scores(loaded, direct_scores, pair_score):
    config, rng = loaded.config, np.random.default_rng(0)
    edit = add_edit("resid_pre", rng.normal(size=(config.n_layers, config.d_model)),
                    layer_mask=np.arange(config.n_layers) == 1, positions="all")
    caa = Intervention.from_edits([edit], scale=0.0, method="caa")
    pairs = [request("loglikelihood", "the river ran", " past old houses"), request("loglikelihood", "", "children read")]
    base = JaxlmLM(config, loaded.params, loaded.tokenizer, progress=False).loglikelihood(pairs)
    zero = JaxlmLM(config, loaded.params, loaded.tokenizer, caa, progress=False).loglikelihood(pairs)
    pushed = JaxlmLM(config, loaded.params, loaded.tokenizer, caa.with_scale(4.0), progress=False).loglikelihood(pairs)
    assert [lp for lp, _ in zero] == pytest.approx([lp for lp, _ in base], abs=1e-6)
    assert all(abs(p - b) > 1e-3 for (p, _), (b, _) in zip(pushed, base))
    ctx, cont = split_pair(loaded.tokenizer, "the river ran", " past old houses")
    assert pushed[0][0] == pytest.approx(direct_scores(ctx + cont, len(cont), caa.with_scale(4.0))[0], abs=1e-4)
    assert pushed[0][0] != pytest.approx(pair_score("the river ran", " past old houses"), abs=1e-3)


def write_task(directory: Path, name: str, rows: list[dict], **config) -> None:
    """A local lm-eval task over a JSON-lines file (no network: ``dataset_path: json``)."""
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = {"task": name, "dataset_path": "json", "output_type": "multiple_choice", "test_split": "train",
            "dataset_kwargs": {"data_files": {"train": str(data)}, "cache_dir": str(directory / "hf-cache")},
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0}, **config}
    (directory / f"{name}.yaml").write_text(yaml.safe_dump(task))


def test_multiple_choice_task_accuracy(loaded, pair_score, tmp_path):
    rows = [{"question": q, "choices": [a, b, "stone"], "label": i % 3} for i, (q, (a, b)) in
            enumerate(zip(["the river", "children read", "old stone", "quiet", "the old houses", "under the"],
                          [(" ran", " read"), (" books", " trees"), (" houses", " river"), (" trees", " ran"),
                           (" stood", " books"), (" trees", " houses")]))]
    write_task(tmp_path, "toy_choice", rows, doc_to_text="{{question}}", doc_to_choice="choices", doc_to_target="label")
    result = run_harness(loaded, ["toy_choice"], include_path=tmp_path, include_defaults=False, batch_size=4,
                         progress=False)
    correct = []
    for row in rows:
        scores = [pair_score(row["question"], " " + choice) for choice in row["choices"]]
        correct.append(int(np.argmax(scores)) == row["label"])
    assert result["metrics"]["toy_choice"]["acc"] == pytest.approx(np.mean(correct))
    assert result["n-samples"]["toy_choice"]["effective"] == len(rows)
    assert json.loads(json.dumps(result)) == result  # JSON-safe
    again = run_harness(loaded, ["toy_choice"], include_path=tmp_path, include_defaults=False, limit=2, progress=False)
    assert again["n-samples"]["toy_choice"]["effective"] == 2 and again["fingerprint"] != result["fingerprint"]
    with pytest.raises(EvaluationError, match="'no_such_task'"):
        run_harness(loaded, ["toy_choice", "no_such_task"], include_path=tmp_path, include_defaults=False)


def test_blimp_task_format_agrees_with_blimp_accuracy(loaded, tmp_path):
    """lm-eval's BLiMP template (empty context, [good, bad], target 0) equals jaxlm's BLiMP: the
    harness scores ``" " + sentence`` (its target delimiter) after EOS, so the pairs compared
    carry that space; with an empty delimiter the raw sentences agree too."""
    rows = [{"sentence_good": good, "sentence_bad": bad} for good, bad in SENTENCES]
    blimp = {"doc_to_text": "", "doc_to_target": 0, "doc_to_choice": "{{[sentence_good, sentence_bad]}}", "num_fewshot": 0}
    write_task(tmp_path, "toy_blimp", rows, **blimp)
    write_task(tmp_path, "toy_blimp_raw", rows, target_delimiter="", **blimp)
    result = run_harness(loaded, ["toy_blimp", "toy_blimp_raw"], include_path=tmp_path, include_defaults=False,
                         progress=False)
    for task, prefix in (("toy_blimp", " "), ("toy_blimp_raw", "")):
        pairs = [capability.MinimalPair(prefix + good, prefix + bad, "toy", "") for good, bad in SENTENCES]
        expected = capability.blimp_accuracy(loaded.config, loaded.params, loaded.tokenizer, pairs, progress=None)
        assert result["metrics"][task]["acc"] == pytest.approx(expected["blimp_accuracy"])


def test_cli_harness(tiny_run_dir, tmp_path, capsys):
    from jaxlm.cli import main

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [{"sentence_good": good, "sentence_bad": bad} for good, bad in SENTENCES]
    write_task(tasks, "toy_blimp", rows, doc_to_text="", doc_to_target=0,
               doc_to_choice="{{[sentence_good, sentence_bad]}}")
    edit = add_edit("resid_pre", np.ones((2, 32)), layer_mask=[False, True])
    intervention = Intervention.from_edits([edit], scale=1.0, method="caa").save(tmp_path / "caa.safetensors")
    out = tmp_path / "out"
    base = ["eval", "harness", "--checkpoint", str(tiny_run_dir), "--out", str(out)]
    assert main(base + ["--tasks", "toy_blimp", "--include-path", str(tasks), "--limit", "4",
                        "--intervention", str(intervention), "--scale", "0.5"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "harness.json").read_text())
    assert saved["method"] == "caa" and saved["scale"] == 0.5 and saved["step"] == 20
    assert saved["n-samples"]["toy_blimp"]["effective"] == 4
    assert f"toy_blimp acc: {saved['metrics']['toy_blimp']['acc']:.4f}" in printed

    assert main(base + ["--include-path", str(tasks)]) == 2
    assert capsys.readouterr().err.strip() == (
        "jaxlm eval: error: --tasks: required for the harness suite (comma-separated lm-eval task names)")
    assert main(base + ["--tasks", "toy_blimp,nonexistent_task_x", "--include-path", str(tasks)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'nonexistent_task_x'" in err[0] and "toy_blimp'" not in err[0]
    assert main(["eval", "ce", "--checkpoint", str(tiny_run_dir), "--tasks", "toy_blimp"]) == 2
    assert "--tasks: only the harness suite" in capsys.readouterr().err
