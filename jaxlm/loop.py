"""The training run: data -> sharded steps -> metrics, evaluation and checkpoints, resumable.

``train(config, run_dir)`` initialises or resumes a run in ``run_dir`` (see
``jaxlm.checkpoint`` for the layout). Reliability contract:

* one training process per run directory: ``train`` holds ``run_dir/.lock`` throughout, and a
  second one stops at once with a ``LockedError`` naming the holder's pid;
* killed at any step (SIGKILL) and restarted, a run reproduces the uninterrupted losses
  exactly: parameters, optimizer state and the data-iterator state are checkpointed
  together, and metrics after the restored step are rewritten;
* SIGTERM / SIGINT save a checkpoint and return cleanly (preemption); with several processes
  (``jax.distributed``) a signal to any one of them is shared at the end of each step, so every
  process saves the same step and stops (``agreed_signal``);
* a non-finite loss (or state) stops the run with a diagnostic and never checkpoints the bad
  state; the message calls a checkpoint "last good" only when its checksums were verified;
* checkpoints are sealed with checksums and verified on restore: an unreadable newest one is
  set aside with a warning and the previous one restored; one that does not fit the run
  (shapes, dtypes) is refused and nothing is touched (``checkpoint.restore_latest``);
* a run directory created with a different config is refused unless ``allow_config_change``;
  the reference is ``config.yaml`` or, when it is missing, the config stored in the checkpoint;
* nothing is written to the run directory (``config.yaml``, ``tokenizer.json``,
  ``metrics.jsonl``) until the inputs are validated and the checkpoint restored, so a failed
  start leaves nothing that blocks the corrected command;
* ``metrics.jsonl`` never loses a row at or before the restored step: later rows are dropped
  only once a checkpoint is restored (rewritten via a temporary file), a torn final line is
  dropped with a warning, a garbled earlier line is a ``MetricsError`` naming file:line, and
  the rows of an attempt with no checkpoint to resume from are moved aside, not deleted;
* a failed save (a full disk) is a ``CheckpointError``: earlier checkpoints and metrics stay;
* ``init_from`` is read (and checked to fit) only when a run starts, or on resume when the run
  directory lacks what it needs of it; the run records its source in ``init_from.json``
  (``jaxlm.warmstart``); post-training examples are tokenized with the starting model's
  tokenizer, copied into the run directory, and counted in ``examples_summary.json``; DPO's
  reference log-probs are computed once and reused on resume (``reference_logps.npz``).
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
from typing import Any, Iterator, Literal

import jax
import numpy as np
import yaml

from jaxlm import checkpoint as ckpt
from jaxlm import perf, warmstart
from jaxlm.config import ConfigError, MeshConfig, ModelConfig, read_yaml, to_dict
from jaxlm.data import DataError
from jaxlm.data.examples import ExampleDataConfig, build_example_pipeline
from jaxlm.data.pipeline import PipelineConfig, build_pipeline
from jaxlm.errors import DirectoryLock, JaxlmError
from jaxlm.files import replace_atomically, write_json
from jaxlm.objectives import DPOConfig
from jaxlm.optim import OptimizerConfig
from jaxlm.sharding import batch_shards, make_mesh
from jaxlm.train import Trainer
from jaxlm.versions import package_versions

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
    """A training run. ``objective``: ``lm`` (pretraining or continued pretraining on ``data``,
    a prepared mixture), ``sft`` or ``dpo`` (post-training on ``examples``, prompt/response or
    preference JSONL; ``jaxlm.data.examples``). ``init_from`` starts from a model's parameters
    (a jaxlm run or checkpoint step directory, or an HF directory ``checkpoint.load_model``
    reads) with a fresh optimizer and schedule; post-training needs it (DPO's frozen reference
    is that model)."""

    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    data: PipelineConfig | None = None
    objective: Literal["lm", "sft", "dpo"] = "lm"
    examples: ExampleDataConfig | None = None
    dpo: DPOConfig = DPOConfig()
    init_from: str | None = None
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
        if self.objective == "lm" and self.examples is not None:
            raise ConfigError("examples: prompt/response data is for objective sft or dpo (objective is 'lm'; use data:)")
        if self.objective != "lm":
            if self.data is not None:
                raise ConfigError(f"data: objective {self.objective!r} trains on examples:, not on a pretraining mixture")
            if self.init_from is None:
                raise ConfigError(f"init_from: objective {self.objective!r} post-trains a model: name its checkpoint")
            wanted = "sft" if self.objective == "sft" else "preference"
            if self.examples is not None and self.examples.format != wanted:
                raise ConfigError(
                    f"examples.format: objective {self.objective!r} needs {wanted!r} rows, got {self.examples.format!r}"
                )
        section = "data" if self.objective == "lm" else "examples"
        data = self.data_config
        if data is not None:
            if data.batch_size % self.grad_accum:
                raise ConfigError(
                    f"grad_accum: {section}.batch_size ({data.batch_size}) must be divisible by grad_accum ({self.grad_accum})"
                )
            if data.seq_len > self.model.max_seq_len:
                raise ConfigError(
                    f"{section}.seq_len ({data.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})"
                )

    @property
    def data_config(self) -> "PipelineConfig | ExampleDataConfig | None":
        """The section the run's batches come from (``data`` or ``examples``)."""
        return self.data if self.objective == "lm" else self.examples


