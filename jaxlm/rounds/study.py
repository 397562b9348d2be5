"""Running the rounds study (``jaxlm rounds CONFIG --out DIR``), resumable.

For every seed: pretrain a base model on the task's curriculum, then for every chain (an arm at
one labeler accuracy) ``rounds`` rounds of::

    samples of model t-1 (k per training prompt) -> noisy filter -> choose prompts to label
    (budget B) -> weak labels -> SFT rows -> model t (SFT from the base or from model t-1)

and every model is measured (``metrics.jsonl``; ``jaxlm.rounds.report`` turns it into
``report.md`` and plots). Layout of ``OUT``::

    OUT/rounds.yaml                     the resolved RoundsConfig
    OUT/task/                           problems.json (train/test prompts), corpus.jsonl (the
                                        curriculum), tokenizer.json, data/ (prepared dataset)
    OUT/seed<s>/base/                   the base model's pretraining run (resumes after a kill)
    OUT/seed<s>/base-eval/              the base model's samples.jsonl, test.jsonl, eval.json
    OUT/seed<s>/<chain>/round<t>/       stats.json (per-prompt statistics after model t-1's
                                        samples), labels.jsonl, sft.jsonl, curation.json;
                                        train/ (the SFT run); eval/ (model t's samples and test)
    OUT/metrics.jsonl                   one row per seed x chain x model (round 0 = base)

Every finished unit writes ``<unit>.done.json`` with a fingerprint of what it depends on (its
settings and its inputs' fingerprints): a matching unit is skipped, a killed training run resumes
from its checkpoint, and a unit made with other settings is refused (``RoundsError``) rather than
overwritten. Randomness comes from the seed and the round (``curation.rng``), so a resumed study
writes the same data as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from jaxlm import files
from jaxlm.config import ConfigError, dump_yaml, from_dict, to_dict
from jaxlm.errors import DirectoryLock, JaxlmError
from jaxlm.rounds import curation, plan
from jaxlm.rounds.config import Chain, RoundsConfig
from jaxlm.rounds.task import Problem, is_correct, max_response_tokens, sample_problems, solution, task_tokenizer
from jaxlm.sweep.stages import fingerprint

STUDY_VERSION = 1  # bump when what a unit writes changes meaning


class RoundsError(JaxlmError, RuntimeError):
    pass


class RoundsInterrupted(RuntimeError):
    """A training run was preempted (SIGTERM/SIGINT): its checkpoint is saved; rerun to continue."""


@dataclasses.dataclass(frozen=True)
class TaskData:
    train: tuple[Problem, ...]
    test: tuple[Problem, ...]
    dataset: Path
    fingerprint: str


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """A model of the study: its run directory and the fingerprint of what made it."""

    path: Path
    fingerprint: str


def _marker(unit: Path) -> Path:
    return unit.parent / (unit.name + ".done.json")


def finished(unit: Path, fp: str) -> dict | None:
    """The marker of a finished ``unit`` made with fingerprint ``fp``; None when unfinished;
    ``RoundsError`` when it was made with other settings."""
    marker = _marker(unit)
    if not marker.exists():
        return None
    try:
        data = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RoundsError(f"{marker}: unreadable ({err}); remove it to redo {unit.name}") from None
    if data.get("fingerprint") != fp:
        raise RoundsError(f"{unit}: made with other settings than this config's (fingerprint "
                          f"{data.get('fingerprint')} != {fp}); use another --out, or remove it to redo it")
    return data


def mark(unit: Path, fp: str, **extra: Any) -> dict:
    record = {"fingerprint": fp, **extra}
    files.write_json(_marker(unit), record)
    return record


# ---------------------------------------------------------------------------------------
# Task and base models
# ---------------------------------------------------------------------------------------


def build_task(config: RoundsConfig, out: Path, progress: bool) -> TaskData:
    """The prompts, the curriculum corpus, the tokenizer and the prepared dataset (once)."""
    from jaxlm.data.prepare import prepare
    from jaxlm.data.recipe import Recipe

    unit = out / "task"
    fp = fingerprint("task", STUDY_VERSION, to_dict(config.task))
    if finished(unit, fp) is None:
        task = config.task
        generator = np.random.default_rng(task.seed)
        train = sample_problems(generator, task.train_prompts, task.digits)
        test = sample_problems(generator, task.test_prompts, task.digits, exclude=train)
        hard = int(round(task.hard_share * task.curriculum_problems))
        held = set(train) | set(test)
        corpus = sample_problems(generator, task.curriculum_problems - hard, task.curriculum_digits, exclude=held)
        corpus += sample_problems(generator, hard, task.digits, exclude=held | set(corpus)) if hard else []
        order = generator.permutation(len(corpus))
        unit.mkdir(parents=True, exist_ok=True)
        files.write_jsonl(unit / "corpus.jsonl", [{"text": corpus[i].prompt + solution(corpus[i])} for i in order])
        files.write_json(unit / "problems.json", {"train": [p.to_json() for p in train], "test": [p.to_json() for p in test]})
        task_tokenizer().save(unit / "tokenizer.json")
        recipe = from_dict(Recipe, {
            "sources": {plan.CURRICULUM_SOURCE: {"reader": "jsonl", "paths": [str((unit / "corpus.jsonl").resolve())],
                                                 "args": {"text_field": "text"}}},
            "tokenizer": {"path": str((unit / "tokenizer.json").resolve())},
            "toxicity": {"enabled": False},
        })
        prepare(recipe, unit / "data", workers=0, progress=progress)
        mark(unit, fp, curriculum=len(corpus), curriculum_hard=hard)
    problems = read_json(unit / "problems.json")
    return TaskData(tuple(Problem(**p) for p in problems["train"]), tuple(Problem(**p) for p in problems["test"]),
                    unit / "data", fp)


def _train(train_config, run_dir: Path, progress: bool) -> None:
    from jaxlm.loop import train

    result = train(train_config, run_dir, show_progress=progress)
    if result.stopped_by != "completed":
        raise RoundsInterrupted(f"{run_dir}: stopped by {result.stopped_by} at step {result.step}; rerun to continue")


def base_model(config: RoundsConfig, out: Path, seed: int, task: TaskData, progress: bool) -> ModelRef:
    unit = out / f"seed{seed}" / "base"
    train_config = plan.pretrain_config(config, seed, str(task.dataset))
    settings = {k: v for k, v in to_dict(train_config).items() if k != "data"}
    pipeline = {k: v for k, v in to_dict(train_config.data).items() if k != "dataset"}
    fp = fingerprint("base", STUDY_VERSION, task.fingerprint, settings, pipeline)
    if finished(unit, fp) is None:
        _train(train_config, unit, progress)
        mark(unit, fp)
    return ModelRef(unit, fp)


# ---------------------------------------------------------------------------------------
# Measuring a model: k samples per training prompt, greedy answers to the test prompts
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Evaluation:
    responses: list[list[str]]  # [train prompts][k]
    correct: np.ndarray  # [train prompts, k] bool (the true verifier)
    test_correct: np.ndarray  # [test prompts] bool
    summary: dict[str, Any]


def _max_new_tokens(config: RoundsConfig) -> int:
    return max_response_tokens(max(config.task.digits))


def evaluate(config: RoundsConfig, model: ModelRef, unit: Path, seed: int, round_index: int, task: TaskData,
             progress: bool) -> Evaluation:
    """Model ``round_index``'s samples of every training prompt and its test answers (once)."""
    fp = fingerprint("eval", STUDY_VERSION, model.fingerprint, to_dict(config.sampling), seed, round_index)
    if finished(unit, fp) is None:
        from jaxlm.checkpoint import load_model
        from jaxlm.evaluate.protocols import GenerationSettings, generate_continuations

        loaded = load_model(model.path)
        sampling = config.sampling
        seed_of = int(curation.rng(seed, round_index, "sampling").integers(2**31 - 1))
        settings = GenerationSettings(samples=sampling.k, max_new_tokens=_max_new_tokens(config),
                                      temperature=sampling.temperature, top_p=sampling.top_p,
                                      batch_size=sampling.batch_size, seed=seed_of)
        desc = f"{unit.parent.name}/{unit.name}" if progress else None
        responses = generate_continuations(loaded.config, loaded.params, loaded.tokenizer,
                                           [p.prompt for p in task.train], settings, progress=desc and f"{desc} samples")
        greedy = dataclasses.replace(settings, samples=1, temperature=0.0, top_p=1.0)
        answers = generate_continuations(loaded.config, loaded.params, loaded.tokenizer,
                                         [p.prompt for p in task.test], greedy, progress=desc and f"{desc} test")
        correct = np.array([[is_correct(p, r) for r in per] for p, per in zip(task.train, responses)])
        test_correct = np.array([is_correct(p, a[0]) for p, a in zip(task.test, answers)])
        unit.mkdir(parents=True, exist_ok=True)
        files.write_jsonl(unit / "samples.jsonl", [{"prompt": p.prompt, "responses": per, "correct": c.tolist()}
                                                   for p, per, c in zip(task.train, responses, correct)])
        files.write_jsonl(unit / "test.jsonl", [{"prompt": p.prompt, "response": a[0], "correct": bool(c)}
                                                for p, a, c in zip(task.test, answers, test_correct)])
        summary = {
            "test_accuracy": float(test_correct.mean()),
            "train_pass_rate": float(correct.mean()),
            "train_solved": float(correct.any(1).mean()),
            **curation.diversity(task.train, responses),
        }
        files.write_json(unit / "eval.json", summary)
        mark(unit, fp)
    rows = read_jsonl(unit / "samples.jsonl")
    tests = read_jsonl(unit / "test.jsonl")
    return Evaluation([r["responses"] for r in rows], np.array([r["correct"] for r in rows], bool),
                      np.array([t["correct"] for t in tests], bool), read_json(unit / "eval.json"))


