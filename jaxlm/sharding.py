"""Logical-axis sharding: one rules table maps the model's axis names to mesh axes.

Parameters and activations carry logical names (see ``jaxlm.model``); ``RULES`` maps
each name to mesh axes ``data, fsdp, tensor``. Flax resolves a name to the first rule
whose mesh axes are still free for that array, so ``embed`` is sharded over ``fsdp`` on
parameters (FSDP) while activations, whose batch already uses ``fsdp``, keep it whole.

Training and inference place parameters the same way (``param_shardings``): a model loaded
onto a mesh (``jaxlm.checkpoint.load_model(path, mesh=...)``, or ``place_params``) carries
its mesh in its arrays' ``NamedSharding``s, and inference (``jaxlm.decode.generate``,
``jaxlm.probe.collect_activations``) runs where the parameters are (``inference_mesh``): the
batch over ``data`` x ``fsdp`` (``shard_batch``), padded to a multiple of ``batch_shards``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm import model as model_lib
from jaxlm.config import ConfigError, MeshConfig, ModelConfig

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


def describe(mesh: Mesh) -> str:
    """``data=2, fsdp=2, tensor=2``."""
    return ", ".join(f"{name}={size}" for name, size in mesh.shape.items())


def fit_problems(shapes: Any, logical_specs: Any, shardings: Any) -> list[str]:
    """Each array axis of ``shapes`` that its ``NamedSharding`` in ``shardings`` splits unevenly
    (``logical_specs``: the same tree of logical ``PartitionSpec``s, to name the axis)."""
    problems = []
    specs = jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    leaves = zip(jax.tree_util.tree_leaves_with_path(shapes), specs, jax.tree.leaves(shardings))
    for (path, shape), logical, sharding in leaves:
        for size, name, axes in zip(shape.shape, logical, sharding.spec):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            if size % math.prod(sharding.mesh.shape[a] for a in axes):
                over = " x ".join(f"{a}={sharding.mesh.shape[a]}" for a in axes)
                where = jax.tree_util.keystr(path, simple=True, separator=".")
                problems.append(f"{where} axis {name!r} ({size}) over {over}")
    return problems


def param_shardings(config: ModelConfig, mesh: Mesh, rules: LogicalRules = RULES) -> Any:
    """The parameters' ``NamedSharding``s on ``mesh`` (training and inference alike); a
    ``ConfigError`` when a mesh axis does not divide a model dimension sharded over it."""
    logical = model_lib.param_logical_axes(config)
    shardings = logical_to_sharding(logical, mesh, rules)
    problems = fit_problems(model_lib.param_shapes(config), logical, shardings)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ConfigError(
            f"mesh {describe(mesh)} does not divide the model: {'; '.join(problems[:3])}{more}; "
            "each mesh axis must divide the dimensions sharded over it (jaxlm.sharding.RULES: "
            "tensor -> n_heads, kv heads, mlp_hidden, vocab_size; fsdp -> d_model)"
        )
    return shardings


def place_params(config: ModelConfig, params: Any, mesh: Mesh, rules: LogicalRules = RULES) -> Any:
    """``params`` on ``mesh`` with ``param_shardings``; leaves the model does not declare
    (biases baked by ``jaxlm.intervene.bake_into_params``) are replicated."""
    declared = dict(jax.tree_util.tree_leaves_with_path(param_shardings(config, mesh, rules)))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.device_put(x, declared.get(path, replicated(mesh))), params
    )


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh the arrays of ``tree`` are placed on (``NamedSharding``), or None when none is."""
    shardings = [getattr(leaf, "sharding", None) for leaf in jax.tree.leaves(tree)]
    meshes = {s.mesh for s in shardings if isinstance(s, NamedSharding)}
    if len(meshes) > 1:
        raise ConfigError(f"arrays on {len(meshes)} different meshes ({'; '.join(map(describe, meshes))}); "
                          "place them on one")
    return meshes.pop() if meshes else None


def inference_mesh(params: Any) -> Mesh | None:
    """The mesh inference on ``params`` runs on (``mesh_of``; None: where they are, unsharded).

    Sharded inference runs in one process: its results are read back as host arrays."""
    mesh = mesh_of(params)
    if mesh is not None and mesh.is_multi_process:
        raise ConfigError(
            f"parameters on a mesh spanning {jax.process_count()} processes: sharded inference runs in one "
            "process (load the model with a mesh of this process's devices, jax.local_devices())"
        )
    return mesh


def batch_shards(mesh: Mesh | None) -> int:
    """How many ways a batch is split on ``mesh`` (``data`` x ``fsdp``; 1 without a mesh)."""
    return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: LogicalRules = RULES, ndim: int = 2) -> NamedSharding:
    """Sharding of a ``[batch, length, ...]`` input array: batch over the data axes."""
    axes = ("activation_batch",) + (None,) * (ndim - 1)
    return logical_to_sharding(PartitionSpec(*axes), mesh, rules)


def shard(tree: Any, shardings: Any) -> Any:
    """Place every array of ``tree`` with the matching sharding of ``shardings``."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def shard_batch(arrays: Any, mesh: Mesh | None, rules: LogicalRules = RULES) -> Any:
    """Every ``[batch, ...]`` array of ``arrays`` with its batch over the data axes of ``mesh``
    (None: unchanged). The batch must be a multiple of ``batch_shards(mesh)``."""
    if mesh is None:
        return arrays
    return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, rules, ndim=np.ndim(x))), arrays)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: LogicalRules = RULES):
    """Trace under ``mesh`` with ``rules`` so the model's logical activation (and KV cache)
    constraints apply; ``mesh=None``: no constraints (one device)."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        yield
