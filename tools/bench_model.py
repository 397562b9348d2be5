"""Benchmark: forward+backward tokens/s of a jaxlm preset against transformers on CPU (OLMo, or another HF family).

Both sides compute the same thing: mean next-token cross-entropy of one batch and its
gradient with respect to every parameter, in float32, with identical weights (jaxlm's
random init, written with ``jaxlm.hf.save`` as ``--family`` and read by its HF class, e.g.
``OlmoForCausalLM``; ``--preset llama-100m --family llama`` for a ~100M Llama-shaped model):

- jaxlm: ``jax.jit(jax.value_and_grad(loss))`` around ``jaxlm.model.forward``;
- transformers: the family's class (torch, CPU, default attention implementation),
  ``loss.backward()`` with gradients cleared between steps.

After warm-up (which includes XLA compilation, reported separately) the two are timed in
interleaved repetitions (alternating which goes first) and the median step is reported.
Tokens/s counts the ``batch * seq_len`` input tokens of a step.

Each timed step starts after ``--pause`` seconds idle: XLA's CPU worker threads keep
spinning for a moment after a step, and on a 2-core machine a torch step started right
after a jax step was measured ~20x slower (2.6 s instead of ~0.1 s at batch 2 x 64).

    python tools/bench_model.py [--preset cpu-small] [--batch 8] [--seq-len 256] [--steps 10]
                                [--append docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

SECTION = "## Model forward+backward (jaxlm vs transformers OLMo)"
SECTION_OTHER = "## Model forward+backward (jaxlm vs transformers {architecture})"


def jaxlm_step(config, params):
    """A jitted (loss, grads) function of tokens; blocks until its results are ready."""
    import jax
    import optax

    from jaxlm.model import forward

    def loss_fn(p, tokens):
        logits = forward(config, p, tokens[:, :-1]).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    step = jax.jit(jax.value_and_grad(loss_fn))

    def run(tokens):
        loss, grads = step(params, tokens)
        jax.block_until_ready(grads)
        return float(loss)

    return run


def torch_step(model):
    import torch.nn.functional as F

    def run(tokens):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        return float(loss.detach())

    return run


def timed(run, tokens, pause: float = 0.0) -> tuple[float, float]:
    time.sleep(pause)  # let the other framework's worker threads go idle
    start = time.perf_counter()
    loss = run(tokens)
    return time.perf_counter() - start, loss


def preset_config(preset: str, seq_len: int):
    """The preset in float32, its context raised to ``seq_len`` if shorter."""
    from jaxlm.config import model_preset

    config = model_preset(preset, dtype="float32")
    if seq_len > config.max_seq_len:
        print(f"note: seq-len {seq_len} exceeds the preset's context {config.max_seq_len}; raised to match")
        config = model_preset(preset, dtype="float32", max_seq_len=seq_len)
    return config


def load_hf(config, params, directory: str, family: str = "olmo"):
    """The HF model of ``family`` (float32, training mode) with jaxlm's ``params``, written to ``directory``."""
    import torch
    import transformers

    from jaxlm import hf

    hf.save(config, params, directory, family=family)
    model = getattr(transformers, hf.get_family(family).architecture).from_pretrained(directory, dtype=torch.float32)
    model.train()  # dropout is 0; training mode as a training step would use
    return model


