"""The defense contract. A defense takes a suspicious model and some clean images and returns a
repaired model.

:meth:`Defense.run` is the one entry point and does what every method needs once: it checks the
data against what the method uses (label-free defenses, ``uses_labels = False``, are handed the
images *without* labels, so they cannot read one even by mistake; data-free ones get nothing),
copies the model to the device (the caller's model is never modified), times the run and records
the config; then it calls the method's own :meth:`Defense.repair` on the copy.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Type

from torch import nn

from ..config import from_dict
from ..data.imageset import Images
from ..errors import DataError
from ..registry import Registry

DEFENSES: Registry[Type["Defense"]] = Registry("defense")


@dataclass
class DefenseResult:
    model: nn.Module
    history: List[Dict[str, Any]] = field(default_factory=list)
    info: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """Where and how a defense runs (the keyword arguments of :meth:`Defense.run`)."""

    device: str = "cpu"
    seed: int = 0
    progress: Optional[bool] = None
    resume_dir: Optional[Path] = None

    def resume(self, phase: str) -> Optional[Path]:
        """The resume sub-folder of one training phase (None when the run does not resume)."""
        return None if self.resume_dir is None else Path(self.resume_dir) / phase


class Defense(ABC):
    """Subclasses set ``name``, ``Config`` (a dataclass), ``uses_labels``/``uses_data`` and implement
    :meth:`repair`."""

    name: ClassVar[str]
    Config: ClassVar[type]
    uses_labels: ClassVar[bool] = True
    uses_data: ClassVar[bool] = True
    synthesizes: ClassVar[bool] = False  # without images it makes its own (bcu: inverting the model)

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def configure(cls, options: Optional[Dict[str, Any]] = None) -> Any:
        """The method's config from a dict of options (validated)."""
        return from_dict(cls.Config, options or {})

    def data_for(self, data: Optional[Images]) -> Optional[Images]:
        """What the method may see of ``data``: nothing (data-free), the images without labels
        (label-free), or the labelled images (label-using; an unlabelled set is refused)."""
        if not self.uses_data:
            return None
        if data is None and self.synthesizes:
            return None
        if data is None or len(data) == 0:
            raise DataError(f"defense {self.name!r} needs images")
        if not self.uses_labels:
            return data.without_labels()
        if data.labels is None:
            raise DataError(f"defense {self.name!r} uses labels; the data has none")
        return data

    def run(self, model: nn.Module, data: Optional[Images], *, device: str = "cpu", seed: int = 0,
            progress: Optional[bool] = None, resume_dir: Optional[Path] = None) -> DefenseResult:
        """A repaired copy of ``model`` (the input model is never modified)."""
        data = self.data_for(data)
        t0 = time.time()
        work = copy.deepcopy(model).to(device)
        result = self.repair(work, data, Run(device, seed, progress, resume_dir))
        result.model.eval()
        result.info = {"config": dataclasses.asdict(self.config), **result.info, "seconds": time.time() - t0}
        return result

    @abstractmethod
    def repair(self, model: nn.Module, data: Optional[Images], run: Run) -> DefenseResult:
        """The method itself, on ``model``: a copy of the caller's model on ``run.device`` that it may
        change in place. ``data`` is what :meth:`data_for` allows."""


def create_defense(name: str, config: Optional[Dict[str, Any]] = None) -> Defense:
    cls = DEFENSES.get(name)
    return cls(cls.configure(config))


def run_defense(defense: Defense, model: nn.Module, data: Optional[Images], **kw: Any) -> DefenseResult:
    """``defense.run(model, data, **kw)`` (kept for the API: the checks are in :meth:`Defense.run`)."""
    return defense.run(model, data, **kw)
