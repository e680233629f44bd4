"""Checkpoints written atomically, verified when read, and read without unpickling arbitrary
objects.

Beside each checkpoint ``last.pt`` lies ``last.pt.sha256``, the SHA-256 of its bytes, written
after it. Loading compares the two, so a checkpoint whose bits changed on disk is refused
instead of resuming training on corrupted weights (``torch.load`` checks nothing). A checkpoint
without its hash (written by an earlier version, or copied alone) is checked against the CRC-32
of every entry of its zip archive instead. Saving can first move the current checkpoint (and
its hash) to ``previous.pt``, so that a resume falls back to it when ``last.pt`` fails.

At every moment of a save, each file present is either whole and matches its hash, or has no
hash and passes its CRC check, or is a temporary file (``.last.pt.<pid>.tmp``) that
:func:`remove_stale_temporaries` deletes once its process has died.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import random
import re
import time
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

HASH_SUFFIX = ".sha256"
#: What a training checkpoint holds (see :meth:`~zigzag_mamba.train.trainer.Trainer.state_dict`).
CHECKPOINT_KEYS = ("model", "ema", "optimizer", "step", "data", "rng", "config")
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.tmp")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# What a failed write says: the OS's errors for a full disk or quota, and torch.save's own.
_WRITE_FAILED = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# Where the process that wrote a temporary file cannot be asked whether it lives.
_STALE_AFTER_SECONDS = 3600


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: empty, truncated, corrupted, or not a checkpoint."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a quota); the one before it is intact."""


def hash_path(path: str | Path) -> Path:
    """Where the SHA-256 of the checkpoint ``path`` is kept: ``last.pt`` -> ``last.pt.sha256``."""
    path = Path(path)
    return path.with_name(path.name + HASH_SUFFIX)


def previous_path(path: str | Path) -> Path:
    """Where :func:`save_checkpoint` keeps the checkpoint it replaced: ``last.pt`` ->
    ``previous.pt``; any other ``name.pt`` -> ``name.previous.pt``."""
    path = Path(path)
    stem = "previous" if path.stem == "last" else f"{path.stem}.previous"
    return path.with_name(stem + path.suffix)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(state: dict[str, Any], path: str | Path, *, rotate: bool = False) -> Path:
    """Write ``state`` to ``path`` so that a crash at any moment leaves a usable checkpoint.

    The bytes go to a temporary file in the same folder and are flushed to disk; only then
    does it replace ``path`` in one atomic rename, and its SHA-256 is written beside it
    (``path.sha256``). With ``rotate``, the checkpoint at ``path`` first becomes
    :func:`previous_path` (with its hash), for :func:`load_checkpoint_or_previous`.

    Example::

        >>> save_checkpoint({"step": 3, "model": {}}, "run/last.pt")  # doctest: +SKIP
        PosixPath('run/last.pt')
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        try:
            with open(tmp, "wb") as file:
                torch.save(state, file)
                file.flush()
                os.fsync(file.fileno())
        except (OSError, RuntimeError) as exc:
            if not _is_write_failure(exc):
                raise
            raise CheckpointWriteError(
                f"could not write the checkpoint {path} (the disk is full, or a quota or file "
                f"size limit was reached: {str(exc).splitlines()[0]}); the checkpoint there "
                "before, if any, is intact"
            ) from exc
        digest = file_sha256(tmp)
        _retire(path, rotate)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    write_atomically(hash_path(path), f"{digest}  {path.name}\n".encode())
    _fsync_dir(path.parent)
    return path


def _is_write_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says that bytes could not be written (torch.save wraps the OS's error
    in a RuntimeError of its zip writer)."""
    if isinstance(exc, OSError):
        return exc.errno in _WRITE_FAILED
    return "file write failed" in str(exc) or "unexpected pos" in str(exc)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _retire(path: Path, rotate: bool) -> None:
    """Clear the way for a new ``path``, in an order that never leaves a file beside a hash of
    other bytes: a hash goes before its file is replaced, and follows it after it moved."""
    if rotate and path.is_file():
        previous = previous_path(path)
        hash_path(previous).unlink(missing_ok=True)
        os.replace(path, previous)
        if hash_path(path).is_file():
            os.replace(hash_path(path), hash_path(previous))
    else:
        hash_path(path).unlink(missing_ok=True)


