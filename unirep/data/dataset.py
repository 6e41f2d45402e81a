"""In-memory dataset containers: one domain (:class:`DomainDataset`) and many
(:class:`MultiDomainData`)."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Iterator

import numpy as np
import torch

from .transforms import channel_stats, whiten

__all__ = ["DomainDataset", "MultiDomainData", "NO_FLIP_KINDS", "label_permutation"]

#: Kinds of domain whose images must not be mirrored (the paper: MNIST, Omniglot, SVHN).
NO_FLIP_KINDS = frozenset({"digits", "characters", "text"})


def label_permutation(num_classes: int, seed: int, name: str) -> torch.Tensor:
    """A seeded random bijection of ``range(num_classes)`` for the domain called ``name``:
    int64 ``perm`` with class ``k`` renamed ``perm[k]``.  A pure function of ``(num_classes,
    seed, name)``, so a domain gets the same permutation whatever other domains it is
    trained with (used to pair the classes of different domains at random on a shared
    classifier: the paper's full sharing, Table 2)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"label_permutation: num_classes must be a positive int, got {num_classes!r}")
    ss = np.random.SeedSequence([int(seed), zlib.crc32(str(name).encode())])
    return torch.from_numpy(np.random.default_rng(ss).permutation(num_classes)).to(torch.int64)


def _check_split(name: str, split: str, pair, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise TypeError(f"{name}.{split} must be a pair (images, labels)")
    x, y = pair
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{name}.{split} images must be a uint8 tensor [N, 3, S, S], got "
                         f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
    if x.shape[2] != x.shape[3]:
        raise ValueError(f"{name}.{split} images must be square, got {tuple(x.shape)}")
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.dim() != 1:
        raise ValueError(f"{name}.{split} labels must be an int64 tensor [N]")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{name}.{split}: {x.shape[0]} images but {y.shape[0]} labels")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{name}.{split}: labels must lie in [0, {num_classes}), got "
                         f"[{int(y.min())}, {int(y.max())}]")
    return x.contiguous(), y.contiguous()


class DomainDataset:
    """One visual domain held in memory.

    Attributes:
        name: short name of the domain (e.g. ``"digits"``).
        classes: class names in label order.
        train, test: pairs ``(images, labels)``: uint8 ``[N, 3, S, S]`` and int64 ``[N]``.
        kind: what the images show; ``"digits"``, ``"characters"`` and ``"text"`` are never
            flipped during augmentation (:data:`NO_FLIP_KINDS`).
        mean, std: float32 ``[3]`` per-channel statistics of the training images in [0, 1]
            units, used for the paper's per-domain whitening (computed if not given).
        source: where the data came from (a path or ``"builtin"``).
    """

    def __init__(self, name: str, classes: Sequence[str], train, test, kind: str = "objects",
                 mean: torch.Tensor | None = None, std: torch.Tensor | None = None,
                 source: str = ""):
        self.name = str(name)
        self.classes = [str(c) for c in classes]
        if not self.classes:
            raise ValueError(f"{self.name}: a dataset needs at least one class")
        self.kind = str(kind)
        self.source = str(source)
        self.train = _check_split(self.name, "train", train, len(self.classes))
        self.test = _check_split(self.name, "test", test, len(self.classes))
        if self.train[0].shape[0] == 0:
            raise ValueError(f"{self.name}: the training split is empty")
        if self.test[0].shape[0] and self.test[0].shape[1:] != self.train[0].shape[1:]:
            raise ValueError(f"{self.name}: train and test images differ in shape")
        if mean is None or std is None:
            mean, std = channel_stats(self.train[0])
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(3)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(3)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.train[0].shape[-1])

    @property
    def flip(self) -> bool:
        """Whether horizontal flips are used when augmenting this domain."""
        return self.kind not in NO_FLIP_KINDS

    def split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``self.train`` or ``self.test`` by name."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return getattr(self, split)

    def whiten(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 images of this domain -> whitened float tensor."""
        return whiten(images, self.mean, self.std, dtype=dtype)

    def relabeled(self, perm: torch.Tensor) -> "DomainDataset":
        """A copy of this domain whose class ``k`` is renamed ``perm[k]``: train and test
        labels ``y`` become ``perm[y]`` and the class names are reordered to follow their
        images (so ``classes[perm[k]]`` is the old ``classes[k]``).  Images and whitening
        statistics are shared with this dataset, not copied."""
        perm = torch.as_tensor(perm, dtype=torch.int64)
        k = self.num_classes
        if perm.shape != (k,) or not torch.equal(torch.sort(perm).values, torch.arange(k)):
            raise ValueError(f"{self.name}: perm must be a permutation of range({k}), got {perm.tolist()}")
        classes = [""] * k
        for old, new in enumerate(perm.tolist()):
            classes[new] = self.classes[old]
        return DomainDataset(self.name, classes, (self.train[0], perm[self.train[1]]),
                             (self.test[0], perm[self.test[1]]), kind=self.kind, mean=self.mean,
                             std=self.std, source=self.source)

    def __repr__(self) -> str:
        return (f"DomainDataset({self.name!r}, kind={self.kind!r}, classes={self.num_classes}, "
                f"train={self.train[0].shape[0]}, test={self.test[0].shape[0]}, "
                f"size={self.image_size})")


class MultiDomainData(Sequence):
    """An ordered collection of :class:`DomainDataset`; the position of a domain is its
    domain index (the ``domain`` argument of the kernels).  Index by position or name.
    """

    def __init__(self, domains: Sequence[DomainDataset]):
        self.domains = list(domains)
        if not self.domains:
            raise ValueError("MultiDomainData needs at least one domain")
        names = [d.name for d in self.domains]
        if len(set(names)) != len(names):
            raise ValueError(f"domain names must be unique, got {names}")
        sizes = {d.image_size for d in self.domains}
        if len(sizes) != 1:
            raise ValueError(f"all domains must have the same image size, got {sorted(sizes)}")

    def __len__(self) -> int:
        return len(self.domains)

    def __getitem__(self, key):
        if isinstance(key, str):
            for d in self.domains:
                if d.name == key:
                    return d
            raise KeyError(f"no domain named {key!r}; have {self.names}")
        return self.domains[key]

    def __iter__(self) -> Iterator[DomainDataset]:
        return iter(self.domains)

    def index(self, name: str) -> int:  # type: ignore[override]
        return self.names.index(name)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.domains]

    @property
    def num_classes(self) -> list[int]:
        return [d.num_classes for d in self.domains]

    @property
    def image_size(self) -> int:
        return self.domains[0].image_size

    def sizes(self, split: str = "train") -> list[int]:
        """Number of images of each domain in ``split``."""
        return [int(d.split(split)[1].shape[0]) for d in self.domains]

    @property
    def mean_table(self) -> torch.Tensor:
        """float32 ``[D, 3]`` whitening means."""
        return torch.stack([d.mean for d in self.domains])

    @property
    def std_table(self) -> torch.Tensor:
        """float32 ``[D, 3]`` whitening standard deviations."""
        return torch.stack([d.std for d in self.domains])

    @property
    def flip_mask(self) -> torch.Tensor:
        """bool ``[D]``: which domains are flipped during augmentation."""
        return torch.tensor([d.flip for d in self.domains], dtype=torch.bool)

    def subset(self, names: Sequence[str | int]) -> "MultiDomainData":
        """A new collection with the given domains (names or indices), in that order."""
        return MultiDomainData([self[n] for n in names])

    def permute_labels(self, seed: int) -> "MultiDomainData":
        """A new collection where every domain's classes are renamed by its own seeded
        random permutation (:func:`label_permutation` of its class count, ``seed`` and its
        name; see :meth:`DomainDataset.relabeled`).  Train and test labels get the same
        permutation, so errors are measured against the renamed labels consistently.  With a
        shared classifier (``sharing="full"``) this pairs class ``k`` of one domain with an
        unrelated class of every other domain at random, as the paper does for Table 2."""
        return MultiDomainData([d.relabeled(label_permutation(d.num_classes, seed, d.name))
                                for d in self.domains])

    def loader(self, batch_size: int, **kwargs):
        """A :class:`~unirep.data.loader.BatchLoader` over this collection; see its
        docstring for the keyword arguments (mode, split, device, seed, rank, ...)."""
        from .loader import BatchLoader
        return BatchLoader(self, batch_size, **kwargs)

    def eval_batches(self, domain: int | str, batch_size: int, split: str = "test",
                     device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     limit: int | None = None):
        """Pure, whitened, un-augmented batches covering ``split`` of one domain in order
        (at most ``limit`` images: a fixed random subset): yields ``(images, labels,
        domain_index)``."""
        from .loader import iter_eval
        d = domain if isinstance(domain, int) else self.index(domain)
        return iter_eval(self, d, batch_size, split=split, device=device, dtype=dtype, limit=limit)

    def __repr__(self) -> str:
        body = ",\n  ".join(repr(d) for d in self.domains)
        return f"MultiDomainData([\n  {body}])"
