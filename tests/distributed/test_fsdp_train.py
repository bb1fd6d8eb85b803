"""``adabatch train --parallel fsdp`` (FSDP2) on CPU with gloo: 2 processes against DDP and
1 process.

The global batch sequence depends only on the seed and FSDP2 averages the gradients as DDP
does, so with the micro-batch estimator (each (rank, micro-batch) pair one unit) an FSDP2
run of 2 processes, one of 1 process (a 1-rank mesh), a DDP run of 2 processes and a plain
1-process run take the same batch-size decisions and end with the same model (float
tolerance). The digits test set has 359 samples and ``--eval-batch 179`` gives rank 0 one
batch and rank 1 two: the evaluation pads rank 0 with a dummy pass (without it the ranks'
collectives would not match and the run would time out). Also a model with tied embeddings
(``blocks`` units, the embedding and the head in the root), one with a frozen weight (the
direct-children units; measured by the per-sample estimator in passes that grow with the
batch, ``--max-micro-batch``), the byte-level transformer ``charlm`` measured by the
per-sample estimator, bfloat16 mixed precision through gloo, a divergence, and the refusals.

The torchrun launches are the cost (a few seconds each): ``--nproc 2`` once (the CLI's own
launcher), and one launch of tests/distributed/_fsdp_train_worker.py for the other
2-process runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from adabatch.cli import main
from adabatch.train.fsdp import eval_padding, shard_units
from tests.distributed import _fsdp_models
from tests.train._runs import metric_rows, subprocess_env

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:.*could not decide:RuntimeWarning")]

ROOT = Path(__file__).resolve().parents[2]
WORKER = str(Path(__file__).with_name("_fsdp_train_worker.py"))
MODELS = "tests.distributed._fsdp_models"
# batch sizes are multiples of 16 in every run (--batch-granularity): 1 process accumulates
# B/8 micro-batches of 8, 2 processes B/16 each (the same micro-batches)
FLAGS = ["--epochs", "1", "--estimator", "micro-batch", "--micro-batch", "8",
         "--batch-granularity", "16", "--initial-batch", "16", "--max-batch", "256",
         "--eta", "0.3", "--optimizer", "adam", "--lr", "3e-3", "--threads", "1",
         "--no-plots", "--checkpoint-every", "0", "--eval-every", "3", "--eval-batch", "179",
         "--dist-timeout", "60", "--quiet"]
# AdaGrad-Norm (its one accumulator: the norm over every rank's shards)
TIED = [*FLAGS, "--model", f"{MODELS}:tied", "--optimizer", "adagradnorm", "--lr", "1.0"]
# the per-sample estimator with passes that grow with the batch (up to 32 samples a rank);
# AdaBelief (fused in 1 process where its kernel builds; foreach on the DTensor shards)
FROZEN = [*FLAGS, "--model", f"{MODELS}:frozen", "--estimator", "per-sample",
          "--max-micro-batch", "32", "--optimizer", "adabelief"]
# the byte-level transformer (blocks, tied embedding) on pydoc, measured by PerSampleStats
LM = ["--dataset", "pydoc", "--data-option", "context=16", "--model", "charlm",
      "--model-option", "d_model=16", "--model-option", "layers=2", "--model-option",
      "heads=2", "--optimizer", "adamw", "--lr", "3e-3", "--steps", "6", "--micro-batch", "4",
      "--batch-granularity", "8", "--initial-batch", "8", "--max-batch", "128", "--eta",
      "0.25", "--threads", "1", "--no-plots", "--checkpoint-every", "0", "--eval-every", "2",
      "--eval-batch", "4096", "--dist-timeout", "60", "--quiet"]


def _env() -> dict[str, str]:
    env = subprocess_env()
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = env["PYTHONPATH"] + ":" + str(ROOT)  # the model factories
    return env


def _steps(run: Path) -> list[dict]:
    return [r for r in metric_rows(run) if not r.get("eval")]


def _evals(run: Path) -> list[dict]:
    return [r for r in metric_rows(run) if r.get("eval")]


def _final(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "final.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("fsdp")
    out = {name: tmp / name for name in ("one", "fsdp_one", "fsdp_two", "ddp_two", "tied_one",
                                         "tied_two", "frozen_one", "frozen_two",
                                         "bf16_two", "lm_one", "lm_two")}
    with pytest.MonkeyPatch.context() as mp:
        for k in ("WORLD_SIZE", "RANK"):
            mp.delenv(k, raising=False)
        for k, v in _env().items():
            mp.setenv(k, v)
        mp.syspath_prepend(str(ROOT))
        for name, flags in (("one", FLAGS), ("fsdp_one", [*FLAGS, "--parallel", "fsdp"]),
                            ("tied_one", TIED), ("frozen_one", FROZEN), ("lm_one", LM)):
            assert main(["train", *flags, "--out", str(out[name])]) == 0, name
        assert main(["train", "--nproc", "2", "--parallel", "fsdp", *FLAGS, "--out",
                     str(out["fsdp_two"])]) == 0
    fsdp = ["--parallel", "fsdp"]
    arg_lists = [[*FLAGS, "--out", str(out["ddp_two"])],
                 [*TIED, *fsdp, "--out", str(out["tied_two"])],
                 [*FROZEN, *fsdp, "--out", str(out["frozen_two"])],
                 [*FROZEN, *fsdp, "--precision", "bf16", "--out", str(out["bf16_two"])],
                 [*LM, *fsdp, "--out", str(out["lm_two"])]]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", WORKER, json.dumps(arg_lists)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _assert_same_run(a: Path, b: Path, *, loss_tol: float = 1e-5, model_tol: float = 1e-4,
                     evals: int = 3) -> None:
    sa, sb = _steps(a), _steps(b)
    assert [r["batch_size"] for r in sa] == [r["batch_size"] for r in sb]
    assert len({r["batch_size"] for r in sa}) > 2  # the batch size really grows
    for ra, rb in zip(sa, sb, strict=True):
        assert rb["required"] == ra["required"] and rb["passed"] == ra["passed"]
        assert rb["loss"] == pytest.approx(ra["loss"], abs=loss_tol)
    ea, eb = _evals(a), _evals(b)
    assert [e["step"] for e in ea] == [e["step"] for e in eb] and len(ea) >= evals
    for x, y in zip(ea, eb):
        assert y["test_loss"] == pytest.approx(x["test_loss"], abs=loss_tol)
        assert y["test_accuracy"] == pytest.approx(x["test_accuracy"], abs=1e-9)
    fa, fb = _final(a), _final(b)
    assert fa.keys() == fb.keys()
    for k in fa:  # full (unsharded) tensors in final.pt, also from the FSDP2 runs
        assert fa[k].shape == fb[k].shape and fa[k].dtype == fb[k].dtype, k
        assert float((fa[k] - fb[k]).abs().max()) <= model_tol, k


@pytest.mark.parametrize("run", ["fsdp_two", "fsdp_one", "ddp_two"])
def test_fsdp_takes_the_decisions_of_ddp_and_one_process(runs, run):
    _assert_same_run(runs["one"], runs[run])
    summary = json.loads((runs[run] / "summary.json").read_text())
    assert summary["world_size"] == (1 if run == "fsdp_one" else 2)
    assert summary["config"]["parallel"] == ("ddp" if run == "ddp_two" else "fsdp")
    saved = json.loads((runs[run] / "config.json").read_text())
    assert saved["parallel"] == summary["config"]["parallel"]


def test_tied_embeddings(runs):
    _assert_same_run(runs["tied_one"], runs["tied_two"])
    final = _final(runs["tied_two"])
    assert torch.equal(final["embed.weight"], final["head.weight"])


def test_language_model_with_per_sample_statistics(runs):
    """charlm: each block a unit, the tied embedding in the root; PerSampleStats under FSDP2
    (its attention and linear rules on the unsharded parameters)."""
    _assert_same_run(runs["lm_one"], runs["lm_two"], model_tol=2e-4)
    final = _final(runs["lm_two"])
    assert any(k.startswith("blocks.1.") for k in final)


def test_adagradnorm_run_of_two_processes_continues_in_one(runs, tmp_path, monkeypatch):
    """The tied run (AdaGrad-Norm: one accumulator, held in one parameter's state) resumed
    from its final sharded checkpoint by 1 process to 2 epochs ends like 1 process trained
    2 epochs without stopping."""
    import shutil

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.syspath_prepend(str(ROOT))
    run = tmp_path / "cont"
    shutil.copytree(runs["tied_two"], run)
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet", "--threads",
                 "1"]) == 0
    ref = tmp_path / "ref"
    assert main(["train", *TIED, "--epochs", "2", "--out", str(ref)]) == 0
    a, b = _steps(ref), _steps(run)
    assert [r["batch_size"] for r in a] == [r["batch_size"] for r in b]
    assert len(a) > len(_steps(runs["tied_two"]))
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-4)
    fa, fb = _final(ref), _final(run)
    assert max(float((fa[k] - fb[k]).abs().max()) for k in fa) <= 1e-4


def _initial(factory: str) -> nn.Module:
    torch.manual_seed(0)  # the trainer seeds with --seed (0) before the factory
    return getattr(_fsdp_models, factory)((1, 8, 8), 10)


@pytest.mark.parametrize("run", ["frozen_two", "bf16_two"])
def test_frozen_parameters_stay_and_the_rest_trains(runs, run):
    if run == "frozen_two":
        _assert_same_run(runs["frozen_one"], runs[run])
    final, start = _final(runs[run]), _initial("frozen").state_dict()
    assert torch.equal(final["inp.weight"], start["inp.weight"])
    assert not torch.equal(final["inp.bias"], start["inp.bias"])
    assert all(t.dtype == torch.float32 for t in final.values())


def test_bf16_mixed_precision_trains_like_float32(runs):
    """MixedPrecisionPolicy(bf16 compute, float32 reduction) through gloo: the float32 run's
    losses within bfloat16's rounding, the same first decisions."""
    a, b = _steps(runs["frozen_one"]), _steps(runs["bf16_two"])
    assert len(a) >= 3 and len(b) >= 3
    assert b[0]["batch_size"] == a[0]["batch_size"]
    for ra, rb in zip(a[:3], b[:3]):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=2e-2)
    assert b[0]["loss"] != a[0]["loss"]  # really computed in bfloat16


