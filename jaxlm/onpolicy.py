"""Detoxification data built from the model itself: the on-policy recipe for SFT and DPO.

The reference study (Li et al. 2025) tunes its models with SFT and DPO but does not say how its
training data were made. jaxlm builds them with the standard on-policy recipe (rejection-sampling
SFT; best-versus-worst preference pairs), exactly as follows (``OnPolicyConfig`` fields in
``backticks``):

1. **Prompt pool**, disjoint from every evaluation prompt (``prompt_pool``):

   * RTP prompts of the ``"posttrain"`` part: RTP is split once by a sha256 of each prompt's
     text (``jaxlm.data.labelled.rtp_part``, ``RTP_SPLIT_VERSION``) and evaluations read only
     the ``"eval"`` part (``protocols.read_rtp``). ``rtp_prompts`` are drawn per file
     (``toxic.jsonl``, ``nontoxic.jsonl`` below ``<data_dir>/eval/rtp``; seeded with ``seed``;
     None: all), and the file's label is kept as the prompt's group (``toxic``/``nontoxic``).
   * Openings of held-out /pol/ posts: the documents of the prepared dataset's held-out split
     ``pol_source`` (default ``pol@valid`` of ``dataset``: the recipe's ``valid_fraction`` of
     posts, which ``jaxlm data prepare`` writes apart and training never reads; its manifest
     entry must name the source it was ``held_out_from``). Every post of at least
     ``min_post_tokens`` tokens (the first part, when a long post was split) is cut to its
     first ``opening_tokens`` tokens and decoded with the dataset's tokenizer (a character cut
     in half at the end is dropped); ``pol_prompts`` of them are drawn (seeded; None: all).

   A text met twice is kept once (the first); a /pol/ opening that is an RTP eval-part prompt
   is dropped; the pool is then checked against every RTP eval-part prompt (``check_disjoint``).
2. **Samples**: ``samples_per_prompt`` (N) continuations of every prompt from the model being
   tuned, through jaxlm's one generation path (``protocols.encode_prompts`` and
   ``continue_encoded``): at most ``max_new_tokens`` new tokens, temperature ``temperature``,
   nucleus ``top_p``, ``batch_size`` rows per batch, the key of batch ``i`` =
   ``fold_in(key(seed), i)``; a prompt too long for the context keeps its last tokens
   (counted: ``truncated_prompts``). A continuation is the decoded text of its new tokens,
   without end-of-document tokens.
3. **Scores**: every continuation alone (as the RTP protocol scores them) by the offline scorer
   ``scorer`` (``jaxlm.evaluate.toxicity.get_scorer``), a probability in [0, 1].
4. **Selection**, per prompt (``select_samples``), among its candidates: every sample, less the
   empty (or whitespace-only) ones when ``drop_empty`` (an empty text scores as harmless, so it
   would always be "least toxic"):

   * chosen = the least toxic candidate, rejected = the most toxic one (the first sample of
     equal scores in both cases);
   * an SFT row ``{prompt, response = chosen}``, unless ``sft_max_score`` is set and the chosen
     score is not below it;
   * a DPO pair ``{prompt, chosen, rejected}`` when ``score(rejected) - score(chosen) >=
     min_gap`` (compared with a 1e-9 tolerance for rounding; ``min_gap > 0``, so the two
     texts differ);
   * a prompt without candidates gives neither.
5. **Outputs** (``build_detox_data``), in ``out_dir``, each written atomically (temporary file,
   then rename), ``summary.json`` last: ``samples.jsonl`` (per prompt: prompt, source, group,
   every continuation and its score, the chosen/rejected indices), ``sft.jsonl``
   (``prompt``, ``response``, ``score``, ``source``, ``group``), ``dpo.jsonl`` (``prompt``,
   ``chosen``, ``rejected``, ``chosen_score``, ``rejected_score``, ``source``, ``group``),
   ``summary.json`` (counts per source and per group: prompts, samples, empty samples, prompts
   without candidates, SFT rows and those dropped by ``sft_max_score``, DPO pairs and those
   dropped for a gap below ``min_gap``; score quantiles of all samples, of the SFT responses,
   of the chosen and rejected of the pairs and of their gaps; the pool's source counts; the
   settings, generation settings, scorer, model identity and the build's fingerprint) and
   ``scores.png`` (histograms of those scores).

The fingerprint covers the model (its config, every parameter's bytes and its tokenizer), the
pool's texts, every setting but the two locations (``data_dir``, ``dataset``) and the versions
of this recipe, the RTP split, the sampler and the prompt encoding. A directory holding a
finished build with the same fingerprint is returned as it is; one with another fingerprint is
refused (``OnPolicyError``). The directory is locked while a build writes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jaxlm.config import ConfigError, load, to_dict
from jaxlm.errors import DirectoryLock, JaxlmError
from jaxlm.files import replace_atomically, write_json, write_jsonl

ONPOLICY_VERSION = 1  # bump when the same model, pool and settings would give other rows
SOURCES = ("rtp", "pol")
SAMPLES_FILE, SFT_FILE, DPO_FILE, SUMMARY_FILE, PLOT_FILE = (
    "samples.jsonl", "sft.jsonl", "dpo.jsonl", "summary.json", "scores.png")
LOCATION_FIELDS = ("data_dir", "dataset")  # where the inputs are, not what they are: outside the fingerprint
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
GAP_TOLERANCE = 1e-9


class OnPolicyError(JaxlmError, ValueError):
    """The pool's inputs or the output directory cannot be used; the message names them."""


