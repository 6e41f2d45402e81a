"""Building blocks shared by the paper's models: normalization strategies, per-domain
routing, padded domain heads, parameter counting and the masked loss.

Every module here is called as ``module(x, domain)``: ``domain`` is a Python int (a pure
batch) or an int64 tensor of shape (N,) (a mixed batch, one domain per sample), checked by
the models with :func:`unirep_kernels.check_domain`. The domain is always passed
explicitly, never read from the ``unirep_kernels.domain`` context.
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

from unirep_kernels import Domain, DomainBatchNorm2d, DomainInstanceNorm2d, DomainScale2d

#: Normalization strategies (Table 4 of the paper, plus "none" of section 3.1):
#: name -> (layer kind, scale/bias, moments).
STRATEGIES: Dict[str, tuple] = {
    "bn-universal": ("bn", "universal", "universal"),
    "bn+": ("bn", "universal", "batch (also at test)"),
    "bn-domain-moments": ("bn", "universal", "domain"),
    "bn-domain": ("bn", "domain", "domain"),
    "in-universal": ("in", "universal", "-"),
    "in-domain": ("in", "domain", "-"),
    "none": ("scale", "domain (after each conv)", "-"),
}


def check_strategy(strategy: str) -> str:
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {sorted(STRATEGIES)}")
    return strategy


def make_norm(strategy: str, channels: int, num_domains: int, relu: bool = True,
              backend: Optional[str] = None) -> nn.Module:
    """The normalization layer of ``strategy`` for ``channels`` channels and ``num_domains``
    domains (ReLU fused when ``relu``). Not defined for ``strategy="none"``."""
    if strategy == "bn-universal":
        return DomainBatchNorm2d(channels, num_domains, domain_affine=False, domain_stats=False, relu=relu,
                                 backend=backend)
    if strategy == "bn+":
        # Batch statistics at training and test time (per domain group, so a mixed batch
        # normalizes every domain as its own pure batch would); no moments are kept.
        return DomainBatchNorm2d(channels, num_domains, domain_affine=False, domain_stats=True,
                                 track_running_stats=False, batch_stats_at_eval=True, relu=relu, backend=backend)
    if strategy == "bn-domain-moments":
        return DomainBatchNorm2d(channels, num_domains, domain_affine=False, domain_stats=True, relu=relu,
                                 backend=backend)
    if strategy == "bn-domain":
        return DomainBatchNorm2d(channels, num_domains, domain_affine=True, domain_stats=True, relu=relu,
                                 backend=backend)
    if strategy == "in-universal":
        return DomainInstanceNorm2d(channels, num_domains, domain_affine=False, relu=relu, backend=backend)
    if strategy == "in-domain":
        return DomainInstanceNorm2d(channels, num_domains, domain_affine=True, relu=relu, backend=backend)
    raise ValueError(f"make_norm: no normalization layer for strategy {strategy!r}")


class ConvNorm(nn.Module):
    """conv -> normalization of the strategy -> ReLU (fused into the norm layer), or, for
    ``strategy="none"``, conv -> DomainScale2d -> ReLU. The conv has no bias: the norm or
    scaling layer that follows carries it."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0, groups: int = 1,
                 *, strategy: str, num_domains: int, backend: Optional[str] = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups, bias=False)
        self.normalized = strategy != "none"
        self.norm = (make_norm(strategy, cout, num_domains, relu=True, backend=backend) if self.normalized
                     else DomainScale2d(cout, num_domains))

    def forward(self, x: Tensor, domain: Domain) -> Tensor:
        y = self.norm(self.conv(x), domain)
        return y if self.normalized else F.relu(y)


# --------------------------------------------------------------------------------------
# Domains


def route(x: Tensor, domain: Tensor, fns: Sequence[Callable[[Tensor], Tensor]]) -> Tensor:
    """Apply ``fns[d]`` to the samples of domain ``d`` of a mixed batch and return the
    outputs in the original sample order.

    One call per domain *present* (a loop over domains, never over samples): the samples are
    sorted by domain (stable), split into contiguous groups, each group goes through its
    domain's function, and the concatenation is put back in order. Every ``fns[d]`` must
    return outputs of the same trailing shape. Differentiable.

    The group sizes are data: a meta ``domain`` (shape planning, no values) runs every
    function on the whole batch and picks each sample's row, which has the right shape; a
    fake one (``FakeTensorMode``, ``torch.export``) is refused with a clear error, since a
    traced graph must not silently compute something else.
    """
    if domain.device.type == "meta":
        every = torch.stack([fn(x) for fn in fns])  # (D, N, ...)
        return every[domain, torch.arange(x.shape[0], device=domain.device)]
    if is_fake(domain) and not torch.compiler.is_compiling():
        raise ValueError("a mixed batch through per-domain copies (sharing 'none' or 'partial-*', or the "
                         "section 4.2 models' heads) needs the domain values to split the batch: trace it with "
                         "a pure batch (an int domain) or with sharing='deep' under FakeTensorMode/torch.export")
    counts = torch.bincount(domain, minlength=len(fns)).tolist()
    present = [d for d, c in enumerate(counts) if c]
    if len(present) == 1:
        return fns[present[0]](x)
    order = torch.argsort(domain, stable=True)
    groups = x.index_select(0, order).split(counts)
    y = torch.cat([fns[d](groups[d]) for d in present])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return y.index_select(0, inverse)


