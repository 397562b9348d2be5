"""Decode cost of each intervention op and site against the same model without one.

    python tools/bench_interventions.py [--preset cpu-small --batch 32 --prompt-len 32 --new-tokens 64]

One model (random parameters of the preset) generates greedily from the same left-padded
random prompts, with no stop token, under each variant:

  none            ``generate`` without an intervention (the programs without any edit)
  iti (add)       add at ``head_out`` on the top-K heads, positions ``last``
  caa (add)       add at ``resid_pre`` of the middle layer, positions ``all``
  ablate          project one direction out of every residual write, positions ``all``
  leace (erase)   LEACE eraser at ``resid_pre`` of the middle layer, positions ``all``

Each variant's directions come from its builder (``jaxlm.intervene.build_intervention``) on
activations of random texts with random labels, so the arithmetic is real; the numbers the
edits produce do not matter here. Programs are compiled once before timing; timings
interleave the variants, ``--repeats`` times each, and the median is reported with the
overhead against ``none``. The 1-minute load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np

from jaxlm import decode, model
from jaxlm.config import model_preset
from jaxlm.intervene import build_intervention
from jaxlm.probe import collect_activations

from bench_generate import make_prompts  # tools/ is the script's directory


def make_interventions(config, params, k: int, seed: int) -> dict:
    """name -> Intervention, each built by its builder from activations of random texts."""
    rng = np.random.default_rng(seed)
    texts = [rng.integers(1, config.vocab_size, 24).tolist() for _ in range(64)]
    labels = np.arange(len(texts)) % 2

    def acts(site: str) -> np.ndarray:
        return np.asarray(collect_activations(config, params, lambda t: t, texts, site=site, progress=False))

    heads = acts("head_out")
    resid = acts("resid_pre")
    accuracy = rng.random((config.n_layers, config.n_heads))
    return {
        "iti (add, head_out)": build_intervention("iti", heads, labels, accuracy=accuracy, k=k, scale=8.0),
        "caa (add, resid_pre)": build_intervention("caa", resid, labels, scale=4.0),
        "ablate (project, every write)": build_intervention("ablate", resid, labels, scale=1.0),
        "leace (erase, resid_pre)": build_intervention("leace", resid, labels, scale=1.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--heads", type=int, default=16, help="K: heads of the ITI variant")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"load average before: {os.getloadavg()[0]:.2f}")
    config = model_preset(args.preset)
    params = model.init_params(config, args.seed)
    tokens, mask = make_prompts(args.batch, args.prompt_len, config.vocab_size, args.seed)
    variants = {"none": None, **make_interventions(config, params, args.heads, args.seed)}

    def run(intervention) -> float:
        start = time.perf_counter()
        out = decode.generate(config, params, tokens, prompt_mask=mask, max_new_tokens=args.new_tokens,
                              intervention=intervention)
        jax.block_until_ready(out.tokens)
        return time.perf_counter() - start

    for intervention in variants.values():  # compile every program before timing
        run(intervention)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, intervention in variants.items():
            times[name].append(run(intervention))

    base = statistics.median(times["none"])
    tokens_out = args.batch * args.new_tokens
    print(f"{args.preset}, batch {args.batch}, prompt <= {args.prompt_len}, {args.new_tokens} new tokens, "
          f"median of {args.repeats} interleaved repeats; jax {jax.__version__}, {jax.devices()[0].platform}")
    print("| variant | s per call | tokens/s | overhead vs none |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {tokens_out / median:,.0f} | {100 * (median / base - 1):+.1f}% |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
