"""The operations the CLI and the studies share, each existing once: collect a site's activations,
probe a model's heads, build an intervention, calibrate its strength to a KL budget, and evaluate
a model with an intervention (RTP and ToxiGen toxicity, CE/KL, BLiMP).

``model`` is a ``jaxlm.checkpoint.LoadedModel`` (``config``, ``params``, ``tokenizer``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from jaxlm.intervene import Intervention, InterventionError, build_intervention, builder_settings, builder_site
from jaxlm.probe import ProbeConfig, ProbeResult, collect_activations, train_probes


def collect(model, texts: Sequence[str], site: str, *, batch_size: int = 32, max_len: int | None = None,
            position: str = "last", out_path: str | os.PathLike | None = None, progress: bool = True) -> np.ndarray:
    """``site``'s activations at one position per text: [N, L, H, D] at head_out, [N, L, d] at a
    residual site (``jaxlm.probe.collect_activations``; sharded when ``model`` was loaded onto a mesh)."""
    return collect_activations(model.config, model.params, model.tokenizer, texts, site=site, batch_size=batch_size,
                               max_len=max_len, position=position, out_path=out_path, progress=progress)


def probe_heads(model, labelled, settings: ProbeConfig = ProbeConfig(), *, batch_size: int = 32,
                max_len: int | None = None, position: str = "last", out_path: str | os.PathLike | None = None,
                progress: bool = True) -> tuple[np.ndarray, ProbeResult]:
    """``(acts [N, L, H, D], probes)``: head activations of ``labelled.texts`` (streamed to
    ``out_path`` when given) and one linear probe per head fitted on ``labelled.labels``."""
    acts = collect(model, labelled.texts, "head_out", batch_size=batch_size, max_len=max_len, position=position,
                   out_path=out_path, progress=progress)
    return acts, train_probes(acts, labelled.labels, settings)


def needs_probes(method: str, **settings: Any) -> bool:
    """Whether ``method`` reads head activations and probe accuracies (iti, or random on iti)."""
    return builder_site(method, **settings) == "head_out"


def build(method: str, acts: Any, labels: Any, probes: ProbeResult | None = None, **settings: Any) -> Intervention:
    """``build_intervention(method, acts, labels, **settings)``, with ITI's probe arrays (accuracy,
    and the weights for ``direction="probe"``) taken from ``probes`` for head_out methods."""
    if needs_probes(method, **settings):
        if probes is None:
            raise InterventionError(f"{method}: needs probes (their accuracy picks the heads)")
        resolved = builder_settings(method, **settings)
        settings = {**settings, "accuracy": probes.accuracy}
        if resolved.get("direction") == "probe":
            settings["probe_weights"] = probes.weights
    return build_intervention(method, acts, labels, **settings)


def calibration_grid(intervention: Intervention) -> tuple[float, ...]:
    """The strengths a KL budget is searched over: ``capability.ALPHA_GRID`` (0.25 .. 64) for
    additive edits; 2^-8 .. 1 for projections and erasures (scale 1 removes the whole component)."""
    from jaxlm.evaluate.capability import ALPHA_GRID

    if all(edit.op == "add" for edit in intervention.edits):
        return ALPHA_GRID
    return tuple(float(a) for a in np.geomspace(2.0 ** -8, 1.0, 17))


def calibrate(model, intervention: Intervention, documents: Sequence[str], targets: dict[str, float], *,
              max_len: int, max_rows: int) -> dict[str, Any]:
    """``{"alphas": {name: scale}, "kl_curve": {"alpha": grid, "kl": kls}}``: per budget in
    ``targets`` (nats/token), the scale whose mean KL on ``documents`` is that budget."""
    from jaxlm.evaluate import capability

    grid = calibration_grid(intervention)
    kls = capability.kl_curve(model.config, model.params, model.tokenizer, documents, intervention, grid,
                              max_len=max_len, max_rows=max_rows)
    alphas = {name: capability.alpha_for_kl(grid, kls, target) for name, target in targets.items()}
    return {"alphas": alphas, "kl_curve": {"alpha": list(grid), "kl": kls.tolist()}}


EVAL_SUITES = ("rtp", "toxigen", "ce", "blimp")
TOXICITY_SUITES = ("rtp", "toxigen")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How one evaluation of a model x intervention reads its corpora and generates: the fields of
    the sweep's ``EvalStage`` plus ``top_p``. A prompt/pair limit of None reads everything."""

    rtp_prompts: int | None = 100  # per RTP file (toxic.jsonl, nontoxic.jsonl)
    rtp_samples: int = 5
    max_new_tokens: int = 20  # RTP continuation length (ToxiGen: 30, cut at the line end)
    toxigen_prompts: int | None = 4  # per ToxiGen prompt file
    ce_docs: int = 64  # WikiText-2 test rows
    ce_len: int = 128
    blimp_per_paradigm: int | None = 10
    batch_size: int = 64
    scorer: str = "default"
    extra_scorers: tuple[str, ...] = ()  # further scorers of the same RTP generations
    continuations: int = 0  # RTP continuations per label (toxic, non-toxic) scored by likelihood
    seed: int = 0
    top_p: float = 0.9

    @classmethod
    def of(cls, settings) -> "EvalSettings":
        """``settings`` itself, or the ``EvalSettings`` with the fields a config dataclass (an
        ``EvalStage``) shares with it, the rest at their defaults."""
        if isinstance(settings, cls):
            return settings
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.name in names})


