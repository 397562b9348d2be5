"""Running a sweep: prepare -> pretrain -> probe -> ITI -> evaluate -> (toy) -> report, resumable.

Layout of the sweep directory ``OUT``::

    OUT/sweep.yaml                      the resolved SweepConfig
    OUT/runs/<run>/train/               a jaxlm training run (resumes itself after a kill)
    OUT/runs/<run>/probe/               activations.npy, labels.npy, probe report + heatmap
    OUT/runs/<run>/iti.safetensors      the ITI intervention (alpha set per method)
    OUT/runs/<run>/eval/<method>.json   toxicity + capability of one generation method
    OUT/toy/                            the toy experiment (when configured)
    OUT/report.md, report.json, *.png   the study's report (jaxlm.sweep.report)

Every finished unit writes ``<output>.done.json`` holding a fingerprint of everything its
output depends on (its settings and its inputs' fingerprints). A unit whose marker matches
is skipped; one whose settings changed is redone; a killed training run resumes from its
last checkpoint. So ``jaxlm sweep CONFIG`` after a kill continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jaxlm.config import ConfigError, dump_yaml, to_dict
from jaxlm.errors import DirectoryLock, JaxlmError
from jaxlm.sweep.config import SweepConfig
from jaxlm.sweep.plan import Method, RunSpec, methods_for, plan_runs, train_config

log = logging.getLogger(__name__)

STAGES = ("prepare", "train", "probe", "iti", "eval", "toy", "report")


class SweepInterrupted(RuntimeError):
    """A training run was preempted (SIGTERM/SIGINT): its checkpoint is saved; rerun to continue."""


class SweepError(JaxlmError, RuntimeError):
    """A stage was asked for whose inputs are missing or stale (``--stages`` skipped their stage)."""


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_fingerprint(manifest: dict) -> str:
    """What decides a prepared dataset's tokens: the tokenizer and each source's counts and drops;
    not when, how fast or from which file mtimes it was built (a rebuild of the same data keeps
    the sweep's runs)."""
    content = ("vocab_size", "token_dtype", "num_documents", "num_tokens", "characters", "text_bytes", "shards",
               "toxicity", "dropped")
    sources = {name: {k: source.get(k) for k in content} for name, source in sorted(manifest["sources"].items())}
    return fingerprint(manifest["tokenizer_sha256"], sources)


def _marker(output: Path) -> Path:
    return output.parent / (output.name + ".done.json")


def is_done(output: Path, fp: str) -> bool:
    marker = _marker(output)
    if not marker.exists():
        return False
    try:
        return json.loads(marker.read_text()).get("fingerprint") == fp
    except json.JSONDecodeError:
        return False


def mark_done(output: Path, fp: str, **extra: Any) -> None:
    marker = _marker(output)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fingerprint": fp, **extra}, indent=1))
    os.replace(tmp, marker)


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


@dataclasses.dataclass
class RunState:
    """What later stages need of a run: its spec, directories and upstream fingerprints."""

    spec: RunSpec
    root: Path
    train_fp: str = ""
    probe_fp: str = ""
    iti_fp: str = ""

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def probe_dir(self) -> Path:
        return self.root / "probe"

    @property
    def iti_path(self) -> Path:
        return self.root / "iti.safetensors"

    def eval_path(self, method: str) -> Path:
        return self.root / "eval" / f"{method}.json"


class Sweep:
    """One study directory; ``run()`` executes the stages in order, skipping finished work."""

    def __init__(self, config: SweepConfig, out: str | Path, *, report_dir: str | Path | None = None,
                 progress: bool = True, echo: Callable[[str], None] = print):
        self.config = config
        self.out = Path(out)
        self.report_dir = report_dir
        self.progress = progress
        self.echo = echo
        self.runs = [RunState(spec, self.out / "runs" / spec.name) for spec in plan_runs(config)]
        self.dataset: Path | None = None
        self.data_fp = ""
        self.timings: dict[str, float] = {}
        self._loaded: tuple[str, Any] | None = None  # (train fingerprint, LoadedModel) of the current run

    # -- orchestration -------------------------------------------------------------------

    def run(self, stages: tuple[str, ...] = STAGES) -> Path | None:
        """Each run in turn through train -> probe -> ITI -> eval (depth first: an interrupted
        sweep leaves complete rows, and the report is refreshed after every run), then the toy
        experiment and the final report."""
        unknown = sorted(set(stages) - set(STAGES))
        if unknown:
            raise ConfigError(f"--stages: unknown stage(s) {', '.join(unknown)}; valid: {', '.join(STAGES)}")
        with DirectoryLock(self.out, "sweep"):
            return self._run_locked(stages)

    def _run_locked(self, stages: tuple[str, ...]) -> Path | None:
        dump_yaml(self.config, self.out / "sweep.yaml")
        self.prepare(build="prepare" in stages)
        self.fingerprint_runs()
        per_run = [s for s in ("train", "probe", "iti", "eval") if s in stages]
        for i, run in enumerate(self.runs, 1):
            did_work = False
            for stage in per_run:
                if stage == "iti" and run.spec.tagged is not None:
                    continue
                started = time.perf_counter()
                if getattr(self, f"{stage}_run")(run, f"[{stage} {i}/{len(self.runs)}] {run.spec.name}"):
                    did_work = True
                    self.timings[stage] = round(self.timings.get(stage, 0.0) + time.perf_counter() - started, 1)
            if did_work and "report" in stages:
                self.report(quiet=True)
        if "toy" in stages:
            self.toy()
        return self.report() if "report" in stages else None

    # -- stages --------------------------------------------------------------------------

    def prepare(self, build: bool = True) -> None:
        """The prepared dataset of the recipe (built or reused by ``jaxlm.data.prepare``)."""
        from jaxlm.data.prepare import load_recipe, prepare

        recipe = load_recipe(self.config.recipe)
        target = Path(recipe.out) if recipe.out else self.out / "data"
        if build:
            self.echo(f"[prepare] {self.config.recipe} -> {target}")
            result = prepare(recipe, target, progress=self.progress)
            self.echo(f"[prepare] {'up to date' if result.up_to_date else 'built ' + ', '.join(result.built)}")
        manifest = target / "manifest.json"
        if not manifest.exists():
            raise SweepError(f"{manifest}: the dataset is not prepared (run the prepare stage)")
        self.dataset = target.resolve()
        self.data_fp = data_fingerprint(json.loads(manifest.read_text()))

    def fingerprint_runs(self) -> None:
        """Each run's train / probe / ITI fingerprints (cheap; every stage needs its inputs')."""
        for run in self.runs:
            run.train_fp = fingerprint(to_dict(train_config(self.config, run.spec, str(self.dataset))), self.data_fp)
            run.probe_fp = fingerprint(run.train_fp, to_dict(self.config.probe))
            run.iti_fp = fingerprint(run.probe_fp, to_dict(self.config.iti), self.config.eval.ce_len)

    def _require(self, run: RunState, output: Path, fp: str, stage: str) -> None:
        if not is_done(output, fp):
            raise SweepError(f"{run.spec.name}: {output} is missing or stale; run the {stage} stage first")

    def model(self, run: RunState):
        """The run's trained model, read from its checkpoint once for probe, calibration and eval."""
        if self._loaded is None or self._loaded[0] != run.train_fp:
            from jaxlm.checkpoint import load_model

            self._loaded = (run.train_fp, load_model(run.train_dir))
        return self._loaded[1]

    def train_run(self, run: RunState, label: str) -> bool:
        from jaxlm.loop import train

        if is_done(run.train_dir, run.train_fp):
            return False
        self.echo(label)
        self._discard_stale_training(run)
        cfg = train_config(self.config, run.spec, str(self.dataset))
        started = time.perf_counter()
        result = train(cfg, run.train_dir, show_progress=self.progress)
        if result.stopped_by != "completed":
            raise SweepInterrupted(f"{run.spec.name}: stopped by {result.stopped_by} at step {result.step}; rerun to continue")
        mark_done(run.train_dir, run.train_fp, seconds=round(time.perf_counter() - started, 1), final=result.last_metrics)
        return True

    def _discard_stale_training(self, run: RunState) -> None:
        """A training directory whose checkpoints were written under other settings is removed
        (resuming it would skip or mix the new training); one with the current settings, or a
        run killed before this record existed with no finished marker, resumes."""
        started = run.root / "train.started.json"
        previous = json.loads(started.read_text())["fingerprint"] if started.exists() else None
        stale = previous != run.train_fp if previous is not None else _marker(run.train_dir).exists()
        if stale and run.train_dir.exists():
            self.echo(f"{run.spec.name}: its settings changed since it was trained: training afresh")
            shutil.rmtree(run.train_dir)
        write_json(started, {"fingerprint": run.train_fp})

    @functools.cached_property
    def labelled(self):
        from jaxlm.data.labelled import load_labelled

        return load_labelled(self.config.probe.data)

    def probe_run(self, run: RunState, label: str) -> bool:
        from jaxlm.probe import ProbeConfig, collect_head_activations, train_probes

        settings = self.config.probe
        if is_done(run.probe_dir, run.probe_fp):
            return False
        self._require(run, run.train_dir, run.train_fp, "train")
        self.echo(label)
        started = time.perf_counter()
        model = self.model(run)
        run.probe_dir.mkdir(parents=True, exist_ok=True)
        acts = collect_head_activations(
            model.config, model.params, model.tokenizer, self.labelled.texts, batch_size=settings.batch_size,
            max_len=settings.max_len, out_path=run.probe_dir / "activations.npy", progress=self.progress,
        )
        np.save(run.probe_dir / "labels.npy", self.labelled.labels)
        probes = train_probes(acts, self.labelled.labels, ProbeConfig(C=settings.C, val_fraction=settings.val_fraction))
        probes.save_report(run.probe_dir, title=f"{run.spec.name}: {self.labelled.name} probes",
                           metadata={"data": self.labelled.name})
        mark_done(run.probe_dir, run.probe_fp, seconds=round(time.perf_counter() - started, 1),
                  mean_accuracy=float(probes.accuracy.mean()), max_accuracy=float(probes.accuracy.max()))
        return True

    def iti_run(self, run: RunState, label: str) -> bool:
        from jaxlm.intervene import Intervention
        from jaxlm.probe import load_probe_run

        settings = self.config.iti
        if is_done(run.iti_path, run.iti_fp):
            return False
        self._require(run, run.probe_dir, run.probe_fp, "probe")
        self.echo(label)
        probes, acts, labels = load_probe_run(run.probe_dir)
        intervention = Intervention.from_activations(
            acts, labels, probes.accuracy, settings.k, 0.0, "last", settings.direction, wanted_label=0,
            probe_weights=probes.weights if settings.direction == "probe" else None,
        )
        intervention.save(run.iti_path, provenance={"probe_dir": str(run.probe_dir), "k": settings.k})
        mark_done(run.iti_path, run.iti_fp, **self._calibrate(run, intervention))
        return True

    def _calibrate(self, run: RunState, intervention) -> dict[str, Any]:
        """Per-model strengths for the KL budgets (``iti.kl_targets``), with the measured curve."""
        settings = self.config.iti
        if settings.kl_targets is None:
            return {"alphas": dict(settings.alphas)}
        from jaxlm.evaluate import capability
        from jaxlm.paths import dataset_path

        model = self.model(run)
        docs = capability.read_documents(dataset_path("eval/wikitext2/valid.txt"), limit=settings.calibration_rows)
        kls = capability.kl_curve(model.config, model.params, model.tokenizer, docs, intervention,
                                  max_len=self.config.eval.ce_len, max_rows=settings.calibration_rows)
        alphas = {name: capability.alpha_for_kl(capability.ALPHA_GRID, kls, target) for name, target in settings.kl_targets.items()}
        return {"alphas": alphas, "kl_curve": {"alpha": list(capability.ALPHA_GRID), "kl": kls.tolist()}}

    def run_alphas(self, run: RunState) -> dict[str, float] | None:
        """The ITI strengths of ``run`` (calibrated ones are read from its ITI stage's record)."""
        if run.spec.tagged is not None or self.config.iti.kl_targets is None:
            return None
        if not is_done(run.iti_path, run.iti_fp):
            return None
        return json.loads(_marker(run.iti_path).read_text())["alphas"]

    @functools.cached_property
    def eval_inputs(self) -> dict[str, Any]:
        from jaxlm.evaluate import capability, protocols
        from jaxlm.evaluate.toxicity import get_scorer
        from jaxlm.paths import dataset_path

        e = self.config.eval
        return {
            "rtp": protocols.read_rtp(dataset_path("eval/rtp"), limit=e.rtp_prompts, seed=e.seed),
            "toxigen": protocols.read_toxigen(dataset_path("labelled/toxigen/prompts"), limit=e.toxigen_prompts, seed=e.seed),
            "ce_docs": capability.read_documents(dataset_path("eval/wikitext2/test.txt"), limit=e.ce_docs),
            "blimp": capability.read_blimp(dataset_path("eval/blimp"), limit_per_paradigm=e.blimp_per_paradigm),
            "scorer": get_scorer(e.scorer),
        }

    def eval_run(self, run: RunState, label: str) -> bool:
        methods = methods_for(self.config, run.spec, self.run_alphas(run))
        fps = {m.name: self._eval_fp(run, m) for m in methods}
        todo = [m for m in methods if not is_done(run.eval_path(m.name), fps[m.name])]
        if not todo:
            return False
        self._require(run, run.train_dir, run.train_fp, "train")
        if any(m.alpha for m in todo):
            self._require(run, run.iti_path, run.iti_fp, "iti")
        self.echo(f"{label}: {', '.join(m.name for m in todo)}")
        model = self.model(run)
        intervention = None
        if any(m.alpha for m in todo):
            from jaxlm.intervene import Intervention

            intervention = Intervention.load(run.iti_path, model.config)
        base_capability = None
        for method in todo:
            started = time.perf_counter()
            result = self._evaluate(model, method, intervention, base_capability)
            if method.name == "base":
                base_capability = {k: result[k] for k in ("ce", "kl", "blimp_accuracy", "blimp_per_field")}
            result.update(run=run.spec.name, method=method.name, seconds=round(time.perf_counter() - started, 1))
            write_json(run.eval_path(method.name), result)
            mark_done(run.eval_path(method.name), fps[method.name])
        return True

    def _eval_fp(self, run: RunState, method: Method) -> str:
        from jaxlm.decode import SAMPLER_VERSION
        from jaxlm.evaluate.protocols import PROMPT_ENCODING_VERSION

        upstream = run.iti_fp if method.alpha else ""
        return fingerprint(run.train_fp, upstream, dataclasses.asdict(method), to_dict(self.config.eval), SAMPLER_VERSION,
                           PROMPT_ENCODING_VERSION)

    def _evaluate(self, model, method: Method, intervention, base_capability: dict | None) -> dict[str, Any]:
        """RTP + ToxiGen toxicity under ``method``; CE/KL and BLiMP (shared with ``base`` unless ITI changes them)."""
        from jaxlm.evaluate import capability, protocols

        e, inputs = self.config.eval, self.eval_inputs
        config, params, tokenizer = model.config, model.params, model.tokenizer
        iti = intervention.with_alpha(method.alpha) if method.alpha else None
        out: dict[str, Any] = {"alpha": method.alpha, "prefix": method.prefix}
        rtp_settings = protocols.GenerationSettings(
            samples=e.rtp_samples, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, seed=e.seed, prefix=method.prefix
        )
        for name, settings in (("rtp", rtp_settings), ("toxigen", protocols.toxigen_settings(rtp_settings))):
            result = protocols.run_protocol(name, config, params, tokenizer, inputs[name], inputs["scorer"], settings, iti,
                                            progress=self.progress)
            out[name] = result.summary()
            out[f"{name}_prompt_max"] = [max(r["scores"]) for r in result.records]
            out[f"{name}_example"] = {"prompt": result.records[0]["prompt"], "continuation": result.records[0]["continuations"][0]}
        if iti is None and base_capability is not None:
            out.update(base_capability)
            return out
        cost = capability.capability_cost(config, params, tokenizer, documents=inputs["ce_docs"], pairs=inputs["blimp"],
                                          intervention=iti, max_len=e.ce_len, max_rows=e.ce_docs,
                                          batch_size=e.batch_size, progress=False)
        out.update(ce=cost["ce"], kl=cost["kl"], blimp_accuracy=cost["blimp_accuracy"], blimp_per_field=cost["per_field"])
        return out

    def toy(self) -> None:
        if self.config.toy is None:
            return
        from jaxlm.toy import load_toy_config, quick_config, run_study, write_results

        toy = load_toy_config(self.config.toy.config)
        if self.config.toy.quick:
            toy = quick_config(toy)
        output = self.out / "toy" / "toy_results.json"
        fp = fingerprint(to_dict(toy))
        if is_done(output, fp):
            return
        self.echo("[toy] the superposition experiment" + (" (quick)" if self.config.toy.quick else ""))
        write_results(run_study(toy, progress=self.progress), output.parent)
        mark_done(output, fp)

    def report(self, quiet: bool = False) -> Path:
        from jaxlm.sweep.report import write_report

        path = write_report(self.config, self.out, [r.spec for r in self.runs], timings=self.timings, report_dir=self.report_dir)
        if not quiet:
            self.echo(f"[report] {path}")
        return path