def write_atomically(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` so that ``path`` holds either its old bytes or the new ones, whatever
    happens: into a temporary file beside it, flushed to disk, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = data.encode() if isinstance(data, str) else data
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform can open a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_checkpoint(path: str | Path) -> None:
    """Delete a checkpoint and its hash, if present (the hash first)."""
    hash_path(path).unlink(missing_ok=True)
    Path(path).unlink(missing_ok=True)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that saves killed midway left in ``folder``; return them.

    A temporary file names the process that wrote it (``.last.pt.<pid>.tmp``); it is stale once
    that process is gone (where that cannot be asked, once it is an hour old).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for file in folder.iterdir():
        match = _TEMPORARY.fullmatch(file.name)
        if match and file.is_file() and _is_stale(file, int(match["pid"])):
            file.unlink(missing_ok=True)
            removed.append(file)
    return removed


def _is_stale(file: Path, pid: int) -> bool:
    if pid == os.getpid():
        return False
    if os.name != "posix":  # os.kill would end the process there, not probe it
        return time.time() - file.stat().st_mtime > _STALE_AFTER_SECONDS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, and someone else's
        return False
    return False


def verify_checkpoint(path: str | Path) -> None:
    """Raise a :class:`CheckpointError` naming ``path`` unless its bytes are intact.

    Intact means: equal to the SHA-256 beside it, or, without one, a zip archive whose every
    entry matches its CRC-32. Reads the whole file.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (was the run killed while saving it?)")
    expected = _recorded_hash(path)
    if expected is not None:
        if file_sha256(path) != expected:
            raise CheckpointError(
                f"checkpoint {path} does not match its SHA-256 in {hash_path(path)}: its bytes "
                "changed after it was written (a disk or copy error)"
            )
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(
            f"{path} is not a checkpoint: not a zip archive as torch.save writes ({exc}); it may "
            "be truncated"
        ) from exc
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupted: entry {bad} fails its CRC check")


def _recorded_hash(path: Path) -> str | None:
    """The SHA-256 recorded beside ``path``, None when there is no hash file."""
    recorded = hash_path(path)
    if not recorded.exists():
        return None
    try:
        words = recorded.read_text().split()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"the hash file {recorded} of checkpoint {path} cannot be read ({exc}); it should "
            "be one line of text, the SHA-256 and the file name"
        ) from None
    if not words or not _SHA256.fullmatch(words[0]):
        raise CheckpointError(
            f"the hash file {recorded} of checkpoint {path} holds no SHA-256 (64 hex digits); "
            "delete it to check the checkpoint by its zip archive's CRC-32 instead"
        )
    return words[0]


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    required: Iterable[str] = (),
) -> dict[str, Any]:
    """Verify a checkpoint (:func:`verify_checkpoint`) and read it with ``weights_only=True``
    (tensors and plain containers only).

    Raises a :class:`CheckpointError` that names the file when it is empty, truncated,
    corrupted, not a checkpoint, or lacks one of the ``required`` keys.
    """
    path = Path(path)
    verify_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain containers, so it is not a "
            "checkpoint written by zigzag-mamba (which never unpickles arbitrary objects)"
        ) from exc
    except (EOFError, KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path} cannot be read as a checkpoint: {exc}") from exc
    missing = sorted(set(required) - set(state)) if isinstance(state, dict) else None
    if missing is None or missing:
        what = f"lacks {missing}" if missing else f"holds a {type(state).__name__}"
        raise CheckpointError(f"{path} is not a zigma training checkpoint: it {what}")
    return state


def load_checkpoint_or_previous(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    required: Iterable[str] = (),
) -> tuple[dict[str, Any], Path]:
    """:func:`load_checkpoint` of ``path``, or, when that fails and :func:`previous_path`
    exists, of the previous checkpoint, with a warning. Returns the state and the file read."""
    path, previous = Path(path), previous_path(path)
    required = tuple(required)
    try:
        return load_checkpoint(path, map_location, required=required), path
    except (CheckpointError, FileNotFoundError) as exc:
        if not previous.is_file():
            raise
        failure = exc
    warnings.warn(
        f"{failure}; falling back to the previous checkpoint, {previous}",
        RuntimeWarning,
        stacklevel=2,
    )
    try:
        return load_checkpoint(previous, map_location, required=required), previous
    except CheckpointError as exc:
        raise CheckpointError(f"{failure}; the previous checkpoint fails too: {exc}") from exc


def rng_states(generator: torch.Generator) -> dict[str, Any]:
    """Every random state a training step can touch, in a form ``weights_only`` can read."""
    np_state = np.random.get_state()
    states = {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(states["generator"])
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def another_model(
    path: Path, saved: dict[str, Any] | None, ours: dict[str, Any], exc: Exception
) -> str:
    """Why the weights in ``path`` do not fit this model, in the terms of the model specs."""
    saved, ours = saved or {}, ours or {}
    differ = [k for k in sorted(set(saved) | set(ours)) if saved.get(k) != ours.get(k)]
    if saved and ours and differ:
        what = "; ".join(f"{k}: {saved.get(k)!r} there, {ours.get(k)!r} here" for k in differ)
    else:
        what = str(exc).strip().splitlines()[0]
    return (
        f"checkpoint {path} holds the weights of another model ({what}); resume it with the "
        "model it was trained with (zigma train reads it from the run's config.json)"
    )


def same_file(a: Path | None, b: Path) -> bool:
    return a is not None and a.resolve() == b.resolve()
