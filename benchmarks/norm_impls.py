"""Inputs, implementations and the correctness guard of ``benchmarks/norm_speed.py``.

Implementations are of two kinds, all computing the op contract of DESIGN.md:

- *backends* of unirep_kernels (``reference``, ``cpp``, ``cuda``, ``triton``), called
  through the public ops with ``backend=``;
- *baselines*: what multi-domain code does without them (:data:`BASELINES`).

Each is *prepared* for a case (:func:`prepare`) into a :class:`Prepared`: a function
``run(x, training) -> y`` plus what the correctness guard needs to compare it with the
oracle (``reference.py`` called directly). A baseline that cannot express a case raises
:class:`Unsupported` with the reason.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import unirep_kernels
from unirep_kernels import reference
from unirep_kernels.backends import AUTO_ORDER, NAMES

from norm_cases import MODES, Case

MOMENTUM = 0.1
EPS = 1e-5

BACKENDS = NAMES
# Our backends per device type, in the order they are reported: the library's own "auto"
# order, fastest first (the first available compiled one is the "primary" backend the
# headline ratios are given for).
DEVICE_BACKENDS = AUTO_ORDER
BASELINES = ("eager_loop", "module_list", "native", "compiled")
BASELINE_TITLES = {
    "eager_loop": "eager per-domain loop: for each domain present, index_select its samples, F.batch_norm / "
                  "F.instance_norm them with that domain's rows of weight, bias and running stats, index_copy_ "
                  "the result back (a pure batch goes through the same loop, once, with its index built in the "
                  "case's preparation: its domain is a host int; a mixed batch is grouped by domain, torch.unique "
                  "+ nonzero, in every call)",
    "module_list": "nn.ModuleList of one nn.BatchNorm2d / nn.InstanceNorm2d(affine=True) per domain, indexed by "
                   "domain: modules[d](x) for a pure batch, the select / normalize / scatter loop for a mixed one "
                   "(BN+: BatchNorm2d(track_running_stats=False), which uses batch stats in eval mode)",
    "native": "native F.batch_norm / F.instance_norm on the whole batch with the rows of its one domain (pure "
              "batches); IN mixed: F.instance_norm without affine, then the affine of each sample's domain "
              "gathered per sample (one addcmul); BN and BN+ mixed cannot be expressed (one set of statistics "
              "per call)",
    "compiled": "torch.compile(dynamic=False) of reference.py (the oracle), compiled once per case (AOTAutograd's "
                "donated buffers off, so that its backward can run on a retained graph); the cold compile time is a "
                "note of the case",
}
BASELINE_SHORT = {"eager_loop": "eager loop", "module_list": "ModuleList", "native": "native F.*",
                  "compiled": "compiled ref"}


class Unsupported(Exception):
    """The implementation cannot express this case (the table cell stays empty)."""


# --------------------------------------------------------------------------------------
# Inputs.


@dataclasses.dataclass
class InputPool:
    """Rotated copies of x (leaves that require grad) and of the upstream gradient dy, in
    the case's dtype and memory format. Every copy holds the same values: only their
    addresses matter for the cache."""
    xs: List[Tensor]
    dys: List[Tensor]

    @property
    def copies(self) -> int:
        return len(self.xs)


def make_pool(dims: Sequence[int], dtype: torch.dtype, channels_last: bool, device: torch.device, copies: int,
              seed: int = 0) -> InputPool:
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def tensor(scale: float, offset: float) -> Tensor:
        t = torch.randn(tuple(dims), generator=g) * scale + offset
        return t.to(device=device, dtype=dtype).contiguous(memory_format=fmt)

    x, dy = tensor(2.0, 0.5), tensor(1.0, 0.0)
    xs = [x.clone(memory_format=torch.preserve_format).requires_grad_() for _ in range(copies)]
    dys = [dy.clone(memory_format=torch.preserve_format) for _ in range(copies)]
    return InputPool(xs, dys)


def pool_copies(x_bytes: int, rotate_bytes: int, minimum: int = 3) -> int:
    """Copies of x to rotate over: at least ``minimum`` and at least ``rotate_bytes`` of x."""
    return max(minimum, math.ceil(rotate_bytes / max(1, x_bytes)))


@dataclasses.dataclass
class CaseTensors:
    """The per-case tables: (D, C) weight and bias (float32 leaves), (D, C) running stats
    (float32), and the domain (the int 0 for a pure batch, an int64 (N,) tensor with every
    domain present for a mixed one)."""
    domain: Union[int, Tensor]
    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    def own_stats(self) -> "CaseTensors":
        """The same leaves (weight, bias) with their own copy of the running stats."""
        return dataclasses.replace(self, running_mean=self.running_mean.clone(), running_var=self.running_var.clone())

    def fresh(self) -> "CaseTensors":
        """Independent copies: new leaves, own running stats (the guard's runs mutate them)."""
        return CaseTensors(self.domain, self.weight.detach().clone().requires_grad_(),
                           self.bias.detach().clone().requires_grad_(), self.running_mean.clone(),
                           self.running_var.clone())


def random_domains(n: int, num_domains: int, generator: torch.Generator) -> Tensor:
    """Random domain of every sample, with every domain present (needs n >= num_domains)."""
    if n < num_domains:
        raise ValueError(f"a mixed batch of {n} samples cannot hold all {num_domains} domains")
    d = torch.randint(0, num_domains, (n,), generator=generator)
    d[:num_domains] = torch.arange(num_domains)
    return d[torch.randperm(n, generator=generator)]


def make_case_tensors(case: Case, device: torch.device, seed: int = 1) -> CaseTensors:
    g = torch.Generator().manual_seed(seed)
    n, c = case.dims[0], case.dims[1]
    d = case.num_domains
    domain: Union[int, Tensor] = random_domains(n, d, g).to(device) if case.mixed else 0
    weight = (1 + 0.1 * torch.randn(d, c, generator=g)).to(device).requires_grad_()
    bias = (0.1 * torch.randn(d, c, generator=g)).to(device).requires_grad_()
    running_mean = (0.1 * torch.randn(d, c, generator=g)).to(device)
    running_var = (1 + 0.1 * torch.rand(d, c, generator=g)).to(device)
    return CaseTensors(domain, weight, bias, running_mean, running_var)


# --------------------------------------------------------------------------------------
# Implementations.


@dataclasses.dataclass
class Prepared:
    """An implementation ready for one case.

    ``run(x, training)``: y (training: batch statistics and running-stat update for BN;
    BN+ and IN ignore the flag). ``params``: the leaves besides x whose gradients a
    training step takes. ``grad_tables(grads)``: those gradients as (D, C) weight and bias
    tables. ``stats()``: the running stats as (D, C) tables, or None.
    """
    run: Callable[[Tensor, bool], Tensor]
    params: Tuple[Tensor, ...]
    grad_tables: Callable[[Sequence[Optional[Tensor]]], Tuple[Optional[Tensor], Optional[Tensor]]]
    stats: Callable[[], Optional[Tuple[Tensor, Tensor]]]


def _identity_tables(grads: Sequence[Optional[Tensor]]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    return grads[0], grads[1]


def _table_stats(case: Case, t: CaseTensors) -> Callable[[], Optional[Tuple[Tensor, Tensor]]]:
    return (lambda: (t.running_mean, t.running_var)) if case.norm == "bn" else (lambda: None)


def _ops_prepared(case: Case, t: CaseTensors, batch_norm, instance_norm, **kw) -> Prepared:
    """BN, BN+ and IN through functions with the op contract's signatures."""
    d = case.num_domains
    if case.norm == "bn":
        def run(x: Tensor, training: bool) -> Tensor:
            return batch_norm(x, t.domain, t.weight, t.bias, t.running_mean, t.running_var, num_domains=d,
                              use_batch_stats=training, momentum=MOMENTUM, eps=EPS, **kw)
    elif case.norm == "bn+":
        def run(x: Tensor, training: bool) -> Tensor:
            return batch_norm(x, t.domain, t.weight, t.bias, None, None, num_domains=d, use_batch_stats=True,
                              momentum=MOMENTUM, eps=EPS, **kw)
    else:
        def run(x: Tensor, training: bool) -> Tensor:
            return instance_norm(x, t.domain, t.weight, t.bias, num_domains=d, eps=EPS, **kw)
    return Prepared(run, (t.weight, t.bias), _identity_tables, _table_stats(case, t))


def prepare_oracle(case: Case, t: CaseTensors) -> Prepared:
    """reference.py called directly: what every implementation is checked against."""
    return _ops_prepared(case, t, reference.domain_batch_norm, reference.domain_instance_norm)


def _prepare_backend(name: str, case: Case, t: CaseTensors) -> Prepared:
    return _ops_prepared(case, t, unirep_kernels.domain_batch_norm, unirep_kernels.domain_instance_norm,
                         backend=name)


def _domain_groups(domain: Tensor) -> List[Tuple[int, Tensor]]:
    """(domain, indices of its samples) for every domain present, in increasing order."""
    return [(d, (domain == d).nonzero(as_tuple=True)[0]) for d in torch.unique(domain).tolist()]


def _group_source(domain: Union[int, Tensor], n: int, device: torch.device) -> Callable[[], List[Tuple[int, Tensor]]]:
    """How a loop gets its (domain, sample indices) groups in each call. A pure batch's
    domain is a host int, known before the call: its one group is built here, once, as a
    hand-written loop would. A mixed batch brings its domain tensor with it: grouped in
    every call."""
    if isinstance(domain, int):
        groups = [(domain, torch.arange(n, device=device))]
        return lambda: groups
    return lambda: _domain_groups(domain)


def _prepare_eager_loop(case: Case, t: CaseTensors) -> Prepared:
    def normalize(xd: Tensor, d: int, training: bool) -> Tensor:
        if case.norm == "bn":
            return F.batch_norm(xd, t.running_mean[d], t.running_var[d], t.weight[d], t.bias[d], training=training,
                                momentum=MOMENTUM, eps=EPS)
        if case.norm == "bn+":
            return F.batch_norm(xd, None, None, t.weight[d], t.bias[d], training=True, momentum=MOMENTUM, eps=EPS)
        return F.instance_norm(xd, weight=t.weight[d], bias=t.bias[d], eps=EPS)

    groups = _group_source(t.domain, case.dims[0], t.weight.device)

    def run(x: Tensor, training: bool) -> Tensor:
        y = torch.empty_like(x)
        for d, idx in groups():
            y.index_copy_(0, idx, normalize(x.index_select(0, idx), d, training))
        return y

    return Prepared(run, (t.weight, t.bias), _identity_tables, _table_stats(case, t))


def _prepare_module_list(case: Case, t: CaseTensors) -> Prepared:
    c, device = case.dims[1], t.weight.device
    if case.norm == "in":
        modules = nn.ModuleList(nn.InstanceNorm2d(c, eps=EPS, affine=True) for _ in range(case.num_domains))
    else:
        track = case.norm == "bn"
        modules = nn.ModuleList(nn.BatchNorm2d(c, eps=EPS, momentum=MOMENTUM, track_running_stats=track)
                                for _ in range(case.num_domains))
    modules = modules.to(device)
    with torch.no_grad():
        for d, m in enumerate(modules):
            m.weight.copy_(t.weight[d])
            m.bias.copy_(t.bias[d])
            if case.norm == "bn":
                m.running_mean.copy_(t.running_mean[d])
                m.running_var.copy_(t.running_var[d])
    state = {"training": None}

    def run(x: Tensor, training: bool) -> Tensor:
        if state["training"] != training:  # as model.train() / model.eval(): once per switch
            modules.train(training)
            state["training"] = training
        if isinstance(t.domain, int):
            return modules[t.domain](x)
        y = torch.empty_like(x)
        for d, idx in _domain_groups(t.domain):
            y.index_copy_(0, idx, modules[d](x.index_select(0, idx)))
        return y

    params = tuple(p for m in modules for p in (m.weight, m.bias))

    def grad_tables(grads: Sequence[Optional[Tensor]]) -> Tuple[Tensor, Tensor]:
        rows = [g if g is not None else torch.zeros(c, device=device) for g in grads]
        return torch.stack(rows[0::2]), torch.stack(rows[1::2])

    def stats() -> Optional[Tuple[Tensor, Tensor]]:
        if case.norm != "bn":
            return None
        return torch.stack([m.running_mean for m in modules]), torch.stack([m.running_var for m in modules])

    return Prepared(run, params, grad_tables, stats)


def cannot_express(name: str, case: Case) -> Optional[str]:
    """Why implementation ``name`` cannot express ``case``, or None."""
    if name == "native" and case.mixed and case.norm in ("bn", "bn+"):
        return ("F.batch_norm computes one set of statistics (or uses one row of running stats) per call: a "
                "mixed batch needs one per domain")
    return None


def _prepare_native(case: Case, t: CaseTensors) -> Prepared:
    reason = cannot_express("native", case)
    if reason:
        raise Unsupported(reason)
    if case.mixed:  # IN: per-sample statistics anyway; only the affine is per domain
        domain = t.domain

        def run(x: Tensor, training: bool) -> Tensor:
            y = F.instance_norm(x, eps=EPS)
            w = t.weight.index_select(0, domain)[:, :, None, None].to(x.dtype)
            b = t.bias.index_select(0, domain)[:, :, None, None].to(x.dtype)
            return torch.addcmul(b, y, w)
        return Prepared(run, (t.weight, t.bias), _identity_tables, lambda: None)
    d = t.domain
    if case.norm == "bn":
        def run(x: Tensor, training: bool) -> Tensor:
            return F.batch_norm(x, t.running_mean[d], t.running_var[d], t.weight[d], t.bias[d], training=training,
                                momentum=MOMENTUM, eps=EPS)
    elif case.norm == "bn+":
        def run(x: Tensor, training: bool) -> Tensor:
            return F.batch_norm(x, None, None, t.weight[d], t.bias[d], training=True, momentum=MOMENTUM, eps=EPS)
    else:
        def run(x: Tensor, training: bool) -> Tensor:
            return F.instance_norm(x, weight=t.weight[d], bias=t.bias[d], eps=EPS)
    return Prepared(run, (t.weight, t.bias), _identity_tables, _table_stats(case, t))


def configure_compiler() -> None:
    """Once per run, before any case: raise the recompile limit (every case compiles the
    reference functions anew, dynamic=False) and turn off AOTAutograd's donated buffers (the
    compiled backward reusing saved tensors' memory), which refuse ``retain_graph=True``:
    the backward mode runs each retained graph's backward many times."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False


def reset_compiler() -> None:
    """Before each case that compiles: forget earlier cases' graphs."""
    torch._dynamo.reset()


def _prepare_compiled(case: Case, t: CaseTensors) -> Prepared:
    return _ops_prepared(case, t, torch.compile(reference.domain_batch_norm, dynamic=False),
                         torch.compile(reference.domain_instance_norm, dynamic=False))


_BASELINE_PREPARE = {"eager_loop": _prepare_eager_loop, "module_list": _prepare_module_list,
                     "native": _prepare_native, "compiled": _prepare_compiled}


def prepare(name: str, case: Case, t: CaseTensors) -> Prepared:
    """Implementation ``name`` (a backend or a baseline) for ``case`` on tensors ``t``."""
    if name in BACKENDS:
        return _prepare_backend(name, case, t)
    if name in _BASELINE_PREPARE:
        return _BASELINE_PREPARE[name](case, t)
    raise ValueError(f"unknown implementation {name!r}")


# --------------------------------------------------------------------------------------
# Correctness guard.

# Tolerance on max |got - want| relative to max(1, max |want|), per input dtype. Half
# precision: a few units in the last place of the output (the oracle rounds its float32
# result once; others may round intermediates). float32: the reductions run over up to
# millions of values in different orders; torch.compile's backward of the reference is
# off by 5e-4 of max |dx| at 64 MiB against float64 (the eager reference by 4e-6).
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def _compare(what: str, got: Optional[Tensor], want: Optional[Tensor], tol: float) -> Dict[str, object]:
    if got is None or want is None:
        ok = got is None and want is None
        return {"what": what, "max_abs_err": None, "scale": None, "ok": ok,
                **({} if ok else {"problem": "missing" if got is None else "unexpected"})}
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        return {"what": what, "max_abs_err": None, "scale": None, "ok": False,
                "problem": f"shape {tuple(got.shape)} != {tuple(want.shape)}"}
    scale = max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item()
    ok = math.isfinite(err) and err <= tol * scale
    return {"what": what, "max_abs_err": err, "scale": scale, "ok": bool(ok)}


def needs(modes: Sequence[str]) -> Tuple[bool, bool, bool]:
    """(eval forward, training forward, gradients) needed by ``modes``."""
    return ("eval_fwd" in modes, any(MODES[m].training for m in modes), any(MODES[m].backward for m in modes))


def _outputs(p: Prepared, x: Tensor, dy: Tensor, modes: Sequence[str]) -> Dict[str, Optional[Tensor]]:
    """What the guard compares: eval y, then (on the same running stats, untouched by the
    eval call) training y, updated running stats and gradients."""
    want_eval, want_train, want_grads = needs(modes)
    out: Dict[str, Optional[Tensor]] = {}
    if want_eval:
        with torch.no_grad():
            out["y_eval"] = p.run(x, False)
    if want_train:
        with torch.enable_grad():
            y = p.run(x, True)
        out["y_train"] = y.detach()
        stats = p.stats()
        if stats is not None:
            out["running_mean"], out["running_var"] = stats[0].clone(), stats[1].clone()
        if want_grads:
            grads = torch.autograd.grad(y, (x,) + p.params, dy, allow_unused=True)
            out["dx"] = grads[0]
            out["dweight"], out["dbias"] = p.grad_tables(grads[1:])
    return out


def check_case(case: Case, pool: InputPool, tensors: CaseTensors, names: Sequence[str],
               backends: Sequence[str]) -> Dict[str, object]:
    """Run every implementation once on copy 0 and compare with the oracle (reference.py).

    Returns ``{"tol", "impls": {name: {"ok", "checks", "error", "seconds"}}, "ok"}``. An
    implementation that raises gets ``ok`` False and its ``error``; our backends must also
    give y and dx x's memory format (the contract). Each runs on its own fresh copy of the
    tables, so running-stat updates are compared too.
    """
    x, dy = pool.xs[0], pool.dys[0]
    tol = TOLERANCE[x.dtype]
    want = _outputs(prepare_oracle(case, tensors.fresh()), x, dy, case.modes)
    fmt = reference.output_memory_format(x)
    report: Dict[str, object] = {"tol": tol, "impls": {}}
    for name in names:
        start = time.perf_counter()
        entry: Dict[str, object] = {"ok": False, "checks": [], "error": None}
        try:
            got = _outputs(prepare(name, case, tensors.fresh()), x, dy, case.modes)
            checks = [_compare(k, got.get(k), want[k], tol) for k in want]
            if name in backends:
                for k in ("y_eval", "y_train", "dx"):
                    if got.get(k) is not None and not got[k].is_contiguous(memory_format=fmt):
                        checks.append({"what": f"{k} memory format", "ok": False,
                                       "problem": "not the memory format of x (the op contract)"})
            entry.update(ok=all(c["ok"] for c in checks), checks=checks)
        except Unsupported:
            raise
        except Exception as exc:  # a compile error, a kernel refusing the case, ...
            entry["error"] = describe_error(exc)
        entry["seconds"] = time.perf_counter() - start
        report["impls"][name] = entry
    report["ok"] = all(e["ok"] for e in report["impls"].values())
    return report


def describe_error(exc: BaseException) -> str:
    """One line for a results note: the exception's type and the first lines of its message,
    without torch.compile's generic "Set TORCHDYNAMO_VERBOSE=1 ..." advice (which is all the
    last line of an InductorError says)."""
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and not ln.strip().startswith(("Set TORCHDYNAMO_VERBOSE", "For even more developer"))]
    text = " ".join(lines[:3]) or repr(exc)
    return (text + " (no message)" if text.endswith(":") else text)[:400]


# --------------------------------------------------------------------------------------
# Timed steps.


def mode_step(name: str, case: Case, tensors: CaseTensors, p: Prepared, pool: InputPool, mode: str,
              graphs: int = 0) -> Tuple[Callable[[int], object], int]:
    """One timed call of implementation ``name`` (prepared as ``p`` on ``tensors``) in
    ``mode`` on the k-th copy of the inputs, and how many copies it rotates over.

    ``backward`` times ``torch.autograd.grad(y_k, (x_k, *params), dy_k, retain_graph=True)``
    over ``graphs`` forward graphs built beforehand (fewer than the pool's copies when
    memory is short). Each graph gets its own running stats: some graphs save them (native
    batch norm does), and the training forward of the next graph updates them in place.
    Gradients go through autograd.grad: no .grad accumulation.
    """
    spec = MODES[mode]
    if mode == "backward":
        count = max(1, min(graphs or pool.copies, pool.copies))
        per_graph = [prepare(name, case, tensors.own_stats()) for _ in range(count)]
        with torch.enable_grad():
            ys = [per_graph[k].run(pool.xs[k], True) for k in range(count)]

        def step(k: int) -> object:
            return torch.autograd.grad(ys[k], (pool.xs[k],) + per_graph[k].params, pool.dys[k], retain_graph=True,
                                       allow_unused=True)
        return step, count
    if spec.backward:
        def step(k: int) -> object:
            x = pool.xs[k]
            with torch.enable_grad():
                y = p.run(x, True)
            return torch.autograd.grad(y, (x,) + p.params, pool.dys[k], allow_unused=True)
    elif spec.records_graph:
        def step(k: int) -> object:
            with torch.enable_grad():  # as in training: the graph is recorded
                return p.run(pool.xs[k], True)
    else:
        def step(k: int) -> object:
            with torch.no_grad():
                return p.run(pool.xs[k], False)
    return step, pool.copies
