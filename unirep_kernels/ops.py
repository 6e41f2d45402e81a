"""Public functional API of the op contract, its dispatch, and the torch.library
registrations of the compiled ops (fake kernels for tracing, autograd formulas).

Every op runs the same three steps:

1. checks (:mod:`unirep_kernels._checks`), then the backend (:func:`backends.resolve_backend`);
2. the ``"reference"`` backend (:mod:`unirep_kernels.reference`, pure PyTorch), or the
   compiled ops of the chosen entry of the dispatch table :data:`backends.BACKENDS`:
   ``torch.ops.unirep.*`` ("cpp", "cuda"; schemas in ``csrc/ops.cpp``) or
   ``torch.ops.unirep_triton.*`` ("triton"), with the same signatures:

   - ``domain_batch_norm_forward`` / ``_backward``: functional; the forward returns y plus
     the statistics it normalized with (per stat group) and each domain's value count.
   - ``domain_instance_norm_forward`` / ``_backward``.

3. the running-stat update, ``torch.ops.unirep.update_running_stats`` (``csrc/ops.cpp``,
   the one compiled home of the rule; :func:`reference.update_running_stats` is its
   oracle). It mutates ``running_mean`` / ``running_var`` (declared ``Tensor(a!)``) and
   counts the call in ``num_batches_tracked``: it consumes the forward's outputs, so under
   ``torch.compile`` too it runs only after the forward succeeded.

Splitting the running-stat update from the differentiable forward keeps the forward
functional, which is what ``torch.library.register_autograd`` and ``torch.compile`` need.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from . import reference
from ._autograd import register_autograd
from ._checks import Domain, check_batch_norm, check_instance_norm, check_x, host_value_checks, split_domain
from .backends import BACKENDS, extension_loaded, resolve_backend


def domain_batch_norm(x: Tensor, domain: Domain, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                      running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None, *,
                      num_domains: int, use_batch_stats: bool, stats_per_domain: bool = True,
                      momentum: float = 0.1, eps: float = 1e-5, relu: bool = False,
                      backend: Optional[str] = None) -> Tensor:
    """Domain-muxed batch normalization.

    Args:
        x: (N, C, *spatial), float32/float16/bfloat16/float64, contiguous or channels_last.
        domain: an int (pure batch: every sample is from that domain) or an int64 tensor of
            shape (N,) on x's device (mixed batch); see :func:`unirep_kernels.check_domain`.
        weight, bias: (num_domains, C) per domain, (C,) universal, or None.
        running_mean, running_var: (num_domains, C) per-domain moments, (C,) universal, or
            None (not tracked).
        num_domains: number of domains D.
        use_batch_stats: normalize by statistics of the batch itself (training, BN+) and
            update the given running stats in place; False: normalize each sample by the
            running stats of its own domain.
        stats_per_domain: with batch stats, one stat group per domain (True) or the whole
            batch (False).
        momentum, eps: as in ``torch.nn.functional.batch_norm``.
        relu: apply a ReLU to the output in the same pass.
        backend: "auto", "reference", "cpp", "cuda" or "triton"; None follows
            :func:`unirep_kernels.use_backend` / ``UNIREP_BACKEND`` / "auto".

    Returns:
        y with x's shape, dtype and memory format.

    Running stats are updated only for stat groups present in the batch; universal (C,)
    running stats with per-domain groups are updated by each present group in increasing
    domain order. Gradients flow to x, weight and bias. Meta and fake tensors
    (``FakeTensorMode``, ``torch.export``) give y's shape and dtype and leave the running
    stats alone.
    """
    return _batch_norm(x, domain, weight, bias, running_mean, running_var, num_domains=num_domains,
                       use_batch_stats=use_batch_stats, stats_per_domain=stats_per_domain, momentum=momentum, eps=eps,
                       relu=relu, backend=backend)


def _batch_norm(x: Tensor, domain: Domain, weight: Optional[Tensor], bias: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor], *, num_domains: int,
                use_batch_stats: bool, stats_per_domain: bool, momentum: float, eps: float, relu: bool,
                backend: Optional[str], num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """:func:`domain_batch_norm`, and ``num_batches_tracked`` (a counter, or None) incremented
    by one when the call updates the running stats, only if it succeeds (the layers' counter)."""
    check_x("domain_batch_norm", x)
    name = resolve_backend(backend, x.device)
    domain = check_batch_norm(x, domain, weight, bias, running_mean, running_var, num_domains, use_batch_stats,
                              stats_per_domain, momentum, eps, host_values=host_value_checks(name, x.device))
    updates = use_batch_stats and running_mean is not None
    if name == "reference":
        y = reference.domain_batch_norm(x, domain, weight, bias, running_mean, running_var, num_domains=num_domains,
                                        use_batch_stats=use_batch_stats, stats_per_domain=stats_per_domain,
                                        momentum=momentum, eps=eps, relu=relu)
        if updates and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return y
    by_running = not use_batch_stats
    with _below_autograd_unless_needed(x, weight, bias):
        y, mean, var, count = BACKENDS[name].ops().domain_batch_norm_forward(
            x, *split_domain(domain), weight, bias, running_mean if by_running else None,
            running_var if by_running else None, num_domains, use_batch_stats, stats_per_domain, eps, relu)
    if updates:
        update_running_stats(running_mean, running_var, mean, var, count, momentum, num_batches_tracked)
    return y


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, count: Tensor,
                         momentum: float, num_batches_tracked: Optional[Tensor] = None) -> None:
    """In-place update of the running moments from one batch's statistics (the outputs of a
    ``domain_batch_norm_forward`` op), and ``num_batches_tracked += 1``: the compiled op
    ``unirep::update_running_stats``, or, when the extension is not built, the reference's
    loop (the oracle; a host synchronisation per domain on CUDA)."""
    if extension_loaded():
        torch.ops.unirep.update_running_stats(running_mean, running_var, mean, var, count, momentum,
                                              num_batches_tracked)
        return
    with torch.no_grad():
        reference.update_running_stats(running_mean, running_var, mean, var, count, momentum)
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)


