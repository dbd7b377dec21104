"""Per-step cost of sparse training: a full step (forward, backward, finish_backward, optimizer, sparsifier.step)
for each method against dense, and the sparsifier's own step time, measured interleaved (one step of each
method in turn) so that the machine's drift hits every method alike.

    python scripts/bench_sparsifier.py                     # resnet50, 128 px, batch 16, CPU
    python scripts/bench_sparsifier.py --model vit_b16 --batch-size 8      # 16×16 blocks in the encoder
    python scripts/bench_sparsifier.py --model small_cnn --threads 1 --batch-size 128 --steps 30
    python scripts/bench_sparsifier.py --device cuda --resolution 224 --batch-size 256 --bf16 --channels-last
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

from spartan import Sparsifier, SparsityConfig

METHODS = ("dense", "spartan", "topkast", "magnitude")


def small_cnn() -> nn.Module:
    """A 0.2M-parameter CNN for 28×28 grey images, where per-step fixed costs dominate (as on a GPU)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=1, stride=2),
        nn.BatchNorm2d(128),
        nn.ReLU(),
        nn.Conv2d(128, 128, 3, padding=1),
        nn.BatchNorm2d(128),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


class Trainer:
    """One method's model, optimizer and Sparsifier on fixed synthetic data (made on the device)."""

    def __init__(self, method: str, args, device: torch.device, frozen: bool = False):
        torch.manual_seed(0)
        self.device, self.args = device, args
        shape, classes, sparsity = (3, args.resolution, args.resolution), 1000, {}
        if args.model == "small_cnn":
            model, shape, classes = small_cnn(), (1, 28, 28), 10
        elif args.model == "vit_b16":  # the paper's ViT setting: the encoder's Linears in 16×16 blocks
            model = timm.create_model("vit_base_patch16_224", img_size=args.resolution)
            sparsity = {"block": (16, 16), "include": ("blocks.*",), "accounting": "masked"}
        else:
            model = torchvision.models.resnet50()
        layout = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model = model.to(device).to(memory_format=layout)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        # Time steps inside the density warm-up, where masks change every step (the most work); frozen: after it.
        schedule = {"warmup_frac": 0.0, "finetune_frac": 1.0} if frozen else {}
        config = SparsityConfig(method=method, target=0.9, **schedule, **sparsity)
        self.sparsifier = Sparsifier(self.model, config, total_steps=10_000, optimizer=self.optimizer)
        self.x = torch.randn(args.batch_size, *shape, device=device).contiguous(memory_format=layout)
        self.y = torch.randint(0, classes, (args.batch_size,), device=device)
        self.step_times: list[float] = []
        self.sparsifier_times: list[float] = []

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self, timed: bool) -> None:
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if self.args.bf16 else contextlib.nullcontext()
        )
        self.sync()
        start = time.perf_counter()
        with autocast:
            loss = nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.sparsifier.finish_backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.sync()
        middle = time.perf_counter()
        self.sparsifier.step(statistics=False)  # as the trainer does between log steps
        self.sync()
        end = time.perf_counter()
        if timed:
            self.step_times.append(end - start)
            self.sparsifier_times.append(end - middle)

    def result(self, name: str) -> dict:
        return {
            "method": name,
            "step_ms": 1e3 * statistics.median(self.step_times),
            "sparsifier_step_ms": 1e3 * statistics.median(self.sparsifier_times),
        }


def bench(args, device: torch.device, methods: dict[str, tuple[str, bool]]) -> list[dict]:
    """``methods``: row name → (method, frozen). Steps interleaved across methods; rows in the given order."""
    trainers = {name: Trainer(method, args, device, frozen) for name, (method, frozen) in methods.items()}
    for i in range(args.warmup + args.steps):
        for trainer in trainers.values():
            trainer.step(timed=i >= args.warmup)
    rows = [trainer.result(name) for name, trainer in trainers.items()]
    dense = rows[0]["step_ms"]
    for row in rows:
        row["vs_dense"] = row["step_ms"] / dense
    return rows


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("resnet50", "vit_b16", "small_cnn"), default="resnet50")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--resolution", type=int, default=128, help="resnet50 / vit_b16 input size (px)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--json", default=None, help="default: docs/bench_sparsifier_<model>_<device>.json")
    return parser


def main() -> None:
    args = parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = bench(args, device, {m: (m, False) for m in METHODS})
    size = "28 px" if args.model == "small_cnn" else f"{args.resolution} px"
    print(
        f"{args.model}, {size}, batch {args.batch_size}, {device}, bf16={args.bf16}, "
        f"channels_last={args.channels_last}, threads={torch.get_num_threads()}, "
        f"median of {args.steps} interleaved steps"
    )
    print("| method | step (ms) | vs dense | sparsifier.step() (ms) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['step_ms']:.1f} | {row['vs_dense']:.2f}x | {row['sparsifier_step_ms']:.2f} |")
    path = Path(args.json or f"docs/bench_sparsifier_{args.model}_{device.type}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
