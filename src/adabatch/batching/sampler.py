r"""A resumable sampler whose batches follow an adaptive batch size.

**The index stream.** Epoch e is a permutation of ``range(num_samples)`` drawn by a
:class:`torch.Generator` seeded from ``(seed, e)`` (through :class:`numpy.random.SeedSequence`,
so nearby seeds and epochs give unrelated permutations); ``shuffle=False`` uses the identity.
The stream is the concatenation epoch 0, epoch 1, ... and a position in it is a number of
*samples*: ``samples_consumed``, and ``epoch = samples_consumed / num_samples`` (a float).

**Rounds and ranks.** From the current position, the stream is cut into rounds of
``world_size · micro_batch`` consecutive indices; rank r takes ``[r·m, (r+1)·m)`` of each
round. A step with global batch size B (a multiple of ``world_size · micro_batch``) consumes
``B / (world_size · micro_batch)`` rounds: each rank gets that many micro-batches of
``micro_batch`` indices (gradient accumulation). So:

- the global batches are consecutive slices of the stream and depend only on the seed and
  the sequence of batch sizes, never on the number of ranks;
- no sample is repeated or skipped within an epoch whatever the batch sizes: the stream is a
  sequence of permutations. A step may cross an epoch boundary; its batch then continues
  into the next epoch's permutation (epochs are counted in samples, nothing is dropped).

**Use.** ``sampler.take(B)`` returns this rank's micro-batches (a list of LongTensors) and
advances; ``sampler.take_batch(B)`` returns the same indices as one tensor (a loop without
gradient accumulation) and advances. With a :class:`torch.utils.data.DataLoader` (worker
processes, prefetching), use the sampler as ``batch_sampler``: iterating it yields this
rank's fixed-size micro-batches from the current position on, and the loop takes as many as
its batch needs, then calls ``sampler.advance(B)`` so that ``samples_consumed`` (and
``state_dict``) follow. Since the micro-batches do not depend on the batch size, prefetching
cannot lag behind or drift from a batch-size change::

    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2)
    batches = iter(loader)
    for step in range(steps):
        B = controller.batch_size
        for _ in range(B // (world_size * micro_batch)):
            x, y = next(batches)
            ...
        sampler.advance(B)

The iteration is a snapshot: it starts at the position the sampler had when ``iter()`` was
called, and never moves the sampler itself. After ``load_state_dict``, create a new iterator.
``sampler.micro_batches(num_samples)`` is a finite form (with ``len``) covering
``num_samples`` global samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from adabatch._validation import check_int, check_mapping

__all__ = ["AdaptiveBatchSampler", "MicroBatchStream"]

_CHUNK_ROUNDS = 64  # rounds materialised at a time by the iterable form



def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of epoch ``epoch``: a 63-bit hash of ``(seed, epoch)``."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class AdaptiveBatchSampler:
    """Batches of a changing size from a resumable stream of per-epoch permutations.

    Args:
        num_samples: the dataset size n (>= ``world_size · micro_batch``).
        micro_batch: samples per micro-batch on each rank.
        seed: seed of the permutations (an int >= 0).
        rank: this process's rank in ``[0, world_size)``.
        world_size: the number of ranks sharing each global batch.
        shuffle: ``False`` uses the identity permutation every epoch.
    """

    def __init__(
        self,
        num_samples: int,
        micro_batch: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        num_samples = check_int("num_samples", num_samples, 1)
        micro_batch = check_int("micro_batch", micro_batch, 1)
        world_size = check_int("world_size", world_size, 1)
        seed = check_int("seed", seed, 0)
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"Invalid rank: {rank!r} (must be an int)")
        if not 0 <= rank < world_size:
            raise ValueError(f"Invalid rank: {rank} (must be in [0, world_size={world_size}))")
        if num_samples < world_size * micro_batch:
            raise ValueError(
                f"num_samples ({num_samples}) must be >= world_size * micro_batch "
                f"({world_size} * {micro_batch} = {world_size * micro_batch})"
            )
        self.num_samples = num_samples
        self.micro_batch = micro_batch
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = bool(shuffle)
        self.samples_consumed = 0
        self._perms: dict[int, Tensor] = {}
        self._gen = torch.Generator()  # reseeded for every epoch

    # -- the stream -------------------------------------------------------------------------

    @property
    def round_size(self) -> int:
        """``world_size · micro_batch``: the granularity of global batch sizes."""
        return self.world_size * self.micro_batch

    @property
    def epoch(self) -> float:
        """Epochs consumed so far, counted in samples: ``samples_consumed / num_samples``."""
        return self.samples_consumed / self.num_samples

    def permutation(self, epoch: int) -> Tensor:
        """The order of epoch ``epoch`` (int64 tensor of ``num_samples`` indices)."""
        perm = self._perms.get(epoch)
        if perm is None:
            if self.shuffle:
                gen = self._gen.manual_seed(epoch_seed(self.seed, epoch))
                perm = torch.randperm(self.num_samples, generator=gen)
            else:
                perm = torch.arange(self.num_samples)
            if len(self._perms) >= 2:  # keep the current and the next epoch
                del self._perms[min(self._perms)]
            self._perms[epoch] = perm
        return perm

    def stream(self, start: int, count: int) -> Tensor:
        """Indices ``[start, start + count)`` of the global stream (crossing epochs)."""
        epoch, offset = divmod(start, self.num_samples)
        if offset + count <= self.num_samples:  # within one epoch: one slice (the usual case)
            perm = self._perms.get(epoch)
            if perm is None:
                perm = self.permutation(epoch)
            return perm[offset: offset + count].clone()
        parts: list[Tensor] = []
        pos, end = start, start + count
        while pos < end:
            epoch, offset = divmod(pos, self.num_samples)
            n = min(end - pos, self.num_samples - offset)
            parts.append(self.permutation(epoch)[offset: offset + n])
            pos += n
        return torch.cat(parts)

    def _check_batch(self, batch_size: int) -> int:
        bad = type(batch_size) is not int and (  # plain ints skip the isinstance checks
            isinstance(batch_size, bool) or not isinstance(batch_size, int))
        if bad or batch_size <= 0 or batch_size % self.round_size != 0:
            raise ValueError(
                f"batch_size ({batch_size!r}) must be a positive multiple of world_size * "
                f"micro_batch ({self.world_size} * {self.micro_batch} = {self.round_size})"
            )
        return batch_size

    # -- one step ---------------------------------------------------------------------------

    def global_batch(self, batch_size: int) -> Tensor:
        """The next step's global batch (all ranks, stream order) without advancing."""
        return self.stream(self.samples_consumed, self._check_batch(batch_size))

    def take(self, batch_size: int) -> list[Tensor]:
        """This rank's micro-batches for one step of global batch ``batch_size``; advance.

        Returns ``batch_size / (world_size · micro_batch)`` LongTensors of ``micro_batch``
        indices each.
        """
        rounds = self._check_batch(batch_size) // self.round_size
        block = self.stream(self.samples_consumed, batch_size)
        if self.world_size > 1:  # this rank's columns, gathered into one new block
            block = block.view(rounds, self.world_size, self.micro_batch)[:, self.rank].clone()
        self.samples_consumed += batch_size
        return list(block.view(rounds, self.micro_batch).unbind(0))

    def take_batch(self, batch_size: int) -> Tensor:
        """This rank's share of one step of global batch ``batch_size`` as one LongTensor
        (its micro-batches of :meth:`take`, concatenated); advance.

        For a loop that forwards the whole share at once (no gradient accumulation): with
        ``micro_batch=1`` rank r gets every ``world_size``-th index of the global batch.
        """
        rounds = self._check_batch(batch_size) // self.round_size
        block = self.stream(self.samples_consumed, batch_size)
        if self.world_size > 1:
            block = block.view(rounds, self.world_size, self.micro_batch)[:, self.rank]
            block = block.reshape(-1)
        self.samples_consumed += batch_size
        return block

    def advance(self, batch_size: int) -> None:
        """Record a step of ``batch_size`` samples taken through the iterable form."""
        self.samples_consumed += self._check_batch(batch_size)

    # -- iterable form (DataLoader batch_sampler) --------------------------------------------

    def micro_batches(self, num_samples: int | None = None) -> MicroBatchStream:
        """This rank's micro-batches from the current position, for ``num_samples`` global
        samples (a multiple of ``world_size · micro_batch``) or forever (``None``)."""
        if num_samples is not None:
            num_samples = check_int("num_samples", num_samples, 0)
            if num_samples % self.round_size != 0:
                raise ValueError(
                    f"num_samples ({num_samples}) must be a multiple of world_size * "
                    f"micro_batch ({self.round_size})"
                )
        return MicroBatchStream(self, self.samples_consumed, num_samples)

    def __iter__(self) -> Iterator[list[int]]:
        """Micro-batches (lists of ints) from the current position, forever."""
        return iter(self.micro_batches())

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "samples_consumed": self.samples_consumed,
            "micro_batch": self.micro_batch,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved position. The stream (num_samples, seed, shuffle) must match;
        the micro-batch size and world size may differ (the global batches do not depend on
        them). Invalid input raises and leaves the sampler unchanged."""
        check_mapping("state_dict", state)
        missing = [k for k in ("num_samples", "seed", "shuffle", "samples_consumed")
                   if k not in state]
        if missing:
            raise ValueError(f"AdaptiveBatchSampler state_dict is missing keys {missing}")
        for key in ("num_samples", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"state_dict was saved with {key}={state[key]!r} but this sampler has "
                    f"{key}={getattr(self, key)!r}: it describes a different index stream"
                )
        consumed = state["samples_consumed"]
        if isinstance(consumed, bool) or not isinstance(consumed, int) or consumed < 0:
            raise ValueError(f"state_dict samples_consumed must be an int >= 0, got {consumed!r}")
        self.samples_consumed = consumed

    def __repr__(self) -> str:
        return (f"AdaptiveBatchSampler(num_samples={self.num_samples}, "
                f"micro_batch={self.micro_batch}, rank={self.rank}, "
                f"world_size={self.world_size}, samples_consumed={self.samples_consumed})")


class MicroBatchStream:
    """This rank's fixed-size micro-batches from a fixed stream position.

    Re-iterable: each ``iter()`` starts again at ``start``. Finite (with ``len``, the number
    of micro-batches of this rank) when ``num_samples`` is given.
    """

    def __init__(self, sampler: AdaptiveBatchSampler, start: int, num_samples: int | None):
        self.sampler = sampler
        self.start = start
        self.num_samples = num_samples

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError("an endless MicroBatchStream has no len()")
        return self.num_samples // self.sampler.round_size

    def __iter__(self) -> Iterator[list[int]]:
        s = self.sampler
        pos = self.start
        end = None if self.num_samples is None else self.start + self.num_samples
        while end is None or pos < end:
            rounds = _CHUNK_ROUNDS if end is None else min(_CHUNK_ROUNDS,
                                                           (end - pos) // s.round_size)
            block = s.stream(pos, rounds * s.round_size)
            mine = block.view(rounds, s.world_size, s.micro_batch)[:, s.rank]
            pos += rounds * s.round_size
            yield from mine.tolist()
