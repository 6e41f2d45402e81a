"""Export one domain of a universal network as a plain PyTorch module: standard ``torch.nn``
layers only, no :mod:`unirep_kernels`, loadable with torch alone (:func:`export_domain`)."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from unirep_kernels import DomainBatchNorm2d, DomainInstanceNorm2d, DomainScale2d

from .lifecycle import one_domain
from .models.common import ChannelAffine, DomainHeads, DomainSequential, GlobalPool, PerDomain, SharedHead
from .models.resnet import PreActUnit, ResNet38, Stem

__all__ = ["export_domain"]


class _Residual(nn.Module):
    """``pre`` then ``branch + shortcut``: a pre-activation unit, ``shortcut`` taking the
    pre-activated input (a projection) or, when None, the unit's input itself. Only the
    exported graph's builder uses it: :func:`torch.fx.symbolic_trace` inlines it."""

    def __init__(self, pre: nn.Module, branch: nn.Module, shortcut: Optional[nn.Module]) -> None:
        super().__init__()
        self.pre, self.branch, self.shortcut = pre, branch, shortcut

    def forward(self, x: Tensor) -> Tensor:
        a = self.pre(x)
        identity = x if self.shortcut is None else self.shortcut(a)
        return self.branch(a) + identity


def _row(t: Optional[Tensor], row: int) -> Optional[Tensor]:
    """A domain's (C,) slice of a (D, C) tensor; a universal (C,) tensor as it is."""
    if t is None:
        return None
    return (t[row] if t.dim() == 2 else t).detach()


def _affine_of(layer: nn.Module, row: int) -> Optional[Tuple[Tensor, Tensor]]:
    """``(scale, shift)`` in float64 with ``layer(x) == scale * x + shift`` per channel at
    eval (before any fused ReLU), or None when the layer depends on the batch or the image
    (batch statistics at test, instance normalization)."""
    if isinstance(layer, DomainBatchNorm2d):
        if layer.batch_stats_at_eval or not layer.track_running_stats:
            return None
        mean = _row(layer.running_mean, row).double()
        var = _row(layer.running_var, row).double()
        inv = torch.rsqrt(var + layer.eps)
        w = _row(layer.weight, row)
        b = _row(layer.bias, row)
        scale = inv if w is None else w.double() * inv
        shift = -mean * scale + (0.0 if b is None else b.double())
        return scale, shift
    if isinstance(layer, DomainScale2d):
        return _row(layer.weight, row).double(), _row(layer.bias, row).double()
    if isinstance(layer, ChannelAffine):
        return layer.weight.detach().double(), layer.bias.detach().double()
    if isinstance(layer, DomainInstanceNorm2d):
        return None
    raise TypeError(f"export_domain: no plain equivalent for {type(layer).__name__}")


def _set(module: nn.Module, name: str, value: Tensor, like: Tensor) -> None:
    getattr(module, name).data.copy_(value.to(dtype=like.dtype, device=like.device))


def _affine_module(scale: Tensor, shift: Tensor, like: Tensor) -> nn.BatchNorm2d:
    """y = scale * x + shift per channel as a standard layer: an eval-mode BatchNorm2d whose
    moments are 0 and 1 and whose eps is 0, so that its weight and bias are the scale and
    the shift exactly."""
    bn = nn.BatchNorm2d(scale.numel(), eps=0.0).to(device=like.device, dtype=like.dtype)
    _set(bn, "weight", scale, like)
    _set(bn, "bias", shift, like)
    return bn


def _norm_module(layer: nn.Module, row: int, like: Tensor) -> nn.Module:
    """The plain layer computing ``layer`` (without its fused ReLU) for one domain."""
    affine = _affine_of(layer, row)
    if affine is not None:
        return _affine_module(*affine, like)
    w, b = _row(layer.weight, row), _row(layer.bias, row)
    if isinstance(layer, DomainBatchNorm2d):  # batch statistics at test (BN+): they stay
        m = nn.BatchNorm2d(layer.num_features, eps=layer.eps, affine=w is not None, track_running_stats=False)
    else:  # instance statistics cannot be folded: a plain InstanceNorm2d with the domain's affine
        m = nn.InstanceNorm2d(layer.num_features, eps=layer.eps, affine=w is not None)
    m = m.to(device=like.device, dtype=like.dtype)
    if w is not None:
        _set(m, "weight", w, like)
        _set(m, "bias", b, like)
    return m


