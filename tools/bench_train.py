"""Benchmark: full training step tokens/s of jaxlm (optax AdamW) against transformers' OLMo + torch AdamW on CPU.

In one run, with identical weights (jaxlm's init written with ``jaxlm.hf.save``) and
the same batch, float32 on both sides:

- jaxlm: ``jaxlm.train.Trainer(...).jit_step``: forward, backward, global-norm clipping at 1.0
  and the optax AdamW update, state donated (what ``jaxlm train`` runs every step);
- transformers: ``OlmoForCausalLM`` + ``torch.optim.AdamW`` with the same lr, betas, eps and
  weight decay (none on the embedding, as jaxlm's mask), ``clip_grad_norm_(..., 1.0)`` and
  ``zero_grad(set_to_none=True)``; ``torch.set_num_threads`` = the core count.

Both run the preset over ``batch x seq_len`` tokens and take the mean next-token cross-entropy
of the ``seq_len - 1`` targets per row, at a constant learning rate, so their losses track each
other step after step. After each side's first step (jaxlm's includes XLA compilation) and
warm-up steps, steps are timed interleaved (alternating which goes first), each after
``--pause`` s idle: ``tools/bench_model.py`` found XLA's CPU worker threads spinning for a moment
after a step, which slowed a torch step started right after a jax step ~20x on 2 cores.
``--breakdown`` also times forward+backward alone (``bench_model``'s steps) to show what the
optimizer costs.

CPU utilisation: model FLOPs per token (``ModelConfig.flops_per_token``, which already counts
forward + backward: 6N + attention) x tokens/s over the best in-run fp32 square-matmul FLOP/s of
each framework (``jaxlm.perf.measure_matmul_flops`` and the same measurement in torch).

Peak memory: a short real ``jaxlm train`` of the preset (synthetic prepared dataset written with
``jaxlm.data.records``, batch ``--rss-batch`` x seq_len) in a child process, and a torch child
training the same model on random tokens. Each child's peak RSS is
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` read by a small launcher process: Linux carries the RSS
high-water mark of this (large) process into children it starts directly.

    python tools/bench_train.py [--preset cpu-small] [--batch 8] [--seq-len 256] [--steps 10]
                                [--breakdown] [--append docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
from bench_model import (  # noqa: E402  (same directory)
    append_markdown,
    interleaved_times,
    jaxlm_step,
    load_hf,
    markdown_table,
    preset_config,
    print_table,
    timed,
    torch_step,
)

SECTION = "## Training step (jaxlm + optax vs transformers OLMo + torch AdamW)"
HF_NO_DECAY = ("embed_tokens", "lm_head", "norm")  # transformers' names for jaxlm's no_decay ("embedding", "norm")


def core_count() -> int:
    return len(os.sched_getaffinity(0))


def optimizer_config(lr: float):
    """OLMo-1B's AdamW defaults (betas 0.9/0.95, eps 1e-8, wd 0.1, clip 1.0) at a constant ``lr``."""
    from jaxlm.optim import OptimizerConfig

    return OptimizerConfig(lr=lr, warmup_steps=0, schedule="constant")


# -- jaxlm ---------------------------------------------------------------------------------
def jaxlm_train_runner(config, opt_config, seed: int, tokens: np.ndarray):
    """(run(batch) -> loss, device batch, initial params on the host) for the jitted, donating Trainer step."""
    import jax

    from jaxlm.sharding import make_mesh
    from jaxlm.train import Trainer

    trainer = Trainer(config, opt_config, total_steps=1_000_000, mesh=make_mesh())
    state = trainer.init_state(seed)
    initial_params = jax.device_get(state.params)
    batch = {"tokens": tokens.astype(np.int32)}
    device_batch = jax.device_put(batch, trainer.batch_shardings(batch))
    step = trainer.jit_step(device_batch)
    holder = {"state": state}

    def run(b):
        holder["state"], metrics = step(holder["state"], b)
        return float(metrics["loss"])  # waits for the step

    return run, device_batch, initial_params


# -- torch ---------------------------------------------------------------------------------
def torch_adamw(model, opt_config):
    """``torch.optim.AdamW`` with jaxlm's hyper-parameters and weight-decay mask."""
    import torch

    named = list(model.named_parameters())
    decay = [p for n, p in named if not any(k in n for k in HF_NO_DECAY)]
    no_decay = [p for n, p in named if any(k in n for k in HF_NO_DECAY)]
    groups = [{"params": decay, "weight_decay": opt_config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=opt_config.lr, betas=(opt_config.beta1, opt_config.beta2), eps=opt_config.eps)


def torch_train_runner(model, optimizer, clip_norm: float):
    """run(tokens) -> loss: one full training step, loss as jaxlm's (targets tokens[:, 1:])."""
    import torch
    import torch.nn.functional as F

    def run(tokens):
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=tokens).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        return float(loss.detach())

    return run


