"""Backdoor attacks behind one registry: ``create_attack(name, options, image_shape, num_classes)``."""
from . import badnets, blended, inputaware, lc, sig, wanet  # noqa: F401  (registers the attacks)
from .base import ATTACKS, Attack, AttackConfig, create_attack, load_attack, quantize

__all__ = ["ATTACKS", "Attack", "AttackConfig", "create_attack", "load_attack", "quantize"]
