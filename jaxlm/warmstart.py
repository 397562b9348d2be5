"""Starting a run from an existing model (``TrainConfig.init_from``) and DPO's frozen reference.

``load_start_model`` reads the model ``init_from`` names (a jaxlm run or checkpoint step
directory, or an HF directory: ``checkpoint.load_model``, verified, never a silent fallback) and
refuses one that does not fit the run's ``model`` section: a differing architecture field
(``norm``, ``rope_theta``, ...) or parameter leaf is named. Compute settings (``dtype``, ``remat``,
``scan_layers``) and ``init_std`` may differ. The run records where it started in
``init_from.json``: the path as given, the resolved directory and step, and a content
fingerprint of the parameters (``checkpoint.params_sha256``), so a run can
say which weights it started from even after the source directory has moved.

DPO's reference log-probs are those of the starting model, computed once at the start of the
run for every preference pair and kept in ``reference_logps.npz`` (no pickle) with their
fingerprint in ``reference_logps.json``; a resumed run reuses them after checking the
fingerprint, and recomputes them from ``init_from`` when the file is missing or damaged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlm import checkpoint as ckpt
from jaxlm.checkpoint import CheckpointError, IncompatibleCheckpointError, LoadedModel
from jaxlm.config import ModelConfig
from jaxlm.data.examples import preference_arrays
from jaxlm.data.records import file_sha256
from jaxlm.files import replace_atomically, write_json

log = logging.getLogger(__name__)

START_FILE = "init_from.json"
REFERENCE_FILE = "reference_logps.npz"
REFERENCE_META = "reference_logps.json"
# Fields of ModelConfig that change neither the parameters nor the function they compute.
COMPUTE_FIELDS = ("dtype", "remat", "scan_layers", "init_std")


def architecture_differences(run_model: ModelConfig, source_model: ModelConfig) -> list[str]:
    """``field: source -> run`` for each architecture field where the two configs differ."""
    diffs = []
    for field in dataclasses.fields(ModelConfig):
        if field.name in COMPUTE_FIELDS:
            continue
        a, b = getattr(source_model, field.name), getattr(run_model, field.name)
        if a != b:
            diffs.append(f"model.{field.name}: the model has {a!r}, this config {b!r}")
    return diffs


def load_start_model(init_from: str, run_model: ModelConfig) -> LoadedModel:
    """The model ``init_from`` names, checked to fit ``run_model`` (``IncompatibleCheckpointError``)."""
    path = Path(os.path.expandvars(os.path.expanduser(init_from)))
    try:
        loaded = ckpt.load_model(path)
    except FileNotFoundError as err:
        raise CheckpointError(f"init_from: {err}") from err
    except CheckpointError as err:
        raise type(err)(f"init_from: {err}") from err
    diffs = architecture_differences(run_model, loaded.config)
    if diffs:
        raise IncompatibleCheckpointError(f"init_from {path}: the model does not fit this config: {'; '.join(diffs)}")
    from jaxlm import model as model_lib

    problems = ckpt.fit_problems(ckpt.leaf_specs(loaded.params), ckpt.leaf_specs(model_lib.param_shapes(run_model)))
    if problems:
        raise IncompatibleCheckpointError(f"init_from {path}: parameters do not fit this config: {'; '.join(problems[:4])}")
    return loaded


def start_record(init_from: str, loaded: LoadedModel) -> dict:
    return {
        "init_from": init_from,
        "resolved": str(loaded.source.resolve()),
        "step": loaded.step,
        "params_sha256": ckpt.params_sha256(loaded.params),
    }


def read_start_record(run_dir: Path) -> dict | None:
    path = run_dir / START_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        log.warning("%s: unreadable; the run's start is recorded again from init_from", path)
        return None


def tokenizer_file(loaded: LoadedModel) -> Path | None:
    """The ``tokenizer.json`` beside the model's config (run or HF directory), if any."""
    path = loaded.source / ckpt.TOKENIZER_FILE
    return path if path.exists() else None


# ---------------------------------------------------------------------------------------
# DPO reference log-probs
# ---------------------------------------------------------------------------------------

PAIR_KEYS = ("chosen", "rejected")


