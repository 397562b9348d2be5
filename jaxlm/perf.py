"""Throughput bookkeeping: peak FLOP/s per device and model FLOPs utilisation (MFU)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Dense peak FLOP/s per chip for bf16 (fp32 on CPU is measured instead).
_PEAK_BF16 = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
}


def table_peak_flops(device: jax.Device) -> float | None:
    """Vendor peak (bf16 dense) for known accelerators, else None."""
    kind = device.device_kind
    for prefix, flops in sorted(_PEAK_BF16.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(prefix):
            return flops
    return None


def measure_matmul_flops(size: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
    """FLOP/s of a jitted square matmul on the default device (best of ``repeats``)."""
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def peak_flops_per_device(configured: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number came from)."""
    if configured:
        return configured, "config"
    device = jax.devices()[0]
    table = table_peak_flops(device)
    if table is not None:
        return table, f"vendor peak for {device.device_kind}"
    return measure_matmul_flops(), "measured fp32 matmul"


def mfu(flops_per_token: float, tokens_per_sec: float, peak_per_device: float, num_devices: int) -> float:
    return flops_per_token * tokens_per_sec / (peak_per_device * num_devices)
