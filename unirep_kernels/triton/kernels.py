"""The Triton kernels of the domain-muxed normalizations, and their launch geometry.

Every kernel sees x as (N, C, S) planes through three strides (sn, sc, ss): contiguous
NCHW has (C*S, S, 1), channels_last has (S*C, 1, C), a 2-d (N, C) input has S = 1. A
program works on a [BLOCK_C, BLOCK_S] tile of one sample; tiles are shaped so that the
unit-stride axis is the long one (S for NCHW, C for channels_last), so loads coalesce in
both layouts without a copy.

Byte counts below are for x of N*C*S elements of `isz` bytes (2 for half, 4 for float32);
the tables (rows x C, float32) and the partials (N x SB x C, SB = spatial blocks per plane)
are O(x / BLOCK_S) and left out.

The Python functions here are undecorated: :func:`get_kernels` applies ``triton.jit`` once
per interpreter mode (``TRITON_INTERPRET`` is read when ``triton.jit`` runs, so a process
that turns the interpreter on after import still gets interpreted kernels).
"""

import types

import triton
import triton.language as tl

from ..backends import triton_interpreting as interpreting  # what triton.jit reads: interpreted kernels?

# Only builtins of triton.language inside the kernels: tl.sum and tl.zeros are themselves
# jitted functions, fixed as compiled or interpreted when triton is first imported, so they
# fail inside interpreted kernels whenever TRITON_INTERPRET was set after that import (as
# the tests do). Hence tl.reduce(v, axis, _add) for tl.sum(v, axis) (the same for float
# tensors; the interpreter recognises this combine function and reduces with numpy) and
# tl.full(shape, 0, dtype) for tl.zeros(shape, dtype).
_add = tl.standard._sum_combine


