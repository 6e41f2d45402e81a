"""The Triton launch geometry (unirep_kernels/triton/geometry.py) as plain functions of
(shape, strides, dtype, SM count), on the CPU: tiles cover x exactly once, short planes
waste few lanes, no thread holds more than BYTES_PER_THREAD of an intermediate, the grid
fills the GPU, and the one-read training forward gives way to the two-pass path when its
grid would leave most SMs idle. tests/test_triton_compile.py compiles what these choose."""

from __future__ import annotations

import itertools

import pytest

pytest.importorskip("triton")

from unirep_kernels.triton import geometry as g  # noqa: E402

SMS = 132  # H100 / H200
NCHW, CL = "nchw", "cl"


def plane_view(shape, layout):
    """(n, c, s, sc) of the plane view the launchers take of a dense x of this shape."""
    n, c = shape[:2]
    s = 1
    for d in shape[2:]:
        s *= d
    return n, c, s, (1 if layout == CL or s == 1 else s)


SHAPES = [(128, 16, 64, 64), (128, 32, 64, 64), (128, 64, 32, 32), (128, 128, 16, 16), (128, 256, 8, 8),
          (64, 512, 7, 7), (128, 512, 7, 7), (64, 256, 14, 14), (32, 128, 28, 28), (16, 64, 56, 56),
          (256, 2048, 1, 1), (8, 64, 8, 8), (2, 256, 8, 8), (64, 64, 8, 8), (6, 3, 4, 3), (5, 2, 1, 1),
          (4, 3, 5), (6, 2), (3, 5, 224, 224)]


@pytest.mark.parametrize("acc_bytes, inputs", [(4, 1), (4, 2), (8, 1)])
@pytest.mark.parametrize("sms", [1, 8, SMS])
@pytest.mark.parametrize("layout", [NCHW, CL])
@pytest.mark.parametrize("shape", SHAPES)
def test_two_pass_tiles_cover_x_once(shape, layout, sms, acc_bytes, inputs):
    n, c, s, sc = plane_view(shape, layout)
    t = g.tiles(n, c, s, sc, sms, acc_bytes, inputs)
    for v in (t.block_c, t.block_s, t.num_warps):
        assert v >= 1 and v & (v - 1) == 0  # powers of two (tl.arange, num_warps)
    assert t.grid == (n, g.cdiv(c, t.block_c), t.sb)
    assert t.s_per_prog % t.block_s == 0
    assert (t.sb - 1) * t.s_per_prog < s <= t.sb * t.s_per_prog  # every position once, no empty block
    assert t.block_c <= g.next_power_of_2(c) and t.block_s <= g.next_power_of_2(s)
    assert t.block_c * t.block_s <= g.TILE_ELEMENTS
    assert g.MIN_WARPS <= t.num_warps <= g.MAX_WARPS
    # each thread holds at most BYTES_PER_THREAD of each input's tile in the accumulator type
    assert t.block_c * t.block_s * inputs * acc_bytes <= 32 * t.num_warps * g.BYTES_PER_THREAD
    one = g.tiles(n, c, s, sc, sms, acc_bytes)
    assert (t.block_c, t.block_s, t.grid, t.s_per_prog) == (one.block_c, one.block_s, one.grid, one.s_per_prog)


@pytest.mark.parametrize("layout", [NCHW, CL])
@pytest.mark.parametrize("s", [49, 196, 784, 3136, 7 * 9, 100])
def test_short_planes_waste_at_most_an_eighth_of_the_lanes(s, layout):
    """A 7x7 plane in one 64-wide tile leaves 15 of 64 lanes idle; the tiles chosen leave
    at most 1/8 (49 -> runs of 8 in 7 chunks; 196 -> 32)."""
    n, c = 128, 512
    t = g.tiles(n, c, s, 1 if layout == CL else s, SMS)
    assert g.lane_use(s, t.block_s) >= 7 / 8
    assert t.block_s >= min(g.MIN_ROW, g.next_power_of_2(s))  # rows stay coalesced runs
    assert t.block_c * t.block_s >= 512  # and the tile is not tiny


def test_spatial_block_examples():
    assert [g.spatial_block(s, 1024) for s in (49, 196, 784, 3136, 4096, 64, 1, 5, 12)] == \
        [8, 32, 128, 512, 1024, 64, 1, 8, 8]
    assert g.spatial_block(49, 4) == 4  # the limit wins


def test_large_inputs_get_enough_programs():
    for shape, layout in itertools.product(SHAPES[:10], (NCHW, CL)):
        n, c, s, sc = plane_view(shape, layout)
        t = g.tiles(n, c, s, sc, SMS)
        programs = t.grid[0] * t.grid[1] * t.grid[2]
        assert programs >= min(g.PROGRAMS_PER_SM * SMS, n * g.cdiv(c, t.block_c) * g.cdiv(s, t.block_s))
        assert programs >= SMS, (shape, layout, t)


