"""Escaping-collapse rounds (Amin et al. 2025): generate -> noisy filter -> weak labels on chosen
prompts -> SFT, on a verifiable task; ``jaxlm rounds CONFIG --out DIR``."""

from jaxlm.rounds.config import RoundsConfig, load_rounds_config
from jaxlm.rounds.study import RoundsError, RoundsInterrupted, RoundsStudy

__all__ = ["RoundsConfig", "RoundsError", "RoundsInterrupted", "RoundsStudy", "load_rounds_config"]
