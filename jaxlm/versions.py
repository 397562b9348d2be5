"""The versions of the packages a run depends on, recorded next to its outputs (``jaxlm info``,
the training loop's run metadata)."""

from __future__ import annotations

from importlib import metadata

PACKAGES = (
    "jaxlm", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorflow-datasets",
    "tokenizers", "numpy", "transformers", "torch",
)


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """``{name: installed version}`` for each of ``packages``; None for one that is not installed."""
    versions: dict[str, str | None] = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
