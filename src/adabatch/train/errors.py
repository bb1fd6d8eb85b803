"""Every failure a user can cause or meet: one line on stderr and a distinct exit code.

| code | meaning |
|---|---|
| 0 | success |
| 1 | an internal error (a bug: rerun with ``--debug`` for the traceback and report it) |
| 2 | usage or configuration (bad flag or config file, incompatible checkpoint, busy run dir) |
| 3 | data (missing, corrupt or unreadable data files; a failed download) |
| 4 | I/O (disk full, permission denied, read-only file system, file size limit) |
| 5 | divergence (NaN/inf loss, or a finite loss far above its scale) |
| 6 | out of memory |
| 7 | another process of a distributed run stopped answering (``--dist-timeout``) |
| 128 + N | interrupted by signal N (SIGINT 130, SIGTERM 143), after a checkpoint |

:func:`classify` maps an exception to its code and line; the command-line program prints the
line (``adabatch: error: ...``) and returns the code, and prints the traceback only with
``--debug``.
"""

from __future__ import annotations

import errno

__all__ = ["EXIT_DATA", "EXIT_DIVERGED", "EXIT_INTERNAL", "EXIT_IO", "EXIT_MEMORY", "EXIT_OK",
           "EXIT_PEER", "EXIT_USAGE", "classify", "describe_os_error"]

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_IO = 4
EXIT_DIVERGED = 5
EXIT_MEMORY = 6
EXIT_PEER = 7

_IO_CAUSES = {
    errno.ENOSPC: "disk full (no space left on device)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied (operation not permitted)",
    errno.EROFS: "read-only file system",
    errno.EFBIG: "file too large (a file size limit, e.g. ulimit -f)",
}


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def describe_os_error(e: OSError) -> str:
    """One line that starts with the cause a user acts on, then the file."""
    cause = _IO_CAUSES.get(e.errno or -1) or (e.strerror or _one_line(e))
    where = e.filename if e.filename is not None else None
    return f"{cause}: {where}" if where else cause


def _out_of_memory(e: BaseException) -> bool:
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    # torch's CPU allocator raises RuntimeError("... DefaultCPUAllocator: can't allocate ...")
    return isinstance(e, RuntimeError) and ("can't allocate memory" in str(e)
                                            or "out of memory" in str(e))


def classify(e: BaseException) -> tuple[int, str]:
    """``(exit code, one line)`` for an exception that ends a command."""
    from adabatch.train.checkpoint import CheckpointError
    from adabatch.train.config import ConfigError
    from adabatch.train.data import DatasetError
    from adabatch.train.distributed import PeerTimeout
    from adabatch.train.divergence import Diverged
    from adabatch.train.download import DownloadError
    from adabatch.train.rundir import RunDirBusy

    if isinstance(e, (ConfigError, CheckpointError, RunDirBusy)):
        return EXIT_USAGE, _one_line(e)
    if isinstance(e, (DatasetError, DownloadError)):
        return EXIT_DATA, _one_line(e)
    if isinstance(e, (Diverged, FloatingPointError)):  # and the trainer's NaN stop
        return EXIT_DIVERGED, f"diverged: {_one_line(e)}"
    if isinstance(e, PeerTimeout):
        return EXIT_PEER, _one_line(e)
    if isinstance(e, RuntimeError) and ("closed by peer" in str(e) or "reset by peer" in str(e)):
        return EXIT_PEER, ("another process of the run ended or stopped answering (its "
                           "connection closed); see that process's error")
    if _out_of_memory(e):
        return EXIT_MEMORY, f"out of memory: {_one_line(e)[:300]}"
    if isinstance(e, OSError) and e.errno in _IO_CAUSES:
        return EXIT_IO, describe_os_error(e)
    if isinstance(e, OSError):
        return EXIT_IO, f"I/O error: {describe_os_error(e)}"
    return EXIT_INTERNAL, (f"internal error: {type(e).__name__}: {_one_line(e)} (rerun with "
                           "--debug for the traceback)")
