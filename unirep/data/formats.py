"""Loaders for the paper's real datasets in their published on-disk formats.

``load_dataset(root, format="auto", image_size=64)`` returns a :class:`DomainDataset`
(``.train``, ``.test``, ``.classes``): images resized to ``image_size`` squared, grey turned
into RGB, uint8 ``[N, 3, S, S]``; labels int64.  Datasets without a published split are
split 80/20 per class with a fixed seed.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from .dataset import DomainDataset
from .errors import DataFormatError
from .paths import expand_path
from .transforms import resize_uint8, to_rgb

__all__ = ["load_dataset", "FORMATS", "detect_format", "read_idx", "read_image",
           "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".ppm", ".pgm", ".pbm", ".bmp",
                              ".gif", ".tif", ".tiff", ".webp"})
SPLIT_SEED = 0
SPLIT_TEST_FRACTION = 0.2


# ---------------------------------------------------------------------------- helpers
def _open_maybe_gzip(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataFormatError(path, "file not found") from None
    except OSError as e:
        raise DataFormatError(path, f"cannot read: {e}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise DataFormatError(path, f"corrupt gzip data: {e}") from None
    return raw


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (MNIST's format), gzipped or raw."""
    path = Path(path)
    raw = _open_maybe_gzip(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataFormatError(path, "not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataFormatError(path, "truncated IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataFormatError(path, f"IDX data holds {len(raw) - header} bytes, header "
                                    f"{dims} needs {expected} (truncated or corrupt file)")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def read_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """Decode one image file to uint8 ``[3, S, S]`` (grey -> RGB, alpha dropped)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("LA", "La", "1", "I;16", "I;16B", "I;16L"):
                im = im.convert("L")
            elif im.mode not in ("RGB", "L"):
                im = im.convert("RGB")
            if im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.BILINEAR, reducing_gap=None)
            arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise DataFormatError(path, "file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataFormatError(path, f"cannot decode image: {e}") from None
    if arr.ndim == 2:
        arr = np.repeat(arr[None], 3, axis=0)
    else:
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def _read_images(paths, image_size: int) -> torch.Tensor:
    from unirep._progress import progress_bar

    out = np.empty((len(paths), 3, image_size, image_size), dtype=np.uint8)
    for i, p in enumerate(progress_bar(paths, desc="decoding images", unit="img", leave=False)):
        out[i] = read_image(p, image_size)
    return torch.from_numpy(out)


def _array_images(x: np.ndarray, image_size: int, layout: str) -> torch.Tensor:
    """uint8 numpy images in NHW / NCHW / NHWC -> resized uint8 [N, 3, S, S] tensor."""
    x = np.ascontiguousarray(x)
    if not x.flags.writeable:
        x = x.copy()
    t = torch.from_numpy(x)
    if layout == "NHWC":
        t = t.permute(0, 3, 1, 2)
    t = to_rgb(t.contiguous())
    return resize_uint8(t, image_size)


def _split_80_20(labels: np.ndarray, seed: int = SPLIT_SEED):
    """Stratified 80/20 split: per class, a seeded shuffle, the last 20% (rounded) to test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(SPLIT_TEST_FRACTION * len(idx)))
        if n_test == len(idx):          # keep every class in the training split
            n_test -= 1
        test.append(idx[len(idx) - n_test:])
        train.append(idx[:len(idx) - n_test])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _check_labels(labels: np.ndarray, num_classes: int, path, low: int = 0) -> None:
    if labels.size == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < low or hi >= num_classes + low:
        raise DataFormatError(path, f"label out of range: found [{lo}, {hi}], expected "
                                    f"[{low}, {num_classes + low - 1}]")


def _find_file(root: Path, names) -> Path | None:
    for n in names:
        for cand in (root / n, root / (n + ".gz")):
            if cand.is_file():
                return cand
    return None


# ---------------------------------------------------------------------------- MNIST
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _load_mnist(root: Path, image_size: int, **_) -> dict:
    splits = {}
    for split in ("train", "test"):
        fx = _find_file(root, _MNIST_FILES[split])
        fy = _find_file(root, _MNIST_FILES[split + "_labels"])
        for f, names in ((fx, _MNIST_FILES[split]), (fy, _MNIST_FILES[split + "_labels"])):
            if f is None:
                raise DataFormatError(root / names[0], "file not found (also tried .gz)")
        x, y = read_idx(fx), read_idx(fy)
        if x.ndim != 3 or x.dtype != np.uint8:
            raise DataFormatError(fx, f"expected uint8 images [N, H, W], got {x.dtype} {x.shape}")
        if y.ndim != 1:
            raise DataFormatError(fy, f"expected labels [N], got shape {y.shape}")
        if len(x) != len(y):
            raise DataFormatError(fy, f"{len(y)} labels for {len(x)} images in {fx.name}")
        _check_labels(y.astype(np.int64), 10, fy)
        splits[split] = (_array_images(x, image_size, "NHW"), torch.from_numpy(y.astype(np.int64)))
    return dict(classes=[str(i) for i in range(10)], kind="digits", **splits)


# ---------------------------------------------------------------------------- CIFAR-10
class _SafeUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only (CIFAR batches), nothing else."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
                ("__builtin__", "object"), ("builtins", "object")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataFormatError(path, "file not found") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise DataFormatError(path, f"corrupt CIFAR pickle: {e}") from None
    if not isinstance(obj, dict):
        raise DataFormatError(path, "corrupt CIFAR pickle: not a dict")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_root(root: Path) -> Path:
    if (root / "cifar-10-batches-py").is_dir():
        return root / "cifar-10-batches-py"
    return root


def _load_cifar10(root: Path, image_size: int, **_) -> dict:
    root = _cifar_root(root)
    meta = root / "batches.meta"
    if meta.is_file():
        names = _unpickle(meta).get("label_names")
        if not isinstance(names, list) or not names:
            raise DataFormatError(meta, "no label_names list")
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    else:
        classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]
    train_files = sorted(root.glob("data_batch_*"), key=lambda p: p.name)
    if not train_files:
        raise DataFormatError(root / "data_batch_1", "file not found")
    splits = {}
    for split, files in (("train", train_files), ("test", [root / "test_batch"])):
        xs, ys = [], []
        for f in files:
            b = _unpickle(f)
            x, y = b.get("data"), b.get("labels", b.get("fine_labels"))
            if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 \
                    or x.shape[1] != 3072:
                raise DataFormatError(f, "'data' must be a uint8 array [N, 3072]")
            if y is None:
                raise DataFormatError(f, "no 'labels' entry")
            y = np.asarray(y, dtype=np.int64).reshape(-1)
            if len(y) != len(x):
                raise DataFormatError(f, f"{len(y)} labels for {len(x)} images")
            _check_labels(y, len(classes), f)
            xs.append(x.reshape(-1, 3, 32, 32))
            ys.append(y)
        splits[split] = (_array_images(np.concatenate(xs), image_size, "NCHW"),
                         torch.from_numpy(np.concatenate(ys)))
    return dict(classes=classes, kind="objects", **splits)


