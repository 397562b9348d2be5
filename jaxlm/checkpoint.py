"""Orbax checkpoints of a run, and loading a trained model for inference.

A run directory holds::

    config.yaml        the resolved run config (a run refuses to start on a different one)
    tokenizer.json     the tokenizer the data was prepared with
    metrics.jsonl      one JSON object per logged step
    .lock              held by the training process writing the run (``jaxlm.errors.DirectoryLock``)
    checkpoints/<step>/{state,data,meta}   orbax items: TrainState, data-iterator state (JSON),
                                           metadata (JSON: step, config, package versions)
    checkpoints/<step>/checksums.json      sha256 of every file of the step, written once the
                                           save has finished ("sealed")

Reliability contract:

* a checkpoint is saved only from a finite state, and sealed with checksums as soon as its
  (asynchronous) save has finished; a failed save (a full disk) stops the run with a
  ``CheckpointError`` naming the step, keeps the earlier checkpoints and removes the
  half-written temporary directory;
* ``restore_latest`` tells two kinds of failure apart. An *unreadable* checkpoint (missing or
  torn files, bytes that do not match its checksums, non-finite values) is renamed
  ``corrupt-<step>`` with a warning and the previous one is tried. An *incompatible* one (a
  leaf whose shape or dtype differs from the run's state, a leaf only on one side) is refused
  with a ``CheckpointError`` naming the leaves, and nothing on disk is touched;
* ``load_model`` (inference) never falls back: the checkpoint asked for, or the newest one
  when none is named, is verified and restored, or a ``CheckpointError`` names its step
  directory and the other steps available.

``load_model(path)`` accepts a run directory, one of its checkpoint step directories, or an
HF checkpoint directory of any family ``jaxlm.hf`` supports (config.json + safetensors).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxlm.config import ConfigError, ModelConfig, from_dict, read_yaml
from jaxlm.data.records import file_sha256
from jaxlm.errors import JaxlmError, describe_os_error

log = logging.getLogger(__name__)


class CheckpointError(JaxlmError):
    """A checkpoint is unreadable (damaged, incomplete) or does not fit the run that reads it."""


class UnreadableCheckpointError(CheckpointError):
    """Missing, torn or altered files, or non-finite values: an older checkpoint may be used instead."""


class IncompatibleCheckpointError(CheckpointError):
    """Readable, but its state does not fit the run (shapes, dtypes, tree): never fall back."""


CHECKPOINT_SUBDIR = "checkpoints"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
CHECKSUM_FILE = "checksums.json"
ITEMS = ("state", "data", "meta")
ORBAX_TMP_MARK = ".orbax-checkpoint-tmp"


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
    return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict, meta: dict, force: bool = False) -> bool:
    """Save ``state`` (a pytree of arrays), the data-iterator state and metadata at ``step``."""
    return manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)
        ),
        force=force,
    )


# ---------------------------------------------------------------------------------------
# Checksums: a finished save is sealed, a restore verifies the seal
# ---------------------------------------------------------------------------------------


def file_checksums(step_dir: Path) -> dict[str, str]:
    """sha256 of every file below ``step_dir`` (but the checksum file), by relative path."""
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and not p.name.startswith(CHECKSUM_FILE))
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(files) or 1)) as pool:
        digests = list(pool.map(file_sha256, files))
    return {p.relative_to(step_dir).as_posix(): d for p, d in zip(files, digests)}


def seal(step_dir: Path) -> None:
    """Record the checksums of a finished checkpoint (atomically: a crash leaves it unsealed)."""
    tmp = step_dir / f"{CHECKSUM_FILE}.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        json.dump({"algorithm": "sha256", "files": file_checksums(step_dir)}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / CHECKSUM_FILE)


def verify_checksums(step_dir: Path) -> bool:
    """True when ``step_dir`` matches its recorded checksums, False when it has none (a save
    that was interrupted before sealing); ``UnreadableCheckpointError`` on any mismatch."""
    path = step_dir / CHECKSUM_FILE
    if not path.exists():
        return False
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))["files"]
        if not isinstance(recorded, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError) as err:
        raise UnreadableCheckpointError(f"{path} is damaged ({type(err).__name__})") from None
    actual = file_checksums(step_dir)
    for name, digest in sorted(recorded.items()):
        if name not in actual:
            raise UnreadableCheckpointError(f"{step_dir / name} is missing")
        if actual[name] != digest:
            raise UnreadableCheckpointError(f"{step_dir / name} does not match its checksum (changed after the save)")
    return True


# ---------------------------------------------------------------------------------------
# Leaves: what a checkpoint holds vs what a run expects
# ---------------------------------------------------------------------------------------


def leaf_name(path: tuple) -> str:
    """``opt_state.1.0.mu.embedding`` for a key path (the name orbax stores the leaf under)."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts)


