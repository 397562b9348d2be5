"""Top-p sampling cost: jaxlm's sort-free sampler vs the sort-and-cumsum one it replaced.

    python tools/bench_sampling.py [--repeats 20] [--checkpoint RUN_DIR]

``sorted``: the textbook nucleus (argsort the logits, cumulative softmax, keep the prefix whose
mass before each token is below top_p) and ``jax.random.categorical``, as jaxlm sampled until
SAMPLER_VERSION 2. ``jaxlm``: ``decode.sample_tokens`` (``nucleus_mask`` by bisection on the
float bits, then Gumbel-max). Both run jitted on the same [B, V] logits, interleaved, medians.
Also: whether both keep the same token sets (they must: the rule is the same), and one
``generate`` call at the sweep's evaluation shape (batch 128, 48-token prompts, 20 new tokens,
top-p 0.9) with each sampler, on a trained checkpoint's model or a random ``cpu-small``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import decode


def sorted_sample_tokens(logits, rng, settings):
    """The replaced sampler: argsort nucleus + ``jax.random.categorical`` (top_k ignored)."""
    logits = logits.astype(jnp.float32) / settings.temperature
    ids = jnp.argsort(-logits, axis=-1)
    values = jnp.take_along_axis(logits, ids, axis=-1)
    probs = jax.nn.softmax(values, axis=-1)
    keep = ((jnp.cumsum(probs, axis=-1) - probs) < settings.top_p).at[:, 0].set(True)
    choice = jax.random.categorical(rng, jnp.where(keep, values, -jnp.inf), axis=-1)
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def sorted_keep(logits, top_p):
    probs = jax.nn.softmax(logits, axis=-1)
    ids = jnp.argsort(-logits, axis=-1)
    sorted_probs = jnp.take_along_axis(probs, ids, axis=-1)
    keep_sorted = (jnp.cumsum(sorted_probs, axis=-1) - sorted_probs) < top_p
    return jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], ids].set(keep_sorted)


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--checkpoint", help="a jaxlm run directory for the generate row (default: random cpu-small)")
    args = parser.parse_args()
    settings = decode.SamplingSettings(max_new_tokens=1, temperature=1.0, top_p=args.top_p)
    samplers = {
        "sorted": jax.jit(functools.partial(sorted_sample_tokens, settings=settings)),
        "jaxlm": jax.jit(functools.partial(decode.sample_tokens, settings=settings)),
    }
    print(f"devices: {jax.devices()}; top_p {args.top_p}; medians of {args.repeats}")
    print("| logits [B, V] | sorted: ms | jaxlm: ms | speed-up | same kept sets |")
    print("|---|---|---|---|---|")
    for batch, vocab in ((8, 8192), (32, 8192), (128, 8192), (32, 50304)):
        logits = jax.random.normal(jax.random.key(batch), (batch, vocab)) * 3.0
        key = jax.random.key(1)
        ms = {name: 1e3 * median_seconds(lambda f=f: f(logits, key).block_until_ready(), args.repeats)
              for name, f in samplers.items()}
        same = bool(jnp.all(sorted_keep(logits, args.top_p) == decode.nucleus_mask(jax.nn.softmax(logits), args.top_p)))
        print(f"| [{batch}, {vocab}] | {ms['sorted']:.2f} | {ms['jaxlm']:.2f} | {ms['sorted'] / ms['jaxlm']:.1f}x | {same} |")

    if args.checkpoint:
        from jaxlm.checkpoint import load_model

        loaded = load_model(args.checkpoint)
        config, params = loaded.config, loaded.params
    else:
        from jaxlm import model
        from jaxlm.config import model_preset

        config = model_preset("cpu-small", max_seq_len=128)
        params = model.init_params(config, 0)
    prompts = np.random.default_rng(0).integers(2, config.vocab_size, (128, 48)).astype(np.int32)
    seconds = {}
    for name, sampler in (("sorted", sorted_sample_tokens), ("jaxlm", decode.sample_tokens)):
        decode.sample_tokens, original = sampler, decode.sample_tokens
        jax.clear_caches()  # retrace prefill/decode with this sampler
        try:
            run = lambda: decode.generate(config, params, prompts, max_new_tokens=20, temperature=1.0, top_p=args.top_p,
                                          rng=0).tokens.block_until_ready()
            seconds[name] = median_seconds(run, max(3, args.repeats // 4))
        finally:
            decode.sample_tokens = original
    print(f"\ngenerate [128 x 48] + 20 tokens, top-p {args.top_p} ({'checkpoint' if args.checkpoint else 'random cpu-small'}): "
          f"sorted {seconds['sorted']:.2f} s, jaxlm {seconds['jaxlm']:.2f} s, {seconds['sorted'] / seconds['jaxlm']:.1f}x")


if __name__ == "__main__":
    main()
