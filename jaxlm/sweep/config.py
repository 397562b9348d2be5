"""The study's configuration: which models to pretrain, how to probe, intervene and evaluate them.

A ``SweepConfig`` (YAML, ``experiments/configs/sweep-*.yaml``) names a data recipe, the
toxic shares, seeds and designs to pretrain, a training template (a ``TrainConfig`` whose
``data.dataset``/``data.sources``/``steps``/``seed`` the sweep fills in), and the probe,
intervention and evaluation settings shared by every model. Interventions: the ``iti:``
section (the reference study's ITI at named strengths) and ``methods:``, a list of
intervention specs (any ``jaxlm.intervene.BUILDERS`` method, its builder settings and one
strength: a fixed scale or a KL budget calibrated per model).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Literal

from jaxlm.config import ConfigError, load
from jaxlm.evaluate.redteam import RedteamConfig
from jaxlm.objectives import DPOConfig
from jaxlm.onpolicy import OnPolicyConfig
from jaxlm.optim import OptimizerConfig

DESIGNS = ("added", "fixed_total")


def _require_positive(section: str, config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if value <= 0:
            raise ConfigError(f"{section}.{name}: expected a positive integer, got {value}")


@dataclasses.dataclass(frozen=True)
class TaggedPretraining:
    """A MEDA/INST baseline: pretrained with toxicity tags, conditioned on "non-toxic" at inference.

    ``condition``: the prompt prefix used at inference (default: the tag of the least
    toxic bucket, e.g. ``<|toxicity:0.0|>`` for MEDA). ``every``: repeat the tag before each
    ``every`` tokens of long documents (``data.tags.every``; None: once per document).
    """

    kind: Literal["meda", "inst"]
    share: float = 0.1
    design: Literal["added", "fixed_total"] = "added"
    condition: str | None = None
    every: int | None = None
    seeds: tuple[int, ...] | None = None  # None: every seed of the sweep

    def __post_init__(self) -> None:
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ConfigError(f"tagged[{self.kind}].seeds: expected distinct integers or null, got {list(self.seeds)}")
        if not 0.0 < self.share < 1.0:
            raise ConfigError(f"tagged[{self.kind}].share: expected a toxic share in (0, 1), got {self.share}")
        if self.every is not None and self.every <= 0:
            raise ConfigError(f"tagged[{self.kind}].every: expected a positive number of tokens or null, got {self.every}")


@dataclasses.dataclass(frozen=True)
class ProbeStage:
    """Per-head probes on one labelled set (a ``jaxlm.data.labelled`` spec)."""

    data: str = "toxigen"
    max_len: int = 64
    batch_size: int = 64
    C: float = 1.0
    val_fraction: float = 0.2  # folds = 1: one stratified train/validation split
    folds: int = 1  # >= 2: heads ranked by k-fold cross-validated accuracy (its spread reported)
    # Labelled sets (specs) for cross-dataset generalisation: probes fitted on each of data and
    # these, tested on every other (``probe/transfer.json``; the report's generalisation table).
    transfer: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from jaxlm.data.labelled import LabelledDataError, parse_data_spec

        _require_positive("probe", self, ("max_len", "batch_size", "folds"))
        if self.C <= 0:
            raise ConfigError(f"probe.C: expected a positive inverse regularisation strength, got {self.C}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"probe.val_fraction: expected a fraction in (0, 1), got {self.val_fraction}")
        for field, spec in [("data", self.data), *((f"transfer[{i}]", t) for i, t in enumerate(self.transfer))]:
            try:
                parse_data_spec(spec)
            except LabelledDataError as err:
                raise ConfigError(f"probe.{field}: {err}") from None
        if len(set(self.sets)) != len(self.sets):
            raise ConfigError(f"probe.transfer: expected labelled sets other than probe.data and each other, got {list(self.transfer)}")

    @property
    def sets(self) -> tuple[str, ...]:
        """The probe set, then the transfer sets."""
        return (self.data, *self.transfer)


@dataclasses.dataclass(frozen=True)
class ItiStage:
    """ITI on the top ``k`` heads with mass-mean (or probe) directions, at named strengths.

    ``alphas``: fixed strengths in units of sigma (the reference: 4 / 8 / 12 on OLMo-1B).
    ``kl_targets``: instead, calibrate each model's strengths to a capability budget: the
    alpha whose intervention (at every position) costs that mean KL per token on
    ``calibration_rows`` rows of WikiText-2 *valid* text (the evaluation uses *test*), so
    models are compared at equal cost rather than at equal alpha.
    """

    k: int = 30
    alphas: dict[str, float] = dataclasses.field(default_factory=lambda: {"weak": 4.0, "mid": 8.0, "strong": 12.0})
    kl_targets: dict[str, float] | None = None
    calibration_rows: int = 32
    direction: Literal["mass_mean", "probe"] = "mass_mean"

    def __post_init__(self) -> None:
        if self.k <= 0:
            raise ConfigError(f"iti.k: expected a positive number of heads, got {self.k}")
        if not self.alphas or any(a <= 0 for a in self.alphas.values()):
            raise ConfigError(f"iti.alphas: expected named positive strengths, got {self.alphas}")
        if self.kl_targets is not None and (not self.kl_targets or any(t <= 0 for t in self.kl_targets.values())):
            raise ConfigError(f"iti.kl_targets: expected named positive KL budgets (nats/token), got {self.kl_targets}")
        _require_positive("iti", self, ("calibration_rows",))

    @property
    def levels(self) -> dict[str, float]:
        """Strength name -> its setting (a KL budget when calibrated, else alpha), weakest first."""
        levels = self.kl_targets if self.kl_targets is not None else self.alphas
        return dict(sorted(levels.items(), key=lambda kv: kv[1]))

    def describe(self, name: str) -> str:
        return f"KL {self.levels[name]:g}" if self.kl_targets is not None else f"alpha {self.levels[name]:g}"


@dataclasses.dataclass(frozen=True)
class Strength:
    """How strongly an intervention is applied: a fixed ``scale``, or the scale whose cost is ``kl``
    nats per token on WikiText-2 *valid* text, calibrated per model (give exactly one)."""

    scale: float | None = None
    kl: float | None = None

    def __post_init__(self) -> None:
        if (self.scale is None) == (self.kl is None):
            raise ConfigError(f"strength: expected exactly one of scale or kl, got {self.describe_fields()}")
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale != 0):
            raise ConfigError(f"strength.scale: expected a finite non-zero scale, got {self.scale}")
        if self.kl is not None and not (math.isfinite(self.kl) and self.kl > 0):
            raise ConfigError(f"strength.kl: expected a positive KL budget (nats/token), got {self.kl}")

    def describe_fields(self) -> str:
        return "{" + ", ".join(f"{k}: {v}" for k, v in (("scale", self.scale), ("kl", self.kl)) if v is not None) + "}"

    @property
    def calibrated(self) -> bool:
        return self.kl is not None

    def describe(self, unit: str = "scale") -> str:
        return f"KL {self.kl:g}" if self.kl is not None else f"{unit} {self.scale:g}"


# Method names the sweep gives itself: an intervention spec may not take them.
RESERVED_METHOD_NAMES = ("base", "prompting", "tag-conditioned")
_SPEC_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


@dataclasses.dataclass(frozen=True)
class InterventionSpec:
    """One intervention evaluated on every untagged model: ``method`` (a ``jaxlm.intervene.BUILDERS``
    name) built per model from the probe set's activations with the builder's ``settings``
    (``layer``, ``site``, ``k``, ``base``, ...; not ``scale``, which ``strength`` gives), applied at
    ``strength``. ``name``: its method name in results and report (a file name: ``[a-z0-9_.-]``)."""

    name: str
    method: str
    strength: Strength | None = None
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    # A dose-response instead of one strength: the same build applied at each scale, evaluated as
    # methods ``<name>_x<scale>`` (negative scales: the opposite sign).
    scales: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        from jaxlm.intervene import BUILDERS, InterventionError, builder_settings

        where = f"methods[{self.name}]"
        if (self.strength is None) == (not self.scales):
            raise ConfigError(f"{where}: expected exactly one of strength (one scale or KL budget) or scales (a dose-response)")
        if any(not (math.isfinite(s) and s != 0) for s in self.scales) or len(set(self.scales)) != len(self.scales):
            raise ConfigError(f"{where}.scales: expected distinct finite non-zero scales, got {list(self.scales)}")
        if not _SPEC_NAME.match(self.name) or self.name in RESERVED_METHOD_NAMES or self.name.startswith("iti-"):
            raise ConfigError(f"{where}.name: expected a file-safe name ([a-z0-9_.-], at most 64 characters) other than "
                              f"{', '.join(RESERVED_METHOD_NAMES)} and iti-* (the iti section's), got {self.name!r}")
        if self.method not in BUILDERS:
            raise ConfigError(f"{where}.method: expected one of {', '.join(BUILDERS)}, got {self.method!r}")
        for name in ("scale", "accuracy", "probe_weights"):
            if name in self.settings:
                given = "strength" if name == "scale" else "the probe stage"
                raise ConfigError(f"{where}.settings.{name}: set by the sweep (from {given}); remove it")
        try:
            builder_settings(self.method, **self.settings)
        except InterventionError as err:
            raise ConfigError(f"{where}.settings: {err}") from None

    @property
    def strengths(self) -> dict[str, Strength]:
        """Method name -> strength: the spec's name for one strength, ``<name>_x<scale>`` per scale."""
        if self.strength is not None:
            return {self.name: self.strength}
        return {f"{self.name}_x{scale:g}": Strength(scale=scale) for scale in self.scales}


