"""Sharded checkpoints (adabatch.train.sharded_checkpoint) with real FSDP2 and DCP (gloo, CPU).

tests/distributed/_sharded_ckpt_worker.py trains a float64 FSDP2 MLP with Adam under torchrun:
2 processes save steps 1 and 2 (only the newest kept), read step 2 back into another model,
and are killed in the middle of step 3's save (rank 1, SIGKILL); then 1 process loads the
run. In both, the model and optimizer state equal what was saved (bitwise), the next step
equals the uninterrupted one, and the killed save is ignored; a checkpoint without its marker
or of another format version is refused with one line. (1 process saving, 2 loading: the
trainer's tests/distributed/test_fsdp_resume.py.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from adabatch.train import sharded_checkpoint as sc
from adabatch.train.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    newest_intact_checkpoint,
    remove_stale_temporaries,
)
from adabatch.train.errors import EXIT_USAGE, classify
from tests.train._runs import subprocess_env

pytestmark = pytest.mark.slow

WORKER = str(Path(__file__).with_name("_sharded_ckpt_worker.py"))
ROOT = str(Path(__file__).resolve().parents[2])


def _torchrun(nproc: int, *args: object) -> subprocess.CompletedProcess:
    env = subprocess_env()
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", str(nproc), WORKER, *map(str, args)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("sharded")
    out, two = tmp / "out", tmp / "two"
    out.mkdir()
    killed = _torchrun(2, out, f"kill1={two}")
    assert killed.returncode != 0  # rank 1 died in step 3's save
    assert (out / "two.loaded2.pt").is_file(), killed.stderr[-3000:]
    proc = _torchrun(1, out, f"load={two}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "two": two}


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _assert_same(a: dict, b: dict, tol: float = 0.0) -> None:
    """Model and optimizer state equal (bitwise when tol is 0), key for key."""
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=0, atol=tol), k
    assert a["optimizer"].keys() == b["optimizer"].keys() and a["optimizer"]
    for fqn, state in a["optimizer"].items():
        assert state.keys() == b["optimizer"][fqn].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for k, v in state.items():
            assert torch.allclose(v, b["optimizer"][fqn][k], rtol=0, atol=tol), (fqn, k)


@pytest.mark.parametrize("world", [1, 2])
def test_saved_by_two_loads_in_one_and_two(runs, world: int) -> None:
    out = runs["out"]
    loaded = _load(out / f"two.loaded{world}.pt")
    # step 2's checkpoint (2 processes: read back before step 3; 1: after step 3's save was
    # killed, so the newest complete checkpoint is still step 2's)
    assert loaded["step"] == 2 and Path(loaded["path"]).name == "step_00000002"
    assert loaded["trainer"] == {"step": 2, "samples": 32, "sampler": {"position": 2},
                                 "format_version": sc.FORMAT_VERSION, "sharded": True}
    _assert_same(loaded, _load(out / "two.saved.pt"))
    # the loaded optimizer state works: the next step is the uninterrupted run's step 3
    _assert_same(_load(out / f"two.next{world}.pt"), _load(out / "two.step3.pt"), 1e-12)


def test_rank_killed_mid_save_leaves_an_ignored_directory(runs, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["two"], run)
    ckpts = run / "checkpoints"
    partial = ckpts / "step_00000003.tmp"
    # rank 0 wrote its shard file, rank 1 died after writing its own: no metadata, no marker
    assert {p.name for p in partial.iterdir()} <= {"__0_0.distcp", "__1_0.distcp"}
    # keep=1: step 1 was deleted once step 2 was in place; step 3 never completed
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002"]
    found = newest_intact_checkpoint(run)
    assert found is not None and found[0].name == "step_00000002" and found[2] == []
    marker = json.loads((found[0] / sc.MARKER).read_text())
    assert (marker["format"], marker["format_version"], marker["step"],
            marker["world_size"]) == (sc.FORMAT, sc.FORMAT_VERSION, 2, 2)
    # the next start (which owns the run directory) deletes the partial directory
    assert remove_stale_temporaries(run) == [partial]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002"]


def test_directory_without_marker_is_skipped(runs, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["two"], run)
    newest = run / "checkpoints" / "step_00000004"
    shutil.copytree(run / "checkpoints" / "step_00000002", newest)
    (newest / sc.MARKER).unlink()
    path, state, skipped = newest_intact_checkpoint(run)
    assert path.name == "step_00000002" and state["step"] == 2
    assert [(p.name, "incomplete" in why) for p, why in skipped] == [("step_00000004", True)]


@pytest.mark.parametrize("change, message", [
    ({"format_version": 2}, "has sharded checkpoint format version 2; this adabatch reads "
                            "version 1"),
    ({"format": "other"}, "is not an adabatch sharded checkpoint"),
])
def test_other_format_or_version_is_refused(runs, tmp_path, change: dict,
                                            message: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["two"], run)
    for ckpt in list_checkpoints(run):
        marker = ckpt / sc.MARKER
        marker.write_text(json.dumps({**json.loads(marker.read_text()), **change}))
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(run / "checkpoints" / "step_00000002")
    code, line = classify(info.value)
    assert code == EXIT_USAGE and "\n" not in line
    with pytest.raises(CheckpointError, match=r"no checkpoint of .* can be read"):
        newest_intact_checkpoint(run)
    with pytest.raises(CheckpointError, match=message):  # before any collective
        sc.load_sharded(run / "checkpoints" / "step_00000002", torch.nn.Linear(1, 1),
                        torch.optim.SGD(torch.nn.Linear(1, 1).parameters()))


def test_interrupted_rename_is_completed_on_the_next_start(tmp_path) -> None:
    """Killed inside the rename of a second save of one step (the old one set aside as
    .replaced, the new one complete in .tmp): the new one goes into place, the old one
    away; a .replaced alone goes back."""
    ckpts = tmp_path / "checkpoints"
    new, old = ckpts / "step_00000005.tmp", ckpts / "step_00000005.replaced"
    alone = ckpts / "step_00000007.replaced"
    for d, tag in ((new, "new"), (old, "old"), (alone, "alone")):
        d.mkdir(parents=True)
        (d / sc.MARKER).write_text(tag)
    assert sc.remove_stale_directories(tmp_path) == [old]
    assert (ckpts / "step_00000005" / sc.MARKER).read_text() == "new"
    assert (ckpts / "step_00000007" / sc.MARKER).read_text() == "alone"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000005", "step_00000007"]


class _WithUnused(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_a_parameter_without_optimizer_state_stays_without(tmp_path) -> None:
    """A trainable parameter that never had a gradient has no Adam state in the saved run;
    the load target (which initialises state for every trainable parameter) drops it, so the
    checkpoint loads and the next step is the uninterrupted run's, bitwise (one process, a
    1-rank group)."""
    from torch.distributed.fsdp import fully_shard

    def make(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = _WithUnused()
        fully_shard(model.used)
        fully_shard(model)
        return model, torch.optim.Adam(model.parameters(), lr=0.1)

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer, k: int) -> None:
        opt.zero_grad()
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(k))
        model(x).square().sum().backward()
        opt.step()

    def values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.full_tensor() for k, v in model.state_dict().items()}

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model, opt = make(0)
        step(model, opt, 1)
        assert len(opt.state) == 2  # used.weight, used.bias
        path = sc.save_sharded(tmp_path, 1, model, opt, {"step": 1})
        step(model, opt, 2)
        loaded, loaded_opt = make(1)
        sc.load_sharded(path, loaded, loaded_opt)
        assert len(loaded_opt.state) == 2
        step(loaded, loaded_opt, 2)
        a, b = values(model), values(loaded)
        assert all(torch.equal(a[k], b[k]) for k in a)
    finally:
        dist.destroy_process_group()