MODEL_FROM_START = "init_from"  # `model: init_from`: the architecture of the model init_from names


def load_train_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """A ``TrainConfig`` from YAML plus overrides. With ``init_from`` and no ``model`` section (or
    ``model: init_from``, or one that sets only compute fields such as ``dtype``), the model
    section is the starting model's architecture (an HF checkpoint's included)."""
    from jaxlm.config import apply_overrides, from_dict

    data = apply_overrides(read_yaml(path) if path is not None else {}, overrides)
    try:
        return from_dict(TrainConfig, model_from_start(data))
    except ConfigError as err:
        if path is not None:
            raise ConfigError(f"{path}: {err}") from None
        raise


def model_from_start(data: dict) -> dict:
    """``data`` with its model section taken from ``init_from``'s model where it asks for that."""
    model = data.get("model", MODEL_FROM_START)
    init_from = data.get("init_from")
    if init_from is None:
        if "model" in data and model == MODEL_FROM_START:
            raise ConfigError(f"model: {MODEL_FROM_START!r} takes the architecture of init_from, which is not set")
        return data
    compute_only = isinstance(model, dict) and set(model) <= set(warmstart.COMPUTE_FIELDS)
    if model != MODEL_FROM_START and not compute_only:
        return data
    path = Path(os.path.expandvars(os.path.expanduser(str(init_from))))
    try:
        start = ckpt.model_config_of(path)
    except FileNotFoundError as err:
        raise ConfigError(f"init_from: {err}") from None
    return {**data, "model": {**to_dict(start), **(model if compute_only else {})}}


class NonFiniteLossError(JaxlmError, RuntimeError):
    pass


class ConfigMismatchError(JaxlmError, RuntimeError):
    pass


class MetricsError(JaxlmError):
    """``metrics.jsonl`` has a garbled line before its end (a torn final line is tolerated)."""


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


def read_run_config(run_dir: Path) -> dict | None:
    """The config a run directory was last started with (``config.yaml``), or None."""
    path = run_dir / ckpt.CONFIG_FILE
    return read_yaml(path) if path.exists() else None


# How this process joins the run, not what is trained: each process of one run has its own
# process_id, and a restarted job may get another coordinator host.
LAUNCH_FIELDS = ("distributed", "coordinator_address", "num_processes", "process_id")


def check_config(config: TrainConfig, recorded: dict, what: str, allow_config_change: bool) -> None:
    """Refuse ``config`` when it differs from ``recorded`` (``what`` says where that came from),
    unless ``allow_config_change``: then the differences are logged. ``LAUNCH_FIELDS`` are not compared."""
    def trained(c: dict) -> dict:
        return {k: v for k, v in c.items() if k not in LAUNCH_FIELDS}

    diffs = _config_diff(trained(recorded), trained(json.loads(json.dumps(to_dict(config)))))
    if diffs and not allow_config_change:
        raise ConfigMismatchError(
            f"{what} ({'; '.join(diffs[:8])}{' ...' if len(diffs) > 8 else ''}); "
            "pass --override-config to continue with the new one"
        )
    if diffs:
        log.warning("%s; continuing with the new one: %s", what, "; ".join(diffs))


