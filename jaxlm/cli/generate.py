"""``jaxlm generate --checkpoint DIR --prompt TEXT [--intervention FILE --scale S]``: continue prompts.

Prompts come from ``--prompt`` (repeatable) and then ``--prompts-file`` (one prompt per line,
or JSON lines with a ``prompt`` field when the file ends in ``.jsonl``). Prompts run in
batches of ``--batch-size``, left-padded to a multiple of 16 tokens, so a long prompt list
compiles a handful of programs; every scale reuses them. ``--iti``/``--alpha`` are the old
names of ``--intervention``/``--scale``. Output: one JSON line per prompt
(``prompt``, ``completion``, ``tokens``, ``prompt_truncated``) on stdout, or into ``--out``.
A prompt longer than the context left after ``--max-new-tokens`` keeps its last tokens
(one warning counts them; ``prompt_truncated`` marks them). ``--mesh data=2,fsdp=2,tensor=2``
loads the model sharded over the devices and generates on them (the same tokens as one device).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path



def __getattr__(name: str):
    """``generate_texts`` lives in ``jaxlm.evaluate.protocols``; imported from here lazily (no jax at startup)."""
    if name == "generate_texts":
        from jaxlm.evaluate.protocols import generate_texts

        return generate_texts
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def read_prompts(path: Path) -> list[str]:
    """Prompts from a text file (one per non-empty line) or a ``.jsonl`` file (field ``prompt``)."""
    from jaxlm.decode import GenerationError

    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise GenerationError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
            "a prompts file holds one prompt per line, or JSON lines with a 'prompt' field"
        ) from None
    lines = text.splitlines()
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise GenerationError(f"{path}:{number}: invalid JSON ({err})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise GenerationError(f"{path}:{number}: expected an object with a string field 'prompt'")
        prompts.append(record["prompt"])
    return prompts


def check_options(args: argparse.Namespace) -> None:
    """Refuse option values that cannot work, naming the option, before the model is loaded."""
    from jaxlm.cli import options

    options.at_least("--batch-size", args.batch_size, 1)
    options.at_least("--max-new-tokens", args.max_new_tokens, 1)
    options.at_least("--top-k", args.top_k, 0)
    options.finite("--temperature", args.temperature, minimum=0.0)
    options.nucleus("--top-p", args.top_p)
    options.mesh_config("--mesh", args.mesh)
    from jaxlm.cli.steer import intervention_options

    intervention_options(args)


def write_lines(path: Path, lines: list[str]) -> None:
    """``lines`` into ``path`` through a temporary file, so a failed write leaves the old file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(partial, path)


def run(args: argparse.Namespace) -> int:
    from jaxlm.checkpoint import CheckpointError, load_model
    from jaxlm.cli import options
    from jaxlm.cli.options import OptionError
    from jaxlm.cli.steer import intervention_options, load_intervention
    from jaxlm.evaluate.protocols import generate_texts

    check_options(args)
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += read_prompts(Path(args.prompts_file))
    if not prompts:
        raise OptionError("no prompts: give --prompt TEXT and/or --prompts-file FILE")
    loaded = load_model(args.checkpoint, mesh=options.mesh("--mesh", args.mesh))
    if loaded.tokenizer is None:
        raise CheckpointError(f"{args.checkpoint}: no tokenizer next to the checkpoint")
    intervention = load_intervention(args, loaded.config)
    if intervention is not None and args.position_mode:
        intervention = intervention.with_mode(args.position_mode)
    records = generate_texts(
        loaded,
        prompts,
        intervention=intervention,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    path, _ = intervention_options(args)
    extra = {} if intervention is None else {
        "intervention": str(path), "method": intervention.method, "scale": float(intervention.scale),
        "alpha": float(intervention.alpha), "iti": str(path),  # the old keys
    }
    lines = [json.dumps({**record, **extra}, ensure_ascii=False) for record in records]
    if args.out:
        write_lines(Path(args.out), lines)
        print(f"wrote {len(lines)} generations to {args.out}", file=sys.stderr)
    else:
        print("\n".join(lines))
    return 0


def register(subparsers) -> None:
    from jaxlm.cli.options import add_mesh_argument
    from jaxlm.cli.steer import add_intervention_arguments

    parser = subparsers.add_parser(
        "generate",
        help="continue prompts with a trained model, optionally with an intervention",
        description=__doc__.split("\n\n", 1)[1].replace("``", ""),
    )
    parser.add_argument("--checkpoint", required=True, help="run directory, checkpoint step directory or HF directory")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="one prompt per line, or .jsonl with a 'prompt' field")
    add_intervention_arguments(parser)
    parser.add_argument(
        "--position-mode", choices=("last", "all", "generated"), help="override the file's position mode"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    add_mesh_argument(parser)
    parser.add_argument("--out", help="write JSON lines here instead of stdout")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
