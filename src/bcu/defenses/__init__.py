"""Defenses behind one registry; bcu itself is one of them (``bcu``, ablations ``kd`` and ``re``)."""
from . import bcu  # noqa: F401  (registers bcu, kd, re)
from . import anp, clp, fp, ft, ibau, mcr, nad  # noqa: F401  (registers the baselines)
from .base import DEFENSES, Defense, DefenseResult, create_defense, run_defense
from .bcu import CleanseConfig, Cleanser, cleanse, preset
from .reinit import ReinitConfig, plan, reinitialize

__all__ = ["DEFENSES", "Defense", "DefenseResult", "create_defense", "run_defense", "CleanseConfig", "Cleanser",
           "cleanse", "preset", "ReinitConfig", "plan", "reinitialize"]
