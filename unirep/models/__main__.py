"""``python -m unirep.models``: print the parameter-count tables of docs/models.md.

Models are built on the ``meta`` device (no memory, no initialization cost) and counted
with :func:`unirep.models.count_parameters`.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

import torch

from unirep_kernels import DomainBatchNorm2d, DomainInstanceNorm2d, DomainScale2d

from .. import _cli
from . import LARGE_SCALE_DOMAINS, PAPER_TEXT_WIDTHS, build_model, count_parameters

#: The ten domains of section 4.1 (Table 1): AwA, Caltech-256, CIFAR-10, Daimler, GTSR,
#: MNIST, Omniglot, Plankton, Sketches, SVHN.
PAPER_CLASSES = [50, 257, 10, 2, 43, 10, 1623, 121, 250, 10]
#: CIFAR-10, MNIST, SVHN: the three 10-class domains of full sharing (Table 2).
TEN_CLASS_DOMAINS = [10, 10, 10]


def _count(*args, **kwargs) -> int:
    with torch.device("meta"):
        return count_parameters(build_model(*args, **kwargs))


def _m(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def resnet_table() -> str:
    lines = ["| sharing (bn-domain) | domains | x1 | x2 | x4 | x1 / no sharing |",
             "|---|---|---|---|---|---|"]
    rows = [("none", PAPER_CLASSES, "10 (Table 1)"), ("deep", PAPER_CLASSES, "10 (Table 1)"),
            ("partial-first", PAPER_CLASSES, "10 (Table 1)"), ("partial-last", PAPER_CLASSES, "10 (Table 1)"),
            ("none", TEN_CLASS_DOMAINS, "3 x 10 classes"), ("deep", TEN_CLASS_DOMAINS, "3 x 10 classes"),
            ("full", TEN_CLASS_DOMAINS, "3 x 10 classes")]
    base = {}
    for sharing, classes, label in rows:
        counts = [_count(num_classes=classes, sharing=sharing, width=w) for w in (1, 2, 4)]
        base.setdefault(label, counts[0])  # "none" comes first for each domain set
        lines.append(f"| {sharing} | {label} | " + " | ".join(_m(c) for c in counts)
                     + f" | {counts[0] / base[label]:.3f} |")
    return "\n".join(lines)


def strategy_table() -> str:
    lines = ["| strategy (deep, x1, 10 domains) | parameters | in norm/scaling layers | moments (buffers) |",
             "|---|---|---|---|"]
    for s in ("bn-universal", "bn+", "bn-domain-moments", "bn-domain", "in-universal", "in-domain", "none"):
        with torch.device("meta"):
            model = build_model(num_classes=PAPER_CLASSES, strategy=s)
        norms = sum(p.numel() for m in model.modules()
                    if isinstance(m, (DomainBatchNorm2d, DomainInstanceNorm2d, DomainScale2d))
                    for p in m.parameters())
        moments = sum(b.numel() for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var")))
        lines.append(f"| {s} | {count_parameters(model):,} | {norms:,} | {moments:,} |")
    return "\n".join(lines)


def widths_table() -> str:
    lines = ["| widths at x1 | deep, 10 domains | none, 10 domains | ratio |", "|---|---|---|---|"]
    for name, kw in (("(32, 64, 128, 256), stem 16: default", {}),
                     ("(16, 32, 128, 256), stem 16: the paper's text", dict(widths=PAPER_TEXT_WIDTHS))):
        deep = _count(num_classes=PAPER_CLASSES, sharing="deep", **kw)
        none = _count(num_classes=PAPER_CLASSES, sharing="none", **kw)
        lines.append(f"| {name} | {_m(deep)} | {_m(none)} | {deep / none:.3f} |")
    return "\n".join(lines)


def large_table() -> str:
    names = list(LARGE_SCALE_DOMAINS)
    lines = ["| arch | domains (input H x W) | sharing | parameters |", "|---|---|---|---|"]
    for arch, domains in (("alexnet", names[:1]), ("alexnet", names[:2]), ("vggm128", names[:1]),
                          ("vggm128", names)):
        classes = [LARGE_SCALE_DOMAINS[d][0] for d in domains]
        sizes = [LARGE_SCALE_DOMAINS[d][1] for d in domains]
        label = ", ".join(f"{d} {s[0]}x{s[1]}" for d, s in zip(domains, sizes))
        for sharing in (("deep",) if len(domains) == 1 else ("none", "deep")):
            n = _count(arch, num_classes=classes, input_sizes=sizes, sharing=sharing)
            lines.append(f"| {arch} | {label} | {sharing} | {_m(n)} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    _cli.ArgumentParser(prog="python -m unirep.models",
                        description="Print the parameter-count tables of docs/models.md (models built on the "
                                    "meta device).").parse_args(argv)
    print("ResNet-38, by sharing scheme and width\n")
    print(resnet_table())
    print("\nResNet-38 x1, by default widths vs the paper's literal x1 list\n")
    print(widths_table())
    print("\nResNet-38 x1, deep sharing, 10 domains, by normalization strategy\n")
    print(strategy_table())
    print("\nSection 4.2 models (bn-domain)\n")
    print(large_table())
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run(main))
