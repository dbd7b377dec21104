"""Data pipelines: ImageFolder and WebDataset loaders, augmentation, Mixup/CutMix, samplers, bad data."""

import collections
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import ROOT, compose_train, run_cli, write_image_folder
from spartan.train.config import ConfigError, DataConfig
from spartan.train.data import build_loaders
from spartan.train.data.samplers import RepeatedAugmentSampler
from spartan.train.data.transforms import batch_mixer

sys.path.insert(0, str(ROOT / "scripts"))
from write_ffcv import write_split  # noqa: E402
from write_webdataset import write_shards  # noqa: E402

CLASSES, PER_CLASS = 4, 6


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data") / "images", CLASSES, PER_CLASS)


@pytest.fixture(scope="module")
def shards(images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wds") / "shards"
    for split in ("train", "val"):
        assert write_shards(images, split, out, samples_per_shard=5) == CLASSES * PER_CLASS
    return out


@pytest.fixture(scope="module")
def betons(images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ffcv")
    for split in ("train", "val"):
        write_split(images, split, out / f"{split}.beton", workers=2, progress=False, timeout=300)
    return out


def data_config(name: str, path: Path, **overrides) -> DataConfig:
    fields = dict(name=name, path=str(path), channels=3, image_size=32, batch_size=4, num_classes=CLASSES,
                  hflip=True, shuffle_buffer=8)
    return DataConfig(**{**fields, **overrides})


def epoch_labels(loader) -> collections.Counter:
    return collections.Counter(int(y) for _, labels in loader for y in labels)


@pytest.mark.parametrize("name", ["imagefolder", "webdataset"])
def test_loaders_give_normalized_batches_and_every_val_label_once(name, images, shards):
    loaders = build_loaders(data_config(name, images if name == "imagefolder" else shards, num_workers=1))
    assert loaders.info.num_classes == CLASSES and loaders.info.input_shape == (3, 32, 32)
    assert len(loaders.train) == CLASSES * PER_CLASS // 4
    loaders.set_epoch(0)
    batches = list(loaders.train)
    assert len(batches) == len(loaders.train)
    x, y = batches[0]
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert -3 < float(x.mean()) < 3 and float(x.std()) > 0.05  # normalized, not 0..255
    assert epoch_labels(loaders.val) == {c: PER_CLASS for c in range(CLASSES)}


@pytest.mark.parametrize("name", ["imagefolder", "webdataset"])
def test_two_processes_split_validation_exactly(name, images, shards):
    path = images if name == "imagefolder" else shards
    parts = [epoch_labels(build_loaders(data_config(name, path), rank=r, world=2).val) for r in range(2)]
    assert parts[0] + parts[1] == {c: PER_CLASS for c in range(CLASSES)}


@pytest.mark.parametrize("name", ["imagefolder", "webdataset"])
def test_an_epoch_replays_exactly(name, images, shards):
    loaders = build_loaders(data_config(name, images if name == "imagefolder" else shards, num_workers=2))

    def epoch(k):
        torch.manual_seed(123)
        loaders.set_epoch(k)
        return torch.cat([x for x, _ in loaders.train])

    assert torch.equal(epoch(1), epoch(1)) and not torch.equal(epoch(1), epoch(2))


def test_augmentation_options_run(images):
    config = data_config("imagefolder", images, auto_augment="randaugment", random_erasing=0.5, repeated_augment=3)
    loaders = build_loaders(config)
    loaders.set_epoch(0)
    assert next(iter(loaders.train))[0].shape == (4, 3, 32, 32)
    config = data_config("imagefolder", images, auto_augment="trivialaugment")
    assert next(iter(build_loaders(config).train))[0].shape == (4, 3, 32, 32)


@pytest.mark.parametrize("mixup, cutmix", [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_mixup_and_cutmix_give_soft_targets_summing_to_one(mixup, cutmix):
    mix = batch_mixer(DataConfig(mixup_alpha=mixup, cutmix_alpha=cutmix, num_classes=5), 5)
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 5
    torch.manual_seed(0)
    mixed, targets = mix(images, labels)
    assert mixed.shape == images.shape and targets.shape == (8, 5)
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    assert (targets > 0).sum() > 8  # two classes per row: really mixed
    assert batch_mixer(DataConfig(), 5) is None


def test_repeated_augmentation_deals_copies_to_different_processes():
    samplers = [RepeatedAugmentSampler(12, rank, 3, repeats=3, seed=0) for rank in range(3)]
    shares = [list(s) for s in samplers]
    assert all(len(s) == 4 for s in shares)  # an epoch is as long as without repetition
    for k in range(4):  # the three copies of an image go to the three processes
        assert len({shares[r][k] for r in range(3)}) == 1
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != shares[0]


def test_corrupt_images_are_skipped_by_name(tmp_path):
    root = write_image_folder(tmp_path / "images", CLASSES, PER_CLASS)
    bad = root / "train" / "n00000001" / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    loaders = build_loaders(data_config("imagefolder", root, batch_size=25))  # the whole train set in one batch
    loaders.set_epoch(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, labels = next(iter(loaders.train))
    assert len(labels) == CLASSES * PER_CLASS  # 25 files, the unreadable one dropped
    assert any("broken.JPEG" in str(w.message) for w in caught)
    assert collections.Counter(labels.tolist()) == {c: PER_CLASS for c in range(CLASSES)}  # no label shifted

    out = tmp_path / "shards"
    write_shards(root, "train", out)
    write_shards(root, "val", out)
    # 5 batches of 5 from 24 readable samples: the stream must pass the broken one (and cycle on).
    loaders = build_loaders(data_config("webdataset", out, batch_size=5, shuffle_buffer=1))
    loaders.set_epoch(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seen = sum(len(y) for _, y in loaders.train)
    assert seen == len(loaders.train) * 5 == 25 and any("skipping unreadable sample" in str(w.message) for w in caught)


def test_missing_and_empty_data_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="is not a directory"):
        build_loaders(data_config("imagefolder", tmp_path / "nope"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(ConfigError, match="has no class folders"):
        build_loaders(data_config("imagefolder", tmp_path / "empty"))
    (tmp_path / "empty" / "train" / "cat").mkdir()
    with pytest.raises(ConfigError, match="class folder train/cat has no images"):
        build_loaders(data_config("imagefolder", tmp_path / "empty"))
    with pytest.raises(ConfigError, match="has no val/\\*.tar shards"):
        build_loaders(data_config("webdataset", tmp_path / "empty"))
    done = run_cli("scripts/write_webdataset.py", "--data-dir", str(tmp_path / "nope"), "--split", "train",
                   "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert done.returncode == 1 and "error: --data-dir" in done.stderr


@pytest.mark.parametrize("name", ["imagefolder", "webdataset", "ffcv"])
def test_train_py_runs_an_epoch_from_real_image_data(name, images, shards, betons, tmp_path):
    path = {"imagefolder": images, "webdataset": shards, "ffcv": betons}[name]
    run_dir = tmp_path / "run"
    done = run_cli("train.py", "logger=none", "model=resnet18", f"data={name}", f"data.path={path}",
                   "data.image_size=32", "data.batch_size=8", "data.num_workers=1", f"data.num_classes={CLASSES}",
                   "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0", "schedule.epochs=1", "sparsity.target=0.5",
                   f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == CLASSES * PER_CLASS // 8 and summary["sparsity_all"] == pytest.approx(0.5, abs=1e-4)
    final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-2]
    assert final["kind"] == "final" and final["images"] == CLASSES * PER_CLASS


def test_ffcv_and_webdataset_are_imported_only_when_selected(tmp_path):
    code = ("import sys, train, eval; from spartan.train.data import build_loaders; "
            "from spartan.train.config import DataConfig; build_loaders(DataConfig()); "
            "assert not {'ffcv', 'webdataset'} & set(sys.modules), sorted({'ffcv', 'webdataset'} & set(sys.modules))")
    done = run_cli("-c", code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
