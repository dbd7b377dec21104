"""Export a finished run's sparse model.

    python scripts/export.py RUN_DIR                    # RUN_DIR/model_sparse.pt (compressed) + export.json
    python scripts/export.py RUN_DIR --onnx             # + RUN_DIR/model.onnx, checked against onnxruntime
    python scripts/export.py RUN_DIR --sparse-modules   # + sparse inference modules checked and timed
    python scripts/export.py --expand model_sparse.pt model.pt   # a plain state_dict again

``--weights FILE`` exports another weights file of the run (a training checkpoint is finalized first). The checks
run on the run's validation data on the CPU (``--threads`` for onnxruntime and the timing); ``eval.py
checkpoint=RUN_DIR/model_sparse.pt`` evaluates the compressed file like ``model_final.pt``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spartan.train.errors import ConfigError
from spartan.train.evaluation import find_weights
from spartan.train.export import expand, export_run
from spartan.train.lifecycle import RunError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", type=Path)
    parser.add_argument("--weights", type=Path, help="a weights file of the run (default: RUN_DIR/model_final.pt)")
    parser.add_argument("--onnx", action="store_true", help="also write model.onnx and check it with onnxruntime")
    parser.add_argument("--sparse-modules", action="store_true", help="also check and time sparse inference modules")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the checks (default 1)")
    parser.add_argument("--expand", nargs=2, type=Path, metavar=("COMPRESSED", "OUT"))
    args = parser.parse_args(argv)
    if (args.run_dir is None) == (args.expand is None):
        parser.error("give RUN_DIR or --expand COMPRESSED OUT")
    if args.threads < 1:
        parser.error(f"--threads must be an integer >= 1, got {args.threads}")
    try:
        if args.expand:
            expand(*args.expand)
            print(f"wrote {args.expand[1]}")
            return 0
        run_dir, weights = find_weights(args.run_dir, args.weights)
        result = export_run(run_dir, weights, onnx=args.onnx, sparse_modules=args.sparse_modules, threads=args.threads)
    except (ConfigError, RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    packed = result["compressed"]
    print(f"{packed['file']}: {packed['bytes']:,} bytes, {packed['ratio']:.3f}× the dense {packed['dense_bytes']:,}")
    for name in ("onnx", "sparse_modules"):
        if name in result:
            row = result[name]
            print(
                f"{name}: top-1 {100 * row['top1']:.2f}% (torch {100 * row['top1_torch']:.2f}%), "
                f"{row['predictions_differ']} of {row['images']} predictions differ, "
                f"max |logit diff| {row['max_abs_logit_diff']:.2e}"
            )
    if "sparse_modules" in result:
        row = result["sparse_modules"]
        print(
            f"sparse modules: {row['ms_sparse']:.1f} ms vs dense {row['ms_dense']:.1f} ms per batch of "
            f"{row['batch_size']} ({row['threads']} thread(s))"
        )
    print(f"wrote {run_dir / 'export.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
