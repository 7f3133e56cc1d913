"""Image-classification data held in memory as tensors (docs/data.md section 2).

``load_classification_data(source, ...)`` returns an :class:`ImageClassificationData` with uint8
images ``[N, C, H, W]`` and int64 labels. Sources:

- ``"fashion_mnist"``: the idx files of Debian's ``dataset-fashion-mnist`` (60k train / 10k test),
  or the same four files (gzipped or not) in ``root=``, read by torchvision's MNIST idx reader (never downloaded);
- ``"digits"``: scikit-learn's 8x8 digits (1797 images), a seeded stratified 80/20 split;
- ``"folder:/path"``: one sub-folder per class (or ``train/`` and ``test/`` each holding them), listed by
  torchvision's ``find_classes`` / ``make_dataset`` (``ImageFolder``'s walk); files with an image suffix
  (``IMAGE_SUFFIXES``) are read, others skipped; one that does not decode is an error naming it;
- ``"hf:<name>"``: a Hugging Face hub dataset (needs network or a cached copy with ``HF_HUB_OFFLINE=1``);
- ``"auto"``: Fashion-MNIST when its files exist, else digits (with a warning).

Normalisation lives here too: :meth:`ImageClassificationData.normalize` maps uint8 images to floats
standardised with the per-channel mean / std of the training split.
"""
from __future__ import annotations

import os
import socket
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.datasets import FashionMNIST, mnist
from torchvision.datasets.folder import find_classes, make_dataset
from torchvision.datasets.utils import extract_archive
from torchvision.transforms.functional import pil_to_tensor

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = tuple(FashionMNIST.classes)
FASHION_MNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"
SOURCES = ("auto", "fashion_mnist", "digits", "folder:<path>", "hf:<dataset name>")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
TEST_FRACTION = 0.2


@dataclass
class ImageClassificationData:
    """Train and test splits as tensors: images ``[N, C, H, W]`` (uint8 0..255), labels int64 in [0, num_classes)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    in_chans: int
    img_size: tuple[int, int]
    name: str
    class_names: tuple[str, ...] | None = None
    _stats: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.img_size = tuple(int(s) for s in self.img_size)
        expected = (self.in_chans, *self.img_size)
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.ndim != 4 or tuple(images.shape[1:]) != expected:
                raise ValueError(f"{self.name}: {split} images must be [N, {expected[0]}, {expected[1]}, {expected[2]}], "
                                 f"got {list(images.shape)}")
            if labels.shape != (images.shape[0],):
                raise ValueError(f"{self.name}: {split} labels must be [{images.shape[0]}], got {list(labels.shape)}")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(f"{self.name}: {split} labels must lie in [0, {self.num_classes}), "
                                 f"got [{int(labels.min())}, {int(labels.max())}]")
        if self.train_images.shape[0] == 0:
            raise ValueError(f"{self.name}: the training split is empty")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes")

    @property
    def num_train(self) -> int:
        return self.train_images.shape[0]

    @property
    def num_test(self) -> int:
        return self.test_images.shape[0]

    def channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std of the training images on the 0..1 scale (each shape [C])."""
        if self._stats is None:
            x = self.train_images.to(torch.float64).div_(255.0) if self.train_images.dtype == torch.uint8 \
                else self.train_images.to(torch.float64)
            mean = x.mean(dim=(0, 2, 3))
            std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
            self._stats = (mean.float(), std.float())
        return self._stats

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (0..255) or float (0..1) images ``[B, C, H, W]`` -> float32 standardised with the training stats."""
        mean, std = self.channel_stats()
        x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
        shape = (1, -1, 1, 1)
        return (x - mean.to(x.device).view(shape)) / std.to(x.device).view(shape)

    def describe(self) -> str:
        return (f"{self.name}: {self.num_train} train / {self.num_test} test, {self.num_classes} classes, "
                f"{self.in_chans}x{self.img_size[0]}x{self.img_size[1]}")


def load_classification_data(source: str = "auto", *, root: str | os.PathLike | None = None,
                             max_train: int | None = None, max_test: int | None = None,
                             img_size: int | tuple[int, int] | None = None, seed: int = 0) -> ImageClassificationData:
    """Load ``source`` (see the module docstring) into memory.

    ``max_train`` / ``max_test`` keep a seeded random subset; ``img_size`` resizes (bilinear, antialiased);
    ``seed`` fixes the subsets and the 80/20 splits of sources without a test split.
    """
    if not isinstance(source, str) or not source:
        raise ValueError(f"data source must be a non-empty string, one of {', '.join(SOURCES)}; got {source!r}")
    size = _as_size(img_size)
    for name, value in (("max_train", max_train), ("max_test", max_test)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if source == "auto":
        if _fashion_mnist_paths(root) is not None:
            source = "fashion_mnist"
        else:
            warnings.warn(f"Fashion-MNIST not found ({FASHION_MNIST_DIR}; install with `{FASHION_MNIST_INSTALL}`); "
                          "falling back to scikit-learn digits", stacklevel=2)
            source = "digits"
    if source == "fashion_mnist":
        data = _load_fashion_mnist(root)
    elif source == "digits":
        data = _load_digits(seed)
    elif source.startswith("folder:"):
        data = _load_folder(source[len("folder:"):] or (str(root) if root else ""), size, seed)
    elif source.startswith("hf:"):
        data = _load_hf(source[len("hf:"):], size, seed, max_train, max_test)
    else:
        raise ValueError(f"unknown data source {source!r}; valid: {', '.join(SOURCES)}")
    data = _subset(data, max_train, max_test, seed)
    if size is not None and size != data.img_size:
        data = _resized(data, size)
    return data


# ----------------------------------------------------------------------------------------------- helpers

def _as_size(img_size) -> tuple[int, int] | None:
    if img_size is None:
        return None
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    try:
        h, w = (int(s) for s in img_size)
    except (TypeError, ValueError):
        raise ValueError(f"img_size must be an int or (height, width), got {img_size!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"img_size must be positive, got {img_size!r}")
    return h, w


def _seeded_perm(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))


def _stratified_split(labels: torch.Tensor, seed: int, test_fraction: float = TEST_FRACTION
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, test): per class a seeded shuffle with ``round(test_fraction * n)`` to test (none if n == 1)."""
    gen = torch.Generator().manual_seed(int(seed))
    train, test = [], []
    for cls in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_test = int(round(test_fraction * idx.numel())) if idx.numel() > 1 else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _subset(data: ImageClassificationData, max_train: int | None, max_test: int | None, seed: int
            ) -> ImageClassificationData:
    if max_train is not None and max_train < data.num_train:
        keep = _seeded_perm(data.num_train, seed)[:max_train].sort().values
        data.train_images, data.train_labels = data.train_images[keep], data.train_labels[keep]
        data._stats = None
    if max_test is not None and max_test < data.num_test:
        keep = _seeded_perm(data.num_test, seed + 1)[:max_test].sort().values
        data.test_images, data.test_labels = data.test_images[keep], data.test_labels[keep]
    return data


