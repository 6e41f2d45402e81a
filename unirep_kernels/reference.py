"""Pure-PyTorch implementation of the op contract: the oracle every backend is tested against.

It is written for clarity, not speed: every statistic is computed in the accumulation
dtype (float64 for float64 inputs, float32 otherwise) with a two-pass (mean, then centred
squares) algorithm, so inputs with a large mean such as ``1e4 + randn`` stay accurate.
Autograd differentiates it directly; no hand-written backward is involved, which is
exactly what makes it a good oracle for the fused backends' backward kernels.

The functions take already-validated arguments (see :mod:`unirep_kernels._checks`); the
public entry points in :mod:`unirep_kernels.ops` validate and then dispatch here when the
``"reference"`` backend is selected. Nothing here reads a value on the host (no ``.item()``,
no data-dependent shapes), so the reference also runs on meta tensors (shapes only) and
under ``FakeTensorMode`` / ``torch.export``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._checks import Domain


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32, float16 and bfloat16 accumulate in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sample_domains(domain: Domain, batch_size: int, device: torch.device) -> Tensor:
    """The domain of every sample as an int64 tensor of shape (N,)."""
    if isinstance(domain, int):
        return torch.full((batch_size,), domain, dtype=torch.long, device=device)
    return domain


def _rows_per_sample(table: Optional[Tensor], rows: Tensor, acc: torch.dtype) -> Optional[Tensor]:
    """(R, C) table -> (N, C) by each sample's row; a (C,) table is shared by all samples."""
    if table is None:
        return None
    table = table.to(acc)
    if table.dim() == 1:
        return table.unsqueeze(0).expand(rows.numel(), -1)
    return table.index_select(0, rows)


def _normalize(xf: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
               bias: Optional[Tensor], relu: bool) -> Tensor:
    """(x - mean) * invstd * weight + bias with every table given per (sample, channel)."""
    y = (xf - mean.unsqueeze(-1)) * invstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.unsqueeze(-1)
    if bias is not None:
        y = y + bias.unsqueeze(-1)
    return torch.relu(y) if relu else y


def output_memory_format(x: Tensor) -> torch.memory_format:
    """The layout every backend gives y and grad_x: x's when x is channels_last (2d or 3d),
    contiguous otherwise."""
    if x.dim() > 2 and not x.is_contiguous():
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format


def _restore(y: Tensor, x: Tensor) -> Tensor:
    """Back to x's shape, dtype and memory format."""
    return y.reshape(x.shape).to(x.dtype).contiguous(memory_format=output_memory_format(x))


