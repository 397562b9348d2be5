"""Accelerator check: bf16 training-step MFU, decode tokens/s with and without ITI, peak memory.

    python tools/bench_gpu.py --out DIR                 # gpu-150m and olmo-1b on the default device
    python tools/bench_gpu.py --dry-run --out DIR       # the same code path: tiny preset, small shapes, CPU

Training: ``jaxlm.train.Trainer``'s jitted, donating step (forward, backward, clip, AdamW) on
random tokens, compute in bfloat16 (parameters float32), timed after warm-up with the loss read
back each step. MFU = ``ModelConfig.flops_per_token`` x tokens/s over the device's dense bf16
peak (``jaxlm.perf``: 989 TFLOP/s for an H100/H200; on CPU a measured fp32 matmul). On a GPU
the training rows use ``attention: cudnn`` (``jax.nn.dot_product_attention``'s cuDNN flash
kernel); if that fails to compile the error is recorded and the row is measured again with
jaxlm's own softmax attention (the row's ``attention`` says which ran). Decode: ``jaxlm.decode.generate`` greedy, left-padded random prompts, no
stop token, without an intervention and with ITI (``add`` at ``head_out`` on K heads). Peak
memory: the device's ``peak_bytes_in_use`` since the process started (not reported by the CPU backend). Writes
``device_check.json`` and ``device_check.md`` to ``--out``; a section that fails (e.g. out of
memory) is recorded with its error and the rest still run. ``--budget-s`` skips what would
start after the budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(TOOLS.parent))

# (preset, batch, seq_len, remat) for the training rows; (batch, prompt, new tokens) for decode.
FULL_TRAIN = (("gpu-150m", 32, 1024, "none"), ("olmo-1b", 8, 2048, "block"))
DRY_TRAIN = (("tiny", 8, 64, "none"),)
FULL_DECODE = (("gpu-150m", 32, 128, 128), ("olmo-1b", 32, 128, 128))
DRY_DECODE = (("tiny", 8, 16, 16),)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def peak_memory_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def train_row(preset: str, batch: int, seq_len: int, remat: str, steps: int, warmup: int) -> dict:
    """The training row with cuDNN attention on a GPU, else (or if that fails) jaxlm's own attention."""
    import jax

    if jax.default_backend() != "gpu":
        return timed_train_row(preset, batch, seq_len, remat, steps, warmup, "softmax")
    try:
        return timed_train_row(preset, batch, seq_len, remat, steps, warmup, "cudnn")
    except Exception as err:
        row = timed_train_row(preset, batch, seq_len, remat, steps, warmup, "softmax")
        return {**row, "cudnn_error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}


def timed_train_row(preset: str, batch: int, seq_len: int, remat: str, steps: int, warmup: int, attention: str) -> dict:
    from bench_train import jaxlm_train_runner, optimizer_config

    from jaxlm import perf
    from jaxlm.config import model_preset

    config = dataclasses.replace(model_preset(preset), dtype="bfloat16", remat=remat, max_seq_len=max(seq_len, 64),
                                 attention=attention)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq_len))
    run, device_batch, _ = jaxlm_train_runner(config, optimizer_config(1e-4), 0, tokens)
    start = time.perf_counter()
    run(device_batch)
    first = time.perf_counter() - start
    for _ in range(warmup):
        run(device_batch)
    times, loss = [], float("nan")
    for _ in range(steps):
        start = time.perf_counter()
        loss = run(device_batch)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    tokens_per_s = batch * seq_len / median
    peak, source = perf.peak_flops_per_device()
    flops = config.flops_per_token(seq_len)
    return {
        "preset": preset, "params_M": round(config.num_params() / 1e6, 1), "batch": batch, "seq_len": seq_len,
        "remat": remat, "attention": attention, "dtype": "bfloat16", "first_step_s": round(first, 2), "median_step_s": round(median, 4),
        "tokens_per_s": round(tokens_per_s), "mfu": round(perf.mfu(flops, tokens_per_s, peak, 1), 4),
        "peak_flops": peak, "peak_source": source, "last_loss": loss, "peak_memory_bytes": peak_memory_bytes(),
    }


