"""``scripts/export.py``: a finished run's model as a compressed file (``model_sparse.pt``), optionally as ONNX
checked against onnxruntime and with sparse inference modules checked and timed, all on the run's validation data;
the numbers go to ``export.json`` in the run directory."""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from spartan import compressed
from spartan.inference import median_ms, sparsify_for_inference
from spartan.onnx_export import export_onnx, onnx_session, run_onnx
from spartan.train.checkpoint import load_failure
from spartan.train.data import build_loaders
from spartan.train.errors import ConfigError
from spartan.train.evaluation import load_model, run_config
from spartan.train.files import atomic_save, atomic_write_text
from spartan.train.lifecycle import RunError
from spartan.train.provenance import git_version

COMPRESSED = "model_sparse.pt"
ONNX = "model.onnx"


def export_run(
    run_dir: Path, weights: Path, *, onnx: bool = False, sparse_modules: bool = False, threads: int = 1
) -> dict[str, Any]:
    """Write ``run_dir/model_sparse.pt`` from ``weights`` (and ``model.onnx`` with ``onnx``) and ``export.json``;
    returns what ``export.json`` holds. ``threads``: CPU threads for onnxruntime and the sparse modules' timing."""
    config = run_config(run_dir, {"trainer": {"device": "cpu"}})
    loaders = build_loaders(config.data, seed=config.seed, device=torch.device("cpu"), train=False)
    model, what = load_model(
        config, weights, loaders.info.num_classes, loaders.info.input_shape[0], torch.device("cpu")
    )
    model.eval()
    state = model.state_dict()
    result: dict[str, Any] = {"weights": str(weights), "evaluated": what, "model": config.model.name}
    result["compressed"] = _write_compressed(state, run_dir / COMPRESSED, config, weights)
    example = _first_batch(loaders.val)
    torch.set_num_threads(threads)
    others: dict[str, Callable[[Tensor], Tensor]] = {}
    if onnx:
        export_onnx(model, example, run_dir / ONNX)
        session = onnx_session(run_dir / ONNX, threads)
        others["onnx"] = lambda images: run_onnx(session, images)
        result["onnx"] = {"file": str(run_dir / ONNX), "bytes": (run_dir / ONNX).stat().st_size}
    if sparse_modules:
        sparse = copy.deepcopy(model)
        choices = sparsify_for_inference(sparse, example)
        others["sparse_modules"] = sparse
        result["sparse_modules"] = {
            "threads": threads,
            "batch_size": len(example),
            "ms_dense": median_ms(model, example, repeats=5),
            "ms_sparse": median_ms(sparse, example, repeats=5),
            "layers": [
                {"name": c.name, "density": c.density, "kernel": c.kernel, "times_ms": c.times_ms} for c in choices
            ],
        }
    if others:
        for name, agreement in _compare(model, others, loaders.val).items():
            result[name].update(agreement)
    atomic_write_text(run_dir / "export.json", json.dumps(result, indent=2) + "\n")
    return result


def expand(source: Path, target: Path) -> None:
    """Write the plain ``state_dict`` of a compressed file, for ``torch.load`` without this package."""
    try:
        state = compressed.decompress(torch.load(source, map_location="cpu", weights_only=True))
    except Exception as err:
        raise ConfigError(f"{source} is not a readable {compressed.FORMAT} file ({load_failure(err)})") from None
    atomic_save(state, target)


def _write_compressed(state: dict[str, Tensor], path: Path, config, weights: Path) -> dict[str, Any]:
    meta = {
        "model": config.model.name,
        "model_source": config.model.source,
        "from": str(weights),
        "sparsity_target": config.sparsity.target,
        "git": git_version(),
    }
    packed = compressed.compress(state, meta)
    atomic_save(packed, path)
    restored = compressed.decompress(torch.load(path, map_location="cpu", weights_only=True))
    if list(restored) != list(state) or not all(_same_bits(state[k], restored[k]) for k in state):
        path.unlink()
        raise RunError(f"{path} did not decompress to the weights it was written from; it was removed")
    dense = io.BytesIO()
    torch.save(state, dense)
    return {
        "file": str(path),
        "bytes": path.stat().st_size,
        "dense_bytes": dense.getbuffer().nbytes,
        "ratio": path.stat().st_size / dense.getbuffer().nbytes,
        "encodings": {
            name: entry["encoding"] if entry["encoding"] == "dense" else f"blocks{tuple(entry['block'])}"
            for name, entry in packed["tensors"].items()
        },
    }


def _same_bits(a: Tensor, b: Tensor) -> bool:
    bits = lambda t: t.reshape(-1).view(torch.uint8)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def _first_batch(loader) -> Tensor:
    for batch in loader:
        if batch is not None:
            return batch[0]
    raise RunError("the validation data has no readable images")


def _compare(
    model: nn.Module, others: dict[str, Callable[[Tensor], Tensor]], loader
) -> dict[str, dict[str, float | int]]:
    """Top-1 of ``model`` and each of ``others`` over ``loader``, how many predictions differ from ``model``'s,
    and the largest absolute logit difference."""
    counts = {name: {"top1_torch": 0, "top1": 0, "predictions_differ": 0, "max_abs_logit_diff": 0.0} for name in others}
    images_seen = 0
    with torch.inference_mode():
        for batch in loader:
            if batch is None:
                continue
            images, targets = batch
            reference = model(images).float()
            images_seen += len(targets)
            for name, run in others.items():
                logits = run(images).float()
                row = counts[name]
                row["top1_torch"] += int((reference.argmax(1) == targets).sum())
                row["top1"] += int((logits.argmax(1) == targets).sum())
                row["predictions_differ"] += int((logits.argmax(1) != reference.argmax(1)).sum())
                row["max_abs_logit_diff"] = max(row["max_abs_logit_diff"], float((logits - reference).abs().max()))
    for row in counts.values():
        row["top1_torch"] /= images_seen
        row["top1"] /= images_seen
        row["images"] = images_seen
    return counts
