"""TrainConfig: the single source of truth for one training run.

A configuration is built in layers, later layers winning:

1. the dataclass defaults (the embedded default run: AdAdaGradNorm = AdaGrad-Norm + norm test
   on scikit-learn's digits with a small MLP),
2. a preset (``adadagrad``: AdaGrad + coordinate-wise norm test; ``adadagradnorm``: AdaGrad-Norm
   + norm test),
3. the keys of a TOML or YAML file given with ``--config`` (the same names as the flags, with
   ``-`` or ``_``),
4. the command-line flags.

The budget is one of ``epochs``, ``samples`` or ``steps``; a layer that sets one of them
replaces the budget of the layers below it, and one layer setting two of them is an error.
:func:`validate` checks values and combinations that can be checked without loading data or
building the model, and raises :class:`ConfigError` with a one-line message.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from adabatch.train.options import BOOL_FALSE, BOOL_TRUE, coerce_all, kinds_of

__all__ = [
    "BATCH_SCHEDULES",
    "BATCH_TESTS",
    "BUDGET_KEYS",
    "ESTIMATORS",
    "LR_SCHEDULES",
    "PARALLELS",
    "PRECISIONS",
    "PRESETS",
    "RESUME_MUTABLE",
    "RETIRED_KEYS",
    "ConfigError",
    "TrainConfig",
    "build_config",
    "load_config_file",
    "validate",
]

BATCH_TESTS = ("none", "norm", "ip", "aip", "coord", "critical", "goodput")
BATCH_SCHEDULES = ("constant", "linear", "stagewise")
ESTIMATORS = ("per-sample", "micro-batch")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("32", "bf16")
#: How the processes share the model: DDP replicates it, FSDP2 shards it (train/fsdp.py).
PARALLELS = ("ddp", "fsdp")
LR_SCALINGS = ("none", "linear", "sqrt", "gain")
COORD_REDUCES = ("max", "mean", "quantile")
BUDGET_KEYS = ("epochs", "samples", "steps")

#: The paper's pairings (AdAdaGrad, Lau, Liu, Kolar, arXiv 2402.11215).
PRESETS: dict[str, dict[str, Any]] = {
    "adadagrad": {"optimizer": "adagrad", "batch_test": "coord"},
    "adadagradnorm": {"optimizer": "adagradnorm", "batch_test": "norm"},
}

#: Keys a resumed run may change (they do not change the trajectory of the run that is
#: continued, only how long it runs and what it writes). Every other key must match the
#: checkpoint's configuration.
RESUME_MUTABLE = frozenset(
    {
        "epochs", "samples", "steps", "eval_every", "eval_batch", "checkpoint_every",
        "keep_checkpoints", "quiet", "device", "threads", "tensorboard", "plots",
        "data_dir", "out", "resume", "config", "from_step", "divergence_factor",
        "dist_timeout", "compile", "compile_backend",
    }
)

#: Keys of older versions that this one retired: accepted and ignored wherever a config is
#: read (a saved run's config.json, a checkpoint, a config file), so that older runs resume.
#: ``log_every`` was validated but never read (metrics are written every step).
RETIRED_KEYS = frozenset({"log_every"})


class ConfigError(ValueError):
    """An invalid configuration value or combination (the CLI prints it as one line)."""


@dataclass
class TrainConfig:
    """Everything that defines a training run. Field names are the CLI flags' names.

    ``None`` means "not set": optimizer hyperparameters then take the registry's defaults;
    ``micro_batch`` means no accumulation (each step's whole batch in one forward/backward,
    any batch size) except with the micro-batch estimator, where it becomes
    ``initial_batch // 2`` (two micro-batches in the first step); a missing budget becomes
    :attr:`DEFAULT_EPOCHS` epochs. ``batch_granularity`` None: batch sizes are multiples of
    micro-batch × number of processes (set it to keep the same batch-size decisions across
    runs with different numbers of processes).
    """

    preset: str | None = None
    # data and model
    dataset: str = "digits"
    data_dir: str | None = None
    data_options: dict[str, Any] = field(default_factory=dict)
    model: str = "mlp"
    norm: str = "group"
    model_options: dict[str, Any] = field(default_factory=dict)
    # optimizer (None: the registry's default)
    optimizer: str = "adagradnorm"
    lr: float | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None
    weight_decay: float | None = None
    b0: float | None = None
    momentum: float | None = None
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    # batch size policy
    batch_test: str = "norm"
    # η < 1: E‖ḡ‖² = ‖∇F‖² + V/b, so with η >= 1 the norm test passes on noise alone and the
    # batch grows only by chance; the AdAdaGrad paper uses 0.1 (MNIST) and 0.5 (CIFAR-10)
    eta: float = 0.5
    theta: float = 0.9
    nu: float = 5.0
    # critical / goodput (beyond the paper): b = kappa x the smoothed gradient noise scale
    kappa: float = 1.0
    coord_reduce: str = "max"
    coord_q: float | None = None
    batch_schedule: str | None = None
    ramp_increment: int | None = None
    stage_samples: int | None = None
    stage_factor: float = 2.0
    initial_batch: int = 16
    max_batch: int = 512
    micro_batch: int | None = None
    # a memory cap: a step's share runs in passes of up to this many samples (grows with b)
    max_micro_batch: int | None = None
    batch_granularity: int | None = None
    test_interval: int = 1
    estimator: str = "per-sample"
    lr_scaling: str = "none"
    # budget: exactly one of these (None everywhere: DEFAULT_EPOCHS epochs)
    epochs: float | None = None
    samples: int | None = None
    steps: int | None = None
    # learning-rate schedule, in samples so it stays right as the batch size changes
    lr_schedule: str = "constant"
    warmup_samples: int = 0
    min_lr_ratio: float = 0.0
    # evaluation, checkpoints, logging
    eval_every: int = 0
    eval_batch: int = 1024
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    seed: int = 0
    out: str | None = None
    resume: str | None = None
    device: str = "auto"
    threads: int | None = None
    precision: str = "32"
    quiet: bool = False
    tensorboard: bool = False
    plots: bool = True
    config: str | None = None
    from_step: int | None = None
    divergence_factor: float = 100.0
    dist_timeout: float = 600.0
    # torch.compile of the training forward (fixed-size micro-batches: one graph)
    compile: bool = False
    compile_backend: str = "inductor"
    # data parallelism: ddp (replicated model) or fsdp (FSDP2 fully_shard; train/fsdp.py)
    parallel: str = "ddp"

    DEFAULT_EPOCHS: ClassVar[float] = 20.0

    # ------------------------------------------------------------------ helpers
    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict of every field (tuples become lists)."""
        d = asdict(self)
        if d["betas"] is not None:
            d["betas"] = list(d["betas"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """The inverse of :meth:`to_dict` (unknown keys raise :class:`ConfigError`)."""
        cfg = cls()
        apply_layer(cfg, d, source="config")
        return cfg

    def budget(self) -> tuple[str, float]:
        """The budget as (kind, amount): ("epochs"|"samples"|"steps", value)."""
        for key in BUDGET_KEYS:
            value = getattr(self, key)
            if value is not None:
                return key, value
        return "epochs", self.DEFAULT_EPOCHS

    def effective_micro_batch(self) -> int | None:
        """The micro-batch size the loop uses; None: every step's batch in one forward pass
        (see the class docstring)."""
        if self.micro_batch is not None:
            return self.micro_batch
        if self.estimator == "micro-batch" and self.batch_test != "none":
            return max(1, self.initial_batch // 2)
        return None

    def optimizer_hparams(self) -> dict[str, Any]:
        """The optimizer hyperparameters that were set (None ones are left to the registry)."""
        hp = {
            k: getattr(self, k)
            for k in ("lr", "betas", "eps", "weight_decay", "b0", "momentum")
            if getattr(self, k) is not None
        }
        if "betas" in hp:
            hp["betas"] = tuple(hp["betas"])
        hp.update(self.optimizer_options)
        return hp

    def save(self, path: str | Path) -> None:
        """Write the configuration as JSON, atomically (never a truncated file)."""
        from adabatch.train.checkpoint import write_text_atomic

        write_text_atomic(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", path)


_FIELDS = {f.name: f for f in fields(TrainConfig)}
_DICT_KEYS = {"data_options", "model_options", "optimizer_options"}
_BOOL_KEYS = {"quiet", "tensorboard", "plots", "compile"}
_INT_KEYS = {
    "initial_batch", "max_batch", "micro_batch", "max_micro_batch", "batch_granularity",
    "test_interval",
    "samples", "steps",
    "warmup_samples", "eval_every", "eval_batch", "checkpoint_every", "keep_checkpoints",
    "seed", "threads", "ramp_increment", "stage_samples", "from_step",
}
_FLOAT_KEYS = {"lr", "eps", "weight_decay", "b0", "momentum", "eta", "theta", "nu", "epochs",
               "kappa", "min_lr_ratio", "coord_q", "stage_factor", "divergence_factor",
               "dist_timeout"}
_STR_KEYS = set(_FIELDS) - _DICT_KEYS - _BOOL_KEYS - _INT_KEYS - _FLOAT_KEYS - {"betas"}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _as_bool(flag: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in BOOL_TRUE + BOOL_FALSE:
        return value.lower() in BOOL_TRUE
    raise ConfigError(f"{flag} must be true or false, got {value!r}")


def _as_int(flag: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{flag} must be an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ConfigError(f"{flag} must be an integer, got {value!r}") from None
    if not isinstance(value, int):
        raise ConfigError(f"{flag} must be an integer, got {value!r}")
    return value


def _as_float(flag: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{flag} must be a number, got {value!r}")
    try:
        value = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{flag} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{flag} must be finite, got {value!r}")
    return value


def _as_betas(flag: str, value: Any) -> tuple[float, ...]:
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    try:
        betas = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"--betas must be two numbers, got {value!r}") from None
    if len(betas) != 2:
        raise ConfigError(f"--betas must be two numbers, got {value!r}")
    return betas


def _as_mapping(flag: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{flag[2:].replace('-', '_')} must be a table/mapping of options, "
                          f"got {value!r}")
    return dict(value)


def _as_str(flag: str, value: Any) -> str:
    if flag == "--precision":
        value = str(value)
        return "32" if value in ("32", "fp32", "float32") else value
    if not isinstance(value, str):
        raise ConfigError(f"{flag} must be a string, got {value!r}")
    return value


def _coerce(key: str, value: Any) -> Any:
    """Check and convert one value to its field's type (ConfigError names the flag)."""
    if value is None:
        return None
    if key in _DICT_KEYS:
        convert: Any = _as_mapping
    elif key in _BOOL_KEYS:
        convert = _as_bool
    elif key in _INT_KEYS:
        convert = _as_int
    elif key in _FLOAT_KEYS:
        convert = _as_float
    elif key == "betas":
        convert = _as_betas
    else:
        convert = _as_str
    return convert(_flag(key), value)


def apply_layer(cfg: TrainConfig, layer: dict[str, Any], *, source: str) -> None:
    """Set the keys of ``layer`` on ``cfg`` (names with ``-`` or ``_``).

    A layer that sets a budget key clears the other budget keys of the layers below;
    a layer that sets two budget keys is an error.
    """
    normalized: dict[str, Any] = {}
    for raw_key, value in layer.items():
        key = str(raw_key).replace("-", "_")
        if key in RETIRED_KEYS:
            continue
        if key not in _FIELDS:
            raise ConfigError(f"{source}: unknown key {raw_key!r}")
        normalized[key] = _coerce(key, value)
    budget = [k for k in BUDGET_KEYS if normalized.get(k) is not None]
    if len(budget) > 1:
        raise ConfigError(
            f"{source}: give the budget once: {' and '.join(_flag(k) for k in budget)} "
            "were both given"
        )
    if budget:
        for k in BUDGET_KEYS:
            setattr(cfg, k, None)
    for key, value in normalized.items():
        if key in _DICT_KEYS and value is None:
            value = {}
        setattr(cfg, key, value)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file into a dict of keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (TOML or YAML in UTF-8)") from None
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror or e}") from None
    if suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ModuleNotFoundError:
                raise ConfigError("TOML config files need Python >= 3.11 or tomli") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ModuleNotFoundError:
            raise ConfigError("YAML config files need pyyaml (pip install pyyaml)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            msg = " ".join(str(e).split())
            raise ConfigError(f"{path}: invalid YAML: {msg}") from None
        if data is None:
            data = {}
    else:
        raise ConfigError(f"config file must end in .toml, .yaml or .yml: {path}")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config file must be a table/mapping of keys")
    return data


def build_config(
    flags: dict[str, Any] | None = None, file: str | Path | None = None
) -> TrainConfig:
    """Defaults < preset < file < flags. ``flags`` holds only the flags that were given."""
    flags = dict(flags or {})
    file_layer = load_config_file(file) if file is not None else {}
    file_layer = {str(k).replace("-", "_"): v for k, v in file_layer.items()}
    cfg = TrainConfig()
    preset = flags.get("preset") or file_layer.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(
                f"unknown preset {preset!r}; choose from {', '.join(sorted(PRESETS))}"
            )
        apply_layer(cfg, PRESETS[preset], source="preset")
    apply_layer(cfg, file_layer, source=str(file) if file is not None else "config")
    apply_layer(cfg, flags, source="flags")
    if file is not None:
        cfg.config = str(file)
    return cfg


#: The largest seed (the seeds of numpy, torch and the sampler all take it).
MAX_SEED = 2**63 - 1
#: The largest budget in epochs: the budget in samples (epochs x data set size) must stay an
#: int64 for data sets of up to 2**33 samples.
MAX_EPOCHS = 1e9


def _choice(cfg: TrainConfig, key: str, options: tuple[str, ...]) -> None:
    value = getattr(cfg, key)
    if value not in options:
        raise ConfigError(f"{_flag(key)} must be one of {', '.join(options)}; got {value!r}")


def _positive(cfg: TrainConfig, key: str, *, allow_none: bool = False,
              allow_zero: bool = False) -> None:
    value = getattr(cfg, key)
    if value is None and allow_none:
        return
    if value is None or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{_flag(key)} must be {bound}, got {value}")


def _check_choices(cfg: TrainConfig) -> None:
    _choice(cfg, "batch_test", BATCH_TESTS)
    if cfg.batch_schedule is not None:
        _choice(cfg, "batch_schedule", BATCH_SCHEDULES)
    _choice(cfg, "estimator", ESTIMATORS)
    _choice(cfg, "lr_schedule", LR_SCHEDULES)
    _choice(cfg, "precision", PRECISIONS)
    _choice(cfg, "parallel", PARALLELS)
    _choice(cfg, "lr_scaling", LR_SCALINGS)
    _choice(cfg, "coord_reduce", COORD_REDUCES)
    if cfg.coord_reduce == "quantile" and not (cfg.coord_q is not None and 0 < cfg.coord_q <= 1):
        raise ConfigError("--coord-reduce quantile needs --coord-q in (0, 1]")
    if cfg.device != "auto" and not (
        cfg.device in ("cpu", "cuda", "mps") or cfg.device.startswith("cuda:")
    ):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N; got {cfg.device!r}")


def _check_ranges(cfg: TrainConfig) -> None:
    if cfg.stage_factor <= 1:
        raise ConfigError(f"--stage-factor must be > 1, got {cfg.stage_factor}")
    for key in ("ramp_increment", "stage_samples"):
        _positive(cfg, key, allow_none=True)
    for key in ("initial_batch", "max_batch", "test_interval", "eval_batch",
                "keep_checkpoints"):
        _positive(cfg, key)
    for key in ("micro_batch", "max_micro_batch", "batch_granularity", "threads", "samples",
                "steps", "epochs"):
        _positive(cfg, key, allow_none=True)
    for key in ("eval_every", "checkpoint_every", "warmup_samples"):
        _positive(cfg, key, allow_zero=True)
    for key in ("eta", "theta", "nu", "kappa"):
        _positive(cfg, key)
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise ConfigError(f"--seed must be in [0, 2**63 - 1], got {cfg.seed}")
    if cfg.epochs is not None and cfg.epochs > MAX_EPOCHS:
        raise ConfigError(f"--epochs must be <= {MAX_EPOCHS:g}, got {cfg.epochs:g}")
    for key in ("samples", "steps"):
        if (getattr(cfg, key) or 0) > MAX_SEED:
            raise ConfigError(f"{_flag(key)} must be < 2**63, got {getattr(cfg, key)}")
    _check_hyperparameters(cfg)
    _check_recovery(cfg)


#: The largest float32: an optimizer hyperparameter beyond it cannot reach float32 parameters.
_FLOAT32_MAX = 3.4028234663852886e38


def _check_hyperparameters(cfg: TrainConfig) -> None:
    for key in ("lr", "eps", "weight_decay", "b0", "momentum"):
        value = getattr(cfg, key)
        if value is not None and not (math.isfinite(value) and abs(value) <= _FLOAT32_MAX):
            raise ConfigError(f"{_flag(key)} must be a finite number of at most "
                              f"{_FLOAT32_MAX:.4g} in magnitude (the largest float32), "
                              f"got {value:g}")


def _check_recovery(cfg: TrainConfig) -> None:
    if not cfg.divergence_factor > 1.0:  # inf allowed: the finite rule off
        raise ConfigError(f"--divergence-factor must be > 1, got {cfg.divergence_factor}")
    if not 0.0 < cfg.dist_timeout < 1e7:
        raise ConfigError(f"--dist-timeout must be a positive number of seconds, got "
                          f"{cfg.dist_timeout}")
    if cfg.from_step is not None:
        if cfg.resume is None:
            raise ConfigError("--from-step N goes with --resume RUN")
        if cfg.from_step < 0:
            raise ConfigError(f"--from-step must be >= 0, got {cfg.from_step}")


def _check_multiple(cfg: TrainConfig, key: str, of: int, of_flag: str) -> None:
    if getattr(cfg, key) % of:
        raise ConfigError(f"{_flag(key)} ({getattr(cfg, key)}) must be a multiple of "
                          f"{of_flag} ({of})")


def _check_batch_sizes(cfg: TrainConfig) -> None:
    if cfg.max_batch < cfg.initial_batch:
        raise ConfigError(
            f"--max-batch ({cfg.max_batch}) must be >= --initial-batch ({cfg.initial_batch})"
        )
    if cfg.lr_scaling == "gain" and cfg.batch_test not in ("critical", "goodput"):
        raise ConfigError("--lr-scaling gain reads the noise scale: it goes with --batch-test "
                          f"critical or goodput, not {cfg.batch_test}")
    if cfg.batch_test != "none" and cfg.batch_schedule is not None:
        raise ConfigError(
            f"--batch-test {cfg.batch_test} and --batch-schedule {cfg.batch_schedule} are "
            "exclusive: use --batch-test none with a fixed schedule"
        )
    m = cfg.effective_micro_batch() or 1
    for key in ("initial_batch", "max_batch"):
        _check_multiple(cfg, key, m, "--micro-batch")
    if cfg.batch_granularity is not None:
        _check_multiple(cfg, "batch_granularity", m, "--micro-batch")
        for key in ("initial_batch", "max_batch"):
            _check_multiple(cfg, key, cfg.batch_granularity, "--batch-granularity")
    if cfg.batch_test != "none" and cfg.estimator == "micro-batch" and cfg.initial_batch < 2 * m:
        raise ConfigError(
            f"--estimator micro-batch needs at least 2 micro-batches per step: --initial-batch "
            f"({cfg.initial_batch}) must be >= 2 x --micro-batch ({m})"
        )


def _check_max_micro_batch(cfg: TrainConfig) -> None:
    """--max-micro-batch: passes that grow with the batch, over the --micro-batch units."""
    if cfg.max_micro_batch is None:
        return
    m = cfg.effective_micro_batch()
    if cfg.micro_batch is None or m is None:
        raise ConfigError("--max-micro-batch goes with --micro-batch (the granularity of the "
                          "batch sizes, and the smallest pass)")
    _check_multiple(cfg, "max_micro_batch", m, "--micro-batch")
    if cfg.batch_test != "none" and cfg.estimator == "micro-batch":
        raise ConfigError("--max-micro-batch with --estimator micro-batch: its statistics are "
                          "over the --micro-batch units, so they would depend on the passes; "
                          "use --estimator per-sample (exact whatever the passes)")
    if cfg.compile:
        raise ConfigError("--max-micro-batch with --compile: the pass shape changes as the "
                          "batch grows and every new shape recompiles; use --micro-batch alone")


def _check_paths(cfg: TrainConfig) -> None:
    if cfg.resume is not None and not Path(cfg.resume).is_dir():
        raise ConfigError(f"--resume: run directory not found: {cfg.resume}")
    if cfg.data_dir is not None and not Path(cfg.data_dir).is_dir():
        if cfg.dataset != "text":
            raise ConfigError(f"--data-dir: directory not found: {cfg.data_dir}")
        if not Path(cfg.data_dir).is_file():  # dataset text: a file or a directory
            raise ConfigError(f"--data-dir: file or directory not found: {cfg.data_dir}")


def _option_kinds(family: str, name: str) -> dict[str, Any]:
    """The accepted types of the options of optimizer/dataset/model ``name`` (empty for an
    unknown name: the loop reports it, with the choices)."""
    from adabatch.train import data, models, options

    if family == "optimizer":
        kinds = options.optimizer_kinds(name)
        # a hyperparameter its class does not declare (adagrad's b0) has the flag's type
        unknown = [k for k, v in kinds.items() if v is None and k in _FIELDS]
        kinds.update(kinds_of(TrainConfig, unknown))
        return kinds
    try:
        return (data if family == "dataset" else models).option_kinds(name)
    except ValueError:
        return {}


def _check_options(cfg: TrainConfig) -> None:
    """Convert ``--opt-option``/``--data-option``/``--model-option`` values to the types the
    optimizer, data set or model declares (see :mod:`adabatch.train.options`)."""
    for key, flag, family, name in (
        ("optimizer_options", "--opt-option", "optimizer", cfg.optimizer),
        ("data_options", "--data-option", "dataset", cfg.dataset),
        ("model_options", "--model-option", "model", cfg.model),
    ):
        values = getattr(cfg, key)
        if values:
            try:
                setattr(cfg, key, coerce_all(flag, values, _option_kinds(family, name)))
            except ValueError as e:
                raise ConfigError(str(e)) from None


#: How to keep one compiled graph while the batch grows (the README's torch.compile section).
COMPILE_RECIPE = ("fixed-size micro-batches (--micro-batch) with --estimator micro-batch, whose "
                  "gradient hooks run outside the compiled graph")


def _check_compile(cfg: TrainConfig) -> None:
    """--compile: refuse what would split the graph or recompile as the batch grows."""
    if not cfg.compile:
        return
    if cfg.batch_test != "none" and cfg.estimator == "per-sample":
        raise ConfigError(
            "--compile with --estimator per-sample: its forward hooks on every layer split "
            f"the compiled graph and recompile as the batch grows; use {COMPILE_RECIPE}"
        )
    grows = cfg.batch_test != "none" or (
        cfg.batch_schedule not in (None, "constant") and cfg.max_batch > cfg.initial_batch)
    if grows and cfg.effective_micro_batch() is None:
        raise ConfigError(
            "--compile: the batch size changes and every new batch shape recompiles the "
            f"forward; use {COMPILE_RECIPE}"
        )
    if not cfg.compile_backend:
        raise ConfigError("--compile-backend must name a torch.compile backend")


def _check_parallel(cfg: TrainConfig) -> None:
    """--parallel fsdp: refuse what FSDP2 cannot run exactly (train/fsdp.py says why)."""
    if cfg.parallel != "fsdp":
        return
    from adabatch.train.fsdp import fsdp_problem

    problem = fsdp_problem(cfg)
    if problem is not None:
        raise ConfigError(f"--parallel fsdp: {problem}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check values and combinations; raise :class:`ConfigError` with one line.

    The options of the optimizer, data set and model are converted in place to the types
    their targets declare (``maximize=False`` becomes the bool False).
    """
    _check_choices(cfg)
    _check_ranges(cfg)
    _check_batch_sizes(cfg)
    _check_paths(cfg)
    _check_options(cfg)
    _check_compile(cfg)
    _check_max_micro_batch(cfg)
    _check_parallel(cfg)
    return cfg


def replace(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    """A copy of ``cfg`` with ``changes`` (a thin wrapper of :func:`dataclasses.replace`)."""
    return dataclasses.replace(cfg, **changes)