def _resize_uint8(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if images.shape[0] == 0:
        return images.new_zeros(0, images.shape[1], *size)
    if tuple(images.shape[-2:]) == size:
        return images
    out = []
    for chunk in images.split(4096):
        y = F.interpolate(chunk.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
        out.append(y.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def _resized(data: ImageClassificationData, size: tuple[int, int]) -> ImageClassificationData:
    return ImageClassificationData(
        _resize_uint8(data.train_images, size), data.train_labels, _resize_uint8(data.test_images, size),
        data.test_labels, data.num_classes, data.in_chans, size, data.name, data.class_names)


# ----------------------------------------------------------------------------------------------- fashion-mnist

def _fashion_mnist_paths(root) -> dict[str, Path] | None:
    """The four idx files under ``root`` (default: the Debian directory), gzipped or not; None if any is missing."""
    base = Path(root) if root is not None else FASHION_MNIST_DIR
    paths = {}
    for key, stem in FASHION_MNIST_FILES.items():
        for candidate in (base / f"{stem}.gz", base / stem):
            if candidate.is_file():
                paths[key] = candidate
                break
        else:
            return None
    return paths


def _read_idx(path: Path, tmp: str, labels: bool) -> torch.Tensor:
    """torchvision's idx reader on ``path`` (a gzipped file is first decompressed into ``tmp``: the reader opens
    plain files only); ValueError naming the file when it is not idx data of the expected kind."""
    if path.suffix == ".gz":
        extract_archive(str(path), tmp)
        plain = os.path.join(tmp, path.stem)
    else:
        plain = str(path)
    try:
        return mnist.read_label_file(plain) if labels else mnist.read_image_file(plain)
    except (AssertionError, KeyError, RuntimeError, TypeError, ValueError) as err:  # the reader asserts on bad headers
        raise ValueError(f"{path}: not an idx file of {1 if labels else 3}-D uint8 data "
                         f"({type(err).__name__}: {err})") from None


def _load_fashion_mnist(root) -> ImageClassificationData:
    paths = _fashion_mnist_paths(root)
    if paths is None:
        where = Path(root) if root is not None else FASHION_MNIST_DIR
        names = ", ".join(f"{s}[.gz]" for s in FASHION_MNIST_FILES.values())
        raise FileNotFoundError(f"Fashion-MNIST not found in {where}: expected {names}. "
                                f"Install it with `{FASHION_MNIST_INSTALL}` or pass root=<dir with those files>")
    with tempfile.TemporaryDirectory(prefix="unrollattn-fmnist-") as tmp:
        t = {k: _read_idx(p, tmp, labels=k.endswith("labels")) for k, p in paths.items()}
    return ImageClassificationData(t["train_images"].unsqueeze(1), t["train_labels"], t["test_images"].unsqueeze(1),
                                   t["test_labels"], num_classes=10, in_chans=1,
                                   img_size=tuple(t["train_images"].shape[-2:]), name="fashion_mnist",
                                   class_names=FASHION_MNIST_CLASSES)


# ----------------------------------------------------------------------------------------------- digits

def _load_digits(seed: int) -> ImageClassificationData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train, test = _stratified_split(labels, seed)
    return ImageClassificationData(images[train], labels[train], images[test], labels[test], num_classes=10,
                                   in_chans=1, img_size=(8, 8), name="digits",
                                   class_names=tuple(str(c) for c in range(10)))


# ----------------------------------------------------------------------------------------------- image folder

_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


def _pil_to_tensor(img, mode: str, size: tuple[int, int] | None) -> torch.Tensor:
    """PIL image -> uint8 [C, H, W] in ``mode`` ("L" or "RGB"), resized to ``size`` (H, W) when given."""
    from PIL import Image

    if img.mode in ("I", "I;16", "F"):  # high bit depth grey: rescale to 0..255 before converting
        arr = np.asarray(img, dtype=np.float64)
        span = arr.max() - arr.min()
        img = Image.fromarray(np.round(255 * (arr - arr.min()) / (span if span > 0 else 1)).astype(np.uint8))
    img = img.convert(mode)
    if size is not None and (img.height, img.width) != size:
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return pil_to_tensor(img)


def _list_class_folder(path: Path) -> dict[str, list[Path]]:
    """Class name -> its image files at any depth, found by torchvision's ``find_classes`` / ``make_dataset``.
    Hidden folders and folders without images are not classes; each class's files are in sorted path order."""
    try:
        names = [c for c in find_classes(path)[0] if not c.startswith(".")]
    except FileNotFoundError:  # no sub-folder at all
        names = []
    samples = make_dataset(path, {c: i for i, c in enumerate(names)}, extensions=tuple(IMAGE_SUFFIXES),
                           allow_empty=True) if names else []
    classes = {}
    for file, i in samples:
        classes.setdefault(names[i], []).append(Path(file))
    return {c: sorted(classes[c]) for c in names if c in classes}


def read_image_file(path: Path):
    """The decoded PIL image at ``path``; ValueError naming the file when it is not a readable image (another
    kind of file with an image suffix, a truncated or corrupt image)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # PIL's decoder errors
        raise ValueError(f"{path}: not a readable image ({type(err).__name__}: {err}); remove or replace the file") \
            from None


def _read_images(files: list[Path], size: tuple[int, int] | None) -> tuple[list, str, tuple[int, int]]:
    return _images_to_tensors([read_image_file(f) for f in files], size)


def _images_to_tensors(images: list, size: tuple[int, int] | None) -> tuple[list, str, tuple[int, int]]:
    """PIL images (or arrays) -> uint8 tensors in one mode ("L" if all are grey, else "RGB") and one size."""
    from PIL import Image

    images = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im)) for im in images]
    mode = "L" if all(im.mode in _GREY_MODES for im in images) else "RGB"
    if size is None:
        sizes = {(im.height, im.width) for im in images}
        if len(sizes) > 1:
            raise ValueError(f"images have {len(sizes)} different sizes (e.g. {sorted(sizes)[:3]}); pass img_size=")
        size = sizes.pop()
    return [_pil_to_tensor(im, mode, size) for im in images], mode, size


def _load_folder(path: str, size: tuple[int, int] | None, seed: int) -> ImageClassificationData:
    if not path:
        raise ValueError("folder source needs a path: 'folder:/path/to/images' (one sub-folder per class)")
    base = Path(path).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"image folder {base} does not exist (expected one sub-folder per class, "
                                "or train/ and test/ each with one sub-folder per class)")
    has_splits = (base / "train").is_dir() and (base / "test").is_dir()
    if has_splits:
        train_cls, test_cls = _list_class_folder(base / "train"), _list_class_folder(base / "test")
        unknown = sorted(set(test_cls) - set(train_cls))
        if unknown:
            raise ValueError(f"{base}/test has classes missing from {base}/train: {unknown}")
    else:
        train_cls, test_cls = _list_class_folder(base), {}
    if len(train_cls) < 2:
        raise ValueError(f"{base}: expected at least 2 class sub-folders holding images "
                         f"({', '.join(sorted(IMAGE_SUFFIXES))}), found {len(train_cls)}")
    class_names = tuple(train_cls)
    index = {c: i for i, c in enumerate(class_names)}
    files = [f for c in class_names for f in train_cls[c]] + [f for c in test_cls for f in test_cls[c]]
    labels = torch.tensor([index[c] for c in class_names for _ in train_cls[c]] +
                          [index[c] for c in test_cls for _ in test_cls[c]], dtype=torch.int64)
    tensors, mode, size = _read_images(files, size)
    images = torch.stack(tensors)
    n_train = sum(len(v) for v in train_cls.values())
    if has_splits:
        train, test = torch.arange(n_train), torch.arange(n_train, len(files))
    else:
        train, test = _stratified_split(labels, seed)
    return ImageClassificationData(images[train], labels[train], images[test], labels[test],
                                   num_classes=len(class_names), in_chans=1 if mode == "L" else 3, img_size=size,
                                   name=f"folder:{base.name}", class_names=class_names)


# ----------------------------------------------------------------------------------------------- hugging face

def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _check_hub_reachable(timeout: float = 3.0) -> None:
    """Fail fast (instead of minutes of retries) when the hub endpoint cannot be reached."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        raise ConnectionError(
            f"cannot reach the Hugging Face hub at {host}:{port} ({err}); 'hf:' sources need network access, "
            "or a cached copy with HF_HUB_OFFLINE=1. Offline sources: fashion_mnist, digits, folder:<path>") from None


def _pick_columns(features) -> tuple[str, str]:
    from datasets import ClassLabel, Image

    image_cols = [k for k, f in features.items() if isinstance(f, Image)]
    label_cols = [k for k, f in features.items() if isinstance(f, ClassLabel)]
    if not image_cols:
        image_cols = [k for k in ("image", "img", "pixel_values") if k in features]
    if not label_cols:
        label_cols = [k for k in ("label", "labels", "fine_label", "target", "class") if k in features]
    if not image_cols or not label_cols:
        raise ValueError(f"could not find an image column and a label column among {list(features)} "
                         "(expected an Image feature and a ClassLabel/'label' column)")
    return image_cols[0], label_cols[0]


def _load_hf(name: str, size: tuple[int, int] | None, seed: int, max_train: int | None, max_test: int | None
             ) -> ImageClassificationData:
    """A hub dataset (or a local dataset directory, e.g. parquet files named train / test) via ``load_dataset``."""
    if not name:
        raise ValueError("hf source needs a dataset name: 'hf:<owner>/<dataset>' (or a local dataset directory)")
    import datasets

    local = Path(name).expanduser().exists()
    if not local and not _hub_offline():
        _check_hub_reachable()
    try:
        dsd = datasets.load_dataset(str(Path(name).expanduser()) if local else name)
    except (ConnectionError, OSError) as err:
        raise ConnectionError(f"could not load hub dataset {name!r}: {err}. Offline sources: fashion_mnist, "
                              "digits, folder:<path>") from None
    if not isinstance(dsd, datasets.DatasetDict) or "train" not in dsd:
        raise ValueError(f"dataset {name!r} has no 'train' split (splits: {list(dsd) if hasattr(dsd, 'keys') else '-'})")
    train_ds = dsd["train"]
    image_col, label_col = _pick_columns(train_ds.features)
    label_feature = train_ds.features[label_col]
    class_names = tuple(label_feature.names) if isinstance(label_feature, datasets.ClassLabel) else None
    test_key = next((k for k in ("test", "validation", "valid", "val") if k in dsd), None)
    if test_key is not None:
        test_ds = dsd[test_key]
    else:  # no test split: a stratified 80/20 split of train, chosen from the labels before decoding images
        train_idx, test_idx = _stratified_split(torch.tensor(train_ds[label_col], dtype=torch.int64), seed)
        train_ds, test_ds = train_ds.select(train_idx.tolist()), train_ds.select(test_idx.tolist())

    def take(ds, limit, offset):  # subset before decoding: only the kept images are read
        if limit is not None and limit < len(ds):
            ds = ds.select(_seeded_perm(len(ds), seed + offset)[:limit].sort().values.tolist())
        return ds

    train_ds, test_ds = take(train_ds, max_train, 0), take(test_ds, max_test, 1)
    pil_train, pil_test = list(train_ds[image_col]), list(test_ds[image_col])
    tensors, mode, size = _images_to_tensors(pil_train + pil_test, size)
    labels = torch.tensor(list(train_ds[label_col]) + list(test_ds[label_col]), dtype=torch.int64)
    num_classes = len(class_names) if class_names else int(labels.max()) + 1
    images, n = torch.stack(tensors), len(pil_train)
    return ImageClassificationData(images[:n], labels[:n], images[n:], labels[n:], num_classes=num_classes,
                                   in_chans=1 if mode == "L" else 3, img_size=size, name=f"hf:{name}",
                                   class_names=class_names)


__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "IMAGE_SUFFIXES", "ImageClassificationData", "SOURCES",
           "load_classification_data", "read_image_file"]