# ---------------------------------------------------------------------------- SVHN
def _load_svhn(root: Path, image_size: int, extra: bool = False, **_) -> dict:
    import scipy.io

    splits = {}
    wanted = {"train": ["train_32x32.mat"] + (["extra_32x32.mat"] if extra else []),
              "test": ["test_32x32.mat"]}
    for split, names in wanted.items():
        xs, ys = [], []
        for n in names:
            f = root / n
            if not f.is_file():
                raise DataFormatError(f, "file not found")
            try:
                m = scipy.io.loadmat(f)
            except Exception as e:  # noqa: BLE001
                raise DataFormatError(f, f"cannot read .mat file: {e}") from None
            if "X" not in m or "y" not in m:
                raise DataFormatError(f, "expected variables 'X' and 'y'")
            x, y = m["X"], np.asarray(m["y"]).astype(np.int64).reshape(-1)
            if x.ndim != 4 or x.shape[2] != 3 or x.dtype != np.uint8:
                raise DataFormatError(f, f"'X' must be uint8 [32, 32, 3, N], got {x.dtype} {x.shape}")
            if x.shape[3] != len(y):
                raise DataFormatError(f, f"{len(y)} labels for {x.shape[3]} images")
            _check_labels(y, 10, f, low=1)
            xs.append(x.transpose(3, 2, 0, 1))
            ys.append(y % 10)                     # label 10 is the digit 0
        splits[split] = (_array_images(np.concatenate(xs), image_size, "NCHW"),
                         torch.from_numpy(np.concatenate(ys)))
    return dict(classes=[str(i) for i in range(10)], kind="digits", **splits)


