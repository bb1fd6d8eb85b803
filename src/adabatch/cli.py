"""The ``adabatch`` command: ``train``, ``plot`` and ``compare``.

``adabatch train`` with no arguments runs the embedded default (AdAdaGradNorm: AdaGrad-Norm +
the norm test on scikit-learn's digits with a small MLP). Every flag has the same key in a
TOML/YAML file given with ``--config``; flags override the file. ``KEY=VALUE`` options take
the type their optimizer, dataset or model declares (booleans: true/false/yes/no/1/0; see
:mod:`adabatch.train.options`). Invalid values exit with code 2 and one line on stderr; an
interrupted run (SIGINT/SIGTERM) writes a checkpoint and exits with 128 + the signal number;
``--resume RUN`` continues it.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed: Any = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip().replace("-", "_"), parsed


_S = argparse.SUPPRESS


def _flags_data_model(p: argparse.ArgumentParser, d: Any) -> None:
    """--config, --preset, the data set and the model."""
    from adabatch.train.config import PRESETS
    from adabatch.train.data import list_datasets
    from adabatch.train.models import list_models

    g = p.add_argument_group("configuration")
    g.add_argument("--config", metavar="FILE", default=_S,
                   help="TOML or YAML file with the same keys as the flags (flags win)")
    g.add_argument("--preset", choices=sorted(PRESETS), default=_S,
                   help="adadagrad = adagrad + coord test; adadagradnorm = adagradnorm + "
                        "norm test")
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", default=_S, metavar="NAME",
                   help=f"{', '.join(list_datasets())} (default {d.dataset}), or your own "
                        "package.module:factory, a callable factory(data_dir: Path | None, "
                        "seed: int, **data_options) -> adabatch.train.data.DatasetBundle")
    g.add_argument("--data-dir", metavar="DIR", default=_S,
                   help="directory with the files of mnist, fashion-mnist, cifar10, cifar100")
    g.add_argument("--data-option", dest="data_options", type=_key_value, action="append",
                   metavar="KEY=VALUE", default=_S,
                   help="dataset option, e.g. kind=least-squares for synthetic (repeatable)")
    g.add_argument("--model", default=_S, metavar="NAME",
                   help=f"{', '.join(list_models())} (default {d.model}), or your own "
                        "package.module:factory, a callable factory(input_shape: tuple[int, "
                        "...], num_classes: int, **model_options) -> torch.nn.Module")
    g.add_argument("--norm", default=_S, help="normalisation layers: group (default) or batch")
    g.add_argument("--model-option", dest="model_options", type=_key_value, action="append",
                   metavar="KEY=VALUE", default=_S, help="model option (repeatable)")


def _flags_optimizer(p: argparse.ArgumentParser, d: Any) -> None:
    """The optimizer and its hyperparameters."""
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", default=_S,
                   help=f"name from the optimizer registry (default {d.optimizer})")
    g.add_argument("--lr", type=float, default=_S,
                   help=f"learning rate (default {d.lr} for {d.optimizer}, else the "
                        "registry's default)")
    g.add_argument("--betas", type=float, nargs=2, metavar=("B1", "B2"), default=_S)
    g.add_argument("--eps", type=float, default=_S)
    g.add_argument("--weight-decay", type=float, default=_S)
    g.add_argument("--b0", type=float, default=_S, help="initial accumulator of AdaGrad(-Norm)")
    g.add_argument("--momentum", type=float, default=_S)
    g.add_argument("--opt-option", dest="optimizer_options", type=_key_value, action="append",
                   metavar="KEY=VALUE", default=_S,
                   help="any other optimizer hyperparameter (repeatable)")


def _flags_batch_size(p: argparse.ArgumentParser, d: Any) -> None:
    """The batch-size policy."""
    from adabatch.train.config import (
        BATCH_SCHEDULES,
        BATCH_TESTS,
        COORD_REDUCES,
        ESTIMATORS,
        LR_SCALINGS,
    )

    g = p.add_argument_group("batch size")
    g.add_argument("--batch-test", choices=BATCH_TESTS, default=_S,
                   help=f"adaptive batch test (default {d.batch_test}); none = fixed schedule; "
                        "beyond the paper: critical (kappa x noise scale), goodput")
    g.add_argument("--eta", type=float, default=_S,
                   help=f"norm / coordinate test (default {d.eta})")
    g.add_argument("--theta", type=float, default=_S,
                   help=f"inner-product test (default {d.theta})")
    g.add_argument("--nu", type=float, default=_S,
                   help=f"orthogonality part of aip (default {d.nu})")
    g.add_argument("--kappa", type=float, default=_S,
                   help=f"critical / goodput: b = kappa x noise scale (default {d.kappa})")
    g.add_argument("--coord-reduce", choices=COORD_REDUCES, default=_S,
                   help="coordinate test reduction: max (the paper), or beyond the paper: "
                        "mean, quantile (with --coord-q)")
    g.add_argument("--coord-q", type=float, default=_S)
    g.add_argument("--batch-schedule", choices=BATCH_SCHEDULES, default=_S,
                   help="fixed baseline schedule (with --batch-test none)")
    g.add_argument("--ramp-increment", type=int, default=_S,
                   help="linear schedule: + this many samples every --test-interval steps")
    g.add_argument("--stage-samples", type=int, default=_S,
                   help="stagewise schedule: samples per stage (default: equal shares)")
    g.add_argument("--stage-factor", type=float, default=_S,
                   help=f"stagewise schedule: batch growth per stage (default {d.stage_factor})")
    g.add_argument("--initial-batch", type=int, default=_S,
                   help=f"default {d.initial_batch}")
    g.add_argument("--max-batch", type=int, default=_S, help=f"default {d.max_batch}")
    g.add_argument("--micro-batch", type=int, default=_S,
                   help="largest batch of one forward/backward; larger batches accumulate")
    g.add_argument("--max-micro-batch", type=int, default=_S,
                   help="with --micro-batch: passes grow with the batch up to this many "
                        "samples (a memory cap), accumulating beyond; the decisions stay "
                        "those of one pass")
    g.add_argument("--batch-granularity", type=int, default=_S,
                   help="batch sizes are multiples of it (default micro-batch x processes)")
    g.add_argument("--test-interval", type=int, default=_S,
                   help="run the batch test every N steps (default 1)")
    g.add_argument("--estimator", choices=ESTIMATORS, default=_S,
                   help=f"how statistics are measured (default {d.estimator})")
    g.add_argument("--lr-scaling", choices=LR_SCALINGS, default=_S,
                   help="scale the lr with the batch size growth (default none); gain "
                        "(critical/goodput): AdaScale's gain, per optimizer family")


def _flags_budget(p: argparse.ArgumentParser, d: Any) -> None:
    """The budget and the learning-rate schedule."""
    from adabatch.train.config import LR_SCHEDULES

    g = p.add_argument_group("budget (one of)")
    g.add_argument("--epochs", type=float, default=_S,
                   help=f"default {d.DEFAULT_EPOCHS:g} when no budget is given")
    g.add_argument("--samples", type=int, default=_S)
    g.add_argument("--steps", type=int, default=_S)
    g = p.add_argument_group("learning-rate schedule")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=_S)
    g.add_argument("--warmup-samples", type=int, default=_S)
    g.add_argument("--min-lr-ratio", type=float, default=_S,
                   help="cosine: final lr / base lr (default 0)")


def _flags_run(p: argparse.ArgumentParser, d: Any) -> None:
    """Evaluation, checkpoints, outputs, device and processes."""
    from adabatch.train.config import PARALLELS, PRECISIONS

    g = p.add_argument_group("run")
    g.add_argument("--eval-every", type=int, default=_S,
                   help="evaluate every N steps (0: only at the end)")
    g.add_argument("--eval-batch", type=int, default=_S)
    g.add_argument("--checkpoint-every", type=int, default=_S,
                   help=f"checkpoint every N steps (0: only at the end; default "
                        f"{d.checkpoint_every})")
    g.add_argument("--keep-checkpoints", type=int, default=_S,
                   help=f"keep the last K checkpoints (default {d.keep_checkpoints})")
    g.add_argument("--seed", type=int, default=_S)
    g.add_argument("--out", metavar="DIR", default=_S,
                   help="run directory (default runs/<time>-<dataset>-<optimizer>-<test>)")
    g.add_argument("--resume", metavar="RUN", default=_S,
                   help="continue the run in RUN from its newest intact checkpoint")
    g.add_argument("--from-step", type=int, default=_S, metavar="N",
                   help="with --resume: continue from the checkpoint of step N instead (the "
                        "newer ones are set aside); --lr may then change")
    g.add_argument("--divergence-factor", type=float, default=_S, metavar="F",
                   help=f"stop when the loss exceeds F x the mean loss of the first 10 steps "
                        f"(default {d.divergence_factor:g}; inf: only NaN/inf)")
    g.add_argument("--dist-timeout", type=float, default=_S, metavar="S",
                   help=f"seconds a process waits for the others before it reports them "
                        f"stuck (default {d.dist_timeout:g})")
    g.add_argument("--debug", action="store_true", default=_S,
                   help="print the traceback of a failure (default: one line)")
    g.add_argument("--device", default=_S, help="auto (cuda when available), cpu, cuda[:N]")
    g.add_argument("--threads", type=int, default=_S, help="torch intra-op threads")
    g.add_argument("--precision", choices=PRECISIONS, default=_S,
                   help="32 or bf16 (torch.autocast)")
    g.add_argument("--compile", action="store_const", const=True, default=_S,
                   help="torch.compile the training forward: one graph while the batch grows, "
                        "since every micro-batch has one shape (--micro-batch) and "
                        "--estimator micro-batch reads gradients in hooks outside the graph; "
                        "refused with --estimator per-sample (its layer hooks split the graph)")
    g.add_argument("--compile-backend", default=_S, metavar="NAME",
                   help=f"torch.compile backend (default {d.compile_backend}; aot_eager or "
                        "eager compile faster)")
    g.add_argument("--quiet", action="store_const", const=True, default=_S)
    g.add_argument("--tensorboard", action="store_const", const=True, default=_S,
                   help="also log to RUN/tensorboard (needs tensorboard)")
    g.add_argument("--no-plots", dest="plots", action="store_const", const=False, default=_S,
                   help="do not write RUN/plots at the end")
    g = p.add_argument_group("processes (data parallel on this machine; see also torchrun)")
    g.add_argument("--parallel", choices=PARALLELS, default=_S,
                   help=f"ddp: every process holds the whole model (default {d.parallel}); "
                        "fsdp: FSDP2 shards parameters, gradients and optimizer state over "
                        "the processes (docs/fsdp.md)")
    g.add_argument("--nproc", type=int, default=_S, metavar="N",
                   help="run N processes with torchrun (python -m torch.distributed.run "
                        "--standalone --nproc-per-node N -m adabatch train ...)")
    g.add_argument("--max-restarts", type=int, default=_S, metavar="K",
                   help="with --nproc: restart the group up to K times after a failure; it "
                        "resumes from the newest checkpoint in --out")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    from adabatch.train.config import TrainConfig

    d = TrainConfig()
    for add in (_flags_data_model, _flags_optimizer, _flags_batch_size, _flags_budget,
                _flags_run):
        add(p, d)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="adabatch",
                     description="Adaptive optimizers and adaptive batch sizes for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    train = sub.add_parser("train", help="train a model (no arguments: the embedded default)",
                           description="Train with an adaptive batch size. With no arguments: "
                                       "AdAdaGradNorm on digits with an MLP.")
    _add_train_flags(train)
    plot = sub.add_parser("plot", help="PNG figures overlaying runs")
    plot.add_argument("runs", nargs="+", metavar="RUN")
    plot.add_argument("--out", metavar="DIR", default="plots")
    compare = sub.add_parser("compare", help="a markdown table of the runs' summaries")
    compare.add_argument("runs", nargs="+", metavar="RUN")
    data = sub.add_parser("data", help="fetch a standard data set (adabatch data get NAME)")
    data_sub = data.add_subparsers(dest="data_command", metavar="get")
    get = data_sub.add_parser("get", help="download and verify MNIST, Fashion-MNIST or CIFAR")
    get.add_argument("name", choices=("mnist", "fashion-mnist", "cifar10", "cifar100"))
    get.add_argument("--dir", default="data", metavar="DIR",
                     help="where to put it; then train with --data-dir DIR (default: data)")
    get.add_argument("--mirror", action="append", metavar="URL",
                     help="a base URL to fetch from instead of the canonical mirrors "
                          "(repeatable, tried in order)")
    get.add_argument("--timeout", type=float, default=60.0, metavar="S")
    # listed for --help; its arguments are parsed by adabatch.reproduce.main
    sub.add_parser("reproduce", help="reproduce the papers' claims (adabatch reproduce --help)",
                   add_help=False)
    return parser


def _err(message: str, code: int = 2) -> int:
    print(f"adabatch: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def _train_config(flags: dict[str, Any]) -> Any:
    from adabatch.train.config import ConfigError, TrainConfig, apply_layer, build_config

    for key in ("data_options", "model_options", "optimizer_options"):
        if key in flags:
            flags[key] = dict(flags[key])
    file = flags.pop("config", None)
    resume = flags.get("resume")
    if resume is None:
        return build_config(flags, file)
    if flags.get("out") is not None and Path(flags["out"]) != Path(resume):
        raise ConfigError(f"--out {flags['out']} with --resume {resume}: a resumed run stays "
                          f"in its own directory (leave --out out)")
    cfg = TrainConfig.from_dict(_saved_config(Path(resume)))
    if file is not None:
        from adabatch.train.config import load_config_file

        apply_layer(cfg, load_config_file(file), source=str(file))
    apply_layer(cfg, flags, source="flags")
    return cfg


def _saved_config(run: Path) -> dict[str, Any]:
    """The configuration of the run in ``run``: its config.json, or, when that is missing or
    damaged (a crash or a full disk while it was written), the configuration that the newest
    intact checkpoint holds (said on stderr in one line)."""
    from adabatch.train.checkpoint import CheckpointError, newest_intact_checkpoint
    from adabatch.train.config import ConfigError

    saved = run / "config.json"
    problem = "no config.json"
    if saved.is_file():
        try:
            data = json.loads(saved.read_text())
            if isinstance(data, dict):
                return data
            problem = f"{saved} is not a JSON object"
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            problem = f"{saved} is damaged ({' '.join(str(e).split())})"
    try:
        found = newest_intact_checkpoint(run)
    except CheckpointError:
        found = None
    if found is None or not isinstance(found[1].get("config"), dict):
        raise ConfigError(f"--resume {run}: not a run directory ({problem})")
    print(f"adabatch: {problem}; using the configuration saved in {found[0].name}",
          file=sys.stderr)
    return dict(found[1]["config"])


_LAUNCH_FLAGS = ("--nproc", "--max-restarts")


def _strip_launch_flags(argv: list[str]) -> list[str]:
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
            continue
        if tok in _LAUNCH_FLAGS:
            skip = True
            continue
        if tok.split("=", 1)[0] in _LAUNCH_FLAGS:
            continue
        out.append(tok)
    return out


def _launch_problem(flags: dict[str, Any], nproc: int | None,
                    max_restarts: int | None) -> str | None:
    """What is wrong with --nproc / --max-restarts (None: nothing)."""
    if nproc is not None and nproc < 1:
        return f"--nproc must be >= 1, got {nproc}"
    if max_restarts is not None and max_restarts < 0:
        return f"--max-restarts must be >= 0, got {max_restarts}"
    if max_restarts is not None and nproc is None:
        return "--max-restarts goes with --nproc (under torchrun, give it to torchrun)"
    if max_restarts and "out" not in flags and "resume" not in flags:
        return "--max-restarts needs --out DIR: the restarted processes resume from it"
    return None


def _launch(flags: dict[str, Any], nproc: int, max_restarts: int | None,
            argv: list[str] | None) -> int:
    """Run ``adabatch train`` in ``nproc`` processes under torchrun."""
    from adabatch.train.checkpoint import CheckpointError
    from adabatch.train.config import ConfigError
    from adabatch.train.distributed import env_world_size, launch
    from adabatch.train.loop import preflight

    if env_world_size() > 1:
        return _err("--nproc launches torchrun; under torchrun leave it out")
    try:
        preflight(_train_config(flags), nproc)  # fail here, once, not in every process
    except (ConfigError, CheckpointError) as e:
        return _err(str(e))
    args = _strip_launch_flags(list(sys.argv[1:] if argv is None else argv))
    if args and args[0] == "train":
        args = args[1:]
    return launch(args, nproc, max_restarts=max_restarts or 0)


def _write_plots(run_dir: Path) -> tuple[list[Path], str]:
    """The run's figures, or none and why (a figure must never lose a finished run)."""
    try:
        from adabatch.train.plot import plot_runs

        return list(plot_runs([run_dir], run_dir / "plots")), ""
    except ModuleNotFoundError as e:
        return [], f"plots skipped ({e.name} is not installed)"
    except Exception as e:
        return [], f"plots skipped ({type(e).__name__}: {' '.join(str(e).split())})"


