"""Model zoo: ``create_model(name, ...)`` over a registry, one file per family."""
from . import cnn, mobilenet, preact_resnet, resnet, vgg, vit  # noqa: F401  (registers the families)
from . import backdoorbench  # noqa: F401  (BackdoorBench's and the BCU authors' architectures)
from . import external  # noqa: F401  (torchvision's, where it is installed)
from .registry import (MODELS, Classifier, ModelSpec, Normalize, build, check_images, create_model, input_shape_of,
                       register_model)

__all__ = ["MODELS", "Classifier", "ModelSpec", "Normalize", "build", "check_images", "create_model", "input_shape_of",
           "register_model"]
