"""Crash-safe checkpoint files.

Layout: ``<ckpt_dir>/<name>/epoch_<N>.pt`` plus ``opt.txt``/``opt.json``.

Writes are atomic: the data goes to a hidden temp file in the same directory
(``.<target>.<random>.tmp``), is flushed and fsynced, then ``os.replace``-d
over the target.  A kill at any point leaves either the old file or the new
one, never a half-written ``epoch_<N>.pt``; only names matching
``epoch_<N>.pt`` exactly count as checkpoints, so a leftover temp file is
never mistaken for one.

Checkpoints are kept to plain containers (dict, list, tuple, str, numbers,
bool, None, tensors, ``torch.Size``/``dtype``/``device``), which lets
:func:`load_checkpoint` use ``torch.load(weights_only=True)``: loading a
checkpoint cannot run arbitrary code.  :func:`save_atomic` refuses anything
else (store e.g. ``vars(opt)`` rather than a Namespace, numpy RNG state as
lists) so a checkpoint that could not be loaded safely is never written.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from util.errors import UserError, one_line

__all__ = [
    "CHECKPOINT_FORMAT",
    "checkpoint_path",
    "latest_epoch",
    "list_epochs",
    "load_checkpoint",
    "remove_stale_temp_files",
    "rng_state",
    "save_atomic",
    "set_rng_state",
    "write_text_atomic",
]

CHECKPOINT_FORMAT = 1
CRASH_ENV = "NGVI_TEST_CRASH_BEFORE_RENAME"
_EPOCH_RE = re.compile(r"^epoch_(\d+)\.pt$")
_PLAIN_SCALARS = (str, bytes, int, float, bool, type(None))  # exact types (np.float64 is a float subclass)
_TORCH_LEAVES = (torch.Tensor, torch.Size, torch.dtype, torch.device)


def checkpoint_path(run_dir: str | os.PathLike, epoch: int) -> Path:
    """``<run_dir>/epoch_<epoch>.pt``."""
    return Path(run_dir) / f"epoch_{int(epoch)}.pt"


def _check_plain(obj: Any, where: str = "checkpoint") -> None:
    if type(obj) in _PLAIN_SCALARS or isinstance(obj, _TORCH_LEAVES):
        return
    if type(obj) in (dict, collections.OrderedDict):
        for k, v in obj.items():
            if type(k) not in _PLAIN_SCALARS:
                raise TypeError(f"{where} has a key of type {type(k).__name__}; use str/int keys")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__name__}; checkpoints hold only "
        "dicts, lists, tuples, str, numbers, None and tensors (so torch.load(weights_only=True) "
        "can read them); convert it (e.g. vars(namespace), ndarray.tolist())"
    )


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _crash_requested(path: Path) -> bool:
    """Test hook: ``$NGVI_TEST_CRASH_BEFORE_RENAME`` set to a checkpoint's file name (e.g.
    ``epoch_2.pt``) crashes only the write of that file; any other non-empty value crashes every
    checkpoint write."""
    value = os.environ.get(CRASH_ENV)
    if not value:
        return False
    return value == path.name or not _EPOCH_RE.match(value)


def _os_error(exc: BaseException | None) -> OSError | None:
    """``exc`` if it is an OSError, else the OSError it was raised from or while handling.

    ``torch.save`` turns a failed write (disk full, file too large) into a RuntimeError from
    its zip writer's cleanup, raised while the OSError is being handled.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _write_atomic(path: Path, write: Callable[[BinaryIO], object], what: str, crash_hook: bool) -> None:
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if crash_hook and _crash_requested(path):
            os._exit(77)  # test hook: simulate a kill between write and rename
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except Exception as e:
        os_error = _os_error(e)
        if os_error is None:
            raise
        reason = os_error.strerror or one_line(os_error)
        raise UserError(
            f"could not write {what} {path} ({reason}); the previous {what} is intact; "
            "free disk space or choose a writable --ckpt_dir"
        ) from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (temp file + fsync + ``os.replace``).

    A dict without ``format_version`` gets ``format_version = CHECKPOINT_FORMAT``
    added (in a shallow copy).  Raises ``TypeError`` if ``obj`` holds anything
    but plain containers/tensors, and :class:`UserError` if the file cannot be
    written (disk full, read-only); the previous file is left untouched and the
    temp file removed.  If ``$NGVI_TEST_CRASH_BEFORE_RENAME`` is set the process
    exits with status 77 after writing the temp file and before the rename (set it
    to a file name such as ``epoch_2.pt`` to crash only when writing that file).
    """
    if isinstance(obj, dict) and "format_version" not in obj:
        obj = {"format_version": CHECKPOINT_FORMAT, **obj}
    _check_plain(obj)
    _write_atomic(Path(path), lambda f: torch.save(obj, f), "checkpoint", crash_hook=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; :class:`UserError` on OSError."""
    data = text.encode("utf-8")
    _write_atomic(Path(path), lambda f: f.write(data), "file", crash_hook=False)


