"""PNGs of one training run from its metrics.jsonl: loss, top-1, learning rate, target vs actual density, β / λ /
mask flip rate, and the last per-layer densities (spartan.train.reports.plot_run).

    python scripts/plot_run.py outputs/fmnist_spartan_s95/2026-12-02_06-00-00      # → RUN_DIR/plots/*.png
    python scripts/plot_run.py RUN_DIR --out docs/figures/fmnist_spartan_s95
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spartan.train.errors import ConfigError
from spartan.train.reports import plot_run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a train.py run directory (holding metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="folder for the PNGs (default: RUN_DIR/plots)")
    args = parser.parse_args()
    try:
        written = plot_run(args.run_dir, args.out)
    except ConfigError as err:
        print(f"plot_run: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