def _optional_count(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or value < 0):
        raise ConfigError(f"{name}: expected an integer >= 0 (0: none, null: all), got {value!r}")


@dataclasses.dataclass(frozen=True)
class OnPolicyConfig:
    """How ``build_detox_data`` builds SFT rows and DPO pairs (the module docstring says how)."""

    # the prompt pool
    rtp_prompts: int | None = 500  # per RTP file, from the "posttrain" part (0: none, null: all)
    pol_prompts: int | None = 500  # openings of held-out /pol/ posts (0: none, null: all)
    dataset: str | None = None  # the prepared dataset holding pol_source (needed when pol_prompts != 0)
    pol_source: str = "pol@valid"
    opening_tokens: int = 24
    min_post_tokens: int = 32
    data_dir: str | None = None  # corpora root holding eval/rtp (default $JAXLM_DATA_DIR)
    seed: int = 0  # pool draws and sampling
    # sampling
    samples_per_prompt: int = 8
    max_new_tokens: int = 20
    temperature: float = 1.0
    top_p: float = 0.9
    batch_size: int = 64
    # scoring and selection
    scorer: str = "default"
    min_gap: float = 0.2
    sft_max_score: float | None = None
    drop_empty: bool = True

    def __post_init__(self) -> None:
        _optional_count("rtp_prompts", self.rtp_prompts)
        _optional_count("pol_prompts", self.pol_prompts)
        if self.rtp_prompts == 0 and self.pol_prompts == 0:
            raise ConfigError("rtp_prompts, pol_prompts: both 0 leave no prompts")
        if self.pol_prompts != 0 and not self.dataset:
            raise ConfigError(f"dataset: required for pol_prompts ({self.pol_prompts}): the prepared dataset whose "
                              f"held-out split {self.pol_source!r} gives the /pol/ openings (or pol_prompts=0)")
        for name, minimum in (("opening_tokens", 1), ("samples_per_prompt", 2), ("max_new_tokens", 1),
                              ("batch_size", 1)):
            if getattr(self, name) < minimum:
                raise ConfigError(f"{name}: expected an integer >= {minimum}, got {getattr(self, name)}")
        if self.min_post_tokens < self.opening_tokens:
            raise ConfigError(f"min_post_tokens: expected >= opening_tokens ({self.opening_tokens}), "
                              f"got {self.min_post_tokens}")
        if not 0.0 < self.temperature < float("inf"):
            raise ConfigError(f"temperature: expected a finite number > 0 (greedy samples are all alike), "
                              f"got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p: expected 0 < top_p <= 1, got {self.top_p}")
        if not 0.0 < self.min_gap <= 1.0:
            raise ConfigError(f"min_gap: expected a score difference in (0, 1], got {self.min_gap}")
        if self.sft_max_score is not None and not 0.0 < self.sft_max_score <= 1.0:
            raise ConfigError(f"sft_max_score: expected a score in (0, 1] or null, got {self.sft_max_score}")
        from jaxlm.evaluate.toxicity import scorer_names

        if self.scorer not in scorer_names():
            raise ConfigError(f"scorer: unknown toxicity scorer {self.scorer!r}; valid: {', '.join(scorer_names())}")

    def generation_settings(self):
        """The ``protocols.GenerationSettings`` the samples are drawn with."""
        from jaxlm.evaluate.protocols import GenerationSettings

        return GenerationSettings(samples=self.samples_per_prompt, max_new_tokens=self.max_new_tokens,
                                  temperature=self.temperature, top_p=self.top_p, batch_size=self.batch_size,
                                  seed=self.seed)


