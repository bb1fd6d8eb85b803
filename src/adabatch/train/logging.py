"""Run outputs: ``metrics.jsonl``, optional TensorBoard, and progress on the terminal.

``metrics.jsonl`` holds one JSON object per line: a row per optimizer step (``step``,
``samples``, ``batch_size``, ``loss``, ``lr``, ``statistic``, ``required``, ``passed``,
``time``; on a test step also the raw statistics the decision read, those measured:
``grad_sq_norm`` ‖ḡ‖², ``variance_trace`` V, ``ip_variance`` W, ``orth_variance`` O and
``b_noise`` the noise-scale estimate V/(‖ḡ‖² − V/b), None unless positive; the policies
beyond the paper add ``b_noise_step`` and, for goodput, ``time_alpha``/``time_beta``, see
:data:`STAT_COLUMNS`) and evaluation rows (``{"eval": true, "step", "samples", "test_loss",
"test_accuracy", "time"}``). Rows are buffered and flushed at every evaluation and checkpoint,
so the file never lags a checkpoint: a resumed run cuts the file back to the byte offset that
its checkpoint recorded and appends from there.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, TextIO

__all__ = ["STAT_COLUMNS", "MetricsWriter", "Progress"]

#: The raw statistics of a test step, in the order they are written (when present).
STAT_COLUMNS = ("grad_sq_norm", "variance_trace", "ip_variance", "orth_variance", "b_noise",
                "b_noise_step", "time_alpha", "time_beta")


def _clean(value: Any) -> Any:
    """JSON has no inf/NaN: write them as strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _value(v: Any) -> str:
    """One JSON value, fast for the per-step row (plain numbers, bools, None, strings)."""
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else f'"{_clean(v)}"'
    if isinstance(v, int):
        return str(v)
    return json.dumps(_clean(v))


def _float(v: float) -> str:
    """A float as JSON (inf/NaN as strings, see :func:`_clean`)."""
    return repr(v) if math.isfinite(v) else f'"{_clean(v)}"'


class MetricsWriter:
    """Append rows to ``metrics.jsonl`` (and TensorBoard scalars when a writer is given)."""

    def __init__(self, path: str | Path, *, truncate_at: int | None = None,
                 tensorboard_dir: str | Path | None = None) -> None:
        self.path = Path(path)
        if truncate_at is not None and self.path.exists():
            with open(self.path, "r+b") as f:
                f.truncate(min(truncate_at, self.path.stat().st_size))
        mode = "a" if truncate_at is not None else "w"
        self._file: TextIO = open(self.path, mode, buffering=1 << 16)
        self._tb = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(tensorboard_dir))

    def write(self, row: dict[str, Any]) -> None:
        self._file.write("{" + ", ".join(f'"{k}": {_value(v)}' for k, v in row.items())
                         + "}\n")
        if self._tb is not None:
            step = row.get("samples", row.get("step", 0))
            for key, value in row.items():
                if key not in ("step", "samples", "eval", "time") and isinstance(
                    value, (int, float)
                ) and not isinstance(value, bool):
                    self._tb.add_scalar(("eval/" if row.get("eval") else "train/") + key,
                                        value, step)

    def write_step(self, step: int, samples: int, batch_size: int, loss: float, lr: float,
                   time: float, test: dict[str, Any] | None = None) -> None:
        """The per-step row: the same line as :meth:`write` with the keys ``step, samples,
        batch_size, loss, lr, statistic, required, passed, time`` (the test's verdict from
        ``test``, None when the step ran no test) and, on a test step, the
        :data:`STAT_COLUMNS` that ``test`` holds; formatted by hand (it runs every step)."""
        if self._tb is not None or test is not None:
            test = test or {}
            row = {"step": step, "samples": samples, "batch_size": batch_size,
                   "loss": loss, "lr": lr, "statistic": test.get("statistic"),
                   "required": test.get("required"), "passed": test.get("passed")}
            row.update((k, test[k]) for k in STAT_COLUMNS if k in test)
            row["time"] = time
            self.write(row)
            return
        self._file.write(
            f'{{"step": {step:d}, "samples": {samples:d}, "batch_size": {batch_size:d}, '
            f'"loss": {_float(loss)}, "lr": {_float(lr)}, "statistic": null, '
            f'"required": null, "passed": null, "time": {_float(time)}}}\n')

    def flush(self) -> int:
        """Flush to the OS and return the file's byte length."""
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()
        return self._file.tell()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class Progress:
    """A tqdm bar on a terminal; plain lines every ~5% of the budget otherwise; or nothing.

    ``total`` and positions are in the budget's unit (samples or steps).
    """

    def __init__(self, total: int, unit: str, *, quiet: bool, start: int = 0,
                 stream: TextIO | None = None) -> None:
        self.total = max(1, int(total))
        self.unit = unit
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self._bar = None
        self._next_line = start + self.total / 20
        self._pos = start
        if quiet:
            return
        is_tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        if is_tty:
            try:
                from tqdm import tqdm
            except ModuleNotFoundError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=self.total, initial=start, unit=unit, file=self.stream,
                                 dynamic_ncols=True, leave=True)

    def update(self, pos: int, info: dict[str, Any]) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.update(pos - self._pos)
            self._pos = pos
            self._bar.set_postfix(info, refresh=False)
        elif pos >= self._next_line:
            while self._next_line <= pos:
                self._next_line += self.total / 20
            text = " ".join(f"{k}={v}" for k, v in info.items())
            print(f"[{100 * min(pos, self.total) / self.total:5.1f}%] {text}",
                  file=self.stream, flush=True)

    def write(self, line: str) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
