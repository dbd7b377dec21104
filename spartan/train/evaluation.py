"""Evaluation: the validation pass the trainer runs, and ``eval.py``'s evaluation of a run's final model
(``model_final.pt``, a plain state_dict) or of a training checkpoint."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError
from torch import nn

from spartan import measure_sparsity
from spartan.train import cli
from spartan.train.checkpoint import Checkpoint, load_weights
from spartan.train.config import TrainConfig
from spartan.train.data import build_loaders, get_backend
from spartan.train.device import autocast, memory_format, resolve_amp, resolve_device
from spartan.train.distributed import all_reduce_sum, current_process
from spartan.train.errors import ConfigError
from spartan.train.files import atomic_write_text
from spartan.train.models import build_model
from spartan.train.seeding import seed_everything

SPARSITY_FIELDS = (
    "sparsity_all",
    "sparsity_masked",
    "params",
    "params_kept",
    "params_masked",
    "params_masked_kept",
    "flops_dense",
    "flops_sparse",
    "flops_reduction",
)
"""The sparsity totals that ``summary.json`` and ``eval.json`` both record, with the same meaning
(:func:`spartan.measure_sparsity`)."""


def sparsity_fields(totals: dict[str, Any]) -> dict[str, Any]:
    return {key: totals[key] for key in SPARSITY_FIELDS}


def test_fields(metrics: dict[str, Any]) -> dict[str, Any]:
    """``summary.json`` / ``eval.json``'s keys for the test split's metrics (:func:`evaluate`)."""
    return {"test_top1": metrics["top1"], "test_top5": metrics["top5"], "test_loss": metrics["loss"]}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    layout: torch.memory_format = torch.contiguous_format,
) -> dict[str, float]:
    """Top-1, top-5 (fractions) and mean cross-entropy over ``loader``, summed over all processes."""
    was_training = model.training
    model.eval()
    loss_sum = correct1 = correct5 = count = 0.0
    for batch in loader:
        if batch is None:  # every image of this batch was unreadable (skipped with warnings)
            continue
        images, targets = batch
        images = images.to(device, non_blocking=True, memory_format=layout)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        loss_sum += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += float((top[:, 0] == targets).sum())
        correct5 += float((top == targets[:, None]).any(1).sum())
        count += len(targets)
    model.train(was_training)
    loss_sum, correct1, correct5, count = all_reduce_sum([loss_sum, correct1, correct5, count], device)
    return {"top1": correct1 / count, "top5": correct5 / count, "loss": loss_sum / count, "images": int(count)}


def run_config(run_dir: Path, overrides: dict[str, dict[str, Any]]) -> TrainConfig:
    """The run's own config (``.hydra/config.yaml``) with ``overrides`` (``{"data": {...}, "trainer": {...}}``),
    validated against the schema of the run's ``data=`` option."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"run_dir={str(run_dir)!r} has no .hydra/config.yaml (not a train.py run directory)")
    saved = OmegaConf.load(path)
    schema = OmegaConf.merge(
        OmegaConf.structured(TrainConfig), {"data": OmegaConf.structured(get_backend(saved.data.name).schema)}
    )
    try:
        merged = OmegaConf.merge(schema, saved, overrides, {"resume": None})
    except ConfigKeyError as err:
        raise ConfigError(f"{err.full_key} is not a key of data={saved.data.name} (the run's data option)") from None
    return cli.to_dataclass(merged)


def find_weights(run_dir: Path | None, checkpoint: Path | None) -> tuple[Path, Path]:
    """``(run_dir, weights file)``: the run's ``model_final.pt`` unless a checkpoint is given."""
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise ConfigError(f"checkpoint={str(checkpoint)!r} does not exist")
        if run_dir is None:  # model_final.pt sits in the run dir, training checkpoints in run_dir/checkpoints
            run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
        return run_dir, checkpoint
    if not run_dir.is_dir():
        raise ConfigError(f"run_dir={str(run_dir)!r} is not a directory")
    weights = run_dir / "model_final.pt"
    if not weights.is_file():
        raise ConfigError(
            f"run_dir={str(run_dir)!r} has no model_final.pt (the run has not finished; evaluate a "
            f"checkpoint with checkpoint={run_dir / 'checkpoints' / 'last.pt'})"
        )
    return run_dir, weights


def load_model(
    config: TrainConfig, weights: Path, num_classes: int, in_channels: int, device: torch.device
) -> tuple[nn.Module, str]:
    """The plain sparse model from ``weights``; a training checkpoint is finalized as if training ended there."""
    seed_everything(config.seed)
    model = build_model(config.model, num_classes, in_channels).to(device)
    state = load_weights(weights)
    if isinstance(state, Checkpoint):
        return state.final_model(model, config.sparsity), f"training checkpoint at step {state.step}, finalized"
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ConfigError(
            f"{weights} does not fit model.name={config.model.name}: {str(err).splitlines()[0]}"
        ) from None
    return model, "final model"


def evaluate_run(config: TrainConfig, run_dir: Path, weights: Path) -> dict[str, Any]:
    """Top-1/top-5 on the run's validation data (and its test split, if the data has one), sparsity (all/masked),
    per-layer densities, FLOPs; → eval.json."""
    process = current_process()
    device = resolve_device(config.trainer.device, process)
    amp = resolve_amp(config.trainer.amp, device, config.data.image_dtype())
    loaders = build_loaders(
        config.data, rank=process.rank, world=process.world, seed=config.seed, device=device, train=False
    )
    info = loaders.info
    model, what = load_model(config, weights, info.num_classes, info.input_shape[0], device)
    layout = memory_format(config.trainer.channels_last)
    model = model.to(memory_format=layout)
    metrics = evaluate(model, loaders.val, device, amp, layout)
    report = measure_sparsity(model, config.sparsity, info.input_shape)
    result = {
        "weights": str(weights),
        "evaluated": what,
        "val_top1": metrics["top1"],
        "val_top5": metrics["top5"],
        "val_loss": metrics["loss"],
        "images": metrics["images"],
        **sparsity_fields(report["totals"]),
        "accounting": config.sparsity.accounting,
        "layers": [{k: v for k, v in row.items() if k != "block"} for row in report["layers"]],
        "data": dataclasses.asdict(config.data),
    }
    if loaders.test is not None:
        result.update(test_fields(evaluate(model, loaders.test, device, amp, layout)))
    if process.is_main:
        atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2, default=list) + "\n")
    return result


def format_eval(result: dict[str, Any]) -> str:
    lines = [
        f"{result['weights']} ({result['evaluated']}), {result['images']} validation images",
        f"val top-1 {100 * result['val_top1']:.2f}%   top-5 {100 * result['val_top5']:.2f}%",
        f"sparsity {100 * result['sparsity_all']:.2f}% of all parameters, "
        f"{100 * result['sparsity_masked']:.2f}% of masked weights",
        f"FLOPs    {result['flops_dense']:,.0f} → {result['flops_sparse']:,.0f} multiply-adds per image in masked "
        f"layers ({result['flops_reduction']:.1f}× fewer)",
        "",
        f"{'layer':<40} {'shape':<22} {'density':>8} {'kept':>12}",
    ]
    if "test_top1" in result:
        lines.insert(2, f"test top-1 {100 * result['test_top1']:.2f}%   top-5 {100 * result['test_top5']:.2f}%")
    for row in result["layers"]:
        lines.append(
            f"{row['name']:<40} {str(tuple(row['shape'])):<22} {row['density']:>8.4f} {row['params_kept']:>12,}"
        )
    return "\n".join(lines)
