"""Loaders of the paper's real dataset formats, on tiny files written in those formats."""

from __future__ import annotations

import gzip
import json
import os
import pickle

import numpy as np
import pytest
import torch

from unirep.data import DataFormatError, detect_format, load_dataset

from data_helpers import (write_cifar10, write_daimler, write_decathlon, write_folder_tree,
                          write_gtsrb, write_idx, write_image, write_mnist, write_svhn)


def _check(ds, n_train, n_test, num_classes, size=64):
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = getattr(ds, split)
        assert x.dtype == torch.uint8 and x.shape == (n, 3, size, size)
        assert y.dtype == torch.int64 and y.shape == (n,)
        assert int(y.min()) >= 0 and int(y.max()) < num_classes
    assert len(ds.classes) == num_classes


# ------------------------------------------------------------------ MNIST
@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path, gz):
    raw = write_mnist(tmp_path, 12, 6, gz=gz)
    assert detect_format(tmp_path) == "mnist"
    ds = load_dataset(tmp_path, image_size=28)
    _check(ds, 12, 6, 10, 28)
    x, y = ds.train
    # 28x28 is kept exactly, grey becomes three identical channels
    assert torch.equal(x[:, 0], torch.from_numpy(raw["train"][0]))
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    assert y.tolist() == raw["train"][1].tolist()
    assert ds.kind == "digits" and not ds.flip
    assert load_dataset(tmp_path).train[0].shape == (12, 3, 64, 64)


def test_mnist_truncated_file_named(tmp_path):
    write_mnist(tmp_path)
    f = tmp_path / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(DataFormatError, match="train-images-idx3-ubyte") as e:
        load_dataset(tmp_path, "mnist")
    assert "truncated" in str(e.value)


def test_mnist_corrupt_gzip_named(tmp_path):
    write_mnist(tmp_path, gz=True)
    f = tmp_path / "t10k-labels-idx1-ubyte.gz"
    f.write_bytes(f.read_bytes()[:12])
    with pytest.raises(DataFormatError, match="t10k-labels-idx1-ubyte.gz"):
        load_dataset(tmp_path, "mnist")


def test_mnist_bad_magic_and_missing(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x12\x34\x56\x78" + bytes(100))
    with pytest.raises(DataFormatError, match="t10k-images-idx3-ubyte.*magic"):
        load_dataset(tmp_path, "mnist")
    os.remove(tmp_path / "t10k-images-idx3-ubyte")
    with pytest.raises(DataFormatError, match="t10k-images-idx3-ubyte.*not found"):
        load_dataset(tmp_path, "mnist")


def test_mnist_label_out_of_range(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 12] + [0] * 9, np.uint8))
    with pytest.raises(DataFormatError, match="train-labels-idx1-ubyte.*out of range"):
        load_dataset(tmp_path, "mnist")


# ------------------------------------------------------------------ CIFAR-10
def test_cifar10_pickles(tmp_path):
    raw = write_cifar10(tmp_path, per_batch=4, n_batches=2)
    assert detect_format(tmp_path) == "cifar10"
    ds = load_dataset(tmp_path, image_size=32)
    _check(ds, 8, 4, 10, 32)
    assert ds.classes[0] == "airplane" and ds.classes[9] == "truck"
    x0, y0 = raw["train"][0]
    assert torch.equal(ds.train[0][:4], torch.from_numpy(x0.reshape(4, 3, 32, 32)))
    assert ds.train[1][:4].tolist() == y0
    assert ds.test[1].tolist() == raw["test"][0][1]
    assert ds.flip


def test_cifar10_corrupt_and_malicious(tmp_path):
    write_cifar10(tmp_path)
    root = tmp_path / "cifar-10-batches-py"
    (root / "data_batch_2").write_bytes(b"\x80\x02}q\x00(garbage")
    with pytest.raises(DataFormatError, match="data_batch_2"):
        load_dataset(tmp_path, "cifar10")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    (root / "data_batch_2").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(DataFormatError, match="data_batch_2.*refusing"):
        load_dataset(tmp_path, "cifar10")


def test_cifar10_label_out_of_range(tmp_path):
    write_cifar10(tmp_path)
    f = tmp_path / "cifar-10-batches-py" / "test_batch"
    with open(f, "wb") as fh:
        pickle.dump({b"labels": [0, 3, 10, 1], b"data": np.zeros((4, 3072), np.uint8)}, fh, protocol=2)
    with pytest.raises(DataFormatError, match="test_batch.*out of range"):
        load_dataset(tmp_path, "cifar10")


