"""``jaxlm generate --checkpoint DIR --prompt TEXT [--iti FILE --alpha A]``: continue prompts.

Prompts come from ``--prompt`` (repeatable) and then ``--prompts-file`` (one prompt per line,
or JSON lines with a ``prompt`` field when the file ends in ``.jsonl``). Prompts run in
batches of ``--batch-size``, left-padded to a multiple of 16 tokens, so a long prompt list
compiles a handful of programs; every alpha reuses them. Output: one JSON line per prompt
(``prompt``, ``completion``, ``tokens``) on stdout, or into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PAD_MULTIPLE = 16


def read_prompts(path: Path) -> list[str]:
    """Prompts from a text file (one per non-empty line) or a ``.jsonl`` file (field ``prompt``)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: invalid JSON ({err})") from err
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f"{path}:{number}: expected an object with a string field 'prompt'")
        prompts.append(record["prompt"])
    return prompts


def generate_texts(
    loaded,
    prompts: list[str],
    *,
    intervention=None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> list[dict]:
    """Continue ``prompts`` with a ``jaxlm.checkpoint.LoadedModel``; one record per prompt."""
    import jax
    from tqdm import tqdm

    from jaxlm.decode import generate, left_pad

    config, tokenizer = loaded.config, loaded.tokenizer
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    max_prompt = config.max_seq_len - max_new_tokens
    if max_prompt < 1:
        raise ValueError(
            f"--max-new-tokens {max_new_tokens} leaves no room for a prompt (max_seq_len {config.max_seq_len})"
        )
    encoded = tokenizer.encode_batch(prompts)
    for text, ids in zip(prompts, encoded):
        if not ids:
            raise ValueError(f"prompt {text!r} encodes to no tokens")
    batch_size = min(batch_size, len(prompts))
    key = jax.random.key(seed)
    records = []
    starts = range(0, len(prompts), batch_size)
    for number, start in enumerate(tqdm(starts, desc="generate", unit="batch", disable=not progress)):
        chunk = encoded[start : start + batch_size]
        rows = chunk + [chunk[-1]] * (batch_size - len(chunk))  # a full batch: one shape, one program
        longest = min(max(len(ids) for ids in rows), max_prompt)
        length = min(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, max_prompt)
        tokens, mask = left_pad(rows, pad_id=pad_id, length=length)
        out = generate(
            config,
            loaded.params,
            tokens,
            prompt_mask=mask,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            intervention=intervention,
            rng=jax.random.fold_in(key, number),
            eos_id=tokenizer.eos_id,
            pad_id=pad_id,
        )
        for offset, ids in enumerate(out.sequences()[: len(chunk)]):
            shown = ids[:-1] if ids and ids[-1] == tokenizer.eos_id else ids
            records.append({"prompt": prompts[start + offset], "completion": tokenizer.decode(shown), "tokens": ids})
    return records


def run(args: argparse.Namespace) -> int:
    from jaxlm.checkpoint import load_model
    from jaxlm.config import ConfigError
    from jaxlm.intervene import Intervention, InterventionError

    prompts = list(args.prompt or [])
    try:
        if args.prompts_file:
            prompts += read_prompts(Path(args.prompts_file))
        if not prompts:
            raise ValueError("no prompts: give --prompt TEXT and/or --prompts-file FILE")
        if args.alpha is not None and not args.iti:
            raise ValueError("--alpha needs --iti FILE")
        loaded = load_model(args.checkpoint)
        if loaded.tokenizer is None:
            raise ValueError(f"{args.checkpoint}: no tokenizer next to the checkpoint")
        intervention = None
        if args.iti:
            intervention = Intervention.load(args.iti, config=loaded.config)
            if args.alpha is not None:
                intervention = intervention.with_alpha(args.alpha)
            if args.position_mode:
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
    except (ConfigError, InterventionError, OSError, ValueError) as err:
        print(f"jaxlm generate: error: {err}", file=sys.stderr)
        return 2
    extra = {"alpha": float(intervention.alpha), "iti": str(args.iti)} if intervention is not None else {}
    lines = [json.dumps({**record, **extra}, ensure_ascii=False) for record in records]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote {len(lines)} generations to {args.out}", file=sys.stderr)
    else:
        print("\n".join(lines))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="continue prompts with a trained model, optionally with an ITI intervention",
        description=__doc__.split("\n\n", 1)[1].replace("``", ""),
    )
    parser.add_argument("--checkpoint", required=True, help="run directory, checkpoint step directory or HF directory")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="one prompt per line, or .jsonl with a 'prompt' field")
    parser.add_argument("--iti", help="intervention .safetensors (with its .json sidecar)")
    parser.add_argument("--alpha", type=float, help="ITI strength (default: the file's alpha)")
    parser.add_argument(
        "--position-mode", choices=("last", "all", "generated"), help="override the file's position mode"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", help="write JSON lines here instead of stdout")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