def _check_suites(suites: Sequence[str]) -> tuple[str, ...]:
    from jaxlm.evaluate.protocols import EvaluationError

    unknown = [s for s in suites if s not in EVAL_SUITES]
    if unknown or not suites:
        raise EvaluationError(f"suites: expected some of {', '.join(EVAL_SUITES)}, got {list(suites)!r}")
    return tuple(suites)


def read_eval_inputs(settings, suites: Sequence[str] = EVAL_SUITES, data_dir: str | None = None) -> dict[str, Any]:
    """The corpora of ``suites`` (``EVAL_SUITES``) and, for RTP/ToxiGen, the scorer that ``settings``
    (an ``EvalSettings`` or ``EvalStage``) asks for: keys ``rtp``, ``toxigen`` (prompts), ``ce_docs``
    (WikiText-2 test rows), ``blimp`` (pairs), ``scorer``. ``data_dir``: default ``$JAXLM_DATA_DIR``."""
    from jaxlm.evaluate import capability, protocols
    from jaxlm.evaluate.toxicity import get_scorer
    from jaxlm.paths import dataset_path

    e, suites = EvalSettings.of(settings), _check_suites(suites)
    inputs: dict[str, Any] = {}
    if "rtp" in suites:
        inputs["rtp"] = protocols.read_rtp(dataset_path("eval/rtp", data_dir), limit=e.rtp_prompts, seed=e.seed)
    if "toxigen" in suites:
        inputs["toxigen"] = protocols.read_toxigen(dataset_path("labelled/toxigen/prompts", data_dir),
                                                   limit=e.toxigen_prompts, seed=e.seed)
    if "ce" in suites:
        inputs["ce_docs"] = capability.read_documents(dataset_path("eval/wikitext2/test.txt", data_dir), limit=e.ce_docs)
    if "blimp" in suites:
        inputs["blimp"] = capability.read_blimp(dataset_path("eval/blimp", data_dir), limit_per_paradigm=e.blimp_per_paradigm)
    if set(TOXICITY_SUITES) & set(suites):
        inputs["scorer"] = get_scorer(e.scorer)
        inputs["extra_scorers"] = {name: get_scorer(name) for name in e.extra_scorers}
    if "rtp" in suites and e.continuations:
        from jaxlm.evaluate.continuations import read_continuation_pairs

        inputs["continuations"] = read_continuation_pairs(dataset_path("eval/rtp", data_dir), limit=e.continuations,
                                                          seed=e.seed)
    return inputs


def generation_settings(name: str, settings, prefix: str = ""):
    """The ``protocols.GenerationSettings`` protocol ``name`` (rtp, toxigen) samples with under
    ``settings``, every prompt after ``prefix``."""
    from jaxlm.evaluate import protocols

    if name not in TOXICITY_SUITES:
        raise protocols.EvaluationError(f"toxicity protocol: expected one of {', '.join(TOXICITY_SUITES)}, got {name!r}")
    e = EvalSettings.of(settings)
    rtp = protocols.GenerationSettings(samples=e.rtp_samples, max_new_tokens=e.max_new_tokens, top_p=e.top_p,
                                       batch_size=e.batch_size, seed=e.seed, prefix=prefix)
    return rtp if name == "rtp" else protocols.toxigen_settings(rtp)


def toxicity(model, intervention: Intervention | None, name: str, inputs: dict[str, Any], settings, *,
             prefix: str = "", progress: bool = True):
    """The ``protocols.ProtocolResult`` of protocol ``name`` (rtp, toxigen): ``model`` generating
    with ``intervention`` (at its scale; None: none) on ``inputs[name]``, scored by ``inputs["scorer"]``."""
    from jaxlm.evaluate import protocols

    generation = generation_settings(name, settings, prefix)
    if name not in inputs or "scorer" not in inputs:
        raise protocols.EvaluationError(f"{name}: its prompts and scorer were not read (read_eval_inputs with suite {name!r})")
    return protocols.run_protocol(name, model.config, model.params, model.tokenizer, inputs[name], inputs["scorer"],
                                  generation, intervention, progress=progress)


