"""spartan.train.data.ffcv_decoder: the crop rules against torchvision's, and the decoder's pixels against OpenCV
on images whose stored pixels are known (raw) or nearly known (JPEG of smooth images)."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("ffcv")

import cv2  # noqa: E402
import numba  # noqa: E402
from ffcv.pipeline.graph import DecoderNode  # noqa: E402
from torchvision.transforms import RandomResizedCrop  # noqa: E402

from spartan.train.data import ffcv_writer as write_ffcv  # noqa: E402
from spartan.train.data.backends.ffcv import FFCVConfig  # noqa: E402
from spartan.train.data.ffcv_decoder import (  # noqa: E402
    CropResizeDecoder,
    center_crop,
    flip_horizontally,
    random_resized_crop,
    thread_scratch,
)
from spartan.train.data.ffcv_loader import ffcv_loaders  # noqa: E402
from spartan.train.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

pytestmark = pytest.mark.timeout(180)


IMAGES = 13  # batches of 4 with 2 threads, then a last batch of 1: fewer images than threads
SIZE = 28


@numba.njit
def _seed(seed):
    np.random.seed(seed)


_compiled_crop = numba.njit(random_resized_crop)  # as the decoder runs it


@numba.njit
def _draw_crops(count, height, width, scale_low, scale_high, log_low, log_high):
    crops = np.empty((count, 4), np.int64)
    for k in range(count):
        top, left, h, w = _compiled_crop(height, width, scale_low, scale_high, log_low, log_high)
        crops[k, 0], crops[k, 1], crops[k, 2], crops[k, 3] = top, left, h, w
    return crops


def test_random_resized_crops_follow_torchvision_rule():
    height, width, count = 300, 400, 4000
    _seed(0)
    ours = _draw_crops(count, height, width, 0.08, 1.0, np.log(3 / 4), np.log(4 / 3))
    torch.manual_seed(0)
    image = torch.empty(3, height, width)
    theirs = np.array([RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(count)])
    for crops in (ours, theirs):
        top, left, h, w = crops.T
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    (our_area, our_aspect), (their_area, their_aspect) = [
        (crops[:, 2] * crops[:, 3] / (height * width), crops[:, 3] / crops[:, 2]) for crops in (ours, theirs)
    ]
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(our_area, q) - np.quantile(their_area, q)) < 0.04
        assert abs(np.quantile(our_aspect, q) - np.quantile(their_aspect, q)) < 0.04
    assert our_area.min() >= 0.07 and our_aspect.min() > 0.74 and our_aspect.max() < 1.35
    centres = (ours[:, :2] + ours[:, 2:] / 2) / [height, width]
    assert np.allclose(centres.mean(axis=0), 0.5, atol=0.02)  # positions uniform: no corner favoured


def test_crops_that_cannot_fit_fall_back_to_the_clamped_whole_image():
    # area ≥ 90% of a 10×1000 strip never fits a 3/4..4/3 aspect ratio: centred, width clamped to 4/3 × height
    assert random_resized_crop(10, 1000, 0.9, 1.0, np.log(3 / 4), np.log(4 / 3)) == (0, 493, 10, 13)
    assert random_resized_crop(1000, 10, 0.9, 1.0, np.log(3 / 4), np.log(4 / 3)) == (493, 0, 13, 10)
    for _ in range(20):  # a square image at scale 1: only the whole image fits
        assert random_resized_crop(50, 50, 1.0, 1.0, np.log(3 / 4), np.log(4 / 3)) == (0, 0, 50, 50)
    assert center_crop(256, 320, 0.875) == (16, 48, 224, 224)
    assert center_crop(3, 2, 0.1) == (1, 0, 1, 1)


def test_flip_mirrors_in_place():
    image = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    flipped = image.copy()
    numba.njit(flip_horizontally)(flipped)
    assert np.array_equal(flipped, image[:, ::-1])


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Colour gradients: JPEG at quality 95 keeps them within a few levels, unlike noise."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    a, b, c = rng.uniform(40, 200, size=3)
    return np.stack([a + 50 * x, b + 50 * y, c + 40 * (x - y)], axis=-1).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """``(pixels, {write mode: .beton})``: images of 36–60 px, square (even labels) or with aspect ratios in
    3/4..4/3 (odd), each its own class (the label says which image a decoded one is)."""
    root = tmp_path_factory.mktemp("smooth")
    rng = np.random.default_rng(0)
    pixels = []
    for i in range(IMAGES):
        height = int(rng.integers(36, 61))
        width = height if i % 2 == 0 else int(np.clip(height * rng.uniform(0.76, 1.3), 36, 60))
        pixels.append(smooth_image(rng, height, width))
        (root / "train" / f"n{i:02d}").mkdir(parents=True)
        Image.fromarray(pixels[-1]).save(root / "train" / f"n{i:02d}" / "image.png")
    out = tmp_path_factory.mktemp("betons")
    files = {mode: out / f"{mode}.beton" for mode in ("raw", "jpg")}
    with ThreadPoolExecutor(2) as pool:
        jobs = [
            pool.submit(
                write_ffcv.write_split,
                root,
                "train",
                file,
                write_mode=mode,
                max_resolution=64,
                jpeg_quality=95,
                workers=1,
                timeout=120,
                progress=False,
            )
            for mode, file in files.items()
        ]
        assert [job.result() for job in jobs] == [IMAGES, IMAGES]
    return pixels, files


def decoded(file: Path, train: bool, **overrides) -> tuple[np.ndarray, np.ndarray]:
    """One epoch of ``data=ffcv`` (batches of 4, 2 threads unless overridden) from ``file``, un-normalized to
    uint8 H×W×3 levels (as floats), and the labels."""
    config = FFCVConfig(
        **{
            "train_path": str(file),
            "val_path": str(file),
            "image_size": SIZE,
            "batch_size": 4,
            "num_classes": IMAGES,
            "num_workers": 2,
            **overrides,
        }
    )
    loaders = ffcv_loaders(config, rank=0, world=1, seed=0, device=torch.device("cpu"), train=train)
    batches = [(images.clone(), labels.clone()) for images, labels in (loaders.train if train else loaders.val)]
    images = torch.cat([images for images, _ in batches]).permute(0, 2, 3, 1)
    levels = images * torch.tensor(IMAGENET_STD) * 255 + torch.tensor(IMAGENET_MEAN) * 255
    return levels.numpy(), torch.cat([labels for _, labels in batches]).numpy()


def area_resized(image: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    crop = image[top : top + height, left : left + width]
    return cv2.resize(crop, (SIZE, SIZE), interpolation=cv2.INTER_AREA).astype(np.float64)


@pytest.mark.parametrize("mode,threads", [("raw", 2), ("jpg", 2), ("jpg", 1)])
def test_validation_center_crops_match_opencv(stored, mode, threads):
    pixels, files = stored
    images, labels = decoded(files[mode], train=False, val_crop_ratio=0.875, num_workers=threads)
    assert labels.tolist() == list(range(IMAGES)) and images.shape == (IMAGES, SIZE, SIZE, 3)
    for image, source in zip(images, pixels):
        error = np.abs(image - area_resized(source, *center_crop(*source.shape[:2], 0.875)))
        # raw: the stored pixels themselves (OpenCV versions may round differently); jpg: quality-95 losses
        assert error.max() <= 1.01 if mode == "raw" else error.mean() <= 3, (mode, error.max(), error.mean())


def test_training_crops_of_the_whole_image_are_resized_and_half_flipped(stored):
    pixels, files = stored
    flips = []
    for _ in range(3):
        # scale 1: the crop is the whole image, so only the flip is random (for an oblong image, a draw of
        # the aspect ratio can also fit a crop 1 px narrower or shorter)
        images, labels = decoded(files["raw"], train=True, min_scale=1.0, hflip=True)
        assert len(set(labels.tolist())) == len(labels) == IMAGES - 1  # 3 full batches, each image at most once
        for image, label in zip(images, labels):
            source = pixels[label]
            expected = area_resized(source, 0, 0, *source.shape[:2])
            straight, mirrored = np.abs(image - expected).max(), np.abs(image - expected[:, ::-1]).max()
            assert min(straight, mirrored) <= (1.01 if label % 2 == 0 else 3), (label, straight, mirrored)
            flips.append(mirrored < straight)
    assert 0.2 < np.mean(flips) < 0.8  # 36 draws


def test_bad_crop_mode_is_refused():
    with pytest.raises(ValueError, match="crop must be 'random' or 'center', got 'middle'"):
        CropResizeDecoder((SIZE, SIZE), crop="middle")


@pytest.mark.parametrize("mode", ["jpg", "raw"])
def test_the_jpeg_scratch_is_a_row_per_thread_and_ffcv_allocates_only_the_output(stored, mode):
    pixels, files = stored
    file = str(files[mode])
    config = FFCVConfig(
        train_path=file, val_path=file, image_size=SIZE, batch_size=4, num_classes=IMAGES, num_workers=2
    )
    loader = ffcv_loaders(config, rank=0, world=1, seed=0, device=torch.device("cpu"), train=False).val
    node = next(n for n in loader.graph.id_to_node.values() if isinstance(n, DecoderNode) and n.field_name == "image")
    # FFCV allocates each query for every image of a batch in each of its batch slots (and pins it with CUDA):
    # the decoder asks it for the output only, not for a full-size decode row per image
    slots = loader.batches_ahead + 2
    allocated = loader.graph.allocate_memory(loader.batch_size, slots)["operation"][node.id]
    assert allocated.shape == (slots, 4, SIZE, SIZE, 3) and allocated.nbytes == slots * 4 * SIZE * SIZE * 3
    # the scratch: one row per decoding thread, each as large as the largest stored JPEG decoded
    row = node.decoder.scratch_pixels()
    assert row == (max(p.shape[0] * p.shape[1] * 3 for p in pixels) if mode == "jpg" else 0)
    before = numba.get_num_threads()
    try:
        for threads in range(1, min(2, numba.config.NUMBA_NUM_THREADS) + 1):
            numba.set_num_threads(threads)
            for make in (thread_scratch, numba.njit(thread_scratch)):  # from Python, and compiled as decode calls it
                scratch = make(row)
                assert scratch.shape == (threads, row) and scratch.nbytes == threads * row
    finally:
        numba.set_num_threads(before)