class DomainSequential(nn.ModuleList):
    """A sequence of domain-aware modules, each called as ``m(x, domain)``."""

    def forward(self, x: Tensor, domain: Domain) -> Tensor:
        for m in self:
            x = m(x, domain)
        return x


class PerDomain(nn.Module):
    """``D`` separate copies of a module (one per domain, each built for a single domain):
    the domain-specific part of a partially shared or unshared network.

    A pure batch of domain ``d`` runs ``copies[d](x, 0)``; a mixed batch is grouped by domain
    with :func:`route` (one call per domain present).
    """

    def __init__(self, copies: Sequence[nn.Module]) -> None:
        super().__init__()
        self.copies = nn.ModuleList(copies)

    def add_copy(self, init: Union[str, int] = "mean") -> int:
        """Append a copy for a new domain and return its index: a copy of domain ``init``'s
        module, or with ``init="mean"`` one whose floating-point parameters and buffers are
        the mean over the existing copies (integer buffers: copy 0's). The existing copies
        are not touched."""
        source = self.copies[0 if init == "mean" else init]
        new = copy.deepcopy(source)
        if init == "mean" and len(self.copies) > 1:
            states = [c.state_dict() for c in self.copies]
            with torch.no_grad():
                for name, t in new.state_dict().items():  # views of new's own tensors
                    if t.is_floating_point():
                        t.copy_(torch.stack([s[name] for s in states]).mean(0))
        self.copies.append(new)
        return len(self.copies) - 1

    def forward(self, x: Tensor, domain: Domain) -> Tensor:
        if isinstance(domain, int):
            return self.copies[domain](x, 0)
        return route(x, domain, [lambda xd, m=m: m(xd, 0) for m in self.copies])


#: What normalizes the pre-activation network's last feature maps before global average
#: pooling (``final_norm`` of :class:`ResNet38`): "auto" (the default: the strategy's own
#: normalization for BN strategies, "affine" for IN strategies), "same" (the strategy's own
#: normalization, whatever it is), "affine" (no normalization: the strategy's scale and bias,
#: universal or per domain), "relu" (nothing: ReLU only), or any normalizing strategy name.
FINAL_NORMS = ("auto", "same", "affine", "relu")


def check_final_norm(final_norm: str) -> str:
    if final_norm not in FINAL_NORMS and (final_norm not in STRATEGIES or final_norm == "none"):
        raise ValueError(f"unknown final_norm {final_norm!r}; expected one of "
                         f"{list(FINAL_NORMS) + sorted(k for k in STRATEGIES if k != 'none')}")
    return final_norm


def resolve_final_norm(strategy: str, final_norm: str = "auto") -> str:
    """The layer that ends the network before pooling, for ``strategy``: a strategy name,
    "affine" or "relu" (see :data:`FINAL_NORMS`).

    Why "auto" leaves instance normalization out there: IN right before global average
    pooling sets every channel of every image to mean 0 before its affine, so the pooled
    feature of a channel no longer depends on how strongly the image activated it, only on
    the shape of its spatial distribution after the ReLU. That removes the very statistic
    global average pooling is there to read (see docs/models.md). BN does not: its moments
    are the domain's, not the image's."""
    check_final_norm(final_norm)
    if strategy == "none":
        return "relu"
    if final_norm == "same":
        return strategy
    if final_norm == "auto":
        return "affine" if STRATEGIES[strategy][0] == "in" else strategy
    return final_norm


