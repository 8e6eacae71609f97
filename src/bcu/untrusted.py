"""Reading files bcu does not trust, with every size bounded before anything is allocated.

One place for the rules of docs/security.md ("Size limits"):

* only regular files are read (a FIFO would block forever, ``/dev/zero`` never ends); a file is
  opened non-blocking and checked with ``fstat`` on the open descriptor, so there is no window
  between the check and the read;
* every kind of file has a byte limit (the constants below), checked against the file's real size
  before it is read, and again while reading (a file that grows);
* a size a header *declares* (IDX dimensions, a ``.npy`` shape, a zip member's length) is checked
  against what the file can actually hold before the array is allocated; compressed data may not
  expand past :data:`MAX_DECOMPRESSED_BYTES`;
* parsed trees (JSON, YAML, TOML, checkpoint fields) are bounded in depth and size.

The limits are module constants so that a test or an embedding application can lower or raise
them; the CLI uses them as they are.
"""
from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO, Type, Union

from .errors import BcuError, ConfigError, DataError, show

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# ---- byte limits of whole files --------------------------------------------------------------------
MAX_MODEL_BYTES = 4 * GiB          # model weights (.safetensors, .pt/.pth/.ckpt/.bin)
MAX_CHECKPOINT_BYTES = 8 * GiB     # a resume checkpoint (weights + optimizer state + history)
MAX_SIDECAR_BYTES = 1 * MiB        # model.json
MAX_ATTACK_JSON_BYTES = 1 * MiB    # attack.json
MAX_ATTACK_TENSOR_BYTES = 256 * MiB  # attack.safetensors (trigger tensors)
MAX_CONFIG_BYTES = 1 * MiB         # --config files (YAML, TOML, JSON)
MAX_PICKLE_BYTES = 1 * GiB         # one CIFAR python batch
MAX_DECOMPRESSED_BYTES = 2 * GiB   # what a gzip IDX file or a compressed .npz member may expand to
MAX_RESIDENT_BYTES = 16 * GiB      # images loaded into memory at once (use --stream beyond)

# ---- values ------------------------------------------------------------------------------------------
MAX_IMAGE_PIXELS = 1 << 25         # width x height of one image file (33.5 megapixels)
MAX_TREE_DEPTH = 32                # nesting of a JSON/YAML/TOML document or checkpoint field
MAX_TREE_NODES = 100_000           # values in a document, YAML aliases expanded


def human(n: int) -> str:
    """A byte count for messages: ``4 GiB``, ``1.5 MiB``, ``98 bytes``."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} bytes"


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def require_regular(path: Union[str, Path], what: str, error: Type[BcuError] = DataError,
                    limit: int | None = None) -> os.stat_result:
    """``stat`` of ``path`` (links followed) when it is a regular file within ``limit`` bytes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None
    _check_stat(st, path, what, error, limit)
    return st


def _check_stat(st: os.stat_result, path: Union[str, Path], what: str, error: Type[BcuError],
                limit: int | None) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path} is {_kind(st.st_mode)}, not a regular file: bcu reads {what} only from regular files")
    if limit is not None and st.st_size > limit:
        raise error(f"{path} is {human(st.st_size)}, more than the {human(limit)} bcu reads for {what} "
                    f"(docs/security.md)")


