"""The Triton training forward on a GPU: the one-read fused kernel against the two-pass path,
side by side, at shapes around the choice unirep_kernels/triton/geometry.py makes.

geometry.fused_tiles falls back to the two-pass path when the fused grid would leave most
SMs idle (FUSED_MIN_FILL) and the two-pass grid is larger. That threshold is a judgement
made without a GPU; this measures both paths at shapes on both sides of it, and prints the
registers and spills of every Triton kernel it compiled (the driver's numbers, to compare
with the ahead-of-time table of benchmarks/triton_resources.py).

    python benchmarks/triton_paths.py [--out FILE.md] [--rounds 3]

Times: median of triton.testing.do_bench, the whole op as a user calls it
(uk.domain_batch_norm, mixed batch of 3 domains, per-domain affine and statistics, ReLU,
float32), the two paths interleaved in rounds; the best round's median is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import unirep_kernels as uk  # noqa: E402

SHAPES = [(64, 512, 7, 7), (64, 256, 8, 8), (64, 64, 8, 8), (32, 64, 8, 8), (8, 64, 8, 8), (2, 256, 8, 8),
          (16, 64, 16, 16), (16, 256, 16, 16)]


def run(shape, channels_last=False):
    from unirep_kernels.triton import geometry

    n, c = shape[:2]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    domain = torch.arange(n, device="cuda") % 3
    w = torch.randn(3, c, device="cuda", generator=g)
    b = torch.randn(3, c, device="cuda", generator=g)
    rm, rv = torch.zeros(3, c, device="cuda"), torch.ones(3, c, device="cuda")

    def call():
        return uk.domain_batch_norm(x, domain, w, b, rm, rv, num_domains=3, use_batch_stats=True, relu=True,
                                    backend="triton")

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    s = x[0, 0].numel()
    sc = 1 if channels_last or s == 1 else s
    default = geometry.fused_tiles(n, c, s, sc, 4, sms)
    with force_path("fused"):
        fused_tiles = geometry.fused_tiles(n, c, s, sc, 4, sms)
    if fused_tiles is None:
        return None  # does not fit on chip: nothing to compare
    outputs = {}
    for path in PATHS:
        with force_path(path):
            outputs[path] = call()
    torch.testing.assert_close(outputs["two-pass"], outputs["fused"], atol=2e-4, rtol=2e-4)  # the same result
    times = {path: [] for path in PATHS}
    for _ in range(ARGS.rounds):
        for path in PATHS:
            with force_path(path):
                times[path].append(do_bench(call))
    forced = {path: min(t) for path, t in times.items()}
    return dict(shape=shape, layout="NHWC" if channels_last else "NCHW", fused_programs=fused_tiles.grid[0],
                picks="fused" if default is not None else "two-pass", sms=sms, **forced)


PATHS = ("fused", "two-pass")


@contextlib.contextmanager
def force_path(path):
    """Make the Triton training forward take ``path`` ("fused" or "two-pass") wherever the
    fused tile fits, by moving geometry's thresholds for the duration: no fill threshold for
    "fused", no on-chip budget for "two-pass"."""
    from unirep_kernels.triton import geometry

    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    saved = geometry.FUSED_MIN_FILL, geometry.FUSED_MAX_ELEMENTS
    if path == "fused":
        geometry.FUSED_MIN_FILL = 0.0
    else:
        geometry.FUSED_MAX_ELEMENTS = 0
    try:
        yield
    finally:
        geometry.FUSED_MIN_FILL, geometry.FUSED_MAX_ELEMENTS = saved


def do_bench(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def kernel_resources():
    """(kernel, num_warps, registers, spills) of every Triton kernel compiled and loaded in
    this process, as the driver reports them."""
    from unirep_kernels.triton.kernels import get_kernels

    rows = []
    for name, kernel in vars(get_kernels()).items():
        for cache in kernel.device_caches.values():
            for compiled in cache[0].values():
                compiled._init_handles()  # a no-op once launched: loads the module, reads n_regs/n_spills
                rows.append((name, compiled.metadata.num_warps, compiled.n_regs, compiled.n_spills))
    return rows


def main():
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", help="also write the table (markdown) here")
    ARGS = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    rows = [r for shape in SHAPES for cl in (False, True) if (r := run(shape, cl)) is not None]
    dev = torch.cuda.get_device_name(0)
    lines = [f"# Triton training forward: fused vs two-pass ({dev}, {datetime.date.today().isoformat()})", "",
             f"torch {torch.__version__}, triton {__import__('triton').__version__}; median of do_bench, best of "
             f"{ARGS.rounds} interleaved rounds; the whole op (mixed batch of 3 domains, per-domain affine and "
             f"statistics, ReLU, float32).", "",
             "| shape | layout | fused programs | SMs | geometry picks | fused (us) | two-pass (us) | "
             "two-pass / fused |", "|---|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['layout']} | {r['fused_programs']} | {r['sms']} | "
                     f"{r['picks']} | {1e3 * r['fused']:.1f} | {1e3 * r['two-pass']:.1f} | "
                     f"{r['two-pass'] / r['fused']:.2f} |")
    res = kernel_resources()
    lines += ["", f"Triton kernels compiled here: {len(res)}, most registers "
              f"{max((r[2] for r in res), default=0)}, spilling: {sum(1 for r in res if r[3])}", ""]
    lines += [f"- {name} (num_warps {w}): {regs} registers, {spills} spills" for name, w, regs, spills in res
              if spills]
    text = "\n".join(lines)
    print(text)
    if ARGS.out:
        with open(ARGS.out, "w") as f:
            f.write(text + "\n")


ARGS = None

if __name__ == "__main__":
    main()
