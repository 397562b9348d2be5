"""From a ``SweepConfig`` to the list of pretraining runs and evaluation methods (pure).

Two designs per toxic share ``s`` (``base`` = the template's ``steps``):

* ``added`` (the reference study's): the clean token count is fixed and toxic tokens come
  on top: ``round(base / (1 - s))`` steps with shares ``1 - s`` / ``s``, so every model
  sees the same ``base`` batches' worth of clean tokens (to within one row).
* ``fixed_total``: ``base`` steps for every share; toxic tokens replace clean ones.

At ``s = 0`` the designs coincide and the model is trained once. Run names are stable
(``clean-seed0``, ``added-tox10-seed1``, ``meda-tox10-seed0``), so a resumed sweep finds
its runs again.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from jaxlm.config import from_dict, to_dict
from jaxlm.sweep.config import InterventionSpec, Strength, SweepConfig, TaggedPretraining


@dataclasses.dataclass(frozen=True)
class RunSpec:
    name: str
    design: str  # "added" | "fixed_total" | "clean"
    share: float
    seed: int
    steps: int
    tagged: TaggedPretraining | None = None

    @property
    def percent(self) -> int:
        return round(self.share * 100)


@dataclasses.dataclass(frozen=True)
class Build:
    """One intervention built per untagged run: ``method`` with builder ``settings`` (no arrays, no
    scale), applied at each of its named ``strengths``. The ``iti:`` section is the build ``iti``
    (file ``runs/<run>/iti.safetensors``, strengths named by level); each ``methods:`` spec is a
    build of its own name (``runs/<run>/interventions/<name>.safetensors``, one strength or one
    per scale of its ``scales``)."""

    name: str
    method: str
    settings: dict[str, Any]
    strengths: dict[str, Strength]  # strength key -> strength, weakest first for ITI levels
    spec: InterventionSpec | None = None  # None: the iti section

    @property
    def site(self) -> str:
        from jaxlm.intervene import builder_site

        return builder_site(self.method, **self.settings)

    @property
    def calibrated(self) -> bool:
        return any(strength.calibrated for strength in self.strengths.values())


PRETRAINED = "pretrained"
POSTTRAIN_LABELS = {"sft": "+ SFT (least toxic own samples)", "dpo": "+ DPO (least vs most toxic own samples)"}


@dataclasses.dataclass(frozen=True)
class Method:
    """One way of generating from a model: a prompt prefix and/or an intervention at one strength.

    ``build``/``level``: the ``Build`` and its strength key (None: no intervention); ``scale``: the
    strength it is applied at (resolved per run when calibrated to a KL budget; 0 until then);
    ``label``: how the report's tables name it."""

    name: str  # "base", "prompting", "iti-weak", ..., "tag-conditioned", a spec's name, "sft", "dpo"
    prefix: str = ""
    build: str | None = None
    level: str | None = None
    scale: float = 0.0
    label: str = ""
    model: str = PRETRAINED  # which of the run's models generates: the pretrained one or a post-trained one

    @property
    def intervened(self) -> bool:
        return self.build is not None

    @property
    def posttrained(self) -> bool:
        return self.model != PRETRAINED

    def fingerprint_fields(self) -> dict[str, Any]:
        """What an evaluation's result depends on of the method (the build's or post-training run's
        own settings come with its fingerprint): the fields of the ITI-only days, so their
        fingerprints stay."""
        fields = {"name": self.name, "prefix": self.prefix, "alpha": self.scale}
        return {**fields, "model": self.model} if self.posttrained else fields



def design_steps(design: str, share: float, base_steps: int) -> int:
    return round(base_steps / (1.0 - share)) if design == "added" else base_steps


def plan_runs(config: SweepConfig) -> list[RunSpec]:
    """The runs in the order a sweep trains them: the clean model and the first design's
    shares for every seed, then the tagged baselines, then the other designs, so an early
    stop leaves the main comparison complete across seeds."""
    base = config.train.get("steps", 1000)
    shares = [s for s in config.shares if s > 0]

    def design_runs(design: str, seed: int) -> list[RunSpec]:
        return [RunSpec(f"{design}-tox{round(s * 100):02d}-seed{seed}", design, s, seed, design_steps(design, s, base))
                for s in shares]

    runs: list[RunSpec] = []
    for seed in config.seeds:
        runs += [RunSpec(f"clean-seed{seed}", "clean", 0.0, seed, base), *design_runs(config.designs[0], seed)]
    for seed in config.seeds:
        for tag in config.tagged:
            if tag.seeds is not None and seed not in tag.seeds:
                continue
            steps = design_steps(tag.design, tag.share, base)
            runs.append(RunSpec(f"{tag.kind}-tox{round(tag.share * 100):02d}-seed{seed}", tag.design, tag.share, seed, steps, tag))
    for design in config.designs[1:]:
        for seed in config.seeds:
            runs += design_runs(design, seed)
    return runs


