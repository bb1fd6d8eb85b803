"""Gradient statistics from the micro-batch gradients of gradient accumulation.

A step's batch of N samples is split into M micro-batches of n_k samples (Σ n_k = N), each
a backward pass under the loss-scaling contract ``loss_k = mean_loss_k * n_k / N`` (so p.grad
ends as the mean gradient ḡ). After each micro-batch's backward, :meth:`MicroBatchStats.
accumulate` reads the increment Δ_k of p.grad since the previous call:
Δ_k = (n_k/N)·ĝ_k, with ĝ_k the micro-batch's mean gradient. Running sums:

    P = Σ_k n_k ‖ĝ_k‖² = N² Σ_k ‖Δ_k‖²/n_k,      C_j = N² Σ_k Δ_kj²/n_k.

The micro-batch means of n_k i.i.d. samples have covariance Σ/n_k, and

    E[Σ_k n_k ‖ĝ_k − ḡ‖²] = E[P − N·G] = (M − 1)·tr Σ,

so the weighted estimators (unbiased also for unequal micro-batch sizes) are, on one sample's
scale as :class:`~adabatch.batching.stats.GradientStats` requires,

    V = (P − N·G)/(M − 1),                v_j = (C_j − N·ḡ_j²)/(M − 1),
    W = (Σ_k n_k ip_k² − 2G Σ_k n_k ip_k + N·G²)/(M − 1),   ip_k = ⟨ĝ_k, ḡ⟩,
    O = (Σ_k n_k ‖ĝ_k‖² − Σ_k n_k ip_k²/G)/(M − 1),

the per-sample formulas with micro-batches as weighted samples (with n_k = 1 they are the
exact per-sample statistics). With M < 2 they are undefined: :meth:`~MicroBatchStats.stats`
raises a :class:`ValueError` when the step had N ≥ 2 samples in one micro-batch (a loop
that always measures one micro-batch would never decide: split the batch into at least 2
micro-batches, or measure one batch with :class:`~adabatch.batching.PerSampleStats`), and
gives NaN variances for a step of one sample (a test then cannot decide, returns None, and
the controller keeps the batch size).

Memory: one snapshot of p.grad (to form increments), plus one model-sized buffer for
``coord_variance``. ip_k needs the *final* ḡ, known only after the last micro-batch, so when
``ip_variance`` or ``orth_variance`` is requested the M increments are stored (M × model
memory; document-level choice: on data-parallel ranks without accumulation that is one copy).

Distributed: each process accumulates its *local* micro-batches (every backward under DDP's
``no_sync``, so p.grad is the local gradient, or before the gradient all-reduce), then the
gradients are averaged across processes, then :meth:`~MicroBatchStats.stats` reads the
global ḡ from p.grad and sums the partial sums ``[N, M, P, Σ n_k ip_k, Σ n_k ip_k²]`` with one
call of ``reduce`` (plus one on C_j for ``coord_variance``). Every (rank, micro-batch) pair
counts as one micro-batch, so a rank with one local micro-batch is fine when the ranks
together have at least 2 (the check above is on the reduced counts).

FSDP2 (``torch.distributed.fsdp.fully_shard``; the parameters are DTensors sharded on dim 0):
after a backward with gradient sync, p.grad holds this rank's shard of the reduce-scattered
*mean over ranks* — the per-rank increments Δ_{r,k} that the estimator's units need are gone
by then (and without sync, FSDP2 keeps them in private buffers). Each rank r does hold its
full local gradient of a layer for a moment: autograd hands Δ_{r,k} (unsharded, this rank's
micro-batch only) to the layer's *unsharded* parameter before FSDP2 reduce-scatters it. So
under FSDP2 the estimator needs ``track="hooks"`` and a module: it finds the unsharded
parameters (``unshard()`` of every FSDPModule, once; FSDP2 reuses those Parameter objects)
and hooks them. With or without ``set_requires_gradient_sync(False)`` the hooks see the same
Δ_{r,k}, and with R ranks, N = Σ_r N_r, M = Σ_r M_r and the loss contract on each rank's
own N_r, FSDP2's average gives ḡ = (1/R) Σ_r Σ_k Δ_{r,k} = (1/N) Σ_{r,k} n_{r,k} ĝ_{r,k} for
equal N_r — the DDP case, every (rank, micro-batch) pair one micro-batch:

    P = Σ_r N_r² Σ_k ‖Δ_{r,k}‖²/n_{r,k}    (each rank: its full local norms, no communication)
    G = ‖ḡ‖² = Σ_r ‖ḡ|shard_r‖²            (each rank: its own shard of p.grad)
    V = (P − N·G)/(M − 1),                  one all-reduce (``reduce``) of [N, M, P, s1, s2, G]
                                            (s1 = s2 = 0 without inner products, below)
    C_j = Σ_r N_r² Σ_k Δ_{r,k,j}²/n_{r,k}  (each rank sums its local part over the whole
                                            layer, then one reduce-scatter per parameter
                                            tensor per measured step: each rank gets its
                                            shard of C_j, never all of it)
    v_j = (C_j − N·ḡ_j²)/(M − 1)            on this rank's shard only.

``coord_variance`` and ``mean_grad`` come back as DTensors with the parameters' shapes and
placements (each rank holding its shard); :class:`~adabatch.batching.CoordinateNormTest`
reduces its ratios v_j/(η²ḡ_j²) over the ranks without gathering them (``"max"``: an
all-reduce MAX of each rank's maximum; ``"mean"``: an all-reduce of [count, sum]) and refuses
``"quantile"`` (a ValueError: it would gather every v_j).

Inner products (``ip_variance``, ``orth_variance``): ip_{r,k} = ⟨ĝ_{r,k}, ḡ⟩ =
(N_r/n_{r,k})·⟨Δ_{r,k}, ḡ⟩ is a sum over every coordinate of the model, and rank r holds
Δ_{r,k} whole (the hooks see it unsharded) but ḡ only on its shard. The cheapest exact way
is to bring ḡ to the Δ's, not the Δ's to ḡ: every rank keeps its own Δ_{r,k} (as without
FSDP2: M_r copies of the measured parameters, unsharded), and at :meth:`~MicroBatchStats.stats`
gathers ḡ one parameter tensor at a time (an all-gather of the parameter: once per tensor
per measured step), dots it with each kept Δ_{r,k} and frees it, so

    s1 = Σ_{r,k} n_{r,k} ip_{r,k},   s2 = Σ_{r,k} n_{r,k} ip_{r,k}²

travel in the same all-reduce as the norms, [N, M, P, s1, s2, G]. Sending the Δ's to the
shards instead (each Δ_{r,k}|s to rank s, a partial ⟨Δ_{r,k}|s, ḡ|s⟩ there and one scalar per
micro-batch all-reduced) moves M_r times the parameters per rank instead of once, and keeps
as much memory (R·M_r shards of size D/R = M_r·D); a reduce-scatter of Δ_k would sum the
ranks' micro-batches into one unit and change the statistic.

Communication per measured step: 48 bytes (6 float64) all-reduced, plus, with
``coord_variance``, one reduce-scatter of the parameters' size in their dtype — as much as
one of FSDP2's own gradient reduce-scatters (FSDP2 does one per micro-batch with gradient
sync, one per step without) — and, with ``ip_variance`` or ``orth_variance``, one
all-gather of the parameters' size (as much as one of FSDP2's forward all-gathers); the
coordinate test adds two 1- and 3-element all-reduces. Memory with ``coord_variance``: two
unsharded model-sized buffers per rank (the micro-batch's Δ² and C; float32 at least, also
when a MixedPrecisionPolicy computes in bfloat16); with the inner products,
M_r unsharded copies plus one gathered parameter tensor at a time.
tests/distributed/test_fsdp2_stats.py checks all of this with 2 processes against 1 process
and DDP, and counts the bytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from adabatch._validation import check_callable, check_choice, check_int
from adabatch.batching import _sharded
from adabatch.batching.protocol import ParamWatch, StepScope
from adabatch.batching.stats import (
    STAT_NAMES,
    GradientStats,
    Reduce,
    check_needs,
    mean_grads,
    plain_grad,
    sq_norm,
    stack_f64,
    stats_from_parts,
)


class MicroBatchStats:
    """Statistics from M ≥ 2 micro-batch gradients accumulated into one step.

    Usage::

        est = MicroBatchStats(model, needs=test.needs)
        optimizer.zero_grad()
        for x, y in micro_batches:                 # n_k samples each, N in all
            (loss_fn(model(x), y) * len(x) / N).backward()
            est.accumulate(len(x))
        stats = est.stats()                        # then optimizer.step()

    p.grad must be None or zero when the step starts (``optimizer.zero_grad()``). A
    measured step needs at least 2 micro-batches (across all processes with ``reduce``)
    when it has 2 or more samples and a variance is needed: :meth:`stats` raises a
    :class:`ValueError` otherwise.

    Args:
        params_or_model: an nn.Module (its parameters with ``requires_grad``) or an iterable
            of parameters.
        needs: the statistics to compute (names from :data:`STAT_NAMES`).
        reduce: optional ``reduce(flat) -> flat`` summing a float64 tensor across processes,
            called once per :meth:`stats` (twice with ``coord_variance``).
        track: how the increment Δ_k of each micro-batch is read.
            ``"grad"`` (default): from p.grad at :meth:`accumulate` (p.grad minus a snapshot
            of the previous p.grad: three passes over the gradients per micro-batch; works
            however p.grad was produced). ``"hooks"``: a gradient hook on every parameter
            sees Δ_k as autograd hands it to p.grad and measures it there (one pass, no
            snapshot; cheaper when the step is short). Contract of ``"hooks"``: every
            backward pass through the parameters while the estimator is :attr:`enabled` is
            one micro-batch and must be followed by :meth:`accumulate` (a second backward
            before it raises); gradients written to p.grad by hand are not seen. Set
            ``est.enabled = False`` on steps without statistics (hooks then do nothing),
            and call :meth:`remove` to take the hooks off.

    Attributes:
        params: the parameters, aligned with ``mean_grad`` and ``coord_variance``.
        needs_local_grads: True: each process's micro-batch gradients must reach
            :meth:`accumulate` before the gradients are averaged across processes (see
            :class:`~adabatch.batching.protocol.Estimator`).
    """

    needs_local_grads = True

    def __init__(self, params_or_model: nn.Module | Iterable[Tensor],
                 needs: Iterable[str] = STAT_NAMES, *, reduce: Reduce | None = None,
                 track: str = "grad") -> None:
        if isinstance(params_or_model, nn.Module):
            params = [p for p in params_or_model.parameters() if p.requires_grad]
        else:
            params = list(params_or_model)
            for p in params:
                if not isinstance(p, Tensor):
                    raise TypeError(
                        f"MicroBatchStats needs a module or tensors, got {type(p).__name__}"
                    )
        if not params:
            raise ValueError("MicroBatchStats got no parameters that require gradients")
        seen: set[int] = set()
        self.params: list[Tensor] = []
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
        self.needs = check_needs(frozenset(needs))
        if reduce is not None:
            check_callable("reduce", reduce)
        self.reduce = reduce
        self._need_coord = "coord_variance" in self.needs
        self._need_ip = bool(self.needs & {"ip_variance", "orth_variance"})
        self._need_var = bool(self.needs - {"grad_sq_norm", "mean_grad"})
        self.track = check_choice("track", track, ("grad", "hooks"))
        #: the module it was built from (None for a parameter list): stats() checks that its
        #: parameters are still these (see _check_current)
        self._module = params_or_model if isinstance(params_or_model, nn.Module) else None
        self._watch = (ParamWatch("MicroBatchStats", self._module, self.params)
                       if self._module is not None else None)
        # under FSDP2: the unsharded parameters, where the hooks see each rank's Δ_k
        fsdp2 = _fsdp2_unsharded(params_or_model, self.params, self.needs, track, reduce)
        self._fsdp2 = fsdp2 is not None
        self._hooked: list[Tensor] = self.params if fsdp2 is None else fsdp2
        self.enabled = True
        self._handles: list[Any] = []
        self._pend_norms: list[Tensor | None] = [None] * len(self.params)
        self._pend_fired = [False] * len(self.params)
        self._pend_any = False
        self._pend_sq: list[Tensor] | None = None
        self._pend_inc: list[Tensor | None] = [None] * len(self.params)
        if track == "hooks":
            for i, p in enumerate(self._hooked):
                if not p.requires_grad:
                    raise ValueError("MicroBatchStats(track='hooks') needs parameters that "
                                     "require gradients")
                self._handles.append(p.register_hook(self._make_hook(i)))
        # the step (see reset()); the snapshot of p.grad and the coordinate sums are kept
        # across steps (allocated once)
        self._fresh = True
        self._n = 0
        self._m = 0
        # (n_k, per-tensor ‖Δ_k‖ (track="grad") or ‖Δ_k‖² (track="hooks"))
        self._sq_parts: list[tuple[int, list[Tensor]]] = []
        self._prev: list[Tensor] | None = None
        self._coord: list[Tensor] | None = None
        self._incs: list[tuple[int, list[Tensor]]] = []

    @contextlib.contextmanager
    def step(self, measure: bool = True) -> Iterator[StepScope]:
        """Context for one training step (the :class:`~adabatch.batching.protocol.Estimator`
        protocol): starts a new step, and each ``scope.micro_batch(n)`` calls
        :meth:`accumulate` after its backward pass. With ``track="hooks"`` it sets
        :attr:`enabled` to ``measure`` for the step (and back afterwards), so a step without
        statistics costs a plain step."""
        self.reset()
        previous = self.enabled
        if self.track == "hooks":
            self.enabled = bool(measure)
        try:
            yield StepScope(bool(measure), lambda n: contextlib.nullcontext(), self.accumulate)
        finally:
            self.enabled = previous

    def remove(self) -> None:
        """Remove the gradient hooks of ``track="hooks"`` (no-op for ``"grad"``)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _make_hook(self, i: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            if not self.enabled:
                return
            if self._pend_fired[i]:
                raise RuntimeError(
                    "MicroBatchStats(track='hooks'): a second backward pass reached a "
                    "parameter before accumulate(); call accumulate(n) after every backward "
                    "pass (or set enabled = False)"
                )
            self._pend_fired[i] = True
            self._pend_any = True
            if not self._need_var:
                return
            if torch.is_grad_enabled():  # backward(create_graph=True)
                with torch.no_grad():
                    self._measure(i, grad)
            else:
                self._measure(i, grad)
        return hook

    def _measure(self, i: int, grad: Tensor) -> None:
        g = plain_grad(grad)
        self._pend_norms[i] = sq_norm(g)  # ‖Δ‖²
        if self._need_coord:
            if self._pend_sq is None:
                self._pend_sq = [self._coord_buffer(q) for q in self._hooked]
            self._pend_sq[i].addcmul_(g, g)
        if self._need_ip:
            self._pend_inc[i] = g.clone()

    def _coord_buffer(self, p: Tensor) -> Tensor:
        """A zero coordinate-sum buffer for the hooked parameter ``p``: its dtype, except
        under FSDP2, where the unsharded parameters are in the mixed-precision policy's
        ``param_dtype`` (bfloat16 or float16): at least float32 there, the dtype of the
        sharded parameters and of ḡ, which v_j = (C_j − N·ḡ_j²)/(M − 1) is taken with."""
        if self._fsdp2:
            return torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
        return torch.zeros_like(p)

    def reset(self) -> None:
        """Start a new step: forget the micro-batches accumulated so far."""
        self._fresh = True  # the snapshot buffers are kept across steps, not zeroed
        self._n = 0
        self._m = 0
        self._sq_parts = []
        if self._coord is not None:
            torch._foreach_zero_(self._coord)
        self._incs = []
        self._clear_pending()

    def _clear_pending(self) -> None:
        n = len(self.params)
        self._pend_norms = [None] * n
        self._pend_fired = [False] * n
        self._pend_any = False
        self._pend_inc = [None] * n
        if self._pend_sq is not None:
            torch._foreach_zero_(self._pend_sq)

    def _accumulate_hooked(self, batch_size: int) -> None:
        """:meth:`accumulate` with ``track="hooks"``: the micro-batch's measurements, taken
        in the hooks (without autograd), are filed; nothing here builds a graph."""
        if not self._pend_any:
            self._check_current()  # the likelier cause: parameters replaced after __init__
            raise RuntimeError(
                "MicroBatchStats(track='hooks').accumulate(): no backward pass reached the "
                "parameters since the last accumulate() (gradients set by hand are not seen "
                "by track='hooks'; use track='grad')"
            )
        if self._need_var:
            zero = None
            norms = []
            for t in self._pend_norms:
                if t is None:
                    if zero is None:
                        zero = torch.zeros((), dtype=self.params[0].dtype,
                                           device=self.params[0].device)
                    t = zero
                norms.append(t)
            self._sq_parts.append((batch_size, norms))
            if self._need_coord:
                assert self._pend_sq is not None
                if self._coord is None:
                    self._coord = [self._coord_buffer(p) for p in self._hooked]
                torch._foreach_add_(self._coord, self._pend_sq, alpha=1.0 / batch_size)
            if self._need_ip:
                self._incs.append((batch_size, [
                    t if t is not None else torch.zeros_like(p)
                    for t, p in zip(self._pend_inc, self._hooked)]))
        self._clear_pending()

    @property
    def num_micro_batches(self) -> int:
        """M, the micro-batches accumulated since the last reset."""
        return self._m

    def accumulate(self, batch_size: int) -> None:
        """Record the micro-batch of ``batch_size`` samples whose backward just ran.

        Cost: a few passes over the gradients (foreach kernels), no model-sized
        temporaries: the snapshot of the previous p.grad is turned into the increment in
        place, measured, and overwritten with the new p.grad.
        """
        check_int("batch_size", batch_size)
        if self.track == "hooks":
            self._accumulate_hooked(batch_size)
            self._n += batch_size
            self._m += 1
            return
        with torch.no_grad():
            self._accumulate_grad(batch_size)

    def _accumulate_grad(self, batch_size: int) -> None:
        """:meth:`accumulate` with ``track="grad"``: the increment of p.grad measured."""
        self._n += batch_size
        self._m += 1
        if not self._need_var:
            return
        grads = mean_grads(self.params)
        if self._fresh:
            if self._prev is None:
                self._prev = [torch.empty_like(g) for g in grads]
            incs = grads  # the increment of the first micro-batch is p.grad itself
        else:
            torch._foreach_sub_(self._prev, grads)  # prev − g = −increment
            incs = self._prev
        # ‖Δ_k‖ per tensor; squared, weighted and summed once, in stats()
        self._sq_parts.append((batch_size, torch._foreach_norm(incs, 2)))
        if self._need_coord:
            if self._coord is None:
                self._coord = [torch.zeros_like(g) for g in grads]
            torch._foreach_addcmul_(self._coord, incs, incs, value=1.0 / batch_size)
        if self._need_ip:
            kept = ([t.clone() for t in incs] if self._fresh
                    else list(torch._foreach_neg(incs)))
            self._incs.append((batch_size, kept))
        torch._foreach_copy_(self._prev, grads)
        self._fresh = False

    @torch.no_grad()
    def stats(self) -> GradientStats:
        """The statistics of the accumulated step (reads the final ḡ from p.grad); resets.

        Raises:
            RuntimeError: nothing was accumulated.
            ValueError: a variance is needed and the step had N ≥ 2 samples in a single
                micro-batch (M = 1; with ``reduce``: summed over the processes), which gives
                no variance estimate at all. A step of one sample gives NaN variances
                instead (a test cannot decide; the controller keeps the batch size).
        """
        if self._m == 0:
            raise RuntimeError(
                "MicroBatchStats.stats(): nothing accumulated; call accumulate(n) after each "
                "micro-batch's backward"
            )
        try:
            self._check_current()
            if self.reduce is None:
                self._check_units(self._n, self._m)
            return self._stats()
        finally:
            self.reset()

    def _check_current(self) -> None:
        """Built from a module: its parameters are still the estimator's
        (:class:`~adabatch.batching.protocol.ParamWatch`)."""
        if self._watch is not None:
            self._watch.check()

    def _check_units(self, n: float, m: float) -> None:
        if self._need_var and m < 2 and n >= 2:
            raise ValueError(
                f"MicroBatchStats.stats(): the step had {n:g} samples in {m:g} micro-batch; "
                f"the variances need at least 2 micro-batches per measured step (make the "
                f"batch at least 2 x the micro-batch size, e.g. with granularity = "
                f"micro-batch size and initial >= 2 x it), or use PerSampleStats, which "
                f"measures one batch"
            )

    def _counting_reduce(self, seen: list[Tensor]) -> Reduce | None:
        """``self.reduce``, keeping its first result ([N, M, ...] summed over the processes)
        when this process had one micro-batch: the others may bring more."""
        reduce = self.reduce
        if reduce is None or self._m >= 2 or not self._need_var:
            return reduce

        def counting(flat: Tensor) -> Tensor:
            out = reduce(flat)
            out = flat if out is None else out
            if not seen:
                seen.append(out)
            return out
        return counting

    def _stats(self) -> GradientStats:
        if self._fsdp2:
            return self._stats_sharded()
        gbar = mean_grads(self.params)
        n_loc = self._n
        ip_sums = None
        if self._incs:
            f64 = {"dtype": torch.float64, "device": gbar[0].device}
            q1 = torch.zeros((), **f64)
            q2 = torch.zeros((), **f64)
            for n_k, incs in self._incs:
                dot = sum((torch.dot(d.reshape(-1).double(), g.reshape(-1).double())
                           for d, g in zip(incs, gbar)), torch.zeros((), **f64))
                ip = dot * n_loc / n_k
                q1 += n_k * ip
                q2 += n_k * ip * ip
            ip_sums = (q1, q2)
        coords = None
        if self._need_coord:
            assert self._coord is not None
            coords = self._coord
        # P = Σ_k n_k‖ĝ_k‖² = N² Σ_k ‖Δ_k‖²/n_k from the per-tensor ‖Δ_k‖ (track="grad") or
        # ‖Δ_k‖² (track="hooks") of each micro-batch
        seen: list[Tensor] = []
        out = stats_from_parts(self.needs, gbar, n=n_loc, units=self._m,
                               sq_groups=self._sq_parts, squared=self.track == "hooks",
                               ip_sums=ip_sums, coord_sums=coords,
                               reduce=self._counting_reduce(seen))
        if seen:  # the same reduced counts on every process: all raise, or none
            n_all, m_all = seen[0][:2].tolist()
            self._check_units(n_all, m_all)
        return out

    def _sharded_ip_sums(self) -> tuple[Tensor, Tensor]:
        """(Σ_k n_k ip_k, Σ_k n_k ip_k²) over this rank's micro-batches, ip_k = ⟨ĝ_k, ḡ⟩
        = (N_r/n_k)⟨Δ_k, ḡ⟩ across the whole model: ḡ of one parameter at a time gathered
        from the shards (once per parameter per measured step), dotted with every kept Δ_k
        of it, then freed."""
        f64 = {"dtype": torch.float64, "device": self._hooked[0].device}
        dots = torch.zeros(len(self._incs), **f64)
        for i, p in enumerate(self.params):
            full = _sharded.whole_grad(p).reshape(-1).double()
            for k, (_, incs) in enumerate(self._incs):
                dots[k] += torch.dot(incs[i].reshape(-1).double(), full)
        sizes = torch.tensor([float(n_k) for n_k, _ in self._incs], **f64)
        ip = dots * float(self._n) / sizes
        return (sizes * ip).sum(), (sizes * ip * ip).sum()

    def _stats_sharded(self) -> GradientStats:
        """FSDP2 (see the module docstring): the norms' sums local plus one all-reduce of
        [N, M, P, s1, s2, G]; the coordinate sums reduce-scattered to each rank's shard; ḡ
        gathered one parameter at a time for the inner products."""
        gbar = [_sharded.local_shard(p) for p in self.params]  # this rank's shards of ḡ
        n = self._n
        f64 = {"dtype": torch.float64, "device": gbar[0].device}
        vals = [t for _, parts in self._sq_parts for t in parts]  # ‖Δ_k‖² per tensor
        S = torch.zeros((), **f64)
        if vals:
            weights = torch.tensor([1.0 / w for w, parts in self._sq_parts for _ in parts],
                                   **f64)
            S = (stack_f64(vals) * weights).sum() * n**2
        s1, s2 = self._sharded_ip_sums() if self._need_ip else (None, None)
        coords = None
        if self._need_coord:
            assert self._coord is not None
            coords = self._coord
        assert self.reduce is not None  # invariant: refused in __init__ under FSDP2
        return _sharded.finish_sharded(self.needs, self.params, gbar, n=n, units=self._m,
                                       S=S, s1=s1, s2=s2, coords=coords, reduce=self.reduce,
                                       check=self._check_units)


def _fsdp2_unsharded(model: nn.Module | Iterable[Tensor], params: list[Tensor],
                     needs: frozenset[str], track: str,
                     reduce: Reduce | None) -> list[Tensor] | None:
    """None when no parameter is a DTensor; under FSDP2 the unsharded parameters (aligned
    with ``params``) whose gradient hooks see each rank's micro-batch gradients. Refuses
    what would give a wrong statistic under sharding."""
    where = "MicroBatchStats under FSDP2 (DTensor parameters, fully_shard)"
    if not _sharded.sharded_params(params, where):
        return None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{where} needs the module, not a list of parameters (it hooks the "
                         f"unsharded parameters of its FSDP modules)")
    if track != "hooks":
        raise ValueError(f"{where} needs track='hooks': after a backward p.grad holds this "
                         f"rank's shard of the mean over ranks, not the per-rank micro-batch "
                         f"gradients the statistics are made of")
    if reduce is None:
        raise ValueError(f"{where} needs reduce=, a SUM all-reduce over the ranks: each rank "
                         f"holds only its shard of the mean gradient")
    return _sharded.unsharded_params(model, params, where)