def _relu(layer: nn.Module) -> List[nn.Module]:
    # In place: it always follows a module that made a fresh tensor (a conv or a norm).
    return [nn.ReLU(inplace=True)] if getattr(layer, "relu", False) else []


def _conv_copy(conv: nn.Conv2d, weight: Tensor, bias: Optional[Tensor]) -> nn.Conv2d:
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=bias is not None, padding_mode=conv.padding_mode)
    new = new.to(device=conv.weight.device, dtype=conv.weight.dtype)
    _set(new, "weight", weight, conv.weight)
    if bias is not None:
        _set(new, "bias", bias, conv.weight)
    return new


def _conv_then(conv: nn.Conv2d, layer: Optional[nn.Module], row: int) -> List[nn.Module]:
    """``conv`` followed by ``layer``: folded into one conv with a bias when ``layer`` is a
    per-channel affine at eval (``conv'(x) = scale * conv(x) + shift``), else the conv and
    the plain norm; then the layer's fused ReLU."""
    if layer is None:
        return [_conv_copy(conv, conv.weight.detach(), None if conv.bias is None else conv.bias.detach())]
    affine = _affine_of(layer, row)
    if affine is None:
        return [_conv_then(conv, None, row)[0], _norm_module(layer, row, conv.weight)] + _relu(layer)
    scale, shift = affine
    weight = conv.weight.detach().double() * scale.reshape(-1, 1, 1, 1)
    bias = shift if conv.bias is None else shift + scale * conv.bias.detach().double()
    return [_conv_copy(conv, weight, bias)] + _relu(layer)


def _first_unit(m: nn.Module, domain: int, row: int) -> Optional[Tuple[PreActUnit, int]]:
    """The first residual unit of a stage (shared or the domain's copy) and its row."""
    if isinstance(m, PerDomain):
        return _first_unit(m.copies[domain], domain, 0)
    if isinstance(m, DomainSequential) and len(m) and isinstance(m[0], PreActUnit):
        return m[0], row
    return None


def _plain(m: nn.Module, domain: int, row: int, like: Tensor, folded: set) -> nn.Module:
    """The plain equivalent of one part of a ResNet38 body for ``domain``; ``row``: the
    domain's row in this part's tensors (``domain`` in shared parts, 0 in a per-domain
    copy, which is built for one domain); ``folded``: the ids of the units whose first norm
    is already folded into the stem conv."""
    if isinstance(m, PerDomain):
        return _plain(m.copies[domain], domain, 0, like, folded)
    if isinstance(m, DomainSequential):
        parts = []
        for i, c in enumerate(m):
            if isinstance(c, Stem) and c.scale is None and i + 1 < len(m):
                # The first unit's norm directly follows the stem conv, and with a projection
                # shortcut nothing else reads the stem's output: fold the norm into the conv.
                first = _first_unit(m[i + 1], domain, row)
                if (first is not None and first[0].normalized and first[0].shortcut is not None
                        and _affine_of(first[0].norm1, first[1]) is not None):
                    parts.append(nn.Sequential(*_conv_then(c.conv, first[0].norm1, first[1])))
                    folded.add(id(first[0]))
                    continue
            parts.append(_plain(c, domain, row, like, folded))
        return nn.Sequential(*parts)
    if isinstance(m, Stem):
        return nn.Sequential(*_conv_then(m.conv, m.scale, row))
    if isinstance(m, PreActUnit):
        if m.normalized and id(m) in folded:
            pre = nn.Sequential()  # its norm is in the stem conv
            branch = _conv_then(m.conv1, m.norm2, row) + _conv_then(m.conv2, None, row)
            shortcut = nn.Sequential(*_conv_then(m.shortcut, None, row))
        elif m.normalized:
            pre = nn.Sequential(_norm_module(m.norm1, row, like), *_relu(m.norm1))
            branch = _conv_then(m.conv1, m.norm2, row) + _conv_then(m.conv2, None, row)
            shortcut = None if m.shortcut is None else nn.Sequential(*_conv_then(m.shortcut, None, row))
        else:
            pre = nn.Sequential(nn.ReLU())
            branch = _conv_then(m.conv1, m.scale1, row) + [nn.ReLU(inplace=True)] + _conv_then(m.conv2, m.scale2, row)
            shortcut = (None if m.shortcut is None
                        else nn.Sequential(*_conv_then(m.shortcut, m.scale_shortcut, row)))
        return _Residual(pre, nn.Sequential(*branch), shortcut)
    if isinstance(m, GlobalPool):
        layers: List[nn.Module] = []
        if m.norm is not None:
            layers += [_norm_module(m.norm, row, like)] + _relu(m.norm)
        else:
            if m.affine is not None:
                layers.append(_norm_module(m.affine, row, like))
            layers.append(nn.ReLU())
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    raise TypeError(f"export_domain: no plain equivalent for {type(m).__name__}")


