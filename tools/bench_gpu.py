"""GPU check: bf16 training-step MFU, decode tokens/s with and without ITI, peak memory, and
whether jaxlm runs on the machine's own jax (issue #20, item 6).

    python tools/bench_gpu.py [--presets gpu-150m,olmo-1b] [--budget-s 390] [--out DIR]
    python tools/bench_gpu.py --dry-run          # CPU, tiny preset, small shapes (a rehearsal)

Normally started by ``tools/device_check.sh`` (which installs jaxlm into the device's python
first). This process runs no jax itself: it runs one child process per job, so each job's
peak device memory is its own, an out-of-memory error or a crash costs only that job, and a
job that outruns the time budget is killed. Jobs, in this order (env, smoke, the softmax and
cudnn train rows of each preset, decode of each preset, then the optional cudnn_causal rows):

  env      versions (against pyproject.toml's pins), devices, an import of every jaxlm module
           the benchmarks and ``jaxlm train`` need, a tiny float32 forward on the default
           device against the same on the CPU, and the bf16 matmul rate on random data
           (8192^3; on CPU: ``jaxlm.perf.measure_matmul_flops``, fp32, as bench_train)
  smoke    ``jaxlm train`` of the tiny preset on a synthetic prepared dataset (grain +
           ArrayRecord + orbax + tensorboardX), stopped at step 4 and resumed to step 8
  train    per preset x attention: ``jaxlm.train.Trainer(...).jit_step`` (forward, backward,
           clip, AdamW; state donated) on random tokens, bf16 compute (parameters float32:
           ModelConfig has no parameter dtype), warm-up, then ``--steps`` steps each timed to
           ``block_until_ready``; tokens/s from the median step; MFU =
           ``ModelConfig.flops_per_token`` (6N + attention, full T x T) x tokens/s over the
           dense bf16 peak (``jaxlm.perf.table_peak_flops``: 989 TFLOP/s for an H100/H200
           SXM, the vendor datasheet's dense bf16 figure) and over the matmul rate env measured.
           Out of memory: retried with remat 'block', then with half the batch.
  decode   per preset: ``jaxlm.decode.generate``, random parameters, greedy, no stop token,
           left-padded random prompts: the program without edit sites (prefill + decode with
           ``intervention=None``), the baseline (a zero ITI: what ``generate`` runs without an
           intervention) and ITI (add at ``head_out`` on the top-K heads, ``last`` positions;
           ``tools/bench_generate.make_intervention``), interleaved repeats, medians.

Attention (``--attention``, train rows): ``softmax`` is ``ModelConfig.attention``'s default
(jaxlm's einsum attention, float32 logits, a [B, T, S] mask); ``cudnn`` is ``attention:
cudnn``: ``jax.nn.dot_product_attention(..., mask=..., implementation='cudnn')``, which jax turns
into cuDNN's fused flash kernel with the mask as an additive [B, 1, T, S] bias (so every key block
is computed, and the bias is read); ``cudnn_causal`` (a benchmark-only variant) swaps
``jaxlm.model.attend`` inside its child for ``jax.nn.dot_product_attention(q, k, v,
is_causal=True, implementation='cudnn')`` without the mask: the same function for the unpacked,
unpadded rows trained on here, and what a causal fast path in the model would buy. The
first-step loss and gradient norm of each variant are compared with the softmax row's, and
whether cuDNN's fused attention is in the program is read from the lowered forward (a
``__cudnn$fmha`` custom call). With ``--dry-run`` the two cuDNN variants use
``implementation='xla'`` (no cuDNN on a CPU). Decode uses the default attention.

Time: ``--budget-s`` (default 390 s; device_check.sh passes what its 8-minute plan leaves) is
shared out in that order: each job may run up to its cap but leaves the least time every later
non-optional job needs; a job with no time left is skipped and reported as such. SIGTERM or
SIGINT kills the running child (its process group) and still writes the report. GPU children
run with ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.94`` unless it is set (olmo-1b at 8 x 2048 without
remat needs more than JAX's default 75%); peak memory is ``memory_stats()['peak_bytes_in_use']``
of the job's own process (n/a on CPU).

Results: ``device_check.json`` (everything) and ``device_check.md`` (tables) in ``--out`` (default
$OUT, else ./bench_gpu_out); the markdown is printed last. Exit 0 when every job is ok, 1 when
one is not, 2 (one line) for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent

TRAIN_SHAPES = {"gpu-150m": (32, 1024), "olmo-1b": (8, 2048), "llama-100m": (32, 1024), "cpu-small": (8, 256), "tiny": (4, 64)}
ATTENTIONS = ("softmax", "cudnn", "cudnn_causal")
REMATS = ("none", "block", "minimal")
# (least, most) seconds a job may take; the least is kept back for every later job that is not
# optional (the bench-only cudnn_causal rows are: they run with what is left).
JOB_SECONDS = {"env": (30, 90), "smoke": (25, 120), "train": (45, 200), "decode": (40, 150)}
BIG_PRESETS = ("olmo-1b",)  # first compiles take longer
GIB = 2**30


def log(message: str) -> None:
    print(f"[bench_gpu {time.strftime('%H:%M:%S')}] {message}", flush=True)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr and exit status 2."""

    def error(self, message: str):  # noqa: D401 (argparse API)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


class UsageError(Exception):
    pass


# ---------------------------------------------------------------------------------------
# Children (each runs in its own process)
# ---------------------------------------------------------------------------------------


def memory(device=None) -> dict:
    """Peak and limit of device memory in bytes (None where the backend keeps no stats, e.g. CPU)."""
    import jax

    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 (some backends raise instead of returning None)
        stats = None
    stats = stats or {}
    return {"peak_bytes": stats.get("peak_bytes_in_use"), "bytes_limit": stats.get("bytes_limit")}


