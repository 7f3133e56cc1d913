"""Image-classification data sources: digits, Fashion-MNIST (if installed), image folders, errors."""
import gzip
import hashlib
import os
import re

import numpy as np
import pytest
import torch

from unrollattn.vision import datasets as ds
from unrollattn.vision.datasets import ImageClassificationData, load_classification_data

HAVE_FMNIST = ds._fashion_mnist_paths(None) is not None

# sha256 prefixes of what the loaders returned before they used torchvision's readers (the hand-written idx parser
# and folder walker, commit f29224e): the same inputs must still give the same tensors, splits included
BEFORE_TORCHVISION = {
    "grey_s3_9x11": {"train_images": "4d52114236ff5681", "train_labels": "072b5b1a72a18968", "test_images": "e89a8e80be4c71d6", "test_labels": "bbfdfa1ecf21e208"},
    "rgb_s1_8": {"train_images": "9b6bb8216c230704", "train_labels": "072b5b1a72a18968", "test_images": "19878348c18aaf5d", "test_labels": "bbfdfa1ecf21e208"},
    "split": {"train_images": "bbeeeaf4fdf4c395", "train_labels": "9bed28b2e65927ca", "test_images": "080b6130c54c4397", "test_labels": "abe93084a66ebf83"},
    "fmnist_full": {"train_images": "a6756d3cb47ee3eb", "train_labels": "c9521d7fe41c0761", "test_images": "d19df416d297ec64", "test_labels": "8eba24f8e6dc4436"},
    "fmnist_first100": {"train_images": "23e2740750c2c094", "train_labels": "9dafeca0250c67cd", "test_images": "01674e02919062a7", "test_labels": "ac526826a7527e7b"},
    "fmnist_sub": {"train_images": "46c95bbdcf19f053", "train_labels": "95aa2b4fb6c06c93", "test_images": "fc38821c8c4e04b2", "test_labels": "5242acda1d3b8f19"},
}


def _digest(t):
    t = t.contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _digests(data, n=None):
    return {k: _digest(getattr(data, k)[:n]) for k in ("train_images", "train_labels", "test_images", "test_labels")}


def test_digits_split_is_stratified_seeded_and_uint8():
    data = load_classification_data("digits", seed=0)
    assert (data.num_train, data.num_test) == (1438, 359)
    assert data.train_images.shape[1:] == (1, 8, 8) and data.train_images.dtype == torch.uint8
    assert int(data.train_images.max()) == 255 and int(data.train_images.min()) == 0
    assert data.num_classes == 10 and data.in_chans == 1 and data.img_size == (8, 8)
    counts = torch.bincount(data.test_labels, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # 20 % of each class of ~180
    again = load_classification_data("digits", seed=0)
    assert torch.equal(again.test_images, data.test_images)
    other = load_classification_data("digits", seed=1)
    assert not torch.equal(other.test_labels, data.test_labels) or not torch.equal(other.test_images, data.test_images)


def test_normalize_uses_training_statistics():
    data = load_classification_data("digits")
    x = data.normalize(data.train_images)
    assert x.dtype == torch.float32
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3


def test_max_train_max_test_and_resize():
    data = load_classification_data("digits", max_train=100, max_test=20, img_size=16, seed=3)
    assert data.train_images.shape == (100, 1, 16, 16) and data.test_images.shape == (20, 1, 16, 16)
    assert data.img_size == (16, 16)


@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)")
def test_fashion_mnist_full_splits():
    data = load_classification_data("fashion_mnist")
    assert data.train_images.shape == (60000, 1, 28, 28) and data.test_images.shape == (10000, 1, 28, 28)
    assert data.train_images.dtype == torch.uint8
    for labels, per_class in ((data.train_labels, 6000), (data.test_labels, 1000)):
        assert int(labels.min()) == 0 and int(labels.max()) == 9
        assert torch.equal(torch.bincount(labels), torch.full((10,), per_class))
    assert data.class_names[0] == "T-shirt/top" and len(data.class_names) == 10
    assert load_classification_data("auto", max_train=10, max_test=10).name == "fashion_mnist"


def _write_idx(path, array):
    ndim_magic = 0x0800 + array.ndim
    header = ndim_magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)")
def test_fashion_mnist_tensors_are_those_of_the_previous_reader():
    data = load_classification_data("fashion_mnist")
    assert _digests(data, 100) == BEFORE_TORCHVISION["fmnist_first100"]
    assert _digests(data) == BEFORE_TORCHVISION["fmnist_full"]
    sub = load_classification_data("fashion_mnist", max_train=50, max_test=20, img_size=14, seed=5)
    assert _digests(sub) == BEFORE_TORCHVISION["fmnist_sub"] and sub.img_size == (14, 14)


