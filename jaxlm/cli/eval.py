"""``jaxlm eval SUITE --checkpoint DIR``: toxicity protocols, capability cost, lm-eval tasks.

Each toxicity line of the summary also counts the empty continuations (an empty text scores
as non-toxic) and the prompts cut to fit the context; ``results.json`` records both.
``jaxlm eval harness --tasks a,b [--include-path DIR]`` runs lm-evaluation-harness tasks
(``jaxlm.evaluate.harness``) and writes ``harness.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SUITES = ("rtp", "toxigen", "ce", "blimp", "all", "harness")
HARNESS_OPTIONS = (("--tasks", "tasks"), ("--include-path", "include_path"), ("--num-fewshot", "num_fewshot"))
TOXICITY_KEYS = ("expected_max_toxicity", "toxicity_probability", "mean_toxicity")


def check_options(args: argparse.Namespace) -> None:
    """Refuse option values that cannot work, naming the option, before the model is loaded."""
    from jaxlm.cli import options

    for option, value in (("--batch-size", args.batch_size), ("--samples", args.samples),
                          ("--max-new-tokens", args.max_new_tokens), ("--limit", args.limit),
                          ("--ce-docs", args.ce_docs)):
        options.at_least(option, value, 1)
    options.at_least("--ce-len", args.ce_len, 2)
    options.at_least("--num-fewshot", args.num_fewshot, 0)
    if args.suite == "harness" and not task_names(args):
        raise options.OptionError("--tasks: required for the harness suite (comma-separated lm-eval task names)")
    for option, name in HARNESS_OPTIONS:
        if args.suite != "harness" and getattr(args, name) is not None:
            raise options.OptionError(f"{option}: only the harness suite takes it (got suite {args.suite!r})")
    options.nucleus("--top-p", args.top_p)
    from jaxlm.cli.steer import intervention_options

    intervention_options(args)
    if args.suite in ("rtp", "toxigen", "all"):
        from jaxlm.evaluate.toxicity import scorer_names

        if args.scorer not in scorer_names():
            raise options.OptionError(f"--scorer: unknown toxicity scorer {args.scorer!r}; valid names: {', '.join(scorer_names())}")


def task_names(args: argparse.Namespace) -> list[str]:
    """The comma-separated ``--tasks`` as a list (empty names dropped)."""
    return [name.strip() for name in (args.tasks or "").split(",") if name.strip()]


def eval_settings(args: argparse.Namespace):
    """The ``jaxlm.ops.EvalSettings`` of the options: ``--limit`` prompts per RTP/ToxiGen file and
    pairs per BLiMP paradigm (none: all), ``--ce-docs`` rows of ``--ce-len`` tokens."""
    from jaxlm.ops import EvalSettings

    return EvalSettings(rtp_prompts=args.limit, rtp_samples=args.samples, max_new_tokens=args.max_new_tokens,
                        toxigen_prompts=args.limit, ce_docs=args.ce_docs, ce_len=args.ce_len,
                        blimp_per_paradigm=args.limit, batch_size=args.batch_size, scorer=args.scorer, seed=args.seed,
                        top_p=args.top_p)


def load_for_eval(args: argparse.Namespace):
    """(the model, the intervention the options name or None) after the options are checked."""
    from jaxlm.checkpoint import CheckpointError, load_model
    from jaxlm.cli.steer import load_intervention

    check_options(args)
    loaded = load_model(args.checkpoint)
    if loaded.tokenizer is None:
        raise CheckpointError(f"{args.checkpoint}: no tokenizer.json next to the checkpoint")
    return loaded, load_intervention(args, loaded.config)


def run_harness_suite(args: argparse.Namespace) -> dict:
    """lm-eval tasks on the checkpoint; ``<out>/harness.json`` (written atomically)."""
    from jaxlm.cli.steer import intervention_options
    from jaxlm.evaluate.harness import run_harness
    from jaxlm.files import write_json

    loaded, intervention = load_for_eval(args)
    result = run_harness(loaded, task_names(args), intervention=intervention, include_path=args.include_path,
                         limit=args.limit, batch_size=args.batch_size, num_fewshot=args.num_fewshot, seed=args.seed)
    result = {
        "checkpoint": str(args.checkpoint),
        "step": loaded.step,
        "intervention": intervention_options(args)[0],
        "method": None if intervention is None else intervention.method,
        "scale": None if intervention is None else float(intervention.scale),
        **result,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "harness.json", result)
    return result


def run_suites(args: argparse.Namespace) -> dict:
    from jaxlm import ops
    from jaxlm.cli.steer import intervention_options
    from jaxlm.evaluate import protocols

    loaded, intervention = load_for_eval(args)
    path, _ = intervention_options(args)
    suites = ops.EVAL_SUITES if args.suite == "all" else (args.suite,)
    settings = eval_settings(args)
    inputs = ops.read_eval_inputs(settings, suites, args.data_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "checkpoint": str(args.checkpoint),
        "step": loaded.step,
        "intervention": path,
        "method": None if intervention is None else intervention.method,
        "scale": None if intervention is None else float(intervention.scale),
        "iti": path,  # the old keys
        "alpha": None if intervention is None else float(intervention.alpha),
        "seed": args.seed,
        "limit": args.limit,
        "prefix": args.prefix,
    }
    toxicity_suites = [name for name in ops.TOXICITY_SUITES if name in suites]
    if toxicity_suites:
        results["scorer"] = args.scorer
    prefix = protocols.DETOX_INSTRUCTION if args.prefix == "detox" else (args.prefix or "")
    for name in toxicity_suites:
        result = ops.toxicity(loaded, intervention, name, inputs, settings, prefix=prefix)
        result.save(out)
        results[name] = result.summary()
    if {"ce", "blimp"} & set(suites):
        results.update(ops.capability_cost(loaded, intervention, inputs, settings))
    for name in toxicity_suites:
        for key in TOXICITY_KEYS:
            results[f"{name}_{key}"] = results[name][key]
    if toxicity_suites:  # unprefixed keys: the first toxicity suite run (RTP when both ran)
        results.update({key: results[toxicity_suites[0]][key] for key in TOXICITY_KEYS})
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _plot(results, out)
    return results


def _plot(results: dict, out: Path) -> None:
    """Bar charts: toxicity per split/group for each protocol, BLiMP per field."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for name in ("rtp", "toxigen"):
        if name in results:
            for grouping, groups in results[name]["groups"].items():
                panels.append((f"{name} {grouping}: expected max toxicity",
                               {k: v["expected_max_toxicity"] for k, v in groups.items()}))
    if results.get("per_field"):
        panels.append(("BLiMP accuracy per field", results["per_field"]))
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.8 * len(panels)), squeeze=False)
    for ax, (title, values) in zip(axes[:, 0], panels):
        ax.bar(list(values), list(values.values()), color="tab:red" if "toxicity" in title else "tab:blue")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 1)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=120)
    plt.close(fig)


