"""Reading finished runs back: one run's ``metrics.jsonl`` as plots, a sweep's jobs as a table and a plot.

A sweep is any folder of ``train.py`` run directories (``train.py -m`` writes one per job under
``hydra.sweep.dir``); several folders can be reported together. Jobs are grouped by the config values that differ
between them, the seed excepted, so the table's columns are exactly what the sweep varied. Plotting needs
matplotlib (the ``plots`` extra), imported only by the functions that draw.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from spartan.methods import METHODS
from spartan.train.errors import ConfigError

IGNORED_KEYS = ("seed", "name", "resume", "logger.", "data.path", "data.train_path", "data.val_path")
"""Config keys (or prefixes) that never define a sweep cell: replicates, labels, where data and logs are."""


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` in order; a torn last line (a killed job) is left out."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no metrics.jsonl (not a train.py run directory)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _series(records: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r["kind"] == kind and r.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """PNGs of one run from its ``metrics.jsonl`` into ``out_dir`` (default ``run_dir/plots``): ``loss.png`` and
    ``top1.png`` (training windows and validations), ``lr.png``, ``density.png`` (target vs actual, fractions
    kept), ``mask.png`` (β, λ, mask flip rate; soft-mask methods), ``layers.png`` (the last per-layer densities).
    Plots without data (a dense run's masks) are not written. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(out_dir / name)

    def curves(name: str, ylabel: str, lines: Sequence[tuple[str, str, str, float]]) -> None:
        """``lines``: (label, kind, key, scale) series against the optimizer step."""
        drawn = [(label, *_series(records, kind, key), scale) for label, kind, key, scale in lines]
        drawn = [d for d in drawn if d[1]]
        if not drawn:
            return
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for label, steps, values, scale in drawn:
            ax.plot(steps, [scale * v for v in values], marker="o" if len(steps) < 20 else None, label=label)
        ax.set(xlabel="optimizer step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, name)

    evaluations = ("val", "final")
    curves(
        "loss.png",
        "cross-entropy",
        [("train", "train", "loss", 1.0)] + [(k, k, "loss", 1.0) for k in evaluations],
    )
    curves(
        "top1.png",
        "top-1 (%)",
        [("train", "train", "top1", 100.0)] + [(k, k, "top1", 100.0) for k in evaluations],
    )
    curves("lr.png", "learning rate", [("lr", "train", "lr", 1.0)])
    train = [r for r in records if r["kind"] == "train"]
    if any(r.get("sparsity_target", 0) > 0 for r in train):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        steps = [r["step"] for r in train]
        ax.plot(steps, [1 - r["sparsity_target"] for r in train], "--", label="target (counted as configured)")
        ax.plot(steps, [1 - r["sparsity_all"] for r in train], label="actual, all parameters")
        ax.plot(steps, [1 - r["sparsity_masked"] for r in train], label="actual, masked weights")
        ax.set(xlabel="optimizer step", ylabel="density (fraction kept)", yscale="log")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        save(fig, "density.png")
    panels = [
        (key, label)
        for key, label in (
            ("beta_effective", "β given to the solver (1/unit value)"),
            ("lam", "λ (threshold, unit values)"),
            ("flip_rate", "mask flip rate per step"),
        )
        if _series(records, "train", key)[0]
    ]
    if panels:
        fig, axes = plt.subplots(len(panels), 1, figsize=(6, 2.2 * len(panels)), sharex=True, squeeze=False)
        for ax, (key, label) in zip(axes[:, 0], panels):
            ax.plot(*_series(records, "train", key))
            ax.set(ylabel=label)
            ax.yaxis.label.set_size(8)
            ax.grid(alpha=0.3)
        axes[-1, 0].set(xlabel="optimizer step")
        save(fig, "mask.png")
    layers = [r for r in records if r["kind"] == "layers"]
    if layers:
        rows = layers[-1]["layers"]
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows)), 4))
        positions = range(len(rows))
        ax.bar(positions, [r["density"] for r in rows], label="density")
        if all(r.get("density_target") is not None for r in rows):
            ax.plot(positions, [r["density_target"] for r in rows], "k_", markersize=14, label="target")
        ax.set_xticks(list(positions), [r["name"] for r in rows], rotation=70, ha="right", fontsize=7)
        ax.set(ylabel="density (fraction kept)", title=f"per-layer density at epoch {layers[-1]['epoch']}")
        ax.legend()
        save(fig, "layers.png")
    return written


