"""The rounds study's config (``jaxlm rounds CONFIG``): task, pretraining, curation arms, rounds."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from jaxlm.config import ConfigError, load

Selection = Literal["none", "random", "hardest", "boost"]


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The addition task (``jaxlm.rounds.task``): ``train_prompts`` and ``test_prompts`` distinct
    problems at ``digits`` digits, and a pretraining curriculum of ``curriculum_problems``
    worked problems, a ``hard_share`` of them at ``digits`` (never a train or test problem),
    the rest at ``curriculum_digits``. One ``seed`` draws them all (the same for every seed of
    the study: seeds vary the models, not the task)."""

    digits: tuple[int, ...] = (4, 5)
    train_prompts: int = 512
    test_prompts: int = 256
    curriculum_digits: tuple[int, ...] = (1, 2, 3)
    curriculum_problems: int = 30_000
    hard_share: float = 0.03
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("digits", "curriculum_digits"):
            value = getattr(self, name)
            if not value or any(not isinstance(n, int) or not 1 <= n <= 12 for n in value):
                raise ConfigError(f"task.{name}: expected a non-empty list of digit counts in 1..12, got {list(value)}")
        for name in ("train_prompts", "test_prompts", "curriculum_problems"):
            if getattr(self, name) < 1:
                raise ConfigError(f"task.{name}: expected a positive integer, got {getattr(self, name)}")
        if not 0.0 <= self.hard_share <= 1.0:
            raise ConfigError(f"task.hard_share: expected a number in [0, 1], got {self.hard_share}")

    @property
    def max_digits(self) -> int:
        return max(*self.digits, *self.curriculum_digits)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """``k`` responses per training prompt at ``temperature`` / ``top_p`` (the round's samples);
    the test set is answered greedily (pass@1). ``batch_size`` rows per generation batch."""

    k: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.k < 1 or self.batch_size < 1:
            raise ConfigError(f"sampling.k / batch_size: expected positive integers, got {self.k} / {self.batch_size}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"sampling.temperature: expected a positive number, got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """The noisy filter around the verifier: a wrong response is accepted with probability
    ``false_accept``, a correct one rejected with probability ``false_reject``."""

    false_accept: float = 0.0
    false_reject: float = 0.0

    def __post_init__(self) -> None:
        for name in ("false_accept", "false_reject"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"filter.{name}: expected a probability in [0, 1], got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class ArmConfig:
    """A curation arm: ``budget`` labels per round, given to prompts chosen by ``select``:
    ``none`` (filter only; budget 0), ``random``, ``hardest`` (lowest accepted fraction of this
    round's samples first, ties at random) or ``boost`` (drawn without replacement with
    weights ``exp(boost_rate * failures)``, ``failures`` the summed rejected fractions of every
    round so far)."""

    name: str
    select: Selection = "none"
    budget: int = 0
    boost_rate: float = 2.0

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\ ") or self.name.startswith("."):
            raise ConfigError(f"arms[{self.name!r}].name: expected a directory name without '/', '\\' or spaces")
        if (self.select == "none") != (self.budget == 0):
            raise ConfigError(f"arms[{self.name}]: select 'none' goes with budget 0 and only with it "
                              f"(got select {self.select!r}, budget {self.budget})")
        if self.budget < 0:
            raise ConfigError(f"arms[{self.name}].budget: expected a non-negative integer, got {self.budget}")
        if self.boost_rate <= 0:
            raise ConfigError(f"arms[{self.name}].boost_rate: expected a positive number, got {self.boost_rate}")

    @property
    def labels(self) -> bool:
        return self.budget > 0


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Each round's SFT run (``jaxlm.loop.train``, objective ``sft``): ``steps`` of
    ``batch_size`` rows of ``seq_len`` tokens; ``optimizer`` a ``jaxlm.optim.OptimizerConfig``
    section."""

    steps: int = 100
    batch_size: int = 32
    seq_len: int = 128
    optimizer: dict[str, Any] = dataclasses.field(default_factory=lambda: {"lr": 1e-3, "warmup_steps": 10})

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 1:
            raise ConfigError("sft.steps / batch_size / seq_len: expected positive integers")


@dataclasses.dataclass(frozen=True)
class RoundsConfig:
    """The study: for every seed, pretrain a base model on the task's curriculum (``pretrain``:
    a ``TrainConfig`` template without ``data.dataset`` / ``data.sources``, which the study
    sets), then run ``rounds`` rounds of sample -> filter -> label -> SFT for every arm (an arm
    with labels once per ``betas`` value, the labeler's correct fraction).

    Each round's SFT data: the accepted samples (at most ``max_accepted_per_prompt`` per
    prompt, None: all) plus the round's labels (with ``keep_labels`` every label received so
    far), the labels repeated or subsampled to ``label_share`` of the rows when it is set
    (None: as they come). ``init``: each round trains from the ``base`` model or from the
    ``previous`` round's model."""

    name: str
    pretrain: dict[str, Any]
    task: TaskConfig = TaskConfig()
    sampling: SamplingConfig = SamplingConfig()
    filter: FilterConfig = FilterConfig()
    arms: tuple[ArmConfig, ...] = (
        ArmConfig("filter"), ArmConfig("random", "random", 32), ArmConfig("hardest", "hardest", 32),
        ArmConfig("boost", "boost", 32),
    )
    betas: tuple[float, ...] = (1.0, 0.5, 0.2)
    seeds: tuple[int, ...] = (0, 1, 2)
    rounds: int = 6
    init: Literal["base", "previous"] = "previous"
    max_accepted_per_prompt: int | None = None
    keep_labels: bool = False
    label_share: float | None = None
    sft: SFTConfig = SFTConfig()

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds: expected a positive integer, got {self.rounds}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: expected distinct seeds, got {list(self.seeds)}")
        names = [arm.name for arm in self.arms]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"arms: expected distinct arm names, got {names}")
        if any(arm.labels for arm in self.arms) and not self.betas:
            raise ConfigError("betas: arms with labels need at least one labeler accuracy")
        if any(not 0.0 <= b <= 1.0 for b in self.betas) or len(set(self.betas)) != len(self.betas):
            raise ConfigError(f"betas: expected distinct probabilities in [0, 1], got {list(self.betas)}")
        if self.max_accepted_per_prompt is not None and self.max_accepted_per_prompt < 1:
            raise ConfigError(f"max_accepted_per_prompt: expected a positive integer or null, got {self.max_accepted_per_prompt}")
        if self.label_share is not None and not 0.0 < self.label_share < 1.0:
            raise ConfigError(f"label_share: expected a number in (0, 1) or null, got {self.label_share}")
        pipeline = self.pretrain.get("data", {})
        for key in ("dataset", "sources"):
            if key in pipeline:
                raise ConfigError(f"pretrain.data.{key}: set by the study (the task's curriculum); remove it")
        for key in ("objective", "init_from", "examples"):
            if key in self.pretrain:
                raise ConfigError(f"pretrain.{key}: the base model is pretrained from scratch on the curriculum; remove it")

    def chains(self) -> list["Chain"]:
        """Every arm x labeler accuracy, in config order (an arm without labels once)."""
        out = []
        for arm in self.arms:
            if arm.labels:
                out += [Chain(arm, beta) for beta in self.betas]
            else:
                out.append(Chain(arm, None))
        return out


@dataclasses.dataclass(frozen=True)
class Chain:
    """One arm at one labeler accuracy (``beta`` None: the arm gets no labels)."""

    arm: ArmConfig
    beta: float | None

    @property
    def name(self) -> str:
        return self.arm.name if self.beta is None else f"{self.arm.name}-beta{self.beta:g}"


def load_rounds_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> RoundsConfig:
    """The study's config, with its pretraining and SFT runs' configs checked before any work."""
    from jaxlm.rounds.plan import check_plan

    config = load(RoundsConfig, path, overrides)
    try:
        check_plan(config)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path else str(err)) from None
    return config
