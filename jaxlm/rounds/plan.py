"""The rounds study's training configs: the base model's pretraining and each round's SFT."""

from __future__ import annotations

import copy
from jaxlm.config import ConfigError, from_dict, to_dict
from jaxlm.rounds.config import RoundsConfig
from jaxlm.rounds.task import max_response_tokens

CURRICULUM_SOURCE = "curriculum"
UNBUILT = "<built by the study>"  # stands in for paths when configs are checked before any work


def pretrain_config(config: RoundsConfig, seed: int, dataset: str):
    """The base model's ``TrainConfig``: the ``pretrain`` template on the curriculum, seeded."""
    from jaxlm.loop import TrainConfig

    data = copy.deepcopy(config.pretrain)
    data["seed"] = seed
    pipeline = data.setdefault("data", {})
    pipeline.update(dataset=dataset, sources={CURRICULUM_SOURCE: 1.0}, seed=seed)
    return from_dict(TrainConfig, data, where=f"pretrain (seed {seed})")


def sft_config(config: RoundsConfig, seed: int, init_from: str, examples: str):
    """One round's SFT ``TrainConfig``: the base model's architecture, ``init_from`` the model the
    round starts from, trained on ``examples`` (complete solutions: the end token is learnt)."""
    from jaxlm.loop import TrainConfig

    template = pretrain_config(config, seed, UNBUILT)
    sft = config.sft
    data = {
        "model": to_dict(template.model),
        "objective": "sft",
        "init_from": init_from,
        "examples": {"paths": [examples], "format": "sft", "seq_len": sft.seq_len, "batch_size": sft.batch_size,
                     "seed": seed, "add_eos": True},
        "optimizer": copy.deepcopy(sft.optimizer),
        "steps": sft.steps,
        "seed": seed,
        "log_every": max(1, min(25, sft.steps)),
        "checkpoint": {"every": sft.steps},
        "mesh": to_dict(template.mesh),
        "tensorboard": template.tensorboard,
    }
    return from_dict(TrainConfig, data, where=f"sft (seed {seed})")


def check_plan(config: RoundsConfig) -> None:
    """Every training config of the study builds, and the task fits the model's context."""
    base = pretrain_config(config, config.seeds[0], UNBUILT)
    sft_config(config, config.seeds[0], UNBUILT, UNBUILT)
    longest = len(f"{'9' * config.task.max_digits}+{'9' * config.task.max_digits}=") + max_response_tokens(config.task.max_digits)
    for where, limit in (("model.max_seq_len", base.model.max_seq_len), ("sft.seq_len", config.sft.seq_len),
                         ("pretrain.data.seq_len", base.data.seq_len)):
        if longest > limit:
            raise ConfigError(f"{where}: {limit} tokens do not hold a {config.task.max_digits}-digit problem and its "
                              f"solution ({longest} tokens)")
    from jaxlm.rounds.task import task_tokenizer

    if base.model.vocab_size < task_tokenizer().vocab_size:
        raise ConfigError(f"pretrain.model.vocab_size: {base.model.vocab_size} is below the task's vocabulary "
                          f"({task_tokenizer().vocab_size} tokens)")