def load_onpolicy_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> OnPolicyConfig:
    """An ``OnPolicyConfig`` from an optional YAML file plus ``key=value`` overrides."""
    return load(OnPolicyConfig, path, list(overrides))


# ---------------------------------------------------------------------------------------
# The prompt pool
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PoolPrompt:
    text: str
    source: str  # "rtp" | "pol"
    group: str  # RTP: "toxic" | "nontoxic"; /pol/: "pol"
    meta: dict = dataclasses.field(default_factory=dict)  # RTP: perspective_toxicity; /pol/: doc_id


@dataclasses.dataclass(frozen=True)
class PromptPool:
    prompts: tuple[PoolPrompt, ...]
    counts: dict  # per source: what was read, eligible and drawn; texts dropped as duplicates or eval prompts

    def fingerprint(self) -> str:
        rows = [(p.text, p.source, p.group) for p in self.prompts]
        return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode("utf-8")).hexdigest()


def rtp_directory(data_dir: str | os.PathLike | None) -> Path:
    from jaxlm.data.labelled import RTP_DIR
    from jaxlm.paths import dataset_path

    return dataset_path(RTP_DIR, data_dir)


def rtp_posttrain_prompts(config: OnPolicyConfig) -> list[PoolPrompt]:
    """``rtp_prompts`` prompts per RTP file from its "posttrain" part (seeded), group = the file's label."""
    from jaxlm.evaluate.protocols import read_rtp

    if config.rtp_prompts == 0:
        return []
    prompts = read_rtp(rtp_directory(config.data_dir), limit=config.rtp_prompts, seed=config.seed, part="posttrain")
    return [PoolPrompt(p.text, "rtp", p.label, dict(p.meta)) for p in prompts]


def held_out_source(dataset: str | os.PathLike, name: str):
    """``(manifest, SourceInfo)`` of source ``name`` of a prepared dataset, refused unless the
    manifest marks it as a held-out split (``held_out_from``: documents training never reads)."""
    from jaxlm.data import records

    manifest = records.read_manifest(dataset)
    where = manifest.root / records.MANIFEST_FILE
    if name not in manifest.sources:
        raise OnPolicyError(f"{where}: no source {name!r} (sources: {', '.join(manifest.sources)}); the /pol/ openings "
                            "come from a held-out split '<name>@valid' (a recipe source with valid_fraction > 0)")
    if not manifest.data["sources"][name].get("held_out_from"):
        raise OnPolicyError(f"{where}: sources.{name} is not a held-out split (no 'held_out_from'); its documents may "
                            "be trained on: use '<name>@valid' of a recipe source with valid_fraction > 0")
    return manifest, manifest.sources[name]


