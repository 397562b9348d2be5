"""The operations the CLI and the studies share, each existing once: collect a site's activations,
probe a model's heads, build an intervention, calibrate its strength to a KL budget, and evaluate
a model with an intervention (RTP and ToxiGen toxicity, CE/KL, BLiMP).

``model`` is a ``jaxlm.checkpoint.LoadedModel`` (``config``, ``params``, ``tokenizer``).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from jaxlm.intervene import Intervention, InterventionError, build_intervention, builder_settings, builder_site
from jaxlm.probe import ProbeConfig, ProbeResult, collect_activations, train_probes


def collect(model, texts: Sequence[str], site: str, *, batch_size: int = 32, max_len: int | None = None,
            position: str = "last", out_path: str | os.PathLike | None = None, progress: bool = True) -> np.ndarray:
    """``site``'s activations at one position per text: [N, L, H, D] at head_out, [N, L, d] at a
    residual site (``jaxlm.probe.collect_activations``)."""
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


def read_eval_inputs(settings) -> dict[str, Any]:
    """The evaluation corpora and scorer ``settings`` (a ``jaxlm.sweep.config.EvalStage``) asks for:
    RTP and ToxiGen prompts, WikiText-2 test rows, BLiMP pairs (``$JAXLM_DATA_DIR``)."""
    from jaxlm.evaluate import capability, protocols
    from jaxlm.evaluate.toxicity import get_scorer
    from jaxlm.paths import dataset_path

    e = settings
    return {
        "rtp": protocols.read_rtp(dataset_path("eval/rtp"), limit=e.rtp_prompts, seed=e.seed),
        "toxigen": protocols.read_toxigen(dataset_path("labelled/toxigen/prompts"), limit=e.toxigen_prompts, seed=e.seed),
        "ce_docs": capability.read_documents(dataset_path("eval/wikitext2/test.txt"), limit=e.ce_docs),
        "blimp": capability.read_blimp(dataset_path("eval/blimp"), limit_per_paradigm=e.blimp_per_paradigm),
        "scorer": get_scorer(e.scorer),
    }


CAPABILITY_FIELDS = ("ce", "kl", "blimp_accuracy", "blimp_per_field")


def evaluate(model, intervention: Intervention | None, inputs: dict[str, Any], settings, *, prefix: str = "",
             capability: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """RTP + ToxiGen toxicity of ``model`` generating with ``intervention`` (at its scale; None: none)
    after ``prefix``; CE/KL and BLiMP (``CAPABILITY_FIELDS``), measured unless ``capability`` gives
    them (the model's own, shared by every method without an intervention). ``inputs``: from
    ``read_eval_inputs``; ``settings``: an ``EvalStage``."""
    from jaxlm.evaluate import capability as capability_lib
    from jaxlm.evaluate import protocols

    e = settings
    scale = 0.0 if intervention is None else float(intervention.scale)
    out: dict[str, Any] = {"alpha": scale, "scale": scale, "prefix": prefix}
    rtp_settings = protocols.GenerationSettings(
        samples=e.rtp_samples, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, seed=e.seed, prefix=prefix
    )
    for name, generation in (("rtp", rtp_settings), ("toxigen", protocols.toxigen_settings(rtp_settings))):
        result = protocols.run_protocol(name, model.config, model.params, model.tokenizer, inputs[name], inputs["scorer"],
                                        generation, intervention, progress=progress)
        out[name] = result.summary()
        out[f"{name}_prompt_max"] = [max(r["scores"]) for r in result.records]
        out[f"{name}_example"] = {"prompt": result.records[0]["prompt"], "continuation": result.records[0]["continuations"][0]}
    if intervention is None and capability is not None:
        out.update(capability)
        return out
    cost = capability_lib.capability_cost(model.config, model.params, model.tokenizer, documents=inputs["ce_docs"],
                                          pairs=inputs["blimp"], intervention=intervention, max_len=e.ce_len,
                                          max_rows=e.ce_docs, batch_size=e.batch_size, progress=False)
    out.update(ce=cost["ce"], kl=cost["kl"], blimp_accuracy=cost["blimp_accuracy"], blimp_per_field=cost["per_field"])
    return out
