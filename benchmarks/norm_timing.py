"""Timing for ``benchmarks/norm_speed.py``: interleaved medians, background load, copy bandwidth.

- CPU: each round, ``torch.utils.benchmark.Timer.blocked_autorange(min_run_time=block_time)``
  (blocks of calls sized by an untimed calibration call; time per call = block time / calls).
- CUDA: each round, one block of calls timed with CUDA events recorded before the first and
  after the last call (the device is synchronized before each block, so no block starts
  while another implementation's kernels still run, and the launch overhead of Python-heavy
  baselines is counted as it is in training).

Every implementation of a (case, mode) is measured in rounds, one measurement each per
round (A B C A B C ...), so background load on a shared machine spreads over all of them
alike and their ratios stay fair; the result is the median over blocks. Inputs are rotated by
the callables themselves (:func:`rotating`), over enough copies that the cache does not
flatter (see :func:`rotation_bytes`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.utils import benchmark

from norm_cases import MiB
IDLE_CORES = 0.25  # other processes' CPU use below which the machine counts as idle
MAX_ATTEMPTS = 3  # measurements of one mode on a busy machine, with --wait-idle


# --------------------------------------------------------------------------------------
# The machine: caches and memory.


def cpu_last_level_cache_bytes() -> Optional[int]:
    """Size of the largest CPU cache the kernel reports (Linux sysfs), or None."""
    best = None
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = os.listdir(base)
    except OSError:
        return None
    for entry in entries:
        try:
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        value = int(text[:-1]) * units[text[-1]] if text and text[-1] in units else int(text or 0)
        best = max(best or 0, value)
    return best


def available_memory_bytes(device: torch.device) -> Optional[int]:
    """Free memory of the device (CUDA), or MemAvailable of /proc/meminfo (CPU)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cache_bytes(device: torch.device) -> Optional[int]:
    """The cache that rotation must defeat: the GPU's L2, or the CPU's last-level cache."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or None
    return cpu_last_level_cache_bytes()


def rotation_bytes(device: torch.device, cache: Optional[int]) -> int:
    """How many bytes of x the timed calls rotate over, at least.

    CPU: max(96 MiB, 2 x the last-level cache), at most 1 GiB (a virtual machine may report
    the host's whole shared L3). CUDA: max(256 MiB, 4 x L2).
    """
    if device.type == "cuda":
        return max(256 * MiB, 4 * (cache or 0))
    return min(1024 * MiB, max(96 * MiB, 2 * (cache or 0)))


# --------------------------------------------------------------------------------------
# Measuring.


@dataclasses.dataclass
class TimingPlan:
    """How long to measure: every callable gets measured once per round (about
    ``block_time`` seconds, at least one call) until it has ``min_blocks`` blocks and
    ``min_run_time`` seconds timed (at most ``max_rounds`` rounds). ``warmup`` untimed
    calls come first (the correctness check has already run each callable once)."""
    min_run_time: float = 1.0
    block_time: float = 0.05
    min_blocks: int = 3
    max_rounds: int = 50
    warmup: int = 2
    # CPU: "wall" (time.perf_counter) or "thread" (time.thread_time: CPU time of the timing
    # thread, blind to time spent descheduled; meaningful with one torch thread only).
    clock: str = "wall"


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CpuRoundTimer:
    """One round's measurement on the CPU: ``Timer.blocked_autorange(min_run_time=block_time)``
    of torch.utils.benchmark (it sizes its blocks with an untimed calibration call, a fresh
    warm-up after the other implementations ran, then times blocks of that many calls
    until ``block_time`` has passed: at least one block)."""

    def __init__(self, fn: Callable[[], object], device: torch.device, block_time: float,
                 clock: str = "wall") -> None:
        # num_threads: the process's (Timer would otherwise pin the blocks to one thread).
        self.timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads(),
                                     timer=CLOCKS[clock])
        self.block_time = block_time

    def measure(self) -> Tuple[List[float], int, float]:
        """(seconds per call of every block, calls timed, seconds timed)."""
        m = self.timer.blocked_autorange(min_run_time=self.block_time)
        return list(m.times), m.number_per_run * len(m.raw_times), float(sum(m.raw_times))


class CudaRoundTimer:
    """One round's measurement on a GPU: one block of calls between two CUDA events, the
    device synchronized first; the block's size is set once, from a first timed call."""

    def __init__(self, fn: Callable[[], object], device: torch.device, block_time: float,
                 clock: str = "wall") -> None:
        self.fn, self.device, self.block_time = fn, device, block_time
        self.number: Optional[int] = None

    def _block(self, number: int) -> float:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(self.device)
        start.record()
        for _ in range(number):
            self.fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3

    def measure(self) -> Tuple[List[float], int, float]:
        if self.number is None:  # calibration (untimed)
            one = self._block(1)
            self.number = max(1, min(100_000, int(self.block_time / max(one, 1e-9))))
        t = self._block(self.number)
        return [t / self.number], self.number, t


def round_timer(fn: Callable[[], object], device: torch.device, block_time: float, clock: str = "wall"):
    return (CudaRoundTimer if device.type == "cuda" else CpuRoundTimer)(fn, device, block_time, clock)


def _summary(per_call: List[float], calls: int) -> Dict[str, float]:
    ts = sorted(per_call)
    q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [ts[0]] * 3
    return {"median_ms": statistics.median(ts) * 1e3, "iqr_ms": (q[2] - q[0]) * 1e3, "min_ms": ts[0] * 1e3,
            "blocks": len(ts), "calls": calls}


def time_callables(fns: Dict[str, Callable[[], object]], device: torch.device,
                   plan: TimingPlan) -> Dict[str, Dict[str, float]]:
    """Median time per call of every ``fn()`` in ms (plus iqr, min, blocks, calls), measured
    interleaved in rounds (see the module docstring): every callable gets ``plan.warmup``
    untimed calls, then rounds of one measurement each until it has ``plan.min_blocks``
    blocks and ``plan.min_run_time`` seconds timed."""
    timers = {name: round_timer(fn, device, plan.block_time, plan.clock) for name, fn in fns.items()}
    for fn in fns.values():
        for _ in range(plan.warmup):
            fn()
    synchronize(device)
    per_call: Dict[str, List[float]] = {name: [] for name in fns}
    calls: Dict[str, int] = {name: 0 for name in fns}
    spent: Dict[str, float] = {name: 0.0 for name in fns}
    for _ in range(plan.max_rounds):
        pending = [name for name in fns if len(per_call[name]) < plan.min_blocks or spent[name] < plan.min_run_time]
        if not pending:
            break
        for name in pending:
            times, n, seconds = timers[name].measure()
            per_call[name] += times
            calls[name] += n
            spent[name] += seconds
    return {name: _summary(ts, calls[name]) for name, ts in per_call.items()}


def rotating(fn: Callable[[int], object], copies: int) -> Callable[[], object]:
    """fn(k) for k = 0, 1, ..., copies-1, 0, 1, ... on successive calls."""
    state = [0]

    def call() -> object:
        k = state[0]
        state[0] = (k + 1) % copies
        return fn(k)
    return call


# --------------------------------------------------------------------------------------
# Background load (the development machines are shared).


class LoadMonitor:
    """CPU time that other processes used while a block of work ran, in cores (Linux)."""

    @classmethod
    def probe(cls, seconds: float = 1.0) -> Optional[float]:
        """Background load over the next ``seconds`` while this process sleeps."""
        monitor = cls()
        time.sleep(seconds)
        return monitor.background_cores()

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> Optional[Tuple[float, float, float]]:
        try:
            with open("/proc/stat") as f:
                fields = [float(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        # All but idle and iowait; steal time (fields[7]: the hypervisor ran someone else on
        # our cores) counts as load, since it takes our cores away just the same.
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / hz
        own = os.times()
        return time.perf_counter(), busy, own.user + own.system

    def background_cores(self) -> Optional[float]:
        end = self._sample()
        if self.start is None or end is None:
            return None
        wall = end[0] - self.start[0]
        return max(0.0, ((end[1] - self.start[1]) - (end[2] - self.start[2])) / wall) if wall > 0 else None


def wait_idle(timeout: float, probe_seconds: float = 1.0) -> Tuple[float, Optional[float]]:
    """Sleep until other processes use less than IDLE_CORES cores (or ``timeout`` passes);
    returns the seconds waited and the last background load seen."""
    start = time.perf_counter()
    while True:
        load = LoadMonitor.probe(probe_seconds)
        waited = time.perf_counter() - start
        if load is None or load < IDLE_CORES or waited >= timeout:
            return max(0.0, waited - probe_seconds), load


def time_quietly(fns: Dict[str, Callable[[], object]], device: torch.device, plan: TimingPlan,
                 wait_idle_s: float = 0.0, attempts: int = MAX_ATTEMPTS
                 ) -> Tuple[Dict[str, Dict[str, float]], Optional[float], int]:
    """:func:`time_callables`, recording the background load meanwhile. With ``wait_idle_s``
    > 0, first wait for an idle machine, and measure again (up to ``attempts`` times) when
    other processes used more than IDLE_CORES cores; the quietest attempt is kept.
    Returns (times, background cores, attempts made)."""
    best = None
    for attempt in range(max(1, attempts) if wait_idle_s > 0 else 1):
        if wait_idle_s > 0:
            wait_idle(wait_idle_s)
        monitor = LoadMonitor()
        times = time_callables(fns, device, plan)
        load = monitor.background_cores()
        if best is None or (load is not None and (best[1] is None or load < best[1])):
            best = (times, load, attempt + 1)
        if load is None or load < IDLE_CORES:
            break
    return best


# --------------------------------------------------------------------------------------
# Copy bandwidth: the roofline.


def copy_bandwidth(nbytes: int, device: torch.device, plan: TimingPlan, rotate_bytes: int,
                   wait_idle_s: float = 0.0, attempts: int = MAX_ATTEMPTS) -> Dict[str, float]:
    """``dst.copy_(src)`` of ``nbytes`` (float32 tensors) on ``device``, rotating over enough
    pairs to cover ``rotate_bytes``; GB/s counts 2 * nbytes (read src, write dst).

    Also the same copy into a freshly allocated output (``torch.empty_like(src).copy_(src)``),
    which is what every op returning a new tensor pays: the difference is the cost of
    getting and first touching the memory from the allocator.
    """
    numel = max(1, nbytes // 4)
    pairs = max(2, math.ceil(rotate_bytes / (numel * 4)))
    srcs = [torch.empty(numel, device=device).normal_() for _ in range(pairs)]
    dsts = [torch.empty_like(s).zero_() for s in srcs]
    t, load, attempts = time_quietly({
        "copy": rotating(lambda k: dsts[k].copy_(srcs[(k + 1) % pairs]), pairs),
        "alloc_copy": rotating(lambda k: torch.empty_like(srcs[k]).copy_(srcs[(k + 1) % pairs]), pairs),
    }, device, dataclasses.replace(plan, warmup=max(plan.warmup, 3)), wait_idle_s, attempts)
    out = dict(t["copy"])
    out.update({"x_bytes": numel * 4, "bytes": 2 * numel * 4, "pairs": pairs, "background_cores": load,
                "attempts": attempts, "gbps": 2 * numel * 4 / (out["median_ms"] * 1e-3) / 1e9,
                "alloc_copy_ms": t["alloc_copy"]["median_ms"],
                "alloc_ms": t["alloc_copy"]["median_ms"] - out["median_ms"]})
    return out


# --------------------------------------------------------------------------------------
# CPU allocator.


def configure_allocator(mode: str, device: torch.device) -> str:
    """Make output allocations cost the same in every column (CPU, glibc).

    glibc serves blocks of 32 MiB and more with a fresh mmap, so every new output pays a
    page fault per 4 KiB page (often more than the kernel itself), while smaller blocks come
    from a heap whose state depends on what ran before: results would then depend on the
    order of the cases. "reuse" turns mmap off and keeps freed memory (mallopt
    M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GiB), so outputs reuse warm memory as they would with a
    caching allocator; "system" leaves the allocator alone. CUDA has its caching allocator.
    """
    if mode == "system" or device.type != "cpu":
        return "system" if device.type == "cpu" else "torch CUDA caching allocator"
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        if libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1:
            return "reuse"
    except (OSError, AttributeError):
        pass
    print("warning: --alloc reuse needs glibc's mallopt; using the system allocator as is", file=sys.stderr)
    return "system (reuse unavailable)"
