"""One table of optimizer configurations that the generic tests run over.

Each entry is ``(case_id, registry_name, hyperparameters)``: the hyperparameters are passed to
``adabatch.optim.create`` on top of the registry's defaults. Every registry name appears at
least once (a test checks it), so a new optimizer gets the generic tests by being registered.
"""

from __future__ import annotations

from typing import Any

CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("adabelief", "adabelief", {}),
    ("adabelief-amsgrad-wd", "adabelief", {"amsgrad": True, "weight_decay": 1e-2}),
    (
        "adabelief-l2-norectify",
        "adabelief",
        {"rectify": False, "weight_decouple": False, "weight_decay": 1e-3, "eps": 1e-8},
    ),
    ("adagrad", "adagrad", {}),
    ("adagrad-b0-wd", "adagrad", {"b0": 0.1, "weight_decay": 1e-3}),
    ("adagradnorm", "adagradnorm", {}),
    ("adagradnorm-pergroup-wd", "adagradnorm", {"per_group": True, "weight_decay": 1e-3}),
    ("adam", "adam", {}),
    ("adam-amsgrad-wd", "adam", {"amsgrad": True, "weight_decay": 1e-3}),
    ("adamw", "adamw", {}),
    ("sgd", "sgd", {}),
    ("sgd-nesterov", "sgd", {"momentum": 0.5, "nesterov": True}),
    ("momentum", "momentum", {}),
    ("momentum-wd-dampening", "momentum", {"weight_decay": 1e-3, "dampening": 0.1}),
]


def case_ids() -> list[str]:
    return [case_id for case_id, _, _ in CASES]
