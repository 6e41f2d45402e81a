"""``python -m unirep.predict RUN_DIR --domain NAME IMAGE [IMAGE ...]``: classify image
files as images of one domain, in eval mode with that domain's moments.

Each image is read with Pillow, converted to RGB (grey repeated on three channels), resized
to the run's image size (bilinear, aspect ratio not kept, as in training) and whitened with
the domain's training mean and std; the top classes are printed with their probabilities."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional, Sequence

import numpy as np
import torch

from .train import load_run, resolve_device


def load_images(paths: Sequence[str], size: int) -> torch.Tensor:
    """uint8 ``[N, 3, size, size]`` images from files."""
    from PIL import Image
    from unirep.data import resize_uint8
    out = []
    for p in paths:
        with Image.open(p) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        t = torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0).contiguous()
        out.append(resize_uint8(t, size))
    return torch.cat(out)


@torch.no_grad()
def predict(model, images: torch.Tensor, domain: int, mean: torch.Tensor, std: torch.Tensor,
            device="cpu", batch_size: int = 256) -> torch.Tensor:
    """Class probabilities ``[N, K_max]`` (0 beyond the domain's classes) of uint8 images."""
    from unirep.data import whiten
    model.eval()
    probs = []
    for i in range(0, images.shape[0], batch_size):
        x = whiten(images[i:i + batch_size].to(device), mean.to(device), std.to(device))
        probs.append(model(x, int(domain)).softmax(1).cpu())
    return torch.cat(probs)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unirep.predict",
                                description="Classify image files as images of one domain of a trained run.")
    p.add_argument("run_dir", help="a run directory of python -m unirep.train (or its checkpoint.pt)")
    p.add_argument("images", nargs="+", help="image files (anything Pillow reads)")
    p.add_argument("--domain", required=True, help="domain name (or index) the images come from")
    p.add_argument("--top", type=int, default=1, help="classes to print per image (default 1)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--backend", default="auto", help="normalization kernels' backend (default auto)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    args = p.parse_args(argv)
    import unirep_kernels
    device = resolve_device(args.device)
    with unirep_kernels.use_backend(args.backend):
        cfg, model, ckpt = load_run(args.run_dir, device)
        meta = ckpt["data"]
        names: List[str] = meta["names"]
        if args.domain in names:
            d = names.index(args.domain)
        elif args.domain.isdigit() and int(args.domain) < len(names):
            d = int(args.domain)
        else:
            raise SystemExit(f"unknown domain {args.domain!r}; the run has {names}")
        images = load_images(args.images, int(meta["image_size"]))
        probs = predict(model, images, d, meta["mean"][d], meta["std"][d], device)
    classes = meta["classes"][d]
    k = max(1, min(args.top, len(classes)))
    for path, pr in zip(args.images, probs):
        top = pr.topk(k)
        pairs = [(classes[int(i)], float(v)) for v, i in zip(top.values, top.indices)]
        if args.json:
            print(json.dumps({"image": path, "domain": names[d],
                              "top": [{"class": c, "probability": v} for c, v in pairs]}))
        else:
            print(f"{path}\t" + "\t".join(f"{c} ({v:.3f})" for c, v in pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
