"""Degenerate runs are reported: layers left with no weights, one-class data, block_fallback layers, skipped images
appear as warnings, in the epoch log line, in metrics.jsonl and in summary.json."""

import json
import logging
import warnings

import torch
from conftest import compose_train, write_image_folder
from torch import nn

from spartan import Sparsifier, SparsityConfig
from spartan.train.loop import format_summary, train


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def epoch_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ") and " s, " in r.getMessage()]


def test_empty_layers_are_named_by_the_sparsifier():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        model[2].weight.mul_(1e-4)  # the global magnitude budget goes to the first layer
    config = SparsityConfig(method="magnitude", target=0.85, accounting="masked", warmup_frac=0.0)
    sparsifier = Sparsifier(model, config, total_steps=4)
    assert sparsifier.empty_layers() == ["2.weight"]
    assert sparsifier.fallback_layers() == []


def test_a_collapsed_layer_is_warned_when_it_happens_and_listed_in_the_summary(tmp_path, caplog):
    config = compose_train(
        "logger=none",
        "schedule.epochs=1",
        "sparsity.method=magnitude",
        "sparsity.target=0.99",
        "sparsity.warmup_frac=0",
        "trainer.log_every=5",
    )
    with caplog.at_level(logging.INFO, logger="spartan.train"):
        summary = train(config, tmp_path / "run")
    empty = summary["degenerate"]["empty_layers"]
    assert empty and all(name.endswith("weight") for name in empty)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "keep no weights" in r.getMessage()]
    assert len(warned) == 1 and warned[0].getMessage().startswith("step 5:")  # the first logged step, once
    assert all(name in warned[0].getMessage() for name in empty)
    assert f"no kept weights in {', '.join(empty)}" in epoch_lines(caplog)[-1]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["degenerate"]["empty_layers"] == empty
    assert [r["empty_layers"] for r in records(tmp_path / "run") if r["kind"] == "data"] == [empty]
    assert "warnings" in format_summary(summary, tmp_path / "run")


def test_a_healthy_run_reports_nothing(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="spartan.train"):
        summary = train(compose_train("logger=none", "schedule.epochs=1"), tmp_path / "run")
    assert summary["degenerate"] == {}
    assert "warnings" not in epoch_lines(caplog)[-1]
    assert not [r for r in records(tmp_path / "run") if r["kind"] == "data"]


def test_block_fallback_layers_are_listed(tmp_path, caplog):
    config = compose_train("logger=none", "schedule.epochs=1", "sparsity.block=[4,4]", "sparsity.block_fallback=true")
    with caplog.at_level(logging.INFO, logger="spartan.train"):
        summary = train(config, tmp_path / "run")
    # digits_cnn's first conv has one input channel and its head 10 outputs: 4 divides neither.
    assert summary["degenerate"]["block_fallback_layers"] == ["0.weight", "12.weight"]
    assert "masked unstructured by block_fallback: 0.weight, 12.weight" in epoch_lines(caplog)[-1]


def test_single_class_data_and_skipped_images_are_reported(tmp_path, caplog):
    root = write_image_folder(tmp_path / "images", classes=1, per_class=12)
    (root / "train" / "n00000000" / "3.JPEG").write_bytes(b"broken")
    config = compose_train(
        "logger=none",
        "model=resnet18",
        "data=imagefolder",
        f"data.path={root}",
        "data.image_size=32",
        "data.batch_size=4",
        "schedule.epochs=1",
    )
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="spartan.train"):
        warnings.simplefilter("ignore")
        summary = train(config, tmp_path / "run")
    assert summary["degenerate"]["single_class"] is True
    assert summary["degenerate"]["skipped_images"] == 1
    assert any(r.levelno == logging.WARNING and "single class" in r.getMessage() for r in caplog.records)
    line = epoch_lines(caplog)[-1]
    assert "the data has a single class" in line and "1 unreadable training images skipped" in line
    (data,) = [r for r in records(tmp_path / "run") if r["kind"] == "data"]
    assert data["single_class"] is True and data["skipped_images"] == 1
