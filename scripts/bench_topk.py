"""Benchmark the soft/hard top-k solvers against sort + Sinkhorn (the reference approach).

For each vector (|w| of torchvision resnet50's Conv2d/Linear weights at init, and a synthetic ViT-B/16-sized
vector), density and β, times and budget errors of:

  (a) reference: full sort + cumsum threshold, then Sinkhorn with the paper's stopping rule;
  (b) cold: our hard threshold + soft solve from scratch;
  (c) warm: the same, started from the λ and threshold of a slightly perturbed vector (one SGD step ≈ 1e-3
      relative change), as the Sparsifier does every step.

Times are also given in units of one sigmoid pass over the same vector, both as ``torch.sigmoid(x)`` (which
allocates its output) and into a preallocated buffer (our solves write into a preallocated mask, too).

    python scripts/bench_topk.py [--device cuda] [--json docs/bench_topk_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torchvision

import spartan
from spartan.reference import sinkhorn_soft_topk, sorted_hard_topk

VIT_B16_SIZE = 86_000_000


def resnet50_magnitudes() -> torch.Tensor:
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    weights = [
        m.weight.detach().abs().reshape(-1)
        for m in model.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    return torch.cat(weights)


def synthetic_magnitudes(n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, generator=gen).abs_().mul_(0.02)


def timed(fn, device: torch.device, repeats: int = 3, warmup: bool = True) -> tuple[float, object]:
    """Median wall time in ms over ``repeats`` calls (after one warm-up call), and the last result."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), result


def budget_error(mask: torch.Tensor, budget: float) -> float:
    return abs(float(mask.double().sum()) - budget) / budget


def bench_vector(name: str, values: torch.Tensor, densities, betas, device: torch.device) -> list[dict]:
    n = values.numel()
    buffer = torch.empty_like(values)
    sigmoid_alloc, _ = timed(lambda: torch.sigmoid(values), device)
    sigmoid_out, _ = timed(lambda: torch.sigmoid(values, out=buffer), device)
    gen = torch.Generator(device=values.device).manual_seed(1)
    previous = values * (1 + 1e-3 * torch.randn(n, generator=gen, device=values.device))
    rows = []
    for density in densities:
        budget = density * n
        sort_ms, _ = timed(lambda: sorted_hard_topk(values, budget), device, repeats=1, warmup=False)
        for beta in betas:
            sinkhorn_ms, (sinkhorn_mask, sinkhorn_iters) = timed(
                lambda: sinkhorn_soft_topk(values, budget, beta), device, repeats=1, warmup=False
            )

            def cold():
                hard = spartan.hard_threshold(values, budget)
                return hard, spartan.solve_soft_topk(values, budget, beta, out=buffer)

            cold_ms, (_, cold_sol) = timed(cold, device)
            cold_err = cold_sol.budget_error
            prev_hard = spartan.hard_threshold(previous, budget)
            prev_soft = spartan.solve_soft_topk(previous, budget, beta)

            def warm():
                hard = spartan.hard_threshold(values, budget, init=prev_hard)
                return hard, spartan.solve_soft_topk(values, budget, beta, lam_init=prev_soft.lam, out=buffer)

            warm_ms, (_, warm_sol) = timed(warm, device)
            reference_ms = sort_ms + sinkhorn_ms
            common = {"vector": name, "n": n, "density": density, "beta": beta}
            for method, ms, err, iters in [
                ("(a) sort+sinkhorn", reference_ms, budget_error(sinkhorn_mask, budget), sinkhorn_iters),
                ("(b) cold", cold_ms, cold_err, cold_sol.iterations),
                ("(c) warm", warm_ms, budget_error(warm_sol.mask, budget), warm_sol.iterations),
            ]:
                rows.append(
                    {
                        **common,
                        "method": method,
                        "ms": ms,
                        "budget_error": err,
                        "passes": iters,
                        "speedup_vs_a": reference_ms / ms,
                        "sigmoid_units": ms / sigmoid_alloc,
                        "sigmoid_out_units": ms / sigmoid_out,
                        "sigmoid_ms": sigmoid_alloc,
                        "sigmoid_out_ms": sigmoid_out,
                    }
                )
            print_rows(rows[-3:])
    return rows


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        print(
            f"| {r['vector']} | {r['density']:.2f} | {r['beta']:g} | {r['method']} | {r['ms']:.1f} | "
            f"{r['budget_error']:.1e} | {r['passes']} | {r['speedup_vs_a']:.1f}x | "
            f"{r['sigmoid_units']:.2f} | {r['sigmoid_out_units']:.1f} |",
            flush=True,
        )


def machine() -> dict:
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "commit": commit,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def check_targets(rows: list[dict]) -> list[str]:
    """The targets of the soft top-k issue, checked row by row."""
    failures = []
    by_case = {}
    for r in rows:
        by_case.setdefault((r["vector"], r["density"], r["beta"]), {})[r["method"][:3]] = r
    for case, m in by_case.items():
        a, b, c = m["(a)"], m["(b)"], m["(c)"]
        for row in (b, c):
            if row["budget_error"] > 1e-6 or row["budget_error"] * 100 > a["budget_error"]:
                failures.append(f"{case} {row['method']}: budget error {row['budget_error']:.1e}")
        if b["speedup_vs_a"] < 5:
            failures.append(f"{case} (b): {b['speedup_vs_a']:.1f}x faster than (a) < 5x")
        if c["speedup_vs_a"] < 10:
            failures.append(f"{case} (c): {c['speedup_vs_a']:.1f}x faster than (a) < 10x")
        if c["sigmoid_units"] > 3:
            failures.append(f"{case} (c): {c['sigmoid_units']:.2f} sigmoid passes > 3")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default="docs/bench_topk_cpu.json")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.05])
    parser.add_argument("--betas", type=float, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--skip-vit", action="store_true", help="only the resnet50 vector")
    args = parser.parse_args()
    device = torch.device(args.device)
    info = machine()
    print(f"machine: {info}")
    print(
        "| vector | density | β | method | ms | budget error | passes | vs (a) | torch.sigmoid passes "
        "| sigmoid-into-buffer passes |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    vectors = [("resnet50 |w|", resnet50_magnitudes)]
    if not args.skip_vit:
        vectors.append(("synthetic 86M", lambda: synthetic_magnitudes(VIT_B16_SIZE)))
    rows = []
    for name, make in vectors:
        rows += bench_vector(name, make().to(device), args.densities, args.betas, device)
    failures = check_targets(rows)
    print("targets: all met" if not failures else "targets missed:\n  " + "\n  ".join(failures))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": info, "rows": rows, "targets_missed": failures}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
