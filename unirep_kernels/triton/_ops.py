# No `from __future__ import annotations`: torch.library infers the op schemas from these
# functions' annotations, which must be real types.
"""The Triton backend as custom ops ``torch.ops.unirep_triton.*``.

Same four functional ops, with the same signatures, as the C++ ops of ``csrc/ops.cpp``:
``domain_batch_norm_forward`` / ``_backward`` and ``domain_instance_norm_forward`` /
``_backward``; autograd connects each forward to its backward. Each op is a
``torch.library.triton_op`` whose body is torch ops on tiny (rows, C) tables plus
``wrap_triton`` launches, so ``torch.compile`` can see (and trace) the kernels; the same
body, run on fake tensors, is the fake kernel. Where ``triton_op`` is missing (older torch)
the ops fall back to ``torch.library.custom_op`` with the kernels launched directly.

Everything runs without host synchronisation: domain counts, per-domain sums and table
math are fixed-shape tensor ops on the device (one-hot memberships, no ``.item()``), and
every reduction is a fixed-order sum of per-block partials (no float atomics): results are
bitwise reproducible run to run.
"""

import contextlib
from typing import List, Optional, Tuple

import torch
import triton.language as tl
from torch import Tensor

from .._autograd import register_autograd
from . import geometry
from .kernels import get_kernels, interpreting

NAMESPACE = "unirep_triton"


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# ---------------------------------------------------------------------------------------
# Layout and launch geometry.


def _dense(x: Tensor) -> Tensor:
    """x itself when contiguous or channels_last (2d/3d); otherwise one contiguous copy."""
    if x.dim() == 2 or x.is_contiguous():
        return x.contiguous()
    if (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)) or \
            (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)):
        return x
    return x.contiguous()


def _strides(xd: Tensor) -> Tuple[int, int, int, int, int, int]:
    """(N, C, S, sn, sc, ss) of the plane view of a dense x."""
    n, c = xd.shape[0], xd.shape[1]
    s = xd.numel() // (n * c)
    ss = 1
    for size, stride in zip(reversed(xd.shape[2:]), reversed(xd.stride()[2:])):
        if size > 1:  # the innermost spatial dim that moves; size-1 dims have arbitrary strides
            ss = stride
            break
    return n, c, s, xd.stride(0), xd.stride(1), ss


def _like(t: Tensor, xd: Tensor) -> Tensor:
    """t (grad_y) in exactly xd's strides and dtype, so both are walked with one offset."""
    if t.dtype == xd.dtype and t.stride() == xd.stride():
        return t
    out = torch.empty_like(xd)
    out.copy_(t)
    return out


_SM_COUNT = {}
_RECORDING: Optional[Tuple[int, list]] = None  # (sm_count, launches) inside record_launches()


def _sm_count(device: torch.device) -> int:
    """SMs the launch geometry plans for: the device's; 1 under the interpreter (it runs
    programs one after another: fewer is faster); the planned count inside
    :func:`record_launches`."""
    if _RECORDING is not None:
        return _RECORDING[0]
    if interpreting() or device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _tiles(xd: Tensor, inputs: int = 1) -> Tuple[Tuple[int, int, int, int, int, int], geometry.Tiles]:
    """The plane view of a dense x and the two-pass tiles for its device (``inputs``:
    tensors of x's shape the kernel reads)."""
    n, c, s, sn, sc, ss = view = _strides(xd)
    return view, geometry.tiles(n, c, s, sc, _sm_count(xd.device), _acc(xd.dtype).itemsize, inputs)


@contextlib.contextmanager
def record_launches(sm_count: int):
    """Launch nothing: inside this block every kernel launch of the ops is appended to the
    yielded list as ``(kernel, grid, args, meta)``, with the geometry planned for a GPU of
    ``sm_count`` SMs. Run the ops on meta tensors inside it (no memory, no device). For the
    ahead-of-time compile check (tests/test_triton_compile.py), which compiles exactly these
    launches."""
    global _RECORDING
    if interpreting():
        raise RuntimeError("record_launches needs compiled kernels: unset TRITON_INTERPRET")
    launches: List[tuple] = []
    previous, _RECORDING = _RECORDING, (sm_count, launches)
    try:
        yield launches
    finally:
        _RECORDING = previous