def group_moments(x: Tensor, groups: Tensor, num_groups: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Mean and biased variance of every (group, channel), and each group's element count.

    ``groups`` gives each sample's group (int64, (N,)). Returns ``mean`` and ``var`` of shape
    (num_groups, C) in the accumulation dtype (rows of empty groups are 0) and ``count`` of
    shape (num_groups,) (number of values per channel: samples x spatial size).
    """
    acc = accumulation_dtype(x.dtype)
    n, c = x.shape[0], x.shape[1]
    xf = x.to(acc).reshape(n, c, -1)
    spatial = xf.shape[-1]
    # Sums per group with index_add (not a one-hot matmul, where 0 * NaN would leak one
    # domain's NaN into every other domain's statistics).
    zeros = xf.new_zeros((num_groups, c))
    count = xf.new_zeros((num_groups,)).index_add(0, groups, xf.new_full((n,), float(spatial)))
    safe_count = count.clamp(min=1).unsqueeze(-1)
    # First pass: means. Subtracting each plane's first value keeps float32 sums small
    # for inputs with a large offset.
    shift = xf[:, :, :1]
    plane_mean = shift.squeeze(-1) + (xf - shift).mean(-1)
    mean = zeros.index_add(0, groups, plane_mean * spatial) / safe_count
    # Second pass: centred squares around the group mean.
    centred = xf - mean.index_select(0, groups).unsqueeze(-1)
    var = zeros.index_add(0, groups, centred.square().sum(-1)) / safe_count
    return mean, var, count


def domain_batch_norm(x: Tensor, domain: Domain, weight: Optional[Tensor], bias: Optional[Tensor],
                      running_mean: Optional[Tensor], running_var: Optional[Tensor], *,
                      num_domains: int, use_batch_stats: bool, stats_per_domain: bool = True,
                      momentum: float = 0.1, eps: float = 1e-5, relu: bool = False) -> Tensor:
    """Domain-muxed batch normalization (see DESIGN.md, "The op contract")."""
    acc = accumulation_dtype(x.dtype)
    n, c = x.shape[0], x.shape[1]
    xf = x.to(acc).reshape(n, c, -1)
    domains = sample_domains(domain, n, x.device)
    w = _rows_per_sample(weight, domains, acc)
    b = _rows_per_sample(bias, domains, acc)
    if use_batch_stats:
        num_groups = num_domains if stats_per_domain else 1
        groups = domains if stats_per_domain else torch.zeros_like(domains)
        mean, var, count = group_moments(x, groups, num_groups)
        sample_mean = mean.index_select(0, groups)
        sample_invstd = torch.rsqrt(var.index_select(0, groups) + eps)
        if running_mean is not None:
            domain_count = xf.new_zeros((num_domains,)).index_add(0, domains, xf.new_full((n,), float(xf.shape[-1])))
            with torch.no_grad():
                update_running_stats(running_mean, running_var, mean.detach(), var.detach(),
                                     domain_count, momentum)
    else:
        sample_mean = _rows_per_sample(running_mean, domains, acc)
        sample_invstd = torch.rsqrt(_rows_per_sample(running_var, domains, acc) + eps)
    return _restore(_normalize(xf, sample_mean, sample_invstd, w, b, relu), x)


def domain_instance_norm(x: Tensor, domain: Domain, weight: Optional[Tensor], bias: Optional[Tensor],
                         *, num_domains: int, eps: float = 1e-5, relu: bool = False) -> Tensor:
    """Instance normalization followed by the affine of each sample's domain."""
    acc = accumulation_dtype(x.dtype)
    n, c = x.shape[0], x.shape[1]
    xf = x.to(acc).reshape(n, c, -1)
    domains = sample_domains(domain, n, x.device)
    var, mean = torch.var_mean(xf, dim=-1, unbiased=False)
    y = _normalize(xf, mean, torch.rsqrt(var + eps), _rows_per_sample(weight, domains, acc),
                   _rows_per_sample(bias, domains, acc), relu)
    return _restore(y, x)


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                         count: Tensor, momentum: float) -> None:
    """Update running moments in place from the statistics of one batch.

    The oracle of the compiled ``unirep::update_running_stats`` (``csrc/ops.cpp``), written
    as the rule reads: one update per present group, in domain order.

    ``mean``/``var`` (biased) are per stat group: (D, C) when groups are domains, (1, C)
    when the group is the whole batch. ``count`` (D,) is the number of values per channel
    each domain contributed to the batch; a domain with count 0 is absent and its running
    row stays untouched. The variance is stored unbiased (PyTorch's rule, n / (n - 1)).

    - running (D, C), groups per domain: row d takes group d, for every present d.
    - running (D, C), one group: every present domain's row takes the whole-batch group.
    - running (C,), one group: one update.
    - running (C,), groups per domain: one update per present group, in increasing domain
      order, as if the groups had come as consecutive pure batches (round-robin).

    Whether a domain is present is a tensor (``count[d] > 0``) applied with ``torch.where``,
    never read on the host: the loop is over the D domains, whose number is known.
    """
    per_domain_groups = mean.shape[0] == count.numel()  # G == D (also true when D == 1)
    domains = range(count.numel())
    if per_domain_groups:
        updates = [(d, d, count[d], count[d] > 0) for d in domains]  # (running row, group, values, present)
    elif running_mean.dim() == 2:
        updates = [(d, 0, count.sum(), count[d] > 0) for d in domains]
    else:
        updates = [(None, 0, count.sum(), None)]  # the batch is never empty
    for row, g, n, present in updates:
        unbiased = var[g] * n / (n - 1).clamp(min=1)
        rm = running_mean if row is None or running_mean.dim() == 1 else running_mean[row]
        rv = running_var if row is None or running_var.dim() == 1 else running_var[row]
        new_mean = rm * (1 - momentum) + momentum * mean[g].to(rm.dtype)
        new_var = rv * (1 - momentum) + momentum * unbiased.to(rv.dtype)
        rm.copy_(new_mean if present is None else torch.where(present, new_mean, rm))
        rv.copy_(new_var if present is None else torch.where(present, new_var, rv))
