"""Offline natural colour photos for demosaicking / ×2 interpolation (docs/data.md section 1).

Sources, all installable with pip / apt and readable without network:

* ``skimage``   scikit-image's ``skimage.data`` (astronaut, chelsea, coffee, immunohistochemistry,
                motorcycle left/right are PNG = lossless; rocket, hubble_deep_field, retina are JPEG);
* ``sklearn``   scikit-learn's ``load_sample_images`` (china, flower; JPEG);
* ``matplotlib`` matplotlib's sample data (grace_hopper; JPEG);
* ``pygame-ce`` ``pygame/examples/data/peppers3.tif`` (peppers; lossless TIFF), located without importing pygame;
* ``opencv-doc`` Debian's ``opencv-doc`` images in ``/usr/share/doc/opencv-doc/examples/data`` (or the
                directory in ``$UNROLLATTN_OPENCV_DATA``): ~20 natural photos, PNG (lossless) or JPEG.

The split is FIXED by name (never random):

* test (:data:`TEST_PHOTOS`, all lossless): astronaut, chelsea, coffee, immunohistochemistry,
  motorcycle_left (skimage), peppers (pygame-ce), graf1, rubberwhale1 (opencv-doc);
* held out, used nowhere (:data:`HELD_OUT`, another view of a test scene): motorcycle_right, graf3, rubberwhale2;
* train (:data:`TRAIN_PHOTOS`): everything else in :data:`CATALOGUE` (JPEG compression artefacts are
  acceptable for training crops).

Photos whose package is missing are skipped and the data set's name says which sources were used,
e.g. "skimage+pygame-ce+opencv-doc photos" — never "Kodak" / "McMaster" (docs/data.md). Test photos
are centre-cropped to ``eval_crop`` × ``eval_crop`` (256 by default, for CPU speed; recorded in the
name) or, with ``eval_crop=0``, kept whole with the size cut to even numbers (top-left kept).
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "CATALOGUE", "HELD_OUT", "OPENCV_DATA_DIR", "PhotoDataset", "PhotoSpec", "TEST_PHOTOS", "TRAIN_PHOTOS",
    "available_photos", "center_crop", "load_photo", "load_photos", "opencv_data_dir",
]

OPENCV_DATA_DIR = Path("/usr/share/doc/opencv-doc/examples/data")
OPENCV_INSTALL = ("apt-get download opencv-doc && dpkg-deb --fsys-tarfile opencv-doc_*.deb | "
                  "tar -x -C / ./usr/share/doc/opencv-doc/examples/data")


@dataclass(frozen=True)
class PhotoSpec:
    """One photo: its name, package, file (or skimage function) and whether it is losslessly stored."""

    name: str
    source: str
    ref: str
    lossless: bool


def _spec(source: str, lossless: bool, entries: str) -> dict[str, PhotoSpec]:
    out = {}
    for item in entries.split():
        name, _, ref = item.partition("=")
        out[name] = PhotoSpec(name, source, ref or name, lossless)
    return out


CATALOGUE: dict[str, PhotoSpec] = {
    **_spec("skimage", True, "astronaut chelsea coffee immunohistochemistry motorcycle_left motorcycle_right"),
    **_spec("skimage", False, "rocket hubble_deep_field retina"),
    **_spec("sklearn", False, "china=china.jpg flower=flower.jpg"),
    **_spec("matplotlib", False, "grace_hopper=grace_hopper.jpg"),
    **_spec("pygame-ce", True, "peppers=examples/data/peppers3.tif"),
    **_spec("opencv-doc", True, "graf1=graf1.png graf3=graf3.png rubberwhale1=rubberwhale1.png "
                                "rubberwhale2=rubberwhale2.png smarties=smarties.png"),
    **_spec("opencv-doc", False, " ".join(f"{n}={n}.jpg" for n in (
        "baboon", "fruits", "building", "butterfly", "home", "apple", "orange", "board", "messi5", "leuvenA",
        "leuvenB", "aloeL", "aloeR", "squirrel_cls", "stuff", "aero1", "aero3", "left", "right", "ela_original"))),
}
TEST_PHOTOS: tuple[str, ...] = ("astronaut", "chelsea", "coffee", "immunohistochemistry", "motorcycle_left", "peppers",
                                "graf1", "rubberwhale1")
HELD_OUT: dict[str, str] = {"motorcycle_right": "motorcycle_left", "graf3": "graf1", "rubberwhale2": "rubberwhale1"}
TRAIN_PHOTOS: tuple[str, ...] = tuple(n for n in CATALOGUE if n not in TEST_PHOTOS and n not in HELD_OUT)


def opencv_data_dir() -> Path:
    """``$UNROLLATTN_OPENCV_DATA`` if set, else Debian's opencv-doc data directory."""
    return Path(os.environ.get("UNROLLATTN_OPENCV_DATA") or OPENCV_DATA_DIR)


