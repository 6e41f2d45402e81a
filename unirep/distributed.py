"""Multi-domain bookkeeping for training on one process or many (``torchrun``).

Three things the paper's regime (section 3.3) needs beyond plain data parallelism:

* **Which tensor (row) belongs to which domain** (:func:`domain_layout`): a per-domain
  normalization parameter/moment of shape ``(D, C)`` has one row per domain; the classifier
  of :class:`~unirep.models.DomainHeads` has ``K_d`` rows per domain; every tensor inside a
  :class:`~unirep.models.PerDomain` copy belongs to that copy's domain; the rest is shared.
* **Domain-specific parameters change only from their own domains**
  (:class:`DomainMaskedStep`): the kernels already give zero gradient rows to absent
  domains, but SGD's weight decay and momentum would still move them.  At a step where a
  domain has no sample in the *global* batch (all ranks / sub-batches), its rows (and its
  momentum-buffer rows) are left exactly as they were: as if every domain-specific tensor
  had its own optimizer that steps only on its domain's batches.  Shared parameters always
  step (weight decay included).
* **Per-domain running statistics across ranks** (:class:`StatsMerger`): DDP's buffer
  broadcast would overwrite, with rank 0's copy, the moments of the domains rank 0 did not
  see.  It is turned off and the statistics are merged explicitly after every step: a row of
  domain ``d`` becomes the sample-weighted average ``sum_r w_rd * row_r`` with
  ``w_rd = n_rd / sum_r n_rd`` (``n_rd``: samples of domain ``d`` in rank ``r``'s batch),
  over the ranks that saw ``d``; rows of domains nobody saw keep their value.  With pure
  round-robin batches and ``world_size <= D`` (the paper's domain-per-GPU setting) at most
  one rank sees a domain in a step, so its row is exactly that rank's EMA update: what one
  process computes when it forwards the same batches with the same weights (gradient
  accumulation, ``--accumulate``).  When several ranks see a domain in one step (mixed
  batches, or more ranks than domains) the merged row is one EMA update with the
  sample-weighted mean of the ranks' batch moments (exact for the means; the variances lack
  the between-rank spread of the means, as with unsynchronised BN).  Universal moments
  ``(C,)`` are merged the same way with all samples as weights.  A single process that
  accumulates ``K`` sub-batches per step applies the very same rule (each sub-batch starts
  from the step's statistics), so ``--accumulate K`` on one process and ``K`` ranks give the
  same model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from unirep_kernels import DomainBatchNorm2d, DomainInstanceNorm2d, DomainScale2d

__all__ = ["Layout", "domain_layout", "DomainMaskedStep", "StatsMerger", "init_distributed",
           "is_distributed", "rank", "world_size", "all_reduce_sum", "has_per_domain_copies"]

_NORMS = (DomainBatchNorm2d, DomainInstanceNorm2d, DomainScale2d)


@dataclass
class Layout:
    """How one tensor relates to the domains.

    kind: ``"shared"`` (every domain), ``"owned"`` (all of it belongs to ``owner``) or
    ``"rows"`` (row ``i`` of dim 0 belongs to domain ``row_domain[i]``).
    """
    kind: str
    owner: int = -1
    row_domain: Optional[torch.Tensor] = None


def _per_domain_class():
    from unirep.models import DomainHeads, PerDomain
    return DomainHeads, PerDomain


def has_per_domain_copies(model: nn.Module) -> bool:
    """Whether ``model`` has domain-specific sub-networks (sharing none / partial-*), whose
    parameters are unused by other domains' pure batches (DDP needs
    ``find_unused_parameters=True``)."""
    _, PerDomain = _per_domain_class()
    return any(isinstance(m, PerDomain) for m in model.modules())


def domain_layout(model: nn.Module, num_domains: int) -> Dict[str, Layout]:
    """Map every parameter and buffer name of ``model`` (``named_parameters`` /
    ``named_buffers`` names) to its :class:`Layout`."""
    DomainHeads, PerDomain = _per_domain_class()
    out: Dict[str, Layout] = {}

    def visit(module: nn.Module, prefix: str, owner: int) -> None:
        if isinstance(module, PerDomain):
            for d, copy in enumerate(module.copies):
                visit(copy, f"{prefix}copies.{d}.", d)
            return
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t is None:
                continue
            full = prefix + name
            if owner >= 0:
                out[full] = Layout("owned", owner=owner)
            elif isinstance(module, DomainHeads) and name in ("weight", "bias"):
                rd = torch.repeat_interleave(torch.arange(len(module.num_classes)),
                                             torch.tensor(module.num_classes))
                out[full] = Layout("rows", row_domain=rd)
            elif (isinstance(module, _NORMS) and name in ("weight", "bias", "running_mean", "running_var")
                  and t.dim() == 2 and t.shape[0] == num_domains and num_domains > 1):
                out[full] = Layout("rows", row_domain=torch.arange(num_domains))
            else:
                out[full] = Layout("shared")
        for cname, child in module.named_children():
            visit(child, f"{prefix}{cname}.", owner)

    visit(model, "", -1)
    return out


# ----------------------------------------------------------------------------- process group

def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_distributed(device: str) -> tuple[int, int, int]:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1): NCCL on
    CUDA, gloo on CPU.  Returns ``(rank, world_size, local_rank)``."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws <= 1:
        return 0, 1, 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not is_distributed():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), local


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# ----------------------------------------------------------------------------- masked step

class DomainMaskedStep:
    """Run ``optimizer.step()`` so that tensors/rows of the domains absent from the global
    batch (``present[d]`` false) keep their values and momentum buffers bit for bit."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, num_domains: int):
        self.optimizer = optimizer
        self.num_domains = num_domains
        layout = domain_layout(model, num_domains)
        self.owned: List[tuple[torch.Tensor, int]] = []
        self.rows: List[tuple[torch.Tensor, torch.Tensor]] = []
        for name, p in model.named_parameters():
            lay = layout.get(name, Layout("shared"))
            if lay.kind == "owned":
                self.owned.append((p, lay.owner))
            elif lay.kind == "rows":
                self.rows.append((p, lay.row_domain.to(p.device)))

    def step(self, present: torch.Tensor) -> None:
        present = present.bool().cpu()
        if bool(present.all()):
            self.optimizer.step()
            return
        for p, d in self.owned:
            if not bool(present[d]):
                p.grad = None  # SGD skips it: no decay, no momentum
        saved = []
        for p, rd in self.rows:
            if p.grad is None:
                continue
            absent = ~present.to(rd.device)[rd]
            if not bool(absent.any()):
                continue
            st = self.optimizer.state.get(p, {})
            buf = st.get("momentum_buffer")
            saved.append((p, absent, p.detach()[absent].clone(),
                          None if buf is None else buf[absent].clone()))
        self.optimizer.step()
        with torch.no_grad():
            for p, absent, old, old_buf in saved:
                p[absent] = old
                buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    buf[absent] = 0 if old_buf is None else old_buf


