"""Per-step cost of sparse training: a full step (forward, backward, finish_backward, optimizer, sparsifier.step)
for each method against dense, and the sparsifier's own step time.

    python scripts/bench_sparsifier.py                     # resnet50, 128 px, batch 16, CPU
    python scripts/bench_sparsifier.py --device cuda --resolution 224 --batch-size 256 --bf16 --channels-last
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from spartan import Sparsifier, SparsityConfig

METHODS = ("dense", "spartan", "topkast", "magnitude")


def bench(method: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.resnet50().to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    # Time steps inside the density warm-up, where masks change every step (the most work).
    sparsifier = Sparsifier(model, SparsityConfig(method=method, target=0.9), total_steps=1000, optimizer=optimizer)
    x = torch.randn(args.batch_size, 3, args.resolution, args.resolution, device=device)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step_times, sparsifier_times = [], []
    for i in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        with autocast:
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        sparsifier.finish_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        middle = time.perf_counter()
        sparsifier.step()
        sync()
        end = time.perf_counter()
        if i >= args.warmup:
            step_times.append(end - start)
            sparsifier_times.append(end - middle)
    return {
        "method": method,
        "step_ms": 1e3 * statistics.median(step_times),
        "sparsifier_step_ms": 1e3 * statistics.median(sparsifier_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--json", default="docs/bench_sparsifier_cpu.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = [bench(method, args, device) for method in METHODS]
    dense = rows[0]["step_ms"]
    print(
        f"resnet50, {args.resolution} px, batch {args.batch_size}, {device}, bf16={args.bf16}, "
        f"channels_last={args.channels_last}, threads={torch.get_num_threads()}, median of {args.steps} steps"
    )
    print("| method | step (ms) | vs dense | sparsifier.step() (ms) |\n|---|---|---|---|")
    for row in rows:
        row["vs_dense"] = row["step_ms"] / dense
        print(f"| {row['method']} | {row['step_ms']:.0f} | {row['vs_dense']:.2f}x | {row['sparsifier_step_ms']:.0f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
