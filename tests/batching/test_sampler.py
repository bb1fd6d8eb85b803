"""AdaptiveBatchSampler: coverage, resumability, rank independence, DataLoader form."""

from __future__ import annotations

import pickle
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from adabatch.batching.sampler import AdaptiveBatchSampler, epoch_seed


def flat(micro_batches) -> list[int]:
    return [int(i) for mb in micro_batches for i in mb]


def test_take_shapes_and_counters():
    s = AdaptiveBatchSampler(50, 4, seed=3)
    mbs = s.take(12)
    assert len(mbs) == 3 and all(mb.dtype == torch.long and mb.shape == (4,) for mb in mbs)
    assert s.samples_consumed == 12 and s.epoch == pytest.approx(12 / 50)
    s.take(40)
    assert s.samples_consumed == 52 and s.epoch == pytest.approx(52 / 50)


def test_each_epoch_is_a_permutation_from_seed_and_epoch():
    s = AdaptiveBatchSampler(37, 1, seed=5)
    for e in range(3):
        assert sorted(s.permutation(e).tolist()) == list(range(37))
    assert s.permutation(0).tolist() != s.permutation(1).tolist()
    other = AdaptiveBatchSampler(37, 1, seed=5)
    assert other.permutation(2).tolist() == s.permutation(2).tolist()
    assert AdaptiveBatchSampler(37, 1, seed=6).permutation(0).tolist() != s.permutation(
        0).tolist()
    gen = torch.Generator().manual_seed(epoch_seed(5, 1))
    assert s.permutation(1).tolist() == torch.randperm(37, generator=gen).tolist()
    assert len({epoch_seed(a, b) for a in range(20) for b in range(20)}) == 400
    assert AdaptiveBatchSampler(9, 3, shuffle=False).take(9)[0].tolist() == [0, 1, 2]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(4, 60), m=st.integers(1, 4), seed=st.integers(0, 2**31),
       ks=st.lists(st.integers(1, 12), min_size=1, max_size=25))
