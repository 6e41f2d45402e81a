"""Input validation shared by every backend: clear Python exceptions naming the argument.

Checks of shapes, dtypes and devices always run. Checks of values (domain indices in
range, more than one value per channel in every stat group) need the data, so they run in
eager mode only; under ``torch.compile`` the kernels make the same checks themselves. All
checks happen before anything is written, so a failing call leaves running stats intact.

On CUDA tensors a value check costs a host synchronisation per call. The "cuda" backend
validates the indices on the device instead (a device-side assert), so by default
(:func:`set_domain_check` ``"device"``) it skips the host check; ``"host"`` restores it.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


DOMAIN_CHECK_MODES = ("device", "host")
_domain_check: Optional[str] = None  # None: follow UNIREP_DOMAIN_CHECK (default "device")


def _check_mode(mode: str, source: str) -> str:
    if mode not in DOMAIN_CHECK_MODES:
        raise ValueError(f"{source} must be one of {DOMAIN_CHECK_MODES}, got {mode!r}")
    return mode


def domain_check_mode() -> str:
    """The mode in force: :func:`set_domain_check`'s, else ``UNIREP_DOMAIN_CHECK``, else "device"."""
    if _domain_check is not None:
        return _domain_check
    return _check_mode(os.environ.get("UNIREP_DOMAIN_CHECK", "device") or "device", "UNIREP_DOMAIN_CHECK")


def set_domain_check(mode: Optional[str]) -> Optional[str]:
    """Where the "cuda" backend checks the values of a domain index tensor.

    - ``"device"`` (default): in its kernels, with no host synchronisation. An index outside
      [0, num_domains) stops the kernel with a device-side assert: a ``RuntimeError``
      ("device-side assert triggered") at the next synchronisation, after which the CUDA
      context is unusable (as with an out-of-range index in ``torch.nn.functional.embedding``).
    - ``"host"``: also in Python before the launch, raising a ``ValueError`` that names the
      bad value, at the cost of one host synchronisation per call.

    CPU tensors and the other backends are always checked on the host (free on the CPU).
    ``None`` returns to the ``UNIREP_DOMAIN_CHECK`` environment variable. Returns the
    previous setting.
    """
    global _domain_check
    previous = _domain_check
    _domain_check = None if mode is None else _check_mode(mode, "set_domain_check(mode)")
    return previous


def host_value_checks(backend: str, device: torch.device) -> bool:
    """Whether a call's domain values are checked on the host (see :func:`set_domain_check`)."""
    return not (device.type == "cuda" and backend == "cuda" and domain_check_mode() == "device")


def check_x(op: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{op}: x must have shape (N, C, *spatial), got ndim={x.dim()} (shape {tuple(x.shape)})")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: x has unsupported dtype {x.dtype}; expected float32, float16, bfloat16 or float64")
    if x.numel() == 0:
        raise ValueError(f"{op}: x must not be empty, got shape {tuple(x.shape)}")


def check_domain(op: str, x: Tensor, domain: Union[int, Tensor], num_domains: int,
                 host_values: bool = True) -> Tuple[Optional[Tensor], int]:
    """Returns (domain tensor or None, pure domain or -1): the two forms the kernels take.
    ``host_values=False`` leaves the values of a domain tensor to the kernels."""
    if isinstance(num_domains, bool) or not isinstance(num_domains, int) or num_domains < 1:
        raise ValueError(f"{op}: num_domains must be a positive int, got {num_domains!r}")
    if isinstance(domain, bool):
        raise TypeError(f"{op}: domain must be an int or an int64 tensor, got bool")
    if isinstance(domain, int):
        if not 0 <= domain < num_domains:
            raise ValueError(f"{op}: domain must lie in [0, num_domains={num_domains}), got {domain}")
        return None, domain
    if not isinstance(domain, Tensor):
        raise TypeError(f"{op}: domain must be an int or an int64 tensor of shape (N,), got {type(domain).__name__}")
    if domain.dtype != torch.int64:
        raise TypeError(f"{op}: domain tensor must have dtype torch.int64, got {domain.dtype}")
    if domain.dim() != 1 or domain.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: domain tensor must have shape (N,) = ({x.shape[0]},), got {tuple(domain.shape)}")
    if domain.device != x.device:
        raise ValueError(f"{op}: domain tensor is on {domain.device} but x is on {x.device}")
    if host_values and not _is_compiling():
        low, high = int(domain.min()), int(domain.max())
        if low < 0 or high >= num_domains:
            bad = low if low < 0 else high
            raise ValueError(f"{op}: domain values must lie in [0, num_domains={num_domains}), got {bad}")
    return domain, -1


