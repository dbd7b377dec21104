"""Evaluate a trained model: a run's ``model_final.pt`` (a plain state_dict) or a training checkpoint."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from spartan import measure_sparsity
from spartan.train.checkpoint import FORMAT
from spartan.train.config import ConfigError, TrainConfig
from spartan.train.data import build_loaders
from spartan.train.distributed import current_process
from spartan.train.loop import build_sparsifier, evaluate, resolve_amp, resolve_device
from spartan.train.models import build_model


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
        raise ConfigError(f"run_dir={str(run_dir)!r} has no model_final.pt (the run has not finished; evaluate a "
                          f"checkpoint with checkpoint={run_dir / 'checkpoints' / 'last.pt'})")
    return run_dir, weights


def load_model(config: TrainConfig, weights: Path, num_classes: int, device: torch.device) -> tuple[torch.nn.Module, str]:
    """The plain sparse model from ``weights``; a training checkpoint is finalized as if training ended there."""
    torch.manual_seed(config.seed)
    model = build_model(config.model, num_classes, config.data.channels).to(device)
    state = torch.load(weights, map_location=device, weights_only=True)
    if isinstance(state, dict) and state.get("format") == FORMAT:
        checkpoint = state
        total_steps = checkpoint["sparsifier"]["fingerprint"]["total_steps"]
        sparsifier = build_sparsifier(model, config.sparsity, total_steps)
        model.load_state_dict(checkpoint["model"])
        sparsifier.load_state_dict(checkpoint["sparsifier"])
        return sparsifier.finalize(), f"training checkpoint at step {checkpoint['step']}, finalized"
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ConfigError(f"{weights} does not fit model.name={config.model.name}: {str(err).splitlines()[0]}") from None
    return model, "final model"


def evaluate_run(config: TrainConfig, run_dir: Path, weights: Path) -> dict[str, Any]:
    """Top-1/top-5 on the run's validation data, sparsity (all/masked), per-layer densities, FLOPs; → eval.json."""
    process = current_process()
    device = resolve_device(config.trainer.device, process)
    loaders = build_loaders(config.data, rank=process.rank, world=process.world, seed=config.seed, device=device,
                            train=False)
    model, what = load_model(config, weights, loaders.info.num_classes, device)
    memory_format = torch.channels_last if config.trainer.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)  # as in training: kernels and thus rounding follow the layout
    amp = resolve_amp(config.trainer.amp, device, config.data.dtype)
    metrics = evaluate(model, loaders.val, device, amp, memory_format)
    report = measure_sparsity(model, config.sparsity, loaders.info.input_shape)
    result = {"weights": str(weights), "evaluated": what, "val_top1": metrics["top1"], "val_top5": metrics["top5"],
              "val_loss": metrics["loss"], "images": metrics["images"], **report["totals"],
              "layers": [{k: v for k, v in row.items() if k != "block"} for row in report["layers"]],
              "data": dataclasses.asdict(config.data)}
    if process.is_main:
        (run_dir / "eval.json").write_text(json.dumps(result, indent=2, default=list) + "\n")
    return result


def format_eval(result: dict[str, Any]) -> str:
    lines = [f"{result['weights']} ({result['evaluated']}), {result['images']} validation images",
             f"val top-1 {100 * result['val_top1']:.2f}%   top-5 {100 * result['val_top5']:.2f}%",
             f"sparsity {100 * result['sparsity_all']:.2f}% of all parameters, "
             f"{100 * result['sparsity_masked']:.2f}% of masked weights",
             f"FLOPs    {result['flops_dense']:,.0f} → {result['flops_sparse']:,.0f} multiply-adds per image in masked "
             f"layers ({result['flops_reduction']:.1f}× fewer)", "",
             f"{'layer':<40} {'shape':<22} {'density':>8} {'kept':>12}"]
    for row in result["layers"]:
        lines.append(f"{row['name']:<40} {str(tuple(row['shape'])):<22} {row['density']:>8.4f} "
                     f"{row['params_kept']:>12,}")
    return "\n".join(lines)