def leaf_specs(tree: Any) -> dict[str, str]:
    """``{leaf name: "float32[2,32]"}`` for a tree of arrays, shape structs or orbax metadata."""
    specs = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape = ",".join(str(n) for n in getattr(leaf, "shape", ()))
        specs[leaf_name(path)] = f"{getattr(leaf, 'dtype', type(leaf).__name__)}[{shape}]"
    return specs


def fit_problems(stored: dict[str, str], expected: dict[str, str]) -> list[str]:
    """One line per leaf that differs between a checkpoint and the state a run expects."""
    problems = []
    for name in sorted(set(stored) | set(expected), key=lambda n: (not n.startswith("params."), n)):
        if name not in stored:
            problems.append(f"{name}: not in the checkpoint (this run expects {expected[name]})")
        elif name not in expected:
            problems.append(f"{name}: in the checkpoint ({stored[name]}) but not in this run")
        elif stored[name] != expected[name]:
            problems.append(f"{name}: checkpoint has {stored[name]}, this run expects {expected[name]}")
    return problems


def stored_state_specs(step_dir: Path) -> dict[str, str]:
    """The leaves of a checkpoint's ``state`` item, read from its metadata (no arrays loaded)."""
    try:
        metadata = ocp.StandardCheckpointHandler().metadata(step_dir / "state")
    except Exception as err:  # orbax/tensorstore raise assorted errors on missing or torn metadata
        raise UnreadableCheckpointError(f"{step_dir / 'state'}: metadata unreadable ({_describe(err)})") from err
    return leaf_specs(metadata)


def params_sha256(params: Any) -> str:
    """sha256 over a parameter tree's leaves (name, dtype, shape and bytes, in tree order): the
    same weights give the same hash wherever they were loaded from."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        array = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(f"{leaf_name(path)}:{array.dtype}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def non_finite_leaves(tree: Any) -> list[str]:
    """Names of the floating-point leaves holding a NaN or an infinity."""
    floats = [
        (leaf_name(path), x)
        for path, x in jax.tree_util.tree_leaves_with_path(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    if not floats:
        return []
    # One compiled program for the whole tree: with several processes every eager op on a global
    # array is a collective, and many small ones in flight at once can interleave differently
    # across processes; one program is one step every process takes in the same order.
    finite = np.asarray(_leaves_finite([x for _, x in floats]))
    return [name for (name, _), ok in zip(floats, finite) if not ok]


@jax.jit
def _leaves_finite(leaves: list) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def _describe(err: BaseException) -> str:
    """A failure's reason in a few words: an ``OSError`` anywhere in its chain, else its type and text."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError):
            return describe_os_error(seen)
        seen = seen.__cause__ or seen.__context__
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


def _too_many(lines: list[str], shown: int = 4) -> str:
    more = f" (and {len(lines) - shown} more)" if len(lines) > shown else ""
    return "; ".join(lines[:shown]) + more


# ---------------------------------------------------------------------------------------
# Restoring a run
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    state: Any
    data_state: dict
    meta: dict
    verified: bool = False  # its files matched the checksums recorded at save time


MetaCheck = Callable[[int, dict], None]


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state: Any, check_meta: MetaCheck | None = None
) -> Restored | None:
    """Restore the newest readable checkpoint, or None when there is none.

    An unreadable checkpoint (torn or missing files, a checksum mismatch, non-finite values) is
    renamed ``corrupt-<step>`` with a warning and the previous one is tried. One that does not
    fit ``abstract_state`` raises ``IncompatibleCheckpointError``, and an error raised by
    ``check_meta(step, meta)`` (called before the state is read) propagates: both leave every
    file as it was.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return _restore_step(manager, step, abstract_state, check_meta)
        except UnreadableCheckpointError as err:
            kept = _set_aside(Path(manager.directory), step)
            message = f"checkpoint at step {step} in {manager.directory} is unreadable ({err}); moved to {kept.name}, trying an older one"
            warnings.warn(message, stacklevel=2)
            log.warning(message)
            manager.reload()
    return None


def _restore_items(manager: ocp.CheckpointManager, step: int, **items: Any) -> dict:
    try:
        return manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as err:  # orbax raises assorted errors on truncated or missing files
        where = Path(manager.directory) / str(step)
        raise UnreadableCheckpointError(f"{where}: {'/'.join(items)} unreadable ({_describe(err)})") from err


def _restore_step(manager: ocp.CheckpointManager, step: int, abstract_state: Any, check_meta: MetaCheck | None) -> Restored:
    step_dir = Path(manager.directory) / str(step)
    verified = verify_checksums(step_dir)
    meta = _restore_items(manager, step, meta=ocp.args.JsonRestore())["meta"]
    if check_meta is not None:
        check_meta(step, meta)
    problems = fit_problems(stored_state_specs(step_dir), leaf_specs(abstract_state))
    if problems:
        raise IncompatibleCheckpointError(
            f"checkpoint at step {step} in {step_dir.parent} does not fit this run's model and optimizer: "
            f"{_too_many(problems, 3)}; a run resumes only with the shapes it was saved with "
            "(use a new --run-dir for the changed config); nothing was changed on disk"
        )
    restored = _restore_items(manager, step, state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    bad = non_finite_leaves(restored["state"])
    if bad:
        raise UnreadableCheckpointError(f"{step_dir}: non-finite values in {_too_many(bad, 3)}")
    if not verified:
        log.warning("checkpoint at step %d in %s has no checksums (its run stopped before sealing it): "
                    "restored after checking its values are finite", step, step_dir.parent)
    return Restored(step=step, state=restored["state"], data_state=restored["data"], meta=meta, verified=verified)


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
# Saving a run
# ---------------------------------------------------------------------------------------


class _HideOrbaxErrors(logging.Filter):
    """Keeps orbax's error records (tracebacks of a failed background save) off the console:
    the failure reaches the user as one ``CheckpointError``; the records go to debug logging."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "orbax" in record.pathname:
            log.debug("orbax: %s", record.getMessage())
            return False
        return True


