"""Orbax checkpoints of a run, and loading a trained model for inference.

A run directory holds::

    config.yaml        the resolved run config (a run refuses to start on a different one)
    tokenizer.json     the tokenizer the data was prepared with
    metrics.jsonl      one JSON object per logged step
    checkpoints/<step>/{state,data,meta}   orbax items: TrainState, data-iterator state (JSON),
                                           metadata (JSON: step, config, package versions)

``load_model(path)`` accepts a run directory, one of its checkpoint step directories, or an
HF OLMo checkpoint directory (config.json + safetensors).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxlm.config import ConfigError, ModelConfig, from_dict, read_yaml

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100  # save every N steps (and at the end, and on SIGTERM/SIGINT)
    keep_last: int = 3  # keep the newest N checkpoints ...
    keep_every: int | None = None  # ... plus every checkpoint whose step is a multiple of this
    async_save: bool = True

    def __post_init__(self) -> None:
        if self.every <= 0:
            raise ConfigError(f"checkpoint.every: expected a positive integer, got {self.every}")
        if self.keep_last <= 0:
            raise ConfigError(f"checkpoint.keep_last: expected a positive integer, got {self.keep_last}")
        if self.keep_every is not None and self.keep_every <= 0:
            raise ConfigError(f"checkpoint.keep_every: expected a positive integer or null, got {self.keep_every}")


def open_manager(run_dir: str | Path, config: CheckpointConfig = CheckpointConfig()) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_last,
        keep_period=config.keep_every,
        enable_async_checkpointing=config.async_save,
        create=True,
    )
    directory = Path(run_dir).absolute() / CHECKPOINT_SUBDIR
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "data", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict, meta: dict, force: bool = False) -> bool:
    """Save ``state`` (a pytree of arrays), the data-iterator state and metadata at ``step``."""
    return manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)
        ),
        force=force,
    )


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    state: Any
    data_state: dict
    meta: dict


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> Restored | None:
    """Restore the newest readable checkpoint; a corrupt or partial newest one is skipped with a warning."""
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as err:  # orbax raises assorted errors on truncated or missing files
            kept = _set_aside(Path(manager.directory), step)
            message = (
                f"checkpoint at step {step} in {manager.directory} is unreadable ({type(err).__name__}: {err}); "
                f"moved to {kept.name}, trying an older one"
            )
            warnings.warn(message, stacklevel=2)
            log.warning(message)
            manager.reload()
            continue
        return Restored(step=step, state=restored["state"], data_state=restored["data"], meta=restored["meta"])
    return None


def _set_aside(directory: Path, step: int) -> Path:
    """Rename an unreadable step directory out of the manager's view (kept for inspection)."""
    target = directory / f"corrupt-{step}"
    suffix = 0
    while target.exists():
        suffix += 1
        target = directory / f"corrupt-{step}.{suffix}"
    (directory / str(step)).rename(target)
    return target


# ---------------------------------------------------------------------------------------
# Loading a trained model
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    params: Any
    tokenizer: Any  # jaxlm.tokenizer.Tokenizer or None when the directory has none
    step: int | None
    source: Path


def _find_run_dir(path: Path) -> tuple[Path, int | None]:
    """(run directory, requested step or None) for a run dir or a checkpoints/<step> dir."""
    if (path / CONFIG_FILE).exists() and (path / CHECKPOINT_SUBDIR).is_dir():
        return path, None
    if path.parent.name == CHECKPOINT_SUBDIR and path.name.isdigit():
        return path.parent.parent, int(path.name)
    raise FileNotFoundError(
        f"{path}: not a jaxlm run directory (expected {CONFIG_FILE} and {CHECKPOINT_SUBDIR}/), "
        "a checkpoint step directory, or an HF checkpoint (config.json + *.safetensors)"
    )


def _load_tokenizer(path: Path):
    if not path.exists():
        return None
    from jaxlm.tokenizer import Tokenizer

    return Tokenizer.load(path)


def load_model(path: str | Path, step: int | None = None) -> LoadedModel:
    """Model config, float32 parameters (on the default device) and tokenizer from ``path``."""
    path = Path(path)
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        from jaxlm.hf import load_olmo

        config, params = load_olmo(path)
        return LoadedModel(config, params, _load_tokenizer(path / TOKENIZER_FILE), None, path)

    run_dir, step_from_path = _find_run_dir(path)
    step = step if step is not None else step_from_path
    run_config = read_yaml(run_dir / CONFIG_FILE)
    if "model" not in run_config:
        raise ConfigError(f"{run_dir / CONFIG_FILE}: no 'model' section")
    config = from_dict(ModelConfig, run_config["model"], "model")

    from jaxlm import model as model_lib

    manager = ocp.CheckpointManager(
        (run_dir / CHECKPOINT_SUBDIR).absolute(),
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_names=("state", "data", "meta"),
    )
    steps = sorted(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"{run_dir / CHECKPOINT_SUBDIR}: no checkpoints")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"{run_dir / CHECKPOINT_SUBDIR}: no checkpoint for step {step}; have {steps}")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract_params = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), model_lib.param_shapes(config)
    )
    # Restore only the parameters: a partial restore of the "state" item.
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item={"params": abstract_params},
                restore_args={"params": ocp.checkpoint_utils.construct_restore_args(abstract_params)},
                partial_restore=True,
            )
        ),
    )
    manager.close()
    params = restored["state"]["params"]
    return LoadedModel(config, params, _load_tokenizer(run_dir / TOKENIZER_FILE), step, run_dir)
