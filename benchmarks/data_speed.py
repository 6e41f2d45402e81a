"""Loader speed: images/s of the multi-domain batch loader alone (no model).

    python benchmarks/data_speed.py [--batch-size 128] [--steps 200] [--device cpu|cuda]

Measures, on the default built-in benchmark held in memory as uint8 tensors:
  * gather: the CPU-side work per batch (sampler + uint8 index_select of images and labels),
    which is all the host does when batches are produced on a GPU;
  * pure / mixed: the whole pipeline (gather, transfer, float conversion, per-domain
    whitening, pad-8 random crop and flip) on ``--device``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from unirep.data import builtin_benchmark  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_loader(data, batch_size, steps, device, mode):
    loader = data.loader(batch_size, mode=mode, device=device, seed=0)
    for s in range(5):      # warm-up
        loader.get(s)
    _sync(device)
    t = time.perf_counter()
    for s in range(steps):
        x, y, d = loader.get(s)
    _sync(device)
    return steps * batch_size / (time.perf_counter() - t)


def bench_gather(data, batch_size, steps):
    loader = data.loader(batch_size, seed=0)
    images = [d.train[0] for d in data]
    labels = [d.train[1] for d in data]
    t = time.perf_counter()
    for s in range(steps):
        dom, idx = loader.sampler.batch(s)
        idx = torch.from_numpy(idx)
        images[dom].index_select(0, idx)
        labels[dom].index_select(0, idx)
    return steps * batch_size / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--root", default=None, help="benchmark cache folder")
    ap.add_argument("--out", default=None, help="append the markdown table to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = builtin_benchmark(args.root)
    rows = [("gather (host side only)", "cpu", bench_gather(data, args.batch_size, args.steps))]
    for mode in ("pure", "mixed"):
        rows.append((f"{mode} batches, whiten + augment", str(device),
                     bench_loader(data, args.batch_size, args.steps, device, mode)))
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads"
    lines = [f"Loader speed, default built-in benchmark (8 domains x {data.sizes()[0]} train "
             f"images, 64x64), batch {args.batch_size}, {args.steps} batches; {dev_name}; "
             f"torch {torch.__version__}; {datetime.date.today().isoformat()}.", "",
             "| stage | device | images/s |", "|---|---|---:|"]
    lines += [f"| {name} | {dev} | {ips:,.0f} |" for name, dev, ips in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
