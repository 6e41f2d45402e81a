"""``python -m unirep.predict RUN_DIR --domain NAME IMAGE [IMAGE ...]``: classify image
files as images of one domain, in eval mode with that domain's moments.

Each image is read with Pillow, converted to RGB (grey repeated on three channels), resized
to the run's image size (bilinear, aspect ratio not kept, as in training) and whitened with
the domain's training mean and std; the top classes are printed with their probabilities.
A file that cannot be read is reported on its own line (``error: <file>: <why>``, on
stderr) and the others are still classified; the exit status is then 2."""

from __future__ import annotations

import json
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import _cli
from .train import load_run, resolve_device


def load_image(path: str, size: int) -> torch.Tensor:
    """uint8 ``[1, 3, size, size]`` image from a file; ``OSError``/``ValueError`` if it
    cannot be read as an image."""
    from PIL import Image
    from unirep.data import resize_uint8
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0).contiguous()
    return resize_uint8(t, size)


def load_images(paths: Sequence[str], size: int) -> Tuple[torch.Tensor, List[str], Dict[str, str]]:
    """uint8 ``[N, 3, size, size]`` images of the files that could be read, their paths,
    and ``{path: why}`` for those that could not (missing, unreadable, not an image)."""
    images, good, bad = [], [], {}
    for p in paths:
        try:
            images.append(load_image(p, size))
            good.append(p)
        except OSError as exc:  # missing, unreadable, a folder; Pillow: not an image, truncated
            bad[p] = f"{p}: {exc.strerror}" if exc.strerror else f"{p}: cannot read it as an image ({exc})"
        except (ValueError, SyntaxError) as exc:  # Pillow: a damaged image
            bad[p] = f"{p}: cannot read it as an image ({type(exc).__name__}: {exc})"
    empty = torch.empty((0, 3, size, size), dtype=torch.uint8)
    return (torch.cat(images) if images else empty), good, bad


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


#: ``--domain`` value for images of a domain the run does not know.
AUTO = "auto-bn+"


@torch.no_grad()
def predict_unseen(model, images: torch.Tensor, device="cpu"):
    """Images of a domain the run does not know (``--domain auto-bn+``), a heuristic:
    whitened with their own channel statistics (as a new domain's would be), normalized
    with their own batch statistics in every batch norm (BN+), and classified by the
    known domain whose head gives the lowest mean normalized prediction entropy
    (:func:`unirep.lifecycle.nearest_domain`). All the images form one batch: give many.
    Returns ``(domain, probabilities (N, K_max), {domain: entropy})``."""
    from unirep.data import channel_stats, whiten
    from unirep.lifecycle import nearest_domain
    mean, std = channel_stats(images)
    x = whiten(images.to(device), mean.to(device), std.to(device))
    d, probs, entropies = nearest_domain(model, x)
    return d, probs.cpu(), entropies


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = _cli.ArgumentParser(prog="python -m unirep.predict",
                            description="Classify image files as images of one domain of a trained run.")
    p.add_argument("run_dir", help="a run directory of python -m unirep.train (or its checkpoint.pt)")
    p.add_argument("images", nargs="+", help="image files (anything Pillow reads)")
    p.add_argument("--domain", required=True,
                   help="domain name (or index) the images come from; or auto-bn+ for images of a domain the run "
                        "does not know: normalized with the images' own statistics (BN+) and classified by the "
                        "domain whose head is most confident on them (a heuristic; give many images at once)")
    p.add_argument("--top", type=_cli.positive_int, default=1, help="classes to print per image (default 1)")
    _cli.add_run_options(p)
    p.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    args = p.parse_args(argv)
    import unirep_kernels
    device = resolve_device(args.device)
    with unirep_kernels.use_backend(args.backend):
        cfg, model, ckpt = load_run(args.run_dir, device)
        meta = ckpt["data"]
        names: List[str] = meta["names"]
        auto = args.domain == AUTO
        if auto:
            d = None
        elif args.domain in names:
            d = names.index(args.domain)
        elif args.domain.isdigit() and int(args.domain) < len(names):
            d = int(args.domain)
        else:
            raise _cli.CLIError("--domain", f"unknown domain {args.domain!r}; the run knows {', '.join(names)} "
                                            f"(or use --domain {AUTO} for images of another domain)")
        images, paths, bad = load_images(args.images, int(meta["image_size"]))
        for why in bad.values():  # each on its own line; the good images are still classified
            print(f"error: {why}", file=sys.stderr, flush=True)
        probs = []
        if paths and auto:
            d, probs, entropies = predict_unseen(model, images, device)
            print(f"{AUTO}: nearest domain {names[d]} (mean normalized prediction entropy "
                  + ", ".join(f"{names[c]} {h:.3f}" for c, h in sorted(entropies.items(), key=lambda e: e[1]))
                  + ")", file=sys.stderr, flush=True)
        elif paths:
            probs = predict(model, images, d, meta["mean"][d], meta["std"][d], device)
        if d is None:  # auto, and no image could be read
            return _cli.EXIT_USAGE
    classes = meta["classes"][d]
    k = max(1, min(args.top, len(classes)))
    for path, pr in zip(paths, probs):
        top = pr.topk(k)
        pairs = [(classes[int(i)], float(v)) for v, i in zip(top.values, top.indices)]
        if args.json:
            print(json.dumps({"image": path, "domain": names[d],
                              "top": [{"class": c, "probability": v} for c, v in pairs]}))
        else:
            print(f"{path}\t" + "\t".join(f"{c} ({v:.3f})" for c, v in pairs))
    return _cli.EXIT_USAGE if bad else 0


if __name__ == "__main__":
    sys.exit(_cli.run(main))
