"""jaxlm: a JAX/Flax stack for pretraining-data and intervention research.

The data flow is one-way: ``data`` -> ``train`` -> checkpoints -> ``probe`` ->
``intervene`` -> ``decode`` -> ``evaluate``. See DESIGN.md in the shared folder
and the README for the map.
"""

__version__ = "0.1.0"