def decode_row(preset: str, batch: int, prompt_len: int, new_tokens: int, repeats: int, heads: int) -> dict:
    import jax
    from bench_generate import make_intervention, make_prompts

    from jaxlm import decode, model
    from jaxlm.config import model_preset

    config = dataclasses.replace(model_preset(preset), dtype="bfloat16")
    params = model.init_params(config, 0)
    tokens, mask = make_prompts(batch, prompt_len, config.vocab_size, 0)
    iti = make_intervention(config, params, min(heads, config.n_layers * config.n_heads), 8.0, 0)

    def generate(intervention):
        out = decode.generate(config, params, tokens, prompt_mask=mask, max_new_tokens=new_tokens,
                              intervention=intervention)
        jax.block_until_ready(out.tokens)

    row = {"preset": preset, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "dtype": "bfloat16"}
    variants = {"no intervention": None, f"ITI on {iti.k} heads": iti}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for intervention in variants.values():
        generate(intervention)  # compile (both share one program: no intervention is a zero shift)
    for _ in range(repeats):
        for name, intervention in variants.items():
            start = time.perf_counter()
            generate(intervention)
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        row[f"{name}: tokens/s"] = round(batch * new_tokens / statistics.median(values))
    row["peak_memory_bytes"] = peak_memory_bytes()
    return row


def guarded(name: str, fn, deadline: float) -> dict:
    """``fn()``'s row, or a row naming why it did not run (past the budget) or failed."""
    if time.monotonic() > deadline:
        log(f"{name}: skipped (time budget spent)")
        return {"section": name, "skipped": "time budget"}
    log(f"{name}: start")
    try:
        row = {"section": name, **fn()}
    except Exception as err:  # e.g. out of memory on a large shape: keep the other sections
        row = {"section": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    log(f"{name}: {json.dumps(row)}")
    return row


def markdown(rows: list[dict], header: dict) -> str:
    lines = [f"device: {header['device']}; jax {header['jax']}; backend {header['backend']}", ""]
    lines += ["| section | tokens/s | MFU | median step s | peak memory GiB (process so far) | note |", "|---|---|---|---|---|---|"]
    for row in rows:
        gib = f"{row['peak_memory_bytes'] / 2**30:.1f}" if row.get("peak_memory_bytes") else "n/a"
        if "tokens_per_s" in row:
            lines.append(f"| {row['section']} | {row['tokens_per_s']:,} | {100 * row['mfu']:.1f}% | "
                         f"{row['median_step_s']} | {gib} | remat {row['remat']}, attention {row['attention']}, {row['peak_source']} |")
        elif "error" in row or "skipped" in row:
            lines.append(f"| {row['section']} | | | | | {row.get('error') or 'skipped: ' + row['skipped']} |")
        else:
            rates = "; ".join(f"{k.split(':')[0]} {v:,}" for k, v in row.items() if k.endswith("tokens/s"))
            lines.append(f"| {row['section']} | {rates} | | | {gib} | greedy |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for device_check.json and device_check.md")
    parser.add_argument("--dry-run", action="store_true", help="tiny preset and small shapes (CPU)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per preset")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per decode variant")
    parser.add_argument("--heads", type=int, default=16, help="ITI heads")
    parser.add_argument("--budget-s", type=float, default=420.0, help="no section starts after this many seconds")
    args = parser.parse_args()
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0 or args.budget_s <= 0:
        parser.error("--steps and --repeats must be >= 1, --warmup >= 0, --budget-s > 0")

    import jax

    deadline = time.monotonic() + args.budget_s
    header = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "backend": jax.default_backend(),
              "dry_run": args.dry_run, "date": time.strftime("%Y-%m-%d")}
    log(json.dumps(header))
    rows = []
    for preset, batch, seq_len, remat in DRY_TRAIN if args.dry_run else FULL_TRAIN:
        rows.append(guarded(f"train {preset} {batch}x{seq_len}",
                            lambda: train_row(preset, batch, seq_len, remat, args.steps, args.warmup), deadline))
    for preset, batch, prompt, new in DRY_DECODE if args.dry_run else FULL_DECODE:
        rows.append(guarded(f"decode {preset} batch {batch}, {prompt}+{new}",
                            lambda: decode_row(preset, batch, prompt, new, args.repeats, args.heads), deadline))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    (out / "device_check.md").write_text(markdown(rows, header))
    print(markdown(rows, header))


if __name__ == "__main__":
    main()
