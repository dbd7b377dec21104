"""Evaluate a finished run: ``python eval.py run_dir=outputs/NAME/DATE [data.path=...] [trainer.device=cpu]``.

Prints top-1/top-5, sparsity (all/masked), per-layer densities and FLOPs dense vs sparse; writes eval.json
into the run directory. ``checkpoint=FILE`` evaluates another weights file: a training checkpoint (finalized
first) or a compressed ``model_sparse.pt`` from ``scripts/export.py``.
"""

import dataclasses
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from spartan.train import cli
from spartan.train.config import register
from spartan.train.evaluation import evaluate_run, find_weights, format_eval, run_config

register(ConfigStore.instance())


@hydra.main(config_path=str(Path(__file__).resolve().parent / "configs"), config_name="eval", version_base="1.3")
@cli.report_errors
def main(cfg: DictConfig) -> float:
    config = cli.to_dataclass(cfg)
    run_dir, weights = find_weights(
        Path(config.run_dir) if config.run_dir else None, Path(config.checkpoint) if config.checkpoint else None
    )
    overrides = {
        group: {k: v for k, v in dataclasses.asdict(getattr(config, group)).items() if v is not None}
        for group in ("data", "trainer")
    }
    result = evaluate_run(run_config(run_dir, overrides), run_dir, weights)
    print(format_eval(result))
    print(f"wrote {run_dir / 'eval.json'}")
    return result["val_top1"]


if __name__ == "__main__":
    sys.argv = cli.prepare_torchrun(sys.argv)
    main()
    cli.finish(0)
