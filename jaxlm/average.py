"""Checkpoint averaging: the weighted mean of a run's parameters over several checkpoints.

``average_params(trees, weights)`` averages parameter pytrees leaf by leaf (float32
accumulation, each leaf returned as a host array in its input dtype). ``average_run`` loads
the parameters of some checkpoints of a training run (each verified by
``checkpoint.load_model``) and writes the average as a run directory of its own::

    out/config.yaml      the source run's config (its model section describes the parameters)
    out/tokenizer.json   the source run's tokenizer (when it has one)
    out/average.json     source run, steps, normalised weights, each input's params_sha256
                         and the average's
    out/checkpoints/<step>/{state,data,meta} + checksums.json
                         one sealed orbax step, numbered like the newest averaged one;
                         ``state`` holds only ``params`` (no optimizer state)

so every command that takes ``--checkpoint`` (and ``init_from``) reads it through
``load_model``. Training cannot resume in it: the checkpoint has no optimizer state, and
``restore_latest`` refuses it without touching anything. The output directory is written
under a temporary name and renamed when complete; an existing non-empty one is refused.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import checkpoint as ckpt
from jaxlm.config import ConfigError, read_yaml
from jaxlm.files import write_json

AVERAGE_FILE = "average.json"


def normalised_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """``weights`` scaled to sum to 1 (None: equal weights); one per averaged tree."""
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise ConfigError(f"weights: expected {count} (one per averaged checkpoint), got {len(weights)}")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ConfigError(f"weights: expected finite non-negative numbers, got {weights}")
    total = math.fsum(weights)
    if total == 0:
        raise ConfigError(f"weights: they sum to 0 ({weights}); at least one must be positive")
    return [w / total for w in weights]


def _named_leaves(tree: Any) -> dict[str, np.ndarray]:
    return {
        ckpt.leaf_name(path): np.asarray(jax.device_get(leaf)) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _check_like(leaves: dict[str, np.ndarray], reference: dict[str, tuple], index: int) -> None:
    """Tree ``index`` must hold the leaves of the first tree, with the same shapes and dtypes."""
    for name in sorted(set(leaves) | set(reference)):
        if name not in reference:
            raise ConfigError(f"trees[{index}]: leaf {name} is not in trees[0]; only trees of one model are averaged")
        if name not in leaves:
            raise ConfigError(f"trees[{index}]: leaf {name} of trees[0] is missing; only trees of one model are averaged")
        found = (leaves[name].shape, leaves[name].dtype)
        if found != reference[name]:
            raise ConfigError(
                f"trees[{index}]: leaf {name} is {found[1]}{list(found[0])}, trees[0] has "
                f"{reference[name][1]}{list(reference[name][0])}"
            )


def weighted_mean(trees: Iterable[Any], weights: Sequence[float]) -> Any:
    """``sum(w * tree)`` for weights already normalised, consuming ``trees`` one at a time (so
    only the running sum and one input are held). Returns host arrays in the inputs' dtypes."""
    treedef = reference = total = None
    count = 0
    for index, (tree, weight) in enumerate(zip(trees, weights, strict=True)):
        leaves = _named_leaves(tree)
        if reference is None:
            treedef = jax.tree.structure(tree)
            reference = {name: (a.shape, a.dtype) for name, a in leaves.items()}
            for name, array in leaves.items():
                if not jnp.issubdtype(array.dtype, jnp.floating):
                    raise ConfigError(
                        f"leaf {name}: {array.dtype} is not a floating-point type; only float parameters are averaged"
                    )
            total = {name: np.zeros(a.shape, np.float32) for name, a in leaves.items()}
        else:
            _check_like(leaves, reference, index)
        for name, array in leaves.items():
            total[name] += np.float32(weight) * array.astype(np.float32)
        count += 1
    if count == 0:
        raise ConfigError("trees: expected at least one parameter tree to average")
    return jax.tree.unflatten(treedef, [total[name].astype(dtype) for name, (_, dtype) in reference.items()])


