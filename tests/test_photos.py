"""Offline photo data set: fixed, disjoint split; honest name; deterministic crops."""
import numpy as np
import pytest
import torch

from unrollattn.vision import photos
from unrollattn.vision.photos import CATALOGUE, HELD_OUT, TEST_PHOTOS, TRAIN_PHOTOS, available_photos, load_photos

needs_opencv = pytest.mark.skipif(not photos.opencv_data_dir().is_dir(),
                                  reason="opencv-doc images not extracted (install.sh does)")


def test_split_is_fixed_disjoint_and_lossless():
    assert TEST_PHOTOS == ("astronaut", "chelsea", "coffee", "immunohistochemistry", "motorcycle_left", "peppers",
                           "graf1", "rubberwhale1")
    assert not set(TEST_PHOTOS) & set(TRAIN_PHOTOS)
    assert not set(HELD_OUT) & (set(TRAIN_PHOTOS) | set(TEST_PHOTOS))
    assert set(HELD_OUT.values()) <= set(TEST_PHOTOS)  # each held-out photo is another view of a test scene
    assert all(CATALOGUE[n].lossless for n in TEST_PHOTOS)
    assert set(TRAIN_PHOTOS) | set(TEST_PHOTOS) | set(HELD_OUT) == set(CATALOGUE)


def test_load_photos_names_and_crops():
    data = load_photos(eval_crop=64, test_names=("astronaut", "chelsea"), train_names=("rocket", "coffee"))
    assert data.test_names == ["astronaut", "chelsea"] and data.train_names == ["rocket", "coffee"]
    assert all(t.shape == (3, 64, 64) and t.dtype == torch.uint8 for t in data.test)
    assert data.name.startswith("skimage photos") and "64x64" in data.name and "Kodak" not in data.name
    astro = photos.load_photo("astronaut")
    assert astro.shape == (512, 512, 3) and astro.dtype == np.uint8
    assert torch.equal(data.test[0], torch.from_numpy(np.array(astro[224:288, 224:288])).permute(2, 0, 1))
    a = data.crops(3, 32, torch.Generator().manual_seed(7))
    b = data.crops(3, 32, torch.Generator().manual_seed(7))
    c = data.crops(3, 32, torch.Generator().manual_seed(8))
    assert a.shape == (3, 3, 32, 32) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    whole = load_photos(eval_crop=0, test_names=("chelsea",), train_names=())
    assert whole.test[0].shape == (3, 300, 450)  # 300 x 451 cut to even sizes


def test_leakage_and_bad_names_rejected():
    with pytest.raises(ValueError, match="overlap"):
        load_photos(test_names=("astronaut",), train_names=("astronaut",))
    with pytest.raises(ValueError, match="overlap"):
        load_photos(test_names=("astronaut",), train_names=("motorcycle_right",))
    with pytest.raises(ValueError, match="unknown photo"):
        available_photos(["kodim01"])
    with pytest.raises(ValueError, match="smaller than the crop"):
        load_photos(eval_crop=400, test_names=("chelsea",), train_names=())


@needs_opencv
def test_opencv_doc_photos_join_the_split():
    data = load_photos(eval_crop=128, max_train=None)
    assert "opencv-doc" in data.name and "graf1" in data.test_names and "baboon" in data.train_names
    assert len(data.train_names) >= 20 and not set(data.train_names) & set(data.test_names)
