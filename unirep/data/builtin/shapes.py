"""Shape-based domains of the built-in benchmark: line sketches of objects, plankton-like
silhouettes, pedestrians vs background, and textured colour objects."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import render as R

SIZE = 64
TAU = 2 * math.pi


# --------------------------------------------------------------------------- sketches
def _arc(cx, cy, rx, ry, a0, a1, n=20):
    t = np.linspace(a0, a1, n)
    return list(zip(cx + rx * np.cos(t), cy + ry * np.sin(t)))


def _circle(cx, cy, r, n=24):
    return _arc(cx, cy, r, r, 0, TAU, n)


def _rect(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]


def _sun(g):
    k = g.integers(6, 11)
    rays = [[(0.42 * math.cos(a), 0.42 * math.sin(a)), (0.75 * math.cos(a), 0.75 * math.sin(a))]
            for a in np.linspace(0, TAU, k, endpoint=False) + g.uniform(0, 1)]
    return [_circle(0, 0, 0.32)] + rays


def _house(g):
    w = g.uniform(0.45, 0.6)
    return [_rect(-w, -0.1, w, 0.7), [(-w - 0.1, -0.1), (0, -0.7), (w + 0.1, -0.1)],
            _rect(-0.12, 0.35, 0.12, 0.7)]


def _tree(g):
    crown = _arc(0, -0.25, 0.5, 0.42, 0, TAU, 16)
    crown = [(x + 0.06 * math.sin(7 * i), y + 0.06 * math.cos(7 * i)) for i, (x, y) in enumerate(crown)]
    return [crown, [(-0.1, 0.15), (-0.1, 0.8)], [(0.1, 0.15), (0.1, 0.8)]]


def _car(g):
    body = [(-0.8, 0.3), (-0.8, 0.0), (-0.45, -0.05), (-0.3, -0.35), (0.3, -0.35), (0.45, -0.05),
            (0.8, 0.0), (0.8, 0.3), (-0.8, 0.3)]
    return [body, _circle(-0.45, 0.35, 0.17), _circle(0.45, 0.35, 0.17)]


def _fish(g):
    return [_arc(-0.1, 0, 0.55, 0.3, 0, TAU, 24), [(0.45, 0), (0.85, -0.3), (0.85, 0.3), (0.45, 0)],
            _circle(-0.38, -0.07, 0.05, 8)]


def _cup(g):
    return [[(-0.45, -0.5), (-0.38, 0.55), (0.38, 0.55), (0.45, -0.5)], [(-0.45, -0.5), (0.45, -0.5)],
            _arc(0.45, 0.0, 0.25, 0.25, -math.pi / 2, math.pi / 2, 12)]


def _star(g):
    pts = []
    for i in range(11):
        a = -math.pi / 2 + i * math.pi / 5
        r = 0.8 if i % 2 == 0 else 0.33
        pts.append((r * math.cos(a), r * math.sin(a)))
    return [pts]


def _ladder(g):
    k = g.integers(4, 7)
    return [[(-0.3, -0.85), (-0.3, 0.85)], [(0.3, -0.85), (0.3, 0.85)]] + \
        [[(-0.3, y), (0.3, y)] for y in np.linspace(-0.65, 0.65, k)]


def _spiral(g):
    t = np.linspace(0, g.uniform(3.5, 5) * math.pi, 50)
    r = 0.8 * t / t[-1]
    return [list(zip(r * np.cos(t), r * np.sin(t)))]


def _umbrella(g):
    top = _arc(0, 0, 0.8, 0.7, math.pi, TAU, 20)
    scallops = []
    for i in range(4):
        scallops += _arc(-0.6 + 0.4 * i, 0, 0.2, 0.12, math.pi, 0, 6)
    return [top, scallops, [(0, 0), (0, 0.7)] + _arc(0.12, 0.7, 0.12, 0.12, math.pi, 0, 6)[1:]]


def _flower(g):
    k = g.integers(5, 8)
    petals = [_arc(0.42 * math.cos(a), -0.3 + 0.42 * math.sin(a), 0.2, 0.2, 0, TAU, 10)
              for a in np.linspace(0, TAU, k, endpoint=False)]
    return [_circle(0, -0.3, 0.18, 12)] + petals + [[(0, 0.3), (0, 0.9)], _arc(0.15, 0.55, 0.15, 0.08, 0, TAU, 8)]


def _key(g):
    return [_circle(-0.5, 0, 0.28), [(-0.22, 0), (0.8, 0)], [(0.5, 0), (0.5, 0.25)], [(0.7, 0), (0.7, 0.2)]]


def _moon(g):
    return [_arc(0, 0, 0.7, 0.7, -2.2, 2.2, 24) + _arc(0.35, 0, 0.5, 0.55, 1.8, -1.8, 20)[1:]]


def _envelope(g):
    return [_rect(-0.8, -0.5, 0.8, 0.5), [(-0.8, -0.5), (0, 0.1), (0.8, -0.5)]]


def _table(g):
    k = g.integers(2, 4)
    legs = [[(x, -0.15), (x, 0.7)] for x in np.linspace(-0.65, 0.65, k)]
    return [_rect(-0.85, -0.3, 0.85, -0.15)] + legs


def _bottle(g):
    return [[(-0.12, -0.85), (-0.12, -0.45), (-0.38, -0.2), (-0.38, 0.85), (0.38, 0.85), (0.38, -0.2),
             (0.12, -0.45), (0.12, -0.85), (-0.12, -0.85)]]


def _face(g):
    return [_circle(0, 0, 0.75, 28), _circle(-0.28, -0.2, 0.08, 8), _circle(0.28, -0.2, 0.08, 8),
            _arc(0, 0.1, 0.38, 0.3, 0.3, math.pi - 0.3, 12)]


def _heart(g):
    t = np.linspace(0, TAU, 32)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return [list(zip(x / 20, y / 20 - 0.1))]


def _cloud(g):
    pts = []
    for i, a in enumerate(np.linspace(math.pi, TAU + math.pi, 6, endpoint=False)):
        pts += _arc(0.55 * math.cos(a), 0.3 * math.sin(a), 0.3, 0.25, a - 1.4, a + 1.4, 8)
    return [pts + [pts[0]]]


def _glasses(g):
    return [_circle(-0.42, 0, 0.3), _circle(0.42, 0, 0.3), _arc(0, 0.02, 0.12, 0.1, math.pi, TAU, 6),
            [(-0.72, 0), (-0.9, -0.2)], [(0.72, 0), (0.9, -0.2)]]


def _lightning(g):
    return [[(0.2, -0.9), (-0.35, 0.05), (0.1, 0.05), (-0.2, 0.9), (0.45, -0.2), (0.0, -0.2), (0.3, -0.9)]]


_SKETCHES = {"sun": _sun, "house": _house, "tree": _tree, "car": _car, "fish": _fish, "cup": _cup,
             "star": _star, "ladder": _ladder, "spiral": _spiral, "umbrella": _umbrella,
             "flower": _flower, "key": _key, "moon": _moon, "envelope": _envelope,
             "table": _table, "bottle": _bottle, "face": _face, "heart": _heart, "cloud": _cloud,
             "glasses": _glasses, "lightning": _lightning}
SKETCH_CLASSES = list(_SKETCHES)


def sketches(rng: np.random.Generator, n: int, split: str):
    """Sketch-like: hand-drawn looking line drawings of 21 everyday objects (wobbly,
    jittered strokes of varying width, random pose and scale); black lines on white."""
    labels = R.balanced_labels(rng, n, len(SKETCH_CLASSES))
    big = 2 * SIZE
    fns = list(_SKETCHES.values())
    ims = []
    for i in range(n):
        strokes = fns[labels[i]](rng)
        a = rng.uniform(-0.6, 0.6)
        s = rng.uniform(0.45, 0.95) * big / 2
        sx, sy = s * math.exp(rng.uniform(-0.2, 0.2)), s * math.exp(rng.uniform(-0.2, 0.2))
        sh = rng.uniform(-0.25, 0.25)
        tx, ty = big / 2 + rng.uniform(-0.12, 0.12) * big, big / 2 + rng.uniform(-0.12, 0.12) * big
        ca, sa = math.cos(a), math.sin(a)
        width = int(rng.integers(2, 6))
        im, d = R.canvas(big, 255)
        wob_f, wob_p = rng.uniform(1, 4, 2), rng.uniform(0, TAU, 2)
        for k, stroke in enumerate(strokes):
            if k > 0 and len(strokes) > 2 and rng.random() < 0.08:   # a detail left out
                continue
            p = np.asarray(stroke, dtype=np.float64)
            p = p + rng.normal(0, 0.05, p.shape) + 0.08 * np.sin(wob_f * p[:, ::-1] * 3 + wob_p)
            x = p[:, 0] + sh * p[:, 1]
            y = p[:, 1]
            px = tx + sx * (ca * x - sa * y)
            py = ty + sy * (sa * x + ca * y)
            d.line(list(zip(px.tolist(), py.tolist())), fill=0, width=width, joint="curve")
        for _ in range(rng.integers(0, 5)):  # stray marks
            x0, y0 = rng.uniform(0, big, 2)
            d.line([(x0, y0), (x0 + rng.uniform(-25, 25), y0 + rng.uniform(-25, 25))], fill=0, width=width)
        ims.append(im)
    x = R.pil_stack(ims, SIZE)
    return x, labels


# --------------------------------------------------------------------------- plankton
_BODIES = {  # name: (harmonics [(k, amplitude)], aspect, segments)
    "round": ([(3, 0.04)], 1.0, 1),
    "oval": ([(2, 0.05)], 1.9, 1),
    "trilobed": ([(3, 0.35)], 1.0, 1),
    "pentalobed": ([(5, 0.3)], 1.0, 1),
    "spiky": ([(9, 0.45)], 1.0, 1),
    "chain": ([(2, 0.03)], 1.1, 3),
}
_DECOR = ("plain", "antennae", "spines", "tail", "hollow")
PLANKTON_CLASSES = [f"{b}-{d}" for b in _BODIES for d in _DECOR]


def plankton(rng: np.random.Generator, n: int, split: str):
    """Plankton-like: grey translucent organisms (6 body plans x 5 appendage/interior
    types = 30 classes) at any orientation and a wide range of scales, dark on a light
    background, blurred and noisy."""
    labels = R.balanced_labels(rng, n, len(PLANKTON_CLASSES))
    big = 2 * SIZE
    bodies = list(_BODIES.values())
    ims = []
    for i in range(n):
        b, dec = divmod(int(labels[i]), len(_DECOR))
        harm, aspect, segs = bodies[b]
        bg = int(rng.integers(215, 256))
        im, d = R.canvas(big, bg)
        body_v = int(rng.integers(30, 150))
        rad = rng.uniform(0.11, 0.24) * big / (1 + 0.5 * (segs > 1))
        rot = rng.uniform(0, TAU)
        asp = aspect * math.exp(rng.uniform(-0.2, 0.2))
        cx, cy = big / 2 + rng.uniform(-0.1, 0.1) * big, big / 2 + rng.uniform(-0.1, 0.1) * big
        phase = rng.uniform(0, TAU, len(harm))
        hj = [(k, a * rng.uniform(0.7, 1.3)) for k, a in harm]
        ux, uy = math.cos(rot), math.sin(rot)
        centres = [(cx + (j - (segs - 1) / 2) * 2.0 * rad * asp * ux,
                    cy + (j - (segs - 1) / 2) * 2.0 * rad * asp * uy) for j in range(segs)]
        lw = max(1, int(rad / 10))
        if dec == 1:      # two long antennae from the front
            for s in (-1, 1):
                a = rot + s * rng.uniform(0.3, 0.7)
                L = rad * rng.uniform(2.0, 3.0)
                fx, fy = centres[-1][0] + rad * asp * ux, centres[-1][1] + rad * asp * uy
                mid = (fx + 0.5 * L * math.cos(a) - s * 0.15 * L * math.sin(a),
                       fy + 0.5 * L * math.sin(a) + s * 0.15 * L * math.cos(a))
                d.line([(fx, fy), mid, (fx + L * math.cos(a), fy + L * math.sin(a))],
                       fill=body_v, width=lw, joint="curve")
        elif dec == 2:    # a ring of short spines
            for c0 in centres:
                for a in np.linspace(0, TAU, int(rng.integers(10, 16)), endpoint=False):
                    L = rad * rng.uniform(1.5, 1.9)
                    d.line([c0, (c0[0] + L * math.cos(a + rot), c0[1] + L * math.sin(a + rot))],
                           fill=body_v, width=lw)
        elif dec == 3:    # a tapering tail at the back
            bx, by = centres[0][0] - rad * asp * ux, centres[0][1] - rad * asp * uy
            L = rad * rng.uniform(1.8, 2.8)
            w = rad * 0.45
            d.polygon([(bx - w * uy, by + w * ux), (bx + w * uy, by - w * ux),
                       (bx - L * ux + rng.uniform(-0.3, 0.3) * L * uy,
                        by - L * uy - rng.uniform(-0.3, 0.3) * L * ux)], fill=body_v)
        for c0 in centres:
            poly = R.radial_polygon(c0[0], c0[1], rad, hj, phase, rot, aspect=asp)
            d.polygon(poly, fill=body_v)
            if dec == 4:  # hollow shell with dark dots inside
                inner = R.radial_polygon(c0[0], c0[1], rad * 0.65, hj, phase, rot, aspect=asp)
                d.polygon(inner, fill=min(255, bg - int(rng.integers(10, 40))))
                for _ in range(int(rng.integers(2, 5))):
                    r0 = rad * 0.3 * rng.random()
                    a0 = rng.uniform(0, TAU)
                    px, py = c0[0] + r0 * math.cos(a0), c0[1] + r0 * math.sin(a0)
                    rr = max(1.5, rad * 0.12)
                    d.ellipse([px - rr, py - rr, px + rr, py + rr], fill=body_v)
            else:          # lighter translucent interior
                inner = R.radial_polygon(c0[0], c0[1], rad * rng.uniform(0.3, 0.6), hj, phase,
                                         rot, aspect=asp)
                d.polygon(inner, fill=min(255, body_v + int(rng.integers(20, 70))))
        ims.append(im)
    x = R.pil_stack(ims, SIZE)
    x = R.gaussian_blur(x, rng.uniform(0.0, 1.2, n))
    x = R.add_noise(x, rng, rng.uniform(0.01, 0.05, n))
    return x.clamp(0, 1), labels


# --------------------------------------------------------------------------- pedestrians
PEDESTRIAN_CLASSES = ["non-pedestrian", "pedestrian"]


def _person(d, rng, W, H, v):
    """A walking person silhouette filling the 1:2 crop (as Daimler's 18x36 crops)."""
    cx = W / 2 + rng.uniform(-0.08, 0.08) * W
    top = H * rng.uniform(0.06, 0.14)
    h = H * rng.uniform(0.78, 0.9)
    head = h * 0.13
    sw = h * rng.uniform(0.1, 0.14)          # half shoulder width
    vt, vl = v, int(np.clip(v + rng.integers(-50, 50), 0, 255))
    d.ellipse([cx - head * 0.45, top, cx + head * 0.45, top + head], fill=vt)
    ty0, ty1 = top + head * 1.05, top + h * 0.55
    d.polygon([(cx - sw, ty0), (cx + sw, ty0), (cx + sw * 0.8, ty1), (cx - sw * 0.8, ty1)], fill=vt)
    stride = rng.uniform(-0.18, 0.18) * h
    lw = max(2, int(sw * 0.7))
    for s in (-1, 1):
        d.line([(cx + s * sw * 0.4, ty1), (cx + s * sw * 0.4 + s * stride * 0.5, top + h * 0.78),
                (cx + s * stride, top + h)], fill=vl, width=lw, joint="curve")
        d.line([(cx + s * sw, ty0 + 2), (cx + s * sw * 1.2 - s * stride * 0.3, top + h * 0.5)],
               fill=vt, width=max(2, lw // 2))


def _clutter(d, rng, W, H, bg):
    for _ in range(rng.integers(2, 7)):
        v = int(np.clip(bg + rng.integers(-90, 90), 0, 255))
        kind = rng.integers(4)
        x0, y0 = rng.uniform(-0.2, 1.0) * W, rng.uniform(-0.2, 1.0) * H
        if kind == 0:    # pole / tree trunk
            w = rng.uniform(0.05, 0.25) * W
            d.rectangle([x0, -1, x0 + w, H + 1], fill=v)
        elif kind == 1:  # box, window, car part
            d.rectangle([x0, y0, x0 + rng.uniform(0.2, 0.8) * W, y0 + rng.uniform(0.1, 0.5) * H], fill=v)
        elif kind == 2:  # blob
            r = rng.uniform(0.1, 0.4) * W
            d.ellipse([x0 - r, y0 - r * rng.uniform(0.5, 2.5), x0 + r, y0 + r], fill=v)
        else:            # edge / kerb
            d.line([(x0, y0), (x0 + rng.uniform(-1, 1) * W, y0 + rng.uniform(-0.3, 0.3) * H)],
                   fill=v, width=int(rng.integers(1, 6)))


def pedestrians(rng: np.random.Generator, n: int, split: str):
    """Daimler-like: 18x36 grey crops of a pedestrian or of street background (poles,
    boxes, blobs; some upright hard negatives), low resolution and noisy, stretched to a
    square like the paper's resize."""
    labels = R.balanced_labels(rng, n, 2)
    W, H = 72, 144
    ims = []
    for i in range(n):
        bg = int(rng.integers(40, 220))
        im, d = R.canvas(W, bg)
        im = Image.new("L", (W, H), bg)
        d = ImageDraw.Draw(im)
        _clutter(d, rng, W, H, bg)
        v = int(np.clip(bg + rng.choice([-1, 1]) * rng.integers(25, 110), 0, 255))
        if labels[i] == 1:
            _person(d, rng, W, H, v)
        elif rng.random() < 0.5:  # hard negative: upright object of a person's size
            cx, w = W / 2 + rng.uniform(-0.1, 0.1) * W, rng.uniform(0.1, 0.25) * W
            t, b = H * rng.uniform(0.05, 0.3), H * rng.uniform(0.85, 1.0)
            d.rectangle([cx - w, t, cx + w, b], fill=v)
            if rng.random() < 0.5:
                r = rng.uniform(0.8, 1.6) * w
                d.ellipse([cx - r, t - 1.6 * r, cx + r, t + 0.2 * r], fill=v)
        for _ in range(rng.integers(0, 3)):   # occluders in front
            _clutter(d, rng, W, H, bg) if rng.random() < 0.3 else None
        ims.append(im)
    x = R.pil_stack(ims, (36, 18))
    x = x * torch.from_numpy(rng.uniform(0.5, 1.2, (n, 1, 1, 1))).float()
    x = R.add_noise(x, rng, rng.uniform(0.02, 0.08, n))
    return R.resize(x.clamp(0, 1), SIZE), labels


# --------------------------------------------------------------------------- textured objects
_TEX_SHAPES = {"round": ([(3, 0.03)], 1.0), "long": ([(2, 0.05)], 1.8),
               "star": ([(5, 0.38)], 1.0), "square": ([(4, 0.14)], 1.0)}
_TEX_CLASSES = [("round", "stripes"), ("round", "spots"), ("round", "plain"), ("long", "stripes"),
                ("long", "checks"), ("long", "plain"), ("star", "spots"), ("star", "checks"),
                ("square", "stripes"), ("square", "spots")]
TEXTURE_CLASSES = [f"{t}-{s}" for s, t in _TEX_CLASSES]


_TEX_KINDS = ("stripes", "checks", "spots", "plain")


def _textures(rng, kinds: np.ndarray, size: int) -> torch.Tensor:
    """Binary surface patterns [N, 1, size, size]; ``kinds`` indexes :data:`_TEX_KINDS`."""
    n = len(kinds)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32),
                            torch.arange(size, dtype=torch.float32), indexing="ij")
    a = torch.from_numpy(rng.uniform(0, math.pi, n)).float()[:, None, None]
    period = torch.from_numpy(rng.uniform(7, 13, n)).float()[:, None, None]
    phase = torch.from_numpy(rng.uniform(0, TAU, n)).float()[:, None, None]
    spot = torch.from_numpy(rng.uniform(0.25, 0.35, n)).float()[:, None, None]
    ramp = torch.from_numpy(rng.uniform(-1, 1, n)).float()[:, None, None]
    u = xs * torch.cos(a) + ys * torch.sin(a)
    v = -xs * torch.sin(a) + ys * torch.cos(a)
    stripes = (torch.sin(TAU * u / period + phase) > 0).float()
    checks = ((torch.sin(TAU * u / period) * torch.sin(TAU * v / period)) > 0).float()
    cu, cv = torch.remainder(u, period) - period / 2, torch.remainder(v, period) - period / 2
    spots = ((cu * cu + cv * cv) < (period * spot) ** 2).float()
    plain = (0.5 + 0.5 * (xs / size - 0.5) * ramp).expand(n, size, size)
    k = torch.from_numpy(np.asarray(kinds))[:, None, None]
    out = torch.where(k == 0, stripes, torch.where(k == 1, checks, torch.where(k == 2, spots, plain)))
    return out[:, None]


def _colours(rng, n, s_range, v_range) -> torch.Tensor:
    c = R.hsv_to_rgb(rng.random(n), rng.uniform(*s_range, n), rng.uniform(*v_range, n))
    return torch.from_numpy(c).float()[:, :, None, None]


def textures(rng: np.random.Generator, n: int, split: str):
    """CIFAR-like: colour objects whose class is the combination of a silhouette and a
    surface texture (colours random, so they carry no label), on cluttered colour
    backgrounds that hold textured distractors, at 32x32 resolution."""
    labels = R.balanced_labels(rng, n, len(_TEX_CLASSES))
    big = SIZE
    masks, patches = [], []
    for i in range(n):
        shape, _ = _TEX_CLASSES[labels[i]]
        harm, aspect = _TEX_SHAPES[shape]
        m, d = R.canvas(big, 0)
        if rng.random() < 0.6:   # a textured distractor patch in the background
            x0, y0 = rng.uniform(-10, big - 10, 2)
            d.rectangle([x0, y0, x0 + rng.uniform(10, 30), y0 + rng.uniform(10, 30)], fill=255)
        patches.append(m)
        m, d = R.canvas(big, 0)
        rad = rng.uniform(0.22, 0.36) * big
        hj = [(k, a * rng.uniform(0.7, 1.3)) for k, a in harm]
        poly = R.radial_polygon(big / 2 + rng.uniform(-6, 6), big / 2 + rng.uniform(-6, 6), rad, hj,
                                rng.uniform(0, TAU, len(hj)), rng.uniform(0, TAU),
                                aspect=aspect * math.exp(rng.uniform(-0.15, 0.15)))
        d.polygon(poly, fill=255)
        masks.append(m)
    mask, patch = R.pil_stack(masks), R.pil_stack(patches)
    noise = R.smooth_noise(rng, n, 1, big, 4)
    img = _colours(rng, n, (0, 0.7), (0.2, 1)) * noise + _colours(rng, n, (0, 0.7), (0.2, 1)) * (1 - noise)
    pt = patch * _textures(rng, rng.integers(0, 3, n), big)
    img = img * (1 - pt) + _colours(rng, n, (0.2, 1), (0.2, 1)) * pt
    kinds = np.array([_TEX_KINDS.index(_TEX_CLASSES[c][1]) for c in labels])
    t = _textures(rng, kinds, big)
    c1, c2 = _colours(rng, n, (0.3, 1), (0.3, 1)), _colours(rng, n, (0, 1), (0, 1))
    plain = torch.from_numpy(kinds == 3)[:, None, None, None]
    obj = torch.where(plain, c1 * t * 1.4, c1 * t + c2 * (1 - t))
    x = img * (1 - mask) + obj * mask
    x = R.resize(x, 32)
    x = R.add_noise(x, rng, rng.uniform(0.01, 0.05, n))
    return R.resize(x.clamp(0, 1), SIZE), labels