def random_matmul_flops(size: int, repeats: int = 10) -> float:
    """FLOP/s of a jitted bf16 square matmul on random normal inputs (median of ``repeats``).

    ``jaxlm.perf.measure_matmul_flops`` multiplies ones, and constant inputs can time faster
    than real data on a GPU: the GPU ceiling is measured here on random inputs, rotated.
    """
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0), 4)
    mats = [jax.random.normal(k, (size, size), jnp.bfloat16) for k in keys]
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(mats[0], mats[1]).block_until_ready()
    times = []
    for i in range(repeats):
        a, b = mats[i % 4], mats[(i + 1) % 4]
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2.0 * size**3 / statistics.median(times)


def pinned_versions() -> dict[str, str]:
    import re
    import tomllib

    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = {}
    for spec in data["project"]["dependencies"]:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^;\s]+)", spec)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


ENV_PACKAGES = (
    "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin", "jax-cuda12-pjrt", "flax", "optax",
    "orbax-checkpoint", "grain", "array-record", "tensorboardX", "tokenizers", "numpy", "ml_dtypes", "safetensors",
    "pyyaml", "tqdm", "scipy", "scikit-learn", "matplotlib", "protobuf", "etils", "portpicker", "datasketch",
    "fasttext-numpy2", "alt-profanity-check", "tensorflow-datasets", "jaxlm",
)
# What the benchmarks, `jaxlm train` and the rest of the library import (tfds is imported only on use).
IMPORT_MODULES = (
    "jaxlm.model", "jaxlm.train", "jaxlm.decode", "jaxlm.intervene", "jaxlm.probe", "jaxlm.perf", "jaxlm.loop",
    "jaxlm.checkpoint", "jaxlm.data.records", "jaxlm.data.pipeline", "jaxlm.data.prepare", "jaxlm.tokenizer", "jaxlm.hf",
    "jaxlm.ops", "jaxlm.cli", "jaxlm.data.quality", "jaxlm.data.filters", "datasketch", "profanity_check",
    "tensorboardX",
)