def _is_fake(t: Tensor) -> bool:
    return isinstance(t, torch._subclasses.FakeTensor) or t.device.type == "meta"


def _launch(kernel, grid, *args, **meta) -> None:
    """``wrap_triton(kernel)[grid](...)``; interpreted kernels (TRITON_INTERPRET=1) that the
    installed torch's wrap_triton refuses are launched directly, and skipped on fake
    tensors (the fake kernel only needs the outputs' metadata)."""
    if _RECORDING is not None:
        _RECORDING[1].append((kernel, grid, args, meta))
        return
    try:
        launcher = torch.library.wrap_triton(kernel)
    except RuntimeError:
        if not interpreting():
            raise
        launcher = kernel
    if launcher is kernel and any(isinstance(a, Tensor) and _is_fake(a) for a in args):
        return
    launcher[grid](*args, **meta)


# ---------------------------------------------------------------------------------------
# Passes (torch-side wrappers of the kernels).


def _plane_moments(xd: Tensor, acc: torch.dtype, plane_shift: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """shift, mean - shift and M2 of every (sample, channel) plane: one read of x.

    shift is each plane's first value ((N, C), plane_shift) or the first value of each
    channel's first plane ((1, C)); the shifted means are small numbers, so the merges
    below lose nothing to a large common offset."""
    (n, c, s, sn, sc, ss), t = _tiles(xd)
    s_per_prog, sb = t.s_per_prog, t.sb
    pmean = torch.empty((n, sb, c), dtype=acc, device=xd.device)
    pm2 = torch.empty_like(pmean)
    _launch(get_kernels().moments, t.grid, xd, pmean, pm2, c, s, sn, sc, ss, s_per_prog, sb, PLANE_SHIFT=plane_shift,
            ACC=_tl_acc(acc), **t.meta)
    first = xd.reshape(n, c, s)[:, :, 0]
    shift = (first if plane_shift else first[:1]).to(acc)
    if sb == 1:
        return shift, pmean[:, 0], pm2[:, 0]
    # Merge the spatial blocks of each plane (Chan), in block order.
    k = (s - torch.arange(sb, device=xd.device) * s_per_prog).clamp(max=s_per_prog).to(acc).view(1, sb, 1)
    mean = (k * pmean).sum(1, keepdim=True) / s
    m2 = (pm2 + k * (pmean - mean).square()).sum(1)
    return shift, mean[:, 0], m2


def _affine(xd: Tensor, rows: Tensor, center: Tensor, scale: Tensor, beta: Tensor, relu: bool) -> Tensor:
    (n, c, s, sn, sc, ss), t = _tiles(xd)
    y = torch.empty_like(xd)
    _launch(get_kernels().affine, t.grid, xd, y, rows, center, scale, beta, c, s, sn, sc, ss, t.s_per_prog, RELU=relu,
            ACC=_tl_acc(center.dtype), **t.meta)
    return y


def _grad_sums(xd: Tensor, dy: Tensor, rows: Tensor, center: Tensor, scale: Tensor, beta: Tensor,
               relu: bool) -> Tuple[Tensor, Tensor]:
    """Per (sample, channel): sum of g and of g * (x - center), (N, C) each."""
    (n, c, s, sn, sc, ss), t = _tiles(xd, inputs=2)
    ps1 = torch.empty((n, t.sb, c), dtype=center.dtype, device=xd.device)
    ps2 = torch.empty_like(ps1)
    _launch(get_kernels().grad_sums, t.grid, xd, dy, rows, center, scale, beta, ps1, ps2, c, s, sn, sc, ss,
            t.s_per_prog, t.sb, RELU=relu, ACC=_tl_acc(center.dtype), **t.meta)
    return ps1.sum(1), ps2.sum(1)  # fixed-order reduction over the spatial blocks


def _input_grad(xd: Tensor, dy: Tensor, rows: Tensor, tables, k, relu: bool) -> Tensor:
    (n, c, s, sn, sc, ss), t = _tiles(xd, inputs=2)
    dx = torch.empty_like(xd)
    center, scale, beta = tables
    ka, kx, k0 = k
    _launch(get_kernels().input_grad, t.grid, xd, dy, dx, rows, center, scale, beta, ka, kx, k0, c, s, sn, sc, ss,
            t.s_per_prog, RELU=relu, ACC=_tl_acc(center.dtype), **t.meta)
    return dx


# ---------------------------------------------------------------------------------------
# Table math: tiny (rows, C) tensors, device-generic.


def _sample_domains(domain: Optional[Tensor], pure_domain: int, n: int, device: torch.device) -> Tensor:
    if domain is not None:
        return domain.contiguous()
    return torch.full((n,), pure_domain, dtype=torch.long, device=device)


def _one_hot(index: Tensor, classes: int, dtype: torch.dtype) -> Tensor:
    """(N, classes) membership, without the range check (a host sync) of F.one_hot."""
    return (index.unsqueeze(1) == torch.arange(classes, device=index.device)).to(dtype)


def _group_sum(member: Tensor, values: Tensor) -> Tensor:
    """(G, C) sums over the samples of each group; member (N, G), values (N, C)."""
    return (member.unsqueeze(2) * values.unsqueeze(1)).sum(0)


def _param_rows(p: Optional[Tensor], rows: int, c: int, fill: float, dtype: torch.dtype, device) -> Tensor:
    """(rows, C) values of an optional (rows, C) or (C,) parameter."""
    if p is None:
        return torch.full((rows, c), fill, dtype=dtype, device=device)
    p = p.to(dtype)
    return p.expand(rows, c) if p.dim() == 1 else p


def _param_per_sample(p: Optional[Tensor], domains: Tensor, c: int, fill: float, dtype: torch.dtype) -> Tensor:
    n = domains.numel()
    if p is None:
        return torch.full((n, c), fill, dtype=dtype, device=domains.device)
    p = p.to(dtype)
    return p.expand(n, c) if p.dim() == 1 else p.index_select(0, domains)


def _bn_tables(mean: Tensor, var: Tensor, per_domain_moments: bool, weight, bias, d: int, c: int, eps: float,
               acc: torch.dtype):
    """center, scale, beta of every domain row, (D, C) in acc."""
    rows_of = (lambda t: t) if per_domain_moments else (lambda t: t[:1].expand(d, c))
    center = rows_of(mean.to(acc))
    invstd = torch.rsqrt(rows_of(var.to(acc)) + eps)
    scale = invstd * _param_rows(weight, d, c, 1.0, acc, mean.device)
    beta = _param_rows(bias, d, c, 0.0, acc, mean.device)
    return center.contiguous(), scale.contiguous(), beta.contiguous()


def _param_grad(grad: Tensor, param: Optional[Tensor], acc: torch.dtype, c: int) -> Tensor:
    """grad (rows, C) in float64 -> the parameter's shape and dtype, (C,) acc when absent."""
    if param is None:
        return grad.to(acc).reshape(c)
    return grad.to(param.dtype).reshape(param.shape).contiguous()


# ---------------------------------------------------------------------------------------
# The ops.

_triton_op = getattr(torch.library, "triton_op", None)


def _define(name: str):
    qualified = f"{NAMESPACE}::{name}"
    if _triton_op is not None:
        return lambda fn: _triton_op(qualified, fn, mutates_args=())

    def register(fn):
        op = torch.library.custom_op(qualified, fn, mutates_args=())
        op.register_fake(fn)  # kernel launches are skipped on fake tensors
        return op
    return register


@_define("domain_batch_norm_forward")
def domain_batch_norm_forward(x: Tensor, domain: Optional[Tensor], pure_domain: int, weight: Optional[Tensor],
                              bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                              num_domains: int, use_batch_stats: bool, stats_per_domain: bool, eps: float,
                              relu: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """y, the (G, C) statistics it normalized with, and each domain's value count (D,).

    Bytes: eval 2*N*C*S*isz (one pass); training 2*N*C*S*isz when a channel's N x S slice
    fits on chip (one fused pass), else 3*N*C*S*isz (moments, then the affine pass).
    """
    xd = _dense(x)
    n, c, s, sn, sc, ss = _strides(xd)
    d = num_domains
    acc = _acc(x.dtype)
    domains = _sample_domains(domain, pure_domain, n, xd.device)
    count = _one_hot(domains, d, acc).sum(0) * s
    if not use_batch_stats:
        assert running_mean is not None and running_var is not None
        mean = running_mean.to(acc).reshape(-1, c).clone()
        var = running_var.to(acc).reshape(-1, c).clone()
        center, scale, beta = _bn_tables(mean, var, running_mean.dim() == 2, weight, bias, d, c, eps, acc)
        return _affine(xd, domains, center, scale, beta, relu), mean, var, count

    g = d if stats_per_domain else 1
    groups = domains if stats_per_domain else torch.zeros_like(domains)
    fused = geometry.fused_tiles(n, c, s, sc, acc.itemsize, _sm_count(xd.device))
    if fused is not None:
        mean = torch.zeros((g, c), dtype=acc, device=xd.device)
        var = torch.zeros_like(mean)
        y = torch.empty_like(xd)
        w = weight.to(acc).contiguous() if weight is not None else mean
        b = bias.to(acc).contiguous() if bias is not None else mean
        _launch(get_kernels().bn_train_fused, fused.grid, xd, y, groups, domains, w, b, mean, var, n, c, s, sn, sc,
                ss, eps, HAS_W=weight is not None, W_PER_ROW=weight is not None and weight.dim() == 2,
                HAS_B=bias is not None, B_PER_ROW=bias is not None and bias.dim() == 2, RELU=relu,
                ACC=_tl_acc(acc), **fused.meta)
        return y, mean, var, count

    # Two passes: plane moments (Welford partials), fixed-order merge per group, affine.
    shift, pmean, pm2 = _plane_moments(xd, acc, plane_shift=False)  # pmean relative to shift (1, C)
    member = _one_hot(groups, g, acc)
    group_count = member.sum(0) * s
    safe = group_count.clamp(min=1).unsqueeze(1)
    shifted = _group_sum(member, pmean) * s / safe
    spread = pm2 + s * (pmean - shifted.index_select(0, groups)).square()
    var = _group_sum(member, spread) / safe
    mean = torch.where(group_count.unsqueeze(1) > 0, shift + shifted, torch.zeros_like(shifted))
    center, scale, beta = _bn_tables(mean, var, stats_per_domain, weight, bias, d, c, eps, acc)
    return _affine(xd, domains, center, scale, beta, relu), mean, var, count


@_define("domain_batch_norm_backward")
def domain_batch_norm_backward(grad_y: Tensor, x: Tensor, domain: Optional[Tensor], pure_domain: int,
                               weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, var: Tensor,
                               count: Tensor, num_domains: int, use_batch_stats: bool, stats_per_domain: bool,
                               eps: float, relu: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """grad_x, grad_weight, grad_bias. Bytes: 5*N*C*S*isz (x and dy read twice, dx written)."""
    xd = _dense(x)
    dy = _like(grad_y, xd)
    n, c, s, _, _, _ = _strides(xd)
    d = num_domains
    acc = _acc(x.dtype)
    domains = _sample_domains(domain, pure_domain, n, xd.device)
    per_domain_moments = stats_per_domain if use_batch_stats else mean.shape[0] > 1
    tables = _bn_tables(mean, var, per_domain_moments, weight, bias, d, c, eps, acc)
    ps1, ps2 = _grad_sums(xd, dy, domains, *tables, relu)

    f64 = torch.float64
    member = _one_hot(domains, d, f64)
    s1 = _group_sum(member, ps1.to(f64))  # (D, C)
    s2 = _group_sum(member, ps2.to(f64))
    rows_of = (lambda t: t) if per_domain_moments else (lambda t: t[:1].expand(d, c))
    inv = torch.rsqrt(rows_of(var.to(f64)) + eps)
    w = _param_rows(weight, d, c, 1.0, f64, xd.device)
    dbias = s1 if bias is not None and bias.dim() == 2 else s1.sum(0, keepdim=True)
    dweight = inv * s2
    if not (weight is not None and weight.dim() == 2):
        dweight = dweight.sum(0, keepdim=True)
    t1, t2 = w * s1, w * inv * s2
    cnt = count.to(f64).unsqueeze(1)
    if not per_domain_moments:
        t1, t2, cnt = t1.sum(0, keepdim=True), t2.sum(0, keepdim=True), cnt.sum(0, keepdim=True)
    if use_batch_stats:
        safe = cnt.clamp(min=1)
        m1 = torch.where(cnt > 0, t1 / safe, torch.zeros_like(t1)).expand(d, c)
        m2 = torch.where(cnt > 0, t2 / safe, torch.zeros_like(t2)).expand(d, c)
    else:
        m1 = m2 = torch.zeros((d, c), dtype=f64, device=xd.device)
    k = ((inv * w).to(acc).contiguous(), (-inv * inv * m2).to(acc).contiguous(), (-inv * m1).to(acc).contiguous())
    dx = _input_grad(xd, dy, domains, tables, k, relu)
    return dx, _param_grad(dweight, weight, acc, c), _param_grad(dbias, bias, acc, c)


def _in_tables(mean: Tensor, var: Tensor, domains: Tensor, weight, bias, c: int, eps: float, acc: torch.dtype):
    """center, scale, beta of every sample row, (N, C) in acc."""
    scale = torch.rsqrt(var.to(acc) + eps) * _param_per_sample(weight, domains, c, 1.0, acc)
    beta = _param_per_sample(bias, domains, c, 0.0, acc)
    return mean.to(acc).contiguous(), scale.contiguous(), beta.contiguous()


@_define("domain_instance_norm_forward")
def domain_instance_norm_forward(x: Tensor, domain: Optional[Tensor], pure_domain: int, weight: Optional[Tensor],
                                 bias: Optional[Tensor], num_domains: int, eps: float,
                                 relu: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """y and the (N, C) plane moments. Bytes: 3*N*C*S*isz (moments read, affine read+write)."""
    xd = _dense(x)
    n, c, s, _, _, _ = _strides(xd)
    acc = _acc(x.dtype)
    domains = _sample_domains(domain, pure_domain, n, xd.device)
    shift, shifted, m2 = _plane_moments(xd, acc, plane_shift=True)
    mean = (shift + shifted).contiguous()
    var = m2 / s
    tables = _in_tables(mean, var, domains, weight, bias, c, eps, acc)
    rows = torch.arange(n, device=xd.device)
    return _affine(xd, rows, *tables, relu), mean.clone(), var


@_define("domain_instance_norm_backward")
def domain_instance_norm_backward(grad_y: Tensor, x: Tensor, domain: Optional[Tensor], pure_domain: int,
                                  weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, var: Tensor,
                                  num_domains: int, eps: float, relu: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """grad_x, grad_weight, grad_bias. Bytes: 5*N*C*S*isz."""
    xd = _dense(x)
    dy = _like(grad_y, xd)
    n, c, s, _, _, _ = _strides(xd)
    d = num_domains
    acc = _acc(x.dtype)
    domains = _sample_domains(domain, pure_domain, n, xd.device)
    tables = _in_tables(mean, var, domains, weight, bias, c, eps, acc)
    rows = torch.arange(n, device=xd.device)
    ps1, ps2 = _grad_sums(xd, dy, rows, *tables, relu)
    f64 = torch.float64
    ps1, ps2 = ps1.to(f64), ps2.to(f64)
    inv = torch.rsqrt(var.to(f64) + eps)
    wd = _param_per_sample(weight, domains, c, 1.0, f64)
    member = _one_hot(domains, d, f64)
    dbias = _group_sum(member, ps1) if bias is not None and bias.dim() == 2 else ps1.sum(0, keepdim=True)
    dweight = _group_sum(member, inv * ps2) if weight is not None and weight.dim() == 2 else \
        (inv * ps2).sum(0, keepdim=True)
    m1 = wd * ps1 / s
    m2 = wd * inv * ps2 / s
    k = ((inv * wd).to(acc).contiguous(), (-inv * inv * m2).to(acc).contiguous(), (-inv * m1).to(acc).contiguous())
    dx = _input_grad(xd, dy, rows, tables, k, relu)
    return dx, _param_grad(dweight, weight, acc, c), _param_grad(dbias, bias, acc, c)


# ---------------------------------------------------------------------------------------
# Autograd.


register_autograd("unirep_triton")  # the same formulas as the C++ ops, on this namespace
