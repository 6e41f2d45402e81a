"""End-to-end training-step speed: ResNet-38 on ten-domain data.

(a) baseline: how existing multi-domain code works -- a pre-activation ResNet-38 whose every
    normalization is a per-domain ``nn.ModuleList`` of ``nn.BatchNorm2d`` (one picked per
    batch), a per-domain ``nn.ModuleList`` of ``nn.Linear`` heads, round-robin pure batches;
(b) ours: ``unirep.build_model("resnet38", strategy="bn-domain")`` trained on mixed batches
    (every domain in every batch, one call per layer with the domain-muxed kernels);
(c) ours on round-robin pure batches (for reference).

Each step is forward + masked cross-entropy + backward + SGD (momentum 0.9, weight decay
1e-4).  Inputs are random 64x64 images with the ten class counts of the paper's Table 1,
generated once (the data pipeline is not timed).  Variants are timed in interleaved rounds
so that a shared machine's load hits them alike; the median step time is reported.

    python benchmarks/train_step.py [--batch-size 64] [--steps 5] [--rounds 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from unirep.models import build_model, masked_cross_entropy

CLASSES = [50, 257, 10, 2, 43, 10, 1623, 121, 250, 10]  # Table 1
WIDTHS, STEM, UNITS = (32, 64, 128, 256), 16, 4


class DomainBN(nn.Module):
    def __init__(self, c, d):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(d))

    def forward(self, x, d):
        return F.relu(self.bns[d](x))


class Unit(nn.Module):
    def __init__(self, cin, cout, stride, d):
        super().__init__()
        self.n1, self.c1 = DomainBN(cin, d), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n2, self.c2 = DomainBN(cout, d), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.proj = nn.Conv2d(cin, cout, 1, stride, bias=False) if (cin != cout or stride != 1) else None

    def forward(self, x, d):
        a = self.n1(x, d)
        sc = x if self.proj is None else self.proj(a)
        return sc + self.c2(self.n2(self.c1(a), d))


class BaselineResNet38(nn.Module):
    """Pre-activation ResNet-38 with a ModuleList of nn.BatchNorm2d per norm (per domain)."""

    def __init__(self, num_classes, widths=WIDTHS, stem=STEM, units=UNITS):
        super().__init__()
        d = len(num_classes)
        self.stem = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        blocks, cin = [], stem
        for i, w in enumerate(widths):
            for u in range(units):
                blocks.append(Unit(cin, w, 2 if (u == 0 and i > 0) else 1, d))
                cin = w
        self.blocks = nn.ModuleList(blocks)
        self.final = DomainBN(cin, d)
        self.heads = nn.ModuleList(nn.Linear(cin, k) for k in num_classes)

    def forward(self, x, d):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x, d)
        return self.heads[d](self.final(x, d).mean((2, 3)))


def make_data(batch, device, n_batches=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = len(CLASSES)
    pure = []
    for d in range(D):
        x = torch.randn(batch, 3, 64, 64, generator=g)
        y = torch.randint(0, CLASSES[d], (batch,), generator=g)
        pure.append((x.to(device), y.to(device), d))
    counts = [batch // D + (1 if i < batch % D else 0) for i in range(D)]
    dom = torch.repeat_interleave(torch.arange(D), torch.tensor(counts))
    y = torch.cat([torch.randint(0, CLASSES[d], (c,), generator=g) for d, c in enumerate(counts)])
    x = torch.randn(batch, 3, 64, 64, generator=g)
    mixed = [(x.to(device), y.to(device), dom.to(device))]
    return pure, mixed


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(model, batches, steps, device, loss_fn):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    times = []
    for i in range(steps + 1):  # first step: warm-up
        x, y, d = batches[i % len(batches)]
        sync(device)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x, d), y).backward()
        opt.step()
        sync(device)
        if i:
            times.append(time.perf_counter() - t)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", help="also write the result table (markdown) to this file")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    base = BaselineResNet38(CLASSES).to(dev).train()
    ours = build_model("resnet38", num_classes=CLASSES, strategy="bn-domain", sharing="deep").to(dev).train()
    pure, mixed = make_data(a.batch_size, dev)
    variants = {
        "(a) baseline: ModuleList of nn.BatchNorm2d, round-robin pure batches":
            (base, pure, lambda lo, y: F.cross_entropy(lo, y)),
        "(b) unirep bn-domain, mixed batches": (ours, mixed, masked_cross_entropy),
        "(c) unirep bn-domain, round-robin pure batches": (ours, pure, masked_cross_entropy),
    }
    times = {k: [] for k in variants}
    for r in range(a.rounds):
        for k, (m, b, lf) in variants.items():
            times[k] += time_steps(m, b, a.steps, dev, lf)
    med = {k: statistics.median(v) for k, v in times.items()}
    keys = list(variants)
    lines = [f"ResNet-38 (widths {WIDTHS}, 4 units/stage), 10 domains (Table 1 classes), 64x64, "
             f"batch {a.batch_size}, device {dev} ({platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads), torch {torch.__version__}; median of "
             f"{a.rounds * a.steps} steps",
             "", "| variant | step (s) | images/s | vs (a) |", "|---|---:|---:|---:|"]
    for k in keys:
        lines.append(f"| {k} | {med[k]:.3f} | {a.batch_size / med[k]:.1f} | {med[keys[0]] / med[k]:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
