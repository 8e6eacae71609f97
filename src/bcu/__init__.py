"""bcu: label-free backdoor cleansing of image classifiers (Pang et al., CVPR 2023).

The pipeline, one module per concept: ``data`` -> ``models`` -> ``attacks`` -> ``defenses`` (bcu is
one of them) -> ``metrics`` -> ``report``; ``cli`` is a thin layer on top.

>>> import bcu
>>> cleansed = bcu.cleanse(model, unlabeled_images)            # doctest: +SKIP
>>> cleansed = bcu.cleanse(model, images, "paper")              # the authors' exact settings  # doctest: +SKIP
"""
__version__ = "0.1.0"

from .attacks import ATTACKS, create_attack, load_attack  # noqa: E402
from .checkpoint import load_model, save_model  # noqa: E402
from .data import ImageSet, load_dataset  # noqa: E402
from .defenses import DEFENSES, CleanseConfig, Cleanser, cleanse, create_defense, preset  # noqa: E402
from .metrics import accuracy, attack_scores, der  # noqa: E402
from .models import MODELS, create_model  # noqa: E402

__all__ = ["ATTACKS", "DEFENSES", "MODELS", "CleanseConfig", "Cleanser", "ImageSet", "accuracy", "attack_scores",
           "cleanse", "create_attack", "create_defense", "der", "load_attack", "load_dataset", "load_model",
           "preset", "save_model", "create_model"]