class ChannelAffine(nn.Module):
    """y = s * x + b with one (s, b) per channel, shared by every domain (the universal
    counterpart of :class:`~unirep_kernels.DomainScale2d`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, domain: Domain) -> Tensor:
        return torch.addcmul(self.bias[:, None, None], x, self.weight[:, None, None])

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}"


class GlobalPool(nn.Module):
    """The final layer of a pre-activation network, then global average pooling to (N, C):
    normalization + ReLU (the strategy's by default, see :func:`resolve_final_norm`), the
    strategy's scale and bias + ReLU (``"affine"``), or a ReLU alone (``"relu"``, and always
    for strategy ``"none"``)."""

    def __init__(self, channels: int, *, strategy: str, num_domains: int, backend: Optional[str] = None,
                 final_norm: str = "auto") -> None:
        super().__init__()
        self.kind = resolve_final_norm(strategy, final_norm)
        self.norm: Optional[nn.Module] = None
        self.affine: Optional[nn.Module] = None
        if self.kind == "affine":
            scale = STRATEGIES[strategy][1]
            self.affine = DomainScale2d(channels, num_domains) if scale == "domain" else ChannelAffine(channels)
        elif self.kind != "relu":
            self.norm = make_norm(self.kind, channels, num_domains, relu=True, backend=backend)

    def forward(self, x: Tensor, domain: Domain) -> Tensor:
        if self.norm is not None:
            x = self.norm(x, domain)
        else:
            x = F.relu(x if self.affine is None else self.affine(x, domain))
        return x.mean(dim=(2, 3))

    def extra_repr(self) -> str:
        return f"final={self.kind!r}"


# --------------------------------------------------------------------------------------
# Heads


def pad_logits(logits: Tensor, max_classes: int) -> Tensor:
    """Pad (N, K) logits to (N, max_classes) with -inf."""
    k = logits.shape[-1]
    return logits if k == max_classes else F.pad(logits, (0, max_classes - k), value=-math.inf)


class DomainHeads(nn.Module):
    """One linear classifier per domain, with different class counts, stored as a single
    (sum K_d, F) weight and (sum K_d,) bias (rows ``offsets[d] : offsets[d] + K_d`` belong to
    domain ``d``; ``head_weight(d)`` / ``head_bias(d)`` return them).

    Output: (N, K_max) logits, padded with ``-inf`` beyond each sample's own K_d, for pure
    and mixed batches alike. A mixed batch is served by one matmul against all heads and a
    gather of each sample's own segment: one matmul per head on the whole batch (a loop over
    the D heads, never over samples), so that adding a head (:meth:`add_head`) leaves the
    others' logits bitwise unchanged. Keeping all heads in one tensor also means every head
    parameter takes part in every step (absent domains get zero gradients), which
    distributed data parallel requires.
    """

    def __init__(self, in_features: int, num_classes: Sequence[int]) -> None:
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(sum(num_classes), in_features))
        self.bias = nn.Parameter(torch.empty(sum(num_classes)))
        self._set_num_classes(num_classes)
        self.reset_parameters()

    def _set_num_classes(self, num_classes: Sequence[int]) -> None:
        """Class counts, offsets and the (non-persistent) gather tables of a mixed batch."""
        self.num_classes = list(num_classes)
        self.max_classes = max(self.num_classes)
        self.offsets = [0]
        for k in self.num_classes[:-1]:
            self.offsets.append(self.offsets[-1] + k)
        cls = torch.arange(self.max_classes)
        sizes = torch.tensor(self.num_classes)
        valid = cls.unsqueeze(0) < sizes.unsqueeze(1)  # (D, K)
        index = torch.tensor(self.offsets).unsqueeze(1) + cls.unsqueeze(0)
        device = self.weight.device
        self.register_buffer("gather_index", torch.where(valid, index, 0).to(device), persistent=False)
        self.register_buffer("valid", valid.to(device), persistent=False)

    def reset_parameters(self) -> None:
        # Same distribution as nn.Linear's default initialization, head by head.
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def head_weight(self, d: int) -> Tensor:
        return self.weight[self.offsets[d]:self.offsets[d] + self.num_classes[d]]

    def head_bias(self, d: int) -> Tensor:
        return self.bias[self.offsets[d]:self.offsets[d] + self.num_classes[d]]

    def add_head(self, num_classes: int, source: Optional[int] = None) -> int:
        """Append a classifier of ``num_classes`` classes for a new domain and return its
        index: a copy of head ``source`` (which must have as many classes), or, with
        ``source=None``, drawn as :meth:`reset_parameters` draws them (from torch's global
        random generator). The other heads' rows are kept bit for bit; ``weight`` and
        ``bias`` become new ``nn.Parameter`` objects (an optimizer built before holds the old
        ones)."""
        k = int(num_classes)
        if source is not None and self.num_classes[source] != k:
            raise ValueError(f"add_head: head {source} has {self.num_classes[source]} classes, not {k}: "
                             "it cannot be copied")
        with torch.no_grad():
            if source is None:
                bound = 1.0 / math.sqrt(self.in_features)
                w = torch.empty(k, self.in_features, dtype=self.weight.dtype, device=self.weight.device)
                b = torch.empty(k, dtype=self.bias.dtype, device=self.bias.device)
                nn.init.uniform_(w, -bound, bound)
                nn.init.uniform_(b, -bound, bound)
            else:
                w, b = self.head_weight(source), self.head_bias(source)
            weight = torch.cat([self.weight.detach(), w])
            bias = torch.cat([self.bias.detach(), b])
        self.weight = nn.Parameter(weight, requires_grad=self.weight.requires_grad)
        self.bias = nn.Parameter(bias, requires_grad=self.bias.requires_grad)
        self._set_num_classes(self.num_classes + [k])
        return len(self.num_classes) - 1

    def forward(self, x: Tensor, domain: Domain) -> Tensor:
        if isinstance(domain, int):
            return pad_logits(F.linear(x, self.head_weight(domain), self.head_bias(domain)), self.max_classes)
        # All heads on the whole batch, one matmul per head (a loop over the D heads, never over
        # samples): a head's logits then do not depend on how many other heads there are, so
        # adding a domain (unirep.add_domain) leaves them bitwise unchanged, whereas the BLAS
        # blocks one matmul against all heads by the total row count.
        every = torch.cat([F.linear(x, self.head_weight(d), self.head_bias(d))
                           for d in range(len(self.num_classes))], dim=1)  # (N, sum K_d)
        mine = every.gather(1, self.gather_index.index_select(0, domain))
        return mine.masked_fill(~self.valid.index_select(0, domain), -math.inf)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}"


class SharedHead(nn.Module):
    """A single classifier shared by every domain (full sharing; equal class counts)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor, domain: Domain) -> Tensor:
        return self.fc(x)


