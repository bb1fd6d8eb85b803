"""Model factories for tests/distributed/test_fsdp_train.py (``--model
tests.distributed._fsdp_models:tied`` and ``:frozen``), for digits' (1, 8, 8) inputs.

``tied``: the layout of a language model with tied embeddings, on the 64 pixels read as a
distribution over 64 "tokens": an embedding matrix E (64 x width) embeds the input
(x @ E), two residual blocks in ``blocks`` (an ``nn.ModuleList``: the FSDP units), and the
output head's weight *is* E (logits over the 64 tokens, of which the first ``num_classes``
are the classes). ``frozen``: three Linear layers as direct children (no ``blocks``: every
child is a unit), the first one's weight frozen (``requires_grad=False``) and its bias
trained.
"""

from __future__ import annotations

import torch
from torch import nn


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.fc(self.norm(h)))


class TiedModel(nn.Module):
    def __init__(self, n_tokens: int, num_classes: int, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(n_tokens, width)
        self.blocks = nn.ModuleList([_Block(width) for _ in range(2)])
        self.head = nn.Linear(width, n_tokens, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1) @ self.embed.weight
        for block in self.blocks:
            h = block(h)
        # a copy, not a view: FSDP2 warns about a view as the output of a sharded module
        return self.head(h)[:, :self.num_classes].clone()


def tied(input_shape: tuple[int, ...], num_classes: int, width: int = 16) -> nn.Module:
    n_tokens = 1
    for s in input_shape:
        n_tokens *= s
    return TiedModel(n_tokens, num_classes, width)


def frozen(input_shape: tuple[int, ...], num_classes: int, width: int = 24) -> nn.Module:
    n_in = 1
    for s in input_shape:
        n_in *= s

    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(n_in, width)
            self.inp.weight.requires_grad_(False)
            self.mid = nn.Linear(width, width)
            self.out = nn.Linear(width, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.tanh(self.mid(torch.tanh(self.inp(x.flatten(1))))))
    return Frozen()