def reference_logprobs(logprob_fn, params: Any, arrays: dict[str, np.ndarray], batch_size: int, to_device,
                       progress: bool = True) -> np.ndarray:
    """[N, 2] float32 (chosen, rejected) summed response log-probs of every pair under ``params``.

    ``logprob_fn(params, tokens, segment_ids, loss_mask)`` is the compiled
    ``Trainer.jit_sequence_logprobs``; rows are fed ``batch_size`` at a time (the last batch
    padded by repeating rows, whose results are dropped); ``to_device`` places a host batch.
    """
    n = len(arrays["chosen_tokens"])
    out = np.zeros((n, 2), np.float32)
    starts = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="reference log-probs", unit="batch", dynamic_ncols=True)
    for start in starts:
        index = np.arange(start, start + batch_size) % n
        for column, key in enumerate(PAIR_KEYS):
            rows = {f: arrays[f"{key}_{f}"][index] for f in ("tokens", "segment_ids", "loss_mask")}
            rows = to_device(rows)
            values = np.asarray(logprob_fn(params, rows["tokens"], rows["segment_ids"], rows["loss_mask"]))
            take = min(batch_size, n - start)
            out[start : start + take, column] = values[:take]
    return out


def load_reference(run_dir: Path, fingerprint: str) -> np.ndarray | None:
    """The stored reference log-probs when they exist, are intact and match ``fingerprint``."""
    meta_path, data_path = run_dir / REFERENCE_META, run_dir / REFERENCE_FILE
    if not (meta_path.exists() and data_path.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("sha256") != file_sha256(data_path):
            raise ValueError("checksum mismatch")
        with np.load(data_path, allow_pickle=False) as stored:
            table = stored["logps"]
    except (OSError, ValueError, KeyError) as err:
        log.warning("%s: damaged (%s); recomputing the reference log-probs", data_path, err)
        return None
    if meta.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{data_path}: computed for other pairs or another starting model (fingerprint "
            f"{meta.get('fingerprint')!r}, this run {fingerprint!r}); move it aside to recompute"
        )
    return table


def save_reference(run_dir: Path, table: np.ndarray, fingerprint: str) -> None:
    data_path = run_dir / REFERENCE_FILE

    def save(tmp: Path) -> None:
        with tmp.open("wb") as handle:  # a file object: np.savez would add ".npz" to a path
            np.savez(handle, logps=table)

    replace_atomically(data_path, save)
    write_json(run_dir / REFERENCE_META, {"fingerprint": fingerprint, "sha256": file_sha256(data_path),
                                          "pairs": int(len(table))})


@dataclasses.dataclass
class ReferenceLogprobs:
    """DPO's frozen reference: (chosen, rejected) log-probs per pair, attached to each batch."""

    table: np.ndarray  # [N, 2]
    fingerprint: str
    computed: bool  # False: read from the run directory

    def attach(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index = batch.pop("example_index")
        return {**batch, "ref_chosen_logp": self.table[index, 0], "ref_rejected_logp": self.table[index, 1]}

    @staticmethod
    def shapes(example: dict[str, Any]) -> dict[str, Any]:
        example = {k: v for k, v in example.items() if k != "example_index"}
        n = example["chosen_tokens"].shape[0]
        return {**example, **{k: jax.ShapeDtypeStruct((n,), np.float32) for k in ("ref_chosen_logp", "ref_rejected_logp")}}


def run_reference(config, run_dir: Path, trainer, mesh, pipeline, start_model: LoadedModel | None, start: dict | None,
                  show_progress: bool) -> ReferenceLogprobs:
    """The starting model's log-probs of every pair of a DPO run (``config``: its ``TrainConfig``;
    ``trainer``, ``mesh``, ``pipeline``: the run's; ``start_model`` and its ``start_record``
    when this start read it): read from ``run_dir``, or computed once."""
    record = start if start is not None else read_start_record(run_dir)
    if record is None:  # resumed, no record: read the start again to know its identity
        start_model = load_start_model(config.init_from, config.model)
        record = start_record(config.init_from, start_model)
    fingerprint = hashlib.sha256(f"{record['params_sha256']}:{pipeline.fingerprint}".encode()).hexdigest()
    table = load_reference(run_dir, fingerprint)
    if table is not None:
        return ReferenceLogprobs(table, fingerprint, computed=False)
    if start_model is None:
        start_model = load_start_model(config.init_from, config.model)
    arrays = preference_arrays(pipeline)
    shape = jax.ShapeDtypeStruct((config.examples.batch_size, config.examples.seq_len), np.int32)
    logprob_fn = trainer.jit_sequence_logprobs({"tokens": shape})
    params = jax.device_put(start_model.params, trainer.param_shardings())
    table = reference_logprobs(
        logprob_fn, params, arrays, config.examples.batch_size,
        lambda rows: pipeline.to_global(process_rows(rows, pipeline), mesh), progress=show_progress,
    )
    return ReferenceLogprobs(table, fingerprint, computed=True)


def process_rows(rows: dict[str, np.ndarray], pipeline) -> dict[str, np.ndarray]:
    """This process's share of a global batch of rows (every process holds all of them)."""
    local = pipeline.local_batch_size
    start = jax.process_index() * local
    return {k: v[start : start + local] for k, v in rows.items()}
