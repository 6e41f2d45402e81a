"""Outputs of the C++ CPU kernels on a fixed set of cases, for tests/test_cpu_kernels.py.

Run as a script (``python tests/cpu_kernel_outputs.py OUT.pt``) under a given
ATEN_CPU_CAPABILITY / UNIREP_CPU_STREAM_STORES, it saves {case name: {output: tensor}};
imported, ``cases()`` and ``outputs()`` give the same in this process. The cases cover every
pass kernel: BN training and eval, IN, forward and backward, in float64, float32, float16
and bfloat16, contiguous and channels_last, with channel counts that take the flat (C = 16),
vector plus leftover (C = 20) and whole-vector (C = 64) channels_last paths, plane sizes with
and without a partial last vector, and a 2-d input (batch norm); and every float16 / bfloat16 bit pattern through the
conversions to float and back (``conversion_outputs``).
"""

from __future__ import annotations

import itertools
import sys
from typing import Dict, Iterator, Tuple

import torch

from conftest import cast_params, make_case, results_with_grads, run_bn, run_in

SHAPES = [(5, 20, (7, 9)), (4, 16, (6, 6)), (3, 64, (5, 5)), (6, 5, ())]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
MODES = ["bn-train", "bn-eval", "in"]


def cases() -> Iterator[Tuple[str, dict, torch.Tensor, str, dict]]:
    """(name, case, cotangent, mode, keyword arguments) for every case."""
    for seed, (shape, dtype, channels_last, mode) in enumerate(
            itertools.product(SHAPES, DTYPES, [False, True], MODES)):
        if (channels_last and len(shape[2]) < 2) or (mode == "in" and not shape[2]):
            continue  # channels_last needs 2 spatial dims, instance norm at least one
        case = make_case(n=shape[0], c=shape[1], spatial=shape[2], num_domains=3, mixed=True,
                         stats=None if mode == "in" else "domain", channels_last=channels_last, seed=seed)
        params = torch.float64 if dtype == torch.float64 else torch.float32
        case = cast_params(dict(case, x=case["x"].to(dtype)), params)
        g = torch.randn(case["x"].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(dtype)
        kw = {} if mode == "in" else dict(use_batch_stats=mode == "bn-train", momentum=0.3)
        name = f"{mode} {'x'.join(map(str, shape[:2] + shape[2]))} {str(dtype)[6:]} {'NHWC' if channels_last else 'NCHW'}"
        yield name, case, g, mode, dict(kw, relu=True)


def outputs(backend: str = "cpp") -> Dict[str, Dict[str, torch.Tensor]]:
    run = {"in": run_in}
    return {name: results_with_grads(run.get(mode, run_bn), case, backend, g, **kw)
            for name, case, g, mode, kw in cases()}


# Every float16 / bfloat16 bit pattern through batch norm at eval with one domain, running
# mean M, running variance 1 and eps 2^-30 (so the scale is exactly W): y = (x - M) * W + B,
# computed in float32 and rounded once, which torch computes the same way.
CONVERSION = dict(mean=0.375, weight=1 / 3, bias=0.1)


def conversion_inputs() -> Dict[str, torch.Tensor]:
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    bits = torch.cat([bits, bits[:5]])  # 5 more: a partial last vector
    return {str(dtype): bits.view(dtype).reshape(1, 1, -1) for dtype in (torch.float16, torch.bfloat16)}


def conversion_expected(x: torch.Tensor) -> torch.Tensor:
    m, w, b = (torch.tensor(CONVERSION[k], dtype=torch.float32) for k in ("mean", "weight", "bias"))
    return ((x.float() - m) * w + b).to(x.dtype)


def conversion_outputs(backend: str = "cpp") -> Dict[str, torch.Tensor]:
    import unirep_kernels

    m, w, b = (torch.tensor([CONVERSION[k]], dtype=torch.float32) for k in ("mean", "weight", "bias"))
    return {name: unirep_kernels.domain_batch_norm(x, 0, w, b, m, torch.ones(1), num_domains=1,
                                                   use_batch_stats=False, eps=2.0 ** -30, backend=backend)
            for name, x in conversion_inputs().items()}


if __name__ == "__main__":
    torch.save({"cases": outputs(), "conversions": conversion_outputs()}, sys.argv[1])
