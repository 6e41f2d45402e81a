"""Drop-in layers built on the domain-muxed ops, the current-domain context, and
``convert_domain_norm`` for existing models.

Every layer's ``forward(x, domain=None)`` takes the domain explicitly (an int for a pure
batch, an int64 tensor (N,) for a mixed batch) or, with ``domain=None``, from the innermost
``with unirep_kernels.domain(d):`` block, so unmodified models work after conversion.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from ._checks import Domain, check_domain
from .ops import _batch_norm, domain_instance_norm

_domain_stack: List[Domain] = []


@contextlib.contextmanager
def domain(d: Domain) -> Iterator[None]:
    """Make ``d`` the domain of every domain layer called with ``domain=None`` inside."""
    d = check_domain(d, where="unirep_kernels.domain")  # the type here; range and shape at each layer
    _domain_stack.append(d)
    try:
        yield
    finally:
        _domain_stack.pop()


def current_domain() -> Optional[Domain]:
    """The domain set by the innermost :func:`domain` block, or None."""
    return _domain_stack[-1] if _domain_stack else None


def _resolve_domain(layer: nn.Module, d: Optional[Domain]) -> Domain:
    if d is not None:
        return d
    d = current_domain()
    if d is None:
        raise RuntimeError(f"{type(layer).__name__} needs a domain: call it as layer(x, domain) or run the model "
                           "inside `with unirep_kernels.domain(d):`")
    return d


def _check_4d(layer: nn.Module, x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"{type(layer).__name__}: expected a 4D input (N, C, H, W), got shape {tuple(x.shape)}")


def _load_broadcast(module: nn.Module, state_dict, prefix: str, names) -> None:
    """Let a (C,) tensor from a plain norm layer's state dict fill every row of a (D, C) one."""
    for name in names:
        key = prefix + name
        mine = getattr(module, name, None)
        incoming = state_dict.get(key)
        if mine is None or incoming is None or mine.dim() != 2 or incoming.dim() != 1:
            continue
        if incoming.shape[0] == mine.shape[1]:
            state_dict[key] = incoming.unsqueeze(0).expand_as(mine).clone()


def _add_domain(layer: nn.Module, names: Sequence[str], init: Union[str, int]) -> int:
    """Append one domain to ``layer``: one row more in each of its (num_domains, C) tensors
    among ``names`` (universal (C,) ones stay as they are), then ``num_domains += 1``.

    The new row is the mean of the existing rows (``init="mean"``) or a copy of row ``init``.
    The old rows are copied bit for bit, so every existing domain computes exactly what it
    did. A grown parameter is a new ``nn.Parameter`` (``requires_grad`` kept): an optimizer
    built before holds the old one. Returns the new domain's index."""
    where = f"{type(layer).__name__}.add_domain"
    if not (isinstance(init, str) and init == "mean"):
        if isinstance(init, str) or isinstance(init, Tensor):
            raise ValueError(f"{where}: init must be 'mean' or the index of a domain to copy, got {init!r}")
        init = check_domain(init, layer.num_domains, where=f"{where}(init)")
    grown = {}
    for name in names:
        t = getattr(layer, name, None)
        if t is None or t.dim() != 2:
            continue
        if t.shape[0] != layer.num_domains:
            raise ValueError(f"{where}: {name} has {t.shape[0]} rows, expected num_domains={layer.num_domains}")
        with torch.no_grad():
            row = t.mean(0, keepdim=True) if init == "mean" else t[init:init + 1]
            grown[name] = torch.cat([t.detach(), row.to(t.dtype)])
    for name, value in grown.items():  # after every check: all or nothing
        old = getattr(layer, name)
        setattr(layer, name, nn.Parameter(value, requires_grad=old.requires_grad)
                if isinstance(old, nn.Parameter) else value)
    layer.num_domains += 1
    return layer.num_domains - 1