class RunCheckpoints:
    """The checkpoints of one training run, in ``run_dir/checkpoints``.

    ``save`` waits for (and seals) the previous asynchronous save first; ``poll`` (once a step)
    seals a save as soon as it has finished; ``close`` waits for the last one. A failed save
    raises ``CheckpointError`` naming the step and the checkpoints kept, and ``close`` then
    removes the half-written temporary directory. ``verified_step`` is the newest step whose
    files are known good (sealed by this run, or restored with matching checksums).
    """

    def __init__(self, run_dir: str | Path, config: CheckpointConfig):
        self.manager = open_manager(run_dir, config)
        self.directory = Path(self.manager.directory)
        self.verified_step: int | None = None
        self._pending: int | None = None
        self._failed = False
        self._filter = _HideOrbaxErrors()
        logging.getLogger("absl").addFilter(self._filter)
        self._remove_temporary_dirs()  # left by a process that died mid-save (the run dir is locked)

    def restore_latest(self, abstract_state: Any, check_meta: MetaCheck | None = None) -> Restored | None:
        restored = restore_latest(self.manager, abstract_state, check_meta)
        if restored is not None and restored.verified:
            self.verified_step = restored.step
        return restored

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
        self.finish()
        self._pending = step
        self._guarded(step, lambda: save(self.manager, step, state, data_state, meta, force=True))
        self.poll()

    def poll(self) -> None:
        """Seal the pending checkpoint if its save has finished (cheap when it has not)."""
        if self._pending is not None and not self.manager.is_saving_in_progress():
            self.finish()

    def finish(self) -> None:
        """Wait for the save in flight, then seal it."""
        step, self._pending = self._pending, None
        if step is None:
            return
        self._guarded(step, self.manager.wait_until_finished)
        step_dir = self.directory / str(step)
        if step_dir.is_dir():
            if jax.process_index() == 0:
                seal(step_dir)
            self.verified_step = step

    def close(self) -> None:
        """Finish the last save and release orbax; after a failed save, remove its temporary files."""
        try:
            self.finish()
        finally:
            try:
                self.manager.close()
            except Exception as err:  # the failure was already raised (or is being raised) once
                if not self._failed:
                    raise
                log.debug("closing the checkpoint manager after a failed save: %s", err)
            finally:
                if self._failed:
                    _join_orbax_threads(timeout=120)
                    self._remove_temporary_dirs()
                logging.getLogger("absl").removeFilter(self._filter)

    def _guarded(self, step: int, action: Callable[[], Any]) -> None:
        try:
            action()
        except Exception as err:  # a full disk, a vanished directory, ... in orbax or tensorstore
            self._failed = True
            self._pending = None
            kept = [s for s in self._steps_on_disk() if s != step]
            raise CheckpointError(
                f"{self.directory / str(step)}: saving the checkpoint of step {step} failed: {_describe(err)}; "
                f"the run stopped; earlier checkpoints kept: {kept or 'none'}"
            ) from err

    def _steps_on_disk(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())

    def _remove_temporary_dirs(self) -> None:
        if jax.process_index() != 0 or not self.directory.is_dir():
            return
        for path in self.directory.glob(f"*{ORBAX_TMP_MARK}*"):
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed the unfinished checkpoint %s", path)


