"""One process owns a run directory: a lock taken before anything is read or written.

Two trainers started together with the same ``--out`` (or two ``--resume`` of one run) would
interleave ``metrics.jsonl`` lines and mix checkpoints of different runs. :class:`RunDirLock`
prevents that: ``<run dir>/.adabatch.lock`` is locked with ``flock`` (POSIX) for the life of
the process, and holds the owner's pid and host for the error message of the next comer. The
kernel releases a ``flock`` when its process dies (even by SIGKILL), so a lock left by a dead
process is stale by construction and is taken over. Where ``fcntl`` is missing (Windows) the
lock file is created exclusively and a file whose pid no longer runs is taken over.

:func:`check_new_run_dir` is the rule for a new run's ``--out``: it must not exist, or be an
empty directory (a directory of the user's files is never written into).
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RunDirBusy", "RunDirLock", "check_new_run_dir"]

LOCK_NAME = ".adabatch.lock"


class RunDirBusy(RuntimeError):
    """Another live process owns the run directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OSError:
        return False
    return True


class RunDirLock:
    """Exclusive ownership of ``run_dir`` (created if missing) until :meth:`release`.

    Usage: ``with RunDirLock(run_dir): ...``. :attr:`took_over` is the pid of a dead owner
    whose lock file was found (None when there was none), for a one-line notice.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.took_over: int | None = None
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> RunDirLock:
        if self._fd is not None:
            raise RuntimeError(f"the lock of {self.run_dir} is already held by this object")
        self._created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        previous = self._read_owner()
        fd = self._lock_flock() if fcntl is not None else self._lock_exclusive(previous)
        if previous is not None and previous[0] != os.getpid():
            self.took_over = previous[0]
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def _lock_flock(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._busy() from None
        return fd

    def _lock_exclusive(self, previous: tuple[int, str] | None) -> int:  # pragma: no cover
        if previous is not None and not _pid_alive(previous[0]):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise self._busy() from None

    def _read_owner(self) -> tuple[int, str] | None:
        try:
            pid, _, host = self.path.read_text().strip().partition(" ")
            return int(pid), host
        except (OSError, ValueError):
            return None

    def _busy(self) -> RunDirBusy:
        owner = self._read_owner()
        who = f"process {owner[0]} on {owner[1] or 'this host'}" if owner else "another process"
        return RunDirBusy(f"{self.run_dir} is in use by {who} (lock {self.path}); wait for it "
                          "to finish or choose another --out")

    def release(self) -> None:
        """Give the directory up. The lock file stays (it is free once unlocked), unless
        nothing else was written: then the lock file goes, and the directory too when this
        lock created it, so a run that failed before writing leaves nothing behind."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        alone = [p.name for p in self.run_dir.iterdir()] == [LOCK_NAME]
        if alone or fcntl is None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        os.close(fd)  # closing the descriptor releases the flock
        if alone and self._created:
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def check_new_run_dir(run_dir: str | Path) -> Path:
    """``run_dir`` if a new run may write into it: it does not exist, or it is an empty
    directory (a stale lock file of ours and the temporary files of a start that was killed
    before its first step aside). Raises ValueError naming the problem."""
    from adabatch.train.checkpoint import is_temporary

    text = str(run_dir)
    if not text.strip():
        raise ValueError("--out is empty; give a directory for the run")
    path = Path(run_dir)
    if not path.exists():
        return path
    if not path.is_dir():
        raise ValueError(f"--out {path} exists and is not a directory")
    entries = sorted(p.name for p in path.iterdir()
                     if p.name != LOCK_NAME and not is_temporary(p.name))
    if entries:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ValueError(f"--out {path} is not empty ({shown}); a new run needs a new or "
                         "empty directory (continue an existing run with --resume)")
    return path