def test_no_repeat_no_skip_within_epoch_whatever_the_batch_sizes(n, m, seed, ks):
    if n < m:
        return
    s = AdaptiveBatchSampler(n, m, seed=seed)
    stream: list[int] = []
    for k in ks:
        stream += flat(s.take(k * m))
    assert s.samples_consumed == len(stream)
    # cut the consumed stream at epoch boundaries (counted in samples): each full epoch is a
    # permutation, the partial last one has no repeats, and it equals the fixed stream
    for start in range(0, len(stream), n):
        chunk = stream[start:start + n]
        assert len(set(chunk)) == len(chunk)
        if len(chunk) == n:
            assert sorted(chunk) == list(range(n))
        assert chunk == s.permutation(start // n)[: len(chunk)].tolist()


def test_step_crossing_epoch_boundary_continues_into_next_permutation():
    s = AdaptiveBatchSampler(10, 2, seed=1)
    s.take(8)
    crossing = flat(s.take(6))
    assert crossing == s.permutation(0)[8:].tolist() + s.permutation(1)[:4].tolist()
    assert s.epoch == pytest.approx(1.4)


@settings(max_examples=30, deadline=None)
@given(world=st.integers(1, 4), m=st.integers(1, 3), seed=st.integers(0, 1000),
       ks=st.lists(st.integers(1, 5), min_size=1, max_size=12))
def test_global_batches_do_not_depend_on_world_size(world, m, seed, ks):
    n = 23
    if n < world * m:
        return
    single = AdaptiveBatchSampler(n, m, seed=seed)
    ranks = [AdaptiveBatchSampler(n, m, seed=seed, rank=r, world_size=world)
             for r in range(world)]
    for k in ks:
        B = k * world * m
        expected = flat(single.take(B))
        per_rank = [r.take(B) for r in ranks]
        # concatenated round by round: round j = rank 0's j-th micro-batch, rank 1's, ...
        rebuilt = [int(i) for j in range(k) for rank in per_rank for i in rank[j]]
        assert rebuilt == expected
        assert all(r.samples_consumed == single.samples_consumed for r in ranks)


def test_world_2_union_equals_world_1():
    one = AdaptiveBatchSampler(40, 2, seed=9)
    r0 = AdaptiveBatchSampler(40, 2, seed=9, rank=0, world_size=2)
    r1 = AdaptiveBatchSampler(40, 2, seed=9, rank=1, world_size=2)
    for B in (4, 8, 12, 4, 20):
        g = one.global_batch(B)
        assert flat(one.take(B)) == g.tolist()
        a, b = r0.take(B), r1.take(B)
        assert Counter(flat(a) + flat(b)) == Counter(g.tolist())
        assert [int(i) for x, y in zip(a, b) for i in [*x.tolist(), *y.tolist()]] == g.tolist()


def test_mid_epoch_resume_is_exact():
    sizes = [4, 8, 8, 12, 4, 16, 20, 4]
    ref = AdaptiveBatchSampler(30, 4, seed=2)
    expected = [flat(ref.take(B)) for B in sizes]
    s = AdaptiveBatchSampler(30, 4, seed=2)
    got = [flat(s.take(B)) for B in sizes[:3]]
    state = pickle.loads(pickle.dumps(s.state_dict()))
    resumed = AdaptiveBatchSampler(30, 4, seed=2)
    resumed.load_state_dict(state)
    assert resumed.samples_consumed == 20 and resumed.epoch == pytest.approx(20 / 30)
    got += [flat(resumed.take(B)) for B in sizes[3:]]
    assert got == expected
    # resuming with another world size continues the same global stream
    r0 = AdaptiveBatchSampler(30, 2, seed=2, rank=0, world_size=2)
    r1 = AdaptiveBatchSampler(30, 2, seed=2, rank=1, world_size=2)
    r0.load_state_dict(state)
    r1.load_state_dict(state)
    a, b = r0.take(12), r1.take(12)
    assert [int(i) for x, y in zip(a, b) for i in [*x, *y]] == expected[3]


def test_load_state_dict_validation_loses_nothing():
    s = AdaptiveBatchSampler(30, 2, seed=2)
    s.take(4)
    good = s.state_dict()
    for patch, match in [
        ({"seed": 3}, r"saved with seed=3 but this sampler has seed=2"),
        ({"num_samples": 31}, r"saved with num_samples=31"),
        ({"shuffle": False}, r"saved with shuffle=False"),
        ({"samples_consumed": -2}, r"samples_consumed must be an int >= 0, got -2"),
    ]:
        with pytest.raises(ValueError, match=match):
            s.load_state_dict(dict(good, **patch))
        assert s.samples_consumed == 4
    with pytest.raises(ValueError, match=r"missing keys \['samples_consumed'\]"):
        s.load_state_dict({"num_samples": 30, "seed": 2, "shuffle": True})


def test_validation_messages():
    with pytest.raises(ValueError, match=r"num_samples \(5\) must be >= world_size \* "
                                         r"micro_batch \(2 \* 3 = 6\)"):
        AdaptiveBatchSampler(5, 3, world_size=2)
    with pytest.raises(ValueError, match=r"Invalid rank: 2 \(must be in \[0, world_size=2\)\)"):
        AdaptiveBatchSampler(10, 1, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"Invalid micro_batch: 0 \(must be >= 1\)"):
        AdaptiveBatchSampler(10, 0)
    with pytest.raises(ValueError, match=r"Invalid seed: -1"):
        AdaptiveBatchSampler(10, 1, seed=-1)
    with pytest.raises(TypeError, match=r"Invalid num_samples: 10.0 \(must be an int\)"):
        AdaptiveBatchSampler(10.0, 1)
    s = AdaptiveBatchSampler(40, 3, world_size=2)
    for bad in (4, 0, -6, 6.0):
        with pytest.raises(ValueError, match=r"batch_size \(.*\) must be a positive multiple "
                                             r"of world_size \* micro_batch \(2 \* 3 = 6\)"):
            s.take(bad)
    with pytest.raises(ValueError, match=r"must be a positive multiple"):
        s.advance(5)
    assert s.samples_consumed == 0
    with pytest.raises(ValueError, match=r"num_samples \(7\) must be a multiple of "
                                         r"world_size \* micro_batch \(6\)"):
        s.micro_batches(7)


@pytest.mark.parametrize("world, m", [(1, 1), (1, 4), (2, 1), (3, 2)])
def test_take_batch_is_this_ranks_micro_batches_in_one_tensor(world, m):
    """take_batch(B) gives the indices of take(B) concatenated, advances the same, and the
    shares of all ranks make up the global batch (the trainer's whole-batch case: m = 1)."""
    sizes = [world * m, 3 * world * m, 2 * world * m, 5 * world * m]
    shares = []
    for rank in range(world):
        a = AdaptiveBatchSampler(23, m, seed=4, rank=rank, world_size=world)
        b = AdaptiveBatchSampler(23, m, seed=4, rank=rank, world_size=world)
        mine = []
        for B in sizes:
            expected = torch.cat(a.take(B))
            got = b.take_batch(B)
            assert got.dtype == torch.long and got.dim() == 1
            assert torch.equal(got, expected)
            assert b.samples_consumed == a.samples_consumed
            mine.append(got)
        shares.append(mine)
    ref = AdaptiveBatchSampler(23, m, seed=4)
    for k, B in enumerate(sizes):
        whole = ref.global_batch(B)
        ref.advance(B)
        assert sorted(torch.cat([shares[r][k] for r in range(world)]).tolist()) == \
            sorted(whole.tolist())
        if m == 1:  # rank r takes every world-th index of the global batch
            for r in range(world):
                assert shares[r][k].tolist() == whole[r::world].tolist()
    with pytest.raises(ValueError, match=r"must be a positive multiple"):
        AdaptiveBatchSampler(23, m, world_size=world).take_batch(0)


# --------------------------------------------------------------------------------------------
# iterable form
# --------------------------------------------------------------------------------------------


def test_micro_batch_stream_matches_take():
    world, m = 2, 3
    sizes = [6, 18, 12, 6, 30, 12]
    for rank in range(world):
        ref = AdaptiveBatchSampler(25, m, seed=4, rank=rank, world_size=world)
        expected = [mb.tolist() for B in sizes for mb in ref.take(B)]
        s = AdaptiveBatchSampler(25, m, seed=4, rank=rank, world_size=world)
        stream = s.micro_batches(sum(sizes))
        assert len(stream) == len(expected)
        assert list(stream) == expected
        assert list(stream) == expected  # re-iterable from the same start
        assert s.samples_consumed == 0   # iterating never moves the sampler
        # the endless form from a later position
        s.take(6)
        it = iter(s)
        assert [next(it) for _ in range(len(expected) - 1)] == expected[1:]
    with pytest.raises(TypeError, match=r"endless MicroBatchStream has no len"):
        len(AdaptiveBatchSampler(25, m).micro_batches())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_consumer_matches_take(num_workers):
    n, m = 23, 2
    data = torch.arange(n) * 10
    ds = TensorDataset(data, torch.arange(n))
    sizes = [2, 4, 4, 8, 2, 10, 12, 6, 20]  # crosses several epochs
    ref = AdaptiveBatchSampler(n, m, seed=7)
    expected = [ref.take(B) for B in sizes]

    s = AdaptiveBatchSampler(n, m, seed=7)
    loader = DataLoader(ds, batch_sampler=s, num_workers=num_workers)
    batches = iter(loader)
    for B, exp in zip(sizes[:5], expected[:5]):
        got = [next(batches) for _ in range(B // m)]
        assert [y.tolist() for _, y in got] == [e.tolist() for e in exp]
        assert [x.tolist() for x, _ in got] == [(e * 10).tolist() for e in exp]
        s.advance(B)
    assert s.samples_consumed == sum(sizes[:5])
    # resume: a new sampler from the state, a new loader, the same continuation
    state = s.state_dict()
    del batches
    s2 = AdaptiveBatchSampler(n, m, seed=7)
    s2.load_state_dict(state)
    batches = iter(DataLoader(ds, batch_sampler=s2, num_workers=num_workers))
    for B, exp in zip(sizes[5:], expected[5:]):
        got = [next(batches)[1] for _ in range(B // m)]
        assert [y.tolist() for y in got] == [e.tolist() for e in exp]
        s2.advance(B)
    assert s2.samples_consumed == ref.samples_consumed


def test_finite_stream_in_dataloader_has_len():
    s = AdaptiveBatchSampler(10, 2, seed=0)
    loader = DataLoader(TensorDataset(torch.arange(10)), batch_sampler=s.micro_batches(30))
    assert len(loader) == 15
    got = [int(i) for (x,) in loader for i in x]
    assert got == s.stream(0, 30).tolist()
    assert sorted(got[:10]) == list(range(10))


def test_exports():
    import adabatch.batching as B

    assert B.AdaptiveBatchSampler is AdaptiveBatchSampler
