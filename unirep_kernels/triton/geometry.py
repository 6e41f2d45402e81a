"""Launch geometry of the Triton kernels: tiles, grids, warps, and the choice between the
one-read training forward and the two-pass path.

Plain functions of the plane view (N, C, S, channel stride) and the GPU's SM count: no
tensors, no device, no triton. The launchers in :mod:`._ops` call them with the SM count
of the tensor's device; tests call them with any SM count on the CPU, and the
ahead-of-time compile check (tests/test_triton_compile.py) runs the launchers themselves,
so what it compiles is what a GPU would launch. docs/triton.md gives the reasons for each
number below.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

# Two-pass kernels: elements of x one program keeps in registers per tile, and the longest
# spatial run of a tile.
TILE_ELEMENTS = 1024
MAX_BLOCK_S = 1024
# One-read training forward: the largest N x C-block x S slice of x, and the largest
# N x N x C-block same-group product, held in registers; the largest batch.
FUSED_MAX_ELEMENTS = 4096
FUSED_MAX_BATCH = 64
# Programs the two-pass kernels aim for per SM (spatial blocks are split, and tiles of a
# small x shrunk down to MIN_TILE_ELEMENTS, until there are).
PROGRAMS_PER_SM = 4
MIN_TILE_ELEMENTS = 512
# The one-read forward gives way to the two-pass path when its grid would leave most SMs
# idle (fewer programs than this fraction of them) and the two-pass grid is larger.
FUSED_MIN_FILL = 0.5
# Bytes of each tile-sized intermediate a thread may hold (8 float32 or 4 float64 values):
# num_warps grows with the tile until it fits (ptxas -v on the fused kernel: 32 float32
# values per thread spilled at 255 registers, 16 took 186-243, 8 take about 100).
BYTES_PER_THREAD = 32
MIN_WARPS, MAX_WARPS = 4, 16
# A spatial tile leaves at most this fraction of its lanes as padding (a 7x7 plane in one
# 64-wide tile would leave 15 of 64), unless the plane is shorter than MIN_ROW.
MAX_PADDING = 1 / 8
MIN_ROW = 8


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Tiles:
    """Geometry of a two-pass kernel launch (moments, affine, grad_sums, input_grad).

    A program takes sample n, BLOCK_C channels and S_PER_PROG spatial positions (SB such
    blocks per plane), in chunks of BLOCK_S."""
    block_c: int
    block_s: int
    grid: Tuple[int, int, int]
    s_per_prog: int
    sb: int
    num_warps: int

    @property
    def meta(self) -> Dict[str, int]:
        """The launch keywords: the constexpr tile sizes and num_warps."""
        return dict(BLOCK_C=self.block_c, BLOCK_S=self.block_s, num_warps=self.num_warps)


@dataclass(frozen=True)
class FusedTiles:
    """Geometry of the one-read training forward: one program per BLOCK_C channels, holding
    the [BLOCK_N, BLOCK_C, BLOCK_S] slice of x."""
    block_n: int
    block_c: int
    block_s: int
    grid: Tuple[int]
    num_warps: int

    @property
    def meta(self) -> Dict[str, int]:
        return dict(BLOCK_N=self.block_n, BLOCK_C=self.block_c, BLOCK_S=self.block_s, num_warps=self.num_warps)


def warps_for(elements: int, acc_bytes: int) -> int:
    """num_warps that gives each thread at most BYTES_PER_THREAD of an ``elements``-sized
    accumulator-typed intermediate (a power of two in [MIN_WARPS, MAX_WARPS])."""
    warps = next_power_of_2(cdiv(elements * acc_bytes, 32 * BYTES_PER_THREAD))
    return max(MIN_WARPS, min(MAX_WARPS, warps))


def spatial_block(s: int, limit: int) -> int:
    """The spatial run of a tile for planes of ``s`` values: the longest power of two up to
    ``limit`` whose chunks over the plane leave at most MAX_PADDING of the lanes idle
    (49 -> 8: 7 chunks, 56 lanes; 196 -> 32; 784 -> 128; 3136 -> 512), but not shorter
    than MIN_ROW (or the plane) so that a row of the tile stays a coalesced run."""
    block = min(next_power_of_2(s), limit)
    floor = min(next_power_of_2(s), MIN_ROW, limit)
    while block > floor:
        lanes = cdiv(s, block) * block
        if (lanes - s) <= MAX_PADDING * lanes:
            break
        block //= 2
    return block


def lane_use(s: int, block_s: int) -> float:
    """Fraction of a tile's spatial lanes that hold values, over a whole plane."""
    return s / (cdiv(s, block_s) * block_s)


