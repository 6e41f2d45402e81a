"""Multi-domain samplers: round-robin pure batches, mixed batches, per-rank assignment."""

from __future__ import annotations

import numpy as np
import pytest

from unirep.data import IndexStream, MixedSampler, RoundRobinSampler, allocate_shares

SIZES = [50, 23, 7, 64]


def test_index_stream_epochs_are_permutations():
    s = IndexStream(13, seed=5, domain=2)
    taken = s.take(0, 13 * 3 + 4)
    for e in range(3):
        assert sorted(taken[13 * e:13 * (e + 1)].tolist()) == list(range(13))
    assert not np.array_equal(taken[:13], taken[13:26])        # reshuffled every epoch
    assert np.array_equal(s.take(20, 9), taken[20:29])          # random access = sequential


def test_round_robin_order_and_purity():
    rr = RoundRobinSampler(SIZES, batch_size=8, seed=0)
    doms = [rr.batch(t)[0] for t in range(12)]
    assert doms == [0, 1, 2, 3] * 3
    for t in range(12):
        d, idx = rr.batch(t)
        assert idx.dtype == np.int64 and len(idx) == 8
        assert idx.min() >= 0 and idx.max() < SIZES[d]


def test_round_robin_every_sample_once_per_domain_epoch():
    rr = RoundRobinSampler(SIZES, batch_size=8, seed=3)
    seen = {d: [] for d in range(4)}
    for d, idx in rr.iter(num_steps=4 * 20):
        seen[d].extend(idx.tolist())
    for d, n in enumerate(SIZES):
        stream = seen[d]
        assert len(stream) == 160
        for e in range(len(stream) // n):              # each complete domain epoch
            assert sorted(stream[e * n:(e + 1) * n]) == list(range(n)), (d, e)


def test_round_robin_deterministic_and_seeded():
    a = [idx.tolist() for _, idx in RoundRobinSampler(SIZES, 8, seed=1).iter(num_steps=10)]
    b = [idx.tolist() for _, idx in RoundRobinSampler(SIZES, 8, seed=1).iter(num_steps=10)]
    c = [idx.tolist() for _, idx in RoundRobinSampler(SIZES, 8, seed=2).iter(num_steps=10)]
    assert a == b and a != c
    # resuming from a step gives the same batches
    tail = [idx.tolist() for _, idx in RoundRobinSampler(SIZES, 8, seed=1).iter(start_step=6, num_steps=4)]
    assert tail == a[6:]


@pytest.mark.parametrize("world", [2, 3, 4, 6])
def test_per_rank_assignment_covers_like_one_process(world):
    sizes = [30, 12, 45, 9]
    single = RoundRobinSampler(sizes, 5, seed=7)
    ranks = [RoundRobinSampler(sizes, 5, seed=7, rank=r, world_size=world) for r in range(world)]
    steps = 12
    # global slot j = t * world + r carries exactly the single-process batch j
    for t in range(steps):
        for r in range(world):
            d, idx = ranks[r].batch(t)
            d1, idx1 = single.batch(t * world + r)
            assert d == d1 and np.array_equal(idx, idx1)
            assert ranks[r].domain_at(t) == d
        assert ranks[0].schedule(t) == [ranks[r].batch(t)[0] for r in range(world)]
    if len(sizes) % world == 0:       # world divides D: each rank keeps its own domains
        for r in range(world):
            assert {ranks[r].batch(t)[0] for t in range(steps)} == set(range(r, len(sizes), world))


def test_round_robin_bad_arguments():
    with pytest.raises(ValueError, match="at least one sample"):
        RoundRobinSampler([5, 0], 4)
    with pytest.raises(ValueError, match="rank"):
        RoundRobinSampler([5], 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="permutation"):
        RoundRobinSampler([5, 6], 4, order=[0, 0])
    assert RoundRobinSampler([5, 6, 7], 4, order=[2, 0, 1]).batch(0)[0] == 2


def test_allocate_shares():
    assert allocate_shares(12, [1, 1, 1, 1]) == [3, 3, 3, 3]
    c = allocate_shares(100, [1, 2, 7])
    assert sum(c) == 100 and c[2] > c[1] > c[0] >= 1
    assert allocate_shares(3, [1000, 1, 1]) == [1, 1, 1]     # every domain present
    with pytest.raises(ValueError, match="cannot hold all 4"):
        allocate_shares(3, [1, 1, 1, 1])
    with pytest.raises(ValueError, match="positive"):
        allocate_shares(8, [1, -1])


def test_mixed_batches_hold_every_domain_and_cover_epochs():
    ms = MixedSampler(SIZES, batch_size=20, shares=[2, 1, 1, 1], seed=0)
    assert ms.counts == [8, 4, 4, 4]
    seen = {d: [] for d in range(4)}
    for t in range(30):
        doms, idx = ms.batch(t)
        assert doms.dtype == np.int64 and idx.dtype == np.int64 and len(doms) == 20
        assert np.bincount(doms, minlength=4).tolist() == ms.counts
        assert np.all(np.diff(doms) >= 0)                      # grouped by domain
        for d in range(4):
            part = idx[doms == d]
            assert part.max() < SIZES[d]
            seen[d].extend(part.tolist())
    for d, n in enumerate(SIZES):
        for e in range(len(seen[d]) // n):
            assert sorted(seen[d][e * n:(e + 1) * n]) == list(range(n))


def test_mixed_deterministic_and_ranks_disjoint():
    a = MixedSampler(SIZES, 12, seed=4).batch(3)
    b = MixedSampler(SIZES, 12, seed=4).batch(3)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    r0 = MixedSampler(SIZES, 12, seed=4, rank=0, world_size=2)
    r1 = MixedSampler(SIZES, 12, seed=4, rank=1, world_size=2)
    # ranks split one domain epoch between them: domain 3 (64 samples, 3 per batch)
    got = []
    for t in range(64 // 3 // 2):
        for r in (r0, r1):
            doms, idx = r.batch(t)
            got.extend(idx[doms == 3].tolist())
    assert len(got) == len(set(got))