@dataclasses.dataclass(frozen=True)
class EvalStage:
    """Toxicity (RTP challenging + non-toxic prompts, ToxiGen prompts) and capability (CE/KL, BLiMP)."""

    rtp_prompts: int = 100  # per RTP file (toxic.jsonl, nontoxic.jsonl)
    rtp_samples: int = 5
    max_new_tokens: int = 20
    toxigen_prompts: int = 4  # per ToxiGen prompt file (hate/neutral x target group: 31 files)
    ce_docs: int = 64  # WikiText-2 test rows
    ce_len: int = 128
    blimp_per_paradigm: int = 10
    batch_size: int = 64
    scorer: str = "default"
    # Further scorers of the same generations (per-prompt scores kept for each), e.g. profanity-check.
    extra_scorers: tuple[str, ...] = ()
    # The scorer-free measure: the model's teacher-forced log-likelihood of RTP's own continuations
    # (toxic: Perspective >= 0.5, non-toxic: < 0.1), this many of each from RTP's eval part;
    # 0: not measured.
    continuations: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        from jaxlm.evaluate.toxicity import scorer_names

        _require_positive("eval", self, ("rtp_prompts", "rtp_samples", "max_new_tokens", "toxigen_prompts", "ce_docs",
                                         "ce_len", "blimp_per_paradigm", "batch_size"))
        for field, name in [("scorer", self.scorer), *((f"extra_scorers[{i}]", n) for i, n in enumerate(self.extra_scorers))]:
            if name not in scorer_names():
                raise ConfigError(f"eval.{field}: unknown toxicity scorer {name!r}; valid: {', '.join(scorer_names())}")
        if len(set(self.scorers)) != len(self.scorers):
            raise ConfigError(f"eval.extra_scorers: expected scorers other than eval.scorer and each other, got {list(self.extra_scorers)}")
        if self.continuations < 0:
            raise ConfigError(f"eval.continuations: expected a number of prompts >= 0, got {self.continuations}")

    @property
    def scorers(self) -> tuple[str, ...]:
        """The primary scorer, then the extra ones."""
        return (self.scorer, *self.extra_scorers)


