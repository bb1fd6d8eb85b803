"""The shape rules of the code base (issue #15): short functions, one validation rule.

Complexity (ruff's C901, at most 15) is enforced by the lint step of the test command
(pyproject.toml). This test enforces what ruff cannot: no function longer than 60 lines,
except the optimizer math cores and declarative tables named in ``ALLOWED``, each with why.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60

#: (file relative to the repository root, function name): why it may be longer.
ALLOWED: dict[tuple[str, str], str] = {
    ("src/adabatch/optim/adabelief.py", "_single_tensor_adabelief"):
        "the for-loop math core: the algorithm of the class docstring, one update in order",
    ("src/adabatch/optim/adabelief.py", "_multi_tensor_adabelief"):
        "the foreach math core: the same update over tensor lists, chunked",
    ("src/adabatch/optim/adabelief.py", "_foreach_update"):
        "the foreach math core's update of one chunk",
    ("src/adabatch/optim/fused/cuda.py", "_adabelief_kernel"):
        "the Triton kernel: one fused pass, a kernel cannot call Python helpers",
}


def _functions(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_60_lines() -> None:
    too_long = []
    for folder in ("src", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for name, line, length in _functions(path):
                if length > MAX_LINES and (rel, name) not in ALLOWED:
                    too_long.append(f"{rel}:{line} {name} ({length} lines)")
    assert not too_long, "functions over 60 lines:\n" + "\n".join(too_long)


def test_the_allowlist_has_no_stale_entries() -> None:
    present = set()
    for rel in {rel for rel, _ in ALLOWED}:
        path = ROOT / rel
        assert path.is_file(), rel
        present |= {(rel, n) for n, _, length in _functions(path) if length > MAX_LINES}
    assert set(ALLOWED) == present, set(ALLOWED) - present