# ------------------------------------------------------------------ SVHN
def test_svhn_mat(tmp_path):
    raw = write_svhn(tmp_path, 12, 5)
    assert detect_format(tmp_path) == "svhn"
    ds = load_dataset(tmp_path, image_size=32)
    _check(ds, 12, 5, 10, 32)
    y_raw = raw["train"][1].reshape(-1)
    assert ds.train[1].tolist() == [int(v) % 10 for v in y_raw]
    assert 0 in ds.train[1].tolist() and 10 not in ds.train[1].tolist()   # label 10 -> digit 0
    x_raw = raw["train"][0]
    assert torch.equal(ds.train[0][3], torch.from_numpy(x_raw[:, :, :, 3].transpose(2, 0, 1).copy()))
    assert ds.kind == "digits" and not ds.flip


def test_svhn_label_out_of_range_and_corrupt(tmp_path):
    import scipy.io

    write_svhn(tmp_path)
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8),
                                                   "y": np.array([[3], [11]], np.uint8)})
    with pytest.raises(DataFormatError, match="test_32x32.mat.*out of range"):
        load_dataset(tmp_path, "svhn")
    (tmp_path / "test_32x32.mat").write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(DataFormatError, match="test_32x32.mat"):
        load_dataset(tmp_path, "svhn")


# ------------------------------------------------------------------ folders
def test_folder_tree_split_80_20(tmp_path):
    write_folder_tree(tmp_path / "caltech", ("001.ak47", "002.bat", "003.cake"), per_class=10)
    root = tmp_path / "caltech"
    assert detect_format(root) == "folder"
    ds = load_dataset(root, image_size=48)
    _check(ds, 24, 6, 3, 48)
    assert ds.classes == ["001.ak47", "002.bat", "003.cake"]
    assert torch.bincount(ds.test[1]).tolist() == [2, 2, 2]       # stratified 20 %
    again = load_dataset(root, image_size=48)                       # fixed seed
    assert torch.equal(again.test[0], ds.test[0]) and torch.equal(again.train[1], ds.train[1])
    # train and test images are disjoint and together hold every image once
    allx = torch.cat([ds.train[0], ds.test[0]]).reshape(30, -1)
    assert len({tuple(r.tolist()[:64]) for r in allx}) == 30
    # grey images were turned into RGB with equal channels
    grey = [i for i in range(30) if torch.equal(allx.reshape(30, 3, -1)[i, 0], allx.reshape(30, 3, -1)[i, 1])]
    assert len(grey) >= 5


def test_folder_tree_with_splits_and_nested_omniglot(tmp_path):
    root = tmp_path / "sketches"
    write_folder_tree(root / "train", ("apple", "bell"), per_class=3, ext=".jpg")
    write_folder_tree(root / "test", ("apple", "bell"), per_class=2, ext=".jpg")
    ds = load_dataset(root, image_size=32)
    _check(ds, 6, 4, 2, 32)
    assert ds.test[1].tolist() == [0, 0, 1, 1]

    om = tmp_path / "omniglot"
    for alpha in ("Greek", "Latin"):
        for ch in ("character01", "character02"):
            for i in range(5):
                write_image(om / "images_background" / alpha / ch / f"{i}.png", (105, 105), "L", seed=i)
    ds = load_dataset(om, image_size=32)
    assert ds.classes == ["Greek/character01", "Greek/character02", "Latin/character01",
                          "Latin/character02"]
    assert ds.kind == "characters" and not ds.flip
    _check(ds, 16, 4, 4, 32)


def test_folder_errors_name_the_file(tmp_path):
    root = tmp_path / "plankton"
    write_folder_tree(root, ("acantharia", "copepod"), per_class=3)
    (root / "diatom").mkdir()
    with pytest.raises(DataFormatError, match="diatom.*empty class folder"):
        load_dataset(root)
    (root / "diatom").rmdir()
    bad = root / "copepod" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(DataFormatError, match="broken.png.*cannot decode"):
        load_dataset(root)
    bad.unlink()
    assert load_dataset(root).num_classes == 2