def pol_openings(config: OnPolicyConfig) -> tuple[list[PoolPrompt], dict]:
    """The openings of held-out /pol/ posts (see the module docstring) and their counts."""
    from jaxlm.data import records

    if config.pol_prompts == 0:
        return [], {}
    manifest, info = held_out_source(config.dataset, config.pol_source)
    tokenizer = records.verify_tokenizer(manifest)
    if tokenizer is None:
        raise OnPolicyError(f"{manifest.root / records.MANIFEST_FILE}: names no tokenizer, so its posts cannot be decoded")
    source = records.open_source(info.directory, info)
    posts, eligible = 0, []
    for index in range(len(source)):
        ids, meta = records.decode_record(source[index])
        if meta.get("part", 0) != 0:  # a later part of a split post: not an opening
            continue
        posts += 1
        if ids.size >= config.min_post_tokens:
            eligible.append((str(meta.get("doc_id")), records.check_token_ids(ids, info, index)[: config.opening_tokens]))
    drawn = eligible
    if config.pol_prompts is not None and config.pol_prompts < len(eligible):
        keep = np.sort(np.random.default_rng(config.seed).choice(len(eligible), config.pol_prompts, replace=False))
        drawn = [eligible[i] for i in keep]
    prompts = []
    for doc_id, ids in drawn:
        text = tokenizer.decode(ids.tolist()).rstrip("\ufffd")  # a character cut in half by the token cut
        if text.strip():
            prompts.append(PoolPrompt(text, "pol", "pol", {"doc_id": doc_id}))
    counts = {"dataset": str(manifest.root), "split": info.name,
              "held_out_from": manifest.data["sources"][info.name]["held_out_from"], "posts": posts,
              "eligible": len(eligible), "drawn": len(drawn), "blank_openings": len(drawn) - len(prompts)}
    return prompts, counts


def check_disjoint(texts: Sequence[str], eval_texts: Sequence[str]) -> None:
    """``OnPolicyError`` when any of ``texts`` is an evaluation prompt."""
    overlap = sorted(set(texts) & set(eval_texts))
    if overlap:
        raise OnPolicyError(f"prompt pool: {len(overlap)} prompt(s) are RTP evaluation prompts, e.g. {overlap[0][:60]!r}; "
                            "training prompts must never be evaluation prompts")


def prompt_pool(config: OnPolicyConfig) -> PromptPool:
    """The training prompts (module docstring, step 1): RTP "posttrain" prompts then /pol/
    openings, each text once, checked disjoint from every RTP "eval" prompt."""
    from jaxlm.data.labelled import RTP_SPLIT_VERSION
    from jaxlm.evaluate.protocols import read_rtp

    rtp = rtp_posttrain_prompts(config)
    pol, pol_counts = pol_openings(config)
    eval_texts = {p.text for p in read_rtp(rtp_directory(config.data_dir), part="eval")}
    kept, seen = [], set()
    dropped = {"duplicates": {source: 0 for source in SOURCES}, "eval_prompts": 0}
    for prompt in rtp + pol:
        if prompt.text in seen:
            dropped["duplicates"][prompt.source] += 1
        elif prompt.text in eval_texts:
            dropped["eval_prompts"] += 1
        else:
            seen.add(prompt.text)
            kept.append(prompt)
    if not kept:
        raise OnPolicyError(f"prompt pool: no prompts (rtp_prompts {config.rtp_prompts}, pol_prompts {config.pol_prompts}; "
                            f"{pol_counts.get('eligible', 0)} held-out posts of >= {config.min_post_tokens} tokens)")
    check_disjoint([p.text for p in kept], sorted(eval_texts))
    counts = {
        "rtp": {"part": "posttrain", "split_version": RTP_SPLIT_VERSION, "per_file_limit": config.rtp_prompts,
                "drawn": {group: sum(p.group == group for p in rtp) for group in ("toxic", "nontoxic")}},
        "pol": pol_counts,
        "dropped": dropped,
        "prompts": {source: sum(p.source == source for p in kept) for source in SOURCES},
    }
    return PromptPool(tuple(kept), counts)


