"""The built-in multi-domain benchmark: eight synthetic-but-real classification domains
generated deterministically from a seed at first use, cached on disk, no download.

The domains reproduce the *diversity* of the paper's ten (section 4.1, Table 1): grey
and colour images, dark and light backgrounds, strokes, silhouettes, pictograms and
textures, objects that fill the frame or a small part of it, 2 to 100 classes.

==============  ===========  =======  ======  =====================================
name            kind         classes  colour  resembles
==============  ===========  =======  ======  =====================================
digits          digits       10       grey    MNIST (real scikit-learn digits)
characters      characters   100      grey    Omniglot (10 alphabets, DejaVu fonts)
sketches        sketches     21       grey    Human Sketch dataset
plankton        plankton     30       grey    Plankton imagery
traffic_signs   signs        43       colour  GTSRB
house_numbers   digits       10       colour  SVHN
pedestrians     pedestrians  2        grey    Daimler mono pedestrians
textures        objects      10       colour  CIFAR-10 / AwA (shape x texture)
==============  ===========  =======  ======  =====================================
"""

from __future__ import annotations

import os
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ..dataset import DomainDataset, MultiDomainData
from ..paths import expand_path
from ..transforms import resize_uint8, to_rgb
from . import glyphs, shapes, signs
from .render import to_uint8

__all__ = ["BUILTIN_DOMAINS", "DEFAULT_TRAIN", "DEFAULT_TEST", "builtin_benchmark",
           "builtin_domain", "default_cache_dir", "generate_domain"]

#: Bump when generated images change: old cache files are then ignored.
VERSION = 3
#: Images are generated at this size and resized on load.
GEN_SIZE = 64
#: Generation works in chunks of this many images, each with its own seeded generator,
#: so the result does not depend on anything but the seed and the sizes.
CHUNK = 250
DEFAULT_TRAIN = 2000
DEFAULT_TEST = 500


@dataclass(frozen=True)
class _Spec:
    generate: Callable
    classes: Callable[[], list]
    kind: str
    channels: int


BUILTIN_DOMAINS: dict[str, _Spec] = {
    "digits": _Spec(glyphs.digits, lambda: glyphs.DIGIT_CLASSES, "digits", 1),
    "characters": _Spec(glyphs.characters, glyphs.character_classes, "characters", 1),
    "sketches": _Spec(shapes.sketches, lambda: shapes.SKETCH_CLASSES, "sketches", 1),
    "plankton": _Spec(shapes.plankton, lambda: shapes.PLANKTON_CLASSES, "plankton", 1),
    "traffic_signs": _Spec(signs.traffic_signs, lambda: signs.SIGN_CLASSES, "signs", 3),
    "house_numbers": _Spec(glyphs.house_numbers, lambda: glyphs.DIGIT_CLASSES, "digits", 3),
    "pedestrians": _Spec(shapes.pedestrians, lambda: shapes.PEDESTRIAN_CLASSES, "pedestrians", 1),
    "textures": _Spec(shapes.textures, lambda: shapes.TEXTURE_CLASSES, "objects", 3),
}


def default_cache_dir() -> Path:
    """``$UNIREP_CACHE_DIR``, else ``$XDG_CACHE_HOME/unirep``, else ``~/.cache/unirep``."""
    env = os.environ.get("UNIREP_CACHE_DIR")
    if env:
        return expand_path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "unirep"


def _spec(name: str) -> _Spec:
    try:
        return BUILTIN_DOMAINS[name]
    except KeyError:
        raise ValueError(f"unknown built-in domain {name!r}; known: {list(BUILTIN_DOMAINS)}") from None