def read_json(path: Path) -> Any:
    """A JSON file a finished unit wrote (``RoundsError`` naming it when it is damaged)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RoundsError(f"{path}: damaged or missing ({err}); remove its unit's .done.json to redo it") from None


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file a finished unit wrote (``RoundsError`` naming it when damaged)."""
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RoundsError(f"{path}: damaged or missing ({err}); remove its unit's .done.json to redo it") from None


# ---------------------------------------------------------------------------------------
# One round of one chain
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Curated:
    stats: curation.PromptStats
    rows: list[dict]  # the SFT rows
    summary: dict[str, Any]
    fingerprint: str


def curate(config: RoundsConfig, chain: Chain, seed: int, round_index: int, previous: Evaluation,
           previous_fp: str, stats: curation.PromptStats, task: TaskData, unit: Path,
           earlier_labels: list[dict]) -> Curated:
    """Round ``round_index``'s SFT rows from model ``round_index - 1``'s samples ``previous``."""
    fp = fingerprint("curate", STUDY_VERSION, previous_fp, chain.name, to_dict(chain.arm), chain.beta,
                     to_dict(config.filter), config.max_accepted_per_prompt, config.keep_labels, config.label_share,
                     seed, round_index)
    if finished(unit, fp) is None:
        accepted = curation.noisy_filter(previous.correct, config.filter, curation.rng(seed, round_index, "filter"))
        seen = stats.after(previous.correct, accepted)
        chosen = curation.choose_prompts(chain.arm, accepted.mean(1), seen, curation.rng(seed, round_index, "select"))
        labels = curation.weak_labels(chosen, task.train, chain.beta or 0.0, curation.rng(seed, round_index, "labels"))
        after = seen.labelled(labels)
        samples = curation.accepted_rows(accepted, config.max_accepted_per_prompt)
        label_rows = [{"prompt": task.train[l.prompt].prompt, "response": l.response, "kind": "label",
                       "prompt_index": l.prompt, "correct": l.correct, "round": round_index} for l in labels]
        pool = earlier_labels + label_rows if config.keep_labels else label_rows
        repeats = curation.label_repeats(len(samples), len(pool), config.label_share,
                                         curation.rng(seed, round_index, "mix"))
        rows = [{"prompt": task.train[i].prompt, "response": previous.responses[i][j], "kind": "sample",
                 "prompt_index": i, "correct": bool(previous.correct[i, j]), "round": round_index}
                for i, j in samples] + [pool[r] for r in repeats]
        solved = previous.correct.any(1)
        summary = {
            "accepted": int(accepted.sum()),
            "false_accepts": int((accepted & ~previous.correct).sum()),
            "false_rejects": int((~accepted & previous.correct).sum()),
            "accepted_rows": len(samples),
            "labels": len(labels),
            "correct_labels": sum(l.correct for l in labels),
            "labels_on_solved": sum(bool(solved[l.prompt]) for l in labels),
            "label_rows": len(repeats),
            "sft_rows": len(rows),
        }
        unit.mkdir(parents=True, exist_ok=True)
        files.write_json(unit / "stats.json", after.to_json())
        files.write_jsonl(unit / "labels.jsonl", label_rows)
        files.write_jsonl(unit / "sft.jsonl", rows)
        files.write_json(unit / "curation.json", summary)
        mark(unit, fp)
    stats = curation.PromptStats.from_json(read_json(unit / "stats.json"))
    return Curated(stats, read_jsonl(unit / "sft.jsonl"), read_json(unit / "curation.json"), fp)


