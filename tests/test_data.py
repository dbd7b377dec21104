"""Data pipelines: ImageFolder and WebDataset loaders, augmentation, Mixup/CutMix, samplers, bad data."""

import collections
import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import compose_train, run_cli, write_image_folder

from spartan.train.data import build_loaders, get_backend
from spartan.train.data.backends.digits import DigitsConfig
from spartan.train.data.backends.ffcv import FFCVConfig
from spartan.train.data.backends.imagefolder import ImageFolderConfig
from spartan.train.data.backends.synthetic import SyntheticConfig
from spartan.train.data.ffcv_writer import write_split
from spartan.train.data.samplers import RepeatedAugmentSampler
from spartan.train.data.transforms import batch_mixer
from spartan.train.data.webdataset_writer import write_shards
from spartan.train.errors import ConfigError

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


def data_config(name: str, path: Path, **overrides):
    """Backend ``name``'s schema for the small test images (the keys it has of a common set, then ``overrides``)."""
    schema = get_backend(name).schema
    common = dict(path=str(path), image_size=32, batch_size=4, num_workers=0, num_classes=CLASSES, shuffle_buffer=8)
    keys = {f.name for f in dataclasses.fields(schema)}
    return schema(**{**{k: v for k, v in common.items() if k in keys}, **overrides})


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


@pytest.mark.parametrize("name, world", [("imagefolder", 2), ("webdataset", 2), ("webdataset", 6)])
def test_processes_split_validation_exactly(name, world, images, shards):
    # 5 validation shards: with 6 processes one gets none and must not borrow another's.
    path = images if name == "imagefolder" else shards
    parts = [epoch_labels(build_loaders(data_config(name, path), rank=r, world=world).val) for r in range(world)]
    assert sum(parts, collections.Counter()) == {c: PER_CLASS for c in range(CLASSES)}


def test_one_webdataset_shard_feeds_two_training_processes(images, tmp_path):
    out = tmp_path / "one"
    for split in ("train", "val"):
        write_shards(images, split, out, samples_per_shard=1000)
    loaders = [build_loaders(data_config("webdataset", out), rank=r, world=2) for r in range(2)]
    assert [len(loader.train) for loader in loaders] == [3, 3]  # 24 images // (4 × 2)
    assert sum((epoch_labels(loader.val) for loader in loaders), collections.Counter()) == {
        c: PER_CLASS for c in range(CLASSES)
    }


@pytest.mark.parametrize("name", ["imagefolder", "webdataset"])
def test_an_epoch_replays_exactly(name, images, shards):
    loaders = build_loaders(
        data_config(name, images if name == "imagefolder" else shards, num_workers=2), rank=0, world=2
    )

    def epoch(k, rank=0, fresh=False, start=0):
        built = (
            build_loaders(
                data_config(name, images if name == "imagefolder" else shards, num_workers=2), rank=rank, world=2
            )
            if fresh
            else loaders
        )
        torch.manual_seed(123)
        built.set_epoch(k, start)
        return torch.cat([x for x, _ in built.train])

    assert torch.equal(epoch(1), epoch(1, fresh=True))  # what a resumed run builds replays the epoch
    assert not torch.equal(epoch(1), epoch(2))
    assert not torch.equal(epoch(1, rank=0, fresh=True), epoch(1, rank=1, fresh=True))
    # resumed mid-epoch (after batch 1 of 3, whichever worker decoded it): the rest of the same epoch
    assert torch.equal(epoch(1, fresh=True, start=1), epoch(1)[4:])


def test_synthetic_batches_are_made_on_the_device_and_replay_for_a_seed():
    device = torch.device("cpu")  # the run's device: a GPU's own generator there
    config = SyntheticConfig(image_size=8, batch_size=4, train_size=40, val_size=10, num_classes=5)

    def epoch(k, rank=0, seed=0, start=0):
        loaders = build_loaders(config, rank=rank, world=2, seed=seed, device=device)
        loaders.set_epoch(k, start)
        batches = list(loaders.train)
        assert len(batches) == len(loaders.train) - start
        return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])

    rng = torch.get_rng_state()
    images, labels = epoch(1)
    assert torch.equal(torch.get_rng_state(), rng)  # an explicit generator: the global one is untouched
    assert images.shape == (20, 3, 8, 8) and images.dtype == torch.float32 and images.device == device
    assert labels.dtype == torch.int64 and labels.device == device and 0 <= labels.min() <= labels.max() < 5
    assert abs(float(images.mean())) < 0.2 and 0.8 < float(images.std()) < 1.2  # normalised
    assert all(torch.equal(a, b) for a, b in zip(epoch(1), (images, labels)))  # a fresh build replays the epoch
    assert torch.equal(epoch(1, start=2)[0], images[8:])  # resumed after batch 2: the rest of the same epoch
    assert not torch.equal(epoch(2)[0], images) and not torch.equal(epoch(1, seed=1)[0], images)
    # the two processes' halves of an epoch: the 40 images (train_size <= 64: one per sample), none seen twice
    both, both_labels = (torch.cat(parts) for parts in zip(epoch(1), epoch(1, rank=1)))
    assert len(torch.unique(both.flatten(1), dim=0)) == 40
    # the next epoch reorders the same images, each keeping its label
    again, again_labels = (torch.cat(parts) for parts in zip(epoch(2), epoch(2, rank=1)))
    order, again_order = both[:, 0, 0, 0].argsort(), again[:, 0, 0, 0].argsort()
    assert torch.equal(both[order], again[again_order]) and torch.equal(both_labels[order], again_labels[again_order])
    # validation: every image once over the processes, the same batches every time
    parts = [list(build_loaders(config, rank=r, world=3, device=device).val) for r in range(3)]
    assert sum(len(y) for part in parts for _, y in part) == 10
    assert all(x.device == device for part in parts for x, _ in part)
    assert torch.equal(parts[0][0][0], next(iter(build_loaders(config, rank=0, world=3, device=device).val))[0])


