"""`adabatch data get` against a real HTTP server on 127.0.0.1 serving good and corrupt files."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from adabatch.train import download as dl
from adabatch.train.data import load_dataset

SHARED_MNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"


class _Server:
    """A threaded HTTP server on 127.0.0.1 serving a folder; counts the requests per path."""

    def __init__(self, folder: Path) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(folder), **kw)

            def do_GET(self):
                outer.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _idx(images: np.ndarray, labels: np.ndarray) -> tuple[bytes, bytes]:
    n, r, c = images.shape
    head = np.array([2051, n, r, c], dtype=">i4").tobytes()
    return head + images.tobytes(), np.array([2049, n], dtype=">i4").tobytes() + labels.tobytes()


def _small_mnist(folder: Path) -> tuple[dl.Source, dict[str, np.ndarray]]:
    """Four small gzipped IDX files in ``folder`` and a Source whose checksums are theirs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files, labels = [], {}
    for prefix, n in (("train", 6), ("t10k", 4)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        lbls = rng.integers(0, 10, size=n, dtype=np.uint8)
        labels[prefix] = lbls
        for kind, payload in zip(("images-idx3", "labels-idx1"), _idx(imgs, lbls)):
            name = f"{prefix}-{kind}-ubyte.gz"
            (folder / name).write_bytes(gzip.compress(payload))
            files.append(dl.RemoteFile(name, hashlib.sha256(payload).hexdigest(), "sha256",
                                       gunzipped=True))
    return dl.Source(mirrors=("http://unused/",), files=tuple(files), folder="MNIST/raw"), labels


def test_download_verify_and_load(tmp_path) -> None:
    source, labels = _small_mnist(tmp_path / "site")
    lines: list[str] = []
    with _Server(tmp_path / "site") as server:
        root = dl.get("mnist", tmp_path / "data", mirrors=[server.url], say=lines.append,
                      sources={"mnist": source})
        assert len(server.requests) == 4
        # intact files are not fetched again
        dl.get("mnist", root, mirrors=[server.url], say=lines.append, sources={"mnist": source})
        assert len(server.requests) == 4
    bundle = load_dataset("mnist", root)
    assert bundle.y_train.tolist() == labels["train"].tolist()
    assert bundle.y_test.tolist() == labels["t10k"].tolist()
    assert sum("checksum ok" in line for line in lines) == 8
    assert not list((root / "MNIST" / "raw").glob(".*.tmp"))


def test_corrupt_file_is_refused_and_nothing_is_left(tmp_path) -> None:
    source, _ = _small_mnist(tmp_path / "site")
    bad = tmp_path / "site" / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 8))  # valid gzip, wrong data
    with _Server(tmp_path / "site") as server:
        with pytest.raises(dl.DownloadError, match=r"could not fetch t10k-labels-idx1-ubyte.gz "
                                                   r"intact: .*checksum mismatch: sha256 "):
            dl.get("mnist", tmp_path / "data", mirrors=[server.url], say=lambda s: None,
                   sources={"mnist": source})
    raw = tmp_path / "data" / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == [
        "t10k-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz"]  # the good ones stay, the bad one never got its name


def test_next_mirror_after_404_and_damaged_local_file_is_replaced(tmp_path) -> None:
    source, _ = _small_mnist(tmp_path / "site" / "good")
    (tmp_path / "site" / "empty").mkdir()
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(b"truncated")
    lines: list[str] = []
    with _Server(tmp_path / "site") as server:
        dl.get("mnist", tmp_path / "data", mirrors=[server.url + "empty/", server.url + "good/"],
               say=lines.append, sources={"mnist": source})
    assert any("404" in line for line in lines)
    assert any("present but damaged" in line for line in lines)
    for f in source.files:
        assert dl._intact(raw / f.name, f) is None


def test_unreachable_mirror_names_the_reason(tmp_path) -> None:
    source, _ = _small_mnist(tmp_path / "site")
    with _Server(tmp_path / "site") as server:
        url = server.url
    with pytest.raises(dl.DownloadError, match=r"127\.0\.0\.1.*(refused|Connection)"):
        dl.get("mnist", tmp_path / "data", mirrors=[url], say=lambda s: None, timeout=5,
               sources={"mnist": source})
    with pytest.raises(ValueError, match="Invalid data set: 'svhn'"):
        dl.get("svhn", tmp_path)


def _cifar_archive(path: Path, extra: str | None = None) -> None:
    rng = np.random.default_rng(1)
    with tarfile.open(path, "w:gz") as tar:
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for name in names:
            obj = {b"labels": rng.integers(0, 10, 2).tolist(),
                   b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8)}
            payload = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        if extra is not None:
            info = tarfile.TarInfo(extra)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))


def _cifar_source(archive: Path) -> dl.Source:
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    return dl.Source(mirrors=("http://unused/",), files=(dl.RemoteFile(archive.name, md5),),
                     folder="", archive_folder="cifar-10-batches-py")


def test_cifar_archive_is_extracted_and_loads(tmp_path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    _cifar_archive(site / "cifar-10-python.tar.gz")
    source = _cifar_source(site / "cifar-10-python.tar.gz")
    with _Server(site) as server:
        root = dl.get("cifar10", tmp_path / "data", mirrors=[server.url], say=lambda s: None,
                      sources={"cifar10": source})
    bundle = load_dataset("cifar10", root)
    assert len(bundle.x_train) == 10 and len(bundle.x_test) == 2
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]


def test_cifar_archive_escaping_its_folder_is_refused(tmp_path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    _cifar_archive(site / "cifar-10-python.tar.gz", extra="../evil.txt")
    source = _cifar_source(site / "cifar-10-python.tar.gz")
    with _Server(site) as server, pytest.raises(dl.DownloadError, match="unexpected member"):
        dl.get("cifar10", tmp_path / "data", mirrors=[server.url], say=lambda s: None,
               sources={"cifar10": source})
    assert not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "data" / "cifar-10-batches-py").exists()


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="the real MNIST files of shared/ "
                    "(present in the team's checkout and in CI) are not beside this clone")
def test_real_mnist_with_the_canonical_checksums(tmp_path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    for f in dl.SOURCES["mnist"].files:  # the shared files use the '.idx' spelling
        shared = SHARED_MNIST / f.name.replace("-idx", ".idx")
        (site / f.name).write_bytes(shared.read_bytes())
    with _Server(site) as server:
        root = dl.get("mnist", tmp_path / "data", mirrors=[server.url], say=lambda s: None)
    bundle = load_dataset("mnist", root)
    assert bundle.y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert bundle.y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert len(bundle.x_train) == 60000 and len(bundle.x_test) == 10000


def test_cli_data_get(tmp_path, capsys) -> None:
    from adabatch.cli import main

    site = tmp_path / "site"
    site.mkdir()
    _cifar_archive(site / "cifar-10-python.tar.gz")
    with _Server(site) as server:
        # the canonical checksum does not match this small archive: refused, exit 3
        assert main(["data", "get", "cifar10", "--dir", str(tmp_path / "d"), "--mirror",
                     server.url]) == 3
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("adabatch: error: could not fetch cifar-10-python.tar.gz "
                                  "intact") and "checksum mismatch: md5" in err[-1]
    assert not (tmp_path / "d" / "cifar-10-batches-py").exists()
    assert not [p for p in (tmp_path / "d").iterdir()]  # nothing under a final name
    assert main(["data", "get", "svhn"]) == 2
