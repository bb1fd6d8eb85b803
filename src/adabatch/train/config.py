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

__all__ = [
    "BATCH_SCHEDULES",
    "BATCH_TESTS",
    "BUDGET_KEYS",
    "ESTIMATORS",
    "LR_SCHEDULES",
    "PRECISIONS",
    "PRESETS",
    "RESUME_MUTABLE",
    "ConfigError",
    "TrainConfig",
    "build_config",
    "load_config_file",
    "validate",
]

BATCH_TESTS = ("none", "norm", "ip", "aip", "coord")
BATCH_SCHEDULES = ("constant", "linear", "stagewise")
ESTIMATORS = ("per-sample", "micro-batch")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("32", "bf16")
LR_SCALINGS = ("none", "linear", "sqrt")
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
        "keep_checkpoints", "log_every", "quiet", "device", "threads", "tensorboard", "plots",
        "data_dir", "out", "resume", "config",
    }
)


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
    coord_reduce: str = "max"
    coord_q: float | None = None
    batch_schedule: str | None = None
    ramp_increment: int | None = None
    stage_samples: int | None = None
    stage_factor: float = 2.0
    initial_batch: int = 16
    max_batch: int = 512
    micro_batch: int | None = None
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
    log_every: int = 0
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
        """Write the configuration as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


_FIELDS = {f.name: f for f in fields(TrainConfig)}
_DICT_KEYS = {"data_options", "model_options", "optimizer_options"}
_BOOL_KEYS = {"quiet", "tensorboard", "plots"}
_INT_KEYS = {
    "initial_batch", "max_batch", "micro_batch", "batch_granularity", "test_interval",
    "samples", "steps",
    "warmup_samples", "eval_every", "eval_batch", "checkpoint_every", "keep_checkpoints",
    "log_every", "seed", "threads", "ramp_increment", "stage_samples",
}
_FLOAT_KEYS = {"lr", "eps", "weight_decay", "b0", "momentum", "eta", "theta", "nu", "epochs",
               "min_lr_ratio", "coord_q", "stage_factor"}
_STR_KEYS = set(_FIELDS) - _DICT_KEYS - _BOOL_KEYS - _INT_KEYS - _FLOAT_KEYS - {"betas"}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _coerce(key: str, value: Any) -> Any:
    """Check and convert one value to its field's type (ConfigError names the flag)."""
    flag = _flag(key)
    if value is None:
        return None
    if key in _DICT_KEYS:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table/mapping of options, got {value!r}")
        return dict(value)
    if key in _BOOL_KEYS:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{flag} must be true or false, got {value!r}")
    if key in _INT_KEYS:
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
    if key in _FLOAT_KEYS:
        if isinstance(value, bool):
            raise ConfigError(f"{flag} must be a number, got {value!r}")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{flag} must be a number, got {value!r}") from None
        if not math.isfinite(value):
            raise ConfigError(f"{flag} must be finite, got {value!r}")
        return value
    if key == "betas":
        if isinstance(value, str):
            value = value.replace(",", " ").split()
        try:
            betas = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"--betas must be two numbers, got {value!r}") from None
        if len(betas) != 2:
            raise ConfigError(f"--betas must be two numbers, got {value!r}")
        return betas
    if key == "precision":
        value = str(value)
        return "32" if value in ("32", "fp32", "float32") else value
    if not isinstance(value, str):
        raise ConfigError(f"{flag} must be a string, got {value!r}")
    return value


