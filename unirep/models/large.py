"""The large-scale models of section 4.2: AlexNet and VGG-M-128 with shared convolutions
and domain-specific fully connected layers.

- ``"alexnet"`` (Krizhevsky et al. 2012, the single-network layout of the Caffe/MatConvNet
  reference model, channel groups of the original two-GPU split kept): conv1 96x11x11/4,
  pool; conv2 256x5x5 (2 groups), pool; conv3 384x3x3; conv4 384x3x3 (2 groups);
  conv5 256x3x3 (2 groups); pool5; fc6 4096, fc7 4096, fc8 K_d. 224x224 -> a 6x6 conv5 map.
- ``"vggm128"`` (VGG-M-128, Chatfield et al. 2014): conv1 96x7x7/2, pool; conv2 256x5x5/2,
  pool; conv3-5 512x3x3; pool5; fc6 4096, fc7 **128** (the bottleneck that keeps the
  128 x 90k Synth90k classifier small), fc8 K_d. Pools are 3x3/2 in ceil mode (MatConvNet's
  padded pooling), so 224x224 -> a 6x6 map after pool5.

Every conv is followed by the strategy's normalization (default: BN with domain-specific
scale and moments, the best of section 4.1; it replaces AlexNet's/VGG-M's LRN) and a ReLU;
fc6 and fc7 by ReLU and dropout. The convolutions are shared by all domains
(``sharing="deep"``, the paper's "Deep (conv1-5)") or not at all (``sharing="none"``). The
fully connected layers are always domain-specific: fc6's input size follows each domain's
input size (``input_sizes``), and the last pooling (pool5) is skipped for a domain whose
conv5 map is smaller than the 3x3 pooling window (``skip_last_pool=None``, automatic) or as
``skip_last_pool`` says, domain by domain.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from unirep_kernels import Domain, check_domain

from .common import (ConvNorm, PerDomain, check_input, check_num_classes, check_strategy, init_weights, pad_logits,
                     route)
from .resnet import WIDTH_MULTIPLIERS, _class_mask

# (out_channels, kernel, stride, padding, groups, pool after it)
_CONVS = {
    "alexnet": [(96, 11, 4, 2, 1, True), (256, 5, 1, 2, 2, True), (384, 3, 1, 1, 1, False),
                (384, 3, 1, 1, 2, False), (256, 3, 1, 1, 2, True)],
    "vggm128": [(96, 7, 2, 0, 1, True), (256, 5, 2, 1, 1, True), (512, 3, 1, 1, 1, False),
                (512, 3, 1, 1, 1, False), (512, 3, 1, 1, 1, True)],
}
_FC = {"alexnet": (4096, 4096), "vggm128": (4096, 128)}
_CEIL_MODE = {"alexnet": False, "vggm128": True}
POOL = (3, 2)  # 3x3 max pooling, stride 2

#: The domains of section 4.2: class count and training crop (H, W) as the paper gives them.
#: Synth90k: the paper's "90k word lexicon"; the published lexicon has 88,172 words.
LARGE_SCALE_DOMAINS = {
    "imagenet": (1000, (224, 224)),
    "vggface": (2622, (112, 56)),
    "synth90k": (88172, (32, 128)),
}


def _conv_out(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def _pool_out(size: int, ceil_mode: bool) -> int:
    k, s = POOL
    if ceil_mode:
        out = math.ceil((size - k) / s) + 1
        if (out - 1) * s >= size:  # PyTorch: the last window must start inside the input
            out -= 1
        return out
    return (size - k) // s + 1


class ConvTrunk(nn.Module):
    """conv1-conv5 with their norms and pool1, pool2 (pool5 belongs to the domain tails)."""

    def __init__(self, arch: str, width: int, in_channels: int, *, strategy: str, num_domains: int,
                 backend: Optional[str]) -> None:
        super().__init__()
        self.ceil_mode = _CEIL_MODE[arch]
        layers, self.pool_after = [], []
        cin = in_channels
        for i, (cout, k, s, p, g, pool) in enumerate(_CONVS[arch]):
            cout *= width
            layers.append(ConvNorm(cin, cout, k, s, p, g, strategy=strategy, num_domains=num_domains,
                                   backend=backend))
            self.pool_after.append(pool and i < len(_CONVS[arch]) - 1)
            cin = cout
        self.layers = nn.ModuleList(layers)
        self.out_channels = cin

    def forward(self, x: Tensor, domain: Domain) -> Tensor:
        for layer, pool in zip(self.layers, self.pool_after):
            x = layer(x, domain)
            if pool:
                x = F.max_pool2d(x, *POOL, ceil_mode=self.ceil_mode)
        return x


class FCTail(nn.Module):
    """pool5 (unless skipped) -> flatten -> fc6-ReLU-dropout -> fc7-ReLU-dropout -> fc8."""

    def __init__(self, in_features: int, fc: Sequence[int], num_classes: int, skip_pool: bool, ceil_mode: bool,
                 dropout: float) -> None:
        super().__init__()
        self.skip_pool, self.ceil_mode = skip_pool, ceil_mode
        dims = [in_features, *fc]
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.classifier = nn.Linear(dims[-1], num_classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if not self.skip_pool:
            x = F.max_pool2d(x, *POOL, ceil_mode=self.ceil_mode)
        x = x.flatten(1)
        for fc in self.fcs:
            x = self.dropout(F.relu(fc(x)))
        return self.classifier(x)


class _SingleNet(nn.Module):
    """A whole network for one domain (sharing="none")."""

    def __init__(self, trunk: ConvTrunk, tail: FCTail, max_classes: int) -> None:
        super().__init__()
        self.trunk, self.tail, self.max_classes = trunk, tail, max_classes

    def forward(self, x: Tensor, domain: Domain) -> Tensor:
        return pad_logits(self.tail(self.trunk(x, domain)), self.max_classes)


class LargeScaleNet(nn.Module):
    """AlexNet or VGG-M-128 for ``D = len(num_classes)`` domains (section 4.2).

    Call as ``model(x, domain)`` with ``x`` of the domain's input size; a mixed batch
    (int64 domain tensor) needs all its samples at one size whose conv5 map matches every
    domain present (in practice: domains of equal input size). Returns (N, K_max) logits,
    ``-inf`` beyond each sample's own class count, as :class:`~unirep.models.ResNet38`.

    Args:
        arch: "alexnet" or "vggm128".
        num_classes: class count per domain.
        input_sizes: (H, W) per domain, or one (H, W) for all (default 224x224). Decides
            fc6's input size and whether pool5 is skipped.
        strategy: normalization after every conv (default "bn-domain").
        sharing: "deep" (shared convs, per-domain fc6-fc8) or "none" (separate networks).
        width: 1, 2 or 4: multiplies the conv filters (the fully connected layers keep theirs).
        fc: sizes of fc6 and fc7 (default: the architecture's, (4096, 4096) or (4096, 128)).
        skip_last_pool: None (skip pool5 when the conv5 map is smaller than 3x3 in H or W)
            or one bool per domain.
        dropout: dropout after fc6 and fc7 (0.5).
    """

    def __init__(self, arch: str, num_classes: Sequence[int], input_sizes=None, strategy: str = "bn-domain",
                 sharing: str = "deep", width: int = 1, fc: Optional[Sequence[int]] = None,
                 skip_last_pool: Optional[Sequence[bool]] = None, dropout: float = 0.5, in_channels: int = 3,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        if arch not in _CONVS:
            raise ValueError(f"unknown large-scale arch {arch!r}; expected one of {sorted(_CONVS)}")
        self.arch = arch
        self.num_classes: List[int] = check_num_classes(num_classes)
        self.strategy = check_strategy(strategy)
        D = len(self.num_classes)
        if sharing not in ("deep", "none"):
            raise ValueError(f"arch={arch!r} supports sharing 'deep' (shared convs, domain-specific fully "
                             f"connected layers, as in section 4.2) or 'none', got {sharing!r}")
        if isinstance(width, bool) or width not in WIDTH_MULTIPLIERS:
            raise ValueError(f"width must be one of {WIDTH_MULTIPLIERS}, got {width!r}")
        self.sharing, self.width, self.in_channels = sharing, width, in_channels
        self.num_domains, self.max_classes = D, max(self.num_classes)
        self.input_sizes = self._check_sizes(input_sizes, D)
        self.fc = tuple(fc) if fc is not None else _FC[arch]
        if len(self.fc) != 2 or any(not isinstance(f, int) or f < 1 for f in self.fc):
            raise ValueError(f"fc must be two positive ints (fc6 and fc7 sizes), got {fc!r}")
        ceil_mode = _CEIL_MODE[arch]
        self.conv5_sizes = [self.conv5_size(arch, s) for s in self.input_sizes]
        for d, (h, w) in enumerate(self.conv5_sizes):
            if h < 1 or w < 1:
                raise ValueError(f"input size {self.input_sizes[d]} of domain {d} is too small for {arch}")
        if skip_last_pool is None:
            self.skip_last_pool = [min(h, w) < POOL[0] for h, w in self.conv5_sizes]
        else:
            if len(skip_last_pool) != D:
                raise ValueError(f"skip_last_pool must hold one bool per domain ({D}), got {skip_last_pool!r}")
            self.skip_last_pool = [bool(s) for s in skip_last_pool]
        self.feature_sizes = []
        for (h, w), skip in zip(self.conv5_sizes, self.skip_last_pool):
            if not skip:
                h, w = _pool_out(h, ceil_mode), _pool_out(w, ceil_mode)
                if h < 1 or w < 1:
                    raise ValueError(f"conv5 map {(h, w)} is too small for pool5: skip it for this domain")
            self.feature_sizes.append((h, w))

        def trunk(nd):
            return ConvTrunk(arch, width, in_channels, strategy=strategy, num_domains=nd, backend=backend)

        channels = _CONVS[arch][-1][0] * width
        tails = [FCTail(channels * h * w, self.fc, k, skip, ceil_mode, dropout)
                 for (h, w), k, skip in zip(self.feature_sizes, self.num_classes, self.skip_last_pool)]
        if sharing == "deep":
            self.trunk = trunk(D)
            self.tails = nn.ModuleList(tails)
        else:
            self.nets = PerDomain([_SingleNet(trunk(1), tail, self.max_classes) for tail in tails])
        init_weights(self)

    @staticmethod
    def _check_sizes(input_sizes, D: int) -> List[Tuple[int, int]]:
        if input_sizes is None:
            return [(224, 224)] * D
        sizes = list(input_sizes)
        if len(sizes) == 2 and all(isinstance(s, int) for s in sizes):
            sizes = [tuple(sizes)] * D
        if len(sizes) != D or any(len(tuple(s)) != 2 for s in sizes):
            raise ValueError(f"input_sizes must be one (H, W) per domain ({D}) or a single (H, W), got {input_sizes!r}")
        return [(int(s[0]), int(s[1])) for s in sizes]

    @staticmethod
    def conv5_size(arch: str, size: Tuple[int, int]) -> Tuple[int, int]:
        """(H, W) of the conv5 map (before pool5) for an input of ``size``."""
        out = []
        for n in size:
            layers = _CONVS[arch]
            for i, (_, k, s, p, _, pool) in enumerate(layers):
                n = _conv_out(n, k, s, p)
                if n < 1:
                    return (0, 0)
                if pool and i < len(layers) - 1:
                    n = _pool_out(n, _CEIL_MODE[arch])
            out.append(n)
        return tuple(out)

    def forward(self, x: Tensor, domain: Domain) -> Tensor:
        check_input(x, self.in_channels, self.arch)
        domain = check_domain(domain, self.num_domains, x, where=self.arch)
        if self.sharing == "none":
            return self.nets(x, domain)
        h = self.trunk(x, domain)  # shared convs: the whole batch at once
        fns = [lambda z, t=t: pad_logits(t(z), self.max_classes) for t in self.tails]
        if isinstance(domain, int):
            return fns[domain](h)
        return route(h, domain, fns)

    def class_mask(self, domain: Domain):
        """Boolean mask of the valid logits ((K_max,) or (N, K_max))."""
        return _class_mask(self.num_classes, check_domain(domain, self.num_domains, where="class_mask"))

    def extra_repr(self) -> str:
        return (f"arch={self.arch!r}, num_classes={self.num_classes}, input_sizes={self.input_sizes}, "
                f"conv5={self.conv5_sizes}, skip_last_pool={self.skip_last_pool}, strategy={self.strategy!r}, "
                f"sharing={self.sharing!r}, width=x{self.width}")