def round_model(config: RoundsConfig, seed: int, start: ModelRef, curated: Curated, unit: Path,
                progress: bool) -> ModelRef:
    """Model t: SFT of ``start`` on the round's rows (``start`` itself when there are none)."""
    if not curated.rows:
        return start
    sft_file = unit.parent / "sft.jsonl"
    train_config = plan.sft_config(config, seed, str(start.path), str(sft_file))
    settings = {k: v for k, v in to_dict(train_config).items() if k not in ("init_from", "examples")}
    examples = {k: v for k, v in to_dict(train_config.examples).items() if k != "paths"}
    fp = fingerprint("sft", STUDY_VERSION, start.fingerprint, curated.fingerprint, settings, examples)
    if finished(unit, fp) is None:
        _train(train_config, unit, progress)
        mark(unit, fp)
    return ModelRef(unit, fp)


# ---------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------


def metrics_row(seed: int, chain: Chain, round_index: int, evaluation: Evaluation, eval_dir: str,
                curated: Curated | None) -> dict[str, Any]:
    row = {"seed": seed, "chain": chain.name, "arm": chain.arm.name, "select": chain.arm.select,
           "budget": chain.arm.budget, "beta": chain.beta, "round": round_index, "eval_dir": eval_dir,
           **evaluation.summary}
    if curated is not None:
        row.update(curated.summary)
        row["label_budget_on_solved"] = (curated.summary["labels_on_solved"] / curated.summary["labels"]
                                         if curated.summary["labels"] else None)
    return row


