"""Where bcu writes: one set of rules for every command that writes (docs/security.md, "Outputs").

* **An output is never an input.** ``--out`` (and its ``.partial`` staging folder and ``.lock``
  file) may not be any input of the command, nor a folder that contains one. ``/``, the current
  folder and its parents are refused outright.
* **``--overwrite`` only replaces what bcu wrote.** Every output folder carries a marker file,
  :data:`MARKER` (``.bcu-output``, a small JSON body: format, bcu version, command). An existing
  ``--out`` is replaced only when it is a real folder (not a link) owned by the current user that
  carries the marker; anything else -- a user's folder, a file, a symbolic link, a bcu output of
  an older version (no marker) -- is refused with a line saying to delete it by hand.
  ``--json FILE`` (``bcu evaluate``) refuses an existing file without ``--overwrite``, and with it
  still refuses anything that is not a regular file or that is one of the command's inputs (the
  model's own ``model.json``).
* **One run per output.** ``<out>.lock`` is locked exclusively for the whole run
  (:class:`bcu.lock.ExclusiveLock`); a second run names the PID that holds it and exits non-zero.
* **Staging never follows a link.** ``<out>.partial`` is created fresh with ``mkdir`` (which fails
  on anything in the way, a dangling link included); a leftover one is reused only with ``--resume``
  and removed otherwise, in both cases only when it is a real folder owned by the current user --
  a symbolic link or another user's folder is refused. Files are written to ``O_EXCL`` temporary
  names and renamed; the final rename never leaves ``<out>.old`` behind.
* Files are created with the usual permissions (``0666`` less the umask), folders likewise.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable, List, Optional, Union

import torch

from .version import __version__
from .errors import BcuError, Interrupted, OutputError, ResumeMismatch
from .lock import ExclusiveLock

MARKER = ".bcu-output"
RESUME = "resume"  # the staging folder's sub-folder of resume checkpoints (never part of the output)
MARKER_FORMAT = "bcu-output/1"
PathLike = Union[str, Path]


# --------------------------------------------------------------------------------------------------
# atomic files


def _os_error(e: OSError, path: Path) -> OutputError:
    if e.errno == errno.ENOSPC:
        return OutputError(f"disk full while writing {path}")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write {path}: permission denied (read-only location?)")
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        return OutputError(f"cannot write {path}: a file is in the way where a folder is needed")
    return OutputError(f"cannot write {path}: {e.strerror or e}")


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to a fresh temporary file beside ``path`` (``O_EXCL``, never a link), fsync,
    give it the normal permissions (0666 less the umask), then rename it over ``path``."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), 0o666 & ~current_umask())
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise _os_error(e, path) from None
    finally:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if isinstance(o, (Path,)):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# the rules


def _real(p: PathLike) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(p)))


def _contains(outer: str, inner: str) -> bool:
    """``inner`` is ``outer`` or lies below it (both resolved)."""
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def check_output_path(out: PathLike, inputs: Iterable[PathLike] = (), flag: str = "--out",
                      suffixes: Iterable[str] = ()) -> None:
    """Refuse an output that is ``/``, ``.``, ``..`` (or the current folder or a parent of it), or
    that is, or contains, one of ``inputs``. The sibling paths the output uses (``<out>.partial``,
    ``<out>.lock``: ``suffixes``) are held to the same rule."""
    text = os.fspath(out)
    name = Path(text).name
    if text.strip() == "" or name in ("", ".", "..") or os.path.abspath(text) == os.path.dirname(os.path.abspath(text)):
        raise OutputError(f"{flag} {text!r} names the root, the current folder or a parent folder: "
                          f"give bcu a folder of its own")
    related = [Path(text).with_name(name + sfx) for sfx in suffixes]
    real = _real(text)
    if _contains(real, _real(os.getcwd())):
        raise OutputError(f"{flag} {text} is the current folder or one of its parents: give bcu a folder of its own")
    candidates = [(text, real)] + [(os.fspath(r), _real(r)) for r in related]
    for inp in inputs:
        if inp is None or not os.path.lexists(os.fspath(inp)):
            continue
        ri = _real(inp)
        for shown, rc in candidates:
            if _contains(rc, ri):
                what = "is" if rc == ri else "contains"
                raise OutputError(f"{flag} {text} {what} the input {os.fspath(inp)}: an output is never an input "
                                  f"(choose another {flag})")


def read_marker(folder: Path) -> Optional[dict]:
    """The marker of a bcu output folder, or None (missing, a link, not ours, unreadable)."""
    m = folder / MARKER
    try:
        st = os.lstat(m)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 4096:
            return None
        data = json.loads(m.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("format") == MARKER_FORMAT else None


def write_marker(folder: Path, kind: str) -> None:
    atomic_write_json(folder / MARKER, {"format": MARKER_FORMAT, "bcu_version": __version__, "command": kind})


def _owned(st: os.stat_result) -> bool:
    return not hasattr(os, "geteuid") or st.st_uid == os.geteuid()


def check_replaceable(final: Path, flag: str = "--out") -> None:
    """``final`` exists and ``--overwrite`` was given: it must be a bcu output folder of ours."""
    try:
        st = os.lstat(final)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise OutputError(f"{flag} {final} is a symbolic link: --overwrite replaces only folders bcu wrote "
                          f"(delete it by hand or choose another {flag})")
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{flag} {final} is a file, not a bcu output folder: --overwrite replaces only folders "
                          f"bcu wrote (delete it by hand or choose another {flag})")
    if not _owned(st):
        raise OutputError(f"{flag} {final} belongs to another user: --overwrite replaces only your own bcu outputs")
    if read_marker(final) is None:
        raise OutputError(f"{flag} {final} was not written by this bcu (it has no {MARKER} marker): --overwrite "
                          f"replaces only bcu outputs; delete it by hand or choose another {flag}")


def _remove_tree(path: Path) -> None:
    """Remove ``path`` without following a link: a link or file is unlinked, a folder removed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------------------------------
