"""The distributions: ``python -m build`` gives an sdist and a wheel (built from the sdist)
that install into a fresh virtual environment and work there, away from the source tree.

The fresh environment gets the wheel with ``--no-deps --no-index`` (no network) and sees the
test environment's site-packages through a ``.pth`` line (so torch is not installed again);
that line does not process the ``.pth`` files there, so an editable install of this
checkout stays invisible, and the test checks that ``adabatch`` comes from the wheel.
Whether the extras resolve next to torch needs the network: a manual check, in the README's
Development section.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CPP = "adabatch/optim/fused/csrc/adabelief_fused.cpp"

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"$ {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _source_copy(dest: Path) -> Path:
    """What the sdist is built from (a copy: building writes egg-info and build/ folders)."""
    dest.mkdir()
    shutil.copytree(ROOT / "src", dest / "src", ignore=shutil.ignore_patterns(
        "__pycache__", "*.pyc", "*.egg-info", "*.so"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("build", reason="the `test` extra installs `build`")
    tmp = tmp_path_factory.mktemp("dists")
    src = _source_copy(tmp / "src")
    # sdist first, then the wheel from the unpacked sdist (what `python -m build` does):
    # a file missing from the sdist is missing from the wheel too. No isolation and no
    # dependency check: the build backend is this environment's setuptools (no network).
    _run([sys.executable, "-m", "build", "--no-isolation", "--skip-dependency-check",
          "--outdir", str(tmp / "dist"), str(src)], cwd=tmp)
    (sdist,) = (tmp / "dist").glob("adabatch-*.tar.gz")
    (wheel,) = (tmp / "dist").glob("adabatch-*.whl")
    return {"sdist": sdist, "wheel": wheel, "src": src, "tmp": tmp}


def test_sdist_holds_the_sources_readme_pyproject_and_cpp(dists):
    with tarfile.open(dists["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for name in ("README.md", "pyproject.toml", "PKG-INFO", "src/adabatch/__init__.py",
                 "src/adabatch/cli.py", f"src/{CPP}"):
        assert name in names, name
    modules = {p.relative_to(dists["src"]).as_posix()
               for p in (dists["src"] / "src").rglob("*.py")}
    assert modules <= names, sorted(modules - names)


def test_wheel_holds_every_module_the_cpp_source_and_the_metadata(dists):
    with zipfile.ZipFile(dists["wheel"]) as whl:
        names = set(whl.namelist())
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = whl.read(meta).decode()
        (entry,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points = whl.read(entry).decode()
    modules = {p.relative_to(dists["src"] / "src").as_posix()
               for p in (dists["src"] / "src" / "adabatch").rglob("*.py")}
    assert modules <= names, sorted(modules - names)  # e.g. a package without __init__.py
    assert CPP in names
    assert "adabatch = adabatch.cli:main" in entry_points
    assert "Requires-Dist: torch>=2.4" in metadata
    for extra in ("lightning", "accelerate", "hf", "train", "test"):
        assert f"Provides-Extra: {extra}" in metadata, extra


def _fresh_venv(tmp: Path, wheel: Path) -> Path:
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
          "--no-index", "--no-compile", "--disable-pip-version-check", "-q", str(wheel)],
         cwd=tmp, timeout=180)
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                   cwd=tmp).stdout.strip()
    # the dependencies (torch, numpy, the `train` extra) from this environment, not copied
    parent = Path(torch.__file__).resolve().parents[1]
    Path(purelib, "_adabatch_test_parent_env.pth").write_text(f"{parent}\n")
    return venv


_PROBE = """
import json, sys
import adabatch, torch
from adabatch.optim.fused import cpu
print(json.dumps({"adabatch": adabatch.__file__, "torch": torch.__file__,
                  "source": str(cpu._SOURCE), "exists": cpu._SOURCE.is_file(),
                  "kernel": str(cpu.kernel_path()), "path": sys.path}))
"""

_FUSED_STEP = """
import torch
from adabatch.optim import AdaBelief
from adabatch.optim.fused import cpu
p = torch.nn.Parameter(torch.ones(1000))
opt = AdaBelief([p], lr=0.1, fused=True)
p.grad = torch.full_like(p, 0.5)
opt.step()
assert cpu.is_built() and bool((p < 1).all()), "the fused step did not run"
print(cpu.kernel_path())
"""


def test_wheel_installs_and_runs_outside_the_source_tree(dists, tmp_path):
    venv = _fresh_venv(tmp_path, dists["wheel"])
    python, outside = venv / "bin" / "python", tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "extensions")  # a cold kernel cache
    found = json.loads(_run([str(python), "-c", _PROBE], cwd=outside, env=env).stdout)
    site = str(venv.resolve())
    assert Path(found["adabatch"]).resolve().as_posix().startswith(site), found["adabatch"]
    assert not any(str(ROOT / "src") == p for p in found["path"])
    # the C++ source of the fused AdaBelief kernel is found inside the installed package
    assert found["exists"] and Path(found["source"]).resolve().as_posix().startswith(site)
    assert found["kernel"].startswith(str(tmp_path / "extensions"))
    if any(shutil.which(c) for c in (os.environ.get("CXX") or "c++", "g++", "clang++")):
        # built from the installed source into the cold cache, then loaded and stepped
        built = _run([str(python), "-c", _FUSED_STEP], cwd=outside, env=env).stdout.strip()
        assert Path(built).is_file()
    # the console script of the installed package runs the trainer
    out = tmp_path / "run"
    _run([str(venv / "bin" / "adabatch"), "train", "--steps", "2", "--quiet", "--no-plots",
          "--threads", "1", "--out", str(out)], cwd=outside, env=env, timeout=180)
    assert any(out.iterdir())
