"""Outputs of the C++ CPU kernels on a fixed set of cases, for tests/test_cpu_kernels.py.

Run as a script (``python tests/cpu_kernel_outputs.py OUT.pt``) under a given
ATEN_CPU_CAPABILITY / UNIREP_CPU_STREAM_STORES, it saves {case name: {output: tensor}};
imported, ``cases()`` and ``outputs()`` give the same in this process. The cases cover every
pass kernel: BN training and eval, IN, forward and backward, in float64, float32, float16
and bfloat16, contiguous and channels_last, with channel counts that take the flat (C = 16),
vector plus leftover (C = 20) and whole-vector (C = 64) channels_last paths, plane sizes with
and without a partial last vector, and a 2-d input (batch norm).
"""

from __future__ import annotations

import itertools
import os
import sys
from typing import Dict, Iterator, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import cast_params, make_case, results_with_grads, run_bn, run_in  # noqa: E402

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


if __name__ == "__main__":
    torch.save(outputs(), sys.argv[1])