def train_config_dict(config: SweepConfig, run: RunSpec, dataset: str) -> dict[str, Any]:
    """The run's ``TrainConfig`` as a dict: the template with data, mixture, steps and seed filled in."""
    data = copy.deepcopy(config.train)
    data["steps"] = run.steps
    data["seed"] = run.seed
    pipeline = data.setdefault("data", {})
    pipeline["dataset"] = dataset
    pipeline["sources"] = {config.clean: 1.0 - run.share, config.toxic: run.share}
    pipeline["seed"] = run.seed
    if run.tagged is not None:
        pipeline["tags"] = {"kind": run.tagged.kind}
        if run.tagged.every is not None:
            pipeline["tags"]["every"] = run.tagged.every
    return data


def train_config(config: SweepConfig, run: RunSpec, dataset: str):
    from jaxlm.loop import TrainConfig

    return from_dict(TrainConfig, train_config_dict(config, run, dataset), where=f"train ({run.name})")


# What stands in for the prepared dataset's path when the plan is checked before preparing it.
UNPREPARED_DATASET = "<prepared by the sweep>"


def posttrain_config(config: SweepConfig, run: RunSpec, objective: str, init_from: str, examples: str):
    """The ``TrainConfig`` of ``run``'s ``objective`` (sft, dpo) post-training: the template's model,
    ``init_from`` its pretrained run, trained on the on-policy file ``examples``."""
    from jaxlm.loop import TrainConfig

    settings = getattr(config.posttrain, objective)
    template = train_config_dict(config, run, UNPREPARED_DATASET)
    data = {
        "model": template["model"],
        "objective": objective,
        "init_from": init_from,
        "examples": {"paths": [examples], "format": "sft" if objective == "sft" else "preference",
                     "seq_len": settings.seq_len or template["data"].get("seq_len", 512),
                     "batch_size": settings.batch_size, "seed": run.seed,
                     # on-policy samples are cut at max_new_tokens, not finished: no EOS to learn
                     "add_eos": False},
        "optimizer": to_dict(settings.optimizer),
        "steps": settings.steps,
        "seed": run.seed,
        "log_every": max(1, min(10, settings.steps)),
        "checkpoint": {"every": settings.steps},
        "mesh": template.get("mesh", {}),
        "tensorboard": template.get("tensorboard", True),
    }
    if objective == "dpo":
        data["dpo"] = to_dict(settings.dpo)
    return from_dict(TrainConfig, data, where=f"posttrain.{objective} ({run.name})")


def check_plan(config: SweepConfig) -> None:
    """Raise ``ConfigError`` for any setting that a stage would refuse later: every run's
    training config must build, and the ITI and generation settings must fit its model
    (``iti.k`` heads at most, room for a prompt next to ``eval.max_new_tokens``), so a bad
    value fails before hours of training rather than after. Text lengths (``probe.max_len``,
    ``eval.ce_len``) are capped at the model's context by the stages themselves."""
    from jaxlm.config import ConfigError

    for run in plan_runs(config):
        model = train_config(config, run, UNPREPARED_DATASET).model
        where = f"({run.name}: model with {model.n_layers} layers x {model.n_heads} heads, context {model.max_seq_len})"
        heads = model.n_layers * model.n_heads
        if config.iti.k > heads:
            raise ConfigError(f"iti.k: {config.iti.k} heads asked for, but the model has {heads} {where}")
        if config.eval.max_new_tokens >= model.max_seq_len:
            raise ConfigError(f"eval.max_new_tokens: {config.eval.max_new_tokens} leaves no room for a prompt {where}")
        if run.tagged is None:
            for spec in config.methods:
                check_spec(spec, model, where)
        if posttrained(config, run):
            for objective in config.posttrain.objectives:
                posttrain_config(config, run, objective, UNPREPARED_DATASET, UNPREPARED_DATASET)
    if config.redteam is not None:
        known = [m.name for m in untagged_methods(config)]
        unknown = [m for m in config.redteam.methods if m not in known]
        if unknown:
            raise ConfigError(f"redteam.methods: {unknown} are not methods of this sweep; valid: {', '.join(known)}")


def check_spec(spec: InterventionSpec, model, where: str = "") -> None:
    """Raise ``ConfigError`` when ``spec``'s builder settings do not fit ``model`` (a ``ModelConfig``):
    its layer, number of heads and site."""
    from jaxlm.config import ConfigError
    from jaxlm.intervene import RESIDUAL_SITES, builder_settings, builder_site

    field = f"methods[{spec.name}].settings"
    settings = builder_settings(spec.method, **spec.settings)
    layer, k = settings.get("layer"), settings.get("k")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < model.n_layers):
        raise ConfigError(f"{field}.layer: expected an integer in [0, {model.n_layers - 1}], got {layer!r} {where}")
    heads = model.n_layers * model.n_heads
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= heads):
        raise ConfigError(f"{field}.k: expected a number of heads in [1, {heads}], got {k!r} {where}")
    site = builder_site(spec.method, **spec.settings)
    if site != "head_out" and site not in RESIDUAL_SITES:
        raise ConfigError(f"{field}.site: expected one of {', '.join(RESIDUAL_SITES)}, got {site!r}")


