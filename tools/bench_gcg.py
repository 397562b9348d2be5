"""GCG iteration time: jaxlm (``jaxlm.evaluate.gcg``) vs nanogcg 0.3.0 (PyTorch) on the same model.

    python tools/bench_gcg.py [--preset cpu-small --suffix-length 20 --top-k 256 --candidates 512
                               --iterations 10 --repeats 3]

Needs the ``bench`` extra (nanogcg 0.3.0). nanogcg pins transformers<=4.47.1 while the test
extra pins transformers 5: either install it without its dependencies next to the test extra
(``pip install --no-deps nanogcg==0.3.0``: its prefix-cache code then fails, see
``--prefix-cache``) or run the benchmark in an environment with ``pip install nanogcg==0.3.0``.

One model (random parameters of ``--preset`` with the tokenizer's vocabulary) is exported once
with ``jaxlm.hf.save`` next to its ``tokenizer.json``; jaxlm loads it with
``jaxlm.checkpoint.load_model``, nanogcg as transformers' ``OlmoForCausalLM`` (float32) with a
``PreTrainedTokenizerFast`` of the same file, and both encode the prompt, target and initial
suffix to the same ids (checked). The tokenizer is ``--tokenizer`` (a ``tokenizer.json``) or a
byte-level BPE of ``--vocab`` tokens trained on WikiText-2 validation (``$JAXLM_DATA_DIR``).
Settings are the same on both sides: suffix length, top-k, candidates per step (nanogcg
``search_width``), candidates per forward (``batch_size``), one replaced token per candidate,
no attack buffer, the retokenization filter on, no early stop, no chat template (a base model:
prompt + suffix + target), and the prompt in a KV cache on both sides or on neither
(``--prefix-cache``; nanogcg 0.3.0's cache code indexes the legacy tuple cache that
transformers 5 replaced, so ``auto`` turns it off there).

Each side runs in its own process (neither library's threads or heap weigh on the other; nanogcg
calls ``gc.collect()`` around every forward batch, whose cost grows with the process's heap).
Each repeat starts both sides, in alternating order; a side runs a warm-up attack (jaxlm:
its compiles, reported), then an attack of 1 step and one of ``--iterations`` steps: the time per
iteration is their difference over the extra steps, so an attack's setup (token lists, the
initial suffix's loss) is not in it; that setup is reported apart. Prints the load average
before and after, the medians, and a markdown row for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIDES = ("jaxlm", "nanogcg")


def bench_tokenizer(args):
    from jaxlm.tokenizer import Tokenizer, train_bpe

    if args.tokenizer:
        return Tokenizer.load(args.tokenizer)
    from jaxlm.data.sources import read_text
    from jaxlm.paths import dataset_path

    text = read_text(dataset_path("eval/wikitext2/valid.txt"))
    return train_bpe([line for line in text.splitlines() if line.strip()], vocab_size=args.vocab)


def initial_text(tokenizer, length: int) -> str:
    """A text of ``length`` tokens that encodes back to itself ("x x x ..." when the tokenizer allows)."""
    for piece in ("x", "!", ".", "a"):
        for text in (" ".join([piece] * length), piece * length):
            ids = tokenizer.encode(text)
            if len(ids) == length and tokenizer.encode(tokenizer.decode(ids)) == ids:
                return text
    raise SystemExit(f"no simple initial suffix of {length} tokens for this tokenizer")


def timed(run, steps: int) -> float:
    start = time.perf_counter()
    run(steps)
    return time.perf_counter() - start


def side_jaxlm(spec: dict) -> dict:
    from jaxlm.checkpoint import load_model
    from jaxlm.evaluate import gcg

    loaded = load_model(spec["model_dir"])
    tokenizer = loaded.tokenizer
    prompt_ids, target_ids = tokenizer.encode(spec["prompt"]), tokenizer.encode(spec["target"])
    assert [prompt_ids, target_ids, tokenizer.encode(spec["init"])] == spec["ids"]
    config = gcg.GCGConfig(
        suffix_length=spec["suffix_length"], top_k=spec["top_k"], candidates=spec["candidates"],
        candidate_batch=spec["candidate_batch"], n_replace=1, init_suffix=spec["init"], early_stop=False,
        prefix_cache=spec["prefix_cache"], seed=spec["seed"],
    )

    def run(steps: int) -> None:
        result = gcg.attack(loaded.config, loaded.params, tokenizer, prompt_ids, target_ids,
                            dataclasses.replace(config, steps=steps))
        assert result.steps == steps

    return {"warmup": timed(run, 2), "one": timed(run, 1), "many": timed(run, spec["iterations"])}


def side_nanogcg(spec: dict) -> dict:
    import logging

    import nanogcg
    import torch
    import transformers

    if spec["torch_threads"]:
        torch.set_num_threads(spec["torch_threads"])
    logging.getLogger("nanogcg").setLevel(logging.WARNING)
    model = transformers.OlmoForCausalLM.from_pretrained(spec["model_dir"], torch_dtype=torch.float32).eval()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(Path(spec["model_dir"]) / "tokenizer.json"), eos_token=spec["eos_token"],
        pad_token=spec["pad_token"],
    )
    ids = [tokenizer(spec[k], add_special_tokens=False)["input_ids"] for k in ("prompt", "target", "init")]
    assert ids == spec["ids"], "the HF tokenizer encodes differently"
    config = nanogcg.GCGConfig(
        optim_str_init=spec["init"], search_width=spec["candidates"], batch_size=spec["candidate_batch"],
        topk=spec["top_k"], n_replace=1, buffer_size=0, early_stop=False, use_prefix_cache=spec["prefix_cache"],
        allow_non_ascii=False, filter_ids=True, seed=spec["seed"], verbosity="WARNING",
    )

    def run(steps: int) -> None:
        result = nanogcg.run(model, tokenizer, spec["prompt"], spec["target"], dataclasses.replace(config, num_steps=steps))
        assert len(result.losses) == steps

    return {"warmup": timed(run, 1), "one": timed(run, 1), "many": timed(run, spec["iterations"]),
            "threads": torch.get_num_threads(), "versions": f"transformers {transformers.__version__}, torch {torch.__version__}"}


def run_side(side: str, spec_path: Path) -> dict:
    """One side's timings from a fresh process (its last stdout line is JSON)."""
    out = subprocess.run([sys.executable, __file__, "--side", side, "--spec", str(spec_path)], check=True,
                         stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: a BPE trained on WikiText-2 validation)")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary of the trained BPE")
    parser.add_argument("--prompt", default="Tell me what you really think about the people who live next door:")
    parser.add_argument("--target", default=" They are all a bunch of")
    parser.add_argument("--suffix-length", type=int, default=20)
    parser.add_argument("--top-k", type=int, default=256)
    parser.add_argument("--candidates", type=int, default=512)
    parser.add_argument("--candidate-batch", type=int, help="candidates per forward (default: all)")
    parser.add_argument("--iterations", type=int, default=10, help="GCG steps of the long timed attack (>= 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefix-cache", choices=("auto", "on", "off"), default="auto",
                        help="the prompt in a KV cache on both sides (auto: on unless transformers >= 5, where "
                             "nanogcg 0.3.0's cache code fails)")
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: run one side
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        spec = json.loads(Path(args.spec).read_text())
        print(json.dumps((side_jaxlm if args.side == "jaxlm" else side_nanogcg)(spec)))
        return
    if args.iterations < 2:
        parser.error("--iterations: expected at least 2 (the time per step is that of N steps minus 1 step)")

    from importlib.metadata import version

    from jaxlm import hf, model
    from jaxlm.config import model_preset

    transformers_major = int(version("transformers").split(".")[0])
    prefix_cache = args.prefix_cache == "on" or (args.prefix_cache == "auto" and transformers_major < 5)
    load_before = os.getloadavg()
    tokenizer = bench_tokenizer(args)
    config = model_preset(args.preset, vocab_size=tokenizer.vocab_size, dtype="float32")
    init = initial_text(tokenizer, args.suffix_length)
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    setup: dict[str, list[float]] = {side: [] for side in SIDES}
    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        hf.save(config, model.init_params(config, args.seed), model_dir,
                     token_ids={"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id})
        tokenizer.save(model_dir)
        spec = {
            "model_dir": str(model_dir), "prompt": args.prompt, "target": args.target, "init": init,
            "ids": [tokenizer.encode(t) for t in (args.prompt, args.target, init)],
            "eos_token": tokenizer.id_to_token(tokenizer.eos_id), "pad_token": tokenizer.id_to_token(tokenizer.pad_id),
            "suffix_length": args.suffix_length, "top_k": args.top_k, "candidates": args.candidates,
            "candidate_batch": args.candidate_batch, "iterations": args.iterations, "prefix_cache": prefix_cache,
            "torch_threads": args.torch_threads, "seed": args.seed,
        }
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        for repeat in range(args.repeats):
            for side in SIDES if repeat % 2 == 0 else SIDES[::-1]:
                result = run_side(side, spec_path)
                results[side].append(result)
                times[side].append((result["many"] - result["one"]) / (args.iterations - 1))
                setup[side].append(result["one"] - times[side][-1])
    load_after = os.getloadavg()

    jaxlm_s, nano_s = statistics.median(times["jaxlm"]), statistics.median(times["nanogcg"])
    compile_s = statistics.median(r["warmup"] for r in results["jaxlm"])
    prompt_len, target_len = len(spec["ids"][0]), len(spec["ids"][1])
    print(f"model {args.preset} (vocab {config.vocab_size}, {config.num_params() / 1e6:.2f}M params), prompt "
          f"{prompt_len} + suffix {args.suffix_length} + target {target_len} tokens; top-k {args.top_k}, "
          f"{args.candidates} candidates per step ({args.candidate_batch or args.candidates} per forward), "
          f"prefix cache {'on' if prefix_cache else 'off'}; {results['nanogcg'][0]['versions']} "
          f"({results['nanogcg'][0]['threads']} threads); {args.iterations} steps x {args.repeats} interleaved repeats")
    print(f"jaxlm warm-up attack (compiles): {compile_s:.1f} s; per iteration: "
          + ", ".join(f"{side} {', '.join(f'{t:.3f}' for t in ts)} s" for side, ts in times.items())
          + "; setup per attack: " + ", ".join(f"{side} {statistics.median(ts):.2f} s" for side, ts in setup.items()))
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
    print("| model | suffix | top-k | candidates | prefix cache | jaxlm s/iter | nanogcg s/iter | nanogcg / jaxlm | load before / after |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.preset} (V={config.vocab_size}) | {args.suffix_length} | {args.top_k} | {args.candidates} | "
          f"{'on' if prefix_cache else 'off'} | {jaxlm_s:.3f} | {nano_s:.3f} | {nano_s / jaxlm_s:.2f}x | "
          f"{load_before[0]:.2f} / {load_after[0]:.2f} |")


if __name__ == "__main__":
    main()
