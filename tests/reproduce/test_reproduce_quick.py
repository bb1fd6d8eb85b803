"""`adabatch reproduce --quick`, exactly as a user runs it (the issue asks for a test of it)."""

from __future__ import annotations

import json
import re

import pytest

from adabatch.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_reproduce_quick_through_the_cli(tmp_path):
    out = tmp_path / "quick"
    assert main(["reproduce", "--quick", "--threads", "1", "--out", str(out)]) == 0
    report = (out / "results.md").read_text()
    assert "(scale: **quick**)" in report
    assert "Sections not in this run" not in report
    for name in ("toy", "rates", "batches", "adabelief"):
        data = json.loads((out / f"{name}.json").read_text())
        assert data["wall_time_s"] > 0
        assert re.search(rf"^\| {name} \| \d+\.\d \|$", report, re.M)
    images = re.findall(r"!\[[^\]]*\]\((img/[^)]+\.png)\)", report)
    assert images
    for rel in images:
        assert (out / rel).read_bytes()[:8] == PNG_MAGIC
    # every training comparison ran every variant with a finite accuracy
    for name in ("batches", "adabelief"):
        setups = json.loads((out / f"{name}.json").read_text())["data"]["setups"]
        assert setups
        for rows in setups.values():
            for seed_runs in rows.values():
                for run in seed_runs:
                    assert 0.0 <= run["test_accuracy"] <= 1.0