# output folders


class OutputDir:
    """Stage an output folder at ``<out>.partial`` and rename it into place on success.

    The rules of this module apply (``inputs`` are the command's input paths). A failure removes
    the staging folder, so nothing partial is left behind; an interruption (Ctrl-C, kill) keeps
    it when it holds a resumable checkpoint, for ``--resume``, and so does a refused resume
    (:class:`~bcu.errors.ResumeMismatch`), so that the checkpoint survives a wrong option.
    ``lock=False`` when the caller already holds ``<out>.lock``; ``wait=True`` waits for it.
    """

    def __init__(self, final: PathLike, overwrite: bool = False, resume: bool = False, *,
                 inputs: Iterable[PathLike] = (), kind: str = "output", flag: str = "--out",
                 lock: bool = True, wait: bool = False) -> None:
        self.final = Path(final)
        self.staging = Path(os.fspath(self.final) + ".partial")
        self.overwrite = overwrite
        self.resume = resume
        self.inputs: List[PathLike] = list(inputs)
        self.kind = kind
        self.flag = flag
        self.use_lock = lock
        self.wait = wait
        self.lock: Optional[ExclusiveLock] = None
        self._committed = False

    @property
    def lock_path(self) -> Path:
        return Path(os.fspath(self.final) + ".lock")

    def __enter__(self) -> "OutputDir":
        check_output_path(self.final, self.inputs, self.flag, suffixes=(".partial", ".lock"))
        if os.path.lexists(self.final) and not self.overwrite:
            raise OutputError(f"output {self.final} already exists (choose another {self.flag} or pass --overwrite)")
        parent = self.final.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _os_error(e, parent) from None
        if not os.access(parent, os.W_OK):
            raise OutputError(f"cannot write {self.final}: permission denied (read-only location?)")
        if self.use_lock:
            self.lock = ExclusiveLock(self.lock_path, f"output {self.final}", wait=self.wait).acquire()
        try:
            self._prepare()
        except BaseException:
            self._release()
            raise
        return self

    def _prepare(self) -> None:
        if self.overwrite:
            check_replaceable(self.final, self.flag)
        elif os.path.lexists(self.final):  # appeared while we waited for the lock
            raise OutputError(f"output {self.final} already exists (choose another {self.flag} or pass --overwrite)")
        try:
            st: Optional[os.stat_result] = os.lstat(self.staging)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise _os_error(e, self.staging) from None
        if st is not None:
            if stat.S_ISLNK(st.st_mode):
                raise OutputError(f"{self.staging} is a symbolic link, not a staging folder bcu made: refusing to "
                                  f"write through it (remove it by hand)")
            if not stat.S_ISDIR(st.st_mode):
                raise OutputError(f"{self.staging} is a file, not a staging folder bcu made (remove it by hand)")
            if not _owned(st):
                raise OutputError(f"{self.staging} belongs to another user: refusing to use it (remove it by hand)")
        if self.resume:
            if st is None:
                raise OutputError(f"nothing to resume: {self.staging} does not exist")
            if read_marker(self.staging) is None:
                write_marker(self.staging, self.kind)
            return
        if st is not None:  # a leftover of a crashed run: discarded, never trusted
            shutil.rmtree(self.staging, ignore_errors=True)
        try:
            os.mkdir(self.staging)  # fails on anything in the way, a dangling link included
        except OSError as e:
            raise _os_error(e, self.staging) from None
        try:
            write_marker(self.staging, self.kind)
        except BaseException:
            shutil.rmtree(self.staging, ignore_errors=True)
            raise

    @property
    def path(self) -> Path:
        return self.staging

    @property
    def resume_dir(self) -> Path:
        """Where the run keeps its resume checkpoints (removed by :meth:`commit`)."""
        return self.staging / RESUME

    def interrupted(self, e: BaseException) -> Interrupted:
        """The Ctrl-C message: how to go on, and only promise --resume when a checkpoint exists."""
        if has_checkpoint(self.final):
            return Interrupted(f"{e}; progress is kept in {self.staging}: run the same command with --resume to "
                               f"continue")
        return Interrupted(f"{e}; nothing resumable was saved yet: run the same command again")

    def commit(self) -> Path:
        """Remove the resume checkpoints, then rename the staging folder to ``<out>`` (replacing a
        previous bcu output, atomically)."""
        _remove_tree(self.resume_dir)  # the checkpoint is not part of the output
        if self.overwrite:
            check_replaceable(self.final, self.flag)
        elif os.path.lexists(self.final):
            raise OutputError(f"output {self.final} already exists (choose another {self.flag} or pass --overwrite)")
        old = None
        try:
            if os.path.lexists(self.final):
                old = self.final.with_name(f".{self.final.name}.old-{secrets.token_hex(6)}")
                os.rename(self.final, old)
            try:
                os.rename(self.staging, self.final)
            except OSError:
                if old is not None:
                    os.rename(old, self.final)
                    old = None
                raise
        except OSError as e:
            raise _os_error(e, self.final) from None
        finally:
            if old is not None:
                _remove_tree(old)
        _fsync_dir(self.final.parent)
        self._committed = True
        return self.final

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None or self._committed:
                return
            interrupted = exc_type is KeyboardInterrupt or (isinstance(exc, BcuError) and exc.exit_code == 130)
            if (interrupted and has_checkpoint(self.final)) or isinstance(exc, ResumeMismatch):
                return  # keep the checkpoint for --resume
            try:
                st = os.lstat(self.staging)
            except OSError:
                return
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(self.staging, ignore_errors=True)
        finally:
            self._release()


