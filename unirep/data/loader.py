"""Batch iteration on the training device: gather uint8 images from memory, move them,
whiten and augment them there.  Yields exactly what the kernels accept:
``(images, labels, domain)`` with ``domain`` an int (pure batch) or an int64 tensor ``[N]``
(mixed batch) on the images' device."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch

from .samplers import MixedSampler, RoundRobinSampler
from .transforms import augment as _augment
from .transforms import whiten

__all__ = ["BatchLoader", "iter_eval", "default_pad"]


def default_pad(image_size: int) -> int:
    """Random-crop padding for ``image_size``: the paper's 8 pixels at 64x64, scaled with the
    image (4 at 32x32), so a crop shifts the content by the same fraction of the image."""
    return max(1, round(int(image_size) / 8))


def _batch_generator(seed: int, step: int, rank: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed), 0x5EED, int(step), int(rank)]).generate_state(2)
    g = torch.Generator()
    g.manual_seed(int(state[0]) << 32 | int(state[1]))
    return g


class BatchLoader:
    """Training batches of a :class:`~unirep.data.MultiDomainData`.

    Args:
        data: the domains.
        batch_size: images per batch (per rank).
        mode: ``"pure"`` (round-robin pure batches, the paper) or ``"mixed"`` (every domain
            in every batch).
        split: ``"train"`` (default) or ``"test"``.
        augment: random crop and flip (no flip for digit/character domains); default:
            on for the train split.
        pad: zero padding of the random crop, in pixels; default: an eighth of the image
            side (the paper's pad 8 at 64x64, pad 4 at 32x32).
        device: where the batches are produced; the uint8 gather happens on the CPU, the
            float conversion, whitening and augmentation on ``device``.
        seed: seeds both the sampler and the augmentation; same seed, same batches.
        rank, world_size: multi-process training; see :class:`RoundRobinSampler`.
        shares: per-domain shares of a mixed batch (default equal).
        start_step, num_steps: the steps to produce (``num_steps=None``: endless).
        dtype, channels_last: layout of the produced images.
        order: visiting order of the domains in pure mode.

    Iterating yields ``(images, labels, domain)``; ``get(step)`` returns one step's batch.
    """

    def __init__(self, data, batch_size: int, *, mode: str = "pure", split: str = "train",
                 augment: bool | None = None, pad: int | None = None,
                 device: str | torch.device = "cpu", seed: int = 0,
                 rank: int = 0, world_size: int = 1, shares: Sequence[float] | None = None,
                 start_step: int = 0, num_steps: int | None = None,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 order: Sequence[int] | None = None):
        self.data = data
        self.split = split
        self.mode = mode
        self.device = torch.device(device)
        self.augment = (split == "train") if augment is None else bool(augment)
        self.pad = default_pad(data.image_size) if pad is None else int(pad)
        if self.pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.start_step, self.num_steps = int(start_step), num_steps
        self.dtype, self.channels_last = dtype, channels_last
        sizes = data.sizes(split)
        if mode == "pure":
            self.sampler = RoundRobinSampler(sizes, batch_size, seed=seed, rank=rank,
                                             world_size=world_size, order=order)
        elif mode == "mixed":
            self.sampler = MixedSampler(sizes, batch_size, shares=shares, seed=seed, rank=rank,
                                        world_size=world_size)
        else:
            raise ValueError(f"mode must be 'pure' or 'mixed', got {mode!r}")
        self._images = [d.split(split)[0] for d in data]
        self._labels = [d.split(split)[1] for d in data]
        self._mean = data.mean_table.to(self.device)
        self._std = data.std_table.to(self.device)
        self._flip = data.flip_mask
        self._pin = self.device.type == "cuda"

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an endless BatchLoader has no length; pass num_steps")
        return int(self.num_steps)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self._pin:
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def get(self, step: int):
        """The batch of ``step``: ``(images, labels, domain)``."""
        gen = _batch_generator(self.seed, step, self.rank) if self.augment else None
        if self.mode == "pure":
            d, idx = self.sampler.batch(step)
            idx_t = torch.from_numpy(idx)
            x = self._to_device(self._images[d].index_select(0, idx_t))
            y = self._to_device(self._labels[d].index_select(0, idx_t))
            x = whiten(x, self._mean[d], self._std[d])
            if self.augment:
                x = _augment(x, pad=self.pad, flip=bool(self._flip[d]), generator=gen,
                             channels_last=self.channels_last)
            domain = d
        else:
            doms, idx = self.sampler.batch(step)
            parts_x, parts_y = [], []
            start = 0
            for d, c in enumerate(self.sampler.counts):
                sel = torch.from_numpy(idx[start:start + c])
                parts_x.append(self._images[d].index_select(0, sel))
                parts_y.append(self._labels[d].index_select(0, sel))
                start += c
            dom_cpu = torch.from_numpy(doms)
            x = self._to_device(torch.cat(parts_x))
            y = self._to_device(torch.cat(parts_y))
            domain = dom_cpu.to(self.device)
            x = whiten(x, self._mean, self._std, domain=domain)
            if self.augment:
                x = _augment(x, pad=self.pad, flip=self._flip[dom_cpu], generator=gen,
                             channels_last=self.channels_last)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.to(self.dtype), y, domain

    def __iter__(self):
        step = self.start_step
        end = None if self.num_steps is None else self.start_step + self.num_steps
        while end is None or step < end:
            yield self.get(step)
            step += 1


def iter_eval(data, domain: int, batch_size: int, split: str = "test",
              device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              limit: int | None = None):
    """Every image of ``split`` of one domain, in order, in pure whitened batches (the
    central crop of the padded image is the image itself): yields
    ``(images, labels, domain)``.

    ``limit``: at most this many images, a random subset fixed by the domain's name (in
    increasing index order), e.g. to measure training error cheaply on a large split."""
    device = torch.device(device)
    ds = data[domain]
    x_all, y_all = ds.split(split)
    if limit is not None and limit < x_all.shape[0]:
        g = torch.Generator().manual_seed(zlib.crc32(f"{ds.name}:{split}".encode()))
        keep = torch.randperm(x_all.shape[0], generator=g)[:max(int(limit), 0)].sort().values
        x_all, y_all = x_all.index_select(0, keep), y_all.index_select(0, keep)
    for i in range(0, x_all.shape[0], batch_size):
        x = x_all[i:i + batch_size].to(device)
        y = y_all[i:i + batch_size].to(device)
        yield whiten(x, ds.mean, ds.std, dtype=dtype), y, domain