# ---------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Selection:
    """What one prompt's samples give: indices of the chosen (least toxic) and rejected (most
    toxic) candidates (None without candidates) and whether they make an SFT row and a DPO pair."""

    chosen: int | None
    rejected: int | None
    sft: bool
    dpo: bool


def select_samples(texts: Sequence[str], scores: Sequence[float], *, min_gap: float, sft_max_score: float | None = None,
                   drop_empty: bool = True) -> Selection:
    """The selection of step 4 of the module docstring for one prompt's ``texts`` and ``scores``."""
    candidates = [i for i, text in enumerate(texts) if not (drop_empty and not text.strip())]
    if not candidates:
        return Selection(None, None, False, False)
    chosen = min(candidates, key=lambda i: (scores[i], i))
    rejected = min(candidates, key=lambda i: (-scores[i], i))
    sft = sft_max_score is None or scores[chosen] < sft_max_score
    dpo = scores[rejected] - scores[chosen] + GAP_TOLERANCE >= min_gap
    return Selection(chosen, rejected, bool(sft), bool(dpo))


COUNT_KEYS = ("prompts", "samples", "empty_samples", "no_candidates", "sft_rows", "sft_dropped_max_score",
              "dpo_pairs", "dpo_dropped_gap")


def count_rows(rows: Sequence[dict]) -> dict[str, int]:
    """``COUNT_KEYS`` of ``samples.jsonl`` rows."""
    counts = dict.fromkeys(COUNT_KEYS, 0)
    for row in rows:
        has_candidates = row["chosen"] is not None
        counts["prompts"] += 1
        counts["samples"] += len(row["continuations"])
        counts["empty_samples"] += sum(not text.strip() for text in row["continuations"])
        counts["no_candidates"] += not has_candidates
        counts["sft_rows"] += row["sft"]
        counts["sft_dropped_max_score"] += has_candidates and not row["sft"]
        counts["dpo_pairs"] += row["dpo"]
        counts["dpo_dropped_gap"] += has_candidates and not row["dpo"]
    return counts


def score_distribution(scores: Sequence[float]) -> dict[str, Any]:
    """``n``, ``mean`` and the ``QUANTILES`` of ``scores`` (None when there are none)."""
    values = np.asarray(scores, np.float64)
    if not values.size:
        return {"n": 0, "mean": None, "quantiles": None}
    return {"n": int(values.size), "mean": float(values.mean()),
            "quantiles": {f"{q:g}": float(v) for q, v in zip(QUANTILES, np.quantile(values, QUANTILES))}}


