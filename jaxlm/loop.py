"""The training run: data -> sharded steps -> metrics, evaluation and checkpoints, resumable.

``train(config, run_dir)`` initialises or resumes a run in ``run_dir`` (see
``jaxlm.checkpoint`` for the layout). Reliability contract:

* killed at any step (SIGKILL) and restarted, a run reproduces the uninterrupted losses
  exactly: parameters, optimizer state and the data-iterator state are checkpointed
  together, and metrics after the restored step are rewritten;
* SIGTERM / SIGINT save a checkpoint and return cleanly (preemption);
* a non-finite loss stops the run with a diagnostic and never checkpoints the bad state;
* a corrupt newest checkpoint is skipped with a warning (``checkpoint.restore_latest``);
* a run directory created with a different config is refused unless ``allow_config_change``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np

from jaxlm import checkpoint as ckpt
from jaxlm import perf
from jaxlm.config import ConfigError, MeshConfig, ModelConfig, dump_yaml, from_dict, read_yaml, to_dict
from jaxlm.data.pipeline import PipelineConfig, build_pipeline
from jaxlm.optim import OptimizerConfig
from jaxlm.sharding import make_mesh
from jaxlm.train import Trainer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalSetConfig:
    """A held-out text set: a plain text file (``.txt``/``.gz``, tokenized with the run's
    tokenizer and cut into ``seq_len`` windows) or a prepared source directory.

    ``path`` may use environment variables, e.g. ``$JAXLM_DATA_DIR/eval/wikitext2/valid.txt``.
    """

    name: str
    path: str
    kind: str = "text"  # "text" | "prepared"
    max_sequences: int = 64

    def __post_init__(self) -> None:
        if self.kind not in ("text", "prepared"):
            raise ConfigError(f"eval_sets[{self.name}].kind: expected 'text' or 'prepared', got {self.kind!r}")
        if self.max_sequences <= 0:
            raise ConfigError(f"eval_sets[{self.name}].max_sequences: expected a positive integer, got {self.max_sequences}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    data: PipelineConfig | None = None
    mesh: MeshConfig = MeshConfig()
    checkpoint: ckpt.CheckpointConfig = ckpt.CheckpointConfig()
    steps: int = 1000
    seed: int = 0
    grad_accum: int = 1
    z_loss: float = 0.0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_sets: tuple[EvalSetConfig, ...] = ()
    peak_flops: float | None = None  # per device; default: vendor table or a measured matmul
    distributed: bool = False  # call jax.distributed.initialize() (multi-host)
    # Multi-host without a cluster manager JAX detects (TPU VMs, SLURM, Open MPI, k8s):
    coordinator_address: str | None = None  # "host:port" of process 0
    num_processes: int | None = None
    process_id: int | None = None
    tensorboard: bool = True

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ConfigError(f"steps: expected a positive integer, got {self.steps}")
        if self.grad_accum <= 0:
            raise ConfigError(f"grad_accum: expected a positive integer, got {self.grad_accum}")
        if self.log_every <= 0:
            raise ConfigError(f"log_every: expected a positive integer, got {self.log_every}")
        if self.data is not None:
            if self.data.batch_size % self.grad_accum:
                raise ConfigError(
                    f"grad_accum: data.batch_size ({self.data.batch_size}) must be divisible by grad_accum ({self.grad_accum})"
                )
            if self.data.seq_len > self.model.max_seq_len:
                raise ConfigError(
                    f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})"
                )


def load_train_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    from jaxlm.config import load

    return load(TrainConfig, path, overrides)


class NonFiniteLossError(RuntimeError):
    pass


class ConfigMismatchError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------
# Run directory
# ---------------------------------------------------------------------------------------


def _config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        diffs = []
        for key in sorted(set(old) | set(new)):
            diffs += _config_diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return diffs
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def prepare_run_dir(config: TrainConfig, run_dir: Path, allow_config_change: bool) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / ckpt.CONFIG_FILE
    resolved = to_dict(config)
    if config_path.exists():
        existing = read_yaml(config_path)
        diffs = _config_diff(existing, json.loads(json.dumps(resolved)))
        if diffs and not allow_config_change:
            raise ConfigMismatchError(
                f"{run_dir} was created with a different config ({'; '.join(diffs[:8])}"
                f"{' ...' if len(diffs) > 8 else ''}); pass --override-config to continue with the new one"
            )
        if diffs:
            log.warning("continuing %s with a changed config: %s", run_dir, "; ".join(diffs))
    dump_yaml(config, config_path)


def package_versions() -> dict[str, str | None]:
    from jaxlm.cli.info import package_versions as versions

    return versions()


class MetricsLog:
    """``metrics.jsonl`` (+ TensorBoard). On resume, rows after the restored step are dropped."""

    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = self.path.open("a", encoding="utf-8")
        self.writer = None
        if tensorboard and jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, row: dict) -> None:
        if jax.process_index() != 0:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in _flatten(row).items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def _flatten(row: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@contextlib.contextmanager
def preemption_signals() -> Iterator[dict]:
    """While active, SIGTERM/SIGINT set ``flag["signal"]`` instead of killing the process."""
    flag: dict[str, Any] = {"signal": None}
    previous = {}

    def handler(signum, _frame):
        flag["signal"] = signal.Signals(signum).name

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------------------------
# Evaluation sets
# ---------------------------------------------------------------------------------------


def _eval_batches(eval_set: EvalSetConfig, tokenizer, seq_len: int, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Fixed held-out batches: ``seq_len`` windows of one token stream (documents separated by EOS)."""
    from jaxlm.data.records import iter_prepared_tokens
    from jaxlm.data.sources import read_text

    need = eval_set.max_sequences * seq_len
    path = Path(os.path.expandvars(os.path.expanduser(eval_set.path)))
    if "$" in str(path):
        raise ConfigError(f"eval_sets[{eval_set.name}].path: unset environment variable in {eval_set.path!r}")
    if not path.exists():
        raise ConfigError(f"eval_sets[{eval_set.name}].path: {path} does not exist")
    if eval_set.kind == "text":
        text = read_text(path)
        stream = np.asarray(tokenizer.encode(text), np.int32)[:need]
    else:
        stream = iter_prepared_tokens(path, need)
    n_seq = len(stream) // seq_len
    if n_seq == 0:
        raise ConfigError(f"eval set {eval_set.name!r} ({eval_set.path}): fewer than seq_len={seq_len} tokens")
    rows = stream[: n_seq * seq_len].reshape(n_seq, seq_len)
    n_batches = max(n_seq // batch_size, 1)
    rows = np.resize(rows, (n_batches * batch_size, seq_len)) if n_seq < batch_size else rows[: n_batches * batch_size]
    ones = np.ones((batch_size, seq_len), np.int32)
    return [{"tokens": rows[i * batch_size : (i + 1) * batch_size], "segment_ids": ones} for i in range(n_batches)]


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    step: int
    stopped_by: str  # "completed" | "SIGTERM" | "SIGINT" | "max_steps"
    last_metrics: dict


def train(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    max_steps: int | None = None,
    allow_config_change: bool = False,
    show_progress: bool = True,
) -> RunResult:
    """Train (or resume) ``config`` in ``run_dir``; ``max_steps`` stops early at that step (for tests/CLI ``--steps``)."""
    if config.data is None:
        raise ConfigError("data: a training run needs a data section (a prepared dataset and mixture)")
    if config.distributed:
        jax.distributed.initialize(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
        )
    run_dir = Path(run_dir)
    prepare_run_dir(config, run_dir, allow_config_change)

    mesh = make_mesh(config.mesh)
    trainer = Trainer(
        config.model, config.optimizer, config.steps, mesh, grad_accum=config.grad_accum, z_loss=config.z_loss
    )
    manager = ckpt.open_manager(run_dir, config.checkpoint)
    restored = ckpt.restore_latest(manager, trainer.abstract_state())
    pipeline = build_pipeline(
        config.data,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        state=restored.data_state if restored else None,
    )
    tokenizer_src = pipeline.tokenizer_path
    if tokenizer_src is not None and not (run_dir / ckpt.TOKENIZER_FILE).exists():
        shutil.copyfile(tokenizer_src, run_dir / ckpt.TOKENIZER_FILE)
    if pipeline.vocab_size > config.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({config.model.vocab_size}) is smaller than the data's tokenizer vocabulary ({pipeline.vocab_size})"
        )

    if restored is not None:
        state, start = restored.state, restored.step
        log.info("resumed %s at step %d", run_dir, start)
    else:
        state, start = trainer.init_state(config.seed), 0

    metrics_log = MetricsLog(run_dir, start, config.tensorboard)
    stop_at = min(config.steps, max_steps) if max_steps is not None else config.steps
    example = pipeline.peek_shapes()
    step_fn = trainer.jit_step(example)
    eval_sets = []
    if config.eval_sets:
        from jaxlm.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(run_dir / ckpt.TOKENIZER_FILE)
        eval_sets = [
            (es.name, _eval_batches(es, tokenizer, config.data.seq_len, config.data.batch_size)) for es in config.eval_sets
        ]
    eval_fn = trainer.jit_eval_loss({"tokens": example["tokens"], "segment_ids": example["tokens"]}) if eval_sets else None
    peak, peak_source = perf.peak_flops_per_device(config.peak_flops)
    flops_per_token = config.model.flops_per_token(config.data.seq_len)
    tokens_per_step = config.data.batch_size * config.data.seq_len

    def meta(step: int) -> dict:
        return {"step": step, "config": to_dict(config), "versions": package_versions()}

    def run_evals(params) -> dict:
        results = {}
        for name, batches in eval_sets:
            ce, n = 0.0, 0.0
            for batch in batches:
                c, k = eval_fn(params, pipeline.to_global(batch, mesh))
                ce, n = ce + float(c), n + float(k)
            results[name] = ce / max(n, 1.0)
        return results

    def check_finite(step: int, metrics: dict, sources: np.ndarray) -> None:
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            names = pipeline.source_names
            counts = {names[i]: int(c) for i, c in enumerate(np.bincount(sources, minlength=len(names))) if c}
            raise NonFiniteLossError(
                f"non-finite loss {loss} at step {step} (batch sources: {counts}); the run stopped and its last "
                f"good checkpoint ({manager.latest_step()}) is kept in {run_dir}"
            )

    last: dict = {}
    stopped_by = "completed" if stop_at == config.steps else "max_steps"
    pending: tuple[int, dict, np.ndarray] | None = None  # previous step's metrics, checked one step late
    window_start, window_tokens = time.perf_counter(), 0
    progress = None
    if show_progress and jax.process_index() == 0:
        from tqdm import tqdm

        progress = tqdm(total=stop_at, initial=start, desc="train", unit="step", dynamic_ncols=True)
    try:
        with preemption_signals() as signal_flag:
            step = start
            while step < stop_at:
                batch = next(pipeline)
                sources = batch.pop("source_ids")
                state, metrics = step_fn(state, pipeline.to_global(batch, mesh))
                step += 1
                window_tokens += tokens_per_step
                if pending is not None:
                    check_finite(*pending)
                pending = (step, metrics, sources)
                received = signal_flag["signal"]  # read once: a signal arriving later is seen next step
                must_save = step % config.checkpoint.every == 0 or step == stop_at or received
                if step % config.log_every == 0 or must_save:
                    check_finite(*pending)
                    pending = None
                    elapsed = time.perf_counter() - window_start
                    tps = window_tokens / elapsed if elapsed > 0 else float("nan")
                    last = {
                        "step": step,
                        **{k: float(v) for k, v in metrics.items()},
                        "tokens_per_sec": tps,
                        "mfu": perf.mfu(flops_per_token, tps, peak, jax.device_count()),
                        "mixture": pipeline.realised_shares(),
                        "tokens_seen": step * tokens_per_step,
                    }
                    if eval_sets and ((config.eval_every and step % config.eval_every == 0) or step == config.steps):
                        last["eval"] = run_evals(state.params)
                    metrics_log.write(last)
                    if progress is not None:
                        progress.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{tps:,.0f}")
                    window_start, window_tokens = time.perf_counter(), 0
                if progress is not None:
                    progress.update(1)
                if must_save:
                    ckpt.save(manager, step, state, pipeline.get_state(), meta(step), force=True)
                if received:
                    stopped_by = received
                    log.warning("%s received: checkpoint saved at step %d, stopping", stopped_by, step)
                    break
    finally:
        manager.wait_until_finished()
        manager.close()
        metrics_log.close()
        if progress is not None:
            progress.close()
    last.setdefault("peak_flops_source", peak_source)
    return RunResult(step=int(state.step), stopped_by=stopped_by, last_metrics=last)