def checkpoint_config_check(config: TrainConfig, run_dir: Path, allow_config_change: bool):
    """The ``check_meta`` for ``restore_latest`` when ``config.yaml`` is missing: the config
    stored in the checkpoint is the reference."""

    def check(step: int, meta: dict) -> None:
        recorded = meta.get("config") if isinstance(meta, dict) else None
        if isinstance(recorded, dict):
            what = (
                f"{run_dir}: its checkpoint at step {step} was saved with a different config "
                f"({ckpt.CONFIG_FILE} is missing, so the checkpoint's own record was compared)"
            )
            check_config(config, recorded, what, allow_config_change)

    return check


def write_run_config(config: TrainConfig, run_dir: Path) -> None:
    replace_atomically(run_dir / ckpt.CONFIG_FILE,
                       lambda tmp: tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8"))


def copy_tokenizer(source: Path | None, run_dir: Path, fresh: bool) -> None:
    """The data's tokenizer into the run directory (replacing a stale one when the run starts afresh)."""
    target = run_dir / ckpt.TOKENIZER_FILE
    if source is not None and (fresh or not target.exists()):
        tmp = target.with_name(f"{target.name}.tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)


METRICS_FILE = "metrics.jsonl"


def _row_step(line: str) -> int | None:
    """The step of one metrics row, None when the line is not a row."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    step = row.get("step") if isinstance(row, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def read_metrics_rows(path: Path) -> tuple[list[tuple[int, str]], int]:
    """(step, line) of each row of a metrics file, and how many torn final lines were dropped
    (0 or 1). A line that is not a row before the last one raises ``MetricsError``."""
    lines = [(n, line) for n, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1) if line.strip()]
    rows = []
    for position, (number, line) in enumerate(lines):
        step = _row_step(line)
        if step is not None:
            rows.append((step, line))
        elif position == len(lines) - 1:
            return rows, 1
        else:
            raise MetricsError(
                f"{path}:{number}: garbled line (expected a JSON object with an integer 'step'); "
                "only a torn final line is dropped automatically: fix or delete this line, then resume"
            )
    return rows, 0


def _free_name(path: Path, suffix: str) -> Path:
    target, n = path.with_name(path.name + suffix), 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{suffix}.{n}")
    return target


class MetricsLog:
    """``metrics.jsonl`` (+ TensorBoard).

    Resuming at ``resume_step``, rows after it are dropped (they are logged again) and every
    earlier row is kept; with nothing restored (``resume_step`` None), rows of an earlier attempt
    are moved to ``metrics.jsonl.before-restart``. A torn final line is dropped with a warning.
    """

    def __init__(self, run_dir: Path, resume_step: int | None, tensorboard: bool):
        self.path = run_dir / METRICS_FILE
        self.file = None
        self.writer = None
        if jax.process_index() != 0:
            return
        if self.path.exists():
            self._reconcile(resume_step)
        self.file = self.path.open("a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def _reconcile(self, resume_step: int | None) -> None:
        rows, torn = read_metrics_rows(self.path)
        if torn:
            log.warning("%s: dropped %d torn final line (a write cut short)", self.path, torn)
        if resume_step is None:
            if rows or torn:
                aside = _free_name(self.path, ".before-restart")
                os.replace(self.path, aside)
                log.warning("%s: no checkpoint to resume from: the earlier rows were moved to %s", self.path, aside.name)
            return
        kept = [line for step, line in rows if step <= resume_step]
        if torn or len(kept) != len(rows):
            replace_atomically(self.path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8"))

    def write(self, row: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in _flatten(row).items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.file is not None:
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


def agreed_signal(local: str | None) -> str | None:
    """The preemption signal any process has received, the same answer on every process.

    One process stopping alone would leave the others waiting in the next step's collectives,
    so each step every process contributes its flag (a signal number, 0 for none) to an
    all-gather: a sync point after which all save the same step and stop. With one process
    it is just ``local``.
    """
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    code = signal.Signals[local].value if local else 0
    received = [int(c) for c in np.asarray(multihost_utils.process_allgather(np.int32(code))).ravel() if c]
    return signal.Signals(max(received)).name if received else None


# ---------------------------------------------------------------------------------------
# Evaluation sets
# ---------------------------------------------------------------------------------------


def _eval_stream(eval_set: EvalSetConfig, path: Path, tokenizer, need: int) -> np.ndarray:
    """The first ``need`` token ids of an eval set; a read failure is a ``DataError`` naming the set and file."""
    from jaxlm.data.records import iter_prepared_tokens
    from jaxlm.data.sources import read_text

    try:
        if eval_set.kind == "text":
            return np.asarray(tokenizer.encode(read_text(path)), np.int32)[:need]
        return iter_prepared_tokens(path, need)
    except JaxlmError as err:  # already names the file
        raise DataError(f"eval_sets[{eval_set.name}]: {err}") from err
    except (OSError, EOFError, ValueError) as err:  # truncated gzip, bad bytes, unreadable file
        raise DataError(f"eval_sets[{eval_set.name}]: {path}: unreadable ({type(err).__name__}: {err})") from err


def _eval_batches(eval_set: EvalSetConfig, tokenizer, seq_len: int, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Fixed held-out batches: ``seq_len`` windows of one token stream (documents separated by EOS)."""
    need = eval_set.max_sequences * seq_len
    path = Path(os.path.expandvars(os.path.expanduser(eval_set.path)))
    if "$" in str(path):
        raise ConfigError(f"eval_sets[{eval_set.name}].path: unset environment variable in {eval_set.path!r}")
    if not path.exists():
        raise ConfigError(f"eval_sets[{eval_set.name}].path: {path} does not exist")
    stream = _eval_stream(eval_set, path, tokenizer, need)
    n_seq = len(stream) // seq_len
    if n_seq == 0:
        raise ConfigError(f"eval set {eval_set.name!r} ({eval_set.path}): fewer than seq_len={seq_len} tokens")
    rows = stream[: n_seq * seq_len].reshape(n_seq, seq_len)
    n_batches = max(n_seq // batch_size, 1)
    rows = np.resize(rows, (n_batches * batch_size, seq_len)) if n_seq < batch_size else rows[: n_batches * batch_size]
    ones = np.ones((batch_size, seq_len), np.int32)
    return [{"tokens": rows[i * batch_size : (i + 1) * batch_size], "segment_ids": ones} for i in range(n_batches)]


def load_eval_sets(config: TrainConfig, tokenizer_path: Path | None) -> list[tuple[str, list[dict[str, np.ndarray]]]]:
    """(name, batches) of every configured eval set, tokenized with the data's tokenizer."""
    if not config.eval_sets:
        return []
    from jaxlm.tokenizer import Tokenizer

    if tokenizer_path is None:
        raise ConfigError("eval_sets: the dataset has no tokenizer to tokenize held-out text with")
    tokenizer = Tokenizer.load(tokenizer_path)
    return [
        (es.name, _eval_batches(es, tokenizer, config.data_config.seq_len, config.data_config.batch_size))
        for es in config.eval_sets
    ]


# ---------------------------------------------------------------------------------------
# Data and the starting model
# ---------------------------------------------------------------------------------------

EXAMPLES_SUMMARY = "examples_summary.json"


def _needs_start_model(config: TrainConfig, run_dir: Path) -> bool:
    """Whether a resumed run must read ``init_from`` again: its tokenizer (post-training) or
    DPO's reference log-probs are missing from the run directory."""
    if config.objective == "lm":
        return False
    if not (run_dir / ckpt.TOKENIZER_FILE).exists():
        return True
    return config.objective == "dpo" and not (run_dir / warmstart.REFERENCE_FILE).exists()


def _build_data(config: TrainConfig, run_dir: Path, start_model, state: dict | None):
    """The run's batches: the pretraining mixture (``lm``) or the post-training examples, which
    are tokenized with the starting model's tokenizer (kept in the run directory)."""
    common = dict(process_index=jax.process_index(), process_count=jax.process_count(), state=state)
    if config.objective == "lm":
        return build_pipeline(config.data, num_steps=config.steps, **common)
    tokenizer = run_dir / ckpt.TOKENIZER_FILE
    if start_model is not None and (state is None or not tokenizer.exists()):
        tokenizer = warmstart.tokenizer_file(start_model)
        if tokenizer is None:
            raise ConfigError(f"init_from {config.init_from}: the model has no {ckpt.TOKENIZER_FILE} to tokenize examples with")
    return build_example_pipeline(config.examples, tokenizer, **common)


def _check_same_tokenizer(config: TrainConfig, start_model, data_tokenizer: Path | None) -> None:
    """Continued pretraining: the data must be tokenized with the starting model's tokenizer."""
    from jaxlm.tokenizer import Tokenizer

    model_tokenizer = warmstart.tokenizer_file(start_model)
    if model_tokenizer is None or data_tokenizer is None:
        return
    if Tokenizer.load(model_tokenizer).fingerprint() != Tokenizer.load(data_tokenizer).fingerprint():
        raise ConfigError(
            f"data.dataset: {config.data.dataset} was tokenized with another tokenizer than init_from "
            f"{config.init_from}; prepare it with the model's tokenizer.json"
        )


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
    if config.data_config is None:
        if config.objective == "lm":
            raise ConfigError("data: a training run needs a data section (a prepared dataset and mixture)")
        raise ConfigError(f"examples: objective {config.objective!r} needs an examples section (prompt/response JSONL)")
    if max_steps is not None and max_steps <= 0:
        raise ConfigError(f"max_steps: expected a positive step number to stop at, got {max_steps}")
    if config.distributed:
        jax.distributed.initialize(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
        )
    run_dir = Path(run_dir)
    lock = DirectoryLock(run_dir, "training run") if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        return _train_locked(config, run_dir, max_steps, allow_config_change, show_progress)


def _train_locked(
    config: TrainConfig, run_dir: Path, max_steps: int | None, allow_config_change: bool, show_progress: bool
) -> RunResult:
    """``train`` once the run directory is locked: validate and restore, then (only then) write and step."""
    recorded = read_run_config(run_dir)
    if recorded is not None:
        check_config(config, recorded, f"{run_dir} was created with a different config", allow_config_change)
    mesh = make_mesh(config.mesh)
    data = config.data_config
    shards = batch_shards(mesh)
    if data is not None and (data.batch_size // config.grad_accum) % shards:
        section = "data" if config.objective == "lm" else "examples"
        raise ConfigError(
            f"{section}.batch_size: {data.batch_size} rows per step (/ grad_accum {config.grad_accum}) do not split "
            f"over the mesh's {shards} batch shards (data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}); "
            "use a multiple, or set mesh.data / mesh.fsdp"
        )
    trainer = Trainer(
        config.model, config.optimizer, config.steps, mesh, grad_accum=config.grad_accum, z_loss=config.z_loss,
        objective=config.objective, dpo=config.dpo,
    )
    checkpoints = ckpt.RunCheckpoints(run_dir, config.checkpoint)
    pipeline = metrics_log = None
    try:
        check_meta = checkpoint_config_check(config, run_dir, allow_config_change) if recorded is None else None
        restored = checkpoints.restore_latest(trainer.abstract_state(), check_meta)
        start_model = start_info = None
        if config.init_from is not None and (restored is None or _needs_start_model(config, run_dir)):
            start_model = warmstart.load_start_model(config.init_from, config.model)
            start_info = warmstart.start_record(config.init_from, start_model)  # hashes its weights once
        pipeline = _build_data(config, run_dir, start_model, restored.data_state if restored else None)
        if pipeline.vocab_size > config.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size ({config.model.vocab_size}) is smaller than the data's tokenizer vocabulary ({pipeline.vocab_size})"
            )
        if start_model is not None and config.objective == "lm":
            _check_same_tokenizer(config, start_model, pipeline.tokenizer_path)
        eval_sets = load_eval_sets(config, pipeline.tokenizer_path or run_dir / ckpt.TOKENIZER_FILE)
        if restored is not None:
            state, start = restored.state, restored.step
            log.info("resumed %s at step %d", run_dir, start)
        elif start_model is not None:
            state, start = trainer.state_from_params(start_model.params), 0
            log.info("started %s from %s (step %s)", run_dir, config.init_from, start_model.step)
        else:
            state, start = trainer.init_state(config.seed), 0
        reference = None
        if config.objective == "dpo":
            reference = warmstart.run_reference(config, run_dir, trainer, mesh, pipeline, start_model, start_info,
                                              show_progress)
        # Inputs valid, checkpoint restored: from here on the run directory is written.
        metrics_log = MetricsLog(run_dir, restored.step if restored else None, config.tensorboard)
        if jax.process_index() == 0:
            write_run_config(config, run_dir)
            copy_tokenizer(pipeline.tokenizer_path, run_dir, fresh=restored is None)
            if start_info is not None and (restored is None or warmstart.read_start_record(run_dir) is None):
                write_json(run_dir / warmstart.START_FILE, start_info)
            if config.objective != "lm":
                write_json(run_dir / EXAMPLES_SUMMARY, pipeline.summary())
            if reference is not None and reference.computed:
                warmstart.save_reference(run_dir, reference.table, reference.fingerprint)
        start_model = start_info = None  # the parameters now live in the state
        result = _run_steps(config, run_dir, trainer, mesh, pipeline, checkpoints, metrics_log, eval_sets,
                            state, start, max_steps, show_progress, reference)
    except BaseException:
        try:
            checkpoints.close()
        except Exception as err:  # the error already propagating is the one to report
            log.warning("while stopping: %s", err)
        raise
    finally:
        if metrics_log is not None:
            metrics_log.close()
        if pipeline is not None:
            pipeline.close()
    checkpoints.close()
    return result


def _run_steps(
    config: TrainConfig,
    run_dir: Path,
    trainer: Trainer,
    mesh: Any,
    pipeline: Any,
    checkpoints: ckpt.RunCheckpoints,
    metrics_log: MetricsLog,
    eval_sets: list,
    state: Any,
    start: int,
    max_steps: int | None,
    show_progress: bool,
    reference: "warmstart.ReferenceLogprobs | None" = None,
) -> RunResult:
    """The steps from ``start`` to the end (or ``max_steps``, or a signal): log, evaluate, save."""
    stop_at = min(config.steps, max_steps) if max_steps is not None else config.steps
    example = pipeline.peek_shapes()
    if reference is not None:
        example = reference.shapes(example)
    step_fn = trainer.jit_step(example)
    window = jax.ShapeDtypeStruct((config.data_config.batch_size, config.data_config.seq_len), np.int32)
    eval_fn = trainer.jit_eval_loss({"tokens": window, "segment_ids": window}) if eval_sets else None
    peak, peak_source = perf.peak_flops_per_device(config.peak_flops)
    data = config.data_config
    flops_per_token = config.model.flops_per_token(data.seq_len) * (2 if config.objective == "dpo" else 1)
    tokens_per_step = data.batch_size * data.seq_len  # DPO: pairs x seq_len (each pair is two rows)

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

    def kept_checkpoint() -> str:
        """What the run leaves to resume from, "last good" only for a verified checkpoint."""
        checkpoints.finish()
        if checkpoints.verified_step is not None:
            return f"its last good checkpoint ({checkpoints.verified_step}) is kept in {run_dir}"
        latest = checkpoints.latest_step()
        if latest is not None:
            return f"its newest checkpoint ({latest}, not verified: it has no checksums) is kept in {run_dir}"
        return f"{run_dir} has no checkpoint yet"

    def check_finite(step: int, metrics: dict, sources: np.ndarray) -> None:
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            names = pipeline.source_names
            counts = {names[i]: int(c) for i, c in enumerate(np.bincount(sources, minlength=len(names))) if c}
            raise NonFiniteLossError(
                f"non-finite loss {loss} at step {step} (batch sources: {counts}); the run stopped and {kept_checkpoint()}"
            )

    def save(step: int) -> None:
        bad = ckpt.non_finite_leaves(state)
        if bad:
            raise NonFiniteLossError(
                f"non-finite values in the state at step {step} ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); "
                f"not checkpointed: the run stopped and {kept_checkpoint()}"
            )
        checkpoints.save(step, state, pipeline.get_state(), meta(step))

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
                if reference is not None:
                    batch = reference.attach(batch)
                state, metrics = step_fn(state, pipeline.to_global(batch, mesh))
                step += 1
                window_tokens += tokens_per_step
                if pending is not None:
                    check_finite(*pending)
                pending = (step, metrics, sources)
                checkpoints.poll()
                # read once (a signal arriving later is seen next step), agreed across processes
                received = agreed_signal(signal_flag["signal"])
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
                    save(step)
                if received:
                    stopped_by = received
                    log.warning("%s received: checkpoint saved at step %d, stopping", stopped_by, step)
                    break
    finally:
        if progress is not None:
            progress.close()
    last.setdefault("peak_flops_source", peak_source)
    return RunResult(step=int(state.step), stopped_by=stopped_by, last_metrics=last)
