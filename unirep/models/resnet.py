"""ResNet-38 of section 4.1, with the paper's sharing schemes and normalization strategies.

Layout (pre-activation residual units, He et al. 2016), for a 64x64 input:

======================  =============================  ===========
part                    layers                         output
======================  =============================  ===========
stem                    3x3 conv, ``stem_width``       64x64
stage 1                 4 units, ``widths[0]``         64x64
stage 2                 4 units, ``widths[1]``, /2     32x32
stage 3                 4 units, ``widths[2]``, /2     16x16
stage 4                 4 units, ``widths[3]``, /2     8x8
final                   norm + ReLU, global avg pool   widths[3]
                        (IN strategies: scale + ReLU,
                        see ``final_norm``)
head                    one linear layer per domain    K_max
======================  =============================  ===========

A unit is norm-ReLU-conv3x3-norm-ReLU-conv3x3 plus a shortcut; the first unit of a stage
changes the width (and the resolution in stages 2-4), so its shortcut is a 1x1 projection
conv applied to the pre-activated input. The 38 weight layers: 1 stem conv + 16 units x 2
3x3 convs + 4 projection shortcuts + 1 classifier = 38 (the count holds when ``stem_width``
differs from ``widths[0]``, as by default: 16 vs 32, the Wide-ResNet convention).

Strategy ``"none"``: no normalization; a :class:`DomainScale2d` (s_d x + b_d) follows every
conv (stem, unit convs, projections) and the ReLUs are explicit. The scale after the second
conv of every residual branch starts at zero (so that the unnormalized 16-unit network
starts as a near-identity, as in SkipInit/Fixup); all other scales start at one.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from unirep_kernels import Domain, DomainScale2d, check_domain

from .common import (DomainHeads, DomainSequential, GlobalPool, PerDomain, SharedHead, check_final_norm, check_input,
                     check_num_classes, check_strategy, init_weights, make_norm)

#: Per-stage filters at width x1: the paper's x2 and x4 lists ({64,128,256,512},
#: {128,256,512,1024}) are exactly twice and four times this one (see docs/models.md).
DEFAULT_WIDTHS = (32, 64, 128, 256)
#: Stem filters at width x1.
DEFAULT_STEM_WIDTH = 16
#: The paper's literal (inconsistent) x1 list, for reference: ``widths=PAPER_TEXT_WIDTHS``.
PAPER_TEXT_WIDTHS = (16, 32, 128, 256)

SHARINGS = ("none", "deep", "full", "partial-first", "partial-last")
WIDTH_MULTIPLIERS = (1, 2, 4)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class Stem(nn.Module):
    """The first 3x3 conv (followed by a DomainScale2d for strategy "none")."""

    def __init__(self, cin: int, cout: int, *, strategy: str, num_domains: int) -> None:
        super().__init__()
        self.conv = conv3x3(cin, cout)
        self.scale = DomainScale2d(cout, num_domains) if strategy == "none" else None

    def forward(self, x: Tensor, domain: Domain) -> Tensor:
        x = self.conv(x)
        return x if self.scale is None else self.scale(x, domain)


class PreActUnit(nn.Module):
    """Pre-activation residual unit: norm-ReLU-conv-norm-ReLU-conv + shortcut (ReLU fused
    into the norm layers). With ``strategy="none"``: ReLU-conv-scale-ReLU-conv-scale."""

    def __init__(self, cin: int, cout: int, stride: int, *, strategy: str, num_domains: int,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        self.normalized = strategy != "none"
        self.conv1 = conv3x3(cin, cout, stride)
        self.conv2 = conv3x3(cout, cout)
        projection = stride != 1 or cin != cout
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if projection else None
        if self.normalized:
            self.norm1 = make_norm(strategy, cin, num_domains, relu=True, backend=backend)
            self.norm2 = make_norm(strategy, cout, num_domains, relu=True, backend=backend)
        else:
            self.scale1 = DomainScale2d(cout, num_domains)
            self.scale2 = DomainScale2d(cout, num_domains)
            self.scale_shortcut = DomainScale2d(cout, num_domains) if projection else None

    def forward(self, x: Tensor, domain: Domain) -> Tensor:
        a = self.norm1(x, domain) if self.normalized else F.relu(x)
        if self.shortcut is None:
            identity = x
        else:
            identity = self.shortcut(a)
            if not self.normalized:
                identity = self.scale_shortcut(identity, domain)
        h = self.conv1(a)
        h = self.norm2(h, domain) if self.normalized else F.relu(self.scale1(h, domain))
        h = self.conv2(h)
        if not self.normalized:
            h = self.scale2(h, domain)
        return h + identity


def make_stage(cin: int, cout: int, stride: int, units: int, *, strategy: str, num_domains: int,
               backend: Optional[str] = None) -> DomainSequential:
    return DomainSequential([PreActUnit(cin if i == 0 else cout, cout, stride if i == 0 else 1, strategy=strategy,
                                        num_domains=num_domains, backend=backend) for i in range(units)])


class ResNet38(nn.Module):
    """The paper's ResNet-38 for ``D = len(num_classes)`` domains.

    Call as ``model(x, domain)``: ``x`` (N, in_channels, H, W) (64x64 in the paper; any size
    works thanks to global average pooling), ``domain`` an int (pure batch) or an int64
    tensor (N,) (mixed batch). Returns logits (N, K_max), K_max = max(num_classes), where a
    sample's classes beyond its own domain's K_d are ``-inf`` (use
    :func:`masked_cross_entropy`; :meth:`class_mask` gives the valid entries).

    Args:
        num_classes: class count of every domain.
        strategy: normalization strategy (see :data:`unirep.models.STRATEGIES`).
        sharing: "none", "deep", "full", "partial-first" or "partial-last".
        width: 1, 2 or 4: multiplies every conv's filters.
        widths: per-stage filters at x1 (default :data:`DEFAULT_WIDTHS`).
        stem_width: stem filters at x1 (default 16).
        units_per_stage: residual units per stage (4 for ResNet-38).
        in_channels: input channels (3).
        backend: pin the normalization kernels' backend (default: the global selection).
        final_norm: the layer before global pooling (see
            :func:`unirep.models.common.resolve_final_norm`): "auto" (default: the
            strategy's norm for BN strategies; for IN strategies the strategy's scale and
            bias without normalization, since IN there erases what pooling reads), "same",
            "affine", "relu" or a strategy name.

    Sharing: the domain-specific parts are separate copies built for a single domain (their
    norm layers have one row); the shared parts hold (D, C) or (C,) norm parameters as the
    strategy says. ``"none"``: one whole network per domain (``self.body`` is a
    :class:`PerDomain`); ``"deep"``: everything but the heads shared; ``"full"``: heads
    shared too (equal class counts required); ``"partial-first"``: the first stage's four
    units are domain-specific (the stem conv stays shared); ``"partial-last"``: the last
    stage and the final norm are domain-specific. A mixed batch runs the shared parts on the
    whole batch at once and a domain-specific part once per domain present (a loop over the
    D domains, not over samples).
    """

    def __init__(self, num_classes: Sequence[int], strategy: str = "bn-domain", sharing: str = "deep",
                 width: int = 1, widths: Sequence[int] = DEFAULT_WIDTHS, stem_width: int = DEFAULT_STEM_WIDTH,
                 units_per_stage: int = 4, in_channels: int = 3, backend: Optional[str] = None,
                 final_norm: str = "auto") -> None:
        super().__init__()
        self.num_classes: List[int] = check_num_classes(num_classes)
        self.strategy = check_strategy(strategy)
        self.final_norm = check_final_norm(final_norm)
        if sharing not in SHARINGS:
            raise ValueError(f"unknown sharing {sharing!r}; expected one of {list(SHARINGS)}")
        if isinstance(width, bool) or width not in WIDTH_MULTIPLIERS:
            raise ValueError(f"width must be one of {WIDTH_MULTIPLIERS} (the paper's x1, x2, x4), got {width!r}")
        widths = tuple(widths)
        if len(widths) != 4 or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must be 4 positive ints (one per stage), got {widths!r}")
        if isinstance(stem_width, bool) or not isinstance(stem_width, int) or stem_width < 1:
            raise ValueError(f"stem_width must be a positive int, got {stem_width!r}")
        if isinstance(units_per_stage, bool) or not isinstance(units_per_stage, int) or units_per_stage < 1:
            raise ValueError(f"units_per_stage must be a positive int, got {units_per_stage!r}")
        D = len(self.num_classes)
        if sharing == "full" and len(set(self.num_classes)) != 1:
            raise ValueError(f"sharing='full' shares the classifier, so every domain needs the same number of "
                             f"classes; got num_classes={self.num_classes} (use sharing='deep')")
        self.sharing, self.width, self.in_channels = sharing, width, in_channels
        self.num_domains, self.max_classes = D, max(self.num_classes)
        self.widths = tuple(w * width for w in widths)
        self.stem_width = stem_width * width
        self.units_per_stage = units_per_stage
        opts = dict(strategy=strategy, backend=backend)

        def stem(nd):
            return Stem(in_channels, self.stem_width, strategy=strategy, num_domains=nd)

        def stage(i, nd):
            cin = self.stem_width if i == 0 else self.widths[i - 1]
            return make_stage(cin, self.widths[i], 1 if i == 0 else 2, units_per_stage, num_domains=nd, **opts)

        def final(nd):
            return GlobalPool(self.widths[-1], num_domains=nd, final_norm=final_norm, **opts)

        def whole(nd):
            return DomainSequential([stem(nd)] + [stage(i, nd) for i in range(4)] + [final(nd)])

        if sharing == "none":
            self.body = PerDomain([whole(1) for _ in range(D)])
        elif sharing in ("deep", "full"):
            self.body = whole(D)
        elif sharing == "partial-first":
            self.body = DomainSequential([stem(D), PerDomain([stage(0, 1) for _ in range(D)])]
                                         + [stage(i, D) for i in (1, 2, 3)] + [final(D)])
        else:  # partial-last
            self.body = DomainSequential([stem(D)] + [stage(i, D) for i in (0, 1, 2)]
                                         + [PerDomain([DomainSequential([stage(3, 1), final(1)]) for _ in range(D)])])
        self.head = (SharedHead(self.widths[-1], self.max_classes) if sharing == "full"
                     else DomainHeads(self.widths[-1], self.num_classes))
        init_weights(self)
        if strategy == "none":
            for m in self.modules():
                if isinstance(m, PreActUnit):
                    nn.init.zeros_(m.scale2.weight)

    def features(self, x: Tensor, domain: Domain) -> Tensor:
        """The (N, widths[-1]) pooled features (the input of the classifier)."""
        check_input(x, self.in_channels, "ResNet38")
        domain = check_domain(domain, self.num_domains, x, where="ResNet38")
        return self.body(x, domain)

    def forward(self, x: Tensor, domain: Domain) -> Tensor:
        check_input(x, self.in_channels, "ResNet38")
        domain = check_domain(domain, self.num_domains, x, where="ResNet38")
        return self.head(self.body(x, domain), domain)

    def class_mask(self, domain: Domain):
        """Boolean mask of the valid logits: (K_max,) for an int domain, (N, K_max) for a
        domain tensor."""
        return _class_mask(self.num_classes, check_domain(domain, self.num_domains, where="class_mask"))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, strategy={self.strategy!r}, sharing={self.sharing!r}, "
                f"width=x{self.width}, widths={self.widths}, stem_width={self.stem_width}, "
                f"final_norm={self.final_norm!r}")


def _class_mask(num_classes: Sequence[int], domain: Domain):
    import torch

    k_max = max(num_classes)
    sizes = torch.tensor(list(num_classes))
    if isinstance(domain, int):
        return torch.arange(k_max) < sizes[domain]
    return torch.arange(k_max, device=domain.device) < sizes.to(domain.device)[domain].unsqueeze(1)
