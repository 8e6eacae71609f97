"""bcu: label-free backdoor cleansing of image classifiers (Pang et al., CVPR 2023).

The pipeline, one package or module per stage: ``data`` -> ``models`` -> ``attacks`` ->
``defenses`` (bcu is one of them) -> ``metrics`` -> ``report``; ``workflows`` runs the commands and
``cli`` is the thin layer on top (docs/architecture.md).

>>> import bcu
>>> cleansed = bcu.cleanse(model, unlabeled_images)            # doctest: +SKIP
>>> cleansed = bcu.cleanse(model, images, "paper")              # the authors' exact settings  # doctest: +SKIP
"""
from .attacks import ATTACKS, create_attack, load_attack
from .checkpoint import load_model, save_model
from .data import ImageSet, load_dataset
from .defenses import DEFENSES, CleanseConfig, Cleanser, cleanse, create_defense, preset
from .metrics import accuracy, attack_scores, der
from .models import MODELS, create_model
from .version import __version__

__all__ = ["ATTACKS", "DEFENSES", "MODELS", "CleanseConfig", "Cleanser", "ImageSet", "__version__", "accuracy",
           "attack_scores", "cleanse", "create_attack", "create_defense", "der", "load_attack", "load_dataset",
           "load_model", "preset", "save_model", "create_model"]