def apply_layer(cfg: TrainConfig, layer: dict[str, Any], *, source: str) -> None:
    """Set the keys of ``layer`` on ``cfg`` (names with ``-`` or ``_``).

    A layer that sets a budget key clears the other budget keys of the layers below;
    a layer that sets two budget keys is an error.
    """
    normalized: dict[str, Any] = {}
    for raw_key, value in layer.items():
        key = str(raw_key).replace("-", "_")
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
    text = path.read_text()
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


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check values and combinations; raise :class:`ConfigError` with one line."""

    def choice(key: str, options: tuple[str, ...]) -> None:
        value = getattr(cfg, key)
        if value not in options:
            raise ConfigError(
                f"{_flag(key)} must be one of {', '.join(options)}; got {value!r}"
            )

    def positive(key: str, *, allow_none: bool = False, allow_zero: bool = False) -> None:
        value = getattr(cfg, key)
        if value is None and allow_none:
            return
        if value is None or value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"{_flag(key)} must be {bound}, got {value}")

    choice("batch_test", BATCH_TESTS)
    if cfg.batch_schedule is not None:
        choice("batch_schedule", BATCH_SCHEDULES)
    choice("estimator", ESTIMATORS)
    choice("lr_schedule", LR_SCHEDULES)
    choice("precision", PRECISIONS)
    choice("lr_scaling", LR_SCALINGS)
    choice("coord_reduce", COORD_REDUCES)
    if cfg.coord_reduce == "quantile" and not (cfg.coord_q is not None and 0 < cfg.coord_q <= 1):
        raise ConfigError("--coord-reduce quantile needs --coord-q in (0, 1]")
    if cfg.stage_factor <= 1:
        raise ConfigError(f"--stage-factor must be > 1, got {cfg.stage_factor}")
    for key in ("ramp_increment", "stage_samples"):
        positive(key, allow_none=True)
    if cfg.device != "auto" and not (
        cfg.device in ("cpu", "cuda", "mps") or cfg.device.startswith("cuda:")
    ):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N; got {cfg.device!r}")
    for key in ("initial_batch", "max_batch", "test_interval", "eval_batch",
                "keep_checkpoints"):
        positive(key)
    for key in ("micro_batch", "batch_granularity", "threads", "samples", "steps", "epochs"):
        positive(key, allow_none=True)
    for key in ("eval_every", "checkpoint_every", "warmup_samples", "log_every"):
        positive(key, allow_zero=True)
    for key in ("eta", "theta", "nu"):
        positive(key)
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if cfg.max_batch < cfg.initial_batch:
        raise ConfigError(
            f"--max-batch ({cfg.max_batch}) must be >= --initial-batch ({cfg.initial_batch})"
        )
    if cfg.batch_test != "none" and cfg.batch_schedule is not None:
        raise ConfigError(
            f"--batch-test {cfg.batch_test} and --batch-schedule {cfg.batch_schedule} are "
            "exclusive: use --batch-test none with a fixed schedule"
        )
    m = cfg.effective_micro_batch() or 1
    for key in ("initial_batch", "max_batch"):
        if getattr(cfg, key) % m:
            raise ConfigError(
                f"{_flag(key)} ({getattr(cfg, key)}) must be a multiple of --micro-batch ({m})"
            )
    if cfg.batch_granularity is not None:
        if cfg.batch_granularity % m:
            raise ConfigError(f"--batch-granularity ({cfg.batch_granularity}) must be a "
                              f"multiple of --micro-batch ({m})")
        for key in ("initial_batch", "max_batch"):
            if getattr(cfg, key) % cfg.batch_granularity:
                raise ConfigError(f"{_flag(key)} ({getattr(cfg, key)}) must be a multiple of "
                                  f"--batch-granularity ({cfg.batch_granularity})")
    if cfg.batch_test != "none" and cfg.estimator == "micro-batch" and cfg.initial_batch < 2 * m:
        raise ConfigError(
            f"--estimator micro-batch needs at least 2 micro-batches per step: --initial-batch "
            f"({cfg.initial_batch}) must be >= 2 x --micro-batch ({m})"
        )
    if cfg.resume is not None and not Path(cfg.resume).is_dir():
        raise ConfigError(f"--resume: run directory not found: {cfg.resume}")
    if cfg.data_dir is not None and not Path(cfg.data_dir).is_dir():
        raise ConfigError(f"--data-dir: directory not found: {cfg.data_dir}")
    return cfg


def replace(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    """A copy of ``cfg`` with ``changes`` (a thin wrapper of :func:`dataclasses.replace`)."""
    return dataclasses.replace(cfg, **changes)