def test_shard_units_blocks_children_and_tied():
    assert [n for n, _ in shard_units(_fsdp_models.tied((1, 8, 8), 10))] == ["blocks.0",
                                                                              "blocks.1"]
    assert [n for n, _ in shard_units(_fsdp_models.frozen((1, 8, 8), 10))] == ["inp", "mid",
                                                                                "out"]
    emb, head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
    head.weight = emb.weight  # tied children stay in the root; the others are units
    model = nn.Sequential(emb, nn.Linear(3, 3), nn.ReLU(), head)
    assert [n for n, _ in shard_units(model)] == ["1"]


def test_eval_padding_gives_every_rank_the_same_number_of_passes():
    for n, batch, world in ((359, 179, 2), (5, 2, 4), (3, 8, 4), (1000, 7, 3)):
        sizes = [n * (r + 1) // world - n * r // world for r in range(world)]
        passes = [-(-s // batch) + eval_padding(n, batch, r, world) for r, s in
                  enumerate(sizes)]
        assert len(set(passes)) == 1 and passes[0] == max(-(-s // batch) for s in sizes)
    assert eval_padding(359, 179, 0, 2) == 1 and eval_padding(359, 179, 1, 2) == 0


@pytest.mark.parametrize("flags, message", [
    (["--optimizer", "adabelief", "--opt-option", "fused=true"],
     "--parallel fsdp: AdaBelief's fused kernels take plain tensors"),
    (["--nproc", "2", "--optimizer", "adabelief", "--opt-option", "fused=true"],
     "--parallel fsdp: AdaBelief's fused kernels take plain tensors"),  # before launching
    (["--estimator", "micro-batch", "--optimizer", "sgd", "--batch-test", "coord",
      "--coord-reduce", "quantile", "--coord-q", "0.9"],
     "--parallel fsdp: --coord-reduce quantile would gather"),
    (["--estimator", "micro-batch", "--optimizer", "sgd", "--micro-batch", "8", "--compile"],
     "--parallel fsdp: --compile is not supported with FSDP2"),
])
def test_refusals_are_one_line_with_exit_code_2(flags, message, tmp_path, capsys):
    assert main(["train", "--parallel", "fsdp", *flags, "--steps", "1", "--out",
                 str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adabatch: error: " + message) and "\n" not in err
    assert not (tmp_path / "r").exists()


def test_divergence_stops_a_sharded_run(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", "--parallel", "fsdp", "--estimator", "micro-batch", "--optimizer",
                 "sgd", "--lr", "1e4", "--steps", "20", "--threads", "1", "--quiet",
                 "--no-plots", "--out", str(tmp_path / "r")]) == 5
    assert "diverged: the loss is" in capsys.readouterr().err


def test_unknown_parallel_is_a_usage_error(capsys):
    assert main(["train", "--parallel", "tp"]) == 2
    assert "--parallel: invalid choice: 'tp'" in capsys.readouterr().err


def test_resume_refuses_another_parallel(runs, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["one"], run)
    assert main(["train", "--resume", str(run), "--parallel", "fsdp", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "parallel='ddp', this run has parallel='fsdp'" in err
