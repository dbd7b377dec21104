"""The image decoder of ``data=ffcv``: decode → crop → resize → flip, one parallel pass per batch.

It produces what FFCV's ``RandomResizedCropRGBImageDecoder`` / ``CenterCropRGBImageDecoder`` (+
``RandomHorizontalFlip``) produce — the same JPEG decoder, the same OpenCV area-interpolation resize, torchvision's
random-resized-crop rule — and is faster on few cores (``scripts/bench_loaders.py``) because:

- images go to the decoding threads one at a time (numba's chunk size 1), not in fixed shares: a stored JPEG
  costs several times a raw image, so a fixed split leaves threads waiting for the slowest;
- each thread decodes its JPEGs into one scratch row of its own (:func:`thread_scratch`), which stays in cache,
  instead of one buffer per image of the batch; the scratch is allocated per batch, one row per decoding thread,
  not by FFCV, which would allocate (and, with CUDA, pin) one full-size row per image of the batch for each of its
  batch slots (``batches_ahead + 2``); only the output is per image;
- the flip is done in place right after the resize, not by copying the whole batch once more.

The crop and flip draws come from numba's per-thread generators (not reproducible, as in FFCV).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numba
import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.state import State

CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop: tries before falling back to the whole image


def random_resized_crop(
    height: int, width: int, scale_low: float, scale_high: float, log_ratio_low: float, log_ratio_high: float
) -> tuple[int, int, int, int]:
    """``(top, left, crop_height, crop_width)`` of a random crop whose area is a fraction of the image drawn
    uniformly from ``[scale_low, scale_high]`` and whose aspect ratio (width / height) is log-uniform in
    ``[exp(log_ratio_low), exp(log_ratio_high)]``, at a uniform position. After ``CROP_ATTEMPTS`` draws that do
    not fit, the largest centred crop with the aspect ratio clamped to that range. Compiled by numba; callable
    from Python as it is."""
    area = height * width
    for _ in range(CROP_ATTEMPTS):
        target_area = area * np.random.uniform(scale_low, scale_high)
        aspect = np.exp(np.random.uniform(log_ratio_low, log_ratio_high))
        crop_width = int(round(np.sqrt(target_area * aspect)))
        crop_height = int(round(np.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = np.random.randint(0, height - crop_height + 1)
            left = np.random.randint(0, width - crop_width + 1)
            return top, left, crop_height, crop_width
    aspect = width / height
    if aspect < np.exp(log_ratio_low):
        crop_width, crop_height = width, int(round(width / np.exp(log_ratio_low)))
    elif aspect > np.exp(log_ratio_high):
        crop_width, crop_height = int(round(height * np.exp(log_ratio_high))), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def thread_scratch(pixels: int) -> np.ndarray:
    """Uninitialised uint8 scratch, one row of ``pixels`` bytes (the largest stored JPEG's height × width × 3) per
    decoding thread: ``numba.get_num_threads()`` rows where it is called, row ``numba.get_thread_id()`` for each
    thread. Compiled by numba; callable from Python as it is."""
    return np.empty((numba.get_num_threads(), pixels), np.uint8)


def center_crop(height: int, width: int, ratio: float) -> tuple[int, int, int, int]:
    """``(top, left, side, side)``: the centred square whose side is ``ratio`` × the short side (0.875 = 224/256)."""
    side = max(1, int(ratio * min(height, width)))
    return (height - side) // 2, (width - side) // 2, side, side


def flip_horizontally(image: np.ndarray) -> None:
    """Mirror an H×W×C image left ↔ right, in place."""
    height, width, channels = image.shape
    for y in range(height):
        for x in range(width // 2):
            for c in range(channels):
                image[y, x, c], image[y, width - 1 - x, c] = image[y, width - 1 - x, c], image[y, x, c]


class CropResizeDecoder(SimpleRGBImageDecoder):
    """FFCV decoder for ``RGBImageField``: each image cropped (``"random"``: :func:`random_resized_crop` with
    ``scale`` and ``ratio``; ``"center"``: :func:`center_crop` with ``center_ratio``), resized to
    ``output_size`` (height, width) with OpenCV's area interpolation, and mirrored with probability
    ``flip_prob``. Output: uint8 N×H×W×3. ``output_size`` may be changed between epochs (progressive resizing):
    FFCV allocates the buffers of every epoch anew and the code reads the size from them."""

    def __init__(
        self,
        output_size: tuple[int, int],
        crop: str = "random",
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        center_ratio: float = 0.875,
        flip_prob: float = 0.0,
    ):
        super().__init__()
        if crop not in ("random", "center"):
            raise ValueError(f"crop must be 'random' or 'center', got {crop!r}")
        self.output_size = tuple(output_size)
        self.crop = crop
        self.scale = (float(scale[0]), float(scale[1]))
        self.log_ratio = (float(np.log(ratio[0])), float(np.log(ratio[1])))
        self.center_ratio = float(center_ratio)
        self.flip_prob = float(flip_prob)

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        """The output, H×W×3 uint8 per image: FFCV's only allocation (the JPEG scratch is per thread, in the decode)."""
        height, width = self.output_size
        uint8 = np.dtype("<u1")
        return (
            replace(previous_state, jit_mode=True, shape=(height, width, 3), dtype=uint8),
            AllocationQuery((height, width, 3), uint8),
        )

    def scratch_pixels(self) -> int:
        """Bytes of one scratch row: the largest stored JPEG decoded (height × width × 3); 0 without JPEGs."""
        jpegs = self.metadata[self.metadata["mode"] == IMAGE_MODES["jpg"]]
        return int((jpegs["height"].astype(np.int64) * jpegs["width"]).max() * 3) if len(jpegs) else 0

    def generate_code(self) -> Callable:
        read = self.memory_read
        parallel_range = Compiler.get_iterator()
        decode_jpeg = Compiler.compile(imdecode)
        resize = Compiler.compile(resize_crop)
        random_crop = Compiler.compile(random_resized_crop)
        centred_crop = Compiler.compile(center_crop)
        mirror = Compiler.compile(flip_horizontally)
        scratch_rows = Compiler.compile(thread_scratch)
        pixels = self.scratch_pixels()
        is_random = self.crop == "random"
        scale_low, scale_high = self.scale
        log_ratio_low, log_ratio_high = self.log_ratio
        center_ratio, flip_prob = self.center_ratio, self.flip_prob
        jpeg = IMAGE_MODES["jpg"]

        def decode(batch_indices, destination, metadata, storage_state):
            count = len(batch_indices)
            scratch = scratch_rows(pixels)
            previous_chunk = numba.set_parallel_chunksize(1)
            for i in parallel_range(count):
                field = metadata[batch_indices[i]]
                height, width = np.int64(field["height"]), np.int64(field["width"])
                data = read(field["data_ptr"], storage_state)
                if field["mode"] == jpeg:
                    decoded = scratch[numba.get_thread_id()][: height * width * 3]
                    decode_jpeg(data, decoded, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = decoded.reshape(height, width, 3)
                else:
                    image = data.reshape(height, width, 3)
                if is_random:
                    top, left, crop_height, crop_width = random_crop(
                        height, width, scale_low, scale_high, log_ratio_low, log_ratio_high
                    )
                else:
                    top, left, crop_height, crop_width = centred_crop(height, width, center_ratio)
                resize(image, top, top + crop_height, left, left + crop_width, destination[i])
                if flip_prob > 0 and np.random.random() < flip_prob:
                    mirror(destination[i])
            numba.set_parallel_chunksize(previous_chunk)
            return destination[:count]

        decode.is_parallel = True
        return decode