def generate_domain(name: str, seed: int, n: int, split: str, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate ``n`` images of one built-in domain: uint8 ``[n, C, 64, 64]`` (C = 1 for
    grey domains) and int64 labels.  Deterministic in ``(name, seed, n, split)``."""
    spec = _spec(name)
    xs, ys = [], []
    split_id = {"train": 0, "test": 1}[split]
    for c, start in enumerate(range(0, n, CHUNK)):
        m = min(CHUNK, n - start)
        ss = np.random.SeedSequence([int(seed), zlib.crc32(name.encode()), split_id, c])
        x, y = spec.generate(np.random.default_rng(ss), m, split)
        assert x.shape == (m, spec.channels, GEN_SIZE, GEN_SIZE), (name, x.shape)
        xs.append(to_uint8(x))
        ys.append(torch.as_tensor(y, dtype=torch.int64))
        if progress is not None:
            progress.update(m)
    if not xs:
        return (torch.empty((0, spec.channels, GEN_SIZE, GEN_SIZE), dtype=torch.uint8),
                torch.empty(0, dtype=torch.int64))
    return torch.cat(xs), torch.cat(ys)


def _cache_path(root: Path, name: str, seed: int, n_train: int, n_test: int) -> Path:
    return root / f"builtin-v{VERSION}" / f"{name}-seed{seed}-train{n_train}-test{n_test}.pt"


def _save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file beside ``path``, then rename: readers never see a
    half-written cache file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _load_cache(path: Path, name: str, n_train: int, n_test: int):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        ok = (isinstance(obj, dict) and obj.get("version") == VERSION and obj.get("name") == name
              and obj["train_x"].dtype == torch.uint8 and obj["train_x"].shape[0] == n_train
              and obj["test_x"].shape[0] == n_test and obj["train_y"].shape[0] == n_train
              and obj["test_y"].shape[0] == n_test)
        if not ok:
            raise ValueError("unexpected content")
        return obj
    except Exception as e:  # noqa: BLE001 - any failure: regenerate
        warnings.warn(f"{path}: corrupt or stale cache file ({type(e).__name__}: {e}); "
                      f"regenerating it", RuntimeWarning, stacklevel=3)
        return None


def _sizes(value, names, what) -> dict:
    if isinstance(value, Mapping):
        unknown = set(value) - set(names)
        if unknown:
            raise ValueError(f"{what}: unknown domains {sorted(unknown)}")
        out = {n: int(value.get(n, DEFAULT_TRAIN if what == "train_per_domain" else DEFAULT_TEST))
               for n in names}
    else:
        out = {n: int(value) for n in names}
    for n, v in out.items():
        if v < (1 if what == "train_per_domain" else 0):
            raise ValueError(f"{what} for {n!r} must be positive, got {v}")
    return out


def builtin_domain(name: str, root: str | os.PathLike | None = None, seed: int = 0,
                   train_per_domain: int = DEFAULT_TRAIN, test_per_domain: int = DEFAULT_TEST,
                   image_size: int = 64, progress: bool | None = None) -> DomainDataset:
    """One built-in domain as a :class:`DomainDataset` (see :func:`builtin_benchmark`)."""
    return builtin_benchmark(root, seed, train_per_domain, test_per_domain, image_size,
                             domains=[name], progress=progress)[0]


def builtin_benchmark(root: str | os.PathLike | None = None, seed: int = 0,
                      train_per_domain: int | Mapping[str, int] = DEFAULT_TRAIN,
                      test_per_domain: int | Mapping[str, int] = DEFAULT_TEST,
                      image_size: int = 64, domains: Sequence[str] | None = None,
                      progress: bool | None = None) -> MultiDomainData:
    """The built-in multi-domain benchmark (needs no download).

    Args:
        root: cache folder (default :func:`default_cache_dir`).  Each domain is generated
            at first use and cached as one file (written to a temporary name, then renamed).
        seed: generation seed; the same seed and sizes give bit-identical images.
        train_per_domain, test_per_domain: images per domain and split (an int, or a dict
            by domain name).  The defaults (2000 / 500) generate in well under a minute.
        image_size: side of the returned square images (generated at 64, then resized).
        domains: names of the domains to use, in this order (default: all, in
            :data:`BUILTIN_DOMAINS` order).
        progress: show progress while generating (default: only when generation takes
            more than 2 seconds): a tqdm bar on a terminal, else a line every 30 seconds.

    Returns:
        a :class:`MultiDomainData` of :class:`DomainDataset` (RGB uint8 images, int64
        labels, per-domain whitening mean/std of the training split).
    """
    names = list(BUILTIN_DOMAINS) if domains is None else list(domains)
    for n in names:
        _spec(n)
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate domains in {names}")
    n_train = _sizes(train_per_domain, names, "train_per_domain")
    n_test = _sizes(test_per_domain, names, "test_per_domain")
    root = expand_path(root) if root is not None else default_cache_dir()
    cached, todo = {}, []
    for n in names:
        path = _cache_path(root, n, seed, n_train[n], n_test[n])
        obj = _load_cache(path, n, n_train[n], n_test[n]) if path.is_file() else None
        if obj is None:
            todo.append(n)
        else:
            cached[n] = obj
    if todo:
        from unirep._progress import progress_bar

        total = sum(n_train[n] + n_test[n] for n in todo)
        bar = progress_bar(total=total, desc="generating built-in benchmark", unit="img", enabled=progress)
        try:
            for n in todo:
                bar.set_postfix_str(n)
                tr = generate_domain(n, seed, n_train[n], "train", bar)
                te = generate_domain(n, seed, n_test[n], "test", bar)
                obj = {"version": VERSION, "name": n, "seed": int(seed),
                       "train_x": tr[0], "train_y": tr[1], "test_x": te[0], "test_y": te[1]}
                _save_atomic(obj, _cache_path(root, n, seed, n_train[n], n_test[n]))
                cached[n] = obj
        finally:
            bar.close()
    out = []
    for n in names:
        spec, obj = BUILTIN_DOMAINS[n], cached[n]
        train = (resize_uint8(to_rgb(obj["train_x"]), image_size), obj["train_y"])
        test = (resize_uint8(to_rgb(obj["test_x"]), image_size), obj["test_y"])
        out.append(DomainDataset(n, spec.classes(), train, test, kind=spec.kind,
                                 source=f"builtin:v{VERSION}:seed{seed}"))
    return MultiDomainData(out)