def training_rows(rows: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """The ``sft.jsonl`` and ``dpo.jsonl`` rows of ``samples.jsonl`` rows."""
    sft, dpo = [], []
    for row in rows:
        texts, scores, tags = row["continuations"], row["scores"], {"source": row["source"], "group": row["group"]}
        if row["sft"]:
            sft.append({"prompt": row["prompt"], "response": texts[row["chosen"]], "score": scores[row["chosen"]], **tags})
        if row["dpo"]:
            dpo.append({"prompt": row["prompt"], "chosen": texts[row["chosen"]], "rejected": texts[row["rejected"]],
                        "chosen_score": scores[row["chosen"]], "rejected_score": scores[row["rejected"]], **tags})
    return sft, dpo


def score_series(rows: Sequence[dict]) -> dict[str, list[float]]:
    """Scores of every sample (``all``), of the SFT responses (``sft``), of the DPO pairs'
    ``chosen`` and ``rejected`` and their ``gap``."""
    series: dict[str, list[float]] = {"all": [], "sft": [], "chosen": [], "rejected": [], "gap": []}
    for row in rows:
        scores = row["scores"]
        series["all"] += scores
        if row["sft"]:
            series["sft"].append(scores[row["chosen"]])
        if row["dpo"]:
            series["chosen"].append(scores[row["chosen"]])
            series["rejected"].append(scores[row["rejected"]])
            series["gap"].append(scores[row["rejected"]] - scores[row["chosen"]])
    return series


# ---------------------------------------------------------------------------------------
# Building the data
# ---------------------------------------------------------------------------------------


def model_fingerprint(model) -> str:
    """sha256 of a ``LoadedModel``'s config, parameters (``checkpoint.params_sha256``) and tokenizer:
    the same weights give the same fingerprint wherever they were loaded from."""
    from jaxlm.checkpoint import params_sha256

    tokenizer = model.tokenizer.fingerprint() if hasattr(model.tokenizer, "fingerprint") else repr(model.tokenizer)
    parts = [to_dict(model.config), params_sha256(model.params), tokenizer]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def build_fingerprint(model_fp: str, config: OnPolicyConfig, pool: PromptPool) -> str:
    """The fingerprint of a build (module docstring): model, pool texts, settings, versions."""
    from jaxlm.data.labelled import RTP_SPLIT_VERSION
    from jaxlm.decode import SAMPLER_VERSION
    from jaxlm.evaluate.protocols import PROMPT_ENCODING_VERSION

    settings = {k: v for k, v in to_dict(config).items() if k not in LOCATION_FIELDS}
    parts = {"onpolicy": ONPOLICY_VERSION, "rtp_split": RTP_SPLIT_VERSION, "sampler": SAMPLER_VERSION,
             "prompt_encoding": PROMPT_ENCODING_VERSION, "model": model_fp, "pool": pool.fingerprint(),
             "settings": settings}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class DetoxData:
    """A finished build in ``out_dir``; ``reused``: it was there already (same fingerprint)."""

    out_dir: Path
    summary: dict
    reused: bool

    @property
    def samples_path(self) -> Path:
        return self.out_dir / SAMPLES_FILE

    @property
    def sft_path(self) -> Path:
        return self.out_dir / SFT_FILE

    @property
    def dpo_path(self) -> Path:
        return self.out_dir / DPO_FILE

    @property
    def summary_path(self) -> Path:
        return self.out_dir / SUMMARY_FILE

    @property
    def plot_path(self) -> Path:
        return self.out_dir / PLOT_FILE


def finished_build(out_dir: Path) -> dict | None:
    """The ``summary.json`` of a finished build in ``out_dir`` (None when there is none)."""
    path = out_dir / SUMMARY_FILE
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OnPolicyError(f"{path}: unreadable summary of an earlier build ({err}); remove {out_dir} to rebuild") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("fingerprint"), str):
        raise OnPolicyError(f"{path}: not the summary of a `jaxlm posttrain data` build (no fingerprint); "
                            f"remove {out_dir} or choose another output directory")
    return summary


