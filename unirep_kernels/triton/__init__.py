"""The ``"triton"`` backend: Triton kernels for domain-muxed BN, BN+ and IN, forward and
backward, registered as the custom ops ``torch.ops.unirep_triton.*`` (see :mod:`._ops`;
kernels and their byte counts in :mod:`.kernels`, overview in docs/triton.md).

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (slow: tests only).
Imported lazily by :mod:`unirep_kernels.ops` the first time the backend is selected, so
``import unirep_kernels`` never needs triton.

The functions here take arguments already validated by :mod:`unirep_kernels._checks`.
"""

from typing import Optional

import torch
from torch import Tensor

from . import _ops
from ._ops import update_running_stats as _update_running_stats_torch

__all__ = ["domain_batch_norm", "domain_instance_norm", "update_running_stats"]


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, count: Tensor,
                         momentum: float) -> None:
    """The extension's ``unirep::update_running_stats`` when it is loaded (one home for the
    rule), else the same tensor arithmetic in Python. Neither synchronises with the host."""
    from ..backends import extension_loaded

    if extension_loaded():
        torch.ops.unirep.update_running_stats(running_mean, running_var, mean, var, count, momentum)
    else:
        with torch.no_grad():
            _update_running_stats_torch(running_mean, running_var, mean, var, count, momentum)


def domain_batch_norm(x: Tensor, domain_tensor: Optional[Tensor], pure_domain: int, weight: Optional[Tensor],
                      bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor], *,
                      num_domains: int, use_batch_stats: bool, stats_per_domain: bool, momentum: float, eps: float,
                      relu: bool) -> Tensor:
    by_running = not use_batch_stats
    y, mean, var, count = torch.ops.unirep_triton.domain_batch_norm_forward(
        x, domain_tensor, pure_domain, weight, bias, running_mean if by_running else None,
        running_var if by_running else None, num_domains, use_batch_stats, stats_per_domain, eps, relu)
    if use_batch_stats and running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return y


def domain_instance_norm(x: Tensor, domain_tensor: Optional[Tensor], pure_domain: int, weight: Optional[Tensor],
                         bias: Optional[Tensor], *, num_domains: int, eps: float, relu: bool) -> Tensor:
    y, _, _ = torch.ops.unirep_triton.domain_instance_norm_forward(x, domain_tensor, pure_domain, weight, bias,
                                                                   num_domains, eps, relu)
    return y