def _pygame_dir() -> Path | None:
    spec = importlib.util.find_spec("pygame")  # locate the package without importing (and initialising) it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _path(spec: PhotoSpec) -> Path | None:
    """File of a photo on disk (None for skimage/sklearn, which have their own loaders)."""
    if spec.source == "opencv-doc":
        return opencv_data_dir() / spec.ref
    if spec.source == "pygame-ce":
        root = _pygame_dir()
        return None if root is None else root / spec.ref
    if spec.source == "matplotlib":
        import matplotlib

        return Path(matplotlib.get_data_path()) / "sample_data" / spec.ref
    if spec.source == "sklearn":
        import sklearn.datasets

        return Path(sklearn.datasets.__file__).parent / "images" / spec.ref
    return None


def _is_available(spec: PhotoSpec) -> bool:
    if spec.source == "skimage":
        return importlib.util.find_spec("skimage") is not None
    try:
        path = _path(spec)
    except ImportError:
        return False
    return path is not None and path.is_file()


def available_photos(names: Sequence[str] | None = None) -> list[str]:
    """The names of ``names`` (default: the whole catalogue) whose package is installed."""
    names = list(CATALOGUE) if names is None else list(names)
    unknown = [n for n in names if n not in CATALOGUE]
    if unknown:
        raise ValueError(f"unknown photo(s) {', '.join(map(repr, unknown))}; known: {', '.join(CATALOGUE)}")
    return [n for n in names if _is_available(CATALOGUE[n])]


@functools.lru_cache(maxsize=64)
def _load_cached(name: str) -> np.ndarray:
    spec = CATALOGUE[name]
    if spec.source == "skimage":
        import skimage.data as skd

        if name.startswith("motorcycle_"):
            left, right, _ = skd.stereo_motorcycle()
            image = left if name.endswith("left") else right
        else:
            image = getattr(skd, spec.ref)()
    else:
        path = _path(spec)
        if path is None or not path.is_file():
            hint = {"opencv-doc": OPENCV_INSTALL, "pygame-ce": "pip install pygame-ce==2.5.8"}.get(spec.source, "")
            raise FileNotFoundError(f"photo {name!r} ({spec.source}) not found at {path}" + (f"; install: {hint}" if hint else ""))
        from .datasets import read_image_file

        image = np.asarray(read_image_file(path).convert("RGB"))
    image = np.ascontiguousarray(image[..., :3])
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"photo {name!r}: expected uint8 H x W x 3, got {image.dtype} {image.shape}")
    image.setflags(write=False)
    return image


def load_photo(name: str) -> np.ndarray:
    """Photo ``name`` as a read-only uint8 array H x W x 3 (cached)."""
    if name not in CATALOGUE:
        raise ValueError(f"unknown photo {name!r}; known: {', '.join(CATALOGUE)}")
    return _load_cached(name)


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """Centre ``size`` x ``size`` crop of [..., H, W] (``size`` <= 0: cut H and W to even, keep the top-left)."""
    h, w = image.shape[-2:]
    if size <= 0:
        return image[..., : h - h % 2, : w - w % 2]
    if h < size or w < size:
        raise ValueError(f"center_crop: image {h}x{w} is smaller than the crop {size}x{size}")
    top, left = (h - size) // 2, (w - size) // 2
    return image[..., top:top + size, left:left + size]


def _to_chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()  # uint8 [3, H, W]


