"""The paper's models (Bilen & Vedaldi 2017, section 4): ResNet-38 with its sharing schemes
and normalization strategies (section 4.1), and AlexNet / VGG-M-128 with shared
convolutions and domain-specific fully connected layers (section 4.2).

>>> from unirep.models import build_model, masked_cross_entropy
>>> model = build_model("resnet38", num_classes=[10, 43, 2], strategy="bn-domain", sharing="deep")
>>> logits = model(x, 1)                     # pure batch of domain 1: (N, 43)
>>> logits = model(x, domain)                # mixed batch, domain int64 (N,): (N, 43),
>>> loss = masked_cross_entropy(logits, y)   # -inf beyond each sample's own class count

See docs/models.md for the strategies, sharing schemes, widths and parameter counts.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from .common import (STRATEGIES, DomainHeads, PerDomain, count_parameters, masked_cross_entropy, route)
from .large import LARGE_SCALE_DOMAINS, LargeScaleNet
from .resnet import (DEFAULT_STEM_WIDTH, DEFAULT_WIDTHS, PAPER_TEXT_WIDTHS, SHARINGS, WIDTH_MULTIPLIERS,
                     PreActUnit, ResNet38)

ARCHS = ("resnet38", "alexnet", "vggm128")


def build_model(arch: str = "resnet38", num_classes: Optional[Sequence[int]] = None, strategy: str = "bn-domain",
                sharing: str = "deep", width: int = 1, **kwargs) -> nn.Module:
    """Build one of the paper's multi-domain models.

    Args:
        arch: "resnet38" (section 4.1), "alexnet" or "vggm128" (section 4.2).
        num_classes: class count of every domain, ``[k_1, ..., k_D]`` (D = number of domains).
        strategy: normalization (Table 4): "bn-universal", "bn+", "bn-domain-moments",
            "bn-domain" (default, the paper's best), "in-universal", "in-domain", or "none"
            (no normalization; a domain scaling layer after every conv, section 3.1).
        sharing: "none", "deep" (default), "full", "partial-first", "partial-last" (Table 3);
            the large-scale archs take "deep" or "none".
        width: 1, 2 or 4 (filters multiplied).
        **kwargs: passed to :class:`ResNet38` (``widths``, ``stem_width``,
            ``units_per_stage``, ``in_channels``, ``backend``, ``final_norm``) or :class:`LargeScaleNet`
            (``input_sizes``, ``fc``, ``skip_last_pool``, ``dropout``, ``in_channels``,
            ``backend``).

    Returns:
        An ``nn.Module`` called as ``model(x, domain)`` (``domain``: an int for a pure batch,
        an int64 tensor (N,) for a mixed batch) that returns (N, K_max) logits, padded with
        ``-inf`` beyond each sample's own domain's class count (pure and mixed batches
        alike); train with :func:`masked_cross_entropy`.
    """
    if arch == "resnet38":
        return ResNet38(num_classes, strategy=strategy, sharing=sharing, width=width, **kwargs)
    if arch in ("alexnet", "vggm128"):
        return LargeScaleNet(arch, num_classes, strategy=strategy, sharing=sharing, width=width, **kwargs)
    raise ValueError(f"unknown arch {arch!r}; expected one of {list(ARCHS)}")


__all__ = [
    "build_model", "count_parameters", "masked_cross_entropy", "ResNet38", "LargeScaleNet", "PreActUnit",
    "DomainHeads", "PerDomain", "route", "ARCHS", "STRATEGIES", "SHARINGS", "WIDTH_MULTIPLIERS", "DEFAULT_WIDTHS",
    "DEFAULT_STEM_WIDTH", "PAPER_TEXT_WIDTHS", "LARGE_SCALE_DOMAINS",
]
