"""EleutherAI's lm-evaluation-harness over a jaxlm model (``lm_eval`` 0.4.13).

``JaxlmLM`` is an ``lm_eval`` model (a ``TemplateLM``, the harness's ``LM`` with its shared
tokenisation): any harness task runs on a jaxlm model, with or without an ``Intervention``.

* ``loglikelihood``: (context, continuation) -> (summed log-prob of the continuation tokens,
  whether greedy decoding would produce them). Tokenised as the harness's HF model does
  (``TemplateLM._encode_pair``: the context's trailing whitespace moves onto the continuation,
  context + continuation are encoded whole and split where the context's tokens end). An empty
  context conditions on the end-of-document token (``prefix_token_id`` = ``eos_id``: BLiMP
  scored through the harness equals ``jaxlm.evaluate.capability.blimp_accuracy``, which puts
  an EOS before each sentence). A row longer than ``max_length + 1`` tokens loses context
  tokens from the left (the model then conditions on ``max_length`` tokens, as in HFLM).
* ``loglikelihood_rolling``: a document's log-likelihood over disjoint windows of
  ``max_length`` predicted tokens (``lm_eval.utils.get_rolling_token_windows``, EOS first).
* ``generate_until``: jaxlm's generation loop (``protocols.generate_token_ids``), greedy unless
  the task samples, the text cut at the first stop string; contexts keep their last tokens.

Scoring goes through ``capability.score_rows`` (rows sorted by length, one compiled program
per padded length bucket) with the intervention at every real position, as jaxlm's other
teacher-forced metrics (CE/KL, BLiMP, continuation likelihood) apply it; generation applies it
as ``jaxlm.decode`` does (each edit's position policy over prompt and generated tokens).

``run_harness`` is the one entry point of the CLI (``jaxlm eval harness``) and studies.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from jaxlm.decode import keep_last_tokens
from jaxlm.evaluate.capability import score_rows
from jaxlm.evaluate.protocols import (
    EvaluationError, GenerationSettings, check_limit, continuation_text, generate_token_ids,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  # the harness's default when a task gives no max_gen_toks
# Generation keys of a task's ``generation_kwargs`` this adapter honours (after the harness's
# ``normalize_gen_kwargs``); any other key is refused rather than silently ignored.
GENERATION_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k")


class JaxlmLM(TemplateLM):
    """A jaxlm model (``config``, ``params``, ``tokenizer``; optional ``intervention`` at its
    scale) as an lm-eval model; see the module docstring for what each request computes."""

    def __init__(
        self,
        config: Any,
        params: Any,
        tokenizer: Any,
        intervention: Any = None,
        *,
        batch_size: int = 32,
        max_length: int | None = None,
        progress: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        max_length = config.max_seq_len if max_length is None else max_length
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise EvaluationError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= config.max_seq_len:
            raise EvaluationError(f"max_length: expected an integer in 1..{config.max_seq_len} (the model's "
                                  f"max_seq_len), got {max_length!r}")
        if intervention is not None:
            intervention.check_compatible(config)
        self.config, self.params, self.tokenizer = config, params, tokenizer
        self.intervention = intervention
        self.batch_size = batch_size
        self._max_length = max_length
        self.progress = progress
        self.seed = seed

    # -- what TemplateLM asks of a model ---------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context (and a rolling window's first token) conditions on: EOS."""
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """jaxlm's encoding (no special tokens are ever added)."""
        return self.tokenizer.encode(string)

    # -- log-likelihoods -------------------------------------------------------------------

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def scoring_row(self, context: Sequence[int], continuation: Sequence[int]) -> list[int]:
        """``context + continuation`` cut from the left to ``max_length + 1`` tokens (the model
        conditions on at most ``max_length`` of them); the continuation must fit whole."""
        if not continuation:
            raise EvaluationError("loglikelihood: a continuation encodes to no tokens (nothing to score)")
        if len(continuation) > self.max_length:
            raise EvaluationError(f"loglikelihood: a continuation of {len(continuation)} tokens is longer than "
                                  f"max_length {self.max_length}")
        return (list(context) + list(continuation))[-(self.max_length + 1):]

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(summed log-prob, is_greedy) of each request's continuation tokens given its context
        tokens (``requests``: ``(key, context_ids, continuation_ids)`` as TemplateLM builds them)."""
        if not requests:
            return []
        rows = [self.scoring_row(context, continuation) for _, context, continuation in requests]
        show = self.progress and not disable_tqdm
        logps, _, greedy = score_rows(
            self.config, self.params, rows, batch_size=self.batch_size, pad_id=self.tokenizer.pad_id,
            intervention=self.intervention, progress="loglikelihood" if show else None, greedy=True,
        )
        results = []
        for (key, _, continuation), lp, best in zip(requests, logps, greedy):
            n = len(continuation)
            result = (float(lp[-n:].sum()), bool(best[-n:].all()))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
            results.append(result)
        return results

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """(context ids, predicted ids) windows covering every token of ``text`` once (HFLM's windows)."""
        windows = get_rolling_token_windows(
            token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
        )
        return [make_disjoint_window(window) for window in windows]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Each document's total log-likelihood: the sum over its windows (0 for an empty text)."""
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, predicted in self.rolling_windows(text):
                windows.append((None, context, predicted))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ------------------------------------------------------------------------

    def generation_settings(self, gen_kwargs: dict) -> tuple[GenerationSettings, list[str]]:
        """jaxlm's settings and the stop strings of one task's ``generation_kwargs``."""
        if not isinstance(gen_kwargs, dict):
            raise EvaluationError(f"generate_until: expected a dict of generation kwargs, got {gen_kwargs!r}")
        kwargs = normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKS)
        unknown = sorted(set(kwargs) - set(GENERATION_KEYS))
        if unknown:
            raise EvaluationError(f"generate_until: generation kwargs {unknown} are not supported "
                                  f"(jaxlm honours {', '.join(GENERATION_KEYS)})")
        until = kwargs["until"]
        if not all(isinstance(stop, str) for stop in until):
            raise EvaluationError(f"generate_until: 'until' must be a string or a list of strings, got {until!r}")
        sample = bool(kwargs["do_sample"])
        settings = GenerationSettings(
            samples=1, max_new_tokens=int(kwargs["max_gen_toks"]),
            temperature=float(kwargs.get("temperature") or 0.0) if sample else 0.0,
            top_p=float(kwargs.get("top_p") or 1.0), top_k=int(kwargs.get("top_k") or 0),
            batch_size=self.batch_size, seed=self.seed,
        )
        if settings.max_new_tokens >= self.max_length:
            raise EvaluationError(f"generate_until: max_gen_toks {settings.max_new_tokens} leaves no room for a "
                                  f"context within max_length {self.max_length}")
        return settings, until

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Each context's continuation, cut at the first of its stop strings (requests grouped
        by their generation kwargs; within a group sorted by length, then put back in order)."""
        args = [req.args for req in requests]
        groups: dict[str, list[int]] = defaultdict(list)
        for index, (_, gen_kwargs) in enumerate(args):
            groups[json.dumps(gen_kwargs, sort_keys=True, default=str)].append(index)
        show = self.progress and not disable_tqdm
        texts = [""] * len(args)
        for indices in groups.values():
            settings, until = self.generation_settings(args[indices[0]][1])
            encoded = self.tokenizer.encode_batch([args[i][0] for i in indices])
            room = self.max_length - settings.max_new_tokens
            encoded, _ = keep_last_tokens([ids or [self.eot_token_id] for ids in encoded], room, what="context")
            order = np.argsort([len(ids) for ids in encoded], kind="stable")
            generated = generate_token_ids(
                self.config, self.params, self.tokenizer, [encoded[j] for j in order], settings, self.intervention,
                progress="generate_until" if show else None,
            )
            for j, (sample,) in zip(order, generated):
                index = indices[j]
                texts[index] = postprocess_generated_text(continuation_text(self.tokenizer, sample, settings), until, None)
                self.cache_hook.add_partial("generate_until", args[index], texts[index])
        return texts


# ---------------------------------------------------------------------------------------
# Running tasks
# ---------------------------------------------------------------------------------------


def _yaml_state(paths: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """(file, mtime) of every task YAML below ``paths``: a changed task directory is re-indexed."""
    files = []
    for path in map(Path, paths):
        found = [path] if path.is_file() else sorted(path.rglob("*.yaml")) + sorted(path.rglob("*.yml"))
        files += [(str(f), f.stat().st_mtime_ns) for f in found]
    return tuple(files)


@functools.lru_cache(maxsize=8)
def _cached_task_manager(paths: tuple[str, ...], include_defaults: bool, _state: tuple):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths) or None, include_defaults=include_defaults)


def task_manager(include_path: str | Path | Sequence[str | Path] | None = None, include_defaults: bool = True):
    """The harness's ``TaskManager`` over its own tasks (``include_defaults``) and ``include_path``
    (directories or files of task YAMLs). Indexing the built-in tasks takes seconds, so one
    manager is kept per set of paths while their YAML files are unchanged."""
    if include_path is None:
        paths: tuple[str, ...] = ()
    elif isinstance(include_path, (str, Path)):
        paths = (str(Path(include_path).resolve()),)
    else:
        paths = tuple(str(Path(p).resolve()) for p in include_path)
    for path in paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: task include path not found")
    if not paths and not include_defaults:
        raise EvaluationError("no tasks to choose from: give include_path or keep the harness's own tasks")
    return _cached_task_manager(paths, include_defaults, _yaml_state(paths))


def check_task_names(manager: Any, tasks: Sequence[str]) -> None:
    """``EvaluationError`` naming every requested task that is neither a task, group or tag the
    manager knows nor a task YAML file."""
    if not tasks:
        raise EvaluationError("tasks: expected at least one lm-eval task name")
    known = set(manager.all_tasks)
    unknown = [name for name in tasks if name not in known and not Path(name).is_file()]
    if unknown:
        raise EvaluationError(f"unknown lm-eval task(s) {', '.join(map(repr, unknown))}: not a task, group or tag of "
                              "the harness or of the include path, nor a task YAML file")


def json_safe(value: Any) -> Any:
    """``value`` with numpy scalars as Python numbers, NaN/inf as None, anything else unknown as text."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return str(value)


