"""One writer per run folder: a lock held for as long as a run writes into its folder.

The lock is ``OUT_DIR/.lock``, locked with ``flock`` (so the kernel releases it whatever way its
process ends) and holding the writer's process id, host and start time, which name the writer
to a second one that is refused. A lock file left by a process that ended without removing it
is taken over, with a message. Within one process the lock is re-entrant (the ``zigma train``
command holds it around the trainer, which takes it again).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # not POSIX: no kernel lock to take
    fcntl = None

LOCK_NAME = ".lock"
# Folders this process holds, by resolved path: (open lock file, how many holders).
_held: dict[Path, list] = {}


class RunFolderBusy(RuntimeError):
    """Another process is writing into the run folder."""


class RunLock:
    """Hold ``folder``'s lock in a ``with`` block (the folder is made if it does not exist).

    Example::

        >>> with RunLock("outputs/run7"):
        ...     pass  # train, write checkpoints and logs
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME

    def __enter__(self) -> RunLock:
        key = self.folder.resolve()
        if key in _held:
            _held[key][1] += 1
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")
        if fcntl is not None:
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(_read(file))
                file.close()
                raise RunFolderBusy(
                    f"{self.folder} is being written by another run ({holder}); wait for it "
                    "to finish, or use another --out-dir"
                ) from None
        left = _read(file)
        if left:
            print(
                f"taking over the lock of {self.folder}: {_describe(left)} ended without "
                "releasing it",
                file=sys.stderr,
            )
        file.seek(0)
        file.truncate()
        stamp = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.ctime()}
        file.write(json.dumps(stamp) + "\n")
        file.flush()
        _held[key] = [file, 1]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        key = self.folder.resolve()
        entry = _held[key]
        entry[1] -= 1
        if entry[1]:
            return
        del _held[key]
        # Removed while still locked: a writer that opens it now makes a new file.
        self.path.unlink(missing_ok=True)
        entry[0].close()


def _read(file) -> dict | None:
    file.seek(0)
    try:
        return json.loads(file.read() or "null")
    except ValueError:
        return {"pid": "unknown"}


def _describe(stamp: dict | None) -> str:
    if not stamp:
        return "a process"
    host = f" on {stamp['host']}" if stamp.get("host") else ""
    since = f", since {stamp['since']}" if stamp.get("since") else ""
    return f"process {stamp.get('pid')}{host}{since}"
