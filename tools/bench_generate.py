"""Generation throughput with and without ITI: jaxlm (KV cache, while_loop) vs transformers.

    python tools/bench_generate.py [--preset cpu-small --batch 8 --prompt-len 32 --new-tokens 64]

One model (random parameters of the preset) is exported with ``jaxlm.hf.save`` and
loaded as the ``--family``'s HF class (``OlmoForCausalLM`` by default; ``--preset llama-100m
--family llama`` for a ~100M Llama-shaped model), so both sides run the same weights. Both generate greedily
from the same left-padded prompts, with no stop token, and ITI in mode ``last`` (the
honest_llama rule: the last prompt position, then each new position):

  jaxlm plain       the decode programs compiled without the intervention site at all
  jaxlm baseline    ``generate`` without an intervention (a zero shift: the ITI program)
  jaxlm ITI         ``generate`` with an intervention on the top-K heads, alpha 8
  HF plain          ``model.generate``
  HF ITI            ``model.generate`` with a forward pre-hook on every ``o_proj`` that adds
                    alpha * sigma * direction to the last position of its input

Timings interleave the variants, ``--repeats`` times each, and report the median. Also a
sweep over five alphas, counting compilations (traces of the jitted prefill and decode).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxlm import decode, model
from jaxlm.config import model_preset
from jaxlm.intervene import Intervention

ALPHAS = (0.0, 4.0, 8.0, 12.0, 15.0)


def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded random prompts with lengths between prompt_len/2 and prompt_len."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(prompt_len // 2, prompt_len + 1, batch)
    lengths[0] = prompt_len
    return decode.left_pad([rng.integers(1, vocab, n).tolist() for n in lengths], pad_id=0)


def make_intervention(config, params, k: int, alpha: float, seed: int) -> Intervention:
    """ITI from head activations of random texts: mass-mean directions, sigma, top-k of a random ranking."""
    rng = np.random.default_rng(seed)
    texts = jnp.asarray(rng.integers(1, config.vocab_size, (64, 32)), jnp.int32)
    captured = jax.jit(lambda p, t: model.forward(config, p, t, capture=("head_out",)).captures["head_out"])(
        params, texts
    )
    acts = np.asarray(captured[:, :, -1]).transpose(1, 0, 2, 3)  # [N, L, H, D]
    labels = np.arange(len(acts)) % 2
    accuracy = rng.random((config.n_layers, config.n_heads))
    return Intervention.from_activations(acts, labels, accuracy, k, alpha, "last")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--family", default="olmo", choices=("olmo", "olmo2", "llama", "qwen2", "qwen3"),
                        help="HF family of the transformers side (one with self_attn.o_proj for the ITI hook)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--heads", type=int, default=16, help="K: intervened heads")
    parser.add_argument("--alpha", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--top-p", type=float, default=0.0,
                        help="0: greedy; else nucleus sampling at temperature 1 with this top-p on both sides")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0.0 <= args.top_p <= 1.0:
        parser.error(f"--top-p: expected a number in [0, 1], got {args.top_p}")

    import torch
    import transformers

    from jaxlm import hf

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    config = model_preset(args.preset)
    params = model.init_params(config, args.seed)
    tokens, mask = make_prompts(args.batch, args.prompt_len, config.vocab_size, args.seed)
    iti = make_intervention(config, params, args.heads, args.alpha, args.seed)
    n_new = args.new_tokens
    print(
        f"{args.preset}: {config.num_params() / 1e6:.1f}M params, batch {args.batch}, prompts "
        f"{int(mask.sum(1).min())}-{args.prompt_len} tokens (left-padded), {n_new} new tokens, "
        f"{f'top-p {args.top_p:g} (temperature 1)' if args.top_p else 'greedy'}, "
        f"ITI on {iti.k} of {config.n_layers * config.n_heads} heads, alpha {args.alpha}, mode last; "
        f"jax {jax.__version__} ({jax.default_backend()}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )

    # -- jaxlm -------------------------------------------------------------------------------
    sampling = {"temperature": 1.0, "top_p": args.top_p} if args.top_p else {}
    settings = decode.SamplingSettings(max_new_tokens=n_new, **sampling)
    key = jax.random.key(0)
    tokens_j, mask_j = jnp.asarray(tokens), jnp.asarray(mask)

    def jax_plain():
        state = decode.prefill(params, tokens_j, mask_j, None, key, config=config, settings=settings)
        return decode.decode(params, state, None, config=config, settings=settings).tokens.block_until_ready()

    def jax_generate(intervention):
        out = decode.generate(config, params, tokens, prompt_mask=mask, max_new_tokens=n_new, intervention=intervention,
                              rng=key, **sampling)
        return out.tokens.block_until_ready()

    # -- transformers ----------------------------------------------------------------------------
    with tempfile.TemporaryDirectory() as export_dir:
        hf.save(config, params, export_dir, family=args.family)
        hf_class = getattr(transformers, hf.get_family(args.family).architecture)
        hf_model = hf_class.from_pretrained(export_dir, dtype=torch.float32).eval()
    shift = np.array(iti.alpha * iti.head_shift()).reshape(config.n_layers, -1)  # [L, H*D], head-major
    hf_inputs = {"input_ids": torch.from_numpy(tokens).long(), "attention_mask": torch.from_numpy(mask).long()}
    hf_kwargs = dict(max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=0, eos_token_id=None)
    hf_kwargs.update(dict(do_sample=True, top_p=args.top_p, top_k=0, temperature=1.0) if args.top_p else dict(do_sample=False))

    def make_hook(layer_shift: torch.Tensor):
        def hook(module, inputs):
            x = inputs[0].clone()
            x[:, -1, :] += layer_shift  # the last position of this forward call
            return (x, *inputs[1:])

        return hook

    def hf_generate():
        with torch.inference_mode():
            return hf_model.generate(**hf_inputs, **hf_kwargs)[:, tokens.shape[1] :].numpy()

    def hf_iti():
        handles = [
            layer.self_attn.o_proj.register_forward_pre_hook(make_hook(torch.from_numpy(shift[i])))
            for i, layer in enumerate(hf_model.model.layers)
        ]
        try:
            return hf_generate()
        finally:
            for handle in handles:
                handle.remove()

    variants = {
        "jaxlm plain": jax_plain,
        "jaxlm baseline (zero ITI)": lambda: jax_generate(None),
        f"jaxlm ITI alpha {args.alpha:g}": lambda: jax_generate(iti),
        "HF plain": hf_generate,
        f"HF ITI alpha {args.alpha:g} (pre-hook)": hf_iti,
    }

    # The 5-alpha sweep, first: it compiles the ITI program (which the baseline shares).
    sweep_before = decode.trace_counts()
    sweep_tokens = [np.asarray(jax_generate(iti.with_alpha(alpha))) for alpha in ALPHAS]
    sweep_after = decode.trace_counts()

    compile_seconds = {}
    before = decode.trace_counts()
    for name, fn in variants.items():  # warm-up: compiles jaxlm programs, warms torch
        compile_seconds[name] = timed(fn)
    after_warmup = decode.trace_counts()

    # Parity: the same greedy tokens on both sides, with and without ITI.
    parity = {
        "plain": (np.asarray(jax_generate(None)), hf_generate()),
        "ITI": (np.asarray(jax_generate(iti)), hf_iti()),
    }

    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in tqdm(range(args.repeats), desc="timing", unit="round"):
        for name, fn in variants.items():
            times[name].append(timed(fn))

    generated = args.batch * n_new
    print()
    print("| variant | median s | tokens/s | vs jaxlm plain | first call s |")
    print("|---|---|---|---|---|")
    plain = statistics.median(times["jaxlm plain"])
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"| {name} | {median:.3f} | {generated / median:,.0f} | {median / plain:.3f}x time | "
            f"{compile_seconds[name]:.2f} |"
        )
    jax_iti = statistics.median(times[f"jaxlm ITI alpha {args.alpha:g}"])
    hf_plain = statistics.median(times["HF plain"])
    hf_iti_t = statistics.median(times[f"HF ITI alpha {args.alpha:g} (pre-hook)"])
    print()
    print(f"ITI overhead, jaxlm: {100 * (jax_iti / plain - 1):+.1f}% vs the plain program; "
          f"{100 * (jax_iti / statistics.median(times['jaxlm baseline (zero ITI)']) - 1):+.1f}% vs baseline")
    print(f"ITI overhead, HF: {100 * (hf_iti_t / hf_plain - 1):+.1f}%")
    print(f"speed-up jaxlm vs HF: plain {hf_plain / plain:.2f}x, ITI {hf_iti_t / jax_iti:.2f}x")
    for name, (ours, theirs) in parity.items():
        if args.top_p:
            print(f"token parity with HF ({name}): not compared (each side samples with its own random numbers)")
            continue
        same_rows = int((ours == theirs).all(axis=1).sum())
        prefix = [int(np.argmax(np.append(o != t, True))) for o, t in zip(ours, theirs)]
        print(f"greedy parity with HF ({name}): {same_rows}/{len(ours)} rows identical, "
              f"mean identical prefix {np.mean(prefix):.1f}/{n_new} tokens")
    warm = {k: after_warmup.get(k, 0) - before.get(k, 0) for k in ("prefill", "decode")}
    swept = {k: sweep_after.get(k, 0) - sweep_before.get(k, 0) for k in ("prefill", "decode")}
    distinct = len({t.tobytes() for t in sweep_tokens})
    print(f"compilations after the sweep (plain program; baseline and ITI reuse the sweep's): {warm}")
    print(f"compilations during the sweep over alphas {ALPHAS}: {swept}; distinct outputs: {distinct}/{len(ALPHAS)}")


if __name__ == "__main__":
    main()
