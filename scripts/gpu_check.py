"""One prepared check of the GPU paths (docs/benchmarks.md): run it whenever a GPU is lent.

    python scripts/gpu_check.py                          # on the GPU machine: at most --deadline seconds
    python scripts/gpu_check.py --quick --device cpu     # a dry run of every section (a test runs it)

Sections (each timed; a failure is printed and the next section runs): env, kernels, determinism, syncs,
steps, ddp, sparse_inference, ffcv (skipped where FFCV is not importable). Prints a table and writes JSON
(default docs/gpu_check_<device>.json).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sparsifier import bench  # noqa: E402

from spartan import Sparsifier, SparsityConfig, kernels  # noqa: E402
from spartan.diagnostics import HostReads  # noqa: E402
from spartan.train.device import describe_device  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def section_env(args, device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    info.update(describe_device(device))
    if device.type == "cuda":
        info["memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def section_kernels(args, device: torch.device) -> dict:
    """Compile time and warm time of the fused passes on a ResNet-50-sized vector; the fallback must not fire."""
    n = 1 << 18 if args.quick else 25_502_912
    u = torch.rand(n, device=device)
    out, flags = torch.empty_like(u), tuple(torch.empty(n, dtype=torch.uint8, device=device) for _ in range(2))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warning is a failure here
        kernels.warm_up(device, torch.float32, with_costs=False)
    synchronize(device)
    compile_s = time.perf_counter() - start
    scalars = torch.tensor([0.9, 0.0, 50.0]).to(device).unbind(0)
    timings = {}
    for name, kernel, buffer, args_ in (
        ("soft_mask_pass", kernels.soft_mask_pass, out, scalars),
        ("band_pass", kernels.band_pass, flags, (scalars[0], scalars[0] + 0.01)),
    ):
        kernels.launch(kernel, u, None, buffer, *args_)
        synchronize(device)
        start = time.perf_counter()
        repeats = 3 if args.quick else 20
        for _ in range(repeats):
            kernels.launch(kernel, u, None, buffer, *args_)
        synchronize(device)
        timings[f"{name}_ms"] = 1e3 * (time.perf_counter() - start) / repeats
    path = kernels.path()
    if path != "compiled":
        raise RuntimeError(f"top-k kernels are not compiled: {path}")
    return {"entries": n, "compile_s": compile_s, **timings, "path": path}


def masks_fingerprint(device: str, quick: bool) -> dict:
    """λ, S and a hash of the mask bits of a fresh Sparsifier (run in its own process by ``determinism``)."""
    torch.manual_seed(0)
    model = (small_model() if quick else torchvision.models.resnet50()).to(device)
    sparsifier = Sparsifier(model, SparsityConfig(method="spartan", target=0.9, warmup_frac=0.0), total_steps=100)
    sparsifier.step()
    group = sparsifier.groups[0]
    hard = sparsifier.entries.hard.to("cpu", torch.uint8).numpy().tobytes()
    soft = sparsifier.entries.soft.cpu().numpy().tobytes()
    return {
        "lam": group.lam,
        "slope_total": float(group.correction.slope_total),
        "hard_sha256": hashlib.sha256(hard).hexdigest(),
        "soft_sha256": hashlib.sha256(soft).hexdigest(),
    }


def section_determinism(args, device: torch.device) -> dict:
    """Two fresh processes with separate Inductor caches (so each tunes its own kernels) must agree bitwise."""
    results = []
    for _ in range(2):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONPATH": str(ROOT)}
            command = [sys.executable, __file__, "--fingerprint", "--device", str(device)] + (["--quick"] * args.quick)
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"fingerprint process failed: {done.stderr[-2000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    if results[0] != results[1]:
        raise RuntimeError(f"two processes disagree: {results[0]} vs {results[1]}")
    return results[0]


def section_syncs(args, device: torch.device) -> dict:
    """Host reads per sparsifier.step() and in finish_backward(), by allocation (CUDA: also torch's sync warnings)."""
    counts = {}
    for allocation in ("global", "uniform", "erk"):
        torch.manual_seed(0)
        model = (small_model() if args.quick else torchvision.models.resnet50()).to(device)
        config = SparsityConfig(method="spartan", target=0.9, allocation=allocation)
        sparsifier = Sparsifier(model, config, total_steps=2000)
        x = torch.randn(2, 3, 64, 64, device=device)
        steps, backward = [], []
        for _ in range(4):
            model(x).square().mean().backward()
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            with HostReads() as reads:
                sparsifier.finish_backward()
            backward.append(reads.count)
            with torch.no_grad():
                for p in model.parameters():
                    p.sub_(0.05 * p.grad)
                    p.grad = None
            with HostReads() as reads:
                sparsifier.step()
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
            steps.append(reads.count)
        counts[allocation] = {"step_reads": steps[1:], "finish_backward_reads": backward}
        if max(steps[1:]) > 8 or max(backward) > 0:
            raise RuntimeError(f"too many host reads with allocation={allocation}: {counts[allocation]}")
    return counts


def section_steps(args, device: torch.device) -> dict:
    """ms/step of ResNet-50 at 224 px, batch 256 (bf16, channels_last, on-device data) per method, with and
    without cudnn.benchmark (--quick: the small CNN)."""
    options = argparse.Namespace(
        model="small_cnn" if args.quick else "resnet50",
        resolution=224,
        batch_size=8 if args.quick else 256,
        steps=1 if args.quick else 10,
        warmup=1 if args.quick else 3,
        bf16=True,
        channels_last=True,
    )
    methods = {
        "dense": ("dense", False),
        "spartan": ("spartan", False),
        "topkast": ("topkast", False),
        "magnitude": ("magnitude", False),
        "spartan frozen": ("spartan", True),
    }
    result = {}
    for benchmark in (False, True):
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = benchmark
            torch.cuda.reset_peak_memory_stats(device)
        rows = bench(options, device, methods)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        result[f"cudnn_benchmark={benchmark}"] = {"rows": rows, "peak_memory_gib": peak}
    return result


def section_ddp(args, device: torch.device) -> dict:
    """One-process DDP (NCCL on CUDA, gloo on the CPU) with gradient accumulation: the same gradients as the
    plain model, and no stride warning with channels_last."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        grads = []
        caught_all = []
        for distributed in (False, True):
            torch.manual_seed(0)
            model = small_model().to(device).to(memory_format=torch.channels_last)
            sparsifier = Sparsifier(model, SparsityConfig(method="spartan", target=0.8, warmup_frac=0.0), 10)
            runner = nn.parallel.DistributedDataParallel(model) if distributed else model
            x = torch.randn(4, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
            y = torch.arange(4, device=device) % 10
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for half in (slice(0, 2), slice(2, 4)):  # two micro-batches, synchronized on the last
                    context = runner.no_sync() if distributed and half.start == 0 else contextlib.nullcontext()
                    with context:
                        nn.functional.cross_entropy(runner(x[half]), y[half]).backward()
                sparsifier.finish_backward()
            caught_all += [str(w.message) for w in caught]
            grads.append([t.weight.grad.clone() for t in sparsifier.tensors])
        worst = max(float((a - b).abs().max()) for a, b in zip(*grads))
        stride_warnings = [w for w in caught_all if "stride" in w.lower()]
        if worst > 1e-5 or stride_warnings:
            raise RuntimeError(f"DDP gradients differ by {worst:.2e}; stride warnings: {stride_warnings[:1]}")
        return {"backend": backend, "max_grad_difference": worst, "stride_warnings": 0}
    finally:
        dist.destroy_process_group()


def section_sparse_inference(args, device: torch.device) -> dict:
    """ViT-B/16 with 90% of its encoder's weights zero in 16×16 blocks (the Sparsifier's pattern), batch 64:
    ms per forward of the dense model and of ``sparsify_for_inference``'s choice between dense and torch's BSR
    product (on CUDA in bf16 and fp16: torch's Triton BSR kernels), the kernels chosen, their per-layer speed-ups
    and the largest difference of the logits (--quick: a one-block ViT at 64 px, batch 2, in fp32)."""
    from bench_inference import sparse_model  # here: it imports timm and onnxruntime, which only this section needs

    from spartan.inference import median_ms, sparsify_for_inference

    quick = {"depth": 1, "img_size": 64} if args.quick else {}
    size, batch = (64, 2) if args.quick else (224, 64)
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
    base = sparse_model("vit_b16", **quick)
    result = {}
    for dtype in (torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.float32,):
        model = copy.deepcopy(base).to(device, dtype)
        images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        with torch.inference_mode():
            expected = model(images).float()
        dense_ms = median_ms(model, images, 5)
        choices = sparsify_for_inference(model, images, kernels=("dense", "bsr"))
        with torch.inference_mode():
            difference = float((model(images).float() - expected).abs().max() / expected.abs().max())
        sparse_ms = median_ms(model, images, 5)
        speedups = [c.times_ms["dense"] / c.times_ms["bsr"] for c in choices if "bsr" in c.times_ms]
        result[str(dtype).removeprefix("torch.")] = {
            "dense_ms": dense_ms,
            "sparse_ms": sparse_ms,
            "speedup": dense_ms / sparse_ms,
            "kernels": dict(collections.Counter(c.kernel for c in choices)),
            "bsr_layer_speedup_min_max": [min(speedups), max(speedups)] if speedups else None,
            "max_logit_difference_relative": difference,
        }
        if not difference <= tolerance[dtype]:
            raise RuntimeError(f"{dtype}: sparse logits differ from dense by {difference:.2e} (relative): {result}")
    return result


class Skipped(Exception):
    """A section that cannot run on this machine: recorded with its reason, not a failure."""


def section_ffcv(args, device: torch.device) -> dict:
    """FFCV's validation pipeline on ``device`` (decoded on the CPU, copied, normalized there) gives the CPU
    pipeline's batches, in float32 and bfloat16; skipped where FFCV is not importable (as on the lent GPU
    machine, where it cannot be built)."""
    try:
        import ffcv  # noqa: F401
    except ImportError as err:
        raise Skipped(f"ffcv is not importable here ({err})") from None
    import numpy as np
    from PIL import Image

    from spartan.train.data import ffcv_writer
    from spartan.train.data.backends.ffcv import FFCVConfig
    from spartan.train.data.ffcv_loader import ffcv_loaders

    classes, per_class = 4, 5
    tolerance = {"float32": 1e-5, "bfloat16": 2e-2}  # the two normalizations round alike to within a bf16 step
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        root, rng = Path(tmp), np.random.default_rng(0)
        for label in range(classes):
            folder = root / "images" / "val" / f"n{label:04d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(40 + 4 * i, 36 + 6 * label, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.JPEG", quality=90)
        ffcv_writer.write_split(
            root / "images", "val", root / "val.beton", max_resolution=64, workers=1, progress=False
        )
        for dtype in tolerance:
            config = FFCVConfig(
                path=str(root), image_size=32, batch_size=8, num_classes=classes, num_workers=2, dtype=dtype
            )
            epochs = {}
            for where in (device, torch.device("cpu")):
                loaders = ffcv_loaders(config, rank=0, world=1, seed=0, device=where, train=False)
                batches = []
                for images, labels in loaders.val:
                    if images.device.type != where.type or labels.device.type != where.type:
                        raise RuntimeError(f"the loader for {where} handed a batch on {images.device}")
                    batches.append((images.cpu().float(), labels.cpu()))  # copies: FFCV reuses its buffers
                if len(batches) != -(-classes * per_class // config.batch_size):
                    raise RuntimeError(f"{where}: {len(batches)} validation batches for {classes * per_class} images")
                epochs[where.type] = batches
            on_device, on_cpu = epochs[device.type], epochs["cpu"]
            worst = max(float((a - b).abs().max()) for (a, _), (b, _) in zip(on_device, on_cpu))
            if not all(torch.equal(a, b) for (_, a), (_, b) in zip(on_device, on_cpu)) or worst > tolerance[dtype]:
                raise RuntimeError(f"{dtype}: {device} batches differ from the CPU's by {worst:.2e} (or in labels)")
            result[dtype] = {"batches": len(on_device), "max_image_difference": worst}
    return result


def small_model() -> nn.Module:
    """A small conv net with 1×1 and 3×3 convolutions (quick runs and the DDP check)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


