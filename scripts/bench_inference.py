"""Inference latency and file size of sparse models on the CPU: torch dense, our sparse modules
(:func:`spartan.inference.sparsify_for_inference`, kernels chosen for each batch size and thread count) and
onnxruntime dense, for the two settings of the paper:

- ViT-B/16 (timm), 90% of the encoder's weights zero in 16×16 blocks;
- ResNet-50 (torchvision), 95% of all parameters zero, unstructured, one global budget.

The patterns are the Sparsifier's (its hard top-k of the randomly initialised weights at the target; trained
ImageNet weights change the values, not the speed). Latency is the median of ``--repeats`` forward passes after one
warm-up, the three measured in turn (interleaved), fp32, 224 px. Prints a markdown table and writes JSON.

    python scripts/bench_inference.py                                   # both models, batch 1 and 8, 1 and 2 threads
    python scripts/bench_inference.py --models vit_b16 --batches 8 --threads 1
"""

from __future__ import annotations

import argparse
import collections
import copy
import io
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import onnxruntime
import timm
import torch
import torchvision
from torch import nn

from spartan import Sparsifier, SparsityConfig, compressed
from spartan.inference import sparsify_for_inference
from spartan.onnx_export import export_onnx, onnx_session, run_onnx

MODELS = {
    "vit_b16": (
        lambda **kwargs: timm.create_model("vit_base_patch16_224", **kwargs),
        SparsityConfig(target=0.9, block=(16, 16), include=("blocks.*",), accounting="masked"),
    ),
    "resnet50": (lambda **kwargs: torchvision.models.resnet50(**kwargs), SparsityConfig(target=0.95)),
}


def sparse_model(name: str, **model_kwargs) -> nn.Module:
    """The model (built with ``model_kwargs``, e.g. a smaller ``depth``) with the Sparsifier's final masks at the
    target baked in (plain modules with exact zeros), each layer's kept weights scaled by 1/√density so that
    activations keep their size through the depth (at 95% zeros, random weights would otherwise leave the logits
    equal to the last bias, and the outputs' check void)."""
    torch.manual_seed(0)
    build, config = MODELS[name]
    config = SparsityConfig(**{**config.to_dict(), "method": "magnitude", "warmup_frac": 0.0, "finetune_frac": 0.0})
    model = build(**model_kwargs).eval()
    sparsifier = Sparsifier(model, config, total_steps=1)
    sparsifier.step()
    model = sparsifier.finalize()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and module.weight.count_nonzero():
                module.weight.mul_((module.weight.numel() / module.weight.count_nonzero()).sqrt())
    return model


def interleaved_medians_ms(runs: dict[str, Callable], images: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median milliseconds of each run over ``repeats`` rounds, one call of each per round, so that the machine's
    drift (this VM's speed varies by tens of percent over minutes) hits all of them alike."""
    times = {name: [] for name in runs}
    with torch.inference_mode():
        for run in runs.values():
            run(images)
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run(images)
                times[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in times.items()}


def features_error(model: nn.Module, sparse: nn.Module, images: torch.Tensor) -> float:
    """Largest difference of the two models' inputs to the dense model's last Linear (the classifier), relative to
    the largest feature: the logits alone can hide everything before a classifier the global budget pruned away."""
    head = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    features = []
    for net in (model, sparse):
        handle = net.get_submodule(head).register_forward_pre_hook(lambda m, args: features.append(args[0].clone()))
        with torch.inference_mode():
            net(images)
        handle.remove()
    return float((features[1] - features[0]).abs().max() / features[0].abs().max())


def file_sizes(model: nn.Module, onnx_path: Path) -> dict[str, float]:
    dense, packed = io.BytesIO(), io.BytesIO()
    torch.save(model.state_dict(), dense)
    torch.save(compressed.compress(model.state_dict()), packed)
    sizes = {"dense_pt": dense.getbuffer().nbytes, "compressed": packed.getbuffer().nbytes}
    sizes["onnx"] = onnx_path.stat().st_size
    sizes["ratio"] = sizes["compressed"] / sizes["dense_pt"]
    return sizes


def bench(name: str, args, workdir: Path) -> dict:
    model = sparse_model(name)
    masked = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    onnx_path = workdir / f"{name}.onnx"
    export_onnx(model, torch.randn(1, 3, 224, 224), onnx_path)
    result = {"sizes": file_sizes(model, onnx_path), "rows": []}
    result["sparsity_of_conv_linear_weights"] = sum(int((w == 0).sum()) for w in masked) / sum(
        w.numel() for w in masked
    )
    for threads in args.threads:
        torch.set_num_threads(threads)
        session = onnx_session(onnx_path, threads)
        for batch in args.batches:
            images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
            sparse = copy.deepcopy(model)
            choices = sparsify_for_inference(sparse, images)
            error = features_error(model, sparse, images)
            runs = {"torch_dense_ms": model, "sparse_ms": sparse, "onnxruntime_dense_ms": partial(run_onnx, session)}
            row = {
                "threads": threads,
                "batch": batch,
                **interleaved_medians_ms(runs, images, args.repeats),
                "max_feature_diff_relative": error,
                "kernels": dict(collections.Counter(c.kernel for c in choices)),
                "layers": [
                    {"name": c.name, "density": round(c.density, 4), "block": c.block, "kernel": c.kernel}
                    | {f"{k}_ms": round(v, 2) for k, v in c.times_ms.items()}
                    for c in choices
                ],
            }
            row["speedup_vs_torch"] = row["torch_dense_ms"] / row["sparse_ms"]
            row["speedup_vs_onnxruntime"] = row["onnxruntime_dense_ms"] / row["sparse_ms"]
            result["rows"].append(row)
            print(
                f"{name} threads={threads} batch={batch}: { ({k: v for k, v in row.items() if k != 'layers'}) }",
                flush=True,
            )
    return result


def table(results: dict) -> str:
    lines = [
        "| model | threads | batch | torch dense ms | sparse ms | onnxruntime dense ms | × torch | × onnxruntime "
        "| kernels (layers) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, result in results.items():
        for r in result["rows"]:
            kernels = ", ".join(f"{k} {n}" for k, n in sorted(r["kernels"].items()))
            lines.append(
                f"| {name} | {r['threads']} | {r['batch']} | {r['torch_dense_ms']:.1f} | {r['sparse_ms']:.1f} | "
                f"{r['onnxruntime_dense_ms']:.1f} | {r['speedup_vs_torch']:.2f} | "
                f"{r['speedup_vs_onnxruntime']:.2f} | {kernels} |"
            )
    lines += ["", "| model | dense .pt MB | compressed MB | ratio | ONNX (dense) MB |", "|---|---:|---:|---:|---:|"]
    for name, result in results.items():
        s = result["sizes"]
        lines.append(
            f"| {name} | {s['dense_pt'] / 1e6:.1f} | {s['compressed'] / 1e6:.1f} | {s['ratio']:.3f} | "
            f"{s['onnx'] / 1e6:.1f} |"
        )
    return "\n".join(lines)


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "timm": timm.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("docs/bench_inference_cpu.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        results = {name: bench(name, args, Path(workdir)) for name in args.models}
    print(table(results))
    args.out.write_text(
        json.dumps({"machine": machine(), "args": vars(args) | {"out": str(args.out)}, **results}, indent=2) + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