class RoundsStudy:
    def __init__(self, config: RoundsConfig, out: str | Path, *, progress: bool = True):
        self.config, self.out, self.progress = config, Path(out), progress

    def run(self, max_rounds: int | None = None) -> Path:
        """Run (or continue) the study; ``max_rounds`` stops every chain after that round (the
        rest is done by a later call). Returns the report's path."""
        from tqdm import tqdm

        from jaxlm.rounds.report import write_report

        if max_rounds is not None and (isinstance(max_rounds, bool) or max_rounds < 1):
            raise ConfigError(f"--rounds: expected a round number >= 1, got {max_rounds}")
        with DirectoryLock(self.out, "rounds study"):
            dump_yaml(self.config, self.out / "rounds.yaml")
            task = build_task(self.config, self.out, self.progress)
            rows: list[dict] = []
            last = self.config.rounds if max_rounds is None else min(max_rounds, self.config.rounds)
            chains = self.config.chains()
            bar = tqdm(total=len(self.config.seeds) * len(chains) * last, desc="rounds", unit="round",
                       disable=not self.progress)
            try:
                for seed in self.config.seeds:
                    base = base_model(self.config, self.out, seed, task, self.progress)
                    base_eval = evaluate(self.config, base, self.out / f"seed{seed}" / "base-eval", seed, 0, task,
                                         self.progress)
                    for chain in chains:
                        rows += self.run_chain(chain, seed, task, base, base_eval, last, bar)
                        files.write_jsonl(self.out / "metrics.jsonl", rows)
            finally:
                bar.close()
            return write_report(self.config, rows, self.out)

    def run_chain(self, chain: Chain, seed: int, task: TaskData, base: ModelRef, base_eval: Evaluation,
                  last: int, bar) -> list[dict]:
        rows = [metrics_row(seed, chain, 0, base_eval, f"seed{seed}/base-eval", None)]
        model, evaluation = base, base_eval
        stats = curation.PromptStats.empty(len(task.train))
        labels: list[dict] = []
        for t in range(1, last + 1):
            unit = self.out / f"seed{seed}" / chain.name / f"round{t}"
            curated = curate(self.config, chain, seed, t, evaluation, model.fingerprint, stats, task, unit, labels)
            labels += read_jsonl(unit / "labels.jsonl")
            start = base if self.config.init == "base" else model
            model = round_model(self.config, seed, start, curated, unit / "train", self.progress)
            evaluation = evaluate(self.config, model, unit / "eval", seed, t, task, self.progress)
            stats = curated.stats
            rows.append(metrics_row(seed, chain, t, evaluation, str((unit / "eval").relative_to(self.out)), curated))
            bar.set_postfix_str(f"seed {seed} {chain.name} round {t}: test {evaluation.summary['test_accuracy']:.3f}")
            bar.update()
        return rows