class DomainBatchNorm2d(nn.Module):
    """Batch normalization with per-domain (or universal) scale/bias and moments.

    Args:
        num_features: channels C.
        num_domains: domains D.
        eps, momentum: as in ``nn.BatchNorm2d`` (momentum must be a float).
        affine: learn a scale and bias.
        domain_affine: one scale/bias per domain, (D, C); else one shared, (C,).
        domain_stats: batch statistics per domain and running moments per domain, (D, C);
            else whole-batch statistics and universal running moments, (C,).
        track_running_stats: keep running moments (used at eval).
        batch_stats_at_eval: normalize by batch statistics at eval too (the paper's BN+).
        relu: fuse a ReLU into the output.
        backend: pin a backend for this layer (default: the global selection).
    """

    def __init__(self, num_features: int, num_domains: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, domain_affine: bool = True, domain_stats: bool = True,
                 track_running_stats: bool = True, batch_stats_at_eval: bool = False, relu: bool = False,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        if momentum is None:
            raise ValueError("DomainBatchNorm2d: momentum=None (cumulative average) is not supported; give a float")
        self.num_features, self.num_domains = num_features, num_domains
        self.eps, self.momentum = eps, momentum
        self.affine, self.domain_affine, self.domain_stats = affine, domain_affine, domain_stats
        self.track_running_stats, self.batch_stats_at_eval = track_running_stats, batch_stats_at_eval
        self.relu, self.backend = relu, backend
        param_shape = (num_domains, num_features) if domain_affine else (num_features,)
        stat_shape = (num_domains, num_features) if domain_stats else (num_features,)
        if affine:
            self.weight = nn.Parameter(torch.ones(param_shape))
            self.bias = nn.Parameter(torch.zeros(param_shape))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(stat_shape))
            self.register_buffer("running_var", torch.ones(stat_shape))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def forward(self, x: Tensor, domain: Optional[Domain] = None) -> Tensor:
        _check_4d(self, x)
        d = _resolve_domain(self, domain)
        use_batch_stats = self.training or self.batch_stats_at_eval or not self.track_running_stats
        update = self.training and self.track_running_stats
        stats = (self.running_mean, self.running_var) if (update or not use_batch_stats) else (None, None)
        # The op counts the batch in num_batches_tracked only if it succeeds (under torch.compile
        # too): a failing call leaves every buffer untouched.
        return _batch_norm(x, d, self.weight, self.bias, *stats, num_domains=self.num_domains,
                           use_batch_stats=use_batch_stats, stats_per_domain=self.domain_stats,
                           momentum=self.momentum, eps=self.eps, relu=self.relu, backend=self.backend,
                           num_batches_tracked=self.num_batches_tracked if update else None)


    def add_domain(self, init: Union[str, int] = "mean") -> int:
        """Append one domain: a row more in every per-domain (D, C) tensor, the mean of the
        existing rows (``init="mean"``) or a copy of domain ``init``'s; the old rows stay bit
        for bit. Returns the new domain's index. Grown parameters are new ``nn.Parameter``
        objects: rebuild any optimizer that holds the old ones."""
        return _add_domain(self, ("weight", "bias", "running_mean", "running_var"), init)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _load_broadcast(self, state_dict, prefix, ("weight", "bias", "running_mean", "running_var"))
        key = prefix + "num_batches_tracked"
        if self.num_batches_tracked is not None and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)  # as nn.BatchNorm2d accepts old state dicts
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_domains={self.num_domains}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={'domain' if self.domain_affine else 'universal'}"
                f"{'' if self.affine else ' (off)'}, stats={'domain' if self.domain_stats else 'universal'}, "
                f"track_running_stats={self.track_running_stats}, batch_stats_at_eval={self.batch_stats_at_eval}, "
                f"relu={self.relu}")