def has_checkpoint(final: PathLike) -> bool:
    """A finished resume checkpoint in ``<final>.partial/resume/`` (of any training phase, in a
    sub-folder or not; temporary ``.name.tmp`` files do not count)."""
    d = Path(os.fspath(final) + ".partial") / RESUME
    try:
        return d.is_dir() and not d.is_symlink() and any(
            p.is_file() and not p.name.startswith(".") for p in d.rglob("*"))
    except OSError:
        return False


class OutputFile:
    """A single-file output (``bcu evaluate --json FILE``), under the same rules: checked when the
    command starts (:meth:`check`), written atomically at the end (:meth:`write_json`)."""

    def __init__(self, path: PathLike, overwrite: bool = False, *, inputs: Iterable[PathLike] = (),
                 flag: str = "--json") -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self.inputs = list(inputs)
        self.flag = flag

    def check(self) -> "OutputFile":
        check_output_path(self.path, self.inputs, self.flag)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return self
        except OSError as e:
            raise _os_error(e, self.path) from None
        if stat.S_ISLNK(st.st_mode):
            raise OutputError(f"{self.flag} {self.path} is a symbolic link: refusing to write through it")
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{self.flag} {self.path} exists and is not a regular file")
        if not self.overwrite:
            raise OutputError(f"output {self.path} already exists (choose another {self.flag} or pass --overwrite)")
        return self

    def write_json(self, obj: Any) -> Path:
        self.check()
        atomic_write_json(self.path, obj)
        return self.path


