"""``adabatch reproduce``: rerun the papers' claims and write tables, figures and results.md.

Sections (``--only`` picks a subset, in this order):

- ``toy``: AdaBelief, Adam and SGD with momentum on the 2D functions of the AdaBelief paper's
  Fig. 3 (:mod:`adabatch.reproduce.toy`).
- ``rates``: min_{k≤K} ‖∇F(x_k)‖² of AdaGrad-Norm with the norm test against fixed batches,
  with log-log slopes (:mod:`adabatch.reproduce.rates`).
- ``batches``: AdaGrad-Norm and AdaGrad with the norm, augmented inner-product and
  coordinate-wise tests against fixed and ramped batches, through the training program
  (:mod:`adabatch.reproduce.batches`).
- ``adabelief``: AdaBelief and Adam with and without the norm test (same module).

Each section writes ``<name>.md``, ``<name>.json`` and ``img/*.png`` under ``--out``;
``results.md`` assembles the sections run with the machine and the wall time of each; the
training runs of ``batches`` and ``adabelief`` are kept under ``runs/`` (``adabatch plot`` and
``adabatch compare`` read them).
``--quick`` runs reduced versions (a few minutes on 2 cores). The paper's full
configurations are in ``configs/`` (``adabatch train --config configs/...``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["SECTIONS", "build_parser", "main"]


def _toy(out: Path, scale: str):
    from adabatch.reproduce import toy

    return toy.run(out, scale=scale)


def _rates(out: Path, scale: str):
    from adabatch.reproduce import rates

    return rates.run(out, scale=scale)


def _batches(out: Path, scale: str):
    from adabatch.reproduce import batches

    return batches.run(out, scale=scale, comparison="batches")


def _adabelief(out: Path, scale: str):
    from adabatch.reproduce import batches

    return batches.run(out, scale=scale, comparison="adabelief")


#: section name -> runner(out, scale) -> Section, in report order
SECTIONS: dict[str, Callable] = {"toy": _toy, "rates": _rates, "batches": _batches,
                                 "adabelief": _adabelief}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _only(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown section(s) {unknown or [text]}; choose from {list(SECTIONS)}"
        )
    return names


def build_parser(prog: str = "adabatch reproduce") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Reproduce the papers' claims: tables, PNGs, results.md")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--quick", action="store_true",
                   help="reduced versions (a few minutes on 2 cores)")
    p.add_argument("--only", type=_only, default=None, metavar="LIST",
                   help=f"comma-separated sections to run (default: all of {list(SECTIONS)})")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    # internal: the test suite's smoke size
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``adabatch reproduce`` with ``argv`` (default: ``sys.argv[1:]``); exit code."""
    ns = build_parser().parse_args(argv)
    if ns.threads is not None:
        if ns.threads < 1:
            print(f"adabatch reproduce: error: --threads must be >= 1, got {ns.threads}",
                  file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(ns.threads)
    out = Path(ns.out)
    if out.exists() and not out.is_dir():
        print(f"adabatch reproduce: error: --out {out} exists and is not a directory",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    scale = "tiny" if ns.tiny else "quick" if ns.quick else "full"
    names = ns.only or list(SECTIONS)

    from adabatch.reproduce.report import write_report, write_section

    sections = []
    for name in names:
        t0 = time.perf_counter()
        print(f"[reproduce] {name} ({scale}) ...", flush=True)
        section = SECTIONS[name](out, scale)
        section.wall_time_s = time.perf_counter() - t0
        write_section(out, section)
        sections.append(section)
        print(f"[reproduce] {name} done in {section.wall_time_s:.1f} s", flush=True)
    command = "adabatch reproduce" + (" --quick" if scale == "quick" else "") + (
        f" --only {','.join(names)}" if ns.only else "") + f" --out {out}"
    skipped = [n for n in SECTIONS if n not in names]
    path = write_report(out, sections, scale=scale, command=command, skipped=skipped)
    print(f"[reproduce] wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