# ----------------------------------------------------------------------------------------------- sweeps


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tuple(tree) if isinstance(tree, list) else tree}


def _ignored(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in IGNORED_KEYS)


@dataclass
class Job:
    """One run directory of a sweep: its flattened config and its ``summary.json`` (None: it did not finish)."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any] | None

    @property
    def cell(self) -> dict[str, Any]:
        """The config values that can define a cell; a dense run's sparsity settings and a hard-mask method's β
        do not apply."""
        values = {k: v for k, v in self.config.items() if not _ignored(k)}
        method = values.get("sparsity.method")
        if method == "dense":
            values = {k: v for k, v in values.items() if not k.startswith("sparsity.") or k == "sparsity.method"}
        elif method in METHODS and not METHODS[method].soft_mask:  # β only shapes soft masks
            values = {k: v for k, v in values.items() if not k.startswith("sparsity.beta")}
        return values


def find_jobs(sweep_dirs: Iterable[Path]) -> list[Job]:
    """Every run directory (holding ``.hydra/config.yaml``) directly under the ``sweep_dirs``."""
    jobs = []
    for sweep in map(Path, sweep_dirs):
        if not sweep.is_dir():
            raise ConfigError(f"{sweep} is not a directory")
        for config in sorted(sweep.glob("*/.hydra/config.yaml")):
            run = config.parent.parent
            summary = run / "summary.json"
            jobs.append(
                Job(
                    run,
                    _flatten(OmegaConf.to_container(OmegaConf.load(config))),
                    json.loads(summary.read_text()) if summary.is_file() else None,
                )
            )
    if not jobs:
        raise ConfigError(f"no train.py run directories under {', '.join(map(str, sweep_dirs))}")
    return jobs


def select_jobs(jobs: list[Job], conditions: Iterable[str]) -> list[Job]:
    """The jobs whose config matches every ``KEY=VALUE`` of ``conditions`` (values compared as written in YAML)."""
    selected = jobs
    for condition in conditions:
        key, sep, value = condition.partition("=")
        if not sep or not key:
            raise ConfigError(f"--where takes KEY=VALUE, got {condition!r}")
        if not any(key in job.config for job in jobs):
            raise ConfigError(f"--where {condition!r}: no job has a config key {key!r}")
        wanted = OmegaConf.create({"v": value}).v if value else value
        selected = [job for job in selected if job.config.get(key) == wanted or str(job.config.get(key)) == value]
    if not selected:
        raise ConfigError(f"no job matches {' and '.join(conditions)}")
    return selected


@dataclass
class Cell:
    """Jobs that differ only in their seed."""

    values: dict[str, Any]
    jobs: list[Job] = field(default_factory=list)

    @property
    def finished(self) -> list[dict[str, Any]]:
        return [j.summary for j in self.jobs if j.summary is not None]

    def results(self, key: str, scale: float = 1.0) -> list[float]:
        """``key`` of every finished run that has it, times ``scale``."""
        return [scale * s[key] for s in self.finished if s.get(key) is not None]

    def stat(self, key: str, scale: float = 1.0) -> tuple[float, float] | None:
        """Mean and sample standard deviation (0 for one run) of ``key`` over the finished runs; None without."""
        values = self.results(key, scale)
        if not values:
            return None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def group_cells(jobs: list[Job]) -> tuple[list[str], list[Cell]]:
    """``(keys that vary, cells)``: jobs grouped by the values of every config key that differs between them."""
    cells_values = [job.cell for job in jobs]
    keys = sorted({k for values in cells_values for k in values})
    # A key varies when the jobs it applies to have more than one value of it (not when it applies to some only).
    varying = [k for k in keys if len({repr(values[k]) for values in cells_values if k in values}) > 1]
    cells: dict[str, Cell] = {}
    for job, values in zip(jobs, cells_values):
        chosen = {k: values.get(k) for k in varying}
        cells.setdefault(repr(chosen), Cell(chosen)).jobs.append(job)
    return varying, sorted(cells.values(), key=lambda cell: [_order(cell.values[k]) for k in varying])


def _order(value: Any) -> tuple:
    """Sort key of a cell value: missing first, then numbers by value, then anything else by its text."""
    if value is None:
        return (0, 0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, value, "")
    return (2, 0, str(value))


def _pm(cell: Cell, key: str, scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± std`` of ``key`` over the cell's runs (the value alone for one run, ``—`` for none)."""
    values = cell.results(key, scale)
    if len(values) < 2:
        return f"{values[0]:.{digits}f}" if values else "—"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _short(key: str) -> str:
    return key.removeprefix("sparsity.").removeprefix("model.").removeprefix("schedule.")