SECTIONS = {
    "env": section_env,
    "kernels": section_kernels,
    "determinism": section_determinism,
    "syncs": section_syncs,
    "steps": section_steps,
    "ddp": section_ddp,
    "sparse_inference": section_sparse_inference,
    "ffcv": section_ffcv,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a dry run of every section")
    parser.add_argument("--deadline", type=float, default=480.0, help="seconds; later sections are skipped")
    parser.add_argument("--only", nargs="*", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--json", default=None, help="default: docs/gpu_check_<device type>.json")
    parser.add_argument("--fingerprint", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device} but CUDA is not available here (use --device cpu)", file=sys.stderr)
        return 2
    if args.fingerprint:
        print(json.dumps(masks_fingerprint(args.device, args.quick)))
        return 0
    start = time.perf_counter()
    results, failed = {}, []
    for name in args.only:
        elapsed = time.perf_counter() - start
        if elapsed > args.deadline:
            results[name] = {"status": "skipped", "reason": f"deadline {args.deadline:.0f} s reached"}
            continue
        began = time.perf_counter()
        try:
            results[name] = {"status": "ok", **SECTIONS[name](args, device)}
        except Skipped as why:
            results[name] = {"status": "skipped", "reason": str(why)}
        except Exception as err:  # report it and go on: one failure must not hide the other sections
            traceback.print_exc()
            results[name] = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
            failed.append(name)
        results[name]["seconds"] = round(time.perf_counter() - began, 2)
        print(f"[{name}] {results[name]['status']} in {results[name]['seconds']} s", flush=True)
    print("\n| section | status | seconds | result |\n|---|---|---|---|")
    for name, result in results.items():
        shown = {k: v for k, v in result.items() if k not in ("status", "seconds")}
        print(f"| {name} | {result['status']} | {result.get('seconds', '')} | {json.dumps(shown)[:300]} |")
    path = Path(args.json or ROOT / "docs" / f"gpu_check_{device.type}{'_quick' if args.quick else ''}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": str(device), "quick": args.quick, "sections": results}, indent=1))
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
