"""Compare sparsification methods on real data: a small CNN on scikit-learn's digits (8×8, 10 classes).

A plain PyTorch loop (no Hydra): fixed train/val split, SGD with Nesterov momentum and a cosine learning
rate, the same sparsity schedule for every method. Prints a markdown table (val top-1 mean ± std over seeds,
measured sparsity, layer collapse, wall time) and writes the raw numbers as JSON.

    python scripts/compare_methods.py                      # table for docs/results_digits.md, raw .json
    python scripts/compare_methods.py --beta-final 10 100 1000 --methods spartan --sparsities 0.95
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from spartan import Sparsifier, SparsityConfig
from spartan.train.config import OptimConfig
from spartan.train.data.backends.digits import digits_split
from spartan.train.models import digits_cnn
from spartan.train.optim import build_optimizer


def run(method: str, sparsity: float, seed: int, args, data) -> dict:
    x_train, y_train, x_val, y_val = data
    torch.manual_seed(seed)
    model = digits_cnn().to(x_train.device)
    steps_per_epoch = len(x_train) // args.batch_size
    total = steps_per_epoch * args.epochs
    optimizer = build_optimizer(
        model, OptimConfig(name="sgd", lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay), args.lr
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=total, pct_start=0.1, anneal_strategy="cos"
    )
    config = SparsityConfig(
        method=method,
        target=sparsity,
        beta_init=args.beta_init,
        beta_final=args.beta_final,
        warmup_frac=args.warmup_frac,
        finetune_frac=args.finetune_frac,
    )
    sparsifier = Sparsifier(model, config, total_steps=total, optimizer=optimizer)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(len(x_train), generator=gen).to(x_train.device)
        for k in range(steps_per_epoch):
            batch = order[k * args.batch_size : (k + 1) * args.batch_size]
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch], label_smoothing=0.1)
            loss.backward()
            sparsifier.finish_backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            sparsifier.step()
    model = sparsifier.finalize()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_val).argmax(1) == y_val).float().mean())
    report = sparsifier.report()
    totals = report["totals"]
    return {
        "method": method,
        "target": sparsity,
        "seed": seed,
        "beta_final": args.beta_final,
        "val_top1": accuracy,
        "sparsity_all": totals["sparsity_all"],
        "sparsity_masked": totals["sparsity_masked"],
        "seconds": seconds,
        "layers_kept": {row["name"]: row["params_kept"] for row in report["layers"]},
    }


def table(results: list[dict]) -> str:
    lines = [
        "| method | β final | target sparsity | val top-1 (mean ± std) | sparsity, all params | "
        "sparsity, masked | runs with a fully pruned layer | wall time / run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted(
        {(r["target"], r["beta_final"], r["method"]) for r in results},
        key=lambda k: (k[0], ["dense", "spartan", "topkast", "magnitude"].index(k[2]), k[1]),
    )
    for target, beta_final, method in keys:
        rows = [r for r in results if (r["target"], r["beta_final"], r["method"]) == (target, beta_final, method)]
        acc = [100 * r["val_top1"] for r in rows]
        spread = statistics.stdev(acc) if len(acc) > 1 else 0.0
        lines.append(
            f"| {method} | {beta_final:g} | {target:.2f} | {statistics.mean(acc):.2f} ± {spread:.2f} "
            f"(n={len(acc)}) | {rows[0]['sparsity_all']:.4f} | {rows[0]['sparsity_masked']:.4f} | "
            f"{sum(min(r['layers_kept'].values()) == 0 for r in rows)} | "
            f"{statistics.mean(r['seconds'] for r in rows):.1f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["spartan", "topkast", "magnitude"])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--beta-init", type=float, default=1.0)
    parser.add_argument("--beta-final", type=float, nargs="+", default=[10.0])
    parser.add_argument("--warmup-frac", type=float, default=0.2)
    parser.add_argument("--finetune-frac", type=float, default=0.2)
    parser.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    parser.add_argument("--out", default="docs/results_digits")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = digits_split()
    jobs = [] if args.no_dense else [("dense", 0.0, 10.0)]
    jobs += [(m, s, b) for s in args.sparsities for m in args.methods for b in args.beta_final]
    results = []
    for method, sparsity, beta_final in jobs:
        for seed in args.seeds:
            args.beta_final = beta_final
            result = run(method, sparsity, seed, args, data)
            results.append(result)
            print(
                f"{method:9s} β_final={beta_final:<6g} sparsity={sparsity:.2f} seed={seed}: "
                f"top-1 {100 * result['val_top1']:.2f}%  ({result['seconds']:.1f} s)",
                flush=True,
            )
    text = table(results)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}.json")


if __name__ == "__main__":
    main()