def sweep_table(varying: list[str], cells: list[Cell]) -> str:
    """A markdown table, one row per cell: the varying keys, runs finished / started, val and test top-1 (%, mean
    ± sample std over seeds; the value alone for one run), exact sparsity (all parameters, masked weights), runs
    with a layer that kept no weight, and the mean wall time per run."""
    header = [
        *map(_short, varying),
        "runs",
        "val top-1 (%)",
        "test top-1 (%)",
        "sparsity, all",
        "sparsity, masked",
        "collapsed runs",
        "wall time / run",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cell in cells:
        finished = cell.finished
        collapsed = sum(1 for s in finished if s.get("degenerate", {}).get("empty_layers"))
        wall = cell.stat("wall_seconds")
        row = [
            *("—" if cell.values[k] is None else str(cell.values[k]) for k in varying),
            f"{len(finished)}/{len(cell.jobs)}",
            _pm(cell, "val_top1", 100),
            _pm(cell, "test_top1", 100),
            _pm(cell, "sparsity_all", digits=4),
            _pm(cell, "sparsity_masked", digits=4),
            str(collapsed),
            "—" if wall is None else f"{wall[0]:.0f} s",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def sweep_records(varying: list[str], cells: list[Cell]) -> list[dict[str, Any]]:
    """The table's numbers as JSON-ready rows, with every run's seed, directory and key results."""
    rows = []
    for cell in cells:
        rows.append(
            {
                "cell": {_short(k): v for k, v in cell.values.items()},
                "val_top1": cell.stat("val_top1"),
                "test_top1": cell.stat("test_top1"),
                "sparsity_all": cell.stat("sparsity_all"),
                "runs": [
                    {
                        "dir": str(job.path),
                        "seed": job.config.get("seed"),
                        **(
                            {}
                            if job.summary is None
                            else {
                                k: job.summary.get(k)
                                for k in ("val_top1", "test_top1", "sparsity_all", "wall_seconds", "degenerate")
                            }
                        ),
                    }
                    for job in cell.jobs
                ],
            }
        )
    return rows


def plot_sweep(varying: list[str], cells: list[Cell], path: Path, metric: str = "test_top1") -> Path:
    """Top-1 (``metric``, %) against target sparsity, one line per combination of the other varying keys (mean ±
    std over seeds); dense runs as a horizontal band; on the right the same zoomed to within 8 points of the best
    cell. The x axis is ``-log10(1 - sparsity)``-spaced."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [k for k in varying if k != "sparsity.target"]
    lines: dict[str, list[tuple[float, tuple[float, float]]]] = {}
    dense = []
    for cell in cells:
        stat = cell.stat(metric, 100)
        if stat is None:
            continue
        if cell.values.get("sparsity.method") == "dense":
            dense.append(stat)
            continue
        label = ", ".join(f"{_short(k)}={cell.values[k]}" for k in others if k != "sparsity.method")
        label = f"{cell.values.get('sparsity.method', '')} {label}".strip()
        target = cell.finished[0]["sparsity_target"]
        lines.setdefault(label, []).append((target, stat))
    if not lines and not dense:
        raise ConfigError(f"no finished run has {metric} to plot")

    def position(sparsity: float) -> float:
        return -math.log10(1 - sparsity)

    means = [m for points in lines.values() for _, (m, _) in points] + [m for m, _ in dense]
    best = max(means)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    targets = sorted({t for points in lines.values() for t, _ in points})
    for ax, zoom in zip(axes, (False, True)):
        for label, points in sorted(lines.items()):
            points.sort()
            xs = [position(t) for t, _ in points]
            ax.errorbar(
                xs, [m for _, (m, _) in points], yerr=[s for _, (_, s) in points], marker="o", capsize=3, label=label
            )
        for mean, std in dense:
            ax.axhspan(mean - std, mean + std, color="gray", alpha=0.2)
            ax.axhline(mean, color="gray", linestyle="--", label=f"dense {mean:.2f}")
        if targets:
            ax.set_xticks([position(t) for t in targets], [f"{t:g}" for t in targets])
        ax.set(xlabel="target sparsity", ylabel=f"{metric.replace('_', ' ')} (%), mean ± std over seeds")
        if zoom:  # the best cells, whatever the collapsed ones did
            ax.set_ylim(max(min(means), best - 8) - 0.5, best + 0.5)
            ax.set_title(f"within 8 points of the best ({best:.2f})", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
