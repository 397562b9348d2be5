"""jaxlm.rounds: the addition task and its verifier, the noisy filter and weak labeler (error
rates measured over many draws), label selection, the round's SFT rows, and the study itself
(resume after a kill writes the same data as an uninterrupted run; other settings are refused)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from jaxlm.config import ConfigError, from_dict
from jaxlm.rounds import curation, task
from jaxlm.rounds.config import ArmConfig, FilterConfig, RoundsConfig
from jaxlm.rounds.study import Evaluation, RoundsError, RoundsStudy, TaskData, curate

RNG = np.random.default_rng(0)
PROBLEMS = task.sample_problems(np.random.default_rng(1), 300, (1, 2, 3, 4, 5))


# ---------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------


def test_worked_solutions_are_correct_step_by_step():
    for p in PROBLEMS:
        response = task.solution(p)
        assert task.is_correct(p, response)
        steps, answer = response.split(">")
        width = p.digits
        xs, ys = str(p.a).zfill(width)[::-1], str(p.b).zfill(width)[::-1]
        carry = 0
        for step, x, y in zip(steps.rstrip(";").split(";"), xs, ys):
            lhs, total = step.split("=")
            assert lhs == f"{x}+{y}+{carry}" and int(total) == int(x) + int(y) + carry and len(total) == 2
            carry = int(total) // 10
        assert int(answer) == p.a + p.b
        assert task.parse_prompt(p.prompt) == p


def test_verifier_reads_the_final_answer_only():
    p = task.Problem(347, 598)
    assert task.is_correct(p, "garbage>945") and task.is_correct(p, "1>2>945")
    assert not task.is_correct(p, task.solution(p)[:-1]) and not task.is_correct(p, "945")
    assert not task.is_correct(p, task.solution(p) + "0") and task.final_answer("no mark") is None


def test_corrupted_responses_are_always_wrong_and_of_both_kinds():
    rng = np.random.default_rng(0)
    kinds = set()
    for p in PROBLEMS[:200]:
        wrong = task.corrupt(p, rng, PROBLEMS)
        assert not task.is_correct(p, wrong)
        kinds.add("wrong answer" if wrong.rsplit(">", 1)[0] == task.solution(p).rsplit(">", 1)[0] else "other problem")
    assert kinds == {"wrong answer", "other problem"}


def test_problem_sets_are_distinct_exclusive_and_of_the_asked_sizes():
    train = task.sample_problems(np.random.default_rng(0), 200, (4, 5))
    test = task.sample_problems(np.random.default_rng(0), 200, (4, 5), exclude=train)
    assert len(set(train)) == 200 and not set(train) & set(test)
    assert {p.digits for p in train} == {4, 5} and all(len(str(p.a)) == len(str(p.b)) for p in train)
    with pytest.raises(ConfigError, match="too few distinct problems"):
        task.sample_problems(np.random.default_rng(0), 60, (1,))


def test_tokenizer_is_one_token_per_character_and_round_trips():
    tok = task.task_tokenizer()
    assert tok.vocab_size == 3 + len(task.ALPHABET) and (tok.eos_id, tok.pad_id) == (0, 1)
    for p in PROBLEMS[:50]:
        text = p.prompt + task.solution(p)
        ids = tok.encode(text)
        assert len(ids) == len(text) and tok.decode(ids + [tok.eos_id]) == text
    longest = task.Problem(99999, 99999)
    assert len(tok.encode(task.solution(longest))) + 1 == task.max_response_tokens(5)


# ---------------------------------------------------------------------------------------
# The noisy filter, the weak labeler, the statistics and the selection
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fa, fr", [(0.0, 0.0), (0.1, 0.3), (0.5, 0.05)])
def test_noisy_filter_error_rates(fa, fr):
    correct = np.random.default_rng(2).random((400, 500)) < 0.3
    accepted = curation.noisy_filter(correct, FilterConfig(fa, fr), np.random.default_rng(3))
    false_accept = accepted[~correct].mean()
    false_reject = (~accepted[correct]).mean()
    for rate, want, n in ((false_accept, fa, (~correct).sum()), (false_reject, fr, correct.sum())):
        assert abs(rate - want) <= 4 * np.sqrt(max(want * (1 - want), 1e-12) / n) + 1e-12


@pytest.mark.parametrize("beta", [1.0, 0.5, 0.2, 0.0])
def test_weak_labeler_is_correct_a_beta_fraction_of_the_time(beta):
    problems = task.sample_problems(np.random.default_rng(4), 5000, (3, 4))
    chosen = np.arange(len(problems))
    labels = curation.weak_labels(chosen, problems, beta, np.random.default_rng(5))
    flags = np.array([l.correct for l in labels])
    assert all(task.is_correct(problems[l.prompt], l.response) == l.correct for l in labels)
    assert abs(flags.mean() - beta) <= 4 * np.sqrt(max(beta * (1 - beta), 1e-12) / len(flags)) + 1e-12
    # the label of a prompt does not depend on which other prompts are chosen
    some = curation.weak_labels(chosen[::7], problems, beta, np.random.default_rng(5))
    assert [(l.prompt, l.response) for l in some] == [(l.prompt, l.response) for l in labels[::7]]


def stats_with(failures):
    empty = curation.PromptStats.empty(len(failures))
    return curation.PromptStats(1, empty.samples, empty.correct, empty.accepted, np.asarray(failures, float),
                                empty.labels, empty.correct_labels)


def test_hardest_first_picks_the_lowest_pass_prompts_within_budget():
    fraction = np.array([0.75, 0.0, 0.5, 0.25, 0.0, 1.0, 0.25, 0.0])
    arm = ArmConfig("h", "hardest", 4)
    picks = [tuple(curation.choose_prompts(arm, fraction, stats_with(np.zeros(8)), np.random.default_rng(s)))
             for s in range(40)]
    for chosen in picks:
        assert len(chosen) == 4 == len(set(chosen))
        assert set(chosen[:3]) == {1, 4, 7} and chosen[3] in (3, 6)
    assert {c[3] for c in picks} == {3, 6}  # ties at random
    big = curation.choose_prompts(ArmConfig("h", "hardest", 100), fraction, stats_with(np.zeros(8)), RNG)
    assert sorted(big) == list(range(8))
    assert len(curation.choose_prompts(ArmConfig("f"), fraction, stats_with(np.zeros(8)), RNG)) == 0


def test_random_and_boost_selection():
    n = 50
    failures = np.where(np.arange(n) < 5, 3.0, 0.0)  # five prompts failed every round so far
    counts = {"random": np.zeros(n), "boost": np.zeros(n)}
    for s in range(300):
        for select, arm in (("random", ArmConfig("r", "random", 5)), ("boost", ArmConfig("b", "boost", 5, boost_rate=2.0))):
            chosen = curation.choose_prompts(arm, np.zeros(n), stats_with(failures), np.random.default_rng(s))
            assert len(set(chosen)) == 5
            counts[select][chosen] += 1
    assert counts["boost"][:5].mean() > 5 * counts["boost"][5:].mean()  # weights exp(2 * 3) ~ 400x
    assert abs(counts["random"][:5].mean() - counts["random"][5:].mean()) < 10  # 30 expected each


def test_prompt_stats_accumulate_and_round_trip():
    correct = np.array([[1, 0], [0, 0], [1, 1]], bool)
    accepted = np.array([[1, 1], [0, 0], [1, 0]], bool)
    labels = [curation.Label(1, "x", True), curation.Label(2, "y", False)]
    stats = curation.PromptStats.empty(3).after(correct, accepted).labelled(labels).after(correct, accepted)
    stats = stats.labelled(labels[:1])
    assert stats.rounds == 2 and stats.samples.tolist() == [4, 4, 4] and stats.correct.tolist() == [2, 0, 4]
    assert stats.accepted.tolist() == [4, 0, 2] and stats.failures.tolist() == [0.0, 2.0, 1.0]
    assert stats.labels.tolist() == [0, 2, 1] and stats.correct_labels.tolist() == [0, 2, 0]
    again = curation.PromptStats.from_json(json.loads(json.dumps(stats.to_json())))
    assert all(np.array_equal(getattr(again, f), getattr(stats, f)) for f in stats.FIELDS)


@pytest.mark.parametrize("accepted, labels, share", [(30, 4, 0.25), (7, 3, 0.5), (10, 25, 0.1), (0, 5, 0.3), (9, 4, None)])
def test_label_repeats_reach_the_set_share(accepted, labels, share):
    repeats = curation.label_repeats(accepted, labels, share, np.random.default_rng(0))
    if share is None or accepted == 0:
        assert repeats == list(range(labels))
        return
    assert len(repeats) == round(share * accepted / (1 - share))
    counts = np.bincount(repeats, minlength=labels)
    assert counts.max() - counts.min() <= 1


def synthetic_round(k=3, prompts=12, seed=0):
    problems = tuple(task.sample_problems(np.random.default_rng(seed), prompts, (3,)))
    rng = np.random.default_rng(seed + 1)
    correct = rng.random((prompts, k)) < 0.4
    responses = [[task.solution(p) if c else task.corrupt(p, rng, problems) for c in row] for p, row in zip(problems, correct)]
    evaluation = Evaluation(responses, correct, np.zeros(4, bool), {})
    return TaskData(problems, (), None, "task"), evaluation


def study_config(**changes):
    data = {
        "name": "t",
        "task": {"train_prompts": 12, "test_prompts": 12, "curriculum_problems": 300, "digits": [3],
                 "curriculum_digits": [1, 2]},
        "pretrain": {"model": {"preset": "tiny", "vocab_size": 32, "d_model": 32, "n_layers": 1, "n_heads": 2,
                               "mlp_hidden": 64, "max_seq_len": 64},
                     "data": {"seq_len": 64, "batch_size": 8}, "steps": 3, "log_every": 1,
                     "checkpoint": {"every": 3}, "tensorboard": False},
        "sampling": {"k": 2, "batch_size": 8},
        "filter": {"false_accept": 0.2, "false_reject": 0.2},
        "arms": [{"name": "hardest", "select": "hardest", "budget": 3}],
        "betas": [0.5], "seeds": [0], "rounds": 2,
        "sft": {"steps": 2, "batch_size": 8, "seq_len": 64},
    }
    for key, value in changes.items():
        data[key] = value
    return from_dict(RoundsConfig, data)


@pytest.mark.parametrize("cap, share, keep", [(None, None, False), (1, 0.25, False), (2, 0.5, True)])
def test_round_sft_rows_are_the_accepted_samples_and_labels_at_the_set_ratio(tmp_path, cap, share, keep):
    config = study_config(max_accepted_per_prompt=cap, label_share=share, keep_labels=keep,
                          filter={"false_accept": 0.3, "false_reject": 0.3})
    chain = config.chains()[0]
    data, evaluation = synthetic_round()
    earlier = [{"prompt": data.train[0].prompt, "response": "1>2", "kind": "label", "prompt_index": 0,
                "correct": False, "round": 0}]
    curated = curate(config, chain, 0, 1, evaluation, "m0", curation.PromptStats.empty(12), data, tmp_path / "r1",
                     earlier)
    accepted = curation.noisy_filter(evaluation.correct, config.filter, curation.rng(0, 1, "filter"))
    samples = [r for r in curated.rows if r["kind"] == "sample"]
    labels = [r for r in curated.rows if r["kind"] == "label"]
    want = curation.accepted_rows(accepted, cap)
    assert [(r["prompt_index"], r["response"]) for r in samples] == [(i, evaluation.responses[i][j]) for i, j in want]
    assert all(r["correct"] == bool(evaluation.correct[i, j]) for r, (i, j) in zip(samples, want))
    given = json.loads(json.dumps([json.loads(line) for line in (tmp_path / "r1" / "labels.jsonl").read_text().splitlines()]))
    assert len(given) == 3  # the budget
    pool = (earlier if keep else []) + given
    if share is None:
        assert labels == pool
    else:
        assert len(labels) == round(share * len(samples) / (1 - share))
        assert {json.dumps(r, sort_keys=True) for r in labels} <= {json.dumps(r, sort_keys=True) for r in pool}
    summary = curated.summary
    assert summary["sft_rows"] == len(curated.rows) and summary["accepted"] == int(accepted.sum())
    assert summary["false_accepts"] == int((accepted & ~evaluation.correct).sum())
    assert curated.stats.labels.sum() == 3 and curated.stats.accepted.sum() == accepted.sum()


# ---------------------------------------------------------------------------------------
# Config errors
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"arms": [{"name": "a", "select": "none", "budget": 4}]}, "select 'none' goes with budget 0"),
    ({"arms": [{"name": "a", "select": "hardest"}]}, "select 'none' goes with budget 0"),
    ({"betas": [1.5]}, "betas: expected distinct probabilities"),
    ({"label_share": 1.0}, "label_share"),
    ({"seeds": [0, 0]}, "seeds: expected distinct"),
])
def test_bad_config_is_named(change, message):
    with pytest.raises(ConfigError, match=message):
        study_config(**change)


def test_cli_bad_config_is_one_line_exit_2(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\npretrain: {data: {dataset: here}}\n")
    result = subprocess.run([sys.executable, "-m", "jaxlm", "rounds", str(path), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "pretrain.data.dataset: set by the study" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_model_too_short_for_the_task_is_refused():
    from jaxlm.rounds.plan import check_plan

    config = study_config(task={"digits": [6], "curriculum_digits": [1], "train_prompts": 4, "test_prompts": 4,
                                "curriculum_problems": 10})
    with pytest.raises(ConfigError, match="max_seq_len: 64 tokens do not hold a 6-digit problem"):
        check_plan(config)


# ---------------------------------------------------------------------------------------
# The study end to end (tiny models): resume equals an uninterrupted run
# ---------------------------------------------------------------------------------------


def study_files(out):
    names = ("sft.jsonl", "labels.jsonl", "stats.json", "samples.jsonl", "test.jsonl", "curation.json")
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.name in names}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("rounds") / "study"
    report = RoundsStudy(study_config(), out, progress=False).run()
    return out, report


def test_study_writes_every_round_and_a_report(uninterrupted):
    out, report = uninterrupted
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["chain"], r["round"]) for r in rows] == [("hardest-beta0.5", t) for t in range(3)]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rows) and rows[1]["labels"] == 3
    text = report.read_text()
    assert "hardest-beta0.5" in text and (out / "accuracy.png").stat().st_size > 0
    assert (out / "seed0" / "hardest-beta0.5" / "round2" / "train.done.json").exists()


def test_killed_study_resumes_with_identical_data(uninterrupted, tmp_path, monkeypatch):
    from jaxlm.rounds import study
    from jaxlm.loop import train

    out = tmp_path / "study"
    config = study_config()
    RoundsStudy(config, out, progress=False).run(max_rounds=1)  # stopped between rounds
    calls = []

    def killed_mid_run(train_config, run_dir, progress):  # round 2's SFT run dies after its first step
        calls.append(run_dir)
        train(train_config, run_dir, max_steps=1, show_progress=False)
        raise study.RoundsInterrupted("killed")

    monkeypatch.setattr(study, "_train", killed_mid_run)
    with pytest.raises(study.RoundsInterrupted):
        RoundsStudy(config, out, progress=False).run()
    assert calls == [out / "seed0" / "hardest-beta0.5" / "round2" / "train"]
    monkeypatch.undo()
    RoundsStudy(config, out, progress=False).run()
    assert study_files(out) == study_files(uninterrupted[0])
    assert (out / "metrics.jsonl").read_text() == (uninterrupted[0] / "metrics.jsonl").read_text()


def test_other_settings_in_the_same_directory_are_refused(uninterrupted, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(uninterrupted[0], out)
    changed = study_config(filter={"false_accept": 0.5, "false_reject": 0.2})
    with pytest.raises(RoundsError, match=r"round1: made with other settings"):
        RoundsStudy(changed, out, progress=False).run()
