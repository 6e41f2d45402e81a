"""Draw the sample-image grid of docs/data.md: a row per built-in domain, the first
training image of each of its first classes, as the trainer sees them before whitening
(64x64, grey domains repeated on three channels).

    python docs/make_samples.py [--out docs/images/builtin-samples.png] [--per-domain 10]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def sample_grid(per_domain: int = 10, image_size: int = 64, root=None):
    """``(names, class names, images)``: for every built-in domain, up to ``per_domain``
    training images of distinct classes (the first image of each of its first classes),
    uint8 ``[H, W, 3]``."""
    from unirep.data import builtin_benchmark
    data = builtin_benchmark(root, image_size=image_size)
    names, labels, images = [], [], []
    for ds in data:
        x, y = ds.split("train")
        row_img, row_lab = [], []
        for k in range(min(per_domain, ds.num_classes)):
            hits = (y == k).nonzero().flatten()
            if hits.numel():
                row_img.append(x[int(hits[0])].permute(1, 2, 0).numpy())
                row_lab.append(ds.classes[k])
        names.append(ds.name)
        labels.append(row_lab)
        images.append(row_img)
    return names, labels, images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).with_name("images") / "builtin-samples.png"))
    ap.add_argument("--per-domain", type=int, default=10, help="images (classes) per domain")
    ap.add_argument("--root", default=None, help="benchmark cache folder (default: unirep.data's)")
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names, labels, images = sample_grid(args.per_domain, root=args.root)
    cols = max(len(r) for r in images)
    fig, axes = plt.subplots(len(names), cols, figsize=(1.05 * cols + 1.3, 1.25 * len(names)), squeeze=False)
    for i, (name, row_lab, row_img) in enumerate(zip(names, labels, images)):
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([]), ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if j < len(row_img):
                ax.imshow(np.ascontiguousarray(row_img[j]), interpolation="nearest")
                ax.set_title(str(row_lab[j]).split(" (")[0][:14], fontsize=6, pad=2)
        axes[i][0].set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    fig.tight_layout(pad=0.3)
    fig.subplots_adjust(left=0.12)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=72)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
