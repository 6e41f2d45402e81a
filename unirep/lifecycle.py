"""The domain lifecycle of a trained universal network: add a domain, say which parameters
are a domain's own, re-estimate a domain's moments from unlabelled images (AdaBN), pick the
nearest domain for images of an unseen one. Exporting one domain as a plain PyTorch module
is :func:`unirep.export.export_domain`.

A universal network is a shared trunk plus a small per-domain part: the rows of the
per-domain norm scales, biases and moments, the ``DomainScale2d`` rows, the heads, and the
per-domain copies of sharing ``none``/``partial-*``. Everything here works on exactly that
part of one domain and leaves every other domain bit for bit as it was.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from unirep_kernels import DomainBatchNorm2d, DomainInstanceNorm2d, DomainScale2d, check_domain
from unirep_kernels import domain as domain_context

from .models.common import DomainHeads, PerDomain

__all__ = ["add_domain", "domain_parameters", "count_domain_parameters", "shared_moment_layers", "recalibrate",
           "batch_statistics", "nearest_domain"]

DOMAIN_LAYERS = (DomainBatchNorm2d, DomainInstanceNorm2d, DomainScale2d)


def one_domain(domain, num_domains: int, where: str) -> int:
    """A domain argument that names one domain: an int in [0, num_domains)."""
    d = check_domain(domain, num_domains, where=where)
    if not isinstance(d, int):
        raise TypeError(f"{where}: domain must be one domain (an int), got a tensor")
    return d


def _resnet(model: nn.Module, where: str):
    from .models import ResNet38
    if not isinstance(model, ResNet38):
        raise TypeError(f"{where}: model must be a unirep.models.ResNet38 (build_model('resnet38', ...)), got "
                        f"{type(model).__name__}; for other models grow each domain layer with its "
                        f"add_domain() method")
    return model


def _shared_parts(module: nn.Module) -> Tuple[List[nn.Module], List[PerDomain]]:
    """The domain layers of ``module`` outside any per-domain copy, and its PerDomain
    containers (outermost only), each once."""
    layers: Dict[int, nn.Module] = {}
    copies: Dict[int, PerDomain] = {}

    def visit(m: nn.Module) -> None:
        if isinstance(m, PerDomain):
            copies.setdefault(id(m), m)
            return
        if isinstance(m, DOMAIN_LAYERS):
            layers.setdefault(id(m), m)
        for child in m.children():
            visit(child)

    visit(module)
    return list(layers.values()), list(copies.values())


def add_domain(model: nn.Module, num_classes: int, *, init: Union[str, int] = "mean") -> int:
    """Append one domain to a trained :class:`~unirep.models.ResNet38` and return its index.

    Every domain-muxed part grows by one domain: the per-domain rows of
    :class:`~unirep_kernels.DomainBatchNorm2d` (scale, bias, moments),
    :class:`~unirep_kernels.DomainInstanceNorm2d` and :class:`~unirep_kernels.DomainScale2d`
    (including the final layer of the IN strategies), the per-domain copies of sharing
    ``none``/``partial-*``, and the heads (a new classifier of ``num_classes`` classes).
    Universal tensors are shared and stay as they are. ``num_domains`` is updated on the
    model and on every domain layer, ``num_classes``/``max_classes`` on the model.

    Args:
        model: a ResNet38 (any strategy and sharing), modified in place.
        num_classes: the new domain's class count. With ``sharing="full"`` (one shared
            classifier) it must equal the other domains'.
        init: ``"mean"`` (default): the new rows start from the mean of the existing
            domains' rows (moments, scales, biases; the mean of the copies' weights under
            ``none``/``partial-*``, which for separately trained copies is only a smooth
            start: prefer copying a related domain there). An int ``d``: copy domain
            ``d``'s rows and copies. The new head is a copy of ``d``'s when it has as
            many classes; otherwise (and always with ``"mean"``: classes of different
            domains do not correspond) it is drawn as a new head of ``DomainHeads`` is,
            from torch's global random generator.

    Existing domains compute bitwise what they computed before, for pure and mixed
    batches, and their state-dict entries are unchanged (a grown (D, C) tensor keeps its
    first D rows bit for bit; if ``num_classes`` exceeds every existing class count the
    logits get wider, the new columns ``-inf`` for the old domains). A checkpoint of the
    grown model loads into ``build_model(..., num_classes=old + [num_classes])``.

    Optimizers built before the call are the caller's business: grown parameters are new
    ``nn.Parameter`` objects, so an old optimizer keeps updating the old tensors. Build a
    new one after adding the domain.
    """
    model = _resnet(model, "add_domain")
    D = model.num_domains
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"add_domain: num_classes must be a positive int, got {num_classes!r}")
    k = int(num_classes)
    if not (isinstance(init, str) and init == "mean"):
        if isinstance(init, (str, Tensor)):
            raise ValueError(f"add_domain: init must be 'mean' or the index of a domain to copy, got {init!r}")
        init = one_domain(init, D, "add_domain(init)")
    if model.sharing == "full" and k != model.num_classes[0]:
        raise ValueError(f"add_domain: sharing='full' shares one classifier of {model.num_classes[0]} classes; "
                         f"the new domain has {k}")
    layers, copies = _shared_parts(model)
    # Check everything before growing anything: all or nothing.
    for m in layers:
        if m.num_domains != D:
            raise ValueError(f"add_domain: a shared {type(m).__name__} has num_domains={m.num_domains}, the "
                             f"model {D}")
    for pd in copies:
        if len(pd.copies) != D:
            raise ValueError(f"add_domain: a PerDomain has {len(pd.copies)} copies, the model {D} domains")
    for m in layers:
        m.add_domain(init)
    for pd in copies:
        pd.add_copy(init)
    if isinstance(model.head, DomainHeads):
        source = init if isinstance(init, int) and model.num_classes[init] == k else None
        model.head.add_head(k, source)
    model.num_classes = model.num_classes + [k]
    model.num_domains = D + 1
    model.max_classes = max(model.num_classes)
    return D


# ----------------------------------------------------------------------------- a domain's parameters

def domain_parameters(model: nn.Module, domain: int) -> List[Tuple[str, nn.Parameter, Optional[Tensor]]]:
    """The parameters that belong to ``domain`` alone: ``(name, parameter, rows)`` where
    ``rows`` is a bool mask of the parameter's first dimension (the domain's rows of a
    (D, C) norm tensor or of the heads) or None (the whole tensor: a per-domain copy's).

    Universal tensors (shared by every domain, e.g. the convolutions of the shared trunk,
    (C,) norm scales, a full-sharing classifier) are not listed. This is what
    ``python -m unirep.adapt --train domain`` trains."""
    from .distributed import domain_layout
    D = model.num_domains
    d = one_domain(domain, D, "domain_parameters")
    layout = domain_layout(model, D)
    out = []
    for name, p in model.named_parameters():
        lay = layout.get(name)
        if lay is None:
            continue
        if lay.kind == "owned" and lay.owner == d:
            out.append((name, p, None))
        elif lay.kind == "rows" and bool((lay.row_domain == d).any()):
            out.append((name, p, (lay.row_domain == d).to(p.device)))
        elif lay.kind == "shared" and D == 1 and p.dim() == 2:
            # domain_layout leaves the (1, C) rows of a one-domain model shared
            owner = model.get_submodule(name.rpartition(".")[0])
            if isinstance(owner, DOMAIN_LAYERS):
                out.append((name, p, torch.ones(1, dtype=torch.bool, device=p.device)))
    return out


def count_domain_parameters(model: nn.Module, domain: int) -> int:
    """Number of parameter values that belong to ``domain`` alone (see
    :func:`domain_parameters`)."""
    total = 0
    for _, p, rows in domain_parameters(model, domain):
        total += p.numel() if rows is None else int(rows.sum()) * (p.numel() // max(p.shape[0], 1))
    return total


def shared_moment_layers(model: nn.Module) -> List[DomainBatchNorm2d]:
    """The batch norms whose running moments every domain shares (universal (C,) moments,
    outside any per-domain copy): ``python -m unirep.adapt --train domain`` keeps them in
    eval mode, so that training one domain leaves the others' normalization as it was."""
    layers, _ = _shared_parts(model)
    return [m for m in layers if isinstance(m, DomainBatchNorm2d) and m.track_running_stats
            and not m.batch_stats_at_eval and m.running_mean.dim() == 1 and getattr(model, "num_domains", 2) > 1]


# ----------------------------------------------------------------------------- recalibration (AdaBN)

def _domain_moment_layers(model: nn.Module, d: int, D: int) -> List[Tuple[DomainBatchNorm2d, Optional[int]]]:
    """(layer, row) of every batch norm whose running moments belong to domain ``d``: row
    ``d`` of the shared layers' per-domain (D, C) moments, and every tracked layer inside
    domain ``d``'s per-domain copy (row 0 of its (1, C) moments, or its (C,) ones whole:
    row None). In a one-domain model every tracked layer is the domain's."""
    out: Dict[int, Tuple[DomainBatchNorm2d, Optional[int]]] = {}

    def visit(m: nn.Module, owned: bool) -> None:
        if isinstance(m, PerDomain):
            visit(m.copies[d], True)
            return
        if isinstance(m, DomainBatchNorm2d) and m.track_running_stats and not m.batch_stats_at_eval:
            per_domain = m.running_mean.dim() == 2
            if owned:
                out.setdefault(id(m), (m, 0 if per_domain else None))
            elif per_domain:
                out.setdefault(id(m), (m, d))
        for child in m.children():
            visit(child, owned)

    visit(model, D == 1)
    return list(out.values())


def _num_domains(model: nn.Module) -> int:
    D = getattr(model, "num_domains", None)
    if isinstance(D, int):
        return D
    counts = {m.num_domains for m in model.modules() if isinstance(m, DOMAIN_LAYERS)}
    if len(counts) != 1:
        raise ValueError(f"recalibrate: cannot tell the model's number of domains (its domain layers have "
                         f"num_domains {sorted(counts) or 'none'})")
    return counts.pop()


def _caller(model: nn.Module, d: int):
    """How to run ``model`` on a batch of domain ``d``: ``model(x, d)`` for unirep's models,
    else inside ``with unirep_kernels.domain(d):`` (a model converted with
    ``convert_domain_norm``)."""
    from .models import LargeScaleNet, ResNet38
    if isinstance(model, (ResNet38, LargeScaleNet)):
        return lambda x: model(x, d)

    def run(x):
        with domain_context(d):
            return model(x)
    return run


def _batches(images, batch_size: int, mean, std, device, dtype) -> Iterator[Tensor]:
    """Model-ready float batches from uint8/float tensors or an iterable of batches."""
    from .data import whiten

    def prepare(x) -> Tensor:
        if isinstance(x, (tuple, list)):  # (images, labels, ...) from a loader
            x = x[0]
        if not isinstance(x, Tensor):
            raise TypeError(f"recalibrate: images must be tensors or batches of them, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"recalibrate: images must have shape (N, C, H, W), got {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            if mean is None or std is None:
                raise ValueError("recalibrate: uint8 images need the domain's whitening mean and std (mean=, "
                                 "std=: a run's checkpoint['data']['mean'][d] and ['std'][d]), or pass float "
                                 "images already whitened")
            return whiten(x.to(device), torch.as_tensor(mean), torch.as_tensor(std), dtype=dtype)
        if not x.is_floating_point():
            raise TypeError(f"recalibrate: images must be uint8 or floating point, got {x.dtype}")
        return x.to(device=device, dtype=dtype)

    if isinstance(images, Tensor):
        if images.shape[0] == 0:
            raise ValueError("recalibrate: no images")
        for i in range(0, images.shape[0], batch_size):
            yield prepare(images[i:i + batch_size])
    else:
        for batch in images:
            yield prepare(batch)


@torch.no_grad()
def recalibrate(model: nn.Module, images, domain: int, *, batch_size: int = 256, mean=None, std=None) -> nn.Module:
    """Re-estimate one domain's running moments from unlabelled images (AdaBN, Li et al.
    2016), e.g. after its inputs drifted (new camera, new lighting). No gradient is
    computed and nothing else changes: parameters, other domains' moments and every shared
    (universal) moment stay bit for bit.

    The domain's moments are reset and replaced by the sample-weighted average of the
    statistics of the batches, computed as in training (each of the domain's batch norms
    normalizes by its batch's statistics while the pass runs; every other layer is in eval
    mode). With one batch holding every image the moments are the images' exact mean and
    unbiased variance at each layer; with several batches the means are exact and each
    variance is the weighted mean of the batch variances.

    Args:
        model: a unirep model called as ``model(x, d)`` (ResNet38, LargeScaleNet), or any
            model of domain layers called inside ``with unirep_kernels.domain(d):`` (e.g.
            after ``convert_domain_norm``). Modified in place and returned; its train/eval
            modes are restored.
        images: the domain's images: a uint8 tensor (N, 3, H, W) at the run's image size
            (whitened here with ``mean``/``std``, as in training), a float tensor already
            preprocessed as in training, or an iterable of such batches (a loader; a batch
            may be a tuple whose first element is the images, e.g. ``(images, labels,
            domain)``: only the images are used).
        domain: the domain (an int) whose moments to re-estimate.
        batch_size: images per forward pass when ``images`` is a tensor (default 256).
        mean, std: the domain's whitening statistics (3,) for uint8 images, in [0, 1] units
            (a run's ``checkpoint["data"]["mean"][d]`` and ``["std"][d]``).

    Raises:
        ValueError: the domain has no moments of its own (strategies ``bn-universal``,
            whose moments every domain shares, ``bn+``, the IN strategies and ``none``),
            no images, or a batch with one value per channel.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"recalibrate: batch_size must be a positive int, got {batch_size!r}")
    D = _num_domains(model)
    d = one_domain(domain, D, "recalibrate")
    targets = _domain_moment_layers(model, d, D)
    if not targets:
        raise ValueError(f"recalibrate: domain {d} has no running moments of its own to re-estimate (universal "
                         f"moments are shared by every domain; bn+, instance norm and 'none' keep none)")
    param = next(model.parameters())
    run = _caller(model, d)
    modes = [(m, m.training) for m in model.modules()]
    saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m, _ in targets]
    try:
        model.eval()
        for m, row in targets:
            m.train()
            (m.running_mean if row is None else m.running_mean[row]).fill_(0.0)
            (m.running_var if row is None else m.running_var[row]).fill_(1.0)
        seen = 0
        for x in _batches(images, batch_size, mean, std, param.device, param.dtype):
            n = x.shape[0]
            if n == 0:
                continue
            seen += n
            for m, _ in targets:
                m.momentum = n / seen  # a running, sample-weighted mean of the batches' statistics
            run(x)
        if seen == 0:
            raise ValueError("recalibrate: no images")
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)
        for m, training in modes:
            m.training = training
    return model


# ----------------------------------------------------------------------------- unseen domains

@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every batch norm of ``model`` normalizes by the statistics of the
    batch it is given, in eval mode too (the paper's BN+), without touching any running
    moment."""
    layers = [m for m in model.modules() if isinstance(m, DomainBatchNorm2d)]
    saved = [(m, m.batch_stats_at_eval) for m in layers]
    try:
        for m in layers:
            m.batch_stats_at_eval = True
        yield model
    finally:
        for m, flag in saved:
            m.batch_stats_at_eval = flag


@torch.no_grad()
def nearest_domain(model: nn.Module, x: Tensor, candidates: Optional[Sequence[int]] = None
                   ) -> Tuple[int, Tensor, Dict[int, float]]:
    """A heuristic for a batch of images from a domain the model was not trained on.

    Every normalization uses the batch's own statistics (BN+, :func:`batch_statistics`),
    and each candidate domain's scales and head classify the batch; the domain whose
    predictions have the lowest mean *normalized* entropy (entropy over its own K_d
    classes divided by log K_d, so that domains with many classes are not penalised) is
    taken as the nearest. One-class domains are skipped (their entropy is always 0) unless
    they are the only candidates.

    Args:
        model: a unirep model called as ``model(x, d)``; put in eval mode.
        x: one batch (N, C, H, W), already preprocessed, of images from one unseen domain;
            the statistics of a few images are noisy, so give it as many as possible.
        candidates: the domains to consider (default: all).

    Returns:
        ``(domain, probabilities, entropies)``: the chosen domain, the (N, K_max) class
        probabilities under it (0 beyond its classes), and the mean normalized entropy of
        every candidate.
    """
    D = model.num_domains
    doms = list(range(D)) if candidates is None else [one_domain(c, D, "nearest_domain") for c in candidates]
    if not doms:
        raise ValueError("nearest_domain: no candidate domain")
    sizes = model.num_classes
    usable = [c for c in doms if sizes[c] > 1] or doms
    model.eval()
    entropies: Dict[int, float] = {}
    probs: Dict[int, Tensor] = {}
    with batch_statistics(model):
        for c in usable:
            p = model(x, c).float().softmax(1)
            h = -(p * p.clamp_min(1e-30).log()).sum(1)
            entropies[c] = float(h.mean()) / math.log(sizes[c]) if sizes[c] > 1 else 0.0
            probs[c] = p
    best = min(usable, key=lambda c: (entropies[c], c))
    return best, probs[best], entropies