def _print_summary(s: dict[str, Any], run_dir: Path, plots: list[Path], plot_note: str) -> None:
    acc, loss = s["test_accuracy"], s["test_loss"]
    acc_text = f"test accuracy {acc:.4f}, " if acc is not None else ""
    loss_text = f"test loss {loss:.4f}" if loss is not None else "no test set"
    print(f"done: {acc_text}{loss_text}; {s['steps']} steps, "
          f"{s['samples']} samples ({s['epochs']:.2f} epochs); batch size "
          f"{s['initial_batch_size']} -> {s['final_batch_size']}; "
          f"{s['wall_time_s']:.1f} s")
    print(f"outputs: {run_dir}/ (config.json, metrics.jsonl, summary.json, final.pt, "
          "checkpoints/)")
    if plots:
        print(f"plots: {run_dir / 'plots'}/ ({', '.join(p.name for p in plots)})")
    elif plot_note:
        print(plot_note)


def _fail(e: BaseException, debug: bool) -> int:
    """Print ``e`` as one line (with the traceback first under ``--debug``); its exit code."""
    from adabatch.train.errors import classify

    if debug:
        traceback.print_exception(e)
    code, line = classify(e)
    return _err(line, code)


def _cmd_train(ns: argparse.Namespace, argv: list[str] | None = None) -> int:
    from adabatch.train.loop import train

    flags = {k: v for k, v in vars(ns).items() if k != "command"}
    debug = bool(flags.pop("debug", False))
    nproc = flags.pop("nproc", None)
    max_restarts = flags.pop("max_restarts", None)
    problem = _launch_problem(flags, nproc, max_restarts)
    if problem:
        return _err(problem)
    if nproc is not None and nproc > 1:
        return _launch(flags, nproc, max_restarts, argv)
    try:
        cfg = _train_config(flags)
        result = train(cfg)
    except KeyboardInterrupt:
        return _err("interrupted", 130)
    except Exception as e:  # every failure: one line and its exit code (train.errors)
        return _fail(e, debug)
    if result.interrupted is not None:
        return 128 + result.interrupted
    if result.rank != 0:
        return 0
    plots, plot_note = _write_plots(result.run_dir) if cfg.plots else ([], "")
    if not cfg.quiet:
        _print_summary(result.summary, result.run_dir, plots, plot_note)
    return 0


