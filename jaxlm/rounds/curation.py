"""One round's curation: the noisy filter, the weak labeler, the per-prompt statistics across
rounds, which prompts get labels, and the round's SFT rows.

Randomness is drawn per (study seed, round, purpose) with ``rng``, never per arm: arms of one
seed that see the same samples see the same filter decisions, and a prompt labelled in two arms
at one beta gets the same label in both (common random numbers make the arms' comparison
paired). Every function here is pure given its generator.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import numpy as np

from jaxlm.rounds.config import ArmConfig, FilterConfig
from jaxlm.rounds.task import Problem, corrupt, final_answer, solution


def rng(seed: int, round_index: int, purpose: str) -> np.random.Generator:
    """The generator of one purpose (``filter``, ``select``, ``labels``, ...) in one round."""
    digest = hashlib.sha256(f"{seed}/{round_index}/{purpose}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def noisy_filter(correct: np.ndarray, config: FilterConfig, generator: np.random.Generator) -> np.ndarray:
    """Accept flags for verifier results ``correct`` (any shape): a wrong response passes with
    probability ``false_accept``, a correct one fails with probability ``false_reject``."""
    draws = generator.random(correct.shape)
    return np.where(correct, draws >= config.false_reject, draws < config.false_accept)


@dataclasses.dataclass(frozen=True)
class Label:
    prompt: int  # index into the training prompts
    response: str
    correct: bool


def weak_labels(chosen: Sequence[int], problems: Sequence[Problem], beta: float,
                generator: np.random.Generator) -> list[Label]:
    """A label per chosen prompt: its worked solution with probability ``beta``, else a
    corrupted response (``task.corrupt``: a wrong final answer, or another problem's solution).
    One draw per training prompt decides it, whichever prompts are chosen."""
    coins = generator.random(len(problems))
    corruption_seeds = generator.integers(0, 2**63 - 1, size=len(problems))
    labels = []
    for i in chosen:
        if coins[i] < beta:
            labels.append(Label(int(i), solution(problems[i]), True))
        else:
            response = corrupt(problems[i], np.random.default_rng(int(corruption_seeds[i])), problems)
            labels.append(Label(int(i), response, False))
    return labels


@dataclasses.dataclass(frozen=True)
class PromptStats:
    """Per training prompt, summed over the rounds so far: samples drawn, correct ones (the true
    verifier), accepted ones (the filter), ``failures`` (the rejected fraction of each round's
    samples, summed), labels received and correct labels received."""

    rounds: int
    samples: np.ndarray
    correct: np.ndarray
    accepted: np.ndarray
    failures: np.ndarray
    labels: np.ndarray
    correct_labels: np.ndarray

    FIELDS = ("samples", "correct", "accepted", "failures", "labels", "correct_labels")

    @classmethod
    def empty(cls, prompts: int) -> "PromptStats":
        zeros = np.zeros(prompts, np.int64)
        return cls(0, zeros, zeros, zeros, np.zeros(prompts), zeros, zeros)

    def after(self, correct: np.ndarray, accepted: np.ndarray) -> "PromptStats":
        """The statistics once a round's [prompts, k] verifier and filter results are added."""
        k = correct.shape[1]
        return dataclasses.replace(
            self, rounds=self.rounds + 1, samples=self.samples + k, correct=self.correct + correct.sum(1),
            accepted=self.accepted + accepted.sum(1), failures=self.failures + 1.0 - accepted.mean(1),
        )

    def labelled(self, labels: Sequence[Label]) -> "PromptStats":
        """The statistics once a round's labels are added."""
        n = len(self.samples)
        got = np.bincount([l.prompt for l in labels], minlength=n).astype(np.int64)
        good = np.bincount([l.prompt for l in labels if l.correct], minlength=n).astype(np.int64)
        return dataclasses.replace(self, labels=self.labels + got, correct_labels=self.correct_labels + good)

    def to_json(self) -> dict:
        return {"rounds": self.rounds, **{name: getattr(self, name).tolist() for name in self.FIELDS}}

    @classmethod
    def from_json(cls, data: dict) -> "PromptStats":
        return cls(int(data["rounds"]), *(np.asarray(data[name], np.float64 if name == "failures" else np.int64)
                                          for name in cls.FIELDS))


def choose_prompts(arm: ArmConfig, accepted_fraction: np.ndarray, stats: PromptStats,
                   generator: np.random.Generator) -> np.ndarray:
    """The prompts to label this round (at most ``arm.budget``; indices, in choice order).

    ``hardest``: the lowest ``accepted_fraction`` (this round's samples, as the filter saw
    them) first, ties broken at random; ``random``: uniform without replacement; ``boost``:
    without replacement with weights ``exp(boost_rate * stats.failures)`` (Gumbel top-k;
    ``stats`` include this round's samples)."""
    n = len(accepted_fraction)
    budget = min(arm.budget, n)
    noise = generator.random(n)
    if arm.select == "none" or budget == 0:
        return np.zeros(0, np.int64)
    if arm.select == "random":
        order = np.argsort(noise, kind="stable")
    elif arm.select == "hardest":
        order = np.lexsort((noise, accepted_fraction))
    else:
        gumbel = -np.log(-np.log(np.clip(noise, 1e-12, 1 - 1e-12)))
        order = np.argsort(-(arm.boost_rate * stats.failures + gumbel), kind="stable")
    return order[:budget].astype(np.int64)


def accepted_rows(accepted: np.ndarray, cap: int | None) -> list[tuple[int, int]]:
    """(prompt, sample) of the accepted samples, prompt by prompt, at most ``cap`` per prompt
    (the first ones drawn)."""
    rows = []
    for i, flags in enumerate(accepted):
        picked = np.flatnonzero(flags)
        rows += [(i, int(j)) for j in (picked if cap is None else picked[:cap])]
    return rows


def label_repeats(accepted: int, labels: int, share: float | None, generator: np.random.Generator) -> list[int]:
    """Which labels fill the label rows (indices into the labels, with repeats): every label once
    when ``share`` is None or there is no accepted row; otherwise ``round(share * accepted /
    (1 - share))`` rows, each label ``floor`` times and the remainder drawn without replacement."""
    if labels == 0:
        return []
    if share is None or accepted == 0:
        return list(range(labels))
    wanted = int(round(share * accepted / (1.0 - share)))
    full, rest = divmod(wanted, labels)
    extra = sorted(generator.choice(labels, size=rest, replace=False).tolist()) if rest else []
    return [i for i in range(labels) for _ in range(full)] + extra


def diversity(problems: Sequence[Problem], responses: Sequence[Sequence[str]], n: int = 4) -> dict[str, float]:
    """``distinct_answers``: the mean, over prompts, of distinct final answers among its k
    samples / k; ``distinct_ngrams``: distinct character ``n``-grams of the responses / all of
    them (collapse drives both down; a model that solves everything also lowers the first)."""
    answers = [len({final_answer(r) for r in per}) / len(per) for per in responses]
    grams = [r[i:i + n] for per in responses for r in per for i in range(max(0, len(r) - n + 1))]
    return {
        "distinct_answers": float(np.mean(answers)) if answers else 0.0,
        f"distinct_{n}grams": len(set(grams)) / len(grams) if grams else 0.0,
    }
