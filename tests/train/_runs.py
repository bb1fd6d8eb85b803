"""What the trainer tests that run ``adabatch train`` share: a subprocess environment that
imports this checkout, and a run's metrics rows without their wall times."""

from __future__ import annotations

import json
import os
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")


def subprocess_env() -> dict[str, str]:
    """This process's environment with this checkout's ``src`` first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


def metric_rows(run: Path) -> list[dict]:
    """The rows of ``run/metrics.jsonl`` without ``time`` (which differs between runs)."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("time")
    return rows
