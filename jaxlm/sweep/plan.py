"""From a ``SweepConfig`` to the list of pretraining runs and evaluation methods (pure).

Two designs per toxic share ``s`` (``base`` = the template's ``steps``):

* ``added`` (the reference study's): the clean token count is fixed and toxic tokens come
  on top: ``round(base / (1 - s))`` steps with shares ``1 - s`` / ``s``, so every model
  sees the same ``base`` batches' worth of clean tokens (to within one row).
* ``fixed_total``: ``base`` steps for every share; toxic tokens replace clean ones.

At ``s = 0`` the designs coincide and the model is trained once. Run names are stable
(``clean-seed0``, ``added-tox10-seed1``, ``meda-tox10-seed0``), so a resumed sweep finds
its runs again.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from jaxlm.config import from_dict
from jaxlm.sweep.config import SweepConfig, TaggedPretraining


@dataclasses.dataclass(frozen=True)
class RunSpec:
    name: str
    design: str  # "added" | "fixed_total" | "clean"
    share: float
    seed: int
    steps: int
    tagged: TaggedPretraining | None = None

    @property
    def percent(self) -> int:
        return round(self.share * 100)


@dataclasses.dataclass(frozen=True)
class Method:
    """One way of generating from a model: a prompt prefix and/or an ITI strength."""

    name: str  # "base", "prompting", "iti-weak", ..., "tag-conditioned"
    prefix: str = ""
    alpha: float = 0.0  # ITI strength (0: none)


def design_steps(design: str, share: float, base_steps: int) -> int:
    return round(base_steps / (1.0 - share)) if design == "added" else base_steps


def plan_runs(config: SweepConfig) -> list[RunSpec]:
    """The runs in the order a sweep trains them: the clean model and the first design's
    shares for every seed, then the tagged baselines, then the other designs, so an early
    stop leaves the main comparison complete across seeds."""
    base = config.train.get("steps", 1000)
    shares = [s for s in config.shares if s > 0]

    def design_runs(design: str, seed: int) -> list[RunSpec]:
        return [RunSpec(f"{design}-tox{round(s * 100):02d}-seed{seed}", design, s, seed, design_steps(design, s, base))
                for s in shares]

    runs: list[RunSpec] = []
    for seed in config.seeds:
        runs += [RunSpec(f"clean-seed{seed}", "clean", 0.0, seed, base), *design_runs(config.designs[0], seed)]
    for seed in config.seeds:
        for tag in config.tagged:
            steps = design_steps(tag.design, tag.share, base)
            runs.append(RunSpec(f"{tag.kind}-tox{round(tag.share * 100):02d}-seed{seed}", tag.design, tag.share, seed, steps, tag))
    for design in config.designs[1:]:
        for seed in config.seeds:
            runs += design_runs(design, seed)
    return runs


def train_config_dict(config: SweepConfig, run: RunSpec, dataset: str) -> dict[str, Any]:
    """The run's ``TrainConfig`` as a dict: the template with data, mixture, steps and seed filled in."""
    data = copy.deepcopy(config.train)
    data["steps"] = run.steps
    data["seed"] = run.seed
    pipeline = data.setdefault("data", {})
    pipeline["dataset"] = dataset
    pipeline["sources"] = {config.clean: 1.0 - run.share, config.toxic: run.share}
    pipeline["seed"] = run.seed
    if run.tagged is not None:
        pipeline["tags"] = {"kind": run.tagged.kind}
        if run.tagged.every is not None:
            pipeline["tags"]["every"] = run.tagged.every
    return data


def train_config(config: SweepConfig, run: RunSpec, dataset: str):
    from jaxlm.loop import TrainConfig

    return from_dict(TrainConfig, train_config_dict(config, run, dataset), where=f"train ({run.name})")


# What stands in for the prepared dataset's path when the plan is checked before preparing it.
UNPREPARED_DATASET = "<prepared by the sweep>"


def check_plan(config: SweepConfig) -> None:
    """Raise ``ConfigError`` for any setting that a stage would refuse later: every run's
    training config must build, and the ITI and generation settings must fit its model
    (``iti.k`` heads at most, room for a prompt next to ``eval.max_new_tokens``), so a bad
    value fails before hours of training rather than after. Text lengths (``probe.max_len``,
    ``eval.ce_len``) are capped at the model's context by the stages themselves."""
    from jaxlm.config import ConfigError

    for run in plan_runs(config):
        model = train_config(config, run, UNPREPARED_DATASET).model
        where = f"({run.name}: model with {model.n_layers} layers x {model.n_heads} heads, context {model.max_seq_len})"
        heads = model.n_layers * model.n_heads
        if config.iti.k > heads:
            raise ConfigError(f"iti.k: {config.iti.k} heads asked for, but the model has {heads} {where}")
        if config.eval.max_new_tokens >= model.max_seq_len:
            raise ConfigError(f"eval.max_new_tokens: {config.eval.max_new_tokens} leaves no room for a prompt {where}")


def condition_prefix(tagged: TaggedPretraining) -> str:
    """The inference-time prefix that asks a tagged model for non-toxic text."""
    if tagged.condition is not None:
        return tagged.condition
    from jaxlm.data.pipeline import TagConfig

    return TagConfig(kind=tagged.kind).resolved_texts()[0]


def methods_for(config: SweepConfig, run: RunSpec, alphas: dict[str, float] | None = None) -> list[Method]:
    """The generation methods evaluated on ``run``; ``alphas``: the run's ITI strengths by
    name (calibrated ones; default the config's fixed ``iti.alphas``)."""
    from jaxlm.evaluate.protocols import DETOX_INSTRUCTION

    if run.tagged is not None:
        return [Method("base"), Method("tag-conditioned", prefix=condition_prefix(run.tagged))]
    methods = [Method("base")]
    if config.prompting:
        methods.append(Method("prompting", prefix=DETOX_INSTRUCTION))
    if alphas is None:
        alphas = config.iti.alphas if config.iti.kl_targets is None else {name: 0.0 for name in config.iti.levels}
    methods += [Method(f"iti-{name}", alpha=float(alphas[name])) for name in config.iti.levels]
    return methods