def test_augmentation_options_run(images):
    config = data_config("imagefolder", images, auto_augment="randaugment", random_erasing=0.5, repeated_augment=3)
    loaders = build_loaders(config)
    loaders.set_epoch(0)
    assert next(iter(loaders.train))[0].shape == (4, 3, 32, 32)
    config = data_config("imagefolder", images, auto_augment="trivialaugment")
    assert next(iter(build_loaders(config).train))[0].shape == (4, 3, 32, 32)


@pytest.mark.parametrize("mixup, cutmix", [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_mixup_and_cutmix_give_soft_targets_summing_to_one(mixup, cutmix):
    mix = batch_mixer(DigitsConfig(mixup_alpha=mixup, cutmix_alpha=cutmix), 5)
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 5
    torch.manual_seed(0)
    mixed, targets = mix(images, labels)
    assert mixed.shape == images.shape and targets.shape == (8, 5)
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    assert (targets > 0).sum() > 8  # two classes per row: really mixed
    assert batch_mixer(DigitsConfig(), 5) is None


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
    # 5 batches of 5 drawn from the 25 samples of one pass: exactly one pass, broken sample included.
    loaders = build_loaders(data_config("webdataset", out, batch_size=5, shuffle_buffer=1))
    loaders.set_epoch(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labels = torch.cat([y for _, y in loaders.train])
    assert len(labels) == 24  # 25 drawn, the unreadable one dropped from its batch
    assert any("skipping unreadable sample" in str(w.message) for w in caught)
    assert collections.Counter(labels.tolist()) == {c: PER_CLASS for c in range(CLASSES)}  # nothing shifted


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
    (tmp_path / "empty" / "train" / "dog").mkdir()
    with pytest.raises(ConfigError, match="class folders train/cat, train/dog have no images"):  # all listed
        build_loaders(data_config("imagefolder", tmp_path / "empty"))
    with pytest.raises(ConfigError, match="has no val/\\*.tar shards"):
        build_loaders(data_config("webdataset", tmp_path / "empty"))
    done = run_cli(
        "scripts/write_webdataset.py",
        "--data-dir",
        str(tmp_path / "nope"),
        "--split",
        "train",
        "--out",
        str(tmp_path / "o"),
        cwd=tmp_path,
    )
    assert done.returncode == 2 and "error: --data-dir" in done.stderr


@pytest.mark.parametrize("name", ["imagefolder", "webdataset", "ffcv"])
def test_train_py_runs_an_epoch_from_real_image_data(name, images, shards, betons, tmp_path):
    path = {"imagefolder": images, "webdataset": shards, "ffcv": betons}[name]
    run_dir = tmp_path / "run"
    done = run_cli(
        "train.py",
        "logger=none",
        "model=resnet18",
        f"data={name}",
        f"data.path={path}",
        "data.image_size=32",
        "data.batch_size=8",
        "data.num_workers=1",
        *([] if name == "imagefolder" else [f"data.num_classes={CLASSES}"]),
        "data.mixup_alpha=0.2",
        "data.cutmix_alpha=1.0",
        "schedule.epochs=1",
        "sparsity.target=0.5",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == CLASSES * PER_CLASS // 8 and summary["sparsity_all"] == pytest.approx(0.5, abs=1e-4)
    final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-2]
    assert final["kind"] == "final" and final["images"] == CLASSES * PER_CLASS


def test_ffcv_and_webdataset_are_imported_only_when_selected(tmp_path):
    code = (
        "import sys, train, eval; from spartan.train.data import build_loaders; "
        "from spartan.train.data.backends.digits import DigitsConfig; build_loaders(DigitsConfig()); "
        "assert not {'ffcv', 'webdataset'} & set(sys.modules), sorted({'ffcv', 'webdataset'} & set(sys.modules))"
    )
    done = run_cli("-c", code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]


def test_splits_with_different_classes_are_refused(tmp_path):
    root = write_image_folder(tmp_path / "images", CLASSES, 2)
    for child in (root / "val" / "n00000001").iterdir():
        child.unlink()
    (root / "val" / "n00000001").rmdir()  # val/ lacks a class: its later classes would get shifted labels
    with pytest.raises(ConfigError, match="different class folders"):
        write_shards(root, "val", tmp_path / "wds")
    with pytest.raises(Exception, match="different class folders"):
        write_split(root, "val", tmp_path / "val.beton", workers=1, progress=False, timeout=60)
    with pytest.raises(ConfigError, match="different class folders"):
        build_loaders(data_config("imagefolder", root))
    assert not (tmp_path / "val.beton").exists()


def test_webdataset_refuses_stale_shards_and_reports_unusable_ones(images, tmp_path):
    out = tmp_path / "wds"
    write_shards(images, "val", out)
    with pytest.raises(ConfigError, match="already holds shards"):
        write_shards(images, "val", out)
    import webdataset as wds

    (out / "train").mkdir()
    with wds.ShardWriter(str(out / "train" / "shard-%06d.tar"), maxcount=100, verbose=0) as sink:
        for i in range(8):  # a label under another key: no sample is usable, every batch comes back empty
            sink.write({"__key__": f"{i:04d}", "jpg": b"x", "label": b"1"})
    loaders = build_loaders(data_config("webdataset", out, train_size=8))
    loaders.set_epoch(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert next(iter(loaders.train)) is None  # which the trainer reports (test_all_unreadable_batch...)
    for shard in (out / "train").iterdir():
        shard.write_bytes(b"not a tar file")  # no sample at all: the cycling stream must stop, not spin
    loaders = build_loaders(data_config("webdataset", out, train_size=8))
    loaders.set_epoch(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="no sample in 2 WebDataset shards read in a row"):
            next(iter(loaders.train))


def test_evaluation_needs_only_the_validation_split(images, betons, tmp_path):
    import shutil

    shutil.copytree(images / "val", tmp_path / "folder" / "val")
    assert build_loaders(data_config("imagefolder", tmp_path / "folder"), train=False).info.val_size == 24
    (tmp_path / "ffcv").mkdir()
    shutil.copy(betons / "val.beton", tmp_path / "ffcv" / "val.beton")
    assert build_loaders(data_config("ffcv", tmp_path / "ffcv"), train=False).info.val_size == 24


def test_config_values_that_would_fail_later_are_refused():
    with pytest.raises(ConfigError, match="randaugment_magnitude"):
        ImageFolderConfig(path="/a", randaugment_magnitude=40)
    with pytest.raises(ConfigError, match="ramp_end_epoch"):
        FFCVConfig(path="/a", min_res=160)
    with pytest.raises(ConfigError, match="data.path"):
        ImageFolderConfig()
    with pytest.raises(ConfigError, match="data.persistent_workers=true is not available with data=webdataset"):
        data_config("webdataset", "/a", persistent_workers=True)
    from spartan.train.device import resolve_amp

    with pytest.raises(ConfigError, match="data.dtype=bfloat16 needs mixed precision"):
        resolve_amp("auto", torch.device("cpu"), "bfloat16")


def test_all_unreadable_batch_is_a_clear_error(tmp_path):
    root = write_image_folder(tmp_path / "images", 2, 2)
    for path in (root / "train").rglob("*.JPEG"):
        path.write_bytes(b"not a jpeg")
    config = compose_train(
        "logger=none",
        "model=resnet18",
        "data=imagefolder",
        f"data.path={root}",
        "data.image_size=32",
        "data.batch_size=2",
        "schedule.epochs=1",
    )
    from spartan.train.loop import train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="every image of a training batch"):
            train(config, tmp_path / "run")


def test_ffcv_epochs_that_leave_batches_over_release_their_loader_threads(betons, tmp_path):
    import threading

    from spartan.train.loop import train

    # 24 images in batches of 2 = 12 batches; 9 per accumulated step leaves 3 over every epoch.
    config = compose_train(
        "logger=none",
        "model=resnet18",
        "data=ffcv",
        f"data.path={betons}",
        "data.image_size=32",
        "data.batch_size=2",
        "data.num_workers=1",
        f"data.num_classes={CLASSES}",
        "trainer.accumulate=9",
        "schedule.epochs=3",
        "schedule.warmup_epochs=0",
    )
    before = threading.active_count()
    train(config, tmp_path / "run")
    assert threading.active_count() <= before + 1  # not one abandoned producer thread per epoch