# ---------------------------------------------------------------------------- folders
def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _scan_classes(root: Path) -> list[tuple[str, list[Path]]]:
    """Class folders under ``root``: a folder holding image files is a class (named by its
    path relative to ``root``; its sub-folders are ignored); a folder holding only folders
    is descended into; a folder holding neither is an empty class folder (an error)."""
    found: list[tuple[str, list[Path]]] = []

    def walk(d: Path) -> None:
        entries = sorted(d.iterdir(), key=lambda p: p.name)
        images = [p for p in entries if _is_image(p)]
        subdirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
        if images:
            found.append((d.relative_to(root).as_posix(), images))
        elif subdirs:
            for s in subdirs:
                walk(s)
        elif d != root:
            raise DataFormatError(d, "empty class folder (no image files)")

    if not root.is_dir():
        raise DataFormatError(root, "folder not found")
    walk(root)
    if not found:
        raise DataFormatError(root, "no class folders with images found")
    if found[0][0] == ".":
        raise DataFormatError(root, "images lie directly in the root; expected one folder per class")
    # drop a path prefix shared by every class (e.g. "JPEGImages/")
    parts = [name.split("/") for name, _ in found]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return [("/".join(p[common:]), imgs) for p, (_, imgs) in zip(parts, found)]


def _load_folder(root: Path, image_size: int, kind: str | None = None, **_) -> dict:
    train_dir, test_dir = root / "train", root / "test"
    if train_dir.is_dir() and test_dir.is_dir():
        train_cls = _scan_classes(train_dir)
        test_cls = _scan_classes(test_dir)
        classes = [c for c, _ in train_cls]
        index = {c: i for i, c in enumerate(classes)}
        for c, imgs in test_cls:
            if c not in index:
                raise DataFormatError(test_dir / c, "test class folder has no training folder")
        splits = {}
        for split, cls in (("train", train_cls), ("test", test_cls)):
            paths = [p for _, imgs in cls for p in imgs]
            labels = np.array([index[c] for c, imgs in cls for _ in imgs], dtype=np.int64)
            splits[split] = (_read_images(paths, image_size), torch.from_numpy(labels))
        return dict(classes=classes, kind=kind or _guess_kind(root), **splits)
    cls = _scan_classes(root)
    classes = [c for c, _ in cls]
    paths = [p for _, imgs in cls for p in imgs]
    labels = np.array([i for i, (_, imgs) in enumerate(cls) for _ in imgs], dtype=np.int64)
    images = _read_images(paths, image_size)
    tr, te = _split_80_20(labels)
    tr_t, te_t = torch.from_numpy(tr), torch.from_numpy(te)
    return dict(classes=classes, kind=kind or _guess_kind(root),
                train=(images[tr_t], torch.from_numpy(labels[tr])),
                test=(images[te_t], torch.from_numpy(labels[te])))


def _guess_kind(root: Path) -> str:
    low = str(root).lower()
    if "omniglot" in low or "images_background" in low or "images_evaluation" in low:
        return "characters"
    if "mnist" in low or "svhn" in low:
        return "digits"
    return "objects"


