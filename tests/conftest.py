"""Shared test configuration."""

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

# Without a GPU, the Triton kernels (the CUDA fused AdaBelief) run on CPU tensors under
# Triton's interpreter, so their logic is tested everywhere. Read when a kernel is defined,
# so it is set before anything imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite runs with pytest-xdist on 2 cores: one intra-op thread per worker.
torch.set_num_threads(int(os.environ.get("ADABATCH_TEST_THREADS", "1")))


def load_benchmark(path: Path, name: str) -> Iterator[ModuleType]:
    """A fixture body: the benchmark script ``path`` imported as module ``name`` (registered
    in ``sys.modules`` for its dataclasses and pickles while the fixture lives)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    sys.path.insert(0, str(path.parent))  # its sibling modules, as when run as a script
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(path.parent))
    yield mod
    sys.modules.pop(name, None)
