"""Traffic-sign-like pictograms under varying light (GTSRB-like, 43 classes)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import render as R

SIZE = 64
RED, BLUE, WHITE, BLACK, YELLOW, GREY = ((200, 20, 30), (20, 60, 170), (245, 245, 245),
                                         (15, 15, 15), (250, 200, 0), (120, 120, 120))

# Symbols are lists of drawing ops in unit coordinates (-1..1 inside the sign).
_STICK = [("circle", 0, -0.55, 0.13), ("line", [(0, -0.4), (0, 0.15)], 0.1),
          ("line", [(-0.3, 0.6), (0, 0.15), (0.3, 0.6)], 0.1), ("line", [(-0.3, -0.05), (0, -0.3), (0.3, -0.05)], 0.08)]
_CHILDREN = [("circle", -0.3, -0.5, 0.11), ("line", [(-0.3, -0.38), (-0.3, 0.1)], 0.09),
             ("line", [(-0.5, 0.55), (-0.3, 0.1), (-0.1, 0.55)], 0.09),
             ("circle", 0.3, -0.3, 0.09), ("line", [(0.3, -0.2), (0.3, 0.2)], 0.08),
             ("line", [(0.15, 0.55), (0.3, 0.2), (0.45, 0.55)], 0.08)]
_BIKE = [("ring", -0.4, 0.25, 0.28), ("ring", 0.4, 0.25, 0.28),
         ("line", [(-0.4, 0.25), (-0.1, -0.25), (0.3, -0.25), (0.4, 0.25)], 0.07),
         ("line", [(-0.1, -0.25), (0.05, 0.25), (0.3, -0.25)], 0.07)]
_CARS = [("rect", -0.65, -0.25, -0.08, 0.35, RED), ("rect", 0.08, -0.25, 0.65, 0.35, BLACK)]
_TRUCK = [("rect", -0.65, -0.3, 0.35, 0.3, BLACK), ("rect", 0.35, -0.1, 0.65, 0.3, BLACK)]
_CARS_TRUCK = [("rect", -0.65, -0.3, -0.08, 0.3, RED), ("rect", 0.08, -0.3, 0.6, 0.3, BLACK)]
_DIAG = [("line", [(0.7, -0.7), (-0.7, 0.7)], 0.12, GREY)]


def _speed(v):
    return [("text", str(v))]


_CLASSES = (
    [(f"speed limit {v}", "ring_red", _speed(v)) for v in (20, 30, 50, 60, 70, 80, 100, 120)]
    + [("end of speed limit 80", "ring_grey", _speed(80) + _DIAG),
       ("no passing", "ring_red", _CARS), ("no passing for trucks", "ring_red", _CARS_TRUCK),
       ("no vehicles", "ring_red", []), ("no trucks", "ring_red", _TRUCK),
       ("no entry", "disc_red", [("rect", -0.7, -0.18, 0.7, 0.18, WHITE)]),
       ("general caution", "tri_red", [("line", [(0, -0.25), (0, 0.25)], 0.14), ("circle", 0, 0.45, 0.08)]),
       ("dangerous curve", "tri_red", [("line", [(-0.1, 0.6), (-0.1, 0.0), (0.25, -0.3)], 0.12)]),
       ("double curve", "tri_red", [("line", [(0.0, 0.6), (-0.2, 0.3), (0.2, 0.0), (-0.2, -0.3)], 0.12)]),
       ("bumpy road", "tri_red", [("line", [(-0.5, 0.5), (-0.3, 0.2), (-0.1, 0.5), (0.1, 0.2), (0.3, 0.5), (0.5, 0.5)], 0.1)]),
       ("slippery road", "tri_red", [("rect", -0.25, -0.15, 0.25, 0.15, BLACK),
                                     ("line", [(-0.4, 0.55), (-0.15, 0.3), (0.1, 0.55), (0.35, 0.3)], 0.07)]),
       ("road narrows", "tri_red", [("line", [(-0.3, 0.6), (-0.3, 0.1), (-0.1, -0.2), (-0.1, -0.5)], 0.09),
                                    ("line", [(0.3, 0.6), (0.3, -0.5)], 0.09)]),
       ("road work", "tri_red", _STICK[:3] + [("rect", -0.5, 0.45, 0.5, 0.6, BLACK)]),
       ("traffic signals", "tri_red", [("circle", 0, -0.3, 0.1, RED), ("circle", 0, 0.0, 0.1, YELLOW),
                                       ("circle", 0, 0.3, 0.1, (20, 160, 40))]),
       ("pedestrians", "tri_red", _STICK), ("children crossing", "tri_red", _CHILDREN),
       ("bicycles crossing", "tri_red", _BIKE),
       ("snow", "tri_red", [("line", [(-0.4 * math.cos(a), -0.4 * math.sin(a) + 0.1), (0.4 * math.cos(a), 0.4 * math.sin(a) + 0.1)], 0.07)
                            for a in (0, math.pi / 3, 2 * math.pi / 3)]),
       ("wild animals", "tri_red", [("ellipse", 0, 0.1, 0.35, 0.18), ("line", [(-0.2, 0.2), (-0.25, 0.55)], 0.07),
                                    ("line", [(0.2, 0.2), (0.25, 0.55)], 0.07), ("line", [(0.3, 0.0), (0.4, -0.4)], 0.09)]),
       ("crossroads", "tri_red", [("line", [(0, -0.5), (0, 0.6)], 0.12), ("line", [(-0.45, 0.1), (0.45, 0.1)], 0.1)]),
       ("priority road", "diamond", []), ("yield", "tri_inv", []), ("stop", "octagon", [("text", "STOP")]),
       ("ahead only", "disc_blue", [("arrow", 0.0)]), ("go back", "disc_blue", [("arrow", math.pi)]),
       ("ahead or back", "disc_blue", [("arrow", 0.0), ("arrow", math.pi)]),
       ("left or right", "disc_blue", [("line", [(0, 0.6), (0, -0.1)], 0.14), ("arrow", -math.pi / 2, 0.0, -0.1, 0.5),
                                       ("arrow", math.pi / 2, 0.0, -0.1, 0.5)]),
       ("roundabout", "disc_blue", [("ring", 0, 0, 0.42, WHITE), ("arrow", -math.pi / 2, -0.05, -0.42, 0.25)]),
       ("bicycle path", "disc_blue", _BIKE),
       ("pedestrian path", "disc_blue", _STICK),
       ("two lanes", "disc_blue", [("rect", -0.4, -0.6, -0.2, 0.6, WHITE), ("rect", 0.2, -0.6, 0.4, 0.6, WHITE)]),
       ("minimum speed 30", "disc_blue", [("text", "30")]),
       ("end of restrictions", "ring_grey", [("line", [(0.7 - 0.25 * k, -0.7 - 0.25 * k), (-0.7 - 0.25 * k, 0.7 - 0.25 * k)], 0.05, GREY) for k in range(-2, 3)]),
       ("end of no passing", "ring_grey", [("rect", -0.65, -0.25, -0.08, 0.35, GREY), ("rect", 0.08, -0.25, 0.65, 0.35, GREY)] + _DIAG),
       ("end of no passing for trucks", "ring_grey", [("rect", -0.65, -0.3, -0.08, 0.3, GREY), ("rect", 0.08, -0.3, 0.6, 0.3, GREY)] + _DIAG)]
)
SIGN_CLASSES = [c[0] for c in _CLASSES]
assert len(SIGN_CLASSES) == 43, len(SIGN_CLASSES)


def _draw_sign(d: ImageDraw.ImageDraw, style: str, symbol, cx, cy, r, rng):
    def P(x, y):
        return (cx + x * r, cy + y * r)

    ink = WHITE if style in ("disc_blue",) else BLACK
    if style in ("ring_red", "ring_grey"):
        ring = RED if style == "ring_red" else GREY
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=ring if style == "ring_red" else WHITE,
                  outline=ring, width=max(1, int(r * 0.06)))
        if style == "ring_red":
            d.ellipse([cx - 0.78 * r, cy - 0.78 * r, cx + 0.78 * r, cy + 0.78 * r], fill=WHITE)
        inner = 0.7
    elif style in ("disc_red", "disc_blue"):
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=RED if style == "disc_red" else BLUE,
                  outline=WHITE, width=max(1, int(r * 0.05)))
        inner = 0.75
    elif style in ("tri_red", "tri_inv"):
        s = 1 if style == "tri_red" else -1
        pts = [P(0, -0.95 * s), P(1.0, 0.8 * s), P(-1.0, 0.8 * s)]
        d.polygon(pts, fill=RED)
        c2 = (0, 0.22 * s)
        d.polygon([P(c2[0] + (x - cx) / r * 0.68, c2[1] + (y - cy) / r * 0.68) for x, y in pts], fill=WHITE)
        inner = 0.55
    elif style == "diamond":
        d.polygon([P(0, -1), P(1, 0), P(0, 1), P(-1, 0)], fill=WHITE)
        d.polygon([P(0, -0.7), P(0.7, 0), P(0, 0.7), P(-0.7, 0)], fill=YELLOW)
        inner = 0.5
    else:  # octagon
        d.polygon([P(math.cos(a), math.sin(a)) for a in np.arange(8) * math.pi / 4 + math.pi / 8], fill=RED)
        ink, inner = WHITE, 0.8
    ir = inner * r
    oy = 0.2 * r if style == "tri_red" else (-0.2 * r if style == "tri_inv" else 0)

    def Q(x, y):
        return (cx + x * ir, cy + oy + y * ir)

    for op in symbol:
        kind = op[0]
        if kind == "text":
            size = int(ir * (1.2 if len(op[1]) <= 2 else 0.95 if len(op[1]) == 3 else 0.62))
            f = R.font("DejaVuSans-Bold.ttf", max(6, size - size % 2))
            d.text(Q(0, 0.02), op[1], fill=ink, font=f, anchor="mm")
        elif kind == "line":
            col = op[3] if len(op) > 3 else ink
            d.line([Q(x, y) for x, y in op[1]], fill=col, width=max(1, int(op[2] * ir)), joint="curve")
        elif kind in ("circle", "ring", "ellipse"):
            if kind == "ellipse":
                x, y, rx, ry = op[1:5]
            else:
                x, y, rx = op[1:4]
                ry = rx
            col = op[4] if len(op) > 4 and kind != "ellipse" else ink
            box = [Q(x - rx, y - ry), Q(x + rx, y + ry)]
            box = [box[0][0], box[0][1], box[1][0], box[1][1]]
            if kind == "ring":
                d.ellipse(box, outline=col, width=max(1, int(0.08 * ir)))
            else:
                d.ellipse(box, fill=col)
        elif kind == "rect":
            col = op[5] if op[5] in (RED, GREY, WHITE) or ink == BLACK else ink
            a, b = Q(op[1], op[2]), Q(op[3], op[4])
            d.rectangle([a[0], a[1], b[0], b[1]], fill=col)
        elif kind == "arrow":
            ang = op[1]
            x0, y0, L = (op[2], op[3], op[4]) if len(op) > 2 else (0.0, 0.0, 0.75)
            ux, uy = math.sin(ang), -math.cos(ang)
            tip = (x0 + ux * L, y0 + uy * L)
            base = (x0 - ux * L * (0.9 if len(op) <= 2 else 0.0), y0 - uy * L * (0.9 if len(op) <= 2 else 0.0))
            d.line([Q(*base), Q(*tip)], fill=ink, width=max(1, int(0.16 * ir)))
            hx, hy = -uy, ux
            d.polygon([Q(tip[0] + ux * 0.25, tip[1] + uy * 0.25), Q(tip[0] + hx * 0.3, tip[1] + hy * 0.3),
                       Q(tip[0] - hx * 0.3, tip[1] - hy * 0.3)], fill=ink)


def traffic_signs(rng: np.random.Generator, n: int, split: str):
    """GTSRB-like: 43 colour pictogram signs (red rings, warning triangles, blue
    mandatory discs, stop, yield, priority) at varying size and position on outdoor
    backgrounds, under strongly varying light (dark to over-exposed, colour casts), blur,
    low resolution and noise."""
    labels = R.balanced_labels(rng, n, len(_CLASSES))
    big = 2 * SIZE
    ims = []
    for i in range(n):
        _, style, symbol = _CLASSES[labels[i]]
        top = R.hsv_to_rgb(rng.uniform(0.1, 0.7), rng.uniform(0, 0.35), rng.uniform(0.3, 1.0))
        bot = R.hsv_to_rgb(rng.uniform(0.1, 0.45), rng.uniform(0.1, 0.45), rng.uniform(0.1, 0.7))
        im = Image.new("RGB", (big, big))
        d = ImageDraw.Draw(im)
        horizon = int(rng.integers(0, big))
        d.rectangle([0, 0, big, horizon], fill=tuple(int(255 * c) for c in top))
        d.rectangle([0, horizon, big, big], fill=tuple(int(255 * c) for c in bot))
        for _ in range(rng.integers(0, 4)):   # poles, leaves, other signs' edges
            c = tuple(int(255 * v) for v in R.hsv_to_rgb(rng.random(), rng.uniform(0, 0.4), rng.uniform(0.1, 0.9)))
            x0, y0 = rng.uniform(0, big, 2)
            d.ellipse([x0, y0, x0 + rng.uniform(5, 40), y0 + rng.uniform(5, 40)], fill=c)
        r = rng.uniform(0.34, 0.46) * big
        cx, cy = big / 2 + rng.uniform(-0.08, 0.08) * big, big / 2 + rng.uniform(-0.08, 0.08) * big
        if rng.random() < 0.5:
            d.rectangle([cx - 0.06 * r, cy, cx + 0.06 * r, big], fill=GREY)
        _draw_sign(d, style, symbol, cx, cy, r, rng)
        ims.append(im)
    x = R.pil_stack(ims, SIZE)
    x = R.affine(x, rng, rot=10, scale=(0.9, 1.05), shear=0.15, aspect=0.15,
                 fill=x[:, :, 0, 0].clone())
    # light: exposure, gamma, colour cast, contrast
    gain = torch.from_numpy(np.exp(rng.uniform(-1.0, 0.4, (n, 1, 1, 1)))).float()
    cast = torch.from_numpy(rng.uniform(0.75, 1.25, (n, 3, 1, 1))).float()
    gamma = torch.from_numpy(rng.uniform(0.6, 1.6, (n, 1, 1, 1))).float()
    x = (x.clamp(0, 1) ** gamma) * gain * cast
    x = x + torch.from_numpy(rng.uniform(-0.05, 0.2, (n, 1, 1, 1))).float()  # haze
    x = R.gaussian_blur(x, rng.uniform(0, 1.5, n))
    # low resolution: GTSRB signs are from 15 to 222 pixels wide
    res = rng.choice([24, 32, 48, 64], n, p=[0.1, 0.3, 0.3, 0.3])
    for s in (24, 32, 48):
        idx = torch.from_numpy(np.flatnonzero(res == s))
        if len(idx):
            x[idx] = R.resize(R.resize(x[idx], int(s)), SIZE)
    x = R.add_noise(x, rng, rng.uniform(0.005, 0.04, n))
    return x.clamp(0, 1), labels