@dataclass
class PhotoDataset:
    """Train photos (uint8 [3, H, W] each) for random crops; test photos (uint8, cropped) for evaluation."""

    train: list[torch.Tensor]
    train_names: list[str]
    test: list[torch.Tensor]
    test_names: list[str]
    name: str
    eval_crop: int
    missing: list[str] = field(default_factory=list)

    @property
    def num_train(self) -> int:
        return len(self.train)

    def describe(self) -> dict:
        return {"name": self.name, "train": list(self.train_names), "test": list(self.test_names),
                "eval_crop": self.eval_crop, "missing": list(self.missing)}

    def test_images(self, dtype=torch.float32) -> list[torch.Tensor]:
        """Test photos as float [1, 3, H, W] in [0, 1]."""
        return [t.unsqueeze(0).to(dtype) / 255.0 for t in self.test]

    def crops(self, count: int, size: int, generator: torch.Generator, *, augment: bool = True,
              keep: slice | None = None) -> torch.Tensor:
        """``count`` random ``size`` x ``size`` crops, float [count, 3, size, size] in [0, 1] (only crops ``keep`` of
        them when given: the draws are those of all ``count``, the pixels are cut for the kept ones only).

        Each crop picks a train photo uniformly, a uniform position and (``augment``) one of the 8
        flips / transposes; everything is drawn from ``generator``, so a seeded generator gives the same crops.
        """
        if not self.train:
            raise ValueError("PhotoDataset has no training photos")
        picks = torch.randint(len(self.train), (count,), generator=generator)
        u = torch.rand(count, 2, generator=generator)
        flips = torch.randint(8, (count,), generator=generator)
        kept = range(count)[keep if keep is not None else slice(None)]
        out = torch.empty(len(kept), 3, size, size, dtype=torch.uint8)
        for slot, i in enumerate(kept):
            image = self.train[int(picks[i])]
            h, w = image.shape[-2:]
            if h < size or w < size:
                raise ValueError(f"crop {size} is larger than train photo {self.train_names[int(picks[i])]} ({h}x{w})")
            top = int(u[i, 0] * (h - size + 1))
            left = int(u[i, 1] * (w - size + 1))
            crop = image[:, top:top + size, left:left + size]
            if augment:
                f = int(flips[i])
                if f & 1:
                    crop = crop.flip(-1)
                if f & 2:
                    crop = crop.flip(-2)
                if f & 4:
                    crop = crop.transpose(-1, -2)
            out[slot] = crop
        return out.float() / 255.0


def load_photos(*, eval_crop: int = 256, test_names: Sequence[str] = TEST_PHOTOS,
                train_names: Sequence[str] | None = None, max_train: int | None = None,
                require_test: int = 1) -> PhotoDataset:
    """The fixed split of the installed photos (module doc).

    ``train_names`` defaults to :data:`TRAIN_PHOTOS`; names shared with ``test_names`` or
    :data:`HELD_OUT` raise ValueError (no leakage). ``max_train`` keeps the first photos of the train
    list (tests). At least ``require_test`` test photos must be installed.
    """
    train_names = list(TRAIN_PHOTOS if train_names is None else train_names)
    test_names = list(test_names)
    leak = sorted(set(train_names) & (set(test_names) | set(HELD_OUT)))
    if leak:
        raise ValueError(f"train photos overlap the test / held-out photos: {', '.join(leak)}")
    if eval_crop < 0:
        raise ValueError(f"eval_crop: expected >= 0 (0 = whole photo), got {eval_crop}")
    test_avail = available_photos(test_names)
    train_avail = available_photos(train_names)
    if max_train is not None:
        train_avail = train_avail[:max_train]
    if len(test_avail) < require_test:
        raise FileNotFoundError(f"only {len(test_avail)} of the test photos {test_names} are installed; "
                                "install scikit-image (and pygame-ce, opencv-doc: see docs/data.md)")
    test = [center_crop(_to_chw(load_photo(n)), eval_crop) for n in test_avail]
    train = [_to_chw(load_photo(n)) for n in train_avail]
    sources = []
    for n in test_avail + train_avail:
        src = CATALOGUE[n].source
        if src not in sources:
            sources.append(src)
    crop_text = f"centre {eval_crop}x{eval_crop} crops" if eval_crop else "whole photos"
    lossless = "lossless " if all(CATALOGUE[n].lossless for n in test_avail) else ""
    name = f"{'+'.join(sources)} photos ({len(test_avail)} {lossless}test photos, {crop_text})"
    missing = [n for n in test_names + train_names if n not in test_avail + train_avail]
    return PhotoDataset(train, train_avail, test, test_avail, name, eval_crop, missing)