def plot_scores(series: dict[str, list[float]], path: Path) -> None:
    """Histograms (densities, so sets of different sizes compare) of all sample scores and of the
    SFT responses', the pairs' chosen and rejected scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    bins = np.linspace(0.0, 1.0, 41)
    for name, color in (("all", "0.5"), ("sft", "tab:green"), ("chosen", "tab:blue"), ("rejected", "tab:red")):
        if series[name]:
            ax.hist(series[name], bins=bins, density=True, histtype="step", linewidth=1.5, color=color,
                    label=f"{name} ({len(series[name])})")
    ax.set_xlabel("toxicity score")
    ax.set_ylabel("density")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def sample_rows(pool: PromptPool, continuations: Sequence[Sequence[str]], scores: Sequence[Sequence[float]],
                config: OnPolicyConfig) -> list[dict]:
    """One ``samples.jsonl`` row per prompt: its samples, their scores and the selection."""
    rows = []
    for prompt, texts, prompt_scores in zip(pool.prompts, continuations, scores):
        selection = select_samples(texts, prompt_scores, min_gap=config.min_gap, sft_max_score=config.sft_max_score,
                                   drop_empty=config.drop_empty)
        rows.append({"prompt": prompt.text, "source": prompt.source, "group": prompt.group, "meta": prompt.meta,
                     "continuations": list(texts), "scores": [float(s) for s in prompt_scores],
                     **dataclasses.asdict(selection)})
    return rows


def summarize(rows: Sequence[dict], pool: PromptPool, config: OnPolicyConfig, model, *, fingerprint: str,
              model_fp: str, truncated: int, seconds: float) -> dict:
    """``summary.json``: counts, score distributions, settings, model identity, fingerprint."""
    from jaxlm.data.labelled import RTP_SPLIT_VERSION

    series = score_series(rows)
    return {
        "fingerprint": fingerprint,
        "recipe_version": ONPOLICY_VERSION,
        "rtp_split_version": RTP_SPLIT_VERSION,
        "model": {"source": str(model.source), "step": model.step, "fingerprint": model_fp},
        "scorer": config.scorer,
        "generation": dataclasses.asdict(config.generation_settings()),
        "settings": to_dict(config),
        "pool": pool.counts,
        "truncated_prompts": truncated,
        "counts": {**{source: count_rows([r for r in rows if r["source"] == source]) for source in SOURCES},
                   "all": count_rows(rows)},
        "counts_by_group": {group: count_rows([r for r in rows if r["group"] == group])
                            for group in sorted({r["group"] for r in rows})},
        "scores": {name: score_distribution(values) for name, values in series.items()},
        "files": {"samples": SAMPLES_FILE, "sft": SFT_FILE, "dpo": DPO_FILE, "plot": PLOT_FILE},
        "seconds": round(seconds, 1),
    }


def build_detox_data(model, config: OnPolicyConfig, *, progress: bool = True, out_dir: str | os.PathLike) -> DetoxData:
    """SFT rows and DPO pairs for ``model`` (a ``jaxlm.checkpoint.LoadedModel``) by the recipe of the
    module docstring, written to ``out_dir``; a finished build with the same fingerprint there is
    returned as it is, one with another fingerprint is refused."""
    from jaxlm.evaluate import protocols
    from jaxlm.evaluate.toxicity import get_scorer

    started = time.perf_counter()
    if model.tokenizer is None:
        raise OnPolicyError(f"{model.source}: no tokenizer next to the checkpoint")
    out = Path(out_dir)
    pool = prompt_pool(config)
    model_fp = model_fingerprint(model)
    fingerprint = build_fingerprint(model_fp, config, pool)
    with DirectoryLock(out, "posttrain data build"):
        previous = finished_build(out)
        if previous is not None:
            if previous["fingerprint"] == fingerprint:
                return DetoxData(out, previous, reused=True)
            model_was = previous.get("model", {})
            raise OnPolicyError(
                f"{out}: holds a finished build with fingerprint {previous['fingerprint']} (model {model_was.get('source')} "
                f"step {model_was.get('step')}); this one's is {fingerprint} (model {model.source} step {model.step}, "
                "or other prompts or settings): choose another output directory, or remove it to rebuild")
        settings = config.generation_settings()
        encoded, truncated = protocols.encode_prompts(model.config, model.tokenizer, [p.text for p in pool.prompts], settings)
        continuations = protocols.continue_encoded(model.config, model.params, model.tokenizer, encoded, settings,
                                                   progress="posttrain data" if progress else None)
        flat = protocols.score_texts(get_scorer(config.scorer), [t for texts in continuations for t in texts])
        scores = flat.reshape(len(pool.prompts), settings.samples).tolist()
        rows = sample_rows(pool, continuations, scores, config)
        sft, dpo = training_rows(rows)
        summary = summarize(rows, pool, config, model, fingerprint=fingerprint, model_fp=model_fp, truncated=truncated,
                            seconds=time.perf_counter() - started)
        write_jsonl(out / SAMPLES_FILE, rows)
        write_jsonl(out / SFT_FILE, sft)
        write_jsonl(out / DPO_FILE, dpo)
        plot_scores(score_series(rows), out / PLOT_FILE)
        write_json(out / SUMMARY_FILE, summary)  # last: marks the build finished
    return DetoxData(out, summary, reused=False)
