#!/usr/bin/env python3
"""Set up a local virtual environment and run adabatch's main job or its test suite.

    python3 dev.py train [ARGS...]   # set up .venv, then `adabatch train ARGS...`
    python3 dev.py test [ARGS...]    # set up .venv, then lint and `pytest ARGS...`

Needs only Python >= 3.10. The first run creates `.venv/`, installs torch when it is missing
(``torch==2.13.0``, a CPU build; override with ``ADABATCH_TORCH="torch==X.Y.Z"`` or any pip
requirement) and then installs this project (editable) with the extras each command needs.
Later runs reuse the environment: the project is reinstalled only when `pyproject.toml`
changes. ``ADABATCH_VENV`` chooses another environment folder.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("ADABATCH_VENV", ROOT / ".venv"))
TORCH_REQUIREMENT = os.environ.get("ADABATCH_TORCH", "torch==2.13.0")
EXTRAS = {"train": "train", "test": "test"}


def _python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _run(cmd: list[str], **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def _quiet_ok(cmd: list[str]) -> bool:
    return subprocess.run([str(c) for c in cmd], capture_output=True).returncode == 0


def setup(extra: str) -> Path:
    """Create or reuse the environment; install torch and the project only when needed."""
    py = _python()
    if not py.exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    if not _quiet_ok([py, "-c", "import torch"]):
        _run([py, "-m", "pip", "install", "--disable-pip-version-check", TORCH_REQUIREMENT])
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    stamp = VENV / f".adabatch-{extra}-{digest}"
    # the test extra contains the train extra, so a test install also serves `train`
    done = stamp.exists() or (VENV / f".adabatch-test-{digest}").exists()
    if not done or not _quiet_ok([py, "-c", "import adabatch"]):
        _run([py, "-m", "pip", "install", "--disable-pip-version-check", "-e",
              f"{ROOT}[{extra}]"])
        stamp.touch()
    return py


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in EXTRAS:
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    py = setup(EXTRAS[command])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if command == "train":
        return subprocess.run([str(py), "-m", "adabatch", "train", *rest], env=env).returncode
    lint = subprocess.run([str(py), "-m", "ruff", "check", "src", "tests", "benchmarks", "dev.py"],
                          cwd=ROOT, env=env)
    if lint.returncode != 0:
        return lint.returncode
    return subprocess.run([str(py), "-m", "pytest", "-n", "2", *rest], cwd=ROOT,
                          env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