# ---------------------------------------------------------------------------- GTSRB
def _gtsrb_train_dir(root: Path) -> Path:
    for cand in (root / "Final_Training" / "Images", root / "GTSRB" / "Final_Training" / "Images",
                 root / "Training", root / "train"):
        if cand.is_dir():
            return cand
    raise DataFormatError(root / "Final_Training" / "Images", "GTSRB training folder not found")


def _gtsrb_test_csv(root: Path) -> Path:
    names = ["GT-final_test.csv", "Final_Test/GT-final_test.csv",
             "GTSRB/Final_Test/GT-final_test.csv", "Final_Test/Images/GT-final_test.csv",
             "GTSRB/Final_Test/Images/GT-final_test.csv", "Test.csv"]
    for n in names:
        if (root / n).is_file():
            return root / n
    raise DataFormatError(root / "GT-final_test.csv", "GTSRB test annotation CSV not found")


def _load_gtsrb(root: Path, image_size: int, **_) -> dict:
    train_dir = _gtsrb_train_dir(root)
    cls = _scan_classes(train_dir)
    classes = [c for c, _ in cls]
    paths = [p for _, imgs in cls for p in imgs]
    labels = np.array([i for i, (_, imgs) in enumerate(cls) for _ in imgs], dtype=np.int64)
    train = (_read_images(paths, image_size), torch.from_numpy(labels))
    csv_path = _gtsrb_test_csv(root)
    test_paths, test_labels = [], []
    try:
        with open(csv_path, newline="") as f:
            text = f.read()
    except OSError as e:
        raise DataFormatError(csv_path, f"cannot read: {e}") from None
    delim = ";" if text.count(";") >= text.count(",") else ","
    rows = list(csv.DictReader(io.StringIO(text), delimiter=delim))
    if not rows:
        raise DataFormatError(csv_path, "no rows")
    fname_key = "Filename" if "Filename" in rows[0] else "Path"
    if fname_key not in rows[0] or "ClassId" not in rows[0]:
        raise DataFormatError(csv_path, "expected columns 'Filename' and 'ClassId'")
    img_dirs = [csv_path.parent, csv_path.parent / "Images", root / "Final_Test" / "Images",
                root / "GTSRB" / "Final_Test" / "Images", root]
    for line, row in enumerate(rows, start=2):
        try:
            label = int(row["ClassId"])
        except (TypeError, ValueError):
            raise DataFormatError(csv_path, f"line {line}: bad ClassId {row['ClassId']!r}") from None
        if not 0 <= label < len(classes):
            raise DataFormatError(csv_path, f"line {line}: label out of range: ClassId {label}, "
                                            f"{len(classes)} training classes")
        name = row[fname_key]
        path = next((d / name for d in img_dirs if (d / name).is_file()), img_dirs[0] / name)
        test_paths.append(path)
        test_labels.append(label)
    test = (_read_images(test_paths, image_size), torch.tensor(test_labels, dtype=torch.int64))
    return dict(classes=classes, kind="signs", train=train, test=test)


# ---------------------------------------------------------------------------- Daimler
_DAIMLER_CLASSES = ["non-pedestrian", "pedestrian"]