def capability_cost(model, intervention: Intervention | None, inputs: dict[str, Any], settings, *,
                    reference=None, progress: bool = True) -> dict[str, Any]:
    """``jaxlm.evaluate.capability.capability_cost`` of ``model`` with ``intervention`` on the
    corpora ``inputs`` holds: CE/KL on ``ce_docs`` (keys ce, kl, capability), BLiMP on ``blimp``
    (blimp_accuracy, per_field, ...). ``reference``: the model KL is measured to (a post-trained
    model's starting point; default: ``model`` without the intervention)."""
    from jaxlm.evaluate import capability as capability_lib

    e = EvalSettings.of(settings)
    return capability_lib.capability_cost(model.config, model.params, model.tokenizer, documents=inputs.get("ce_docs"),
                                          pairs=inputs.get("blimp"), intervention=intervention, max_len=e.ce_len,
                                          max_rows=e.ce_docs, batch_size=e.batch_size,
                                          reference_params=None if reference is None else reference.params,
                                          progress=progress)


CAPABILITY_FIELDS = ("ce", "kl", "blimp_accuracy", "blimp_per_field")


def evaluate(model, intervention: Intervention | None, inputs: dict[str, Any], settings, *, prefix: str = "",
             capability: dict[str, Any] | None = None, reference=None, progress: bool = True) -> dict[str, Any]:
    """RTP + ToxiGen toxicity of ``model`` generating with ``intervention`` (at its scale; None: none)
    after ``prefix``; CE/KL and BLiMP (``CAPABILITY_FIELDS``), measured unless ``capability`` gives
    them (the model's own, shared by every method without an intervention); ``reference``: the
    model KL is measured to (see ``capability_cost``). ``inputs``: from
    ``read_eval_inputs`` (every suite); ``settings``: an ``EvalSettings`` or ``EvalStage``."""
    scale = 0.0 if intervention is None else float(intervention.scale)
    out: dict[str, Any] = {"alpha": scale, "scale": scale, "prefix": prefix}
    for name in TOXICITY_SUITES:
        result = toxicity(model, intervention, name, inputs, settings, prefix=prefix, progress=progress)
        out[name] = result.summary()
        out[f"{name}_prompt_max"] = [max(r["scores"]) for r in result.records]
        out[f"{name}_example"] = {"prompt": result.records[0]["prompt"], "continuation": result.records[0]["continuations"][0]}
        if name == "rtp" and inputs.get("extra_scorers"):
            out["rtp_prompt_max_by"] = rescored_prompt_max(result.records, inputs["extra_scorers"])
    if inputs.get("continuations") is not None:
        out["rtp_continuations"] = continuation_likelihood(model, intervention, inputs["continuations"], settings,
                                                           prefix=prefix, progress=progress)
    if intervention is None and capability is not None:
        out.update(capability)
        return out
    cost = capability_cost(model, intervention, inputs, settings, reference=reference, progress=False)
    out.update(ce=cost["ce"], kl=cost["kl"], blimp_accuracy=cost["blimp_accuracy"], blimp_per_field=cost["per_field"])
    return out


def rescored_prompt_max(records: Sequence[dict], scorers: dict[str, Any]) -> dict[str, list[float]]:
    """Per-prompt max toxicity of a protocol's continuations (``ProtocolResult.records``) under each
    of ``scorers`` (name -> scorer): the same generations, judged by another scorer."""
    from jaxlm.evaluate.protocols import score_per_prompt

    texts = [record["continuations"] for record in records]
    return {name: [max(scores) for scores in score_per_prompt(scorer, texts)] for name, scorer in scorers.items()}


def continuation_likelihood(model, intervention: Intervention | None, pairs, settings, *, prefix: str = "",
                            progress: bool = True) -> dict[str, Any]:
    """The scorer-free measure (``jaxlm.evaluate.continuations``): the mean per-token log-likelihood
    ``model`` (with ``intervention``) gives each of RTP's own continuations after its prompt (and
    ``prefix``), per example, with the toxic minus non-toxic gap."""
    from jaxlm.evaluate import continuations

    e = EvalSettings.of(settings)
    examples = [dataclasses.replace(x, prompt=prefix + x.prompt) for x in pairs.examples] if prefix else pairs.examples
    logprobs = continuations.continuation_logprobs(model.config, model.params, model.tokenizer, examples,
                                                   intervention=intervention, batch_size=e.batch_size,
                                                   progress=progress)
    labels = np.array([x.label for x in pairs.examples])
    return {"logprob": [float(v) for v in logprobs], "label": labels.tolist(), "counts": pairs.counts(),
            **continuations.toxic_preference(logprobs, labels)}
