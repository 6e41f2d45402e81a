"""Input validation shared by every backend: clear Python exceptions naming the argument.

Checks of shapes, dtypes and devices always run. Checks of values (domain indices in
range, more than one value per channel in every stat group) and of memory addresses need
real data, so they run only on tensors that have it (:func:`has_data`): not on meta or
fake tensors, and not under ``torch.compile``, where the kernels make the value checks
themselves. All checks happen before anything is written, so a failing call leaves
running stats intact.

On CUDA tensors a value check costs a host synchronisation per call. The "cuda" backend
validates the indices on the device instead (a device-side assert), so by default
(:func:`set_domain_check` ``"device"``) it skips the host check; ``"host"`` restores it.
"""

from __future__ import annotations

import numbers
import os
from typing import Optional, Tuple, Union

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

#: A domain argument: an int (a pure batch: every sample is from that domain) or an int64
#: tensor of shape (N,) (a mixed batch: one domain per sample). See :func:`check_domain`.
Domain = Union[int, Tensor]


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


def has_data(t: Tensor) -> bool:
    """Whether ``t``'s values can be read: not a meta tensor, not a fake tensor
    (``FakeTensorMode``, ``torch.export``), and not while ``torch.compile`` traces. Checks
    that need values (domain range, group sizes) or addresses (memory overlap) run only on
    such tensors; everything else (shapes, dtypes, devices) is checked on any tensor."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    return not is_fake(t)


def _expected_domain(x: Optional[Tensor], num_domains: Optional[int]) -> str:
    """What a domain argument may be, for error messages."""
    pure = "an int" if num_domains is None else f"an int in [0, num_domains={num_domains})"
    if x is None:
        return f"{pure} (a pure batch) or an int64 tensor of shape (N,) (a mixed batch)"
    return f"{pure} (a pure batch) or an int64 tensor of shape (N,) = ({x.shape[0]},) on {x.device} (a mixed batch)"


def check_domain(domain: Domain, num_domains: Optional[int] = None, x: Optional[Tensor] = None, *,
                 where: str = "domain", check_values: Optional[bool] = None) -> Domain:
    """Validate a domain argument; returns it as a Python int (pure batch) or an int64
    tensor (mixed batch). The one check of a domain argument, used by the functional ops,
    the layers and :mod:`unirep.models`.

    Args:
        domain: a Python or numpy integer (every sample is from that domain) or an int64
            tensor of shape (N,) on x's device (one domain per sample).
        num_domains: the valid range is [0, num_domains); None checks the type only.
        x: the batch the domain goes with (its N and device); None skips those checks.
        where: the caller, the prefix of every message ("domain_batch_norm", "ResNet38").
        check_values: whether the values of a domain tensor are checked (a host
            synchronisation on CUDA). None follows :func:`set_domain_check` (checked unless
            the tensor is on CUDA in "device" mode, where the kernels check them). Never
            checked on tensors without data (meta, fake, while torch.compile traces).

    Raises:
        TypeError: not an integer or a tensor, a bool, a tensor of another dtype.
        ValueError: out of range, wrong shape, wrong device. Every message names the
            argument, what was expected and what it got.
    """
    if num_domains is not None and (isinstance(num_domains, bool) or not isinstance(num_domains, numbers.Integral)
                                    or num_domains < 1):
        raise ValueError(f"{where}: num_domains must be a positive int, got {num_domains!r}")
    if isinstance(domain, bool):
        raise TypeError(f"{where}: domain must be {_expected_domain(x, num_domains)}; got a bool")
    if isinstance(domain, numbers.Integral):  # int and numpy integers
        domain = int(domain)
        if num_domains is not None and not 0 <= domain < num_domains:
            raise ValueError(f"{where}: domain must lie in [0, num_domains={num_domains}), got {domain}")
        return domain
    if not isinstance(domain, Tensor):
        raise TypeError(f"{where}: domain must be {_expected_domain(x, num_domains)}; got {type(domain).__name__}")
    expected = "int64 with shape (N,)"
    if x is not None:
        expected += f" = ({x.shape[0]},) on {x.device} (x's device)"
    if domain.dtype != torch.int64:
        raise TypeError(f"{where}: domain tensor must be {expected}; got dtype {domain.dtype}")
    if domain.dim() != 1 or (x is not None and domain.shape[0] != x.shape[0]):
        raise ValueError(f"{where}: domain tensor must be {expected}; got shape {tuple(domain.shape)}")
    if x is not None and domain.device != x.device:
        raise ValueError(f"{where}: domain tensor must be {expected}; got device {domain.device}")
    if check_values is None:
        check_values = not (domain.device.type == "cuda" and domain_check_mode() == "device")
    if num_domains is not None and check_values and domain.numel() and has_data(domain):
        low, high = (int(v) for v in torch.aminmax(domain))  # one pass, one host sync on CUDA
        if low < 0 or high >= num_domains:
            raise ValueError(f"{where}: domain values must lie in [0, num_domains={num_domains}), "
                             f"got {low if low < 0 else high}")
    return domain


def split_domain(domain: Domain) -> Tuple[Optional[Tensor], int]:
    """The two forms the compiled ops take: (domain tensor or None, pure domain or -1)."""
    return (None, domain) if isinstance(domain, int) else (domain, -1)


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
                     host_values: bool = True) -> Domain:
    """Every check of ``domain_batch_norm``; returns the domain as an int or an int64 tensor."""
    op = "domain_batch_norm"
    check_x(op, x)
    domain = check_domain(domain, num_domains, x, where=op, check_values=host_values)
    for name, p in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        check_param(op, name, p, x, num_domains)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must be given together (or both None)")
    if running_mean is not None and running_mean.shape != running_var.shape:
        raise ValueError(f"{op}: running_mean {tuple(running_mean.shape)} and running_var "
                         f"{tuple(running_var.shape)} must have the same shape")
    # Aliasing matters only where the running stats are written (batch statistics update
    # them in place); eval only reads them. Real storage only.
    if use_batch_stats and running_mean is not None and has_data(running_mean) and has_data(running_var):
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
        _check_group_sizes(op, x, domain, num_domains, stats_per_domain, host_values)
    return domain


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


def _check_group_sizes(op: str, x: Tensor, domain: Domain, num_domains: int, stats_per_domain: bool,
                       host_values: bool) -> None:
    """Batch statistics need more than one value per channel in every stat group present."""
    values_per_sample = x.numel() // (x.shape[0] * x.shape[1])
    if isinstance(domain, int) or not stats_per_domain:
        if x.shape[0] * values_per_sample <= 1:
            raise ValueError(f"{op}: expected more than 1 value per channel when using batch statistics "
                             f"(training), got input of shape {tuple(x.shape)}")
        return
    if values_per_sample > 1 or not host_values or not has_data(domain):
        return
    counts = torch.bincount(domain, minlength=num_domains)
    single = (counts == 1).nonzero()
    if single.numel():
        raise ValueError(f"{op}: expected more than 1 value per channel in every domain's stat group when using "
                         f"batch statistics (training); domain {int(single[0])} has a single {tuple(x.shape[1:])} "
                         f"sample")


def check_instance_norm(x: Tensor, domain, weight, bias, num_domains: int, eps: float,
                        host_values: bool = True) -> Domain:
    """Every check of ``domain_instance_norm``; returns the domain as an int or an int64 tensor."""
    op = "domain_instance_norm"
    check_x(op, x)
    domain = check_domain(domain, num_domains, x, where=op, check_values=host_values)
    check_param(op, "weight", weight, x, num_domains)
    check_param(op, "bias", bias, x, num_domains)
    _check_number(op, "eps", eps)
    if not eps > 0:
        raise ValueError(f"{op}: eps must be positive, got {eps}")
    if x.numel() // (x.shape[0] * x.shape[1]) <= 1:
        raise ValueError(f"{op}: expected more than 1 spatial value per channel, got input of shape {tuple(x.shape)}")
    return domain