@dataclasses.dataclass(frozen=True)
class PosttrainRun:
    """One post-training run per chosen model: ``init_from`` its pretrained checkpoint, trained on
    its on-policy rows (SFT) or pairs (DPO) for ``steps`` steps of ``batch_size`` examples."""

    steps: int = 100
    batch_size: int = 16
    seq_len: int | None = None  # None: the training template's data.seq_len
    # lr: experiments/configs/posttrain-cpu-small-pol10.yaml's (on cpu-small, DPO at 5e-5 had not
    # moved its reward margin after 40 steps)
    optimizer: OptimizerConfig = OptimizerConfig(lr=3e-4, warmup_steps=10, schedule="constant", weight_decay=0.0)
    dpo: DPOConfig = DPOConfig()  # DPO only

    def __post_init__(self) -> None:
        _require_positive("posttrain", self, ("steps", "batch_size"))
        if self.seq_len is not None and self.seq_len < 2:
            raise ConfigError(f"posttrain.seq_len: expected an integer >= 2 or null, got {self.seq_len}")


@dataclasses.dataclass(frozen=True)
class PosttrainStage:
    """SFT and DPO detoxification (``jaxlm.onpolicy``: the model's own samples, least vs most toxic)
    of the untagged runs at ``shares`` (None: the clean model and ``reference_share``) and
    ``designs`` (None: the sweep's first design); evaluated as the methods ``sft`` and ``dpo``."""

    shares: tuple[float, ...] | None = None
    designs: tuple[Literal["added", "fixed_total"], ...] | None = None
    seeds: tuple[int, ...] | None = None  # None: every seed
    data: dict[str, Any] = dataclasses.field(default_factory=dict)  # OnPolicyConfig fields but dataset
    sft: PosttrainRun | None = PosttrainRun()
    dpo: PosttrainRun | None = PosttrainRun()

    def __post_init__(self) -> None:
        if self.sft is None and self.dpo is None:
            raise ConfigError("posttrain: expected at least one of sft, dpo (or no posttrain section)")
        if "dataset" in self.data:
            raise ConfigError("posttrain.data.dataset: set by the sweep (its prepared dataset); remove it")
        self.onpolicy_config("(the sweep's dataset)")  # validates the fields

    def onpolicy_config(self, dataset: str) -> OnPolicyConfig:
        """The on-policy data settings with the sweep's prepared dataset (its ``pol@valid`` posts)."""
        from jaxlm.config import from_dict

        return from_dict(OnPolicyConfig, {**self.data, "dataset": dataset}, "posttrain.data")

    @property
    def objectives(self) -> tuple[str, ...]:
        return tuple(name for name in ("sft", "dpo") if getattr(self, name) is not None)


