"""A sweep's results as a markdown table, JSON and a plot (spartan.train.reports).

Jobs are the run directories under each MULTIRUN_DIR (train.py -m writes one per job); they are grouped by the
config values that differ between them, seeds excepted: one row per cell with mean ± std over seeds of val and
test top-1, the exact sparsity reached, how many runs ended with a layer that kept no weight, and wall time.

    python train.py -m experiment=fmnist_spartan_s95 sparsity.method=spartan,topkast seed=0,1,2
    python scripts/sweep_report.py multirun/2026-12-02_06-00-00                  # → MULTIRUN_DIR/report.{md,json,png}
    python scripts/sweep_report.py SWEEP_A SWEEP_B --out docs/fmnist_main --metric val_top1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from spartan.train.errors import ConfigError
from spartan.train.reports import find_jobs, group_cells, plot_sweep, select_jobs, sweep_records, sweep_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dirs", type=Path, nargs="+", metavar="MULTIRUN_DIR", help="folders of run directories")
    parser.add_argument("--out", type=Path, help="path prefix of the .md/.json/.png (default: FIRST_DIR/report)")
    parser.add_argument(
        "--metric",
        choices=("test_top1", "val_top1"),
        help="what the plot shows (default: test_top1 if the runs have a test split, else val_top1)",
    )
    parser.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only jobs whose config has this value (repeatable), e.g. --where sparsity.method=spartan",
    )
    parser.add_argument("--no-plot", action="store_true", help="only the table and the JSON")
    args = parser.parse_args()
    try:
        varying, cells = group_cells(select_jobs(find_jobs(args.sweep_dirs), args.where))
    except ConfigError as err:
        print(f"sweep_report: {err}", file=sys.stderr)
        return 2
    out = args.out or args.sweep_dirs[0] / "report"
    out.parent.mkdir(parents=True, exist_ok=True)
    table = sweep_table(varying, cells)
    Path(f"{out}.md").write_text(table + "\n")
    Path(f"{out}.json").write_text(json.dumps(sweep_records(varying, cells), indent=1, default=str) + "\n")
    print(table)
    print(f"\nwrote {out}.md, {out}.json", end="")
    if not args.no_plot:
        tested = any(cell.stat("test_top1") is not None for cell in cells)
        metric = args.metric or ("test_top1" if tested else "val_top1")
        print(f", {plot_sweep(varying, cells, Path(f'{out}.png'), metric)}", end="")
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
