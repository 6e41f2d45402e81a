"""Batched rendering helpers for the built-in benchmark (numpy random numbers, torch ops;
deterministic for a numpy ``Generator``)."""

from __future__ import annotations

import math
import os
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont


def font_path(name: str) -> str:
    """Path of a TrueType font shipped with matplotlib (DejaVu, STIX)."""
    import matplotlib

    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: font not found (is matplotlib installed completely?)")
    return path


@lru_cache(maxsize=64)
def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(font_path(name), size)


@lru_cache(maxsize=16)
def font_codepoints(name: str) -> frozenset:
    from fontTools.ttLib import TTFont

    return frozenset(TTFont(font_path(name), lazy=True).getBestCmap())


def balanced_labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    """``n`` labels, every class (nearly) equally often, in random order."""
    labels = np.arange(n) % num_classes
    return rng.permutation(labels).astype(np.int64)


def affine(x: torch.Tensor, rng: np.random.Generator, rot: float = 0.0, scale=(1.0, 1.0),
           shear: float = 0.0, shift: float = 0.0, aspect: float = 0.0,
           fill: float | torch.Tensor = 0.0, mode: str = "bilinear") -> torch.Tensor:
    """Random affine warp of every image of ``x`` [N, C, H, W] (float).

    ``rot`` in degrees (uniform in [-rot, rot]); ``scale`` the range of the object's scale;
    ``shear`` the range of the shear factor; ``shift`` the range of the translation as a
    fraction of the side; ``aspect`` the range of log aspect-ratio change.  Pixels coming
    from outside are ``fill``."""
    n = x.shape[0]
    a = np.deg2rad(rng.uniform(-rot, rot, n))
    s = rng.uniform(scale[0], scale[1], n)
    ar = np.exp(rng.uniform(-aspect, aspect, n))
    sh = rng.uniform(-shear, shear, n)
    t = rng.uniform(-shift, shift, (n, 2)) * 2.0
    # forward map: object -> image = R * Sh * S; grid_sample needs the inverse
    theta = np.zeros((n, 2, 3))
    for i in range(n):
        c, si = math.cos(a[i]), math.sin(a[i])
        fwd = np.array([[c, -si], [si, c]]) @ np.array([[1.0, sh[i]], [0.0, 1.0]]) \
            @ np.diag([s[i] * ar[i], s[i] / ar[i]])
        inv = np.linalg.inv(fwd)
        theta[i, :, :2] = inv
        theta[i, :, 2] = -inv @ t[i]
    grid = F.affine_grid(torch.from_numpy(theta).float(), list(x.shape), align_corners=False)
    fill_t = torch.as_tensor(fill, dtype=x.dtype)
    if fill_t.dim() == 1:
        fill_t = fill_t[:, None, None]
    elif fill_t.dim() == 2:   # per-sample, per-channel
        fill_t = fill_t[:, :, None, None]
    out = F.grid_sample(x - fill_t, grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out + fill_t


def elastic(x: torch.Tensor, rng: np.random.Generator, alpha: float, grid: int = 4) -> torch.Tensor:
    """Smooth random displacement (amplitude ``alpha`` in pixels) of every image."""
    n, _, h, w = x.shape
    d = torch.from_numpy(rng.normal(0.0, 1.0, (n, 2, grid, grid))).float()
    d = F.interpolate(d, size=(h, w), mode="bicubic", align_corners=True) * (2.0 * alpha / h)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    base = torch.stack([xs, ys], dim=-1)[None]
    g = base + d.permute(0, 2, 3, 1)
    return F.grid_sample(x, g, mode="bilinear", padding_mode="border", align_corners=True)


def smooth_noise(rng: np.random.Generator, n: int, c: int, size: int, cells: int) -> torch.Tensor:
    """Low-frequency noise in [0, 1]: a ``cells x cells`` random grid upsampled (bicubic)."""
    g = torch.from_numpy(rng.random((n, c, cells, cells))).float()
    return F.interpolate(g, size=(size, size), mode="bicubic", align_corners=False).clamp_(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: np.ndarray | float) -> torch.Tensor:
    """Blur each image with its own sigma (pixels); sigma <= 0.1 leaves it unchanged."""
    n, c, h, w = x.shape
    sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (n,))
    out = x.clone()
    # group samples by rounded sigma so each group needs one convolution
    keys = np.round(sig * 4) / 4
    for s in np.unique(keys):
        if s <= 0.1:
            continue
        idx = torch.from_numpy(np.flatnonzero(keys == s))
        r = max(1, int(math.ceil(3 * s)))
        k = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float32) ** 2) / (2 * s * s))
        k = (k / k.sum()).to(x.dtype)
        part = x[idx].reshape(-1, 1, h, w)
        part = F.conv2d(F.pad(part, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        part = F.conv2d(F.pad(part, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
        out[idx] = part.reshape(-1, c, h, w)
    return out


def dilate(x: torch.Tensor, r: int) -> torch.Tensor:
    return F.max_pool2d(x, 2 * r + 1, stride=1, padding=r) if r > 0 else x


def erode(x: torch.Tensor, r: int) -> torch.Tensor:
    return -F.max_pool2d(-x, 2 * r + 1, stride=1, padding=r) if r > 0 else x


def resize(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    size = (size, size) if isinstance(size, int) else size
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8 with rounding."""
    return (x.clamp(0, 1) * 255.0).round_().to(torch.uint8)


def add_noise(x: torch.Tensor, rng: np.random.Generator, sigma) -> torch.Tensor:
    """Add Gaussian pixel noise with per-sample standard deviation ``sigma``."""
    n = x.shape[0]
    s = torch.from_numpy(np.broadcast_to(np.asarray(sigma, dtype=np.float32), (n,)).copy())
    noise = torch.from_numpy(rng.standard_normal(x.shape, dtype=np.float32))
    return x + noise * s[:, None, None, None]


def hsv_to_rgb(h, s, v) -> np.ndarray:
    """Vectorised HSV (all in [0, 1]) -> RGB in [0, 1], shape [..., 3]."""
    h, s, v = np.broadcast_arrays(np.asarray(h, float), np.asarray(s, float), np.asarray(v, float))
    i = np.floor(h * 6.0).astype(int) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([np.stack(c, -1) for c in
                      ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], 0)
    return np.take_along_axis(table, i[None, ..., None].repeat(3, -1), 0)[0]


def canvas(size: int, value: int = 0, mode: str = "L") -> tuple[Image.Image, ImageDraw.ImageDraw]:
    im = Image.new(mode, (size, size), value)
    return im, ImageDraw.Draw(im)


def pil_stack(images, out_size: int | None = None) -> torch.Tensor:
    """PIL images ('L' or 'RGB') -> float tensor [N, C, H, W] in [0, 1], optionally
    downsampled (antialiased) to ``out_size``."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    t = torch.from_numpy(arr)
    t = t[:, None] if t.dim() == 3 else t.permute(0, 3, 1, 2)
    t = t.float().div_(255.0)
    if out_size is not None:
        t = resize(t, out_size)
    return t


def radial_polygon(cx, cy, radius, harmonics, phase, rot, n=48, aspect=1.0):
    """Closed polygon r(theta) = radius * (1 + sum_k a_k cos(k theta + phi_k)), rotated."""
    th = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones_like(th)
    for (k, a), ph in zip(harmonics, phase):
        r += a * np.cos(k * th + ph)
    r = radius * np.clip(r, 0.15, None)
    px, py = r * np.cos(th) * aspect, r * np.sin(th) / aspect
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + c * a - s * b, cy + s * a + c * b) for a, b in zip(px, py)]
