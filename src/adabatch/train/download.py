"""``adabatch data get``: the standard image data sets from their canonical mirrors, verified.

Each file is streamed into a temporary file in the target folder, its checksum is computed on
the way, and only a file whose checksum matches is renamed to its final name (so a broken
connection, a full disk or a wrong file never leaves a file under a name the loaders read). A
mirror that fails (unreachable, HTTP error, wrong checksum) is reported and the next one is
tried; when all fail the error names the file and every mirror's reason. Files already present
and intact are not downloaded again. CIFAR archives are extracted (members checked to stay
inside their folder) into a temporary folder that is renamed into place.

Checksums (facts carried over from the data sets' publishers and torchvision's resource
tables):

- MNIST: SHA-256 of each *uncompressed* IDX file (mirrors recompress the ``.gz`` files, so the
  content is what is checked); the values of the project's shared data README.
- Fashion-MNIST: MD5 of each ``.gz`` file as Zalando publishes them.
- CIFAR-10 / CIFAR-100: MD5 of ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` as
  published at https://www.cs.toronto.edu/~kriz/cifar.html.

Layout under ``--dir`` (what ``--data-dir`` of ``adabatch train`` then reads): ``MNIST/raw/``,
``FashionMNIST/raw/``, ``cifar-10-batches-py/``, ``cifar-100-python/``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SOURCES", "DownloadError", "RemoteFile", "Source", "get"]


class DownloadError(OSError):
    """A data set could not be fetched intact from any mirror."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a data set: its name at the mirrors and what its checksum covers."""

    name: str
    digest: str
    algorithm: str = "md5"     # a hashlib name
    gunzipped: bool = False    # the digest is of the decompressed content


@dataclass(frozen=True)
class Source:
    """A data set: its mirrors (tried in order), files, and where they go under the root."""

    mirrors: tuple[str, ...]
    files: tuple[RemoteFile, ...]
    folder: str                  # files go to root/folder (archives: extracted into root)
    archive_folder: str = ""     # for archives: the folder the archive holds


def _mnist(name: str, sha: str) -> RemoteFile:
    return RemoteFile(name, sha, "sha256", gunzipped=True)


SOURCES: dict[str, Source] = {
    "mnist": Source(
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "http://yann.lecun.com/exdb/mnist/"),
        files=(
            _mnist("train-images-idx3-ubyte.gz",
                   "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
            _mnist("train-labels-idx1-ubyte.gz",
                   "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
            _mnist("t10k-images-idx3-ubyte.gz",
                   "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
            _mnist("t10k-labels-idx1-ubyte.gz",
                   "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
        ),
        folder="MNIST/raw"),
    "fashion-mnist": Source(
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        files=(
            RemoteFile("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            RemoteFile("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            RemoteFile("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            RemoteFile("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
        ),
        folder="FashionMNIST/raw"),
    "cifar10": Source(
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        files=(RemoteFile("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
        folder="", archive_folder="cifar-10-batches-py"),
    "cifar100": Source(
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        files=(RemoteFile("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),),
        folder="", archive_folder="cifar-100-python"),
}

_CHUNK = 1 << 20


def _digest_of(path: Path, f: RemoteFile) -> str:
    h = hashlib.new(f.algorithm)
    opener: Callable[..., object] = gzip.open if f.gunzipped else open
    with opener(path, "rb") as stream:  # type: ignore[operator]
        for chunk in iter(lambda: stream.read(_CHUNK), b""):  # type: ignore[attr-defined]
            h.update(chunk)
    return h.hexdigest()


def _intact(path: Path, f: RemoteFile) -> str | None:
    """None when ``path`` holds the file, else why not."""
    try:
        got = _digest_of(path, f)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        return f"unreadable ({e})"
    if got != f.digest:
        return f"{f.algorithm} {got}, expected {f.digest}"
    return None


def _download(url: str, dest_dir: Path, f: RemoteFile, timeout: float) -> Path:
    """``url`` into a temporary file of ``dest_dir``; verified; returns the temporary path."""
    fd, tmp = tempfile.mkstemp(prefix=f".{f.name}.", suffix=".tmp", dir=dest_dir)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out, _CHUNK)
            out.flush()
            os.fsync(out.fileno())
        bad = _intact(Path(tmp), f)
        if bad is not None:
            raise DownloadError(f"checksum mismatch: {bad}")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def _fetch_file(f: RemoteFile, dest_dir: Path, mirrors: tuple[str, ...],
                timeout: float, say: Callable[[str], None]) -> Path:
    target = dest_dir / f.name
    if target.is_file():
        why = _intact(target, f)
        if why is None:
            say(f"{target}: present, checksum ok")
            return target
        say(f"{target}: present but damaged ({why}); downloading it again")
    reasons = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + f.name
        try:
            tmp = _download(url, dest_dir, f, timeout)
        except (OSError, urllib.error.URLError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            reasons.append(f"{url}: {reason}")
            say(f"{url}: failed ({reason})")
            continue
        os.replace(tmp, target)
        say(f"{target}: downloaded from {base}, checksum ok")
        return target
    raise DownloadError(f"could not fetch {f.name} intact: " + "; ".join(reasons))


def _safe_extract(archive: Path, root: Path, folder: str) -> Path:
    """Extract ``archive`` (whose members all lie in ``folder``) to root/folder atomically."""
    final = root / folder
    work = Path(tempfile.mkdtemp(prefix=f".{folder}.", suffix=".tmp", dir=root))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                parts = Path(m.name).parts
                if (not parts or parts[0] != folder or ".." in parts or m.name.startswith("/")
                        or not (m.isfile() or m.isdir())):
                    raise DownloadError(f"{archive}: unexpected member {m.name!r}; not "
                                        "extracted")
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(work, members=members, **kwargs)  # members checked above
        if final.exists():
            shutil.rmtree(final)
        os.replace(work / folder, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def get(name: str, root: str | Path, *, mirrors: list[str] | tuple[str, ...] | None = None,
        timeout: float = 60.0, say: Callable[[str], None] = print,
        sources: dict[str, Source] | None = None) -> Path:
    """Fetch the data set ``name`` (a key of :data:`SOURCES`) into ``root``; returns the
    folder that ``adabatch train --data-dir`` should be given (``root``).

    ``mirrors`` replaces the canonical mirrors (base URLs the file names are appended to);
    ``sources`` replaces the table :data:`SOURCES` (tests use it for small files of their own).
    Raises :class:`DownloadError` naming the file and every mirror's reason when a file cannot
    be fetched intact, ValueError for an unknown name.
    """
    table = SOURCES if sources is None else sources
    source = table.get(name)
    if source is None:
        raise ValueError(f"Invalid data set: {name!r} (must be one of "
                         f"{', '.join(sorted(table))})")
    root = Path(root)
    dest_dir = root / source.folder if source.folder else root
    dest_dir.mkdir(parents=True, exist_ok=True)
    bases = tuple(mirrors) if mirrors else source.mirrors
    paths = [_fetch_file(f, dest_dir, bases, timeout, say) for f in source.files]
    if source.archive_folder:
        folder = _safe_extract(paths[0], root, source.archive_folder)
        say(f"{folder}: extracted")
    return root
