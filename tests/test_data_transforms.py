"""The paper's preprocessing: grey to RGB, resize, whitening, pad-8 crop and flip."""

from __future__ import annotations

import pytest
import torch

from unirep.data import augment, channel_stats, resize_uint8, to_rgb, whiten
from unirep.data.transforms import _crop_flip_gather


def test_to_rgb_and_resize():
    g = torch.randint(0, 256, (4, 1, 20, 30), dtype=torch.uint8)
    rgb = to_rgb(g)
    assert rgb.shape == (4, 3, 20, 30) and torch.equal(rgb[:, 0], rgb[:, 2])
    assert to_rgb(torch.zeros(2, 5, 5, dtype=torch.uint8)).shape == (2, 3, 5, 5)
    with pytest.raises(ValueError, match="channels"):
        to_rgb(torch.zeros(2, 2, 5, 5))
    r = resize_uint8(rgb, 64)
    assert r.shape == (4, 3, 64, 64) and r.dtype == torch.uint8
    flat = torch.full((2, 3, 17, 9), 77, dtype=torch.uint8)
    assert torch.all(resize_uint8(flat, 64) == 77)


def test_whitening_zero_mean_unit_std():
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(50, 3, 16, 16, generator=gen) * torch.tensor([60., 200., 20.])[:, None, None]
         + torch.tensor([10., 30., 200.])[:, None, None]).to(torch.uint8)
    mean, std = channel_stats(x)
    assert mean.shape == (3,) and std.shape == (3,)
    w = whiten(x, mean, std).double()
    assert torch.allclose(w.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(w.std(dim=(0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-4)
    const = torch.full((3, 3, 4, 4), 9, dtype=torch.uint8)
    assert torch.all(channel_stats(const)[1] == 1)          # no division by zero


def test_mixed_whitening_uses_each_samples_domain():
    x = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8)
    means = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    stds = torch.tensor([[0.2, 0.2, 0.2], [0.1, 0.3, 0.4]])
    dom = torch.tensor([0, 1, 1, 0, 1, 0])
    w = whiten(x, means, stds, domain=dom)
    for i in range(6):
        assert torch.allclose(w[i], whiten(x[i:i + 1], means[dom[i]], stds[dom[i]])[0], atol=1e-6)


def _match(out, x, pad):
    """Offsets (dy, dx, flipped) of crops of the zero-padded x that equal out."""
    p = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    h, w = x.shape[-2:]
    hits = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = p[:, dy:dy + h, dx:dx + w]
            if torch.equal(crop, out):
                hits.append((dy, dx, False))
            if torch.equal(crop.flip(-1), out):
                hits.append((dy, dx, True))
    return hits


def test_augment_is_a_padded_crop_and_respects_no_flip():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 12, 12, generator=gen) + 3.0
    out = augment(x, pad=4, flip=False, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    for i in range(40):
        hits = _match(out[i], x[i], 4)
        assert hits and all(not f for _, _, f in hits)            # never mirrored
    out = augment(x, pad=4, flip=True, generator=torch.Generator().manual_seed(1))
    flips = [all(f for _, _, f in _match(out[i], x[i], 4)) for i in range(40)]
    assert 8 <= sum(flips) <= 32                                  # about half are mirrored
    offsets = {_match(out[i], x[i], 4)[0][:2] for i in range(40)}
    assert len(offsets) > 10                                      # random positions
    # some padding (zeros = the whitened mean) is visible in shifted crops
    assert (out == 0).any()


def test_augment_per_sample_flip_mask_deterministic_and_paths_agree():
    x = torch.randn(30, 3, 10, 10)
    mask = torch.tensor([True, False] * 15)
    a = augment(x, pad=3, flip=mask, generator=torch.Generator().manual_seed(5))
    b = augment(x, pad=3, flip=mask, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    for i in range(1, 30, 2):     # masked samples never flipped
        assert all(not f for _, _, f in _match(a[i], x[i], 3))
    # the CPU slice path and the accelerator gather path compute the same thing
    g = torch.Generator().manual_seed(5)
    oy = torch.randint(0, 7, (30,), generator=g)
    ox = torch.randint(0, 7, (30,), generator=g)
    coin = (torch.rand(30, generator=g) < 0.5) & mask
    assert torch.equal(a, _crop_flip_gather(x, oy, ox, coin, 3, False))
    cl = augment(x, pad=3, flip=mask, generator=torch.Generator().manual_seed(5), channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, a)