def _check_runs(runs: list[str]) -> str | None:
    for r in runs:
        if not (Path(r) / "metrics.jsonl").is_file() and not (Path(r) / "summary.json").is_file():
            return f"{r} is not a run directory (no metrics.jsonl or summary.json)"
    return None


def _cmd_plot(ns: argparse.Namespace) -> int:
    problem = _check_runs(ns.runs)
    if problem:
        return _err(problem)
    try:
        from adabatch.train.plot import plot_runs
    except ModuleNotFoundError as e:
        return _err(f"plotting needs {e.name} (pip install 'adabatch[plot]')")
    try:
        paths = plot_runs([Path(r) for r in ns.runs], Path(ns.out))
    except (ValueError, OSError) as e:
        return _err(str(e))
    for p in paths:
        print(p)
    return 0


def _cmd_compare(ns: argparse.Namespace) -> int:
    problem = _check_runs(ns.runs)
    if problem:
        return _err(problem)
    from adabatch.train.plot import compare_table

    try:
        print(compare_table([Path(r) for r in ns.runs]))
    except (ValueError, OSError) as e:
        return _err(str(e))
    return 0


def _cmd_data(ns: argparse.Namespace) -> int:
    if ns.data_command != "get":
        return _err("usage: adabatch data get {mnist,fashion-mnist,cifar10,cifar100} "
                    "[--dir DIR]")
    from adabatch.train.download import get

    try:
        root = get(ns.name, ns.dir, mirrors=ns.mirror, timeout=ns.timeout)
    except Exception as e:  # one line and its exit code (data 3, I/O 4)
        return _fail(e, debug=False)
    print(f"ready: adabatch train --dataset {ns.name} --data-dir {root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``adabatch`` command; return its exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["reproduce"]:
        from adabatch.reproduce import main as reproduce_main

        return reproduce_main(args[1:])
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2)
        return int(e.code or 0)
    if ns.command is None:
        parser.print_help()
        return 2
    if ns.command == "train":
        return _cmd_train(ns, argv)
    return {"plot": _cmd_plot, "compare": _cmd_compare, "data": _cmd_data}[ns.command](ns)


if __name__ == "__main__":
    sys.exit(main())
