"""Benchmark: the DPO train step against the SFT step on the same tokens (jaxlm, CPU).

Both steps are ``jaxlm.train.Trainer(...).jit_step`` of one preset with the same optimizer:
SFT over ``batch`` rows of ``seq_len`` tokens (loss on the second half of each row, the
"response"); DPO over ``batch // 2`` pairs, i.e. the same ``batch`` rows (chosen and rejected
sides) through one forward, plus the per-pair reference log-probs a DPO batch carries. DPO's
extra work is the per-sequence log-prob sums and the sigmoid loss, so on equal tokens the two
should run at nearly the same speed. Steps are timed interleaved after one compile step and
``--warmup`` steps each; the 1-minute load average is recorded before and after.

    python tools/bench_objectives.py [--preset cpu-small] [--batch 16] [--seq-len 256] [--steps 10]
                                     [--append docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
from bench_model import append_markdown, interleaved_times, markdown_table, preset_config, print_table  # noqa: E402


def batches(batch: int, seq_len: int, vocab: int, seed: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=(batch, seq_len)).astype(np.int32)
    ones = np.ones_like(tokens)
    mask = np.zeros_like(tokens)
    mask[:, seq_len // 2:] = 1
    sft = {"tokens": tokens, "segment_ids": ones, "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape).copy(),
           "loss_mask": mask}
    half = batch // 2
    dpo = {"chosen_tokens": tokens[:half], "chosen_segment_ids": ones[:half], "chosen_loss_mask": mask[:half],
           "rejected_tokens": tokens[half:], "rejected_segment_ids": ones[half:], "rejected_loss_mask": mask[half:],
           "ref_chosen_logp": np.full(half, -100.0, np.float32), "ref_rejected_logp": np.full(half, -100.0, np.float32)}
    return sft, dpo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pause", type=float, default=0.5)
    parser.add_argument("--append")
    args = parser.parse_args()
    load_start = os.getloadavg()[0]  # before anything is built or compiled
    import jax

    from jaxlm.config import MeshConfig
    from jaxlm.optim import OptimizerConfig
    from jaxlm.sharding import make_mesh
    from jaxlm.train import Trainer

    config = preset_config(args.preset, args.seq_len)
    mesh = make_mesh(MeshConfig())
    sft_batch, dpo_batch = batches(args.batch, args.seq_len, config.vocab_size)
    runners = {}
    for objective, batch in (("sft", sft_batch), ("dpo", dpo_batch)):
        trainer = Trainer(config, OptimizerConfig(lr=1e-4, warmup_steps=0, schedule="constant"), 1000, mesh, objective=objective)
        step = trainer.jit_step({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()})
        holder = {"state": trainer.init_state(0)}

        def run(inputs, step=step, holder=holder):
            holder["state"], metrics = step(holder["state"], inputs)
            return float(metrics["loss"])

        runners[objective] = (run, batch)
    for run, inputs in runners.values():
        for _ in range(1 + args.warmup):
            run(inputs)
    times, _ = interleaved_times(runners, args.steps, args.pause)
    load_end = os.getloadavg()[0]
    tokens = args.batch * args.seq_len
    median = {name: statistics.median(t) for name, t in times.items()}
    header = ["objective", "rows x tokens", "median s/step", "tokens/s", "relative to SFT"]
    rows = [[name, f"{args.batch} x {args.seq_len}", f"{median[name]:.3f}", f"{tokens / median[name]:,.0f}",
             f"{median['sft'] / median[name]:.2f}x"] for name in runners]
    print_table(header, rows)
    print(f"load average (1 min): {load_start:.2f} before, {load_end:.2f} after")
    if args.append:
        command = (f"python tools/bench_objectives.py --preset {args.preset} --batch {args.batch} --seq-len {args.seq_len} "
                   f"--steps {args.steps} --warmup {args.warmup} --pause {args.pause}")
        append_markdown(args.append, [
            "", f"### DPO vs SFT step ({args.preset}, {datetime.date.today().isoformat()})", "",
            f"`{command}`; {os.cpu_count()} CPU cores; load average (1 min) {load_start:.2f} before, {load_end:.2f} after.",
            "", *markdown_table(header, rows),
        ])


if __name__ == "__main__":
    main()
