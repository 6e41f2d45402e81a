"""The case grid of ``benchmarks/norm_speed.py``: shapes, cases, modes and the byte model.

A *case* is one input configuration: a shape (N, C, H, W), a dtype, a memory layout, a
normalization (BN, BN+ or IN), a number of domains D and a batch kind (pure: the domain is
an int; mixed: an int64 (N,) tensor). Every case is timed in each of its *modes* (training
forward, eval forward, backward, training forward+backward), all implementations
interleaved within one mode.

The full product of all axes explodes (5 shapes x 3 dtypes x 2 layouts x 3 norms x 5
domain variants = 450 cases per suite), so the default grid is a *sweep*: at every shape
the main configuration (float32, NCHW, BN, D=1 pure and D=10 mixed), and at the suite's
sweep shape each other axis value in turn with the rest held at the main values.
``--grid product`` takes the full product of the selected values instead.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

MiB = 2**20

# --------------------------------------------------------------------------------------
# Axis values.

DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"f32": "float32", "fp32": "float32", "float": "float32", "bf16": "bfloat16",
                 "f16": "float16", "fp16": "float16", "half": "float16"}
SHORT_DTYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
LAYOUTS = ("NCHW", "NHWC")  # NHWC = torch.channels_last
LAYOUT_ALIASES = {"nchw": "NCHW", "contiguous": "NCHW", "nhwc": "NHWC", "channels_last": "NHWC", "cl": "NHWC"}
NORMS = ("bn", "bn+", "in")
NORM_TITLES = {"bn": "BN (batch stats in training, running stats at eval)",
               "bn+": "BN+ (batch stats at eval too: the paper's BN+, batch_stats_at_eval=True)",
               "in": "IN (instance norm + the affine of each sample's domain)"}
DOMAIN_COUNTS = (1, 3, 10)
BATCHES = ("pure", "mixed")
SUITES = ("resnet38", "bandwidth")

# The main configuration: what every shape is timed with in the sweep grid (the kernel-core
# issue's targets are stated for it: D=1 pure against native F.batch_norm, D=10 mixed
# against the eager per-domain loop).
MAIN_DTYPE, MAIN_LAYOUT, MAIN_NORM = "float32", "NCHW", "bn"
MAIN_DOMAIN_VARIANTS = ((1, "pure"), (10, "mixed"))


# --------------------------------------------------------------------------------------
# Modes and the byte model.


@dataclasses.dataclass(frozen=True)
class ModeSpec:
    """One timed pass. ``units``: bytes moved by the minimum algorithm in units of x's size
    (N*C*H*W*itemsize), per normalization (a norm absent from ``units`` has no such mode)."""
    name: str
    title: str
    units: Dict[str, int]
    training: bool  # batch statistics (BN) and running-stat update
    records_graph: bool  # forward under torch.enable_grad (as in training)
    backward: bool  # the timed call includes a backward pass


MODES: Dict[str, ModeSpec] = {m.name: m for m in (
    ModeSpec("train_fwd", "training forward (batch stats, running stats updated, graph recorded)",
             {"bn": 3, "in": 3}, training=True, records_graph=True, backward=False),
    ModeSpec("eval_fwd", "eval forward under torch.no_grad (BN: running stats; BN+: batch stats, no update)",
             {"bn": 2, "bn+": 3, "in": 3}, training=False, records_graph=False, backward=False),
    ModeSpec("backward", "backward alone (grad of x, weight, bias through a retained graph)",
             {"bn": 5, "in": 5}, training=True, records_graph=True, backward=True),
    ModeSpec("train_fwd_bwd", "training forward + backward",
             {"bn": 8, "in": 8}, training=True, records_graph=True, backward=True),
)}

BYTE_MODEL = (
    "Bytes moved by the minimum algorithm for a tensor that does not fit in cache, in units of x's size "
    "(N*C*H*W*itemsize); per-channel tables (weight, bias, statistics, the domain index) are not counted. "
    "BN training forward: 3 (read x for the statistics, read x again to normalize, write y). "
    "BN eval forward: 2 (read x, write y). BN+ eval forward and IN forward: 3 (statistics of the batch or the "
    "instance first, then normalize). Backward: 5 (read dy and x for the reductions sum(dy), sum(dy*(x-mean)), "
    "read both again for dx, write dx). Training forward+backward: 3 + 5 = 8. "
    "A kernel that keeps x on chip between the two forward reads (the Triton fused training kernel for small "
    "N, docs/triton.md) moves less than this, and a small x may be served from cache: both can exceed the copy "
    "bandwidth. GB/s = bytes / median time; '% copy' = GB/s over the copy bandwidth dst.copy_(src) measured at "
    "the start of the run for the same size (counted as 2 units: read src, write dst; write-allocate traffic "
    "is not counted, here or there).")


def bytes_moved(norm: str, mode: str, x_bytes: int) -> int:
    """Bytes moved by the minimum algorithm for ``norm`` in ``mode`` (see :data:`BYTE_MODEL`)."""
    try:
        return MODES[mode].units[norm] * x_bytes
    except KeyError:
        raise ValueError(f"normalization {norm!r} has no mode {mode!r}") from None


def format_bytes(n: int) -> str:
    """1.5 KiB, 32 MiB, 1 GiB."""
    for unit, size in (("GiB", 2**30), ("MiB", MiB), ("KiB", 2**10)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v >= 10 or v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


# --------------------------------------------------------------------------------------
# Shapes.


@dataclasses.dataclass(frozen=True)
class Shape:
    """A named (N, C, H, W). ``suite``: which suite it comes from ("resnet38", "bandwidth",
    "main" or "custom"). ``dtype_n``: for bandwidth shapes sized in bytes, N per dtype name."""
    label: str
    suite: str
    n: int
    c: int
    h: int
    w: int
    note: str = ""
    dtype_n: Tuple[Tuple[str, int], ...] = ()

    def dims(self, dtype: str) -> Tuple[int, int, int, int]:
        n = dict(self.dtype_n).get(dtype, self.n)
        return (n, self.c, self.h, self.w)


def resnet38_shapes() -> List[Shape]:
    """Inputs of the norm layers of the paper's ResNet-38 (unirep.models.resnet, default
    widths at x1) for a batch of 128 64x64 images: the stem's 16 channels and stages 1-4
    (32 / 64 / 128 / 256 channels at 64x64 / 32x32 / 16x16 / 8x8)."""
    spec = [("stem", 16, 64), ("stage1", 32, 64), ("stage2", 64, 32), ("stage3", 128, 16), ("stage4", 256, 8)]
    return [Shape(f"r38-c{c}-{s}x{s}", "resnet38", 128, c, s, s, note=f"ResNet-38 {where}")
            for where, c, s in spec]


RESNET38_SWEEP = "r38-c64-32x32"  # the main case of the kernel-core issue (N=128, C=64, 32x32)


def bandwidth_shape(target_bytes: int) -> Shape:
    """x of ``target_bytes`` in every dtype: (N, 64, 64, 64) with N chosen per dtype."""
    c = h = w = 64
    per_sample = c * h * w
    dtype_n = tuple((name, max(1, target_bytes // (per_sample * dt.itemsize)))
                    for name, dt in DTYPES.items())
    mib = target_bytes / MiB
    label = f"bw-{mib:.0f}MiB" if mib < 1024 else f"bw-{mib / 1024:.0f}GiB"
    return Shape(label, "bandwidth", dict(dtype_n)["float32"], c, h, w,
                 note=f"bandwidth-sized: x of {mib:.0f} MiB in every dtype (N varies with the dtype)",
                 dtype_n=dtype_n)


def bandwidth_sizes(device_type: str, cache_bytes: Optional[int], available_bytes: Optional[int]) -> List[int]:
    """x sizes of the bandwidth suite.

    GPU: 256 MiB and 1 GiB (far beyond any L2). CPU, sized to the machine: the largest
    power of two not above max(64 MiB, last-level cache), and a quarter of it; capped so
    that x fits 32 times in the available memory (inputs rotate over copies, and the
    reference and the eager loop hold several x-sized temporaries).
    """
    if device_type == "cuda":
        return [256 * MiB, 1024 * MiB]
    big = max(64 * MiB, cache_bytes or 0)
    big = 1 << (big.bit_length() - 1)  # largest power of two <= big
    if available_bytes:
        while big > 16 * MiB and 32 * big > available_bytes:
            big //= 2
    return [big // 4, big]


def parse_shape(text: str) -> Shape:
    """``NxCxHxW`` (e.g. ``128x64x32x32``) as a custom shape."""
    m = re.fullmatch(r"\s*(\d+)x(\d+)x(\d+)x(\d+)\s*", text)
    if not m:
        raise ValueError(f"shape {text!r}: expected NxCxHxW, e.g. 128x64x32x32")
    n, c, h, w = (int(v) for v in m.groups())
    if min(n, c, h, w) < 1:
        raise ValueError(f"shape {text!r}: every size must be positive")
    return Shape(f"{n}x{c}x{h}x{w}", "custom", n, c, h, w, note="given with --shapes")


# --------------------------------------------------------------------------------------
# Cases.


@dataclasses.dataclass(frozen=True)
class Case:
    """One input configuration, timed in each of ``modes``."""
    shape: Shape
    dtype: str  # a key of DTYPES
    layout: str  # "NCHW" or "NHWC"
    norm: str  # "bn", "bn+" or "in"
    num_domains: int
    batch: str  # "pure" (domain given as the int 0) or "mixed" (an int64 (N,) tensor, every domain present)
    modes: Tuple[str, ...]

    @property
    def dims(self) -> Tuple[int, int, int, int]:
        return self.shape.dims(self.dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def mixed(self) -> bool:
        return self.batch == "mixed"

    @property
    def channels_last(self) -> bool:
        return self.layout == "NHWC"

    @property
    def numel(self) -> int:
        n, c, h, w = self.dims
        return n * c * h * w

    @property
    def x_bytes(self) -> int:
        return self.numel * self.torch_dtype.itemsize

    @property
    def is_main_config(self) -> bool:
        return (self.dtype, self.layout, self.norm) == (MAIN_DTYPE, MAIN_LAYOUT, MAIN_NORM) and \
            (self.num_domains, self.batch) in MAIN_DOMAIN_VARIANTS

    @property
    def name(self) -> str:
        return (f"{self.shape.label} {SHORT_DTYPE[self.dtype]} {self.layout} {self.norm} "
                f"D{self.num_domains} {self.batch}")

    def describe(self) -> str:
        n, c, h, w = self.dims
        return (f"N={n} C={c} {h}x{w} {self.dtype} {self.layout}, {self.norm}, D={self.num_domains} {self.batch} "
                f"(x {format_bytes(self.x_bytes)})")

    def to_json(self) -> Dict[str, object]:
        n, c, h, w = self.dims
        return {"name": self.name, "suite": self.shape.suite, "shape": self.shape.label, "n": n, "c": c, "h": h,
                "w": w, "dtype": self.dtype, "layout": self.layout, "norm": self.norm,
                "num_domains": self.num_domains, "batch": self.batch, "modes": list(self.modes),
                "x_bytes": self.x_bytes, "description": self.describe(), "main_config": self.is_main_config}


def domain_variants(domains: Sequence[int], batches: Sequence[str]) -> List[Tuple[int, str]]:
    """(D, batch) pairs; a mixed batch needs D > 1 (with one domain it is a pure batch)."""
    return [(d, b) for d in domains for b in batches if not (b == "mixed" and d == 1)]


@dataclasses.dataclass
class GridFilter:
    """The values selected on every axis (None: the axis' default)."""
    shapes: List[Shape]
    dtypes: Sequence[str] = tuple(DTYPES)
    layouts: Sequence[str] = LAYOUTS
    norms: Sequence[str] = NORMS
    domains: Sequence[int] = DOMAIN_COUNTS
    batches: Sequence[str] = BATCHES
    modes: Sequence[str] = tuple(MODES)
    # (D, batch) pairs to use instead of domains x batches (e.g. only the main ones)
    variants: Optional[Sequence[Tuple[int, str]]] = None


def _main_value(values: Sequence, main):
    return main if main in values else values[0]


def _modes_for(norm: str, modes: Sequence[str]) -> Tuple[str, ...]:
    return tuple(m for m in MODES if m in modes and norm in MODES[m].units)


def sweep_shape_of_suites(shapes: Sequence[Shape], preferred: Iterable[str] = (RESNET38_SWEEP,)) -> List[Shape]:
    """One sweep shape per suite present in ``shapes``: a ``preferred`` label if the suite
    has one, else the suite's first shape (the smallest of the bandwidth suite)."""
    preferred = set(preferred)
    chosen: Dict[str, Shape] = {}
    for shape in shapes:
        if shape.suite not in chosen or (shape.label in preferred and chosen[shape.suite].label not in preferred):
            chosen[shape.suite] = shape
    return list(chosen.values())


def build_cases(flt: GridFilter, grid: str = "sweep", sweep_shapes: Iterable[str] = (RESNET38_SWEEP,)) -> List[Case]:
    """The cases of a grid over the selected axis values, in a stable order.

    ``grid="product"``: every combination. ``grid="sweep"``: at every shape the main
    configuration (float32, NCHW, BN, D=1 pure and D=10 mixed, or the first selected value of
    an axis whose main value is filtered out); then, at each suite's sweep shape (one of
    ``sweep_shapes``, else the suite's first shape), every other selected dtype, layout,
    norm and (D, batch) variant, one axis at a time. Cases without a selected mode are dropped.
    """
    if grid not in ("sweep", "product"):
        raise ValueError(f"grid must be 'sweep' or 'product', got {grid!r}")
    variants = list(flt.variants) if flt.variants is not None else domain_variants(flt.domains, flt.batches)
    for name, values in (("shapes", flt.shapes), ("dtypes", flt.dtypes), ("layouts", flt.layouts),
                         ("norms", flt.norms), ("domain variants (--domains x --batches)", variants),
                         ("modes", flt.modes)):
        if not values:
            raise ValueError(f"no {name} selected")
    combos: List[Tuple[Shape, str, str, str, Tuple[int, str]]] = []
    if grid == "product":
        combos = list(itertools.product(flt.shapes, flt.dtypes, flt.layouts, flt.norms, variants))
    else:
        dtype = _main_value(flt.dtypes, MAIN_DTYPE)
        layout = _main_value(flt.layouts, MAIN_LAYOUT)
        norm = _main_value(flt.norms, MAIN_NORM)
        main_variants = [v for v in variants if v in MAIN_DOMAIN_VARIANTS] or variants[:1]
        for shape in flt.shapes:
            combos += [(shape, dtype, layout, norm, v) for v in main_variants]
        for shape in sweep_shape_of_suites(flt.shapes, sweep_shapes):
            combos += [(shape, d, layout, norm, v) for d in flt.dtypes if d != dtype for v in main_variants]
            combos += [(shape, dtype, lay, norm, v) for lay in flt.layouts if lay != layout for v in main_variants]
            combos += [(shape, dtype, layout, nm, v) for nm in flt.norms if nm != norm for v in main_variants]
            combos += [(shape, dtype, layout, norm, v) for v in variants if v not in main_variants]
    cases: List[Case] = []
    seen = set()
    for shape, dtype, layout, norm, (d, batch) in combos:
        modes = _modes_for(norm, flt.modes)
        key = (shape.label, dtype, layout, norm, d, batch)
        if not modes or key in seen:
            continue
        seen.add(key)
        cases.append(Case(shape, dtype, layout, norm, d, batch, modes))
    return cases


# --------------------------------------------------------------------------------------
# Parsing the axis options.


def parse_list(text: str, allowed: Sequence[str], what: str, aliases: Optional[Dict[str, str]] = None) -> List[str]:
    """A comma-separated list of names from ``allowed`` (``all``: every one), in the given
    order, duplicates removed; a clear ValueError naming ``what`` otherwise."""
    aliases = aliases or {}
    out: List[str] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item == "all":
            names = list(allowed)
        else:
            name = aliases.get(item.lower(), item)
            if name not in allowed:
                lowered = {a.lower(): a for a in allowed}
                name = lowered.get(name.lower(), name)
            if name not in allowed:
                raise ValueError(f"{what}: unknown value {item!r}; choose from {', '.join(allowed)} (or 'all')")
            names = [name]
        out += [n for n in names if n not in out]
    if not out:
        raise ValueError(f"{what}: empty list")
    return out


def parse_domains(text: str) -> List[int]:
    """A comma-separated list of domain counts (positive ints)."""
    out: List[int] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if not item.isdigit() or int(item) < 1:
            raise ValueError(f"--domains: expected positive integers, got {item!r}")
        if int(item) not in out:
            out.append(int(item))
    if not out:
        raise ValueError("--domains: empty list")
    return out


def select_shapes(suites: Sequence[str], shape_args: Sequence[str], device_type: str,
                  cache_bytes: Optional[int], available_bytes: Optional[int]) -> List[Shape]:
    """Shapes of the selected suites, filtered by ``shape_args`` (labels of those shapes, or
    NxCxHxW for custom shapes). With only custom shapes given, the suites are ignored."""
    pool: List[Shape] = []
    every: Dict[str, Shape] = {}
    for suite in SUITES:
        shapes = resnet38_shapes() if suite == "resnet38" else \
            [bandwidth_shape(b) for b in bandwidth_sizes(device_type, cache_bytes, available_bytes)]
        for s in shapes:
            every[s.label] = s
        if suite in suites:
            pool += shapes
    if not shape_args:
        return pool
    chosen: List[Shape] = []
    for arg in shape_args:
        if arg in every:
            shape = every[arg]
        elif re.fullmatch(r"\s*\d+x\d+x\d+x\d+\s*", arg):
            shape = parse_shape(arg)
        else:
            raise ValueError(f"--shapes: unknown shape {arg!r}; give NxCxHxW or one of {', '.join(every)}")
        if shape not in chosen:
            chosen.append(shape)
    return chosen
