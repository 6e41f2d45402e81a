"""Glyph-based domains of the built-in benchmark: handwritten digits (real scikit-learn
data), characters of many alphabets (fonts shipped with matplotlib) and house-number-like
colour digits on clutter."""

from __future__ import annotations

import unicodedata
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from . import render as R

SIZE = 64

# --------------------------------------------------------------------------- digits
@lru_cache(maxsize=1)
def _sk_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.float32) / 16.0
    target = d.target.astype(np.int64)
    # a fixed (seed-independent) 80/20 split of the real writers' digits: test images are
    # generated from digits never seen in training
    rng = np.random.default_rng(20170101)
    test = np.zeros(len(target), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(target == c)
        test[rng.permutation(idx)[: len(idx) // 5]] = True
    return images, target, test


def digits(rng: np.random.Generator, n: int, split: str):
    """MNIST-like: the 1,797 real 8x8 handwritten digits of scikit-learn, upsampled into a
    28x28 frame as MNIST does, with stroke-width, affine and elastic jitter; white on black."""
    images, target, test = _sk_digits()
    pool = test if split == "test" else ~test
    labels = R.balanced_labels(rng, n, 10)
    src = np.empty(n, dtype=np.int64)
    for c in range(10):
        cand = np.flatnonzero(pool & (target == c))
        where = np.flatnonzero(labels == c)
        src[where] = rng.choice(cand, size=len(where))
    x = torch.from_numpy(images[src])[:, None]
    x = F.interpolate(x, size=(20, 20), mode="bicubic", align_corners=False).clamp_(0, 1)
    x = F.pad(x, (4, 4, 4, 4))
    x = R.resize(x, SIZE)
    r = rng.integers(-1, 3, n)
    out = x.clone()
    for k in (-1, 1, 2):
        idx = torch.from_numpy(np.flatnonzero(r == k))
        if len(idx):
            out[idx] = R.dilate(x[idx], k) if k > 0 else R.erode(x[idx], -k)
    x = R.affine(out, rng, rot=18, scale=(0.75, 1.1), shear=0.35, shift=0.09, aspect=0.15)
    x = R.elastic(x, rng, alpha=3.5)
    x = x * torch.from_numpy(rng.uniform(0.75, 1.0, (n, 1, 1, 1))).float()
    x = R.add_noise(x, rng, rng.uniform(0.0, 0.06, n))
    return x.clamp(0, 1), labels


DIGIT_CLASSES = [str(i) for i in range(10)]

# --------------------------------------------------------------------------- characters
_CHAR_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf",
               "DejaVuSans-Oblique.ttf", "DejaVuSerif-Italic.ttf")
_ALPHABETS = (
    ("Latin", [*range(0x41, 0x5B)]),
    ("Greek", [*range(0x391, 0x3AA)]),
    ("Cyrillic", [*range(0x410, 0x430)]),
    ("Armenian", [*range(0x531, 0x557)]),
    ("Georgian", [*range(0x10D0, 0x10F1)]),
    ("Hebrew", [*range(0x5D0, 0x5EB)]),
    ("Tifinagh", [*range(0x2D30, 0x2D66)]),
    ("NKo", [*range(0x7CA, 0x7EB)]),
    ("Canadian", [*range(0x1401, 0x1480, 3)]),
    ("Ogham", [*range(0x1681, 0x169B)]),
)
NUM_CHARACTERS = 100


def _render_glyph(ch: str, font_name: str, size: int = SIZE, box: int = 44) -> np.ndarray:
    f = R.font(font_name, 72)
    im = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(im).text((64, 64), ch, fill=255, font=f, anchor="mm")
    bbox = im.getbbox()
    if bbox is None:
        return np.zeros((size, size), np.float32)
    g = im.crop(bbox)
    w, h = g.size
    s = box / max(w, h)
    g = g.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    out = Image.new("L", (size, size), 0)
    out.paste(g, ((size - g.size[0]) // 2, (size - g.size[1]) // 2))
    return np.asarray(out, dtype=np.float32) / 255.0


@lru_cache(maxsize=1)
def character_set():
    """The character classes: ``[(alphabet, char, [covering fonts])]``, interleaved over the
    alphabets, without glyphs that look alike (e.g. Latin A, Greek Alpha, Cyrillic A)."""
    cover = {f: R.font_codepoints(f) for f in _CHAR_FONTS}
    per_alpha = []
    for name, cps in _ALPHABETS:
        chars = []
        for cp in cps:
            fonts = [f for f in _CHAR_FONTS if cp in cover[f]]
            if _CHAR_FONTS[0] in fonts and len(fonts) >= 2 and unicodedata.category(chr(cp))[0] == "L":
                chars.append((name, chr(cp), fonts))
        per_alpha.append(chars)
    order = []
    for i in range(max(len(a) for a in per_alpha)):
        order.extend(a[i] for a in per_alpha if i < len(a))
    chosen, protos = [], []
    for item in order:
        g = _render_glyph(item[1], _CHAR_FONTS[0], 24, 18).reshape(-1)
        g = g - g.mean()
        g = g / (np.linalg.norm(g) + 1e-6)
        if protos and max(float(p @ g) for p in protos) > 0.80:
            continue
        chosen.append(item)
        protos.append(g)
        if len(chosen) == NUM_CHARACTERS:
            break
    return chosen


@lru_cache(maxsize=1)
def _char_prototypes():
    chars = character_set()
    protos = np.zeros((len(chars), len(_CHAR_FONTS), SIZE, SIZE), np.float32)
    for i, (_, ch, fonts) in enumerate(chars):
        for j, f in enumerate(_CHAR_FONTS):
            if f in fonts:
                protos[i, j] = _render_glyph(ch, f)
    return torch.from_numpy(protos)


def character_classes() -> list[str]:
    return [f"{a}:{ch} (U+{ord(ch):04X})" for a, ch, _ in character_set()]


def characters(rng: np.random.Generator, n: int, split: str):
    """Omniglot-like: characters of ten alphabets rendered from DejaVu fonts, with stroke
    width, affine and elastic jitter, binarised; black strokes on white."""
    chars = character_set()
    protos = _char_prototypes()
    labels = R.balanced_labels(rng, n, len(chars))
    font_idx = np.array([rng.choice([_CHAR_FONTS.index(f) for f in chars[c][2]]) for c in labels])
    x = protos[torch.from_numpy(labels), torch.from_numpy(font_idx)][:, None].clone()
    r = rng.integers(-1, 3, n)
    for k in (-1, 1, 2):
        idx = torch.from_numpy(np.flatnonzero(r == k))
        if len(idx):
            x[idx] = R.dilate(x[idx], k) if k > 0 else R.erode(x[idx], -k)
    x = R.affine(x, rng, rot=10, scale=(0.75, 1.05), shear=0.25, shift=0.08, aspect=0.15)
    x = R.elastic(x, rng, alpha=3.0)
    x = (x > 0.5).float()
    x = R.gaussian_blur(x, 0.6)
    return 1.0 - x, labels


# --------------------------------------------------------------------------- house numbers
_HN_FONTS = ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif.ttf",
             "DejaVuSansMono-Bold.ttf", "DejaVuSans-Oblique.ttf", "STIXGeneralBol.ttf",
             "DejaVuSansMono.ttf")


def house_numbers(rng: np.random.Generator, n: int, split: str):
    """SVHN-like: a colour digit in a random font, neighbouring digits at the sides, on a
    cluttered background with uneven light, blur and noise, at 32x32 resolution."""
    labels = R.balanced_labels(rng, n, 10)
    ims = []
    for i in range(n):
        h = rng.random()
        bg_v, fg_v = rng.uniform(0.15, 0.95), 0.0
        fg_v = np.clip(bg_v + rng.choice([-1, 1]) * rng.uniform(0.35, 0.8), 0.05, 1.0)
        bg = R.hsv_to_rgb(h, rng.uniform(0, 0.4), bg_v)
        fg = R.hsv_to_rgb(rng.random() if rng.random() < 0.5 else h, rng.uniform(0, 0.5), fg_v)
        im = Image.new("RGB", (SIZE, SIZE), tuple(int(255 * c) for c in bg))
        d = ImageDraw.Draw(im)
        for _ in range(rng.integers(0, 4)):   # clutter: frames, bricks, edges
            c = R.hsv_to_rgb(rng.random(), rng.uniform(0, 0.4), rng.uniform(0.1, 1.0))
            x0, y0 = rng.integers(-10, SIZE, 2)
            d.rectangle([x0, y0, x0 + rng.integers(4, 40), y0 + rng.integers(2, 40)],
                        outline=None if rng.random() < 0.5 else tuple(int(255 * v) for v in c),
                        fill=tuple(int(255 * v) for v in c) if rng.random() < 0.5 else None)
        fname = _HN_FONTS[rng.integers(len(_HN_FONTS))]
        fsize = int(rng.integers(19, 25)) * 2
        f = R.font(fname, fsize)
        cx, cy = SIZE / 2 + rng.uniform(-3, 3), SIZE / 2 + rng.uniform(-3, 3)
        col = tuple(int(255 * v) for v in fg)
        d.text((cx, cy), str(labels[i]), fill=col, font=f, anchor="mm")
        adv = f.getlength("0") * rng.uniform(1.2, 1.5)
        for side in (-1, 1):
            if rng.random() < 0.4:
                d.text((cx + side * adv, cy + rng.uniform(-2, 2)), str(rng.integers(10)),
                       fill=col, font=f, anchor="mm")
        ims.append(im)
    x = R.pil_stack(ims)
    light = 0.7 + 0.6 * R.smooth_noise(rng, n, 1, SIZE, 3)
    x = x * light
    x = R.affine(x, rng, rot=8, scale=(0.9, 1.1), shear=0.15, shift=0.03,
                 fill=x[:, :, 0, 0].clone(), mode="bilinear")
    x = R.gaussian_blur(x, rng.uniform(0.0, 1.2, n))
    x = R.resize(x, 32)
    x = R.add_noise(x, rng, rng.uniform(0.01, 0.06, n))
    return R.resize(x.clamp(0, 1), SIZE), labels