def _moments(x_ptr, mean_ptr, m2_ptr, C, S, sn, sc, ss, S_PER_PROG, SB, PLANE_SHIFT: tl.constexpr,
             BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    """Partial moments of every (sample, channel, spatial block): mean - shift and M2 (sum
    of squared deviations) of the block's values, written at [(n * SB + sb) * C + c]. The
    shift is the first value of the plane (PLANE_SHIFT, instance norm) or of the channel's
    first plane (batch norm): partial means stay small numbers, so merging them costs no
    precision even for a large common offset such as 1e4.

    Reads x once: N*C*S*isz bytes; writes 2*N*SB*C*acc bytes (partials).

    Each BLOCK_S chunk is summed in registers around the shift, centred on its own mean,
    and merged into the running (mean, M2) with Chan's formula: Welford's merge, stable at
    any size.
    """
    n = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    sb = tl.program_id(2)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    base = x_ptr + n * sn + c.to(tl.int64)[:, None] * sc
    s0 = sb * S_PER_PROG
    s_end = tl.minimum(s0 + S_PER_PROG, S)
    if PLANE_SHIFT:
        shift_ptr = x_ptr + n * sn
    else:
        shift_ptr = x_ptr
    shift = tl.load(shift_ptr + c.to(tl.int64) * sc, mask=cmask, other=0).to(ACC)
    count = (s0 * 0).to(ACC)  # values merged so far: one scalar, the same for every channel
    mean = tl.full([BLOCK_C], 0, dtype=ACC)
    m2 = tl.full([BLOCK_C], 0, dtype=ACC)
    for start in range(s0, s_end, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        mask = cmask[:, None] & (s < s_end)[None, :]
        v = tl.load(base + s.to(tl.int64)[None, :] * ss, mask=mask, other=0).to(ACC)
        k = tl.minimum(s_end - start, BLOCK_S).to(ACC)
        d = tl.where(mask, v - shift[:, None], 0)
        bmean = tl.reduce(d, 1, _add) / k
        e = tl.where(mask, d - bmean[:, None], 0)
        bm2 = tl.reduce(e * e, 1, _add)
        total = count + k
        delta = bmean - mean
        mean = mean + delta * (k / total)
        m2 = m2 + bm2 + delta * delta * (count * k / total)
        count = total
    out = (n * SB + sb) * C + c
    tl.store(mean_ptr + out, mean, mask=cmask)
    tl.store(m2_ptr + out, m2, mask=cmask)


def _affine(x_ptr, y_ptr, rows_ptr, center_ptr, scale_ptr, beta_ptr, C, S, sn, sc, ss, S_PER_PROG,
            RELU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    """y = act((x - center[r]) * scale[r] + beta[r]), r = rows[n] (domain for BN, sample for IN).

    Reads x once, writes y once: 2*N*C*S*isz bytes. This is the whole eval-mode forward.
    """
    n = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    sb = tl.program_id(2)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    r = tl.load(rows_ptr + n)
    center = tl.load(center_ptr + r * C + c, mask=cmask, other=0).to(ACC)
    scale = tl.load(scale_ptr + r * C + c, mask=cmask, other=0).to(ACC)
    beta = tl.load(beta_ptr + r * C + c, mask=cmask, other=0).to(ACC)
    offc = n * sn + c.to(tl.int64)[:, None] * sc
    s0 = sb * S_PER_PROG
    s_end = tl.minimum(s0 + S_PER_PROG, S)
    for start in range(s0, s_end, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        mask = cmask[:, None] & (s < s_end)[None, :]
        off = offc + s.to(tl.int64)[None, :] * ss
        v = tl.load(x_ptr + off, mask=mask, other=0).to(ACC)
        out = (v - center[:, None]) * scale[:, None] + beta[:, None]
        if RELU:
            out = tl.where(out > 0, out, 0)
        tl.store(y_ptr + off, out.to(y_ptr.dtype.element_ty), mask=mask)


def _bn_train_fused(x_ptr, y_ptr, group_ptr, wrow_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, N, C, S, sn, sc, ss, eps,
                    HAS_W: tl.constexpr, W_PER_ROW: tl.constexpr, HAS_B: tl.constexpr, B_PER_ROW: tl.constexpr,
                    RELU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                    ACC: tl.constexpr):
    """Training forward in one read when a channel's whole batch slice (N x S) fits on chip.

    One program holds x[:, c-block, :] in registers, takes per-group moments with an exact
    two-pass (mean, then centred squares) over the registers, and writes y.
    Reads x once, writes y once: 2*N*C*S*isz bytes (the two-pass path needs 3*N*C*S*isz).

    group[n]: the sample's stat group (its domain, or 0 for whole-batch statistics);
    wrow[n]: the sample's weight/bias row (its domain). Group moments go to
    mean/var[group, c] (every member writes the same value; rows of absent groups are left
    as the caller initialised them).
    """
    cb = tl.program_id(0)
    nn = tl.arange(0, BLOCK_N)
    nmask = nn < N
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    s = tl.arange(0, BLOCK_S)
    smask = s < S
    grp = tl.load(group_ptr + nn, mask=nmask, other=-1)
    wrow = tl.load(wrow_ptr + nn, mask=nmask, other=0)
    off = (nn.to(tl.int64)[:, None, None] * sn + c.to(tl.int64)[None, :, None] * sc
           + s.to(tl.int64)[None, None, :] * ss)
    mask = nmask[:, None, None] & cmask[None, :, None] & smask[None, None, :]
    v = tl.load(x_ptr + off, mask=mask, other=0).to(ACC)
    shift = tl.load(x_ptr + c.to(tl.int64) * sc, mask=cmask, other=0).to(ACC)  # x[0, c, 0]
    d = tl.where(mask, v - shift[None, :, None], 0)
    plane_sum = tl.reduce(d, 2, _add)  # (BLOCK_N, BLOCK_C)
    same = ((grp[:, None] == grp[None, :]) & nmask[:, None] & nmask[None, :]).to(ACC)  # (BLOCK_N, BLOCK_N)
    group_sum = tl.reduce(same[:, :, None] * plane_sum[None, :, :], 1, _add)
    group_count = tl.maximum(tl.reduce(same, 1, _add), 1) * S  # values per channel in each sample's group
    mean = shift[None, :] + group_sum / group_count[:, None]
    e = tl.where(mask, v - mean[:, :, None], 0)
    plane_m2 = tl.reduce(e * e, 2, _add)
    var = tl.reduce(same[:, :, None] * plane_m2[None, :, :], 1, _add) / group_count[:, None]
    invstd = 1.0 / tl.sqrt(var + eps)
    nc_mask = nmask[:, None] & cmask[None, :]
    if HAS_W:
        if W_PER_ROW:
            w = tl.load(w_ptr + wrow[:, None] * C + c[None, :], mask=nc_mask, other=0).to(ACC)
        else:
            w = tl.load(w_ptr + c, mask=cmask, other=0).to(ACC)[None, :]
        scale = invstd * w
    else:
        scale = invstd
    if HAS_B:
        if B_PER_ROW:
            b = tl.load(b_ptr + wrow[:, None] * C + c[None, :], mask=nc_mask, other=0).to(ACC)
        else:
            b = tl.load(b_ptr + c, mask=cmask, other=0).to(ACC)[None, :]
    else:
        b = tl.full([BLOCK_N, BLOCK_C], 0, dtype=ACC)
    out = e * scale[:, :, None] + b[:, :, None]
    if RELU:
        out = tl.where(out > 0, out, 0)
    tl.store(y_ptr + off, out.to(y_ptr.dtype.element_ty), mask=mask)
    stat = grp[:, None] * C + c[None, :]
    tl.store(mean_ptr + stat, mean, mask=nc_mask)
    tl.store(var_ptr + stat, var, mask=nc_mask)


def _grad_sums(x_ptr, dy_ptr, rows_ptr, center_ptr, scale_ptr, beta_ptr, s1_ptr, s2_ptr, C, S, sn, sc, ss,
               S_PER_PROG, SB, RELU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
               ACC: tl.constexpr):
    """Partial sums of g and g * (x - center[r]) per (sample, channel, spatial block), with
    g = dy masked by the ReLU recomputed from x and the forward tables (no saved y).

    Reads x and dy once: 2*N*C*S*isz bytes; writes 2*N*SB*C*acc bytes (partials, summed
    afterwards in a fixed order: no atomics, bitwise reproducible).
    """
    n = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    sb = tl.program_id(2)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    r = tl.load(rows_ptr + n)
    center = tl.load(center_ptr + r * C + c, mask=cmask, other=0).to(ACC)
    scale = tl.load(scale_ptr + r * C + c, mask=cmask, other=0).to(ACC)
    beta = tl.load(beta_ptr + r * C + c, mask=cmask, other=0).to(ACC)
    offc = n * sn + c.to(tl.int64)[:, None] * sc
    s0 = sb * S_PER_PROG
    s_end = tl.minimum(s0 + S_PER_PROG, S)
    s1 = tl.full([BLOCK_C], 0, dtype=ACC)
    s2 = tl.full([BLOCK_C], 0, dtype=ACC)
    for start in range(s0, s_end, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        mask = cmask[:, None] & (s < s_end)[None, :]
        off = offc + s.to(tl.int64)[None, :] * ss
        xc = tl.load(x_ptr + off, mask=mask, other=0).to(ACC) - center[:, None]
        g = tl.load(dy_ptr + off, mask=mask, other=0).to(ACC)
        if RELU:
            g = tl.where(xc * scale[:, None] + beta[:, None] > 0, g, 0)
        g = tl.where(mask, g, 0)
        s1 += tl.reduce(g, 1, _add)
        s2 += tl.reduce(g * xc, 1, _add)
    out = (n * SB + sb) * C + c
    tl.store(s1_ptr + out, s1, mask=cmask)
    tl.store(s2_ptr + out, s2, mask=cmask)


def _input_grad(x_ptr, dy_ptr, dx_ptr, rows_ptr, center_ptr, scale_ptr, beta_ptr, ka_ptr, kx_ptr, k0_ptr, C, S,
                sn, sc, ss, S_PER_PROG, RELU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                ACC: tl.constexpr):
    """dx = ka[r] g + kx[r] (x - center[r]) + k0[r], g = dy masked by the recomputed ReLU.

    Reads x and dy once, writes dx once: 3*N*C*S*isz bytes (backward total with
    :func:`_grad_sums`: 5*N*C*S*isz).
    """
    n = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    sb = tl.program_id(2)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    r = tl.load(rows_ptr + n)
    center = tl.load(center_ptr + r * C + c, mask=cmask, other=0).to(ACC)
    scale = tl.load(scale_ptr + r * C + c, mask=cmask, other=0).to(ACC)
    beta = tl.load(beta_ptr + r * C + c, mask=cmask, other=0).to(ACC)
    ka = tl.load(ka_ptr + r * C + c, mask=cmask, other=0).to(ACC)
    kx = tl.load(kx_ptr + r * C + c, mask=cmask, other=0).to(ACC)
    k0 = tl.load(k0_ptr + r * C + c, mask=cmask, other=0).to(ACC)
    offc = n * sn + c.to(tl.int64)[:, None] * sc
    s0 = sb * S_PER_PROG
    s_end = tl.minimum(s0 + S_PER_PROG, S)
    for start in range(s0, s_end, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        mask = cmask[:, None] & (s < s_end)[None, :]
        off = offc + s.to(tl.int64)[None, :] * ss
        xc = tl.load(x_ptr + off, mask=mask, other=0).to(ACC) - center[:, None]
        g = tl.load(dy_ptr + off, mask=mask, other=0).to(ACC)
        if RELU:
            g = tl.where(xc * scale[:, None] + beta[:, None] > 0, g, 0)
        out = ka[:, None] * g + kx[:, None] * xc + k0[:, None]
        tl.store(dx_ptr + off, out.to(dx_ptr.dtype.element_ty), mask=mask)


_RAW = dict(moments=_moments, affine=_affine, bn_train_fused=_bn_train_fused, grad_sums=_grad_sums,
            input_grad=_input_grad)
_BUILT = {}
# Loop bounds and partial-block counts that change with the shape but not the code: no
# specialisation on their value (== 1, multiple of 16), so fewer compiles per model.
_NOT_SPECIALIZED = ("S_PER_PROG", "SB")


def get_kernels() -> types.SimpleNamespace:
    """The jitted kernels for the current mode (compiled GPU kernels, or interpreted)."""
    mode = interpreting()
    ns = _BUILT.get(mode)
    if ns is None:
        ns = types.SimpleNamespace(**{name: triton.jit(fn, do_not_specialize=_NOT_SPECIALIZED)
                                      for name, fn in _RAW.items()})
        _BUILT[mode] = ns
    return ns