def remove_stale_temp_files(run_dir: str | os.PathLike) -> list[Path]:
    """Delete temp files left by a process killed between writing and renaming; returns them."""
    stale = sorted(Path(run_dir).glob(".*.tmp"))
    for path in stale:
        with contextlib.suppress(OSError):
            path.unlink()
    return stale


def list_epochs(run_dir: str | os.PathLike) -> list[int]:
    """Sorted epochs that have an ``epoch_<N>.pt`` file in ``run_dir`` ([] if none/missing)."""
    try:
        names = os.listdir(run_dir)
    except OSError:
        return []
    out = []
    for name in names:
        m = _EPOCH_RE.match(name)
        if m and os.path.isfile(os.path.join(run_dir, name)):
            out.append(int(m.group(1)))
    return sorted(out)


def latest_epoch(run_dir: str | os.PathLike) -> int | None:
    """Highest saved epoch in ``run_dir``, or None."""
    epochs = list_epochs(run_dir)
    return epochs[-1] if epochs else None


def _available(run_dir: Path, exclude: int | None = None) -> str:
    epochs = [e for e in list_epochs(run_dir) if e != exclude]
    if not epochs:
        return f"no other checkpoints in {run_dir}" if exclude is not None else f"no checkpoints in {run_dir}"
    return f"available epochs in {run_dir}: {', '.join(map(str, epochs))}"


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device | None = "cpu", weights_only: bool = True
) -> dict:
    """Load a checkpoint dict, with :class:`UserError` for missing/corrupted/incompatible files."""
    path = Path(path)
    m = _EPOCH_RE.match(path.name)
    this_epoch = int(m.group(1)) if m else None
    if not path.is_file():
        raise UserError(
            f"checkpoint {path} not found; {_available(path.parent)} (pass one of them with --epoch)"
        )
    try:
        obj = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # truncated zip, random bytes, unpickling errors, ...
        raise UserError(
            f"checkpoint {path} is corrupted ({type(e).__name__}: {one_line(e)[:160]}); "
            f"{_available(path.parent, this_epoch)}; load another with --epoch or retrain"
        ) from None
    if not isinstance(obj, dict):
        raise UserError(
            f"checkpoint {path} is corrupted (holds a {type(obj).__name__}, not a dict); "
            f"{_available(path.parent, this_epoch)}"
        )
    version = obj.get("format_version")
    if version != CHECKPOINT_FORMAT:
        raise UserError(
            f"checkpoint {path} has format_version {version!r} but this code reads format "
            f"{CHECKPOINT_FORMAT}; use the code version that wrote it, or retrain"
        )
    return obj


def rng_state(device: torch.device) -> dict:
    """The random-number state of this process: the CPU generator's, and ``device``'s own when it is a GPU."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore :func:`rng_state` (load the checkpoint with ``map_location="cpu"``: the states are CPU byte tensors).

    The GPU state is restored only when this run is on a GPU, and only ``device``'s; a checkpoint from a GPU run
    resumes on a machine without one (its GPU state is then unused). Older checkpoints held the states of all
    visible GPUs (a list): the entry of ``device``'s index is used when there is one.
    """
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if device.type != "cuda" or cuda is None:
        return
    if isinstance(cuda, (list, tuple)):
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)
