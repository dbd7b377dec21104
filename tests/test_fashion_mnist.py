"""data=fashion_mnist (IDX files, validation split from train, separate test split) and the fmnist_* presets."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, compose_train

from spartan.train.data import build_loaders
from spartan.train.data.backends.fashion_mnist import FashionMNISTConfig, load_split, read_idx
from spartan.train.errors import ConfigError
from spartan.train.models import fmnist_resnet

TRAIN, TEST = 300, 50


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def write_fashion_mnist(folder: Path, compress: bool = True) -> Path:
    """A small Fashion-MNIST-format folder: images whose brightness depends on the class (learnable)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", TRAIN), ("t10k", TEST)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, (n, 28, 28)) + 19 * labels[:, None, None]
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
    return folder


@pytest.mark.parametrize("compress", [True, False])
def test_idx_files_read_back_exactly_gzipped_or_not(tmp_path, compress):
    array = np.random.default_rng(1).integers(0, 256, (7, 28, 28)).astype(np.uint8)
    path = tmp_path / ("x.gz" if compress else "x")
    write_idx(path, array, compress)
    assert np.array_equal(read_idx(path), array)


def test_bad_idx_files_and_missing_data_are_clear_errors(tmp_path):
    (tmp_path / "junk").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ConfigError, match="not an IDX file"):
        read_idx(tmp_path / "junk")
    short = np.zeros((5, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "short", short, compress=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-10])
    with pytest.raises(ConfigError, match="truncated"):
        read_idx(tmp_path / "short")
    with pytest.raises(ConfigError, match=r"data.path='.*empty' has no train-images-idx3-ubyte\[.gz\]"):
        load_split(tmp_path / "empty", "train")
    for bad in ({"val_size": 0}, {"val_size": 60_000}, {"image_size": 32}):
        with pytest.raises(ConfigError, match="data."):
            FashionMNISTConfig(**bad)


def test_validation_is_a_stratified_slice_of_train_and_test_is_separate(tmp_path):
    folder = write_fashion_mnist(tmp_path / "fmnist")
    config = FashionMNISTConfig(path=str(folder), val_size=50, batch_size=25, val_batch_size=1000)
    loaders = build_loaders(config)
    info = loaders.info
    assert (info.train_size, info.val_size, info.test_size, info.input_shape) == (250, 50, TEST, (1, 28, 28))
    val_images, val_labels = next(iter(loaders.val))
    test_images, test_labels = next(iter(loaders.test))
    train_images = torch.cat([images for images, _ in loaders.train])
    assert torch.bincount(val_labels).tolist() == [5] * 10  # stratified
    assert len(test_labels) == TEST
    # No validation image is also a training image; the training split is standardised.
    flat_train = {tuple(x.flatten()[:64].tolist()) for x in train_images}
    assert not any(tuple(x.flatten()[:64].tolist()) in flat_train for x in val_images)
    assert abs(float(train_images.mean())) < 0.05 and abs(float(train_images.std()) - 1) < 0.05
    # A fixed split: the same images whatever the seed.
    again = build_loaders(config, seed=7)
    assert torch.equal(next(iter(again.val))[0], val_images)


def test_fmnist_resnet_is_a_small_resnet_for_28x28():
    model = fmnist_resnet()
    params = sum(p.numel() for p in model.parameters())
    assert 200_000 <= params <= 500_000
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_a_preset_trains_and_tests_once_at_the_end_and_eval_reproduces_both(tmp_path):
    folder = write_fashion_mnist(tmp_path / "fmnist", compress=False)
    config = compose_train(
        "experiment=fmnist_spartan_s95",
        "logger=none",
        f"data.path={folder}",
        "data.val_size=50",
        "data.batch_size=50",
        "schedule.epochs=1",
    )
    assert (config.model.name, config.sparsity.method, config.sparsity.target) == ("fmnist_resnet", "spartan", 0.95)
    from spartan.train.loop import train

    summary = train(config, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    tests = [r for r in records if r["kind"] == "test"]
    assert len(tests) == 1 and tests[0]["images"] == TEST
    assert summary["test_top1"] == tests[0]["top1"]
    assert summary["val_top1"] == next(r for r in records if r["kind"] == "final")["top1"]
    assert round(summary["sparsity_all"], 4) == 0.95
    from spartan.train.evaluation import evaluate_run

    evaluated = evaluate_run(config, tmp_path / "run", tmp_path / "run" / "model_final.pt")  # what eval.py runs
    assert (evaluated["val_top1"], evaluated["test_top1"]) == (summary["val_top1"], summary["test_top1"])


def test_every_fmnist_preset_composes():
    presets = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("fmnist_*.yaml"))
    assert "fmnist_dense" in presets and "fmnist_spartan_s95" in presets
    for preset in presets:
        config = compose_train(f"experiment={preset}")
        assert config.name == preset
        assert config.data.name == "fashion_mnist"
        if preset != "fmnist_dense":
            method, sparsity = preset.removeprefix("fmnist_").split("_s")
            assert (config.sparsity.method, config.sparsity.target) == (method, int(sparsity) / 100)