def task_metrics(results: dict) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from the harness's ``results`` section: numeric values only,
    keys without the default filter suffix (``"acc,none"`` -> ``"acc"``)."""
    metrics = {}
    for task, values in results.items():
        metrics[task] = {
            key.removesuffix(",none"): float(value)
            for key, value in values.items()
            if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)
        }
    return metrics


def run_harness(
    loaded: Any,
    tasks: Sequence[str],
    *,
    intervention: Any = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    include_defaults: bool = True,
    limit: int | None = None,
    batch_size: int = 32,
    num_fewshot: int | None = None,
    max_length: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """lm-eval ``tasks`` on a ``jaxlm.checkpoint.LoadedModel`` (with ``intervention`` at its scale).

    ``include_path``: task YAMLs of one's own (beside the harness's tasks unless not
    ``include_defaults``); ``limit``: examples per task (None: all); ``num_fewshot``: overrides the
    tasks' own (None: theirs, else 0); ``seed``: the harness's seeds (python, numpy, few-shot
    sampling) and jaxlm's sampling. Returns ``metrics`` ({task: {metric: value}}), the harness's
    ``results``, ``versions``, ``n-samples`` and ``configs`` (JSON-safe), the ``settings`` and a
    ``fingerprint`` of settings and task configs.
    """
    from lm_eval import evaluator

    check_limit(limit, "limit (examples per task)")
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0):
        raise EvaluationError(f"num_fewshot: expected an integer >= 0, got {num_fewshot!r}")
    if loaded.tokenizer is None:
        raise EvaluationError(f"{loaded.source}: the model has no tokenizer (the harness needs one)")
    tasks = list(tasks)
    manager = task_manager(include_path, include_defaults)
    check_task_names(manager, tasks)
    lm = JaxlmLM(loaded.config, loaded.params, loaded.tokenizer, intervention, batch_size=batch_size,
                 max_length=max_length, progress=progress, seed=seed)
    output = evaluator.simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
        log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=None, fewshot_random_seed=seed,
    )
    from jaxlm.versions import package_versions

    settings = {
        "tasks": tasks, "include_path": None if include_path is None else json_safe(manager.include_path),
        "include_defaults": include_defaults, "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size,
        "max_length": lm.max_length, "seed": seed, "versions": package_versions(("lm_eval", "datasets")),
        "tokenizer": loaded.tokenizer.fingerprint() if hasattr(loaded.tokenizer, "fingerprint") else None,
        "intervention": None if intervention is None else {"method": intervention.method,
                                                           "scale": float(intervention.scale)},
    }
    raw = {key: json_safe(output.get(key, {})) for key in ("results", "versions", "n-samples", "configs")}
    fingerprint = hashlib.sha256(json.dumps([settings, raw["configs"]], sort_keys=True).encode()).hexdigest()
    return {"metrics": task_metrics(output["results"]), **raw, "settings": settings, "fingerprint": fingerprint}