def torch_matmul_flops(size: int, repeats: int) -> float:
    """FLOP/s of a square float32 matmul in torch (best of ``repeats``), as ``jaxlm.perf.measure_matmul_flops``."""
    import torch

    a = torch.ones((size, size), dtype=torch.float32)
    a @ a
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def torch_training_child(hf_dir: str, batch: int, seq_len: int, steps: int, lr: float, seed: int) -> None:
    """Train the HF checkpoint in ``hf_dir`` for ``steps`` steps on random tokens (run in a child for its RSS)."""
    import torch
    import transformers

    torch.set_num_threads(core_count())
    model = transformers.OlmoForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.train()
    opt_config = optimizer_config(lr)
    run = torch_train_runner(model, torch_adamw(model, opt_config), opt_config.clip_norm)
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        run(tokens)


# -- peak RSS --------------------------------------------------------------------------------
# Linux carries a process's RSS high-water mark across fork/vfork + exec, so a child started
# from this (large) process would report at least this process's RSS: a small launcher
# process starts the child and reports getrusage(RUSAGE_CHILDREN).ru_maxrss for it alone.
LAUNCHER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "print('RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(code)\n"
)


def run_child(argv: list[str]) -> tuple[int, float, str]:
    """(peak RSS in KiB, wall seconds, output) of a child process; raises if it fails."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv[:4])} ... exited {proc.returncode}:\n{output[-3000:]}")
    rss_kib = int(proc.stdout.strip().splitlines()[-1].split()[1])
    return rss_kib, time.perf_counter() - start, output


def jaxlm_train_rss(preset: str, seq_len: int, batch: int, steps: int, lr: float, root: Path) -> dict:
    """Peak RSS and logged tokens/s of ``jaxlm train`` on a small synthetic prepared dataset."""
    import yaml
    from bench_loader import VOCAB, write_dataset

    model = preset_config(preset, seq_len)
    if model.vocab_size < VOCAB:
        raise SystemExit(f"the RSS run's synthetic ids need a vocabulary of {VOCAB}; {preset} has {model.vocab_size} (pass --rss-steps 0)")
    write_dataset(root / "data", books=4, posts=4000, seed=0)
    config = {
        "model": {"preset": preset, "dtype": "float32", "max_seq_len": model.max_seq_len},
        "optimizer": {"lr": lr, "warmup_steps": 0, "schedule": "constant"},
        "data": {"dataset": str(root / "data"), "sources": {"books": 0.9, "posts": 0.1}, "seq_len": seq_len, "batch_size": batch},
        "steps": steps,
        "log_every": 1,
    }
    (root / "train.yaml").write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "jaxlm", "train", str(root / "train.yaml"), "--run-dir", str(root / "run"), "--no-progress"]
    rss_kib, wall, _ = run_child(argv)
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["tokens_per_sec"] for r in rows[1:]]  # the first step includes compilation
    return {"rss_kib": rss_kib, "wall_s": wall, "tokens_per_sec": statistics.median(rates), "steps": len(rows)}


def torch_train_rss(hf_dir: str, seq_len: int, batch: int, steps: int, lr: float) -> dict:
    code = (
        f"import sys; sys.path.insert(0, {str(TOOLS)!r}); from bench_train import torch_training_child; "
        f"torch_training_child({hf_dir!r}, {batch}, {seq_len}, {steps}, {lr!r}, 0)"
    )
    rss_kib, wall, _ = run_child([sys.executable, "-c", code])
    return {"rss_kib": rss_kib, "wall_s": wall, "steps": steps}


# -- report ----------------------------------------------------------------------------------
def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def step_rows(times, first_s, losses, tokens_per_step, flops_per_token, peaks):
    rows = []
    for name, t in times.items():
        median = statistics.median(t)
        rate = tokens_per_step / median
        rows.append(
            (
                name,
                f"{median * 1000:.0f}",
                f"{min(t) * 1000:.0f}-{max(t) * 1000:.0f}",
                f"{rate:,.0f}",
                f"{tokens_per_step / min(t):,.0f}",
                f"{100 * flops_per_token * rate / peaks[name.split()[0]]:.1f}%",
                f"{first_s[name]:.2f}" if name in first_s else "",
                f"{losses[name]:.5f}",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-small", help="jaxlm model preset")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per row (seq_len - 1 next-token targets)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per framework")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per framework after the first")
    parser.add_argument("--pause", type=float, default=0.5, help="idle seconds before each timed step")
    parser.add_argument("--lr", type=float, default=4e-4, help="constant learning rate (both sides)")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: the core count)")
    parser.add_argument("--breakdown", action="store_true", help="also time forward+backward alone (no optimizer)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="square matmul for the FLOP/s peak")
    parser.add_argument("--rss-batch", type=int, default=32, help="batch of the peak-RSS runs")
    parser.add_argument("--rss-steps", type=int, default=20, help="steps of the peak-RSS `jaxlm train` run (0: skip)")
    parser.add_argument("--rss-torch-steps", type=int, default=3, help="steps of the peak-RSS torch run (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--date", default=datetime.date.today().isoformat(), help="date written with --append")
    parser.add_argument("--append", help=f"append the results as a '{SECTION}' section to this markdown file")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from jaxlm.perf import measure_matmul_flops

    torch.set_num_threads(args.torch_threads or core_count())
    config = preset_config(args.preset, args.seq_len)
    opt_config = optimizer_config(args.lr)
    tokens = np.random.default_rng(args.seed).integers(0, config.vocab_size, (args.batch, args.seq_len))
    jax_run, jax_batch, params = jaxlm_train_runner(config, opt_config, args.seed, tokens)
    hf_dir = tempfile.mkdtemp(prefix="bench-train-hf-")
    hf_model = load_hf(config, params, hf_dir)
    torch_tokens = torch.tensor(tokens, dtype=torch.long)
    runners = {
        "jaxlm": (jax_run, jax_batch),
        "transformers": (torch_train_runner(hf_model, torch_adamw(hf_model, opt_config), opt_config.clip_norm), torch_tokens),
    }
    if args.breakdown:
        # bench_model's steps use row[:-1] as inputs: one extra token gives the same seq_len positions.
        extra = np.concatenate([tokens, tokens[:, :1]], axis=1)
        runners["jaxlm fwd+bwd"] = (jaxlm_step(config, params), jnp.asarray(extra, jnp.int32))
        runners["transformers fwd+bwd"] = (torch_step(load_hf(config, params, hf_dir)), torch.tensor(extra, dtype=torch.long))

    load_start = os.getloadavg()[0]
    peaks = {"jaxlm": measure_matmul_flops(args.matmul_size, repeats=10), "transformers": torch_matmul_flops(args.matmul_size, 10)}
    print(f"fp32 {args.matmul_size}^2 matmul peak: jax {peaks['jaxlm'] / 1e9:.1f} GFLOP/s, torch {peaks['transformers'] / 1e9:.1f} GFLOP/s")
    first_s, first_loss = {}, {}
    for name, (run, inputs) in runners.items():
        time.sleep(args.pause)
        first_s[name], first_loss[name] = timed(run, inputs)
        for _ in range(args.warmup):
            run(inputs)
    times, losses = interleaved_times(runners, args.steps, args.pause)
    load_end = os.getloadavg()[0]

    tokens_per_step = args.batch * args.seq_len
    flops_per_token = config.flops_per_token(args.seq_len)
    header = ("step", "median (ms)", "range (ms)", "tokens/s (median)", "tokens/s (best)", "MFU (median)", "first step (s)", "last loss")
    rows = step_rows(times, first_s, losses, tokens_per_step, flops_per_token, peaks)
    rate = {name: tokens_per_step / statistics.median(t) for name, t in times.items()}
    best = {name: tokens_per_step / min(t) for name, t in times.items()}
    ratio, best_ratio = rate["jaxlm"] / rate["transformers"], best["jaxlm"] / best["transformers"]
    print_table(header, rows)
    print(f"jaxlm / transformers training tokens/s: {ratio:.2f}x (medians), {best_ratio:.2f}x (best steps)")
    first_diff = abs(first_loss["jaxlm"] - first_loss["transformers"])
    last_diff = abs(losses["jaxlm"] - losses["transformers"])
    print(f"|loss difference| first step {first_diff:.1e}, step {1 + args.warmup + args.steps} {last_diff:.1e}")

    rss = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-rss-") as tmp:
        if args.rss_steps:
            rss["jaxlm train"] = jaxlm_train_rss(args.preset, args.seq_len, args.rss_batch, args.rss_steps, args.lr, Path(tmp))
        if args.rss_torch_steps:
            rss["transformers + AdamW"] = torch_train_rss(hf_dir, args.seq_len, args.rss_batch, args.rss_torch_steps, args.lr)
    shutil.rmtree(hf_dir, ignore_errors=True)
    for name, r in rss.items():
        print(f"peak RSS {name}: {r['rss_kib'] / 1024:,.0f} MiB ({r['steps']} steps, {r['wall_s']:.0f} s)")

    command = (
        f"python tools/bench_train.py --preset {args.preset} --batch {args.batch} --seq-len {args.seq_len} --steps {args.steps} "
        f"--warmup {args.warmup} --pause {args.pause}{' --breakdown' if args.breakdown else ''}"
        f"{f' --torch-threads {args.torch_threads}' if args.torch_threads else ''} --rss-batch {args.rss_batch} "
        f"--rss-steps {args.rss_steps} --rss-torch-steps {args.rss_torch_steps}" + (f" --append {args.append}" if args.append else "")
    )
    lines = [
        "",
        SECTION,
        "",
        f"One full training step of the `{args.preset}` preset ({config.num_params() / 1e6:.1f}M parameters), float32, batch",
        f"{args.batch} x {args.seq_len} tokens: `jaxlm.train.Trainer(...).jit_step` (forward, backward, global-norm clip 1.0,",
        "optax AdamW, state donated) against transformers `OlmoForCausalLM` + `torch.optim.AdamW` (same lr, betas",
        "0.9/0.95, eps 1e-8, weight decay 0.1 except the embedding), `clip_grad_norm_(..., 1.0)`, `zero_grad(set_to_none=True)`;",
        f"identical initial weights (`jaxlm.hf.save`), the same batch every step, constant lr {args.lr:g}. After each side's",
        f"first step and {args.warmup} warm-up steps, {args.steps} interleaved repetitions, each after {args.pause} s idle (XLA's CPU",
        "workers spin briefly after a step: `tools/bench_model.py` saw a torch step started right after a jax step run ~20x",
        "slower on 2 cores). MFU: `ModelConfig.flops_per_token` (forward + backward, 6N + attention:",
        f"{flops_per_token / 1e6:.1f} MFLOP/token) x tokens/s over each framework's best fp32 {args.matmul_size}x{args.matmul_size}",
        "matmul FLOP/s measured in the same run. See `tools/bench_train.py`.",
        "",
        f"- command: `{command}`",
        f"- machine: {core_count()}-core CPU VM ({cpu_model()}), no GPU; jax {jax.__version__} ({jax.default_backend()}),",
        f"  torch {torch.__version__} with {torch.get_num_threads()} intra-op threads, transformers {transformers.__version__};",
        f"  cores shared with other jobs (1-minute load average {load_start:.1f} at the start, {load_end:.1f} after the timed",
        "  steps; 2.0 = both cores busy)",
        f"- date: {args.date}",
        "",
        *markdown_table(header, rows),
        "",
        f"jaxlm / transformers training throughput: **{ratio:.2f}x** (medians), {best_ratio:.2f}x (best steps); target >= 1.5x.",
        f"Matmul peak (fp32, {args.matmul_size}^2, best of 10): jax {peaks['jaxlm'] / 1e9:.1f} GFLOP/s, torch "
        f"{peaks['transformers'] / 1e9:.1f} GFLOP/s; each MFU is against its own framework's peak.",
        f"Loss difference: {first_diff:.1e} at the first step, {last_diff:.1e} at step {1 + args.warmup + args.steps} "
        f"(after {args.warmup + args.steps} updates on the same batch).",
    ]
    if args.breakdown:
        for side in ("jaxlm", "transformers"):
            full, grad = times[side], times[f"{side} fwd+bwd"]
            median_diff = statistics.median(full) - statistics.median(grad)
            lines.append(
                f"{side}: full step minus forward+backward alone (clip + AdamW): {median_diff * 1000:+.0f} ms (medians), "
                f"{(min(full) - min(grad)) * 1000:+.0f} ms (best steps)."
            )
    if rss:
        lines += ["", "| peak RSS (`ru_maxrss` of a child process, via a launcher) | MiB | steps | batch | wall (s) |", "|---|---|---|---|---|"]
        for name, r in rss.items():
            lines.append(f"| {name} | {r['rss_kib'] / 1024:,.0f} | {r['steps']} | {args.rss_batch} x {args.seq_len} | {r['wall_s']:.0f} |")
        if "jaxlm train" in rss:
            lines += [
                "",
                f"`jaxlm train` (synthetic prepared dataset of `jaxlm.data.records` shards, books 90% / posts 10%, default",
                "checkpointing and TensorBoard) logged a median of "
                f"{rss['jaxlm train']['tokens_per_sec']:,.0f} tokens/s after its first step; the torch child trains on random tokens.",
            ]
    lines.append("")
    print("\n".join(lines))
    if args.append:
        append_markdown(args.append, lines)


if __name__ == "__main__":
    main()