# ----------------------------------------------------------------------------- stats merge

class StatsMerger:
    """Merge running statistics of several sub-batches (one per rank, or one per
    accumulation slot on a single process) as described in the module docstring."""

    def __init__(self, model: nn.Module, num_domains: int):
        layout = domain_layout(model, num_domains)
        self.num_domains = num_domains
        self.entries: List[tuple[str, torch.Tensor, Layout]] = []
        for name, b in model.named_buffers():
            if name.rsplit(".", 1)[-1] in ("running_mean", "running_var") and b is not None:
                self.entries.append((name, b, layout.get(name, Layout("shared"))))

        # num_batches_tracked counts, on every rank, the batches of all ranks that went
        # through the layer (what one process accumulating them counts)
        self.counters = [b for name, b in model.named_buffers()
                         if name.rsplit(".", 1)[-1] == "num_batches_tracked" and b is not None]
        self._counter_start: Optional[torch.Tensor] = None

    def start_step(self) -> None:
        """Remember the batch counters at the start of a distributed step."""
        if is_distributed() and self.counters:
            self._counter_start = torch.stack([c.detach().cpu().reshape(()) for c in self.counters])

    def __bool__(self) -> bool:
        return bool(self.entries)

    def snapshot(self) -> List[torch.Tensor]:
        return [b.detach().clone() for _, b, _ in self.entries]

    def restore(self, snap: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for (_, b, _), s in zip(self.entries, snap):
                b.copy_(s)

    def _weights(self, lay: Layout, counts: torch.Tensor, total: torch.Tensor, b: torch.Tensor):
        """Per-row weight of this contribution (shape broadcastable to b) and the mask of
        rows that anybody updated."""
        if lay.kind == "rows":
            n, tot = counts[lay.row_domain], total[lay.row_domain]
        elif lay.kind == "owned":
            n, tot = counts[lay.owner:lay.owner + 1], total[lay.owner:lay.owner + 1]
        else:
            n, tot = counts.sum().reshape(1), total.sum().reshape(1)
        seen = tot > 0
        w = torch.where(seen, n / tot.clamp_min(1), torch.zeros_like(n))
        shape = (-1,) + (1,) * (b.dim() - 1) if lay.kind == "rows" else (1,) * max(b.dim(), 1)
        return w.to(b.dtype).to(b.device).reshape(shape), seen.to(b.device).reshape(shape)

    def merge_local(self, start: Sequence[torch.Tensor], results: Sequence[Sequence[torch.Tensor]],
                    counts: Sequence[torch.Tensor]) -> None:
        """Single process: ``results[k]`` are the statistics after sub-batch ``k`` (each
        started from ``start``), ``counts[k]`` its per-domain sample counts."""
        total = torch.stack(list(counts)).sum(0).double()
        with torch.no_grad():
            for i, (_, b, lay) in enumerate(self.entries):
                acc = torch.zeros_like(b)
                seen = None
                for res, c in zip(results, counts):
                    w, seen = self._weights(lay, c.double(), total, b)
                    acc = acc + w * res[i]
                b.copy_(torch.where(seen, acc, start[i]).reshape(b.shape))

    def merge_ranks(self, local_counts: torch.Tensor, global_counts: torch.Tensor) -> None:
        """Distributed: every rank holds its own updated statistics (all started from the
        same values); replace them by the merged ones on every rank."""
        if not is_distributed():
            return
        if self.counters and self._counter_start is not None:
            now = torch.stack([c.detach().cpu().reshape(()) for c in self.counters])
            delta = (now - self._counter_start).to(self.counters[0].device)
            dist.all_reduce(delta, op=dist.ReduceOp.SUM)
            with torch.no_grad():
                for c, old, dlt in zip(self.counters, self._counter_start, delta):
                    c.fill_(int(old) + int(dlt))
            self._counter_start = None
        if not self.entries:
            return
        contribs = []
        seens = []
        with torch.no_grad():
            for _, b, lay in self.entries:
                w, seen = self._weights(lay, local_counts.double(), global_counts.double(), b)
                contribs.append((w * b).reshape(-1))
                seens.append(seen)
            flat = torch.cat(contribs)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            off = 0
            for (_, b, _), seen in zip(self.entries, seens):
                n = b.numel()
                merged = flat[off:off + n].reshape(b.shape)
                off += n
                b.copy_(torch.where(seen, merged, b))