class DomainInstanceNorm2d(nn.Module):
    """Instance normalization followed by a per-domain (or universal) scale and bias."""

    def __init__(self, num_features: int, num_domains: int, eps: float = 1e-5, affine: bool = True,
                 domain_affine: bool = True, relu: bool = False, backend: Optional[str] = None) -> None:
        super().__init__()
        self.num_features, self.num_domains, self.eps = num_features, num_domains, eps
        self.affine, self.domain_affine, self.relu, self.backend = affine, domain_affine, relu, backend
        shape = (num_domains, num_features) if domain_affine else (num_features,)
        if affine:
            self.weight = nn.Parameter(torch.ones(shape))
            self.bias = nn.Parameter(torch.zeros(shape))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: Tensor, domain: Optional[Domain] = None) -> Tensor:
        _check_4d(self, x)
        return domain_instance_norm(x, _resolve_domain(self, domain), self.weight, self.bias,
                                    num_domains=self.num_domains, eps=self.eps, relu=self.relu, backend=self.backend)


    def add_domain(self, init: Union[str, int] = "mean") -> int:
        """Append one domain: a row more in every per-domain (D, C) tensor, the mean of the
        existing rows (``init="mean"``) or a copy of domain ``init``'s; the old rows stay bit
        for bit. Returns the new domain's index. Grown parameters are new ``nn.Parameter``
        objects: rebuild any optimizer that holds the old ones."""
        return _add_domain(self, ("weight", "bias"), init)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _load_broadcast(self, state_dict, prefix, ("weight", "bias"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_domains={self.num_domains}, eps={self.eps}, "
                f"affine={'domain' if self.domain_affine else 'universal'}{'' if self.affine else ' (off)'}, "
                f"relu={self.relu}")


class DomainScale2d(nn.Module):
    """The paper's domain-specific scaling layer: y = s_d * x + b_d, per channel."""

    def __init__(self, num_features: int, num_domains: int) -> None:
        super().__init__()
        self.num_features, self.num_domains = num_features, num_domains
        self.weight = nn.Parameter(torch.ones(num_domains, num_features))
        self.bias = nn.Parameter(torch.zeros(num_domains, num_features))

    def forward(self, x: Tensor, domain: Optional[Domain] = None) -> Tensor:
        _check_4d(self, x)
        # On CUDA with device-side checks (the default), index_select validates the indices itself.
        d = check_domain(_resolve_domain(self, domain), self.num_domains, x, where="DomainScale2d")
        if isinstance(d, int):
            w, b = self.weight[d].view(1, -1, 1, 1), self.bias[d].view(1, -1, 1, 1)
        else:
            w = self.weight.index_select(0, d)[:, :, None, None]
            b = self.bias.index_select(0, d)[:, :, None, None]
        return torch.addcmul(b.to(x.dtype), x, w.to(x.dtype))

    def add_domain(self, init: Union[str, int] = "mean") -> int:
        """Append one domain: a row more in every per-domain (D, C) tensor, the mean of the
        existing rows (``init="mean"``) or a copy of domain ``init``'s; the old rows stay bit
        for bit. Returns the new domain's index. Grown parameters are new ``nn.Parameter``
        objects: rebuild any optimizer that holds the old ones."""
        return _add_domain(self, ("weight", "bias"), init)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_domains={self.num_domains}"


def convert_domain_norm(module: nn.Module, num_domains: int, *, domain_affine: bool = True,
                        domain_stats: bool = True, batch_stats_at_eval: bool = False,
                        backend: Optional[str] = None) -> nn.Module:
    """Replace every ``nn.BatchNorm2d``, ``nn.SyncBatchNorm`` and ``nn.InstanceNorm2d`` in
    ``module`` by its domain version, copying weights and running stats into every domain row.

    A ``SyncBatchNorm`` becomes a :class:`DomainBatchNorm2d` (4-d inputs) with the statistics
    semantics of ``python -m unirep.train`` across ranks: each rank normalizes by the
    statistics of its own batch, per domain (a domain is one rank's batch in the paper's
    regime), and the running moments are merged across ranks after each step by
    :class:`unirep.distributed.StatsMerger`, as the trainer does; they are not synchronised
    inside the forward. Any other normalization layer with batch statistics or running
    moments (``BatchNorm1d``/``3d``, ``InstanceNorm1d``/``3d``, lazy ones) is left as it is,
    with one warning naming each module skipped.

    Returns the converted module (``module`` itself is modified in place when it is not a
    norm layer). Run the result with ``with unirep_kernels.domain(d): model(x)``.
    """
    skipped: List[str] = []
    converted = _convert_tree(module, "", num_domains, (domain_affine, domain_stats, batch_stats_at_eval, backend),
                              skipped)
    if skipped:
        warnings.warn(f"convert_domain_norm: left {len(skipped)} normalization layer(s) as they are (only "
                      f"BatchNorm2d, SyncBatchNorm and InstanceNorm2d have domain versions): {', '.join(skipped)}",
                      UserWarning, stacklevel=2)
    return converted


def _convert_tree(m: nn.Module, name: str, num_domains: int, options: Tuple, skipped: List[str]) -> nn.Module:
    converted = _convert_one(m, num_domains, *options)
    if converted is not m:
        return converted
    if isinstance(m, _NormBase) and not _per_sample_function(m):
        skipped.append(f"{name or '(the module itself)'} ({type(m).__name__})")
        return m
    for child_name, child in m.named_children():
        new = _convert_tree(child, f"{name}.{child_name}" if name else child_name, num_domains, options, skipped)
        if new is not child:
            setattr(m, child_name, new)
    return m


def _per_sample_function(m: nn.Module) -> bool:
    """An instance norm without parameters or moments: the same function in every domain."""
    return isinstance(m, nn.modules.instancenorm._InstanceNorm) and not (m.affine or m.track_running_stats)


def _convert_one(m: nn.Module, num_domains: int, domain_affine: bool, domain_stats: bool,
                 batch_stats_at_eval: bool, backend: Optional[str]) -> nn.Module:
    if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        if m.momentum is None:
            raise ValueError(f"convert_domain_norm: {type(m).__name__} with momentum=None is not supported")
        new = DomainBatchNorm2d(m.num_features, num_domains, eps=m.eps, momentum=m.momentum, affine=m.affine,
                                domain_affine=domain_affine, domain_stats=domain_stats,
                                track_running_stats=m.track_running_stats,
                                batch_stats_at_eval=batch_stats_at_eval, backend=backend)
        new.load_state_dict(m.state_dict())
    elif isinstance(m, nn.InstanceNorm2d):
        if m.track_running_stats:
            raise ValueError("convert_domain_norm: InstanceNorm2d with track_running_stats=True is not supported")
        new = DomainInstanceNorm2d(m.num_features, num_domains, eps=m.eps, affine=m.affine,
                                   domain_affine=domain_affine, backend=backend)
        new.load_state_dict(m.state_dict())
    else:
        return m
    ref = next(iter(m.state_dict().values()), None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    for name, p in m.named_parameters(recurse=False):  # keep frozen parameters frozen
        getattr(new, name).requires_grad_(p.requires_grad)
    new.train(m.training)
    return new