def toxicity_line(name: str, summary: dict) -> str:
    """One summary line of a toxicity protocol: its metrics, empty continuations, truncated prompts."""
    metrics = ", ".join(f"{k} {summary[k]:.4f}" for k in TOXICITY_KEYS)
    empty = f"empty continuations {summary['empty_continuations']} ({100 * summary['empty_continuation_fraction']:.1f}%)"
    return f"{name}: {metrics}, {empty}, truncated prompts {summary['truncated_prompts']}"


def run(args: argparse.Namespace) -> int:
    if args.suite == "harness":
        results = run_harness_suite(args)
        for task, metrics in results["metrics"].items():
            for metric, value in metrics.items():
                print(f"{task} {metric}: {value:.4f}")
        print(f"results: {Path(args.out) / 'harness.json'}")
        return 0
    results = run_suites(args)
    for name in ("rtp", "toxigen"):
        if name in results:
            print(toxicity_line(name, results[name]))
    for key in ("ce", "blimp_accuracy"):
        if key in results:
            print(f"{key}: {results[key]:.4f}")
    print(f"results: {Path(args.out) / 'results.json'}")
    return 0


def register(subparsers) -> None:
    from jaxlm.cli.steer import add_intervention_arguments

    parser = subparsers.add_parser("eval", help="toxicity (RTP, ToxiGen), capability (CE, BLiMP) and lm-eval (harness) evaluation")
    parser.add_argument("suite", choices=SUITES)
    parser.add_argument("--checkpoint", required=True, help="run directory, checkpoint step directory or HF checkpoint directory (jaxlm.hf families)")
    parser.add_argument("--out", default="eval_results", help="results directory (JSON, generations, plots)")
    add_intervention_arguments(parser)
    parser.add_argument("--prefix", default="", help="prompt prefix; 'detox' = the prompting baseline's instruction")
    parser.add_argument("--limit", type=int,
                        help="prompts per file (RTP, ToxiGen) / pairs per BLiMP paradigm / examples per harness task")
    parser.add_argument("--samples", type=int, default=25, help="RTP samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=20, help="RTP continuation length")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scorer", default="default", help="toxicity scorer (jaxlm.evaluate.toxicity.get_scorer)")
    parser.add_argument("--ce-docs", type=int, default=100, help="held-out rows for CE/KL")
    parser.add_argument("--ce-len", type=int, default=128, help="tokens per CE/KL row")
    parser.add_argument("--data-dir", help="corpora root (default: $JAXLM_DATA_DIR)")
    parser.add_argument("--tasks", help="harness: comma-separated lm-eval task, group or tag names (required)")
    parser.add_argument("--include-path", help="harness: a directory (or YAML file) of task configs of one's own")
    parser.add_argument("--num-fewshot", type=int, help="harness: few-shot examples per task (default: the task's, else 0)")
    parser.set_defaults(func=run)