@dataclasses.dataclass(frozen=True)
class RedteamStage:
    """GCG attacks (``jaxlm.evaluate.redteam``) on the untagged runs at ``shares`` / ``designs``
    (as ``posttrain``), against each of ``methods`` (``base``, ITI levels ``iti-<level>``, a
    ``methods:`` spec's name, ``sft``, ``dpo``)."""

    shares: tuple[float, ...] | None = None
    designs: tuple[Literal["added", "fixed_total"], ...] | None = None
    seeds: tuple[int, ...] | None = None  # None: every seed
    methods: tuple[str, ...] = ("base",)
    attack: RedteamConfig = RedteamConfig(pairs=20)

    def __post_init__(self) -> None:
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"redteam.methods: expected distinct method names, got {list(self.methods)}")


@dataclasses.dataclass(frozen=True)
class ScorerSanityStage:
    """The scorer sanity suite (``jaxlm.evaluate.sanity``): ``texts`` per category, scored once per
    sweep by every scorer of the evaluation (``scorers/sanity.json``; the report's validity table)."""

    texts: int = 200

    def __post_init__(self) -> None:
        _require_positive("scorer_sanity", self, ("texts",))


@dataclasses.dataclass(frozen=True)
class ToyStage:
    """The toy superposition experiment, run alongside (``quick``: the demo sweep)."""

    quick: bool = True
    config: str | None = None


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    name: str
    recipe: str  # data recipe YAML (jaxlm.data.prepare), prepared once
    train: dict[str, Any]  # TrainConfig template
    clean: str = "gutenberg"
    toxic: str = "pol"
    shares: tuple[float, ...] = (0.0, 0.05, 0.10, 0.15, 0.20, 0.25)
    seeds: tuple[int, ...] = (0, 1)
    designs: tuple[Literal["added", "fixed_total"], ...] = DESIGNS
    tagged: tuple[TaggedPretraining, ...] = ()
    prompting: bool = True
    probe: ProbeStage = ProbeStage()
    iti: ItiStage = ItiStage()
    methods: tuple[InterventionSpec, ...] = ()
    eval: EvalStage = EvalStage()
    posttrain: PosttrainStage | None = None
    redteam: RedteamStage | None = None
    scorer_sanity: ScorerSanityStage | None = None
    toy: ToyStage | None = None
    reference_share: float = 0.1  # the share the reference study compares with the clean model

    def __post_init__(self) -> None:
        if not self.shares or any(not 0.0 <= s < 1.0 for s in self.shares):
            raise ConfigError(f"shares: expected toxic shares in [0, 1), got {list(self.shares)}")
        if len(set(self.shares)) != len(self.shares):
            raise ConfigError(f"shares: duplicate values in {list(self.shares)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: expected distinct integers, got {list(self.seeds)}")
        if not self.designs or any(d not in DESIGNS for d in self.designs):
            raise ConfigError(f"designs: expected a non-empty subset of {list(DESIGNS)}, got {list(self.designs)}")
        names = [spec.name for spec in self.methods]
        if len(set(names)) != len(names):
            raise ConfigError(f"methods: duplicate names in {names}")
        for tag in self.tagged:
            if tag.seeds is not None and not set(tag.seeds) <= set(self.seeds):
                raise ConfigError(f"tagged[{tag.kind}].seeds: expected a subset of the sweep's seeds {list(self.seeds)}")
        if 0.0 not in self.shares:
            raise ConfigError("shares: the clean model (share 0) is every comparison's baseline; add 0")
        steps = self.train.get("steps", 1000)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            raise ConfigError(f"train.steps: expected a positive integer, got {steps!r}")
        data = self.train.get("data", {})
        if not isinstance(data, dict):
            raise ConfigError(f"train.data: expected a mapping, got {data!r}")
        for key in ("dataset", "sources"):
            if key in data:
                raise ConfigError(f"train.data.{key}: set by the sweep (from recipe and shares); remove it")
        for section in ("posttrain", "redteam"):
            stage = getattr(self, section)
            if stage is not None and stage.shares is not None:
                unknown = sorted(set(stage.shares) - set(self.shares))
                if unknown:
                    raise ConfigError(f"{section}.shares: {unknown} are not among the sweep's shares {list(self.shares)}")
            if stage is not None and stage.designs is not None and not set(stage.designs) <= set(self.designs):
                raise ConfigError(f"{section}.designs: expected a subset of the sweep's designs {list(self.designs)}")
            if stage is not None and stage.seeds is not None and not set(stage.seeds) <= set(self.seeds):
                raise ConfigError(f"{section}.seeds: expected a subset of the sweep's seeds {list(self.seeds)}")


def load_sweep_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """The sweep config, with every run's training config and every stage's settings checked
    against the model's shapes (``jaxlm.sweep.plan.check_plan``), before any work starts."""
    from jaxlm.sweep.plan import check_plan

    config = load(SweepConfig, path, overrides)
    try:
        check_plan(config)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return config