def _load_daimler(root: Path, image_size: int, **_) -> dict:
    """Daimler Mono Pedestrian Classification Benchmark: partitions ``1``, ``2``, ``3``
    (training) and ``T1``, ``T2`` (test), each with ``ped_examples`` and
    ``non-ped_examples`` folders of 18x36 PGM crops."""
    if (root / "DC-ped-dataset_base").is_dir():
        root = root / "DC-ped-dataset_base"
    parts = sorted(p for p in root.iterdir() if p.is_dir() and (p / "ped_examples").is_dir())
    if not parts:
        raise DataFormatError(root, "no Daimler partitions (folders with ped_examples/) found")
    splits = {"train": ([], []), "test": ([], [])}
    for part in parts:
        split = "test" if part.name.upper().startswith("T") else "train"
        for label, sub in ((0, "non-ped_examples"), (1, "ped_examples")):
            d = part / sub
            if not d.is_dir():
                raise DataFormatError(d, "folder not found")
            imgs = [p for p in sorted(d.iterdir()) if _is_image(p)]
            if not imgs:
                raise DataFormatError(d, "empty class folder (no image files)")
            splits[split][0].extend(imgs)
            splits[split][1].extend([label] * len(imgs))
    out = {}
    if not splits["test"][0]:          # no T1/T2: fall back to the 80/20 split
        labels = np.array(splits["train"][1], dtype=np.int64)
        images = _read_images(splits["train"][0], image_size)
        tr, te = _split_80_20(labels)
        return dict(classes=_DAIMLER_CLASSES, kind="pedestrians",
                    train=(images[torch.from_numpy(tr)], torch.from_numpy(labels[tr])),
                    test=(images[torch.from_numpy(te)], torch.from_numpy(labels[te])))
    for split, (paths, labels) in splits.items():
        out[split] = (_read_images(paths, image_size), torch.tensor(labels, dtype=torch.int64))
    return dict(classes=_DAIMLER_CLASSES, kind="pedestrians", **out)


# ---------------------------------------------------------------------------- Decathlon
def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataFormatError(path, "file not found") from None
    except (OSError, ValueError) as e:
        raise DataFormatError(path, f"corrupt JSON: {e}") from None


