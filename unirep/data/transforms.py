"""The paper's preprocessing as batched torch ops (no torchvision).

Images are stored as uint8 tensors ``[N, 3, S, S]``.  On the training device a batch is
converted to float, whitened with its domain's per-channel mean/std (section 4.1 of the
paper) and, for training, augmented: zero-padded on every side (8 pixels at 64x64, the
paper's; the loader scales it with the image; zero is the domain mean after whitening), a
random ``S x S`` window is cropped and, except for digit and character domains, flipped
horizontally with probability 1/2.  At test time the
central crop of the padded image is the image itself, so evaluation is whitening only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["to_rgb", "resize_uint8", "channel_stats", "whiten", "augment"]


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` as ``[N, 3, H, W]``: grey ``[N, H, W]`` or ``[N, 1, H, W]`` is repeated
    on three channels (the paper's grey-to-RGB), RGBA drops alpha."""
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise ValueError(f"images must be [N, H, W] or [N, C, H, W], got shape {tuple(x.shape)}")
    c = x.shape[1]
    if c == 3:
        return x
    if c == 1:
        return x.expand(-1, 3, -1, -1).contiguous()
    if c == 4:
        return x[:, :3].contiguous()
    raise ValueError(f"images must have 1, 3 or 4 channels, got {c}")


def resize_uint8(x: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """Resize uint8 images ``[N, C, H, W]`` to ``[N, C, size, size]`` (bilinear,
    antialiased when shrinking), rounding back to uint8.  Aspect ratio is not kept,
    as in the paper (every image becomes 64x64)."""
    if x.dtype != torch.uint8:
        raise TypeError(f"resize_uint8 expects uint8 images, got {x.dtype}")
    if x.shape[-2:] == (size, size):
        return x
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8)
    for i in range(0, x.shape[0], chunk):
        part = x[i:i + chunk].float()
        part = F.interpolate(part, size=(size, size), mode="bilinear", align_corners=False,
                             antialias=True)
        out[i:i + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def channel_stats(x: torch.Tensor, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of uint8 images ``[N, C, H, W]`` in [0, 1]
    units (float32 tensors of shape ``[C]``), accumulated in float64.  A constant channel
    gets std 1 so whitening never divides by zero."""
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"channel_stats needs a non-empty [N, C, H, W] tensor, got {tuple(x.shape)}")
    c = x.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    ss = torch.zeros(c, dtype=torch.float64)
    for i in range(0, x.shape[0], chunk):
        part = x[i:i + chunk].to(torch.float64).div_(255.0)
        s += part.sum(dim=(0, 2, 3))
        ss += part.square_().sum(dim=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    var = (ss / n - mean.square()).clamp_min(0.0)
    std = var.sqrt()
    std[std < 1e-6] = 1.0
    return mean.float(), std.float()


def whiten(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
           domain: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Convert uint8 images ``[N, C, H, W]`` to ``dtype`` and whiten per channel.

    ``mean``/``std`` are ``[C]`` (one domain) or ``[D, C]`` tables indexed by the int64
    ``domain`` tensor ``[N]`` (mixed batches), in [0, 1] units.
    """
    mean = mean.to(device=x.device, dtype=torch.float32)
    std = std.to(device=x.device, dtype=torch.float32)
    if domain is not None:
        if mean.dim() != 2:
            raise ValueError("a per-sample domain tensor needs [D, C] mean/std tables")
        mean = mean.index_select(0, domain)[:, :, None, None]
        std = std.index_select(0, domain)[:, :, None, None]
    else:
        if mean.dim() != 1:
            raise ValueError("mean/std must be [C] for a pure batch")
        mean = mean[None, :, None, None]
        std = std[None, :, None, None]
    scale = 1.0 / (255.0 * std)
    y = x.to(torch.float32).mul_(scale).sub_(mean / std)
    return y.to(dtype)


def augment(x: torch.Tensor, pad: int = 8, flip: bool | torch.Tensor = True,
            generator: torch.Generator | None = None,
            channels_last: bool = False) -> torch.Tensor:
    """Random crop and horizontal flip of a whole batch, on ``x``'s device.

    Each sample of ``x`` (float, ``[N, C, H, W]``, already whitened) is zero-padded by
    ``pad`` pixels, a random ``H x W`` window of the padded image is taken (offsets uniform
    in ``[0, 2*pad]``) and mirrored with probability 1/2 where ``flip`` allows it.
    ``flip`` is a bool for the whole batch or a bool tensor ``[N]`` (mixed batches, where
    digit and character samples must not be flipped).  Random numbers come from
    ``generator`` (a CPU generator), so the result is deterministic for its seed and the
    same on every device.
    """
    n, c, h, w = x.shape
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    coin = torch.rand(n, generator=generator) < 0.5
    if isinstance(flip, torch.Tensor):
        coin &= flip.to("cpu", torch.bool)
    elif not flip:
        coin[:] = False
    if x.device.type == "cpu":
        out = _crop_flip_slices(x, oy, ox, coin, pad)
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out
    return _crop_flip_gather(x, oy, ox, coin, pad, channels_last)


def _crop_flip_slices(x, oy, ox, coin, pad):
    """CPU: one slice copy per sample (cheaper than a gather on few cores)."""
    n, c, h, w = x.shape
    out = torch.zeros_like(x, memory_format=torch.contiguous_format)
    for i, (dy, dx) in enumerate(zip((oy - pad).tolist(), (ox - pad).tolist())):
        r0, r1 = max(0, -dy), min(h, h - dy)
        c0, c1 = max(0, -dx), min(w, w - dx)
        if r1 > r0 and c1 > c0:
            out[i, :, r0:r1, c0:c1] = x[i, :, r0 + dy:r1 + dy, c0 + dx:c1 + dx]
    if bool(coin.any()):
        idx = coin.nonzero().flatten()
        out[idx] = out[idx].flip(-1)
    return out


def _crop_flip_gather(x, oy, ox, coin, pad, channels_last):
    """Accelerators: one gather for the whole batch."""
    n, c, h, w = x.shape
    dev = x.device
    rows = oy[:, None] + torch.arange(h)[None, :]                          # [N, H]
    base = torch.arange(w)[None, :].expand(n, w)
    cols = torch.where(coin[:, None], (w - 1) - base, base) + ox[:, None]  # [N, W]
    padded = F.pad(x, (pad, pad, pad, pad)) if pad > 0 else x
    nidx = torch.arange(n, device=dev)[:, None, None]
    rows = rows.to(dev, non_blocking=True)[:, :, None]
    cols = cols.to(dev, non_blocking=True)[:, None, :]
    out = padded[nidx, :, rows, cols]       # [N, H, W, C]: a channels_last view once permuted
    out = out.permute(0, 3, 1, 2)
    return out if channels_last else out.contiguous()
