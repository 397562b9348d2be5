"""The verifiable task of the rounds study: multi-digit addition with a worked solution.

A problem ``a+b`` is the prompt ``"347+598="``; its solution works digit by digit from the
right, each step ``x+y+carry=sum`` with the sum as two digits, then ``>`` and the answer::

    347+598=7+8+0=15;4+9+1=14;3+5+1=09;>945

(the shorter operand counts as zero-padded). The verifier reads only the final answer: a
response is correct exactly when the text after its last ``>`` is ``str(a + b)`` (the
steps are the model's own business, as GSM8K graders read only the final number). The
vocabulary is one token per character of ``ALPHABET`` plus end-of-document, padding and
unknown tokens (``task_tokenizer``), so a digit is always one token.

Problems are drawn per digit count (both operands have exactly ``n`` digits, ``n`` from the
given counts, uniformly), deduplicated, and the train and test prompt sets are disjoint; the
pretraining curriculum (``curriculum``) never holds a train or test problem.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

from jaxlm.config import ConfigError

ALPHABET = "0123456789+=;>"
EOS_TOKEN, PAD_TOKEN, UNK_TOKEN = "<|endoftext|>", "<|padding|>", "<|unk|>"
ANSWER_MARK = ">"


@dataclasses.dataclass(frozen=True, order=True)
class Problem:
    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    @property
    def digits(self) -> int:
        return max(len(str(self.a)), len(str(self.b)))

    def to_json(self) -> dict:
        return {"a": self.a, "b": self.b}


def solution(problem: Problem) -> str:
    """The worked solution (the response the model should give; no end-of-document token)."""
    width = problem.digits
    xs, ys = str(problem.a).zfill(width)[::-1], str(problem.b).zfill(width)[::-1]
    carry, steps = 0, []
    for x, y in zip(xs, ys):
        total = int(x) + int(y) + carry
        steps.append(f"{x}+{y}+{carry}={total:02d};")
        carry = total // 10
    return "".join(steps) + ANSWER_MARK + problem.answer


def final_answer(response: str) -> str | None:
    """The text after the response's last answer mark (None: no mark)."""
    if ANSWER_MARK not in response:
        return None
    return response.rsplit(ANSWER_MARK, 1)[1].strip()


def is_correct(problem: Problem, response: str) -> bool:
    """The exact-match verifier: the response's final answer is ``a + b``."""
    return final_answer(response) == problem.answer


def parse_prompt(prompt: str) -> Problem:
    """The problem of a prompt ``"a+b="`` (``ConfigError`` naming the text otherwise)."""
    body = prompt[:-1] if prompt.endswith("=") else None
    parts = body.split("+") if body is not None else []
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ConfigError(f"prompt {prompt!r}: expected 'a+b=' with decimal a and b")
    return Problem(int(parts[0]), int(parts[1]))


def sample_problems(rng: np.random.Generator, count: int, digits: Sequence[int],
                    exclude: Iterable[Problem] = ()) -> list[Problem]:
    """``count`` distinct problems, each with both operands of ``n`` digits (``n`` uniform over
    ``digits``), none of them in ``exclude``; ``ConfigError`` when the space is too small."""
    excluded = set(exclude)
    space = sum(9 * 10 ** (n - 1) for n in set(digits)) ** 2  # pairs, over-counting mixed sizes is fine
    if count > (space - len(excluded)) // 2:
        raise ConfigError(f"digits {list(digits)}: too few distinct problems for {count} prompts")
    chosen: dict[Problem, None] = {}
    while len(chosen) < count:
        n = int(rng.choice(np.asarray(digits)))
        low, high = 10 ** (n - 1) if n > 1 else 0, 10 ** n
        problem = Problem(int(rng.integers(low, high)), int(rng.integers(low, high)))
        if problem not in excluded and problem not in chosen:
            chosen[problem] = None
    return list(chosen)


def corrupt(problem: Problem, rng: np.random.Generator, others: Sequence[Problem]) -> str:
    """A wrong response to ``problem``: half the time its worked solution with a wrong final
    answer (one digit changed), otherwise the solution of another problem of ``others``."""
    if others and rng.random() < 0.5:
        for _ in range(64):  # another problem with another answer (almost always the first draw)
            other = others[int(rng.integers(len(others)))]
            if other.answer != problem.answer:
                return solution(other)
    digits = list(problem.answer)
    position = int(rng.integers(len(digits)))
    choices = [d for d in "0123456789" if d != digits[position] and not (position == 0 and d == "0" and len(digits) > 1)]
    digits[position] = choices[int(rng.integers(len(choices)))]
    return solution(problem).rsplit(ANSWER_MARK, 1)[0] + ANSWER_MARK + "".join(digits)


def task_tokenizer():
    """The character-level ``jaxlm.tokenizer.Tokenizer`` of the task (ids 0, 1, 2: end of
    document, padding, unknown; then one id per character of ``ALPHABET``)."""
    import tokenizers
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    from jaxlm.tokenizer import Tokenizer

    vocab = {token: i for i, token in enumerate((EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, *ALPHABET))}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (EOS_TOKEN, PAD_TOKEN, UNK_TOKEN)])
    return Tokenizer(backend, eos_id=vocab[EOS_TOKEN], pad_id=vocab[PAD_TOKEN])


def max_response_tokens(max_digits: int) -> int:
    """Tokens of the longest solution of ``max_digits``-digit operands (its end token included)."""
    return 9 * max_digits + 1 + (max_digits + 1) + 1