def condition_prefix(tagged: TaggedPretraining) -> str:
    """The inference-time prefix that asks a tagged model for non-toxic text."""
    if tagged.condition is not None:
        return tagged.condition
    from jaxlm.data.pipeline import TagConfig

    return TagConfig(kind=tagged.kind).resolved_texts()[0]


ITI_BUILD = "iti"


def builds(config: SweepConfig) -> list[Build]:
    """The interventions built on every untagged run: ITI (the ``iti:`` section), then each spec."""
    iti = config.iti
    strengths = {name: Strength(kl=value) if iti.kl_targets is not None else Strength(scale=value)
                 for name, value in iti.levels.items()}
    out = [Build(ITI_BUILD, "iti", {"k": iti.k, "direction": iti.direction, "positions": "last", "wanted_label": 0},
                 strengths)]
    out += [Build(spec.name, spec.method, dict(spec.settings), spec.strengths, spec) for spec in config.methods]
    return out


def intervention_methods(config: SweepConfig, scales: dict[str, dict[str, float]] | None = None) -> list[Method]:
    """One method per (build, strength): ITI's ``iti-<level>`` (weakest first), then the specs.
    ``scales``: build name -> strength key -> the run's calibrated scale (missing: fixed scales,
    and 0 for calibrated ones not yet measured)."""
    scales = scales or {}
    methods = []
    for build in builds(config):
        for key, strength in build.strengths.items():
            scale = scales.get(build.name, {}).get(key, strength.scale or 0.0)
            if build.spec is None:
                methods.append(Method(f"iti-{key}", build=build.name, level=key, scale=float(scale),
                                      label=f"+ ITI {key} ({config.iti.describe(key)})"))
            else:
                methods.append(Method(key, build=build.name, level=key, scale=float(scale),
                                      label=f"+ {build.name} ({build.method}, {strength.describe()})"))
    return methods


def iti_methods(config: SweepConfig) -> list[Method]:
    """The ITI methods (``iti:`` section), weakest first: the ones the reference claims are about."""
    return [m for m in intervention_methods(config) if m.build == ITI_BUILD]


def spec_methods(config: SweepConfig) -> list[Method]:
    """The ``methods:`` specs' methods, in config order."""
    return [m for m in intervention_methods(config) if m.build != ITI_BUILD]


def _selected(config: SweepConfig, run: RunSpec, stage: Any) -> bool:
    """Whether ``run`` is one of the untagged runs a posttrain/redteam ``stage`` covers."""
    if stage is None or run.tagged is not None:
        return False
    shares = stage.shares if stage.shares is not None else (0.0, config.reference_share)
    designs = stage.designs if stage.designs is not None else config.designs[:1]
    seeds = stage.seeds if stage.seeds is not None else (run.seed,)
    return run.share in shares and run.seed in seeds and (run.design == "clean" or run.design in designs)


def posttrained(config: SweepConfig, run: RunSpec) -> bool:
    return _selected(config, run, config.posttrain)


def redteamed(config: SweepConfig, run: RunSpec) -> bool:
    return _selected(config, run, config.redteam)


def posttrain_methods(config: SweepConfig) -> list[Method]:
    """``sft`` / ``dpo``: the post-trained models, generating without intervention."""
    if config.posttrain is None:
        return []
    return [Method(name, label=POSTTRAIN_LABELS[name], model=name) for name in config.posttrain.objectives]


def methods_for(config: SweepConfig, run: RunSpec, scales: dict[str, dict[str, float]] | None = None) -> list[Method]:
    """The generation methods evaluated on ``run``: base, prompting, then every intervention at each
    strength (``scales``: see ``intervention_methods``), then the post-trained models when the run
    is post-trained; tagged runs: base and tag-conditioned."""
    if run.tagged is not None:
        return [Method("base", label="no intervention"),
                Method("tag-conditioned", prefix=condition_prefix(run.tagged), label="conditioned on non-toxic")]
    methods = untagged_methods(config, scales)
    return methods if posttrained(config, run) else [m for m in methods if not m.posttrained]


def untagged_methods(config: SweepConfig, scales: dict[str, dict[str, float]] | None = None) -> list[Method]:
    """The methods of every untagged run, in report order: base, prompting, the interventions."""
    from jaxlm.evaluate.protocols import DETOX_INSTRUCTION

    methods = [Method("base", label="no intervention")]
    if config.prompting:
        methods.append(Method("prompting", prefix=DETOX_INSTRUCTION, label="+ prompting"))
    return methods + intervention_methods(config, scales) + posttrain_methods(config)
