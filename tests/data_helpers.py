"""Writers of tiny datasets in the paper's published on-disk formats (for tests)."""

from __future__ import annotations

import gzip
import json
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> Path:
    assert arr.dtype == np.uint8
    data = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_mnist(root: Path, n_train=12, n_test=6, gz=False, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte", x, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", y, gz)
        out[split] = (x, y)
    return out


def write_cifar10(root: Path, per_batch=4, n_batches=2, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    root = root / "cifar-10-batches-py"
    root.mkdir(parents=True, exist_ok=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f, protocol=2)
    out = {"train": [], "test": []}
    files = [f"data_batch_{i + 1}" for i in range(n_batches)] + ["test_batch"]
    for fname in files:
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = list(rng.integers(0, 10, per_batch).tolist())
        with open(root / fname, "wb") as f:
            pickle.dump({b"batch_label": fname.encode(), b"labels": y, b"data": x,
                         b"filenames": [b"x.png"] * per_batch}, f, protocol=2)
        out["test" if fname == "test_batch" else "train"].append((x, y))
    return out


def write_svhn(root: Path, n_train=7, n_test=5, seed=0) -> dict:
    import scipy.io

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)   # 1..10, 10 = digit 0
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
        out[split] = (x, y)
    return out


def write_image(path: Path, size=(20, 30), mode="RGB", seed=0, fmt=None) -> Path:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + ((len(mode),) if mode != "L" else ())
    arr = rng.integers(0, 256, shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path, format=fmt)
    return path


def write_folder_tree(root: Path, classes=("cat", "dog", "owl"), per_class=5, ext=".png") -> None:
    modes = ("RGB", "L", "RGBA")
    for ci, c in enumerate(classes):
        for i in range(per_class):
            write_image(root / c / f"{c}_{i:03d}{ext}", size=(16 + 3 * i, 24), mode=modes[(ci + i) % 3]
                        if ext == ".png" else "RGB", seed=ci * 100 + i)


def write_gtsrb(root: Path, n_classes=3, per_class=3, n_test=4) -> list:
    for c in range(n_classes):
        d = root / "Final_Training" / "Images" / f"{c:05d}"
        rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
        for i in range(per_class):
            write_image(d / f"00000_{i:05d}.ppm", size=(30 + i, 32), seed=c * 10 + i, fmt="PPM")
            rows.append(f"00000_{i:05d}.ppm;{30 + i};32;5;5;25;27;{c}")
        (d / f"GT-{c:05d}.csv").write_text("\n".join(rows) + "\n")
    test_dir = root / "Final_Test" / "Images"
    labels = [i % n_classes for i in range(n_test)]
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, c in enumerate(labels):
        write_image(test_dir / f"{i:05d}.ppm", size=(40, 41), seed=1000 + i, fmt="PPM")
        rows.append(f"{i:05d}.ppm;40;41;5;5;35;36;{c}")
    (root / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    return labels


def write_daimler(root: Path, per_folder=3) -> None:
    base = root / "DC-ped-dataset_base"
    k = 0
    for part in ("1", "2", "T1"):
        for sub in ("ped_examples", "non-ped_examples"):
            for i in range(per_folder):
                write_image(base / part / sub / f"img{i:05d}.pgm", size=(18, 36), mode="L",
                            seed=k, fmt="PPM")
                k += 1


def write_decathlon(root: Path, subset="dtd", n_cls=3, n_train=6, n_val=3) -> None:
    cats = [{"id": 10000001 + c, "name": f"cls{c}"} for c in range(n_cls)]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    next_id = 1
    for split, n in (("train", n_train), ("val", n_val)):
        images, anns = [], []
        for i in range(n):
            c = i % n_cls
            rel = f"data/{subset}/{split}/cls{c}/{i:04d}.jpg"
            write_image(root / rel, size=(50, 40), seed=next_id, fmt="JPEG")
            images.append({"id": next_id, "file_name": rel, "width": 50, "height": 40})
            anns.append({"id": next_id, "image_id": next_id, "category_id": cats[c]["id"]})
            next_id += 1
        (root / "annotations" / f"{subset}_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats}))