# ------------------------------------------------------------------ GTSRB
def test_gtsrb_train_folders_and_test_csv(tmp_path):
    labels = write_gtsrb(tmp_path, n_classes=3, per_class=3, n_test=4)
    assert detect_format(tmp_path) == "gtsrb"
    ds = load_dataset(tmp_path, image_size=32)
    _check(ds, 9, 4, 3, 32)
    assert ds.classes == ["00000", "00001", "00002"]
    assert ds.test[1].tolist() == labels
    assert ds.train[1].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_gtsrb_label_out_of_range_and_missing_image(tmp_path):
    write_gtsrb(tmp_path)
    csv = tmp_path / "GT-final_test.csv"
    csv.write_text(csv.read_text().replace(";1\n", ";7\n", 1))
    with pytest.raises(DataFormatError, match="GT-final_test.csv.*out of range"):
        load_dataset(tmp_path, "gtsrb")
    write_gtsrb(tmp_path)
    (tmp_path / "Final_Test" / "Images" / "00002.ppm").unlink()
    with pytest.raises(DataFormatError, match="00002.ppm.*not found"):
        load_dataset(tmp_path, "gtsrb")


# ------------------------------------------------------------------ Daimler
def test_daimler_partitions(tmp_path):
    write_daimler(tmp_path, per_folder=3)
    assert detect_format(tmp_path) == "daimler"
    ds = load_dataset(tmp_path, image_size=32)
    _check(ds, 12, 6, 2, 32)
    assert ds.classes == ["non-pedestrian", "pedestrian"]
    assert torch.bincount(ds.train[1]).tolist() == [6, 6]
    assert torch.equal(ds.train[0][:, 0], ds.train[0][:, 2])           # grey -> RGB


# ------------------------------------------------------------------ Decathlon
def test_decathlon_json(tmp_path):
    write_decathlon(tmp_path, "dtd", n_cls=3, n_train=6, n_val=3)
    assert detect_format(tmp_path) == "decathlon"
    ds = load_dataset(tmp_path, image_size=32)
    _check(ds, 6, 3, 3, 32)
    assert ds.name == "dtd" and ds.classes == ["cls0", "cls1", "cls2"]
    assert ds.train[1].tolist() == [0, 1, 2, 0, 1, 2]


def test_decathlon_bad_category_and_corrupt_json(tmp_path):
    write_decathlon(tmp_path, "dtd")
    f = tmp_path / "annotations" / "dtd_val.json"
    ann = json.loads(f.read_text())
    ann["annotations"][1]["category_id"] = 99
    f.write_text(json.dumps(ann))
    with pytest.raises(DataFormatError, match="dtd_val.json.*out of range"):
        load_dataset(tmp_path, "decathlon")
    f.write_text("{not json")
    with pytest.raises(DataFormatError, match="dtd_val.json.*corrupt JSON"):
        load_dataset(tmp_path, "decathlon")


# ------------------------------------------------------------------ dispatch
def test_unknown_format_and_missing_root(tmp_path):
    write_mnist(tmp_path)
    with pytest.raises(ValueError, match="unknown dataset format 'imagenet'.*mnist"):
        load_dataset(tmp_path, format="imagenet")
    with pytest.raises(DataFormatError, match="nowhere"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="empty.*cannot detect"):
        load_dataset(tmp_path / "empty")


def test_loaded_dataset_whitening_stats(tmp_path):
    write_cifar10(tmp_path, per_batch=8)
    ds = load_dataset(tmp_path, image_size=32)
    w = ds.whiten(ds.train[0]).double()
    assert torch.allclose(w.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(w.std(dim=(0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-3)


def test_paths_expand_home_and_environment_variables(tmp_path, monkeypatch):
    """The docs' own `load_dataset("~/data/mnist")` (and `$DATA/mnist`) work."""
    write_mnist(tmp_path / "data" / "mnist")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DATA", str(tmp_path / "data"))
    expected = load_dataset(tmp_path / "data" / "mnist", image_size=8)
    for spelling in ("~/data/mnist", "$DATA/mnist", "${DATA}/mnist"):
        assert detect_format(spelling) == "mnist"
        ds = load_dataset(spelling, image_size=8)
        assert torch.equal(ds.train[0], expected.train[0]) and ds.name == "mnist"
    with pytest.raises(DataFormatError, match=f"{tmp_path}/data/nothing: dataset path not found"):
        load_dataset("~/data/nothing")
