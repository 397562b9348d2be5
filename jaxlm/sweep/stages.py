"""Running a sweep: prepare -> pretrain -> probe -> interventions ("iti") -> post-train -> evaluate ->
red-team -> scorer sanity -> (toy) -> report, resumable.

Layout of the sweep directory ``OUT``::

    OUT/sweep.yaml                      the resolved SweepConfig
    OUT/runs/<run>/train/               a jaxlm training run (resumes itself after a kill)
    OUT/runs/<run>/probe/               activations.npy, labels.npy, probe report + heatmap
    OUT/runs/<run>/iti.safetensors      the ITI intervention (the iti section; alpha set per method)
    OUT/runs/<run>/interventions/<name>.safetensors   each ``methods:`` spec's intervention
    OUT/runs/<run>/activations/<site>.npy   residual activations of the probe set (for specs)
    OUT/runs/<run>/posttrain/data/      on-policy samples, SFT rows, DPO pairs (jaxlm.onpolicy)
    OUT/runs/<run>/posttrain/{sft,dpo}/ post-training runs (init_from the run's train/)
    OUT/runs/<run>/eval/<method>.json   toxicity + capability of one generation method
    OUT/runs/<run>/redteam/<method>/    GCG attacks on one method (attacks.jsonl, summary.json)
    OUT/runs/<run>/probe/transfer.json  cross-dataset probe accuracies (probe.transfer)
    OUT/scorers/sanity.json             each scorer on the sanity suite (scorer_sanity:)
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
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jaxlm import files
from jaxlm.config import ConfigError, dump_yaml, to_dict
from jaxlm.errors import DirectoryLock, JaxlmError
from jaxlm.sweep.config import SweepConfig
from jaxlm.sweep.plan import (
    ITI_BUILD, PRETRAINED, Build, Method, RunSpec, builds, methods_for, plan_runs, posttrain_config, posttrained,
    redteamed, train_config,
)

log = logging.getLogger(__name__)

STAGES = ("prepare", "train", "probe", "iti", "posttrain", "eval", "redteam", "scorers", "toy", "report")
PER_RUN_STAGES = ("train", "probe", "iti", "posttrain", "eval", "redteam")


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
    files.write_json(_marker(output), {"fingerprint": fp, **extra})


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(path, value)


@dataclasses.dataclass
class RunState:
    """What later stages need of a run: its spec, directories and upstream fingerprints."""

    spec: RunSpec
    root: Path
    train_fp: str = ""
    probe_fp: str = ""
    iti_fp: str = ""
    build_fps: dict[str, str] = dataclasses.field(default_factory=dict)  # build name -> fingerprint
    acts_fps: dict[str, str] = dataclasses.field(default_factory=dict)  # residual site -> fingerprint
    onpolicy_fp: str = ""
    posttrain_fps: dict[str, str] = dataclasses.field(default_factory=dict)  # sft / dpo -> fingerprint

    def model_dir(self, model: str) -> Path:
        """The run directory of the run's ``model``: pretrained, or post-trained (sft, dpo)."""
        return self.train_dir if model == PRETRAINED else self.root / "posttrain" / model

    def model_fp(self, model: str) -> str:
        return self.train_fp if model == PRETRAINED else self.posttrain_fps[model]

    @property
    def onpolicy_dir(self) -> Path:
        return self.root / "posttrain" / "data"

    def redteam_dir(self, method: str) -> Path:
        return self.root / "redteam" / method

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def probe_dir(self) -> Path:
        return self.root / "probe"

    @property
    def iti_path(self) -> Path:
        return self.root / "iti.safetensors"

    def build_path(self, build: str) -> Path:
        return self.iti_path if build == ITI_BUILD else self.root / "interventions" / f"{build}.safetensors"

    def acts_path(self, site: str) -> Path:
        return self.root / "activations" / f"{site}.npy"

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
        self._loaded: dict[str, Any] = {}  # model fingerprint -> LoadedModel (at most two)

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
        per_run = [s for s in PER_RUN_STAGES if s in stages]
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
        if "scorers" in stages:
            self.scorer_sanity()
        if "toy" in stages:
            self.toy()
        return self.report() if "report" in stages else None

    # -- stages --------------------------------------------------------------------------

    def prepare(self, build: bool = True) -> None:
        """The prepared dataset of the recipe (built or reused by ``jaxlm.data.prepare``)."""
        from jaxlm.data.prepare import prepare
        from jaxlm.data.recipe import load_recipe

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
        """Each run's train / probe / activation / intervention fingerprints (cheap; every stage
        needs its inputs')."""
        from jaxlm.data.labelled import RTP_SPLIT_VERSION, TOXIGEN_SPLIT_VERSION

        probe = self.config.probe
        splits = {"rtp": RTP_SPLIT_VERSION, "toxigen": TOXIGEN_SPLIT_VERSION}  # which texts a labelled set holds
        for run in self.runs:
            run.train_fp = fingerprint(to_dict(train_config(self.config, run.spec, str(self.dataset))), self.data_fp)
            run.probe_fp = fingerprint(run.train_fp, to_dict(probe), splits)
            run.iti_fp = fingerprint(run.probe_fp, to_dict(self.config.iti), self.config.eval.ce_len)
            run.build_fps = {ITI_BUILD: run.iti_fp}
            for build in builds(self.config)[1:]:
                site = build.site
                if site != "head_out":
                    run.acts_fps[site] = fingerprint(run.train_fp, probe.data, probe.max_len, probe.batch_size, site, splits)
                upstream = run.probe_fp if site == "head_out" else run.acts_fps[site]
                # what the saved arrays depend on: not the fixed scales they are applied at
                calibration = ({k: s.kl for k, s in build.strengths.items()}, self.config.eval.ce_len,
                               self.config.iti.calibration_rows) if build.calibrated else ()
                run.build_fps[build.name] = fingerprint(upstream, build.method, build.settings, calibration)
            if posttrained(self.config, run.spec):
                from jaxlm.decode import SAMPLER_VERSION

                onpolicy = self.config.posttrain.onpolicy_config(str(self.dataset))
                run.onpolicy_fp = fingerprint(run.train_fp, to_dict(onpolicy), SAMPLER_VERSION, RTP_SPLIT_VERSION)
                run.posttrain_fps = {
                    objective: fingerprint(run.onpolicy_fp, to_dict(self._posttrain_config(run, objective)))
                    for objective in self.config.posttrain.objectives
                }

    def _require(self, run: RunState, output: Path, fp: str, stage: str) -> None:
        if not is_done(output, fp):
            raise SweepError(f"{run.spec.name}: {output} is missing or stale; run the {stage} stage first")

    def model(self, run: RunState, which: str = PRETRAINED):
        """The run's pretrained (or post-trained: ``which`` = sft, dpo) model, read from its
        checkpoint once for the stages that use it in turn."""
        fp = run.model_fp(which)
        if fp not in self._loaded:
            from jaxlm.checkpoint import load_model

            if len(self._loaded) >= 2:  # this run's pretrained model and one other at a time
                self._loaded.pop(next(k for k in self._loaded if k != run.train_fp))
            self._loaded[fp] = load_model(run.model_dir(which))
        return self._loaded[fp]

    def train_run(self, run: RunState, label: str) -> bool:
        from jaxlm.loop import train

        if is_done(run.train_dir, run.train_fp):
            return False
        self.echo(label)
        self._discard_stale(run.train_dir, run.train_fp,
                            f"{run.spec.name}: its settings changed since it was trained: training afresh")
        cfg = train_config(self.config, run.spec, str(self.dataset))
        started = time.perf_counter()
        result = train(cfg, run.train_dir, show_progress=self.progress)
        if result.stopped_by != "completed":
            raise SweepInterrupted(f"{run.spec.name}: stopped by {result.stopped_by} at step {result.step}; rerun to continue")
        mark_done(run.train_dir, run.train_fp, seconds=round(time.perf_counter() - started, 1), final=result.last_metrics)
        return True

    @functools.cached_property
    def labelled_sets(self) -> dict[str, Any]:
        """Spec -> ``LabelledSet`` of the probe set and the transfer sets (read once)."""
        from jaxlm.data.labelled import load_labelled

        return {spec: load_labelled(spec) for spec in self.config.probe.sets}

    @property
    def labelled(self):
        return self.labelled_sets[self.config.probe.data]

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
        probe_config = ProbeConfig(C=settings.C, val_fraction=settings.val_fraction, folds=settings.folds)
        probes = train_probes(acts, self.labelled.labels, probe_config)
        probes.save_report(run.probe_dir, title=f"{run.spec.name}: {self.labelled.name} probes",
                           metadata={"data": self.labelled.name})
        if settings.transfer:
            write_json(run.probe_dir / "transfer.json", self._transfer(model, np.asarray(acts), probes, probe_config))
        mark_done(run.probe_dir, run.probe_fp, seconds=round(time.perf_counter() - started, 1),
                  mean_accuracy=float(probes.accuracy.mean()), max_accuracy=float(probes.accuracy.max()))
        return True

    def _transfer(self, model, probe_acts: np.ndarray, probes, probe_config) -> dict[str, Any]:
        """Per-head probes fitted on each labelled set, tested on each other one (the diagonal: the
        probe set's own validation accuracy, the others' k-fold or held-out accuracy); mean and max
        over heads, and the accuracy of the heads ranked best on the training set (top quarter)."""
        from jaxlm.probe import collect_head_activations, train_probes, transfer_accuracies

        settings = self.config.probe
        sets = {settings.data: (probe_acts, self.labelled.labels, probes)}
        for spec in settings.transfer:
            data = self.labelled_sets[spec]
            acts = np.asarray(collect_head_activations(model.config, model.params, model.tokenizer, data.texts,
                                                       batch_size=settings.batch_size, max_len=settings.max_len,
                                                       progress=self.progress))
            sets[spec] = (acts, data.labels, train_probes(acts, data.labels, probe_config))
        names = list(sets)
        top = max(1, probes.accuracy.size // 4)
        table = {"sets": names, "n": {name: int(len(sets[name][1])) for name in names},
                 "toxic": {name: int(np.sum(sets[name][1] == 1)) for name in names}, "top_heads": top,
                 "mean_accuracy": [], "max_accuracy": [], "top_accuracy": []}
        for fit in names:
            acts, labels, own = sets[fit]
            chosen = tuple(zip(*own.top_heads(top)))
            others = [test for test in names if test != fit]
            transferred = transfer_accuracies(acts, labels, [sets[test][:2] for test in others], probe_config)
            accuracies = {fit: own.accuracy, **{test: t["accuracy"] for test, t in zip(others, transferred)}}
            rows = {"mean_accuracy": [], "max_accuracy": [], "top_accuracy": []}
            for test in names:
                accuracy = accuracies[test]
                rows["mean_accuracy"].append(float(np.mean(accuracy)))
                rows["max_accuracy"].append(float(np.max(accuracy)))
                rows["top_accuracy"].append(float(np.mean(np.asarray(accuracy)[chosen])))
            for key, values in rows.items():
                table[key].append(values)
        return table

    def iti_run(self, run: RunState, label: str) -> bool:
        """Every intervention of the run (``plan.builds``: ITI, then each spec), each built once
        from the probe set's activations at its site and calibrated to its KL budgets."""
        todo = [b for b in builds(self.config) if not is_done(run.build_path(b.name), run.build_fps[b.name])]
        if not todo:
            return False
        self._require(run, run.probe_dir, run.probe_fp, "probe")
        self.echo(f"{label}: {', '.join(b.name for b in todo)}")
        for build in todo:
            self._build(run, build)
        return True

    def _build(self, run: RunState, build: Build) -> None:
        from jaxlm import ops
        from jaxlm.intervene import InterventionError
        from jaxlm.probe import load_probe_run

        path = run.build_path(build.name)
        started = time.perf_counter()
        probes = None
        if build.site == "head_out":
            probes, acts, labels = load_probe_run(run.probe_dir)
        else:
            acts, labels = self._activations(run, build.site), self.labelled.labels
        scale = (next(iter(build.strengths.values())).scale or 1.0) if build.spec is not None else 0.0
        try:
            intervention = ops.build(build.method, acts, labels, probes, **build.settings, scale=scale)
        except InterventionError as err:
            raise InterventionError(f"{run.spec.name}: {build.name}: {err}") from None
        if build.spec is None:
            provenance = {"probe_dir": str(run.probe_dir), "k": self.config.iti.k}
        else:
            provenance = {"run": run.spec.name, "probe_data": self.config.probe.data, "method": build.method,
                          "settings": build.settings, "site": build.site}
        intervention.save(path, provenance=provenance)
        mark_done(path, run.build_fps[build.name], **self._calibrate(run, build, intervention),
                  seconds=round(time.perf_counter() - started, 1))

    def _activations(self, run: RunState, site: str) -> np.ndarray:
        """The probe set's activations at residual ``site`` (collected once per run and site)."""
        from jaxlm import ops
        from jaxlm.probe import load_array

        path, settings = run.acts_path(site), self.config.probe
        if not is_done(path, run.acts_fps[site]):
            path.parent.mkdir(parents=True, exist_ok=True)
            ops.collect(self.model(run), self.labelled.texts, site, batch_size=settings.batch_size,
                        max_len=settings.max_len, out_path=path, progress=self.progress)
            mark_done(path, run.acts_fps[site])
        return load_array(path, f"{site} activations [N, L, d_model]")

    def _calibrate(self, run: RunState, build: Build, intervention) -> dict[str, Any]:
        """The build's scale per strength key (``alphas``): fixed ones as given, KL budgets
        calibrated on this model (with the measured curve)."""
        targets = {key: s.kl for key, s in build.strengths.items() if s.calibrated}
        if not targets:
            return {"alphas": {key: s.scale for key, s in build.strengths.items()}}
        from jaxlm import ops
        from jaxlm.evaluate import capability
        from jaxlm.paths import dataset_path

        rows = self.config.iti.calibration_rows
        docs = capability.read_documents(dataset_path("eval/wikitext2/valid.txt"), limit=rows)
        return ops.calibrate(self.model(run), intervention, docs, targets, max_len=self.config.eval.ce_len, max_rows=rows)

    def run_scales(self, run: RunState) -> dict[str, dict[str, float]]:
        """Build name -> strength key -> scale, for the run's calibrated builds already made."""
        if run.spec.tagged is not None:
            return {}
        scales = {}
        for build in builds(self.config):
            path = run.build_path(build.name)
            if build.calibrated and is_done(path, run.build_fps[build.name]):
                scales[build.name] = json.loads(_marker(path).read_text())["alphas"]
        return scales

    def _posttrain_config(self, run: RunState, objective: str):
        examples = run.onpolicy_dir / ("sft.jsonl" if objective == "sft" else "dpo.jsonl")
        return posttrain_config(self.config, run.spec, objective, str(run.train_dir), str(examples))

    def posttrain_run(self, run: RunState, label: str) -> bool:
        """SFT and DPO of the run's pretrained model on data sampled from it (``jaxlm.onpolicy``)."""
        if not posttrained(self.config, run.spec):
            return False
        objectives = self.config.posttrain.objectives
        todo = [o for o in objectives if not is_done(run.model_dir(o), run.posttrain_fps[o])]
        if not todo:
            return False
        self._require(run, run.train_dir, run.train_fp, "train")
        self.echo(f"{label}: {', '.join(todo)}")
        if not is_done(run.onpolicy_dir, run.onpolicy_fp):
            from jaxlm.onpolicy import build_detox_data

            if run.onpolicy_dir.exists():  # built under other settings or from another model
                shutil.rmtree(run.onpolicy_dir)
            started = time.perf_counter()
            data = build_detox_data(self.model(run), self.config.posttrain.onpolicy_config(str(self.dataset)),
                                    out_dir=run.onpolicy_dir, progress=self.progress)
            mark_done(run.onpolicy_dir, run.onpolicy_fp, seconds=round(time.perf_counter() - started, 1),
                      counts=data.summary.get("counts"))
        from jaxlm.loop import train

        for objective in todo:
            directory, fp = run.model_dir(objective), run.posttrain_fps[objective]
            self._discard_stale(directory, fp, f"{run.spec.name}: the settings of posttrain.{objective} changed: "
                                               "post-training afresh")
            started = time.perf_counter()
            result = train(self._posttrain_config(run, objective), directory, show_progress=self.progress)
            if result.stopped_by != "completed":
                raise SweepInterrupted(f"{run.spec.name}: {objective} stopped by {result.stopped_by} at step "
                                       f"{result.step}; rerun to continue")
            mark_done(directory, fp, seconds=round(time.perf_counter() - started, 1), final=result.last_metrics)
        return True

    def redteam_run(self, run: RunState, label: str) -> bool:
        """GCG attacks on each of ``redteam.methods`` of the run (``jaxlm.evaluate.redteam``)."""
        if not redteamed(self.config, run.spec):
            return False
        methods = {m.name: m for m in methods_for(self.config, run.spec, self.run_scales(run))}
        chosen = [methods[name] for name in self.config.redteam.methods if name in methods]
        fps = {m.name: self._redteam_fp(run, m) for m in chosen}
        todo = [m for m in chosen if not is_done(run.redteam_dir(m.name), fps[m.name])]
        if not todo:
            return False
        self._require(run, run.train_dir, run.train_fp, "train")
        self.echo(f"{label}: {', '.join(m.name for m in todo)}")
        from jaxlm.evaluate import redteam

        attack = self.config.redteam.attack
        for method in todo:
            self._require_model(run, method)
            directory = run.redteam_dir(method.name)
            self._discard_stale(directory, fps[method.name], f"{run.spec.name}: the red-teaming settings of "
                                                             f"{method.name} changed: attacking afresh")
            model = self.model(run, method.model)
            pairs = redteam.attack_pairs(None, model.tokenizer, attack.pairs, attack.seed, prompt_tokens=attack.prompt_tokens,
                                         target_tokens=attack.target_tokens, min_toxicity=attack.min_toxicity)
            started = time.perf_counter()
            summary = redteam.run_attacks(
                model, pairs, attack.gcg, intervention=self._intervention(run, method, model), scorer=attack.scorer,
                out_dir=directory, continuation_tokens=attack.continuation_tokens, progress=self.progress,
                pairs_info=redteam.pair_settings(None, attack),
            )
            mark_done(directory, fps[method.name], seconds=round(time.perf_counter() - started, 1),
                      success_rate=summary.get("success_rate"))
        return True

    def _redteam_fp(self, run: RunState, method: Method) -> str:
        from jaxlm.data.labelled import RTP_SPLIT_VERSION

        upstream = run.build_fps[method.build] if method.intervened else ""
        return fingerprint(run.model_fp(method.model), upstream, method.fingerprint_fields(),
                           to_dict(self.config.redteam.attack), RTP_SPLIT_VERSION)

    def _require_model(self, run: RunState, method: Method) -> None:
        """The method's inputs are finished: its intervention build, or its post-training run."""
        if method.intervened:
            self._require(run, run.build_path(method.build), run.build_fps[method.build], "iti")
        if method.posttrained:
            self._require(run, run.model_dir(method.model), run.model_fp(method.model), "posttrain")

    def _intervention(self, run: RunState, method: Method, model):
        if not method.intervened:
            return None
        from jaxlm.intervene import Intervention

        return Intervention.load(run.build_path(method.build), model.config).with_scale(method.scale)

    def _discard_stale(self, directory: Path, fp: str, message: str) -> None:
        """Remove ``directory`` (a training run, attacks) when its work was started under other
        settings (resuming it would skip or mix them), saying ``message``; work started under
        the current ones, or killed before this record existed with no finished marker, resumes.
        Callers call it for unfinished work only."""
        started = directory.parent / f"{directory.name}.started.json"
        previous = json.loads(started.read_text())["fingerprint"] if started.exists() else None
        stale = previous != fp if previous is not None else _marker(directory).exists()
        if stale and directory.exists():
            self.echo(message)
            shutil.rmtree(directory)
        write_json(started, {"fingerprint": fp})

    @functools.cached_property
    def eval_inputs(self) -> dict[str, Any]:
        from jaxlm import ops

        return ops.read_eval_inputs(self.config.eval)

    def eval_run(self, run: RunState, label: str) -> bool:
        from jaxlm import ops

        methods = methods_for(self.config, run.spec, self.run_scales(run))
        fps = {m.name: self._eval_fp(run, m) for m in methods}
        todo = [m for m in methods if not is_done(run.eval_path(m.name), fps[m.name])]
        if not todo:
            return False
        self._require(run, run.train_dir, run.train_fp, "train")
        for method in todo:
            self._require_model(run, method)
        self.echo(f"{label}: {', '.join(m.name for m in todo)}")
        base_capability = None
        for method in todo:
            started = time.perf_counter()
            model = self.model(run, method.model)
            reference = self.model(run) if method.posttrained else None
            result = ops.evaluate(model, self._intervention(run, method, model), self.eval_inputs, self.config.eval,
                                  prefix=method.prefix, capability=None if method.posttrained else base_capability,
                                  reference=reference, progress=self.progress)
            if method.name == "base":
                base_capability = {k: result[k] for k in ops.CAPABILITY_FIELDS}
            result.update(run=run.spec.name, method=method.name, seconds=round(time.perf_counter() - started, 1))
            write_json(run.eval_path(method.name), result)
            mark_done(run.eval_path(method.name), fps[method.name])
        return True

    def _eval_fp(self, run: RunState, method: Method) -> str:
        from jaxlm.decode import SAMPLER_VERSION
        from jaxlm.data.labelled import RTP_SPLIT_VERSION, TOXIGEN_SPLIT_VERSION
        from jaxlm.evaluate.protocols import PROMPT_ENCODING_VERSION, TOXIGEN_PROMPTS_VERSION

        upstream = run.build_fps[method.build] if method.intervened else ""
        if method.posttrained:
            upstream = run.posttrain_fps[method.model]
        return fingerprint(run.train_fp, upstream, method.fingerprint_fields(), to_dict(self.config.eval), SAMPLER_VERSION,
                           PROMPT_ENCODING_VERSION, RTP_SPLIT_VERSION, TOXIGEN_PROMPTS_VERSION, TOXIGEN_SPLIT_VERSION)

    def scorer_sanity(self) -> None:
        """Every scorer of the study on the sanity suite (``jaxlm.evaluate.sanity``): floors on
        degenerate text, identity-term bias, clean vs toxic held-out text; once per sweep."""
        e, suite = self.config.eval, self.config.scorer_sanity
        if suite is None:
            return
        from jaxlm.data.records import file_sha256
        from jaxlm.evaluate import sanity
        from jaxlm.evaluate.toxicity import get_scorer
        from jaxlm.tokenizer import Tokenizer

        output = self.out / "scorers" / "sanity.json"
        tokenizer_file = self.dataset / "tokenizer.json"
        fp = fingerprint(e.scorers, suite.texts, e.seed, file_sha256(tokenizer_file), sanity.SANITY_VERSION)
        if is_done(output, fp):
            return
        self.echo(f"[scorers] sanity suite: {', '.join(e.scorers)}")
        texts = sanity.sanity_texts(Tokenizer.load(tokenizer_file), n=suite.texts, seed=e.seed)
        result = sanity.scorer_sanity({name: get_scorer(name) for name in e.scorers}, texts)
        write_json(output, result)
        mark_done(output, fp)

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