def open_regular(path: Union[str, Path], what: str, error: Type[BcuError] = DataError,
                 limit: int | None = None) -> BinaryIO:
    """Open ``path`` for reading, refusing anything but a regular file of at most ``limit`` bytes.

    The descriptor is opened with ``O_NONBLOCK`` (opening a FIFO does not wait for a writer) and
    checked with ``fstat`` before a byte is read.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise error(f"{path} is a folder, not a regular file: bcu reads {what} only from regular files") from None
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None
    try:
        _check_stat(os.fstat(fd), path, what, error, limit)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        raw = io.FileIO(fd, "rb")
        raw.name = os.fspath(path)  # messages (PIL's, numpy's) name the file, not the descriptor
        return io.BufferedReader(raw)
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path: Union[str, Path], limit: int, what: str, error: Type[BcuError] = DataError) -> bytes:
    """All bytes of a regular file of at most ``limit`` bytes (refused before reading if larger)."""
    with open_regular(path, what, error, limit) as fh:
        try:  # the size fstat gave (read(n) reserves n bytes up front), then whatever a growing file adds
            parts = [fh.read(os.fstat(fh.fileno()).st_size + 1)]
            total = len(parts[0])
            while total <= limit:
                more = fh.read(min(MiB, limit + 1 - total))
                if not more:
                    break
                parts.append(more)
                total += len(more)
            data = parts[0] if len(parts) == 1 else b"".join(parts)
        except OSError as e:
            raise error(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise error(f"{path} is more than the {human(limit)} bcu reads for {what} (docs/security.md)")
    return data


def check_tree(obj: Any, where: str, error: Type[BcuError] = DataError, max_nodes: int = MAX_TREE_NODES,
               max_depth: int = MAX_TREE_DEPTH) -> None:
    """Refuse a parsed document nested deeper than ``max_depth`` or holding more than ``max_nodes``
    values (shared sub-trees, as YAML aliases make them, count every time they appear)."""
    count = 0
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > max_nodes:
            raise error(f"{where} holds more than {max_nodes} values (YAML aliases count once per use)")
        if depth > max_depth:
            raise error(f"{where} is nested more than {max_depth} levels deep")
        if isinstance(node, dict):
            for k, v in node.items():
                stack.append((k, depth + 1))
                stack.append((v, depth + 1))
        elif isinstance(node, (list, tuple)):
            stack.extend((v, depth + 1) for v in node)


def parse_json(raw: Union[bytes, str], where: str, error: Type[BcuError] = DataError) -> Any:
    """``json.loads`` whose every failure is one ``error`` line: bad syntax, bad UTF-8, a 100,000-deep
    nesting (RecursionError), an integer beyond Python's 4,300-digit limit; the result is bounded
    by :func:`check_tree`."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        data = json.loads(text)
    except RecursionError:
        raise error(f"{where} is nested too deeply to be read") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, and the int-digits ValueError
        raise error(f"{where} is not valid JSON: {e}") from None
    check_tree(data, where, error)
    return data


def read_json(path: Union[str, Path], limit: int, what: str, error: Type[BcuError] = DataError) -> Any:
    return parse_json(read_bounded(path, limit, what, error), f"{what} {path}", error)


# ---- shapes and sizes of what a file may ask bcu to build ---------------------------------------------
MAX_CLASSES = 100_000              # num_classes of a model or an attack
MAX_CHANNELS = 16                  # C of an image shape
MAX_SIDE = 4096                    # H and W of an image shape
MAX_IMAGE_VALUES = 1 << 22         # C x H x W of one image (4.2 million values)
MAX_PARAMS = 500_000_000           # parameters + buffers of a model bcu builds (2 GB in float32)


def check_image_shape(shape: Any, where: str) -> tuple:
    """``shape`` as a (C, H, W) tuple of ints within the limits above, else a ConfigError."""
    try:
        ok = (isinstance(shape, (tuple, list)) and len(shape) == 3
              and all(isinstance(v, int) and not isinstance(v, bool) for v in shape))
    except TypeError:
        ok = False
    if not ok:
        raise ConfigError(f"{where} must be three integers (C, H, W), got {show(shape)}")
    c, h, w = (int(v) for v in shape)
    if not (1 <= c <= MAX_CHANNELS and 1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE) or c * h * w > MAX_IMAGE_VALUES:
        raise ConfigError(f"{where} must be (C, H, W) with 1 <= C <= {MAX_CHANNELS}, 1 <= H, W <= {MAX_SIDE} and "
                          f"C*H*W <= {MAX_IMAGE_VALUES}, got {show(tuple(shape))}")
    return c, h, w