def average_params(trees: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
    """The weighted mean of parameter pytrees of one structure (weights normalised to sum to 1;
    None: the plain mean). Accumulates in float32; each leaf comes back in its input dtype.
    ``ConfigError`` for negative or zero-sum weights, a wrong weight count, or trees whose
    leaves differ (the message names the leaf)."""
    trees = list(trees)
    if not trees:
        raise ConfigError("trees: expected at least one parameter tree to average")
    return weighted_mean(trees, normalised_weights(weights, len(trees)))


# ---------------------------------------------------------------------------------------
# A run's checkpoints
# ---------------------------------------------------------------------------------------


def checkpoint_steps(run_dir: Path) -> list[int]:
    """The steps with a checkpoint directory in a training run (sorted; set-aside ones excluded)."""
    directory = run_dir / ckpt.CHECKPOINT_SUBDIR
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def select_steps(available: Sequence[int], *, last: int | None, steps: Sequence[int] | None, where: Path) -> list[int]:
    """The newest ``last`` of ``available``, or exactly ``steps`` (each must be available)."""
    if (last is None) == (steps is None):
        raise ConfigError("last / steps: give one: the newest K checkpoints (last) or the checkpoint steps to average")
    if last is not None:
        if last < 1:
            raise ConfigError(f"last: expected a positive number of checkpoints, got {last}")
        if last > len(available):
            raise ConfigError(
                f"last: {last} checkpoints asked for, but {where} holds {len(available)} (steps {list(available)})"
            )
        return list(available[-last:])
    chosen = list(steps)
    if not chosen:
        raise ConfigError("steps: expected at least one checkpoint step")
    repeated = sorted({s for s in chosen if chosen.count(s) > 1})
    if repeated:
        raise ConfigError(f"steps: step {', '.join(map(str, repeated))} given more than once")
    absent = [s for s in chosen if s not in available]
    if absent:
        raise ConfigError(f"steps: no checkpoint for step {', '.join(map(str, absent))} in {where}; have {list(available)}")
    return chosen


def _check_output(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"out: {out_dir} exists and is not an empty directory; name a new one")


def _write_checkpoint(run_dir: Path, step: int, params: Any, meta: dict) -> None:
    manager = ckpt.open_manager(run_dir, ckpt.CheckpointConfig(keep_last=1, async_save=False))
    try:
        ckpt.save(manager, step, {"params": params}, {}, meta, force=True)
        manager.wait_until_finished()
    finally:
        manager.close()
    ckpt.seal(run_dir / ckpt.CHECKPOINT_SUBDIR / str(step))


def average_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    last: int | None = None,
    steps: Sequence[int] | None = None,
    weights: Sequence[float] | None = None,
) -> Path:
    """Average the parameters of the newest ``last`` (or the given ``steps``) checkpoints of
    the training run ``run_dir`` with ``weights`` (one per step, in that order; None: equal)
    into the run directory ``out_dir`` (see the module doc); returns ``out_dir``."""
    from jaxlm.versions import package_versions

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / ckpt.CONFIG_FILE).is_file() or not (run_dir / ckpt.CHECKPOINT_SUBDIR).is_dir():
        raise ConfigError(
            f"{run_dir}: not a jaxlm training run (expected {ckpt.CONFIG_FILE} and {ckpt.CHECKPOINT_SUBDIR}/)"
        )
    chosen = select_steps(checkpoint_steps(run_dir), last=last, steps=steps, where=run_dir / ckpt.CHECKPOINT_SUBDIR)
    shares = normalised_weights(weights, len(chosen))
    _check_output(out_dir)
    hashes: list[str] = []

    def inputs() -> Iterable[Any]:
        for step in chosen:
            params = ckpt.load_model(run_dir, step).params
            hashes.append(ckpt.params_sha256(params))
            yield params

    averaged = weighted_mean(inputs(), shares)
    step = max(chosen)
    record = {
        "source_run": str(run_dir.resolve()),
        "step": step,
        "steps": chosen,
        "weights": shares,
        "params_sha256": hashes,
        "averaged_params_sha256": ckpt.params_sha256(averaged),
    }
    config = read_yaml(run_dir / ckpt.CONFIG_FILE)
    meta = {"step": step, "config": config, "versions": package_versions(), "average": record}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        shutil.copyfile(run_dir / ckpt.CONFIG_FILE, tmp / ckpt.CONFIG_FILE)
        if (run_dir / ckpt.TOKENIZER_FILE).is_file():
            shutil.copyfile(run_dir / ckpt.TOKENIZER_FILE, tmp / ckpt.TOKENIZER_FILE)
        _write_checkpoint(tmp, step, averaged, meta)
        write_json(tmp / AVERAGE_FILE, record)
        _check_output(out_dir)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