def check_param(op: str, name: str, p: Optional[Tensor], x: Tensor, num_domains: int) -> None:
    """weight/bias/running stats: None, (num_domains, C) per domain, or (C,) universal."""
    if p is None:
        return
    if not isinstance(p, Tensor):
        raise TypeError(f"{op}: {name} must be a tensor or None, got {type(p).__name__}")
    c = x.shape[1]
    if tuple(p.shape) not in ((num_domains, c), (c,)):
        raise ValueError(f"{op}: {name} must have shape (num_domains, C) = ({num_domains}, {c}) or (C,) = ({c},), "
                         f"got {tuple(p.shape)}")
    if not p.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {p.dtype}")
    if p.device != x.device:
        raise ValueError(f"{op}: {name} is on {p.device} but x is on {x.device}")


def check_batch_norm(x: Tensor, domain, weight, bias, running_mean, running_var, num_domains: int,
                     use_batch_stats: bool, stats_per_domain: bool, momentum: float, eps: float,
                     host_values: bool = True) -> Tuple[Optional[Tensor], int]:
    op = "domain_batch_norm"
    check_x(op, x)
    domain_tensor, pure = check_domain(op, x, domain, num_domains, host_values)
    for name, p in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        check_param(op, name, p, x, num_domains)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must be given together (or both None)")
    if running_mean is not None and running_mean.shape != running_var.shape:
        raise ValueError(f"{op}: running_mean {tuple(running_mean.shape)} and running_var "
                         f"{tuple(running_var.shape)} must have the same shape")
    if running_mean is not None and not _is_compiling():  # memory addresses: eager only
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride())):
                raise ValueError(f"{op}: {name} has elements that share memory (an expanded view?); "
                                 "running stats are updated in place and need their own storage")
        if _memory_ranges_overlap(running_mean, running_var):
            raise ValueError(f"{op}: running_mean and running_var must not share memory")
    if not use_batch_stats and running_mean is None:
        raise ValueError(f"{op}: use_batch_stats=False normalizes by running_mean/running_var, which are None")
    _check_number(op, "eps", eps)
    _check_number(op, "momentum", momentum)
    if not eps > 0:
        raise ValueError(f"{op}: eps must be positive, got {eps}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{op}: momentum must lie in [0, 1], got {momentum}")
    if use_batch_stats:
        _check_group_sizes(op, x, domain_tensor, num_domains, stats_per_domain, host_values)
    return domain_tensor, pure


def _memory_ranges_overlap(a: Tensor, b: Tensor) -> bool:
    """Whether the byte ranges spanned by two tensors intersect (conservative)."""
    def span(t):
        start = t.data_ptr()
        extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1
        return start, start + extent * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _check_number(op: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a float, got {type(value).__name__}")


def _check_group_sizes(op: str, x: Tensor, domain_tensor: Optional[Tensor], num_domains: int,
                       stats_per_domain: bool, host_values: bool) -> None:
    """Batch statistics need more than one value per channel in every stat group present."""
    values_per_sample = x.numel() // (x.shape[0] * x.shape[1])
    if domain_tensor is None or not stats_per_domain:
        if x.shape[0] * values_per_sample <= 1:
            raise ValueError(f"{op}: expected more than 1 value per channel when using batch statistics "
                             f"(training), got input of shape {tuple(x.shape)}")
        return
    if values_per_sample > 1 or not host_values or _is_compiling():
        return
    counts = torch.bincount(domain_tensor, minlength=num_domains)
    single = (counts == 1).nonzero()
    if single.numel():
        raise ValueError(f"{op}: expected more than 1 value per channel in every domain's stat group when using "
                         f"batch statistics (training); domain {int(single[0])} has a single {tuple(x.shape[1:])} "
                         f"sample")


def check_instance_norm(x: Tensor, domain, weight, bias, num_domains: int, eps: float,
                        host_values: bool = True) -> Tuple[Optional[Tensor], int]:
    op = "domain_instance_norm"
    check_x(op, x)
    domain_tensor, pure = check_domain(op, x, domain, num_domains, host_values)
    check_param(op, "weight", weight, x, num_domains)
    check_param(op, "bias", bias, x, num_domains)
    _check_number(op, "eps", eps)
    if not eps > 0:
        raise ValueError(f"{op}: eps must be positive, got {eps}")
    if x.numel() // (x.shape[0] * x.shape[1]) <= 1:
        raise ValueError(f"{op}: expected more than 1 spatial value per channel, got input of shape {tuple(x.shape)}")
    return domain_tensor, pure
