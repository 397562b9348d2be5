"""``jaxlm steer --checkpoint DIR --method M --data SPEC --out FILE.safetensors``: build an intervention.

Methods (``jaxlm.intervene.BUILDERS``), each from labelled texts' activations at one position
per text (the last token), toward the wanted label 0 (non-toxic):

  iti     add sigma * direction at head_out on the top --k heads by probe accuracy (positions
          last); probes are fitted here, or read with the activations from --probe-dir
          (`jaxlm probe` output); --scale = alpha, in units of sigma (default 8)
  caa     add the class mean difference of the residual stream (--site, default resid_pre) at
          --layer only, on prompt and generated positions; --scale = multiplier (default 1)
  ablate  project the unit mean-difference direction (taken at --layer of --site) out of every
          residual write (embedding, attention and MLP outputs), at every position
  leace   the LEACE eraser fitted at --layer of --site, applied there, at every position
  random  the control: --base (iti, caa or ablate) with norm-matched random directions (--seed)

--layer defaults to the middle layer (n_layers // 2). The file (.safetensors + .json sidecar)
records the checkpoint, the data spec and the method's settings; `jaxlm generate` and
`jaxlm eval` apply it with --intervention FILE [--scale S].
"""

from __future__ import annotations

import argparse

from jaxlm.cli import add_documented_parser

# -- the --intervention / --scale options `jaxlm generate` and `jaxlm eval` share ----------------


def add_intervention_arguments(parser: argparse.ArgumentParser) -> None:
    """``--intervention FILE --scale S``, and their old ITI spellings ``--iti`` / ``--alpha``."""
    parser.add_argument("--intervention", help="intervention .safetensors (with its .json sidecar), e.g. from `jaxlm steer`")
    parser.add_argument("--scale", type=float, help="intervention strength (default: the file's scale)")
    parser.add_argument("--iti", help="the old name of --intervention")
    parser.add_argument("--alpha", type=float, help="the old name of --scale")


def intervention_options(args: argparse.Namespace) -> tuple[str | None, float | None]:
    """``(file, scale)`` from either spelling; ``OptionError`` when one is given twice, the scale is not
    finite, or a scale comes without a file."""
    from jaxlm.cli import options

    for new, old in (("intervention", "iti"), ("scale", "alpha")):
        if getattr(args, new) is not None and getattr(args, old) is not None:
            raise options.OptionError(f"--{new} and --{old}: give one (--{old} is the old name of --{new})")
    path = args.intervention if args.intervention is not None else args.iti
    scale = args.scale if args.scale is not None else args.alpha
    scale_option = "--scale" if args.scale is not None else "--alpha"
    options.finite(scale_option, scale)
    if scale is not None and path is None:
        needs = "--intervention FILE" if scale_option == "--scale" else "--iti FILE (or --intervention FILE)"
        raise options.OptionError(f"{scale_option} needs {needs}")
    return path, scale


def load_intervention(args: argparse.Namespace, config):
    """The intervention the options name (None without one), fitted to ``config``, at the chosen scale."""
    from jaxlm.intervene import Intervention

    path, scale = intervention_options(args)
    if path is None:
        return None
    intervention = Intervention.load(path, config)
    return intervention if scale is None else intervention.with_scale(scale)


# -- jaxlm steer -------------------------------------------------------------------------------


def check_options(args: argparse.Namespace) -> None:
    """Refuse option values that cannot work, naming the option, before the model is loaded."""
    from jaxlm.cli import options
    from jaxlm.intervene import BUILDERS

    if args.method not in BUILDERS:
        raise options.OptionError(f"--method: expected one of {', '.join(BUILDERS)}, got {args.method!r}")
    options.at_least("--batch-size", args.batch_size, 1)
    options.at_least("--max-len", args.max_len, 1)
    options.at_least("--limit", args.limit, 1)
    options.at_least("--k", args.k, 1)
    options.at_least("--layer", args.layer, 0)
    options.finite("--scale", args.scale)
    if args.probe_dir is not None and not _head_method(args):
        raise options.OptionError(f"--probe-dir: only iti (or random --base iti) reads probe runs; --method "
                                  f"{args.method} collects its residual activations from --data")
    if args.data is None and args.probe_dir is None:
        raise options.OptionError("--data: required (a labelled set spec), unless iti reads --probe-dir")


def _head_method(args: argparse.Namespace) -> bool:
    """Whether the method reads head activations and probe accuracies (iti, or random on iti)."""
    return args.method == "iti" or (args.method == "random" and args.base == "iti")