# --------------------------------------------------------------------------------------
# Utilities


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model``, each shared tensor counted once.

    Parameters are deduplicated by identity and, for real (non-meta) tensors, by the memory
    they view, so tied weights and modules registered in several places count once. Buffers
    (BN moments) are not parameters and are not counted. Works on models built on the
    ``meta`` device (``with torch.device("meta"): build_model(...)``).
    """
    seen_ids, seen_views, total = set(), set(), 0
    for _, p in model.named_parameters(remove_duplicate=False):
        if trainable_only and not p.requires_grad:
            continue
        if id(p) in seen_ids:
            continue
        seen_ids.add(id(p))
        if p.device.type != "meta":
            view = (p.device, p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape), p.stride())
            if view in seen_views:
                continue
            seen_views.add(view)
        total += p.numel()
    return total


def masked_cross_entropy(logits: Tensor, labels: Tensor, reduction: str = "mean",
                         label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy for the models' padded logits.

    ``logits`` (N, K_max) hold ``-inf`` at the classes a sample's domain does not have
    (see :class:`DomainHeads`); those classes get probability 0 and no gradient. ``labels``
    (N,) int64 must name a valid class of each sample's domain (a clear error otherwise).
    ``label_smoothing`` spreads its mass over each sample's *valid* classes only.
    ``reduction``: "mean", "sum" or "none".
    """
    if logits.dim() != 2:
        raise ValueError(f"masked_cross_entropy: logits must have shape (N, K), got {tuple(logits.shape)}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"masked_cross_entropy: labels must have shape (N,) = ({logits.shape[0]},), "
                         f"got {tuple(labels.shape)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"masked_cross_entropy: labels must be int64, got {labels.dtype}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"masked_cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    valid = logits > -math.inf
    if not torch.compiler.is_compiling() and labels.numel():
        if int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]:
            raise ValueError(f"masked_cross_entropy: labels must lie in [0, {logits.shape[1]}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        if not bool(valid.gather(1, labels[:, None]).all()):
            raise ValueError("masked_cross_entropy: a label names a class its domain does not have "
                             "(its logit is -inf)")
    logp = F.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=1)
    loss = -logp.gather(1, labels[:, None]).squeeze(1)
    if label_smoothing:
        smooth = -logp.masked_fill(~valid, 0.0).sum(1) / valid.sum(1)
        loss = (1.0 - label_smoothing) * loss + label_smoothing * smooth
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss


def init_weights(module: nn.Module) -> None:
    """He (fan-out) initialization of every conv; linear layers keep PyTorch's default."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def check_num_classes(num_classes) -> List[int]:
    if num_classes is None:
        raise ValueError("build_model: num_classes is required: a list with the class count of every domain")
    if isinstance(num_classes, numbers.Integral) or not isinstance(num_classes, Sequence) or not num_classes:
        raise ValueError(f"num_classes must be a non-empty list of class counts, one per domain, got {num_classes!r}")
    out = []
    for k in num_classes:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"num_classes must hold positive ints, got {num_classes!r}")
        out.append(int(k))
    return out


def check_input(x: Tensor, in_channels: int, where: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{where}: x must have shape (N, {in_channels}, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{where}: empty batch")