def _head(head: nn.Module, domain: int) -> nn.Linear:
    if isinstance(head, DomainHeads):
        w, b = head.head_weight(domain), head.head_bias(domain)
    elif isinstance(head, SharedHead):
        w, b = head.fc.weight, head.fc.bias
    else:
        raise TypeError(f"export_domain: no plain equivalent for the head {type(head).__name__}")
    lin = nn.Linear(w.shape[1], w.shape[0]).to(device=w.device, dtype=w.dtype)
    _set(lin, "weight", w.detach(), w)
    _set(lin, "bias", b.detach(), w)
    return lin


@torch.no_grad()
def export_domain(model: nn.Module, domain: int) -> torch.fx.GraphModule:
    """One domain of a :class:`~unirep.models.ResNet38` as a plain PyTorch module.

    The result maps the domain's preprocessed images ``x`` (N, 3, H, W) (whitened with the
    domain's training mean and std, as for ``model``) to the logits of the domain's own
    K_d classes, (N, K_d): ``model(x, domain)[:, :K_d]`` up to float rounding (within 1e-5
    in float32, tested). It is a ``torch.fx.GraphModule`` in eval mode whose layers are all
    standard ``torch.nn`` modules (``Conv2d``, ``BatchNorm2d``, ``InstanceNorm2d``,
    ``ReLU``, ``AdaptiveAvgPool2d``, ``Flatten``, ``Linear``) and whose forward is plain
    torch code, so it runs without :mod:`unirep_kernels` and without unirep:
    ``torch.save(exported, f)`` loads back with ``torch.load(f, weights_only=False)`` where
    only torch is installed, and it traces with ``torch.export.export``.

    What becomes of each domain layer (for the pre-activation ResNet: norm -> ReLU ->
    conv):

    - A batch norm with running moments (``bn-domain``, ``bn-domain-moments``,
      ``bn-universal``) that directly follows a conv (the second norm of every unit, after
      conv1; the first norm of the first unit, after the stem conv, when that unit has a
      projection shortcut, so that nothing else reads the stem's output) is folded into
      that conv's weight and bias. Where no conv precedes it (the first norm of the other
      units, whose input is a residual sum, and the final norm) it
      becomes a per-channel affine y = s x + b: an eval-mode ``BatchNorm2d`` with moments
      0 and 1 and eps 0, whose weight and bias are s and b.
    - Strategy ``none``: every ``DomainScale2d`` follows a conv and is folded into it.
    - Instance norm (``in-universal``, ``in-domain``) depends on each image's statistics
      and cannot be folded: it stays a plain ``InstanceNorm2d`` with the domain's affine.
      The final layer of the IN strategies (a scale and bias, no normalization) becomes a
      per-channel affine.
    - ``bn+`` normalizes by the test batch's statistics: it stays a plain
      ``BatchNorm2d(track_running_stats=False)`` with the universal affine, which does the
      same on a batch of this domain (so, as for the model, give it batches, not single
      1x1 maps).
    - Per-domain copies (sharing ``none``/``partial-*``) contribute the domain's copy; the
      head is the domain's classifier alone (with full sharing, the shared one).

    Args:
        model: a ResNet38 (any strategy and sharing); not modified.
        domain: the domain to export (an int).
    """
    if not isinstance(model, ResNet38):
        raise TypeError(f"export_domain: model must be a unirep.models.ResNet38, got {type(model).__name__}")
    d = one_domain(domain, model.num_domains, "export_domain")
    like = next(model.parameters())
    plain = nn.Sequential(_plain(model.body, d, d, like, set()), _head(model.head, d))
    traced = torch.fx.symbolic_trace(plain)
    return traced.eval()