def test_fashion_mnist_from_root_with_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 12)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    data = load_classification_data("fashion_mnist", root=tmp_path)
    assert data.train_images.shape == (30, 1, 28, 28) and data.test_labels.tolist() == [i % 10 for i in range(12)]


def test_missing_fashion_mnist_root_names_files_and_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*apt-get install -y dataset-fashion-mnist"):
        load_classification_data("fashion_mnist", root=tmp_path)


def test_auto_falls_back_to_digits_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="falling back to scikit-learn digits"):
        data = load_classification_data("auto", root=tmp_path)
    assert data.name == "digits"


def test_corrupt_idx_file_is_a_value_error(tmp_path):
    for split in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            (tmp_path / f"{split}-{kind}-ubyte").write_bytes(b"\x00\x00\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="idx"):
        load_classification_data("fashion_mnist", root=tmp_path)


def _make_png_folder(root, classes=("cat", "dog", "eel"), per_class=5, size=(10, 12), mode="L"):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            shape = size if mode == "L" else (*size, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(root / c / f"{i}.png")


def _make_parity_folder(root, rgb=False):
    """Classes with nested sub-folders that sort differently as strings and as paths, a hidden and an image-less
    folder (neither is a class), upper-case and hidden image files, several modes (1, L, LA, I;16, RGB, RGBA) and sizes."""
    from PIL import Image

    rng = np.random.default_rng(7)

    def save(rel, mode, size):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if mode == "I;16":
            img = Image.fromarray(rng.integers(0, 65536, size).astype(np.uint16))
        elif mode == "1":
            img = Image.fromarray(rng.integers(0, 2, size).astype(bool))
        else:
            channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
            img = Image.fromarray(rng.integers(0, 256, (*size, channels) if channels > 1 else size, dtype=np.uint8),
                                  mode=mode)
        img.save(path)

    modes = ["L", "LA", "I;16", "1"] + (["RGB", "RGBA"] if rgb else [])
    names = ["a.png", "b/x.png", "b-c/y.png", "b/c/w.bmp", "z.PNG", ".hidden.png", "m.tiff", "k.ppm" if rgb else "k.pgm"]
    for ci, cls in enumerate(("ant", "bee", "cat")):
        for i, name in enumerate(names[: 5 + ci]):
            mode = {".bmp": "L", ".pgm": "L", ".ppm": "RGB"}.get(name[name.rindex("."):], modes[(i + ci) % len(modes)])
            save(f"{cls}/{name}", mode, (10, 13) if (i + ci) % 3 else (7, 5))
    save(".cache/a.png", "L", (10, 13))
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("no images here")
    (root / "bee" / "notes.txt").write_text("not an image suffix: skipped")


def _make_split_folder(root):
    from PIL import Image

    rng = np.random.default_rng(11)
    for split, classes, n in (("train", ("dog", "cat", "eel"), 4), ("test", ("eel", "cat"), 2)):
        for c in classes:
            for i in range(n):
                (root / split / c / f"s{i % 2}").mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(
                    root / split / c / f"s{i % 2}" / f"{i}.png")


def test_folder_tensors_and_splits_are_those_of_the_previous_walker(tmp_path):
    _make_parity_folder(tmp_path / "grey")
    _make_parity_folder(tmp_path / "rgb", rgb=True)
    _make_split_folder(tmp_path / "split")
    grey = load_classification_data(f"folder:{tmp_path / 'grey'}", img_size=(9, 11), seed=3)
    assert grey.class_names == ("ant", "bee", "cat") and grey.in_chans == 1 and grey.img_size == (9, 11)
    assert _digests(grey) == BEFORE_TORCHVISION["grey_s3_9x11"]
    rgb = load_classification_data(f"folder:{tmp_path / 'rgb'}", img_size=8, seed=1)
    assert rgb.in_chans == 3 and _digests(rgb) == BEFORE_TORCHVISION["rgb_s1_8"]
    split = load_classification_data(f"folder:{tmp_path / 'split'}")
    assert split.class_names == ("cat", "dog", "eel") and _digests(split) == BEFORE_TORCHVISION["split"]


def test_folder_follows_symlinked_sub_folders(tmp_path):
    _make_png_folder(tmp_path / "data", per_class=2)
    _make_png_folder(tmp_path / "more", classes=("extra",), per_class=3)
    os.symlink(tmp_path / "more" / "extra", tmp_path / "data" / "dog" / "linked")
    data = load_classification_data(f"folder:{tmp_path / 'data'}")
    assert data.num_train + data.num_test == 9  # torchvision's walk follows links (pathlib's rglob did not)


def test_folder_source_splits_80_20_per_class(tmp_path):
    _make_png_folder(tmp_path)
    data = load_classification_data(f"folder:{tmp_path}", seed=0)
    assert data.class_names == ("cat", "dog", "eel") and data.num_classes == 3
    assert (data.num_train, data.num_test) == (12, 3)
    assert data.train_images.shape[1:] == (1, 10, 12) and data.train_images.dtype == torch.uint8
    assert sorted(data.test_labels.tolist()) == [0, 1, 2]


def test_folder_source_rgb_resize_and_train_test_dirs(tmp_path):
    _make_png_folder(tmp_path / "train", per_class=3, mode="RGB")
    _make_png_folder(tmp_path / "test", per_class=2, mode="RGB")
    data = load_classification_data(f"folder:{tmp_path}", img_size=8)
    assert data.train_images.shape == (9, 3, 8, 8) and data.test_images.shape == (6, 3, 8, 8)
    assert data.in_chans == 3


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_classification_data(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="at least 2 class sub-folders"):
        load_classification_data(f"folder:{tmp_path}")
    from PIL import Image

    for c, size in (("a", (8, 8)), ("b", (9, 9))):
        (tmp_path / c).mkdir()
        Image.fromarray(np.zeros(size, np.uint8)).save(tmp_path / c / "x.png")
    with pytest.raises(ValueError, match="pass img_size="):
        load_classification_data(f"folder:{tmp_path}")


def test_a_file_that_is_not_an_image_is_named(tmp_path):
    _make_png_folder(tmp_path, per_class=2, size=(32, 32), mode="RGB")
    (tmp_path / "dog" / "notes.txt").write_text("not an image, and not an image suffix: skipped")
    data = load_classification_data(f"folder:{tmp_path}")
    assert data.num_train + data.num_test == 6
    bad = tmp_path / "dog" / "readme.png"
    bad.write_text("a text file with an image suffix")
    with pytest.raises(ValueError, match=f"{re.escape(str(bad))}: not a readable image"):
        load_classification_data(f"folder:{tmp_path}")
    good = (tmp_path / "cat" / "0.png").read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # truncated PNG: PIL's error would not say which file
    with pytest.raises(ValueError, match=f"{re.escape(str(bad))}: not a readable image"):
        load_classification_data(f"folder:{tmp_path}")


def test_unknown_source_and_bad_arguments():
    with pytest.raises(ValueError, match="unknown data source 'mnist'.*fashion_mnist.*digits.*folder:"):
        load_classification_data("mnist")
    with pytest.raises(ValueError, match="max_train"):
        load_classification_data("digits", max_train=0)
    with pytest.raises(ValueError, match="img_size"):
        load_classification_data("digits", img_size="big")


def test_hf_source_offline_fails_fast_with_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="could not load hub dataset"):
        load_classification_data("hf:zalando-datasets/fashion_mnist")


def test_hf_source_reads_a_local_dataset_and_detects_columns(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    rng = np.random.default_rng(0)
    features = datasets.Features({"picture": datasets.Image(), "kind": datasets.ClassLabel(names=["a", "b", "c"])})
    root = tmp_path / "ds"
    root.mkdir()
    for split, n in (("train", 12), ("test", 6)):
        rows = {"picture": [Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)) for _ in range(n)],
                "kind": [i % 3 for i in range(n)]}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(root / f"{split}.parquet"))
    data = load_classification_data(f"hf:{root}", max_train=9, img_size=4)
    assert data.class_names == ("a", "b", "c") and data.in_chans == 3
    assert data.train_images.shape == (9, 3, 4, 4) and data.test_images.shape == (6, 3, 4, 4)
    assert data.test_labels.tolist() == [0, 1, 2, 0, 1, 2]


def test_dataclass_validates_shapes_and_labels():
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="labels must lie in"):
        ImageClassificationData(images, torch.tensor([0, 1, 2, 5]), images, torch.zeros(4, dtype=torch.long),
                                num_classes=3, in_chans=1, img_size=(8, 8), name="toy")
    with pytest.raises(ValueError, match=r"\[N, 3, 8, 8\]"):
        ImageClassificationData(images, torch.zeros(4, dtype=torch.long), images, torch.zeros(4, dtype=torch.long),
                                num_classes=3, in_chans=3, img_size=(8, 8), name="toy")