def _decathlon_split(path: Path, root: Path, image_size: int, cat_index: dict | None):
    ann = _read_json(path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(ann.get(key), list):
            raise DataFormatError(path, f"missing list {key!r}")
    cats = sorted(ann["categories"], key=lambda c: c["id"])
    if cat_index is None:
        cat_index = {c["id"]: i for i, c in enumerate(cats)}
    names = [str(c.get("name", c["id"])) for c in cats]
    files = {im["id"]: im["file_name"] for im in ann["images"]}
    paths, labels = [], []
    for a in ann["annotations"]:
        if a.get("image_id") not in files:
            raise DataFormatError(path, f"annotation {a.get('id')} refers to unknown image "
                                        f"{a.get('image_id')}")
        cid = a.get("category_id")
        if cid not in cat_index:
            raise DataFormatError(path, f"label out of range: annotation {a.get('id')} has "
                                        f"category_id {cid}, not among the categories")
        rel = files[a["image_id"]]
        cand = [root / rel, path.parent / rel, path.parent.parent / rel]
        paths.append(next((c for c in cand if c.is_file()), cand[0]))
        labels.append(cat_index[cid])
    if not paths:
        raise DataFormatError(path, "no annotations")
    return (_read_images(paths, image_size), torch.tensor(labels, dtype=torch.int64)), names, cat_index


def _load_decathlon(root: Path, image_size: int, subset: str | None = None, **_) -> dict:
    """Visual Decathlon: ``annotations/<subset>_train.json`` and ``<subset>_val.json``
    (COCO-style: images, annotations, categories); image paths are relative to ``root``.
    The labelled val split is used as the test split (the test labels are withheld)."""
    ann_dir = root / "annotations" if (root / "annotations").is_dir() else root
    subsets = sorted(p.name[:-len("_train.json")] for p in ann_dir.glob("*_train.json"))
    if subset is None:
        if len(subsets) != 1:
            raise DataFormatError(ann_dir, f"pass subset= one of {subsets}" if subsets
                                  else "no <subset>_train.json annotation file")
        subset = subsets[0]
    train, names, cat_index = _decathlon_split(ann_dir / f"{subset}_train.json", root,
                                               image_size, None)
    test_file = ann_dir / f"{subset}_val.json"
    if not test_file.is_file():
        raise DataFormatError(test_file, "file not found")
    test, _, _ = _decathlon_split(test_file, root, image_size, cat_index)
    kind = "characters" if subset == "omniglot" else "digits" if subset == "svhn" else "objects"
    return dict(classes=names, kind=kind, train=train, test=test, name=subset)


# ---------------------------------------------------------------------------- dispatch
FORMATS = {
    "mnist": _load_mnist,
    "cifar10": _load_cifar10,
    "svhn": _load_svhn,
    "folder": _load_folder,
    "gtsrb": _load_gtsrb,
    "daimler": _load_daimler,
    "decathlon": _load_decathlon,
}


def detect_format(root: str | os.PathLike) -> str:
    """Guess the format of the dataset at ``root`` from the files it holds."""
    root = expand_path(root)
    if not root.exists():
        raise DataFormatError(root, "dataset path not found")
    if not root.is_dir():
        raise DataFormatError(root, "expected a dataset folder")
    if _find_file(root, _MNIST_FILES["train"]) is not None:
        return "mnist"
    croot = _cifar_root(root)
    if (croot / "test_batch").is_file() or any(croot.glob("data_batch_*")):
        return "cifar10"
    if (root / "train_32x32.mat").is_file() or (root / "test_32x32.mat").is_file():
        return "svhn"
    ann = root / "annotations"
    if ann.is_dir() and any(ann.glob("*_train.json")) or any(root.glob("*_train.json")):
        return "decathlon"
    try:
        _gtsrb_train_dir(root)
        _gtsrb_test_csv(root)
        return "gtsrb"
    except DataFormatError:
        pass
    daimler = root / "DC-ped-dataset_base" if (root / "DC-ped-dataset_base").is_dir() else root
    if any((p / "ped_examples").is_dir() for p in daimler.iterdir() if p.is_dir()):
        return "daimler"
    if any(p.is_dir() for p in root.iterdir()):
        return "folder"
    raise DataFormatError(root, f"cannot detect the dataset format; pass format= one of "
                                f"{sorted(FORMATS)}")


def load_dataset(root: str | os.PathLike, format: str = "auto", image_size: int = 64, *,
                 name: str | None = None, kind: str | None = None, **options) -> DomainDataset:
    """Load a real dataset from its published on-disk format.

    Args:
        root: the dataset folder; ``~`` and environment variables (``$DATA/mnist``) are
            expanded.
        format: ``"auto"`` (detected from the files) or one of :data:`FORMATS`:
            ``"mnist"`` (IDX files, gzipped or raw), ``"cifar10"`` (python pickles),
            ``"svhn"`` (cropped-digit ``.mat``; ``extra=True`` adds extra_32x32.mat to the
            training split), ``"folder"`` (one folder per class: Caltech-256, Omniglot,
            Sketches, Plankton, AwA, ...; ``train/`` and ``test/`` sub-trees are used as
            splits when present, else 80/20), ``"gtsrb"`` (training class folders plus
            the test CSV), ``"daimler"`` (Daimler mono pedestrian partitions), and
            ``"decathlon"`` (Visual Decathlon annotation JSON; ``subset="dtd"`` etc.).
        image_size: side of the square uint8 images returned (the paper uses 64).
        name: the dataset's name (default: the folder name).
        kind: override the content kind (``"digits"``, ``"characters"`` disable flips).

    Returns:
        a :class:`DomainDataset` with ``.train``, ``.test``, ``.classes``, ``.mean``, ``.std``.

    Raises:
        DataFormatError: a missing/corrupt file, empty class folder or out-of-range label
            (the message names the file).
        ValueError: an unknown format.
    """
    root = expand_path(root)
    if format == "auto":
        format = detect_format(root)
    if format not in FORMATS:
        raise ValueError(f"unknown dataset format {format!r}; known formats: "
                         f"{['auto'] + sorted(FORMATS)}")
    if not root.exists():
        raise DataFormatError(root, "dataset path not found")
    if format == "folder":
        options["kind"] = kind
    out = FORMATS[format](root, int(image_size), **options)
    ds_name = name or out.pop("name", None) or root.name
    out.pop("name", None)
    return DomainDataset(ds_name, out["classes"], out["train"], out["test"],
                         kind=kind or out["kind"], source=str(root))