def interleaved_times(runners: dict, steps: int, pause: float) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per step of each ``name: (run, inputs)``, alternating which goes first; and last losses."""
    from tqdm import tqdm

    times: dict[str, list[float]] = {name: [] for name in runners}
    losses: dict[str, float] = {}
    for rep in tqdm(range(steps), desc="interleaved steps"):
        order = list(runners) if rep % 2 == 0 else list(reversed(runners))
        for name in order:
            run, inputs = runners[name]
            seconds, losses[name] = timed(run, inputs, pause)
            times[name].append(seconds)
    return times, losses


def print_table(header, rows) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


def markdown_table(header, rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *["| " + " | ".join(map(str, r)) + " |" for r in rows]]


def append_markdown(path: str | Path, lines: list[str]) -> None:
    """Append ``lines`` to a markdown file (created with a '# Benchmarks' title if missing)."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# Benchmarks\n", encoding="utf-8")
    with path.open("a", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
    print(f"appended to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-small", help="jaxlm model preset")
    parser.add_argument("--family", default="olmo", help="HF family the transformers side runs (jaxlm.hf.FAMILIES)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--seq-len",
        type=int,
        default=256,
        help="input tokens per row (a row holds seq_len + 1 tokens: inputs and next-token targets)",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed repetitions per framework")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per framework (after jaxlm's compile)")
    parser.add_argument("--pause", type=float, default=0.5, help="idle seconds before each timed step")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--date", default=datetime.date.today().isoformat(), help="date written with --append")
    parser.add_argument("--append", help=f"append the results as a '{SECTION}' section to this markdown file")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from jaxlm.model import init_params

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    config = preset_config(args.preset, args.seq_len)
    params = init_params(config, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        hf_model = load_hf(config, params, tmp, args.family)

    # seq_len + 1 tokens per row: seq_len inputs, each with its next token as target.
    tokens = np.random.default_rng(args.seed).integers(0, config.vocab_size, (args.batch, args.seq_len + 1))
    jax_tokens = jnp.asarray(tokens, jnp.int32)
    torch_tokens = torch.tensor(tokens, dtype=torch.long)
    runners = {"jaxlm": (jaxlm_step(config, params), jax_tokens), "transformers": (torch_step(hf_model), torch_tokens)}

    load_start = os.getloadavg()[0]
    compile_s, _ = timed(runners["jaxlm"][0], jax_tokens)
    for name, (run, toks) in runners.items():
        for _ in range(args.warmup):
            run(toks)
    times, losses = interleaved_times(runners, args.steps, args.pause)

    tokens_per_step = args.batch * args.seq_len
    median = {name: statistics.median(t) for name, t in times.items()}
    rate = {name: tokens_per_step / s for name, s in median.items()}
    best_rate = {name: tokens_per_step / min(t) for name, t in times.items()}
    rows = [
        (
            name,
            f"{median[name] * 1000:.0f}",
            f"{min(times[name]) * 1000:.0f}-{max(times[name]) * 1000:.0f}",
            f"{rate[name]:,.0f}",
            f"{best_rate[name]:,.0f}",
            f"{losses[name]:.5f}",
        )
        for name in runners
    ]
    header = ("implementation", "median step (ms)", "range (ms)", "tokens/s (median)", "tokens/s (best step)", "loss")
    ratio = rate["jaxlm"] / rate["transformers"]
    best_ratio = best_rate["jaxlm"] / best_rate["transformers"]
    loss_diff = abs(losses["jaxlm"] - losses["transformers"])
    print_table(header, rows)
    print(f"jaxlm / transformers tokens/s: {ratio:.2f}x (medians), {best_ratio:.2f}x (best steps)")
    print(f"|loss difference| {loss_diff:.1e}")
    print(f"jaxlm first call incl. XLA compile: {compile_s:.2f} s")
    threads = torch.get_num_threads()
    load_end = os.getloadavg()[0]

    if args.append:
        command = (
            f"python tools/bench_model.py --preset {args.preset} --family {args.family} --batch {args.batch} --seq-len {args.seq_len} "
            f"--steps {args.steps} --warmup {args.warmup} --pause {args.pause}"
            + (f" --torch-threads {args.torch_threads}" if args.torch_threads else "")
            + f" --append {args.append}"
        )
        n_params = config.num_params()
        from jaxlm import hf

        architecture = hf.get_family(args.family).architecture
        lines = [
            "",
            SECTION if args.family == "olmo" else SECTION_OTHER.format(architecture=architecture),
            "",
            "One training step's forward+backward (mean next-token cross-entropy and the gradient of every",
            f"parameter, float32) of the `{args.preset}` preset ({n_params / 1e6:.1f}M parameters), batch {args.batch} x",
            f"{args.seq_len} tokens: `jax.jit(jax.value_and_grad(...))` around `jaxlm.model.forward` against",
            f"transformers {transformers.__version__} `{architecture}` (torch {torch.__version__}, CPU, default attention",
            "implementation, `loss.backward()`), with identical weights (jaxlm's init written by `jaxlm.hf.save`).",
            f"Warm-up {args.warmup} steps each, then {args.steps} interleaved repetitions, each timed step after {args.pause} s",
            "idle (XLA's CPU workers spin briefly after a step and, on 2 cores, slowed a torch step started right",
            "after a jax step ~20x); medians. See `tools/bench_model.py`.",
            "",
            f"- command: `{command}`",
            f"- machine: {os.cpu_count()}-core CPU VM, no GPU (jax {jax.__version__} on {jax.default_backend()}); "
            f"1-minute load average {load_start:.2f} at the start, {load_end:.2f} at the end"
            + (" (idle at the start)" if load_start < 0.5 else " (NOT idle at the start: rerun before trusting it)"),
            f"- threads: torch intra-op threads {threads}; XLA CPU uses its own pool over all cores",
            f"- date: {args.date}",
            "",
            *markdown_table(header, rows),
            "",
            f"jaxlm / transformers throughput: **{ratio:.2f}x** (medians), {best_ratio:.2f}x (best steps).",
            f"Both report the same loss (difference {loss_diff:.1e}).",
            f"jaxlm's first call, including XLA compilation, took {compile_s:.2f} s (not in the medians).",
            "",
        ]
        append_markdown(args.append, lines)


if __name__ == "__main__":
    main()
