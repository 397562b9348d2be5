"""The study end to end: a config-driven, resumable sweep over toxic shares, seeds and designs.

``config`` (what to run), ``plan`` (the runs and methods it implies), ``stages`` (running
them, skipping finished work), ``report`` (tables, statistics, plots).
"""

from jaxlm.sweep.config import InterventionSpec, Strength, SweepConfig, load_sweep_config
from jaxlm.sweep.plan import Build, Method, RunSpec, builds, methods_for, plan_runs
from jaxlm.sweep.stages import STAGES, Sweep, SweepInterrupted

__all__ = ["Build", "InterventionSpec", "Method", "Strength", "builds", "RunSpec", "STAGES", "Sweep", "SweepConfig", "SweepInterrupted", "load_sweep_config", "methods_for", "plan_runs"]
