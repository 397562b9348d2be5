"""Logical-axis sharding: one rules table maps the model's axis names to mesh axes.

Parameters and activations carry logical names (see ``jaxlm.model``); ``RULES`` maps
each name to mesh axes ``data, fsdp, tensor``. Flax resolves a name to the first rule
whose mesh axes are still free for that array, so ``embed`` is sharded over ``fsdp`` on
parameters (FSDP) while activations, whose batch already uses ``fsdp``, keep it whole.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

LogicalRules = tuple[tuple[str, Any], ...]

# Logical axis name -> mesh axis (or tuple of axes, or None for replicated).
RULES: LogicalRules = (
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # KV cache
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("cache_heads", "tensor"),
    ("cache_kv", None),
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("position", None),
)


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all devices)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = config.resolve(len(devices))
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES)


def logical_to_sharding(logical_specs: Any, mesh: Mesh, rules: LogicalRules = RULES) -> Any:
    """Tree of logical ``PartitionSpec`` -> tree of ``NamedSharding`` on ``mesh``."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: LogicalRules = RULES, ndim: int = 2) -> NamedSharding:
    """Sharding of a ``[batch, length, ...]`` input array: batch over the data axes."""
    axes = ("activation_batch",) + (None,) * (ndim - 1)
    return logical_to_sharding(PartitionSpec(*axes), mesh, rules)


def shard(tree: Any, shardings: Any) -> Any:
    """Place every array of ``tree`` with the matching sharding of ``shardings``."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: LogicalRules = RULES):
    """Trace under ``mesh`` with ``rules`` so the model's logical activation constraints apply."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        yield
