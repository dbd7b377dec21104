"""data=ffcv: spartan.train.data.ffcv_writer (folder → .beton, never hanging) and spartan.train.data.ffcv_loader.

A small ImageNet-layout JPEG tree with one colour per class (so labels can be checked against pixels) is
written once per module; every write runs under the script's own --timeout and pytest-timeout.
"""

import os
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("ffcv")

from ffcv.reader import Reader  # noqa: E402

from spartan.train.data import build_loaders, ffcv_loader  # noqa: E402
from spartan.train.data import ffcv_writer as write_ffcv  # noqa: E402
from spartan.train.data.backends.ffcv import FFCVConfig  # noqa: E402
from spartan.train.data.ffcv_loader import ffcv_loaders  # noqa: E402
from spartan.train.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from spartan.train.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.timeout(180)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "write_ffcv.py"


COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40), (40, 220, 220)]
TRAIN_PER_CLASS, VAL_PER_CLASS = 8, 5  # 40 training images (5 batches of 8), 25 validation images (odd)
CPU = torch.device("cpu")
WRITE = {"workers": 2, "timeout": 120, "progress": False}


def make_tree(root: Path, per_class: dict[str, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for label, colour in enumerate(COLOURS):
            folder = root / split / f"n{label:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                w, h = (int(v) for v in rng.integers(40, 91, size=2))
                pixels = np.clip(np.array(colour) + rng.integers(-8, 9, size=(h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{i}.JPEG", quality=95)


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    make_tree(root, {"train": TRAIN_PER_CLASS, "val": VAL_PER_CLASS})
    out = tmp_path_factory.mktemp("ffcv")
    with ThreadPoolExecutor(2) as pool:  # the two writes side by side: each starts a Python that imports FFCV
        jobs = [
            pool.submit(write_ffcv.write_split, root, split, out / f"{split}.beton", max_resolution=64, **WRITE)
            for split in ("train", "val")
        ]
        counts = [job.result() for job in jobs]
    assert counts == [5 * TRAIN_PER_CLASS, 5 * VAL_PER_CLASS]
    return out


def config(path, **overrides) -> FFCVConfig:
    values = {
        "path": str(path),
        "image_size": 48,
        "batch_size": 8,
        "num_classes": len(COLOURS),
        "num_workers": 2,
        **overrides,
    }
    return FFCVConfig(**values)


def normalized_colours() -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return (torch.tensor(COLOURS, dtype=torch.float32) / 255 - mean) / std


def check_batch(images: torch.Tensor, labels: torch.Tensor, size: int, dtype: torch.dtype) -> None:
    assert images.shape[1:] == (3, size, size) and images.dtype == dtype and images.device.type == "cpu"
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.shape == images.shape[:1] and labels.dtype == torch.int64
    low = ((0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).min()
    high = ((1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).max()
    values = images.float()
    assert values.min() >= low - 0.02 and values.max() <= high + 0.02
    # every image is its class's colour: the labels travel with their images
    means = values.mean(dim=(2, 3))
    nearest = torch.cdist(means, normalized_colours()).argmin(dim=1)
    assert torch.equal(nearest, labels), (nearest, labels)


def epoch_of(loader) -> tuple[list[torch.Tensor], torch.Tensor]:
    batches = [(images.clone(), labels.clone()) for images, labels in loader]  # FFCV reuses its buffers
    return [images for images, _ in batches], torch.cat([labels for _, labels in batches])


# ---------------------------------------------------------------------------------------------- the writer


def test_written_files_hold_every_image_with_its_label(betons):
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        reader = Reader(str(betons / f"{split}.beton"))
        assert reader.field_names == ["image", "label"]
        assert int(reader.num_samples) == 5 * per_class
        assert reader.metadata["f1"].tolist() == [label for label in range(5) for _ in range(per_class)]
        assert max(reader.metadata["f0"]["width"].max(), reader.metadata["f0"]["height"].max()) <= 64
        assert os.path.getsize(betons / f"{split}.beton") <= 2 * 2**21 + 2**16  # 2 MiB pages, 2 workers
    assert sorted(p.name for p in betons.iterdir()) == ["train.beton", "val.beton"]  # no .tmp left


def test_unreadable_images_are_named_before_writing(tmp_path):
    make_tree(tmp_path, {"train": 2})
    good = (tmp_path / "train" / "n0000" / "img_0.JPEG").read_bytes()
    (tmp_path / "train" / "n0001" / "garbage.JPEG").write_bytes(b"this is not a JPEG at all" * 10)
    (tmp_path / "train" / "n0002" / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    out = tmp_path / "out" / "train.beton"
    with pytest.raises(write_ffcv.ConversionError, match="2 unreadable") as err:
        write_ffcv.write_split(tmp_path, "train", out, **WRITE)
    assert "garbage.JPEG" in str(err.value) and "truncated.JPEG" in str(err.value)
    assert not out.exists() and not out.with_name("train.beton.tmp").exists()


def test_bad_folders_are_one_line_errors(tmp_path):
    (tmp_path / "train").mkdir()
    cases = [
        (tmp_path / "nope", "train", "is not a directory"),
        (tmp_path, "val", "has no val/ folder"),
        (tmp_path, "train", "has no class folders"),
    ]
    for data_dir, split, message in cases:
        with pytest.raises(write_ffcv.ConversionError, match=message):
            write_ffcv.write_split(data_dir, split, tmp_path / "x.beton", **WRITE)
    (tmp_path / "train" / "n0").mkdir()
    (tmp_path / "train" / "n0" / "notes.txt").write_text("no images here")
    with pytest.raises(write_ffcv.ConversionError, match=r"--data-dir .*: class folder train/n0 has no images"):
        write_ffcv.write_split(tmp_path, "train", tmp_path / "x.beton", **WRITE)
    (tmp_path / "train" / "n0" / "notes.txt").unlink()
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--data-dir",
            str(tmp_path),
            "--split",
            "val",
            "--out",
            str(tmp_path / "val.beton"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert not list(tmp_path.glob("*.beton*"))


def test_bad_options_fail_before_reading(tmp_path):
    with pytest.raises(write_ffcv.ConversionError, match="power of two"):
        write_ffcv.write_split(tmp_path, "train", tmp_path / "x.beton", page_size=3 << 20, **WRITE)
    with pytest.raises(write_ffcv.ConversionError, match="cannot hold a raw 1024x1024"):
        write_ffcv.write_split(
            tmp_path, "train", tmp_path / "x.beton", write_mode="raw", max_resolution=1024, page_size=1 << 21, **WRITE
        )
    assert write_ffcv.default_page_size(512) == 1 << 21 and write_ffcv.default_page_size(1024) == 1 << 22


def leftover_writers() -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "spartan.train.data.ffcv_writer --_child" in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


def test_a_write_past_the_timeout_is_killed(tmp_path):
    make_tree(tmp_path, {"val": 1})
    out = tmp_path / "val.beton"
    # the child needs seconds just to import FFCV: a 2 s budget always runs out
    with pytest.raises(write_ffcv.WriteFailed, match="did not finish within"):
        write_ffcv.write_split(tmp_path, "val", out, **{**WRITE, "timeout": 2})
    assert not out.exists() and not out.with_name("val.beton.tmp").exists()
    assert not leftover_writers()


def test_a_failing_writer_worker_stops_at_once_and_names_the_file(tmp_path):
    # A noise image whose JPEG (~2.8 MB) cannot fit a 2 MiB page: FFCV's worker raises, which would hang its
    # writer forever; the guard names the file and stops the writer's processes.
    make_tree(tmp_path, {"train": 1})
    noise = np.random.default_rng(0).integers(0, 256, size=(1800, 1800, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "train" / "n0003" / "huge.png")
    out = tmp_path / "train.beton"
    with pytest.raises(write_ffcv.WriteFailed, match=r"huge\.png.*page size"):
        write_ffcv.write_split(
            tmp_path, "train", out, write_mode="jpg", max_resolution=2048, page_size=1 << 21, **{**WRITE, "timeout": 90}
        )
    assert not out.exists() and not out.with_name("train.beton.tmp").exists()
    assert not leftover_writers()


# ---------------------------------------------------------------------------------------------- the loaders


@pytest.fixture(scope="module")
def val_reference(betons):
    loaders = ffcv_loaders(config(betons), rank=0, world=1, seed=0, device=CPU, train=False)
    return loaders, epoch_of(loaders.val)


def test_validation_epoch_is_every_image_once_normalized(betons, val_reference):
    loaders, (images, labels) = val_reference
    assert loaders.train is None and loaders.on_epoch is None
    assert loaders.info.num_classes == 5 and loaders.info.input_shape == (3, 48, 48)
    assert (loaders.info.train_size, loaders.info.val_size) == (0, 5 * VAL_PER_CLASS)
    assert [len(x) for x in images] == [8, 8, 8, 1]
    for batch, batch_labels in zip(images, labels.split(8)):
        check_batch(batch, batch_labels, 48, torch.float32)
    assert Counter(labels.tolist()) == {label: VAL_PER_CLASS for label in range(5)}


@pytest.mark.parametrize(
    "dtype,mode", [("float16", None), ("bfloat16", None), ("float32", "torch"), ("bfloat16", "torch")]
)
def test_validation_dtypes_and_normalizers_agree(betons, val_reference, monkeypatch, dtype, mode):
    # mode "torch" is the GPU path without CuPy (TorchNormalize), exercised here on the CPU
    monkeypatch.setattr(ffcv_loader, "NORMALIZE_MODE", mode)
    loaders = ffcv_loaders(config(betons, dtype=dtype), rank=0, world=1, seed=0, device=CPU, train=False)
    images, labels = epoch_of(loaders.val)
    _, (reference, reference_labels) = val_reference
    assert torch.equal(labels, reference_labels)
    tolerance = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}[dtype]
    for batch, expected, batch_labels in zip(images, reference, labels.split(8)):
        check_batch(batch, batch_labels, 48, getattr(torch, dtype))
        torch.testing.assert_close(batch.float(), expected, atol=tolerance, rtol=0)


def test_two_processes_split_validation_exactly(betons):
    seen, labels = [], []
    for rank in range(2):
        loaders = ffcv_loaders(config(betons, val_batch_size=4), rank=rank, world=2, seed=0, device=CPU, train=False)
        seen.append(list(loaders.val.indices))
        _, rank_labels = epoch_of(loaders.val)
        assert len(rank_labels) == len(seen[-1])  # no padding, nothing dropped
        labels += rank_labels.tolist()
    assert sorted(seen[0] + seen[1]) == list(range(5 * VAL_PER_CLASS)) and len(seen[0]) == 13
    assert Counter(labels) == {label: VAL_PER_CLASS for label in range(5)}
    last = ffcv_loaders(config(betons), rank=29, world=30, seed=0, device=CPU, train=False)
    assert list(last.val) == []  # more processes than images: nothing to evaluate, no duplicate


def test_training_epochs_resize_progressively_and_replay_on_resume(betons):
    cfg = config(betons, image_size=96, min_res=32, ramp_start_epoch=0, ramp_end_epoch=2, hflip=True)
    loaders = build_loaders(cfg, rank=0, world=1, seed=7, device=CPU, train=True)  # the lazy import path
    assert len(loaders.train) == 5 * TRAIN_PER_CLASS // 8 and loaders.info.train_size == 5 * TRAIN_PER_CLASS
    assert loaders.info.input_shape == (3, 96, 96)
    orders = []
    for epoch, size in enumerate([32, 64, 96]):
        loaders.set_epoch(epoch)
        images, labels = epoch_of(loaders.train)
        assert len(images) == len(loaders.train)
        for batch, batch_labels in zip(images, labels.split(8)):
            check_batch(batch, batch_labels, size, torch.float32)
        assert Counter(labels.tolist()) == {label: TRAIN_PER_CLASS for label in range(5)}
        orders.append(labels)
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    # a run resumed at epoch 1 draws epoch 1's order (and resolution), whatever this loader did before
    for _ in range(2):
        loaders.set_epoch(1)
        images, labels = epoch_of(loaders.train)
        assert torch.equal(labels, orders[1]) and images[0].shape[-1] == 64
    loaders.set_epoch(1, 2)  # resumed after batch 2: the rest of the same order
    assert torch.equal(epoch_of(loaders.train)[1], orders[1][16:])


def test_epoch_resolution():
    base = {"path": "x", "image_size": 224}
    assert [FFCVConfig(**base).epoch_resolution(e) for e in (0, 50)] == [224, 224]
    ramp = FFCVConfig(**base, min_res=160, ramp_start_epoch=10, ramp_end_epoch=20)
    assert [ramp.epoch_resolution(e) for e in (0, 10, 11, 15, 19, 20, 30)] == [160, 160, 160, 192, 192, 224, 224]
    at_once = FFCVConfig(**base, min_res=128, ramp_start_epoch=5, ramp_end_epoch=5)
    assert [at_once.epoch_resolution(e) for e in (4, 5)] == [128, 224]


def test_config_errors(betons, tmp_path):
    with pytest.raises(ConfigError, match=r"data.path .* has no train.beton \(write it with scripts/write_ffcv"):
        ffcv_loaders(config(tmp_path), rank=0, world=1, seed=0, device=CPU, train=True)
    with pytest.raises(ConfigError, match="data.val_path '/nowhere/v.beton' is not a file"):
        ffcv_loaders(
            config(None, train_path=str(betons / "train.beton"), val_path="/nowhere/v.beton"),
            rank=0,
            world=1,
            seed=0,
            device=CPU,
            train=True,
        )
    with pytest.raises(ConfigError, match="data.num_classes=3 .* labels 0..4"):
        ffcv_loaders(config(betons, num_classes=3), rank=0, world=1, seed=0, device=CPU, train=False)
    with pytest.raises(ConfigError, match="exceeds the 40 training images"):
        ffcv_loaders(config(betons, batch_size=64), rank=0, world=1, seed=0, device=CPU, train=True)
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        ffcv_loaders(config(betons), rank=0, world=2, seed=0, device=CPU, train=True)