def tiles(n: int, c: int, s: int, sc: int, sm_count: int, acc_bytes: int = 4, inputs: int = 1) -> Tiles:
    """Tile [BLOCK_C, BLOCK_S] with the unit-stride axis long (sc == 1: channels_last or
    S == 1), and the spatial split that gives a GPU of ``sm_count`` SMs enough programs
    (``sm_count=1``: the interpreter, which runs programs one after another). ``inputs``:
    tensors of x's shape the kernel reads (2 in the backward: x and dy), which count
    towards the values a thread holds."""
    np2 = next_power_of_2
    target = PROGRAMS_PER_SM * sm_count if sm_count > 1 else 1
    if sc == 1:  # channels are contiguous: rows of up to 64 of them
        limit = max(1, TILE_ELEMENTS // min(np2(c), 64))
        block_s = spatial_block(s, limit)
        block_c = min(np2(c), 64 if block_s == min(np2(s), limit) else TILE_ELEMENTS // block_s)
    else:
        block_s = spatial_block(s, MAX_BLOCK_S)
        block_c = min(np2(c), max(1, TILE_ELEMENTS // block_s))
    # A small x: smaller tiles until the grid can reach the target, shrinking the strided
    # axis (rows stay coalesced; halving a spatial run never adds padding).
    while n * cdiv(c, block_c) * cdiv(s, block_s) < target and block_c * block_s > MIN_TILE_ELEMENTS:
        if sc == 1 and block_s > 1:
            block_s //= 2
        elif sc != 1 and block_c > 1:
            block_c //= 2
        else:
            break
    cb = cdiv(c, block_c)
    chunks = cdiv(s, block_s)
    sb = max(1, min(chunks, cdiv(target, n * cb)))
    s_per_prog = cdiv(chunks, sb) * block_s
    sb = cdiv(s, s_per_prog)
    return Tiles(block_c, block_s, (n, cb, sb), s_per_prog, sb, warps_for(block_c * block_s * inputs, acc_bytes))


def fused_tiles(n: int, c: int, s: int, sc: int, acc_bytes: int, sm_count: int) -> Optional[FusedTiles]:
    """Tile of the one-read training forward, or None when the two-pass path should run:
    a channel's N x S slice does not fit on chip, or the fused grid (one program per
    channel block, shrunk to one channel per program, eight for channels_last so rows
    stay coalesced) would leave most SMs idle where the two-pass grid would not."""
    np2 = next_power_of_2
    block_n, block_s = np2(n), np2(s)
    budget = FUSED_MAX_ELEMENTS * 4 // acc_bytes
    if block_n > FUSED_MAX_BATCH or block_n * max(block_s, block_n) > budget:
        return None
    # Powers of two throughout: the x tile is block_n x block_c x block_s, the same-group
    # matrix product block_n x block_n x block_c.
    block_c = min(np2(c), budget // (block_n * block_s), budget // (block_n * block_n), 64)
    floor = min(np2(c), 8) if (sc == 1 and s > 1) else 1
    if block_c < floor:
        return None  # channels_last with too few channels per tile would not coalesce
    while block_c > floor and cdiv(c, block_c) < sm_count:
        block_c //= 2  # more, smaller programs until every SM has one
    programs = cdiv(c, block_c)
    if programs < FUSED_MIN_FILL * sm_count:
        two_pass = tiles(n, c, s, sc, sm_count, acc_bytes)
        if two_pass.grid[0] * two_pass.grid[1] * two_pass.grid[2] > programs:
            return None
    inner = max(block_n * block_c * block_s, block_n * block_n * block_c)
    return FusedTiles(block_n, block_c, block_s, (programs,), warps_for(inner, acc_bytes))
