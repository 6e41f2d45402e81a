"""Deterministic multi-domain batch samplers.

Every domain ``d`` owns an endless *index stream*: the concatenation of random
permutations of ``range(n_d)``, one per *domain epoch*, each drawn from
``numpy.random.default_rng([seed, d, epoch])``.  Samplers cut consecutive pieces out of
these streams, so every training sample of a domain is seen exactly once per domain epoch
(a batch may straddle two epochs: batches keep a fixed size).  A sampler is stateless: the
batch of step ``t`` is a pure function of ``(seed, t, rank)``, which makes resuming and
multi-process use trivial (``batch(t)``, or iterate from ``start_step``).

* :class:`RoundRobinSampler` -- the paper's pure batches, domains visited in turn.  With
  ``world_size`` ranks the global schedule is still round-robin: at step ``t`` rank ``r``
  takes domain ``(t * world_size + r) mod D``.  When ``world_size`` divides ``D`` each rank
  keeps a fixed set of domains (rank ``r``: ``r, r + W, ...``), the paper's
  domain-per-GPU assignment; otherwise the assignment rotates so domains stay balanced.
* :class:`MixedSampler` -- every batch holds every domain, in configurable shares.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Iterator

import numpy as np

__all__ = ["IndexStream", "RoundRobinSampler", "MixedSampler", "allocate_shares"]


class IndexStream:
    """The endless stream of sample indices of one domain (see module docstring)."""

    def __init__(self, size: int, seed: int, domain: int):
        if size <= 0:
            raise ValueError(f"domain {domain} has no samples")
        self.size = int(size)
        self.seed = int(seed)
        self.domain = int(domain)
        self._cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        """Order of the samples in domain epoch ``epoch``."""
        perm = self._cache.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, self.domain, epoch]).permutation(self.size)
            if len(self._cache) >= 3:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = perm
        return perm

    def take(self, start: int, count: int) -> np.ndarray:
        """Stream positions ``[start, start + count)`` as int64 sample indices."""
        out = np.empty(count, dtype=np.int64)
        pos, filled = int(start), 0
        while filled < count:
            epoch, off = divmod(pos, self.size)
            n = min(count - filled, self.size - off)
            out[filled:filled + n] = self.permutation(epoch)[off:off + n]
            filled += n
            pos += n
        return out


def _check_common(sizes, batch_size, rank, world_size):
    sizes = [int(s) for s in sizes]
    if not sizes:
        raise ValueError("need at least one domain")
    if any(s <= 0 for s in sizes):
        raise ValueError(f"every domain needs at least one sample, got sizes {sizes}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return sizes


class _Sampler:
    def batch(self, step: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def iter(self, start_step: int = 0, num_steps: int | None = None) -> Iterator:
        """Batches of steps ``start_step, start_step + 1, ...`` (endless if ``num_steps``
        is None)."""
        step = start_step
        end = None if num_steps is None else start_step + num_steps
        while end is None or step < end:
            yield self.batch(step)
            step += 1

    def __iter__(self):
        return self.iter()


class RoundRobinSampler(_Sampler):
    """Pure batches, domains in round-robin order (the paper, section 3.3).

    ``batch(step)`` returns ``(domain, indices)``: the domain index (int) and an int64
    numpy array of ``batch_size`` sample indices into that domain's training split.
    ``order`` optionally permutes the visiting order of the domains.
    """

    def __init__(self, sizes: Sequence[int], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, order: Sequence[int] | None = None):
        self.sizes = _check_common(sizes, batch_size, rank, world_size)
        self.batch_size = int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        d = len(self.sizes)
        self.order = list(range(d)) if order is None else [int(i) for i in order]
        if sorted(self.order) != list(range(d)):
            raise ValueError(f"order must be a permutation of range({d}), got {self.order}")
        self.streams = [IndexStream(n, self.seed, i) for i, n in enumerate(self.sizes)]

    @property
    def num_domains(self) -> int:
        return len(self.sizes)

    def domain_at(self, step: int, rank: int | None = None) -> int:
        """Domain processed by ``rank`` (default: this sampler's rank) at ``step``."""
        rank = self.rank if rank is None else rank
        return self.order[(step * self.world_size + rank) % self.num_domains]

    def schedule(self, step: int) -> list[int]:
        """Domains of all ranks at ``step`` (index = rank)."""
        return [self.domain_at(step, r) for r in range(self.world_size)]

    def batch(self, step: int) -> tuple[int, np.ndarray]:
        slot = step * self.world_size + self.rank
        k, pos = divmod(slot, self.num_domains)
        d = self.order[pos]
        return d, self.streams[d].take(k * self.batch_size, self.batch_size)

    def steps_per_epoch(self) -> int:
        """Steps after which every domain (the largest included) has been seen at least
        once in full, summed over all ranks' batches."""
        per_domain = max(math.ceil(n / self.batch_size) for n in self.sizes)
        return math.ceil(per_domain * self.num_domains / self.world_size)


def allocate_shares(batch_size: int, shares: Sequence[float]) -> list[int]:
    """Split ``batch_size`` into integer counts proportional to ``shares`` (largest
    remainder), each at least 1."""
    shares = [float(s) for s in shares]
    d = len(shares)
    if any(not math.isfinite(s) or s <= 0 for s in shares):
        raise ValueError(f"shares must be positive, got {shares}")
    if batch_size < d:
        raise ValueError(f"a mixed batch of {batch_size} cannot hold all {d} domains")
    total = sum(shares)
    spare = batch_size - d          # one sample per domain is reserved
    exact = [spare * s / total for s in shares]
    counts = [1 + math.floor(e) for e in exact]
    rest = batch_size - sum(counts)
    by_remainder = sorted(range(d), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    for i in by_remainder[:rest]:
        counts[i] += 1
    return counts


class MixedSampler(_Sampler):
    """Mixed batches: every batch holds every domain.

    ``shares`` (default: equal) sets the fraction of the batch given to each domain.
    ``batch(step)`` returns ``(domains, indices)``: two int64 numpy arrays of length
    ``batch_size``, grouped by domain in increasing domain order.
    """

    def __init__(self, sizes: Sequence[int], batch_size: int, shares: Sequence[float] | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        self.sizes = _check_common(sizes, batch_size, rank, world_size)
        self.batch_size = int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        d = len(self.sizes)
        if shares is None:
            shares = [1.0] * d
        if len(shares) != d:
            raise ValueError(f"need one share per domain ({d}), got {len(shares)}")
        self.counts = allocate_shares(self.batch_size, shares)
        self.streams = [IndexStream(n, self.seed, i) for i, n in enumerate(self.sizes)]
        self._domains = np.repeat(np.arange(d, dtype=np.int64), self.counts)

    @property
    def num_domains(self) -> int:
        return len(self.sizes)

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        slot = step * self.world_size + self.rank
        idx = np.concatenate([s.take(slot * c, c) for s, c in zip(self.streams, self.counts)])
        return self._domains.copy(), idx

    def steps_per_epoch(self) -> int:
        """Steps after which every domain has been seen at least once in full."""
        per = max(math.ceil(n / c) for n, c in zip(self.sizes, self.counts))
        return math.ceil(per / self.world_size)
