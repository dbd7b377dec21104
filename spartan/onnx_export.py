"""ONNX export of a finalized model and its check against onnxruntime (``onnx`` and ``onnxruntime`` are needed
only here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

INPUT, OUTPUT = "images", "logits"


def export_onnx(model: nn.Module, example: Tensor, path: Path) -> None:
    """Write ``model`` (in eval mode, batch size left free) to ``path`` with the ``torch.export``-based exporter;
    the weights are stored in the file (models under 2 GB)."""
    model.eval()
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_shapes=({0: batch},),
        verbose=False,
    )
    program.save(str(path), external_data=False)


def onnx_session(path: Path, threads: int = 1):
    """An onnxruntime CPU session on ``path`` with ``threads`` intra-op threads (and one inter-op)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, images: Tensor) -> Tensor:
    """The session's logits for a batch of ``images`` (float32 on the CPU)."""
    (logits,) = session.run([OUTPUT], {INPUT: np.ascontiguousarray(images.detach().cpu().float().numpy())})
    return torch.from_numpy(logits)
