"""``jaxlm info``: package versions, devices and model presets."""

from __future__ import annotations

import argparse
import json
from jaxlm.versions import package_versions


def collect_info() -> dict:
    import jax

    from jaxlm.config import MODEL_PRESETS

    return {
        "versions": package_versions(),
        "backend": jax.default_backend(),
        "process": {"index": jax.process_index(), "count": jax.process_count()},
        "devices": [f"{d.platform}:{d.id} {d.device_kind}" for d in jax.devices()],
        "presets": {
            name: {
                "params": cfg.num_params(),
                "layers": cfg.n_layers,
                "heads": cfg.n_heads,
                "d_model": cfg.d_model,
                "mlp_hidden": cfg.mlp_hidden,
                "vocab": cfg.vocab_size,
                "context": cfg.max_seq_len,
                "dtype": cfg.dtype,
            }
            for name, cfg in MODEL_PRESETS.items()
        },
    }


def run(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("versions:")
    for name, version in info["versions"].items():
        print(f"  {name:22s} {version or '-'}")
    print(f"backend: {info['backend']}  (process {info['process']['index']} of {info['process']['count']})")
    print("devices:")
    for device in info["devices"]:
        print(f"  {device}")
    print("model presets:")
    for name, p in info["presets"].items():
        print(
            f"  {name:10s} {p['params'] / 1e6:9.2f}M params  {p['layers']} layers x {p['heads']} heads, "
            f"d_model {p['d_model']}, mlp {p['mlp_hidden']}, vocab {p['vocab']}, context {p['context']}, {p['dtype']}"
        )
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("info", help="versions, devices and model presets")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(func=run)