def child_env(spec: dict) -> dict:
    import importlib
    import importlib.metadata as md
    import platform
    import traceback

    result: dict = {"python": platform.python_version(), "executable": sys.executable}
    pins = pinned_versions()
    versions = {}
    for name in ENV_PACKAGES:
        try:
            found = md.version(name)
        except md.PackageNotFoundError:
            found = None
        versions[name] = {"found": found, "pinned": pins.get(name.lower())}
    result["versions"] = versions
    imports = {}
    for module in IMPORT_MODULES:
        try:
            importlib.import_module(module)
            imports[module] = "ok"
        except BaseException as err:  # noqa: BLE001 (an import may exit or raise anything)
            line = traceback.format_exception_only(type(err), err)[-1].strip()
            imports[module] = line[:300]
    result["imports"] = imports
    log("imports: " + ", ".join(f"{m}={'ok' if v == 'ok' else 'FAILED'}" for m, v in imports.items()))

    import jax
    import numpy as np

    from jaxlm import model as model_lib
    from jaxlm import perf
    from jaxlm.config import model_preset

    device = jax.devices()[0]
    result["backend"] = jax.default_backend()
    result["devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
    result["device_kind"] = device.device_kind
    log(f"jax {jax.__version__} backend {jax.default_backend()} devices {result['devices']}")

    # A tiny float32 forward here against the same on the CPU backend.
    try:
        config = model_preset("tiny")
        params = model_lib.init_params(config, 0)
        tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 16)).astype(np.int32)
        fwd = jax.jit(lambda p, t: model_lib.forward(config, p, t).logits)
        with jax.default_matmul_precision("highest"):
            here = np.asarray(fwd(params, tokens))
            tiny = {"finite": bool(np.isfinite(here).all())}
            bf16 = model_preset("tiny", dtype="bfloat16")
            out = np.asarray(jax.jit(lambda p, t: model_lib.forward(bf16, p, t).logits)(params, tokens))
            tiny["bf16_rel_err_vs_fp32"] = float(np.linalg.norm(out - here) / np.linalg.norm(here))
            try:
                cpu = jax.devices("cpu")[0]
                with jax.default_device(cpu):
                    ref = np.asarray(fwd(jax.device_put(params, cpu), jax.device_put(tokens, cpu)))
                tiny["rel_err_vs_cpu"] = float(np.linalg.norm(here - ref) / np.linalg.norm(ref))
            except Exception as err:  # noqa: BLE001 (e.g. JAX_PLATFORMS without cpu)
                tiny["rel_err_vs_cpu"] = None
                tiny["cpu_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        result["tiny_forward"] = tiny
    except Exception as err:  # noqa: BLE001 (reported; the other checks still run)
        result["tiny_forward"] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    log(f"tiny forward: {result['tiny_forward']}")

    result["peak_flops_spec"] = perf.table_peak_flops(device)
    try:
        if jax.default_backend() == "cpu":
            result["peak_flops_measured"] = perf.measure_matmul_flops(spec["matmul_size"])
            result["peak_flops_measured_how"] = f"fp32 {spec['matmul_size']}^2 matmul of ones (jaxlm.perf)"
        else:
            result["peak_flops_measured"] = random_matmul_flops(spec["matmul_size"])
            result["peak_flops_measured_how"] = f"bf16 {spec['matmul_size']}^2 matmul, random normal inputs, median of 10"
        log(f"matmul: {result['peak_flops_measured'] / 1e12:.2f} TFLOP/s ({result['peak_flops_measured_how']}); "
            f"spec peak {result['peak_flops_spec']}")
    except Exception as err:  # noqa: BLE001
        result["peak_flops_measured"] = None
        result["peak_flops_measured_how"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    result["memory"] = memory(device)
    if any(v != "ok" for v in imports.values()) or "error" in result["tiny_forward"]:
        result["error"] = "an import or the tiny forward failed (see above)"
    return result


def child_smoke(spec: dict) -> dict:
    """``jaxlm train`` of the tiny preset on a synthetic dataset: stop at step 4, resume to 8."""
    import numpy as np
    import yaml

    from jaxlm.data import records

    result: dict = {}
    root = Path(tempfile.mkdtemp(prefix="bench-gpu-smoke-"))
    rng = np.random.default_rng(0)
    vocab, eos, pad = 256, 0, 1
    infos = {}
    for name in ("a", "b"):
        docs = [
            (rng.integers(2, vocab, int(rng.integers(8, 200))).astype(np.uint16), {"doc_id": f"{name}-{i}", "source": name})
            for i in range(200)
        ]
        stats = records.write_source(root / name, docs, num_shards=2)
        infos[name] = records.SourceInfo(name, root / name, stats["num_documents"], stats["num_tokens"], "uint16", vocab, eos, pad)
    records.write_manifest(root, infos)
    config = {
        "model": {"preset": "tiny"},
        "optimizer": {"lr": 3e-3, "warmup_steps": 2},
        "data": {"dataset": str(root), "sources": {"a": 0.5, "b": 0.5}, "seq_len": 32, "batch_size": 8},
        "checkpoint": {"every": 2, "keep_last": 2},
        "steps": 8,
        "log_every": 1,
        "tensorboard": True,
    }
    (root / "train.yaml").write_text(yaml.safe_dump(config))
    run_dir = root / "run"
    base = [sys.executable, "-m", "jaxlm", "train", str(root / "train.yaml"), "--run-dir", str(run_dir), "--no-progress"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    for label, argv in (("first", [*base, "--stop-at", "4"]), ("resume", base)):
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=max(10.0, spec["deadline"] - time.time()))
        result[f"{label}_s"] = round(time.perf_counter() - start, 1)
        result[f"{label}_rc"] = proc.returncode
        if proc.returncode:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
            result["error"] = f"jaxlm train ({label}) exited {proc.returncode}: " + " | ".join(tail)
            return result
        if label == "first":
            result["first_stop"] = (proc.stdout.strip().splitlines() or [""])[-1]
            first_rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    # Resumed from the step-4 checkpoint: the first attempt's rows are kept as written (a restart
    # from scratch would move them aside to metrics.jsonl.before-restart and log them again).
    kept = (run_dir / "metrics.jsonl").read_text().splitlines()[: len(first_rows)] == first_rows
    result["resumed"] = kept and not list(run_dir.glob("*before-restart*"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    result["steps_logged"] = steps
    result["loss_first_last"] = [rows[0]["loss"], rows[-1]["loss"]] if rows else None
    result["tensorboard_files"] = len(list(run_dir.rglob("events.out.tfevents*")))
    result["ok"] = steps == list(range(1, 9)) and result["resumed"] and all(np.isfinite(r["loss"]) for r in rows)
    if not result["ok"]:
        result["error"] = f"expected steps 1..8, resumed at 4, finite losses; got steps {steps}, resumed {result['resumed']}"
    log(f"smoke: steps {steps}, resumed {result['resumed']}, losses {result['loss_first_last']}")
    return result


@contextlib.contextmanager
def causal_dot_product_attention(implementation: str):
    """``jaxlm.model.attend`` -> ``jax.nn.dot_product_attention(q, k, v, is_causal=True)``, mask unused.

    Right only for unpacked, unpadded rows (the benchmark's batches; the first-step loss shows it).
    """
    import jax

    from jaxlm import model as model_lib

    original = model_lib.attend

    def attend(q, k, v, mask, *args, **kwargs):
        del mask, args, kwargs  # causal over full rows: the only mask these batches give
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)

    model_lib.attend = attend
    try:
        yield
    finally:
        model_lib.attend = original


def lowered_attention_calls(config, batch: int, seq: int) -> list[str]:
    """The cuDNN / attention custom-call targets in the lowered forward of ``config`` (e.g. ``__cudnn$fmhaSoftmax``)."""
    import re

    import jax
    import jax.numpy as jnp

    from jaxlm import model as model_lib

    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    text = jax.jit(lambda p, t: model_lib.forward(config, p, t).logits).lower(model_lib.param_shapes(config), tokens).as_text()
    targets = set(re.findall(r"custom_call\s*@([\w$.\-]+)", text)) | set(re.findall(r'call_target_name\s*=\s*"([^"]+)"', text))
    return sorted(t for t in targets if "cudnn" in t.lower() or "fmha" in t.lower() or "attention" in t.lower())


def child_train(spec: dict) -> dict:
    import jax
    import numpy as np

    from jaxlm.config import model_preset
    from jaxlm.optim import OptimizerConfig
    from jaxlm.sharding import make_mesh
    from jaxlm.train import Trainer

    preset, batch, seq = spec["preset"], spec["batch"], spec["seq_len"]
    base = model_preset(preset)
    changes = dict(dtype=spec["dtype"], remat=spec["remat"], max_seq_len=max(seq, base.max_seq_len))
    cudnn = "xla" if jax.default_backend() == "cpu" else "cudnn"  # no cuDNN on a CPU (dry run)
    stack = contextlib.ExitStack()
    attention = spec["attention"]
    if attention == "cudnn":
        changes["attention"] = cudnn
        how = f"ModelConfig.attention={cudnn!r}: jax.nn.dot_product_attention(mask=[B,1,T,S], implementation={cudnn!r})"
    elif attention == "cudnn_causal":
        stack.enter_context(causal_dot_product_attention(cudnn))
        how = f"bench-only: jax.nn.dot_product_attention(is_causal=True, implementation={cudnn!r}), mask unused"
    else:
        how = "ModelConfig.attention default: jaxlm.model.attend (einsum, fp32 logits and softmax)"
    config = model_preset(preset, **changes)
    result: dict = {"params": config.num_params(), "flops_per_token": config.flops_per_token(seq), "dtype": config.dtype,
                    "attention_impl": how}
    with stack:
        try:
            calls = lowered_attention_calls(config, batch, seq)
            result["attention_custom_calls"] = calls
            result["cudnn_fmha_in_program"] = any("fmha" in c.lower() for c in calls)
        except Exception as err:  # noqa: BLE001 (cuDNN refuses shapes/dtypes/versions with various errors)
            result["cudnn_fmha_in_program"] = False
            result["error"] = f"lowering the forward failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
            return result
        log(f"train {preset} {spec['attention']}: {config.num_params() / 1e6:.0f}M params, {batch}x{seq}, "
            f"remat {config.remat}, fmha in program: {result['cudnn_fmha_in_program']}")
        trainer = Trainer(config, OptimizerConfig(lr=1e-4, warmup_steps=0, schedule="constant"), total_steps=1_000_000,
                          mesh=make_mesh())
        start = time.perf_counter()
        state = trainer.init_state(spec["seed"])
        jax.block_until_ready(state)
        result["init_s"] = round(time.perf_counter() - start, 2)
        tokens = np.random.default_rng(spec["seed"]).integers(0, config.vocab_size, (batch, seq)).astype(np.int32)
        host = {"tokens": tokens}
        device_batch = jax.device_put(host, trainer.batch_shardings(host))
        step = trainer.jit_step(device_batch)

        start = time.perf_counter()
        state, metrics = step(state, device_batch)
        result["first_loss"] = float(metrics["loss"])
        result["first_grad_norm"] = float(metrics["grad_norm"])
        result["compile_s"] = round(time.perf_counter() - start, 2)
        log(f"train {preset} {spec['attention']}: first step (compile) {result['compile_s']} s, loss {result['first_loss']:.4f}")
        for _ in range(spec["warmup"]):
            state, metrics = step(state, device_batch)
        jax.block_until_ready(metrics)

        times = []
        for i in range(spec["steps"]):
            if i >= 3 and time.time() > spec["deadline"] - 5:
                result["note"] = f"stopped after {i} timed steps (time budget)"
                break
            start = time.perf_counter()
            state, metrics = step(state, device_batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        n_pipe = min(len(times), 10)
        start = time.perf_counter()
        for _ in range(n_pipe):
            state, metrics = step(state, device_batch)
        jax.block_until_ready((state, metrics))
        pipelined = (time.perf_counter() - start) / n_pipe
    tokens_per_step = batch * seq
    median = statistics.median(times)
    result.update(
        steps_timed=len(times),
        step_s_median=median,
        step_s_min=min(times),
        step_s_max=max(times),
        step_s_pipelined=pipelined,
        tokens_per_s=tokens_per_step / median,
        tokens_per_s_pipelined=tokens_per_step / pipelined,
        last_loss=float(metrics["loss"]),
        finite=bool(np.isfinite(float(metrics["loss"]))),
        memory=memory(),
    )
    log(f"train {preset} {spec['attention']}: {median * 1e3:.1f} ms/step, {result['tokens_per_s']:,.0f} tokens/s, "
        f"peak {fmt_gib(result['memory']['peak_bytes'])} GiB")
    return result


def child_decode(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(TOOLS))
    from bench_generate import make_intervention, make_prompts  # noqa: E402 (tools/ helpers)

    from jaxlm import decode
    from jaxlm import model as model_lib
    from jaxlm.config import model_preset

    preset, b, p, n = spec["preset"], spec["batch"], spec["prompt_len"], spec["new_tokens"]
    base = model_preset(preset)
    config = model_preset(preset, dtype=spec["dtype"], max_seq_len=max(base.max_seq_len, p + n))
    params = jax.jit(lambda key: model_lib.init_params(config, key))(jax.random.key(spec["seed"]))
    tokens, mask = make_prompts(b, p, config.vocab_size, spec["seed"])
    iti = make_intervention(config, params, spec["heads"], spec["alpha"], spec["seed"])
    settings = decode.SamplingSettings(max_new_tokens=n)
    key = jax.random.key(0)
    tokens_j, mask_j = jnp.asarray(tokens), jnp.asarray(mask)
    split: dict[str, list[float]] = {"prefill": [], "decode": []}

    def plain():
        start = time.perf_counter()
        state = decode.prefill(params, tokens_j, mask_j, None, key, config=config, settings=settings)
        jax.block_until_ready(state)
        middle = time.perf_counter()
        out = decode.decode(params, state, None, config=config, settings=settings).tokens.block_until_ready()
        split["prefill"].append(middle - start)
        split["decode"].append(time.perf_counter() - middle)
        return out

    def generate(intervention):
        return decode.generate(config, params, tokens, prompt_mask=mask, max_new_tokens=n, intervention=intervention).tokens

    variants = {
        "plain (no edit sites)": plain,
        "baseline (zero ITI)": lambda: generate(None).block_until_ready(),
        f"ITI add head_out, {iti.k} heads, alpha {spec['alpha']:g}": lambda: generate(iti).block_until_ready(),
    }
    first, outputs = {}, {}
    for name, fn in variants.items():
        start = time.perf_counter()
        outputs[name] = np.asarray(fn())
        first[name] = time.perf_counter() - start
        log(f"decode {preset} {name}: first call {first[name]:.1f} s")
    split = {"prefill": [], "decode": []}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(spec["repeats"]):
        if r >= 1 and time.time() > spec["deadline"] - 5:
            break
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    generated = b * n
    names = list(variants)
    rows = {}
    for name in names:
        median = statistics.median(times[name])
        rows[name] = {"s_per_call": median, "tokens_per_s": generated / median, "first_call_s": first[name],
                      "repeats": len(times[name])}
    base_out, iti_out = outputs[names[1]], outputs[names[2]]
    result = {
        "params": config.num_params(),
        "variants": rows,
        "plain_prefill_s": statistics.median(split["prefill"]),
        "plain_decode_s": statistics.median(split["decode"]),
        "decode_only_tokens_per_s": b * (n - 1) / statistics.median(split["decode"]),
        "plain_equals_baseline": bool((outputs[names[0]] == base_out).all()),
        "iti_changed_tokens": float((base_out != iti_out).mean()),
        "memory": memory(),
    }
    log(f"decode {preset}: " + "; ".join(f"{k}: {v['tokens_per_s']:,.0f} tok/s" for k, v in rows.items()))
    return result


CHILDREN = {"env": child_env, "smoke": child_smoke, "train": child_train, "decode": child_decode}


def run_child(kind: str, spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    status, payload = "ok", {}
    try:
        payload = CHILDREN[kind](spec)
        if payload.get("error") or payload.get("ok") is False:
            status = "failed"
    except Exception as err:  # noqa: BLE001 (reported, with the kind of failure)
        import traceback

        text = f"{type(err).__name__}: {err}"
        oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
        status = "oom" if oom else "failed"
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        payload = {"error": f"{type(err).__name__}: {first[:400]}"}
        traceback.print_exc()
    Path(result_path).write_text(json.dumps({"status": status, "result": payload}, default=str))
    return 0 if status == "ok" else 3


# ---------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------


def fmt_gib(value) -> str:
    return "n/a" if value is None else f"{value / GIB:.1f}"


def parse_preset_map(items: list[str], what: str, parse_value) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"{what} {item!r}: expected PRESET=VALUE")
        preset, value = item.split("=", 1)
        out[preset] = parse_value(value, f"{what} {item!r}")
    return out


def parse_shape(text: str, where: str) -> tuple[int, int]:
    try:
        b, t = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"{where}: expected BATCHxSEQ_LEN, e.g. 8x2048") from None
    if b <= 0 or t <= 1:
        raise UsageError(f"{where}: batch must be >= 1 and seq_len >= 2")
    return b, t


def parse_remat(text: str, where: str) -> str:
    if text not in REMATS:
        raise UsageError(f"{where}: remat must be one of {', '.join(REMATS)}")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="bench_gpu.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU rehearsal: tiny preset, small shapes (also DEVICE_CHECK_DRY_RUN=1)")
    p.add_argument("--presets", help="comma-separated model presets (default gpu-150m,olmo-1b; dry run: tiny)")
    p.add_argument("--train-shape", action="append", default=[], metavar="PRESET=BxT",
                   help="training batch x seq_len per preset (defaults: gpu-150m=32x1024, olmo-1b=8x2048, tiny=4x64)")
    p.add_argument("--remat", action="append", default=[], metavar="PRESET=POLICY", help="remat per preset: none|block|minimal (default none)")
    p.add_argument("--attention", default="softmax,cudnn,cudnn_causal",
                   help="train variants, comma-separated: softmax (the default attention), cudnn, cudnn_causal")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"), help="compute dtype")
    p.add_argument("--steps", type=int, help="timed training steps (default 20; dry run 3)")
    p.add_argument("--warmup", type=int, help="untimed steps after the first (default 3; dry run 1)")
    p.add_argument("--decode-batch", type=int, help="decode batch (default 32; dry run 4)")
    p.add_argument("--prompt-len", type=int, help="prompt length (default 128; dry run 16)")
    p.add_argument("--new-tokens", type=int, help="new tokens per row (default 128; dry run 16)")
    p.add_argument("--decode-repeats", type=int, help="interleaved decode repeats (default 3; dry run 2)")
    p.add_argument("--heads", type=int, help="K: heads of the ITI intervention (default 16; dry run 4)")
    p.add_argument("--alpha", type=float, default=8.0, help="ITI strength")
    p.add_argument("--matmul-size", type=int, help="square matmul of the measured peak (default 8192; dry run 1024)")
    p.add_argument("--skip", default="", help="comma-separated jobs to skip: env,smoke,train,decode")
    p.add_argument("--budget-s", type=float, help="wall-clock budget of all jobs (default 390; dry run 300)")
    p.add_argument("--out", help="results folder (default $OUT, else ./bench_gpu_out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--validate", action="store_true", help="check the arguments and exit (0, or 2 with one line)")
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p


def resolve(args) -> dict:
    dry = args.dry_run or os.environ.get("DEVICE_CHECK_DRY_RUN", "") not in ("", "0")
    d = (lambda gpu, cpu: cpu if dry else gpu)

    def pick(value, gpu, cpu, name, least=1):
        value = d(gpu, cpu) if value is None else value
        if value < least:
            raise UsageError(f"--{name}: expected an integer >= {least}, got {value}")
        return value

    from jaxlm.config import MODEL_PRESETS  # light: no jax import

    presets = [s.strip() for s in (args.presets or d("gpu-150m,olmo-1b", "tiny")).split(",") if s.strip()]
    if not presets:
        raise UsageError("--presets: expected at least one preset")
    for preset in presets:
        if preset not in MODEL_PRESETS:
            raise UsageError(f"--presets: unknown preset {preset!r}; valid presets: {', '.join(MODEL_PRESETS)}")
    attentions = [s.strip() for s in args.attention.split(",") if s.strip()]
    bad = [a for a in attentions if a not in ATTENTIONS]
    if bad or not attentions:
        raise UsageError(f"--attention: expected a comma-separated subset of {', '.join(ATTENTIONS)}, got {args.attention!r}")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(CHILDREN):
        raise UsageError(f"--skip: unknown job(s) {', '.join(sorted(skip - set(CHILDREN)))}; valid: {', '.join(CHILDREN)}")
    shapes = parse_preset_map(args.train_shape, "--train-shape", parse_shape)
    remats = parse_preset_map(args.remat, "--remat", parse_remat)
    for what, mapping in (("--train-shape", shapes), ("--remat", remats)):
        unknown = set(mapping) - set(presets)
        if unknown:
            raise UsageError(f"{what}: preset(s) {', '.join(sorted(unknown))} not among --presets {','.join(presets)}")
    cfg = {
        "dry_run": dry,
        "presets": presets,
        "attentions": attentions,
        "skip": sorted(skip),
        "dtype": args.dtype,
        "steps": pick(args.steps, 20, 3, "steps"),
        "warmup": pick(args.warmup, 3, 1, "warmup", least=0),
        "decode_batch": pick(args.decode_batch, 32, 4, "decode-batch"),
        "prompt_len": pick(args.prompt_len, 128, 16, "prompt-len"),
        "new_tokens": pick(args.new_tokens, 128, 16, "new-tokens", least=2),
        "decode_repeats": pick(args.decode_repeats, 3, 2, "decode-repeats"),
        "heads": pick(args.heads, 16, 4, "heads"),
        "alpha": args.alpha,
        "matmul_size": pick(args.matmul_size, 8192, 1024, "matmul-size", least=16),
        "budget_s": d(390.0, 300.0) if args.budget_s is None else args.budget_s,
        "seed": args.seed,
    }
    if cfg["budget_s"] <= 0:
        raise UsageError(f"--budget-s: expected a positive number, got {cfg['budget_s']}")
    cfg["train_shapes"] = {}
    for preset in presets:
        config = MODEL_PRESETS[preset]
        cfg["train_shapes"][preset] = shapes.get(preset) or TRAIN_SHAPES.get(preset) or (8, config.max_seq_len)
        heads = config.n_layers * config.n_heads
        if cfg["heads"] > heads:
            raise UsageError(f"--heads: {cfg['heads']} exceeds the {heads} heads of {preset}")
    cfg["remats"] = {preset: remats.get(preset, "none") for preset in presets}
    out = args.out or os.environ.get("OUT") or str(Path.cwd() / "bench_gpu_out")
    cfg["out"] = out
    return cfg


def plan_jobs(cfg: dict) -> list[dict]:
    jobs = []

    def add(kind, name, **spec):
        if kind not in cfg["skip"]:
            least, most = JOB_SECONDS[kind]
            if spec.get("preset") in BIG_PRESETS:
                least, most = int(least * 1.4), int(most * 1.4)
            optional = spec.get("attention") == "cudnn_causal"
            jobs.append({"kind": kind, "name": name, "least_s": least, "most_s": most, "optional": optional, "spec": spec})

    add("env", "env", matmul_size=cfg["matmul_size"])
    add("smoke", "smoke: jaxlm train tiny + resume")

    def train(preset, attention):
        batch, seq = cfg["train_shapes"][preset]
        add("train", f"train {preset} {attention}", preset=preset, batch=batch, seq_len=seq, remat=cfg["remats"][preset],
            attention=attention, dtype=cfg["dtype"], steps=cfg["steps"], warmup=cfg["warmup"], seed=cfg["seed"])

    # Priority (a short budget drops the last ones): the model's own options, decode, then the
    # bench-only causal variant.
    for preset in cfg["presets"]:
        for attention in cfg["attentions"]:
            if attention != "cudnn_causal":
                train(preset, attention)
    for preset in cfg["presets"]:
        add("decode", f"decode {preset}", preset=preset, batch=cfg["decode_batch"], prompt_len=cfg["prompt_len"],
            new_tokens=cfg["new_tokens"], repeats=cfg["decode_repeats"], heads=cfg["heads"], alpha=cfg["alpha"],
            dtype=cfg["dtype"], seed=cfg["seed"])
    if "cudnn_causal" in cfg["attentions"]:
        for preset in cfg["presets"]:
            train(preset, "cudnn_causal")
    return jobs


_RUNNING: list[subprocess.Popen] = []  # the child now running (killed with its process group on SIGTERM)


class Interrupted(Exception):
    pass


def _on_signal(signum, frame) -> None:
    for proc in _RUNNING:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    raise Interrupted(signal.Signals(signum).name)


def launch(job: dict, timeout: float, cfg: dict, workdir: Path) -> dict:
    spec = dict(job["spec"], deadline=time.time() + timeout)
    index = len(list(workdir.iterdir()))
    spec_path, result_path = workdir / f"{index}-spec.json", workdir / f"{index}-result.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if cfg["dry_run"]:
        env["JAX_PLATFORMS"] = "cpu"
    else:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")  # olmo-1b without remat needs more than the default 75%
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", job["kind"], "--spec", str(spec_path), "--result", str(result_path)]
    start = time.perf_counter()
    # Its own process group (not a new session: the device machine ends a command's leftover
    # processes only within its session), so a timeout kills the child's own children too.
    proc = subprocess.Popen(argv, env=env, process_group=0)
    _RUNNING.append(proc)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = None
    finally:
        _RUNNING.remove(proc)
    seconds = time.perf_counter() - start
    record = {"name": job["name"], "kind": job["kind"], "spec": job["spec"], "seconds": round(seconds, 1)}
    if rc is None:
        record.update(status="timeout", result={"error": f"killed after {timeout:.0f} s (time budget)"})
    elif result_path.exists():
        record.update(json.loads(result_path.read_text()))
    else:
        record.update(status="failed", result={"error": f"child exited {rc} without a result (crash?)"})
    return record


def run_jobs(cfg: dict) -> list[dict]:
    deadline = time.time() + cfg["budget_s"]
    jobs = plan_jobs(cfg)
    records = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        workdir = Path(tmp)
        i = 0
        while i < len(jobs):
            job = jobs[i]
            reserve = sum(j["least_s"] for j in jobs[i + 1 :] if not j["optional"])
            # Jobs run in priority order: each gets up to its most, less what later jobs' least need,
            # but never below its own least while the budget lasts (later jobs are then the ones skipped).
            left = deadline - time.time()
            timeout = min(job["most_s"] * (3 if cfg["dry_run"] else 1), left - reserve)
            if timeout < job["least_s"]:
                timeout = min(job["least_s"], left)
            if timeout < job["least_s"] * 0.75:
                log(f"skip {job['name']}: {deadline - time.time():.0f} s left of the budget")
                records.append({"name": job["name"], "kind": job["kind"], "spec": job["spec"], "status": "skipped",
                                "result": {"error": "time budget"}, "seconds": 0})
                i += 1
                continue
            log(f"start {job['name']} (limit {timeout:.0f} s, {deadline - time.time():.0f} s of budget left)")
            try:
                record = launch(job, timeout, cfg, workdir)
            except Interrupted as err:
                log(f"{err}: stopped during {job['name']}; writing what was measured")
                records.append({"name": job["name"], "kind": job["kind"], "spec": job["spec"], "status": "interrupted",
                                "result": {"error": f"{err} received"}, "seconds": 0})
                break
            log(f"done {job['name']}: {record['status']} in {record['seconds']} s"
                + (f" ({record['result'].get('error')})" if record["status"] != "ok" else ""))
            records.append(record)
            if record["status"] == "oom" and job["kind"] == "train":
                retry = next_smaller(job)
                if retry is not None:
                    log(f"out of memory: retrying as {retry['name']}")
                    jobs.insert(i + 1, retry)
            i += 1
    return records


def next_smaller(job: dict) -> dict | None:
    spec = dict(job["spec"])
    if spec["remat"] == "none":
        spec["remat"] = "block"
    elif spec["batch"] > 1:
        spec["batch"] //= 2
    else:
        return None
    name = f"train {spec['preset']} {spec['attention']} (retry: remat {spec['remat']}, batch {spec['batch']})"
    return dict(job, name=name, spec=spec)


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def report(cfg: dict, records: list[dict], wall: float) -> list[str]:
    env_record = next((r for r in records if r["kind"] == "env"), None)
    env = env_record["result"] if env_record else {}
    spec_peak = env.get("peak_flops_spec")
    measured = env.get("peak_flops_measured")
    lines = ["# GPU check (tools/bench_gpu.py)", ""]
    mode = "DRY RUN on CPU (tiny preset, small shapes): no GPU numbers" if cfg["dry_run"] else "device run"
    lines += [f"- mode: {mode}", f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; total {wall:.0f} s of a {cfg['budget_s']:.0f} s budget"]

    def e(value, fmt=".1e"):
        return "n/a" if value is None else format(value, fmt)

    if env_record and env_record["status"] != "ok":
        lines.append(f"- env job: **{env_record['status']}**: {env.get('error', '')}")
    if "versions" in env:
        v = env["versions"]
        ver = ", ".join(f"{k} {v[k]['found']}" + (f" (pin {v[k]['pinned']})" if v[k]["pinned"] and v[k]["pinned"] != v[k]["found"] else "")
                        for k in v if v[k]["found"])
        missing = [k for k in v if not v[k]["found"]]
        lines += [
            f"- python {env['python']} ({env['executable']}); packages: {ver}",
            f"- not installed: {', '.join(missing) or 'none'}",
            f"- imports: {sum(s == 'ok' for s in env['imports'].values())}/{len(env['imports'])} ok"
            + "".join(f"; **{m}**: {err}" for m, err in env["imports"].items() if err != "ok"),
        ]
    if "backend" in env:
        tiny = env.get("tiny_forward", {})
        lines += [
            f"- backend {env['backend']}; devices {', '.join(env['devices'])}; device memory limit "
            f"{fmt_gib(env.get('memory', {}).get('bytes_limit'))} GiB",
            f"- tiny forward: {tiny['error']}" if "error" in tiny else
            f"- tiny fp32 forward vs the CPU backend: rel. error {e(tiny.get('rel_err_vs_cpu'))}"
            f"{' (' + tiny['cpu_error'] + ')' if tiny.get('cpu_error') else ''}, finite {tiny.get('finite')}; "
            f"bf16 vs fp32 {e(tiny.get('bf16_rel_err_vs_fp32'))}",
            f"- peak for MFU vs spec: {spec_peak / 1e12:.0f} TFLOP/s (dense bf16 datasheet, jaxlm.perf table)" if spec_peak else
            "- peak for MFU vs spec: none for this device (CPU); MFU vs measured only",
            f"- measured matmul: {e(measured and measured / 1e12, '.3f')} TFLOP/s ({env.get('peak_flops_measured_how')})",
        ]
    smoke = next((r for r in records if r["kind"] == "smoke"), None)
    if smoke:
        s = smoke["result"]
        lines.append(f"- smoke (`jaxlm train` tiny, stop at 4, resume to 8; grain + ArrayRecord + orbax + tensorboardX): "
                     f"**{smoke['status']}**" + (f", steps {s.get('steps_logged')}, resumed {s.get('resumed')}, "
                     f"{s.get('first_s')} s + {s.get('resume_s')} s" if "steps_logged" in s else f": {s.get('error')}"))
    lines += ["", "## Training step (bf16 compute, fp32 params, AdamW, donated state)", ""]
    lines += ["| preset | attention | batch x seq | remat | ms/step (median) | tokens/s | MFU vs spec | MFU vs measured "
              "| peak mem (GiB) | compile (s) | first loss / grad norm | fmha | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r["kind"] != "train":
            continue
        s, res = r["spec"], r["result"]
        shape = f"{s['batch']} x {s['seq_len']}"
        if r["status"] != "ok":
            lines.append(f"| {s['preset']} | {s['attention']} | {shape} | {s['remat']} | | | | | | | | "
                         f"{res.get('cudnn_fmha_in_program', '')} | {r['status']}: {res.get('error', '')} |")
            continue
        achieved = res["flops_per_token"] * res["tokens_per_s"]
        mfu_spec = f"{100 * achieved / spec_peak:.1f}%" if spec_peak else "n/a"
        mfu_meas = f"{100 * achieved / measured:.1f}%" if measured else "n/a"
        lines.append(
            f"| {s['preset']} | {s['attention']} | {shape} | {s['remat']} | {res['step_s_median'] * 1e3:.1f} "
            f"({res['step_s_min'] * 1e3:.1f}-{res['step_s_max'] * 1e3:.1f}) | {res['tokens_per_s']:,.0f} | {mfu_spec} | {mfu_meas} "
            f"| {fmt_gib(res['memory']['peak_bytes'])} | {res['compile_s']:.1f} | {res['first_loss']:.4f} / {res['first_grad_norm']:.3f} "
            f"| {res['cudnn_fmha_in_program']} | ok{' (' + res['note'] + ')' if res.get('note') else ''} |")
    # Every attention variant computes the same function here: compare its first step with softmax's.
    firsts: dict = {}
    for r in records:
        if r["kind"] == "train" and r["status"] == "ok":
            s = r["spec"]
            firsts.setdefault((s["preset"], s["batch"], s["seq_len"], s["remat"]), {})[s["attention"]] = r["result"]
    for (preset, b, t, remat), by in firsts.items():
        ref = by.get("softmax")
        for attention, res in by.items():
            if ref is None or attention == "softmax":
                continue
            dl = abs(ref["first_loss"] - res["first_loss"])
            dg = abs(ref["first_grad_norm"] - res["first_grad_norm"]) / max(ref["first_grad_norm"], 1e-30)
            lines.append(f"\n{preset} {b}x{t} remat {remat}, {attention} vs softmax: first-step |loss diff| {dl:.1e}, "
                         f"grad-norm rel. diff {dg:.1e}; tokens/s {res['tokens_per_s'] / ref['tokens_per_s']:.2f}x")
    lines += ["", "Attention variants:"]
    for a in cfg["attentions"]:
        rows = [r for r in records if r["kind"] == "train" and r["spec"]["attention"] == a]
        how = next((r["result"]["attention_impl"] for r in rows if r["result"].get("attention_impl")), a)
        calls = sorted({c for r in rows for c in r["result"].get("attention_custom_calls", [])})
        lines.append(f"- {a}: {how}" + (f"; custom calls: {', '.join(calls)}" if calls else ""))
    lines += ["", "MFU: `ModelConfig.flops_per_token(seq_len)` (6N + 12·L·H·D·T, full attention) x tokens/s over the peak; "
              "tokens/s from the median of steps each timed to `block_until_ready`. `fmha`: a cuDNN fused-attention "
              "custom call (`__cudnn$fmha...`) in the lowered forward."]
    lines += ["", f"## Decode (greedy, random params, batch {cfg['decode_batch']}, prompts <= {cfg['prompt_len']} left-padded, "
              f"{cfg['new_tokens']} new tokens, no stop token)", "",
              "| preset | variant | s per call | tokens/s | vs plain | first call (s) | peak mem (GiB) |", "|---|---|---|---|---|---|---|"]
    for r in records:
        if r["kind"] != "decode":
            continue
        if r["status"] != "ok":
            lines.append(f"| {r['spec']['preset']} | {r['status']}: {r['result'].get('error', '')} | | | | | |")
            continue
        res = r["result"]
        plain = next(iter(res["variants"].values()))["s_per_call"]
        for name, v in res["variants"].items():
            lines.append(f"| {r['spec']['preset']} | {name} | {v['s_per_call']:.3f} | {v['tokens_per_s']:,.0f} | "
                         f"{v['s_per_call'] / plain:.3f}x time | {v['first_call_s']:.1f} | {fmt_gib(res['memory']['peak_bytes'])} |")
        lines.append(f"| {r['spec']['preset']} | plain, split | prefill {res['plain_prefill_s']:.3f} + decode "
                     f"{res['plain_decode_s']:.3f} | {res['decode_only_tokens_per_s']:,.0f} (decode loop only) | | | |")
        lines.append(f"| {r['spec']['preset']} | checks | plain == baseline tokens: {res['plain_equals_baseline']}; "
                     f"ITI changed {100 * res['iti_changed_tokens']:.0f}% of tokens | | | | |")
    others = [r for r in records if r["status"] in ("skipped", "timeout", "failed") and r["kind"] == "smoke"]
    for r in others:
        lines.append(f"\n- {r['name']}: {r['status']}: {r['result'].get('error', '')}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.child:
        if not (args.spec and args.result):
            parser.error("--child needs --spec and --result")
        return run_child(args.child, args.spec, args.result)
    sys.path.insert(0, str(REPO))
    try:
        cfg = resolve(args)
    except UsageError as err:
        print(f"bench_gpu.py: error: {err}", file=sys.stderr)
        return 2
    if args.validate:
        return 0
    out = Path(cfg["out"])
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"bench_gpu.py: error: --out {out}: cannot create ({err.strerror or err})", file=sys.stderr)
        return 2
    log(f"{'DRY RUN (CPU) ' if cfg['dry_run'] else ''}presets {cfg['presets']}, attention {cfg['attentions']}, "
        f"budget {cfg['budget_s']:.0f} s, out {out}")
    start = time.time()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    records = run_jobs(cfg)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the report is written whatever comes now
    wall = time.time() - start
    lines = report(cfg, records, wall)
    (out / "device_check.json").write_text(json.dumps({"config": cfg, "jobs": records, "wall_s": wall}, indent=1, default=str))
    (out / "device_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    failed = [r["name"] for r in records if r["status"] != "ok"]
    log(f"wrote {out / 'device_check.json'} and {out / 'device_check.md'}; {len(records) - len(failed)}/{len(records)} jobs ok"
        + (f"; not ok: {', '.join(failed)}" if failed else ""))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
