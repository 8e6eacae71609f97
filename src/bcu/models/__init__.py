"""Model zoo: ``create_model(name, ...)`` over a registry, one file per family; ``timm:NAME`` and
``torchvision:NAME`` from the sources of :mod:`.external`."""
from . import backdoorbench, cnn, external, mobilenet, preact_resnet, resnet, vgg, vit  # noqa: F401  (registers the families)
from .external import HUB_CONFIG, hub_config_bytes, library_normalization, spec_from_hub_config
from .registry import (MODELS, SOURCES, Classifier, ModelSpec, Normalize, build, check_images, create_model,
                       input_shape_of, known_arch, register_model, register_source)

__all__ = ["HUB_CONFIG", "MODELS", "SOURCES", "Classifier", "ModelSpec", "Normalize", "build", "check_images",
           "create_model", "hub_config_bytes", "input_shape_of", "known_arch", "library_normalization", "register_model",
           "register_source", "spec_from_hub_config"]