def settings_of(args: argparse.Namespace, n_layers: int) -> dict:
    """The builder settings the options give (unset ones keep the builder's defaults)."""
    base = args.base if args.method == "random" else args.method
    settings = {} if args.method != "random" else {"base": args.base, "seed": args.seed}
    if base == "iti":
        settings.update({"k": args.k} if args.k is not None else {})
    else:
        settings["layer"] = n_layers // 2 if args.layer is None else args.layer
        if args.site is not None:
            settings["site"] = args.site
    if args.scale is not None:
        settings["scale"] = args.scale
    return settings


def head_inputs(args: argparse.Namespace, loaded, data):
    """(acts [N, L, H, D], labels, probes) for ITI: a probe run's, or fitted here."""
    from jaxlm import ops
    from jaxlm.probe import ProbeConfig, load_probe_run

    if args.probe_dir is not None:
        probes, acts, labels = load_probe_run(args.probe_dir)
        return acts, labels, probes
    acts, probes = ops.probe_heads(loaded, data, ProbeConfig(seed=args.seed), batch_size=args.batch_size,
                                   max_len=args.max_len, progress=not args.no_progress)
    return acts, data.labels, probes


def run(args: argparse.Namespace) -> int:
    from jaxlm.checkpoint import CheckpointError, load_model
    from jaxlm.data.labelled import load_labelled
    from jaxlm import ops
    from jaxlm.intervene import InterventionError, builder_settings, builder_site

    check_options(args)
    use_data = args.probe_dir is None
    data = load_labelled(args.data, args.data_dir, limit=args.limit) if use_data else None
    loaded = load_model(args.checkpoint)
    if loaded.tokenizer is None and use_data:
        raise CheckpointError(f"{args.checkpoint}: no tokenizer.json next to the checkpoint")
    settings = settings_of(args, loaded.config.n_layers)
    if _head_method(args):
        acts, labels, probes = head_inputs(args, loaded, data)
    else:
        acts = ops.collect(loaded, data.texts, builder_site(args.method, **settings), batch_size=args.batch_size,
                           max_len=args.max_len, progress=not args.no_progress)
        labels, probes = data.labels, None
    intervention = ops.build(args.method, acts, labels, probes, **settings)
    try:
        intervention.check_compatible(loaded.config)
    except InterventionError as err:
        raise InterventionError(f"{args.probe_dir or args.data}: activations do not fit {args.checkpoint}: {err}") from None
    provenance = {
        "checkpoint": str(args.checkpoint),
        "step": loaded.step,
        "data": None if data is None else data.name,
        "probe_dir": None if args.probe_dir is None else str(args.probe_dir),
        "n_texts": int(len(labels)),
        "method": args.method,
        "settings": builder_settings(args.method, **settings),
    }
    path = intervention.save(args.out, provenance=provenance)
    structure = ", ".join(f"{op} at {site} ({positions})" for site, op, positions in intervention.structure())
    print(f"{args.method}: {structure}; {intervention.k} units, scale {float(intervention.scale):g}, "
          f"from {len(labels)} texts: {path}")
    return 0


def register(subparsers) -> None:
    from jaxlm.cli.probe import DATA_HELP

    parser = add_documented_parser(
        subparsers, "steer", "build an intervention (iti, caa, ablate, leace, random) from labelled texts", __doc__
    )
    parser.add_argument("--checkpoint", required=True, help="run directory, checkpoints/<step> dir or HF checkpoint dir (jaxlm.hf families)")
    parser.add_argument("--method", required=True, help="a jaxlm.intervene.BUILDERS name: iti, caa, ablate, leace, random")
    parser.add_argument("--data", help=DATA_HELP)
    parser.add_argument("--out", required=True, help="intervention file to write (.safetensors + .json sidecar)")
    parser.add_argument("--layer", type=int, help="layer the direction/eraser comes from (default: the middle one)")
    parser.add_argument("--site", choices=("resid_pre", "resid_mid", "resid_post"),
                        help="residual site of caa/ablate/leace (default: resid_pre)")
    parser.add_argument("--k", type=int, help="iti: number of heads, top K by probe accuracy (default 30)")
    parser.add_argument("--probe-dir", help="iti: reuse the activations and probes of `jaxlm probe` output")
    parser.add_argument("--base", choices=("iti", "caa", "ablate"), default="iti", help="random: the method it controls")
    parser.add_argument("--seed", type=int, default=0, help="random directions and probe split seed")
    parser.add_argument("--scale", type=float, help="strength stored in the file (iti: alpha, default 8; others 1)")
    parser.add_argument("--data-dir", help="corpora root (default: $JAXLM_DATA_DIR)")
    parser.add_argument("--limit", type=int, help="number of texts (overrides the spec's limit)")
    parser.add_argument("--max-len", type=int, default=128, help="tokens kept per text (from the start)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
