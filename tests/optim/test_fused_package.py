"""The fused package's structure: every module imports on its own, and the module-level imports
between adabatch's optimizer modules form no cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import adabatch.optim

OPTIM = Path(adabatch.optim.__file__).resolve().parent
MODULES = [
    "adabatch.optim.fused",
    "adabatch.optim.fused.common",
    "adabatch.optim.fused.cpu",
    "adabatch.optim.fused.cuda",
    "adabatch.optim.adabelief",
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(OPTIM.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> set[str]:
    """The adabatch.optim modules that ``path`` imports at module level (not inside a
    function, where an import runs on first use and cannot form a cycle at import time)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n.startswith("adabatch.optim."))
    return found


def test_no_import_cycle_in_optim() -> None:
    modules = {_module_name(p): p for p in OPTIM.rglob("*.py")}
    graph = {
        name: {m for m in _top_level_imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }
    # the kernel modules share only common (never each other, never the package's own
    # names); the package imports the CUDA module (and Triton) only when asked
    assert graph["adabatch.optim.fused.common"] == set()
    assert graph["adabatch.optim.fused.cpu"] == {"adabatch.optim.fused.common"}
    assert graph["adabatch.optim.fused.cuda"] == {"adabatch.optim.fused.common"}
    assert "adabatch.optim.fused.cuda" not in graph["adabatch.optim.fused"]
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path, name, dep]))
            if dep not in state:
                visit(dep, [*path, name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone(module: str) -> None:
    """In a fresh interpreter, so that nothing imported earlier hides a cycle."""
    out = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]


def test_cpu_kernel_source_is_package_data() -> None:
    """The C++ source sits beside the CPU module and pyproject ships it."""
    from adabatch.optim.fused import cpu

    assert cpu._SOURCE.is_file()
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if pyproject.is_file():
        assert '"optim/fused/csrc/*.cpp"' in pyproject.read_text()