def test_small_inputs_shrink_tiles_to_fill_the_gpu():
    t = g.tiles(8, 64, 64, 64, SMS)  # 8x64x8x8 NCHW: [32, 64] tiles would make 16 programs
    assert t.block_s == 64 and t.block_c * t.block_s == g.MIN_TILE_ELEMENTS and t.grid == (8, 8, 1)
    assert g.tiles(8, 64, 64, 64, 1).block_c == 16  # the interpreter (1 "SM") keeps full tiles


@pytest.mark.parametrize("acc_bytes", [4, 8])
@pytest.mark.parametrize("layout", [NCHW, CL])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_tile_fits_on_chip(shape, layout, acc_bytes):
    n, c, s, sc = plane_view(shape, layout)
    for sms in (1, SMS):
        f = g.fused_tiles(n, c, s, sc, acc_bytes, sms)
        if f is None:
            continue
        assert f.block_n >= n and f.block_s >= s and f.block_n <= g.FUSED_MAX_BATCH
        budget = g.FUSED_MAX_ELEMENTS * 4 // acc_bytes
        x_tile, same = f.block_n * f.block_c * f.block_s, f.block_n * f.block_n * f.block_c
        assert x_tile <= budget and same <= budget
        assert max(x_tile, same) * acc_bytes <= 32 * f.num_warps * g.BYTES_PER_THREAD
        assert f.grid == (g.cdiv(c, f.block_c),)
        if sc == 1 and s > 1:
            assert f.block_c >= min(8, g.next_power_of_2(c))  # channels_last rows coalesce


def test_fused_or_two_pass_is_a_function_of_shape_and_sm_count():
    fused = lambda shape, sms, layout=NCHW: g.fused_tiles(*plane_view(shape, layout), 4, sms)  # noqa: E731
    # 64x512x7x7: one channel per program, 512 programs: fused on an H100/H200.
    f = fused((64, 512, 7, 7), SMS)
    assert f is not None and f.meta == dict(BLOCK_N=64, BLOCK_C=1, BLOCK_S=64, num_warps=16) and f.grid == (512,)
    # 64x64x8x8: at most 64 programs, under half of 132 SMs, while the two-pass grid is 512.
    assert fused((64, 64, 8, 8), SMS) is None
    assert fused((64, 64, 8, 8), 100) is not None  # 64 >= 50: fills most SMs of a smaller GPU
    # 2x256x8x8: the channel block shrinks from 32 to 1 to give 256 programs.
    assert fused((2, 256, 8, 8), SMS).grid == (256,)
    # 8x64x8x8: 64 programs, but the two-pass grid would be no larger: stay fused.
    assert fused((8, 64, 8, 8), SMS).grid == (64,)
    # Too large a slice, or a batch over FUSED_MAX_BATCH: two-pass at any SM count.
    for shape in [(128, 256, 8, 8), (32, 128, 16, 16), (256, 2048, 1, 1)]:
        assert fused(shape, 1) is None and fused(shape, SMS) is None
    # The interpreter (one program at a time) takes the fused path whenever it fits.
    assert fused((64, 64, 8, 8), 1) is not None
    # float64: half the elements on chip.
    assert g.fused_tiles(64, 512, 49, 49, 8, SMS) is None and g.fused_tiles(32, 512, 49, 49, 8, SMS) is not None


def test_warps_for():
    assert [g.warps_for(e, 4) for e in (128, 1024, 2048, 4096, 1 << 20)] == [4, 4, 8, 16, 16]
    assert [g.warps_for(e, 8) for e in (512, 1024, 2048)] == [4, 8, 16]


def test_triton_paths_forces_each_path_in_the_launchers():
    """benchmarks/triton_paths.py times the fused and the two-pass training forward on a GPU
    by moving geometry's thresholds (force_path); the launchers must follow, and the
    thresholds come back afterwards. Recorded on meta tensors with the 132-SM geometry."""
    import os
    import sys

    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    sys.path.insert(0, bench)
    try:
        import triton_paths
        import triton_resources as tr
    finally:
        sys.path.remove(bench)

    def kernels(shape, layout=NCHW):
        return {launch[0].fn.__name__ for _, launch in tr.record([tr.Case("bn-train", shape, layout, "fp32")], SMS)}

    fused, two_pass = {"_bn_train_fused"}, {"_moments", "_affine"}
    saved = (g.FUSED_MIN_FILL, g.FUSED_MAX_ELEMENTS)
    assert kernels((64, 64, 8, 8)) == two_pass  # 64 fused programs on 132 SMs: the geometry's pick
    assert kernels((64, 512, 7, 7)) == fused
    assert kernels((8, 64, 8, 8), CL) == two_pass
    with triton_paths.force_path("fused"):
        assert kernels((64, 64, 8, 8)) == fused
        assert kernels((8, 64, 8, 8), CL) == fused  # 8 programs
    with triton_paths.force_path("two-pass"):
        assert kernels((64, 512, 7, 7)) == two_pass
    assert (g.FUSED_MIN_FILL, g.FUSED_MAX_ELEMENTS) == saved
    with pytest.raises(ValueError, match="path must be one of"):
        with triton_paths.force_path("one-pass"):
            pass
