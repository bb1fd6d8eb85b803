"""Worker of tests/distributed/test_fsdp_train.py: several ``adabatch train`` runs in one
torchrun launch (one process start-up for all). It joins the process group itself, so every
run trains under torchrun's group as ``torchrun ... -m adabatch train`` would; argv[1] is a
JSON list of argument lists. Exits with the first nonzero exit code."""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

from adabatch.cli import main


def run(arg_lists: list[list[str]]) -> int:
    dist.init_process_group("gloo")
    try:
        for args in arg_lists:
            code = main(["train", *args])
            if code:
                return code
        return 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run(json.loads(sys.argv[1])))