def _join_orbax_threads(timeout: float) -> None:
    """Wait for orbax's background writers: after a failed save some still run (and write)."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and type(thread).__module__.startswith("orbax"):
            thread.join(max(deadline - time.monotonic(), 0))


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


def model_config_of(path: str | Path) -> ModelConfig:
    """The ``ModelConfig`` of what ``load_model(path)`` would load, read without its weights."""
    from jaxlm import hf

    path = Path(path)
    if hf.is_hf_checkpoint(path):
        return hf.load_config(path)
    run_dir, _ = _find_run_dir(path)
    run_config = read_yaml(run_dir / CONFIG_FILE)
    if "model" not in run_config:
        raise ConfigError(f"{run_dir / CONFIG_FILE}: no 'model' section")
    return from_dict(ModelConfig, run_config["model"], "model")


def load_model(path: str | Path, step: int | None = None, mesh: jax.sharding.Mesh | None = None) -> LoadedModel:
    """Model config, float32 parameters (on the default device, or sharded on ``mesh``) and
    tokenizer from ``path``: a jaxlm run directory, one of its ``checkpoints/<step>``
    directories, or an HF checkpoint directory of any family ``jaxlm.hf`` supports (recognised
    by ``config.json``'s ``model_type``), each with the ``tokenizer.json`` next to it (None
    without one).

    A jaxlm checkpoint read (``step``, the step directory ``path`` names, or else the newest) is
    verified against its checksums and must hold finite parameters of the shapes in the run's
    ``config.yaml``; otherwise a ``CheckpointError`` names its directory and the run's other
    steps. There is no silent fallback to an older step: inference reads what was asked for.

    ``mesh``: the parameters are read straight into their training shardings on it
    (``jaxlm.sharding.param_shardings``: orbax restores each shard onto its devices; HF
    tensors go from host memory to their shards), and inference on them runs sharded on
    ``mesh`` (``jaxlm.decode.generate``, ``jaxlm.probe.collect_activations``). A mesh whose
    axes do not divide the model is a ``ConfigError`` before anything is read.
    """
    path = Path(path)
    from jaxlm import hf

    if hf.is_hf_checkpoint(path):
        config, params = hf.load(path, mesh=mesh)
        return LoadedModel(config, params, _load_tokenizer(path / TOKENIZER_FILE), None, path)

    run_dir, step_from_path = _find_run_dir(path)
    step = step if step is not None else step_from_path
    config = model_config_of(run_dir)
    abstract_params = _abstract_params(config, mesh)
    manager = ocp.CheckpointManager(
        (run_dir / CHECKPOINT_SUBDIR).absolute(),
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_names=ITEMS,
    )
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"{run_dir / CHECKPOINT_SUBDIR}: no checkpoints")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"{run_dir / CHECKPOINT_SUBDIR}: no checkpoint for step {step}; have {steps}")
        try:
            params = _restore_params(manager, step, abstract_params, run_dir / CONFIG_FILE)
        except UnreadableCheckpointError as err:
            others = [s for s in steps if s != step]
            hint = f"; other checkpoints of this run: steps {others} (pass one as {manager.directory}/<step>)" if others else ""
            raise CheckpointError(f"unreadable checkpoint: {err}{hint}") from err
    finally:
        manager.close()
    return LoadedModel(config, params, _load_tokenizer(run_dir / TOKENIZER_FILE), step, run_dir)


def _abstract_params(config: ModelConfig, mesh: jax.sharding.Mesh | None) -> Any:
    """Shapes, dtypes and placement of the parameters to restore: their training shardings on
    ``mesh`` (``jaxlm.sharding.param_shardings``), else the default device."""
    from jaxlm import model as model_lib
    from jaxlm import sharding as sharding_lib

    shapes = model_lib.param_shapes(config)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes)
    else:
        shardings = sharding_lib.param_shardings(config, mesh)
    return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes, shardings)


def _restore_params(manager: ocp.CheckpointManager, step: int, abstract_params: Any, config_path: Path) -> Any:
    """The verified, finite parameters of one checkpoint (a partial restore of its ``state``)."""
    step_dir = Path(manager.directory) / str(step)
    verify_checksums(step_dir)
    stored = {k: v for k, v in stored_state_specs(step_dir).items() if k.startswith("params.")}
    problems = fit_problems(stored, leaf_specs({"params": abstract_params}))
    if problems:
        raise IncompatibleCheckpointError(
            f"{step_dir}: its parameters do not fit the model in {config_path}: {_too_many(problems)}"
        )
    restored = _restore_items(
        manager,
        step,
        state=ocp.args.PyTreeRestore(
            item={"params": abstract_params},
            restore_args={"params": ocp.checkpoint_utils.construct_restore_args(abstract_params)},
            partial_restore=True,
        ),
    )
    params = restored["state"]["params"]
    bad = non_finite_leaves(params)
    if bad:
        raise UnreadableCheckpointError(f"{step_dir}: non-finite values in {_too_many(bad, 3)}")
    return params
