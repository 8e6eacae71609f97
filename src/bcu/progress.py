"""Progress bars (tqdm) that stay quiet in tests and when stderr is not a terminal, unless asked."""
from __future__ import annotations

import os
import sys
from typing import Any, Iterable, Optional

from tqdm.auto import tqdm


def enabled(flag: Optional[bool] = None) -> bool:
    if flag is not None:
        return flag
    if os.environ.get("BCU_PROGRESS") is not None:
        return os.environ["BCU_PROGRESS"] not in ("0", "", "false")
    return sys.stderr.isatty()


def progress_bar(iterable: Optional[Iterable[Any]] = None, *, disable: Optional[bool] = None, **kw: Any) -> tqdm:
    """A tqdm bar on stderr; ``disable=None`` means "on when stderr is a terminal"."""
    on = enabled(None if disable is None else not disable)
    kw.setdefault("dynamic_ncols", True)
    kw.setdefault("leave", False)
    return tqdm(iterable, disable=not on, file=sys.stderr, **kw)
