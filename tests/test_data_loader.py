"""Batches on the device in the forms the kernels accept."""

from __future__ import annotations

import pytest
import torch

from unirep.data import BatchLoader, DomainDataset, MultiDomainData, whiten


def _domain(name, n, classes, kind, seed, size=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % classes
    # tag every image with its index so batches can be traced back to samples
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return DomainDataset(name, [f"c{i}" for i in range(classes)], (x, y), (x[: n // 2], y[: n // 2]),
                         kind=kind)


@pytest.fixture()
def data():
    return MultiDomainData([_domain("digits", 30, 10, "digits", 0), _domain("signs", 45, 3, "signs", 1),
                            _domain("pets", 20, 2, "objects", 2)])


def test_pure_batches(data):
    loader = data.loader(8, num_steps=9, augment=False, seed=0)
    assert len(loader) == 9
    for step, (x, y, d) in enumerate(loader):
        assert isinstance(d, int) and d == step % 3
        assert x.dtype == torch.float32 and x.shape == (8, 3, 16, 16)
        assert y.dtype == torch.int64 and y.shape == (8,)
        ds = data[d]
        idx = loader.sampler.batch(step)[1]
        assert torch.equal(y, ds.train[1][idx])
        assert torch.allclose(x, whiten(ds.train[0][idx], ds.mean, ds.std))


def test_mixed_batches(data):
    loader = data.loader(12, mode="mixed", shares=[1, 2, 1], num_steps=4, augment=False)
    for step, (x, y, d) in enumerate(loader):
        assert isinstance(d, torch.Tensor) and d.dtype == torch.int64 and d.shape == (12,)
        assert torch.bincount(d, minlength=3).tolist() == [3, 6, 3]
        doms, idx = loader.sampler.batch(step)
        for i in range(12):
            ds = data[int(d[i])]
            assert int(y[i]) == int(ds.train[1][idx[i]])
            assert torch.allclose(x[i], whiten(ds.train[0][idx[i]:idx[i] + 1], ds.mean, ds.std)[0])


def test_augmented_batches_deterministic_and_no_flip_for_digits(data):
    a = [b for b in data.loader(10, num_steps=6, seed=3)]
    b = [b for b in data.loader(10, num_steps=6, seed=3)]
    c = [b for b in data.loader(10, num_steps=6, seed=4)]
    assert all(torch.equal(u[0], v[0]) and torch.equal(u[1], v[1]) for u, v in zip(a, b))
    assert not all(torch.equal(u[0], v[0]) for u, v in zip(a, c))
    resumed = list(data.loader(10, start_step=3, num_steps=3, seed=3))
    assert all(torch.equal(u[0], v[0]) for u, v in zip(a[3:], resumed))
    # digit images are never mirrored, other domains sometimes are
    flipped = {0: 0, 1: 0, 2: 0}
    loader = data.loader(30, mode="mixed", seed=0, num_steps=3)
    for step, (x, _, d) in enumerate(loader):
        _, idx = loader.sampler.batch(step)
        for i in range(30):
            ds = data[int(d[i])]
            src = whiten(ds.train[0][idx[i]:idx[i] + 1], ds.mean, ds.std)[0]
            hits = _crop_matches(x[i], src, 8)
            assert hits, "not a crop of the padded image"
            flipped[int(d[i])] += all(f for f in hits)
    assert flipped[0] == 0 and flipped[1] > 0 and flipped[2] > 0


def _crop_matches(out, x, pad):
    p = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    h, w = x.shape[-2:]
    hits = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = p[:, dy:dy + h, dx:dx + w]
            if torch.equal(crop, out):
                hits.append(False)
            if torch.equal(crop.flip(-1), out):
                hits.append(True)
    return hits


def test_eval_batches_cover_the_test_split(data):
    seen = []
    for x, y, d in data.eval_batches("signs", 7):
        assert d == 1 and x.shape[1:] == (3, 16, 16)
        seen.append(y)
    ds = data["signs"]
    assert torch.equal(torch.cat(seen), ds.test[1])


def test_channels_last_and_dtype(data):
    x, _, _ = data.loader(4, channels_last=True, dtype=torch.bfloat16).get(0)
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)


def test_bad_inputs(data):
    with pytest.raises(ValueError, match="mode"):
        data.loader(4, mode="shuffled")
    with pytest.raises(ValueError, match="cannot hold all 3"):
        data.loader(2, mode="mixed")
    with pytest.raises(ValueError, match="labels must lie in"):
        DomainDataset("x", ["a"], (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1])),
                      (torch.zeros(0, 3, 4, 4, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)))
    with pytest.raises(ValueError, match="same image size"):
        MultiDomainData([_domain("a", 4, 2, "objects", 0, 8), _domain("b", 4, 2, "objects", 0, 16)])
    with pytest.raises(KeyError, match="no domain named"):
        data["nope"]