# --------------------------------------------------------------------------------------------------
# persistent folders (bcu bench --out): created once, reused by later runs, never replaced

_BENCH_LAYOUT = {"cells", "teachers", "unlabeled", "results.json", "results.csv", "results.md", "acc_asr.png", MARKER}


class WorkDir:
    """A folder bcu keeps adding to (``bcu bench --out``): never an input, created with the marker,
    and reused only when it carries the marker -- or, made by an older bcu or created empty by the
    user, when it holds nothing but bench's own layout (``cells/``, ``teachers/``, ``unlabeled/``,
    ``results.*``, ``acc_asr.png``); bench only ever removes entries it made itself under
    ``teachers/``, so adopting such a folder cannot delete anything of the user's.

    It takes no exclusive lock: several ``bcu bench`` runs may share one folder by design (each
    computes other cells, written atomically; each teacher is trained under its own lock,
    ``teachers/<key>.lock``)."""

    def __init__(self, path: PathLike, kind: str, *, inputs: Iterable[PathLike] = (), flag: str = "--out") -> None:
        self.path = Path(path)
        self.kind = kind
        self.inputs = list(inputs)
        self.flag = flag

    def __enter__(self) -> Path:
        check_output_path(self.path, self.inputs, self.flag)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _os_error(e, self.path.parent) from None
        try:
            os.mkdir(self.path)
        except FileExistsError:
            pass
        except OSError as e:
            raise _os_error(e, self.path) from None
        st = os.lstat(self.path)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{self.flag} {self.path} is not a folder bcu made (a file or a link): choose another "
                              f"{self.flag}")
        if not _owned(st):
            raise OutputError(f"{self.flag} {self.path} belongs to another user: choose another {self.flag}")
        marker = read_marker(self.path)
        if marker is not None:
            if marker.get("command") != self.kind:
                raise OutputError(f"{self.flag} {self.path} is a bcu {marker.get('command')!s} output, not a "
                                  f"{self.kind} folder: choose another {self.flag}")
            return self.path
        if set(os.listdir(self.path)) <= _BENCH_LAYOUT:  # new, empty, or an older bcu's bench folder
            write_marker(self.path, self.kind)
            return self.path
        raise OutputError(f"{self.flag} {self.path} exists and was not made by bcu {self.kind} (it has no {MARKER} "
                          f"marker, and files of its own): choose another {self.flag}")

    def __exit__(self, *exc) -> None:
        return None
