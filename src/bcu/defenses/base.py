"""The defense interface. A defense takes a suspicious model and some clean images and returns a
repaired model. Label-free defenses (``uses_labels = False``) are handed the images *without*
labels by :func:`run_defense`, so they cannot read one even by mistake.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Type

from torch import nn

from ..config import from_dict
from ..data import ImageSet
from ..errors import DataError
from ..registry import Registry

DEFENSES: Registry[Type["Defense"]] = Registry("defense")


@dataclass
class DefenseResult:
    model: nn.Module
    history: List[Dict[str, Any]] = field(default_factory=list)
    info: Dict[str, Any] = field(default_factory=dict)


class Defense(ABC):
    """Subclasses set ``name``, ``Config`` (a dataclass), ``uses_labels`` and implement ``run``."""

    name: ClassVar[str]
    Config: ClassVar[type]
    uses_labels: ClassVar[bool] = True
    uses_data: ClassVar[bool] = True

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def configure(cls, options: Optional[Dict[str, Any]] = None) -> Any:
        """The method's config from a dict of options (validated)."""
        return from_dict(cls.Config, options or {})

    @abstractmethod
    def run(self, model: nn.Module, data: Optional[ImageSet], *, device: str = "cpu", seed: int = 0,
            progress: Optional[bool] = None, resume_dir: Optional[Path] = None) -> DefenseResult:
        """Return a repaired copy of ``model`` (the input model is never modified)."""


def create_defense(name: str, config: Optional[Dict[str, Any]] = None) -> Defense:
    cls = DEFENSES.get(name)
    return cls(cls.configure(config))


def run_defense(defense: Defense, model: nn.Module, data: Optional[ImageSet], **kw: Any) -> DefenseResult:
    """Run ``defense``; label-free ones get ``data.without_labels()``, data-free ones get nothing."""
    if not defense.uses_data:
        return defense.run(model, None, **kw)
    if data is None:
        if getattr(defense, "synthesizes", False):  # it makes its own images (bcu: model inversion)
            return defense.run(model, None, **kw)
        raise DataError(f"defense {defense.name!r} needs images")
    if defense.uses_labels:
        if data.labels is None:
            raise DataError(f"defense {defense.name!r} uses labels; the data has none")
        return defense.run(model, data, **kw)
    return defense.run(model, data.without_labels(), **kw)