def domain_instance_norm(x: Tensor, domain: Domain, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                         *, num_domains: int, eps: float = 1e-5, relu: bool = False,
                         backend: Optional[str] = None) -> Tensor:
    """Instance normalization (statistics per sample and channel over the spatial dims)
    followed by the affine of each sample's domain.

    Arguments as in :func:`domain_batch_norm`; ``weight``/``bias`` are (num_domains, C),
    (C,) or None. Returns y with x's shape, dtype and memory format.
    """
    check_x("domain_instance_norm", x)
    name = resolve_backend(backend, x.device)
    domain = check_instance_norm(x, domain, weight, bias, num_domains, eps,
                                 host_values=host_value_checks(name, x.device))
    if name == "reference":
        return reference.domain_instance_norm(x, domain, weight, bias, num_domains=num_domains, eps=eps, relu=relu)
    with _below_autograd_unless_needed(x, weight, bias):
        y, _, _ = BACKENDS[name].ops().domain_instance_norm_forward(x, *split_domain(domain), weight, bias,
                                                                    num_domains, eps, relu)
    return y


def _below_autograd_unless_needed(*inputs: Optional[Tensor]):
    """Where no gradient can flow (grad mode off, or no input requires grad), skip the
    autograd kernel that ``torch.library.register_autograd`` adds in Python: it would only
    find that and redispatch below autograd, about 10 us per call on a CPU (a fifth of a
    small layer's eval time, docs/benchmarks.md). Not while torch.compile traces: dynamo
    sees the op as registered."""
    if (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)) \
            or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowAutograd()


# --------------------------------------------------------------------------------------
# torch.library registrations for the compiled ops (only when the extension loaded).


def _param_grad_like(p: Optional[Tensor], x: Tensor) -> Tensor:
    if p is not None:
        return torch.empty_like(p, memory_format=torch.contiguous_format)
    return x.new_empty((x.shape[1],), dtype=reference.accumulation_dtype(x.dtype))


def _register() -> None:
    lib = "unirep::"

    @torch.library.register_fake(lib + "domain_batch_norm_forward")
    def _bn_forward_fake(x, domain, pure_domain, weight, bias, running_mean, running_var, num_domains,
                         use_batch_stats, stats_per_domain, eps, relu):
        acc = reference.accumulation_dtype(x.dtype)
        if use_batch_stats:
            rows = num_domains if stats_per_domain else 1
        else:
            rows = running_mean.shape[0] if running_mean.dim() == 2 else 1
        y = torch.empty_like(x, memory_format=reference.output_memory_format(x))
        stats = x.new_empty((rows, x.shape[1]), dtype=acc)
        return y, stats, torch.empty_like(stats), x.new_empty((num_domains,), dtype=acc)

    @torch.library.register_fake(lib + "domain_batch_norm_backward")
    def _bn_backward_fake(grad_y, x, domain, pure_domain, weight, bias, mean, var, count, num_domains,
                          use_batch_stats, stats_per_domain, eps, relu):
        return (torch.empty_like(x, memory_format=reference.output_memory_format(x)), _param_grad_like(weight, x),
                _param_grad_like(bias, x))

    @torch.library.register_fake(lib + "domain_instance_norm_forward")
    def _in_forward_fake(x, domain, pure_domain, weight, bias, num_domains, eps, relu):
        acc = reference.accumulation_dtype(x.dtype)
        stats = x.new_empty((x.shape[0], x.shape[1]), dtype=acc)
        return torch.empty_like(x, memory_format=reference.output_memory_format(x)), stats, torch.empty_like(stats)

    @torch.library.register_fake(lib + "domain_instance_norm_backward")
    def _in_backward_fake(grad_y, x, domain, pure_domain, weight, bias, mean, var, num_domains, eps, relu):
        return (torch.empty_like(x, memory_format=reference.output_memory_format(x)), _param_grad_like(weight, x),
                _param_grad_like(bias, x))

    @torch.library.register_fake(lib + "update_running_stats")
    def _update_fake(running_mean, running_var, mean, var, count, momentum, num_batches_tracked=None):
        return None

    register_autograd("unirep")


if extension_loaded():
    _register()
