"""Evaluate a finished run: ``python eval.py run_dir=outputs/NAME/DATE [data.path=...] [trainer.device=cpu]``.

Prints top-1/top-5, sparsity (all/masked), per-layer densities and FLOPs dense vs sparse; writes eval.json
into the run directory. ``checkpoint=FILE`` evaluates another weights file (a training checkpoint is
finalized first).
"""

import dataclasses
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

from spartan.train import cli
from spartan.train.config import EvalConfig, TrainConfig, register
from spartan.train.data import get_backend
from spartan.train.errors import ConfigError
from spartan.train.evaluation import evaluate_run, find_weights, format_eval

register(ConfigStore.instance())


def run_config(run_dir: Path, config: EvalConfig) -> TrainConfig:
    """The run's own config (``.hydra/config.yaml``) with this command's data/trainer overrides, validated against
    the schema of the run's ``data=`` option."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"run_dir={str(run_dir)!r} has no .hydra/config.yaml (not a train.py run directory)")
    saved = OmegaConf.load(path)
    schema = OmegaConf.merge(
        OmegaConf.structured(TrainConfig), {"data": OmegaConf.structured(get_backend(saved.data.name).schema)}
    )
    overrides = {
        group: {k: v for k, v in dataclasses.asdict(getattr(config, group)).items() if v is not None}
        for group in ("data", "trainer")
    }
    try:
        merged = OmegaConf.merge(schema, saved, overrides, {"resume": None})
    except ConfigKeyError as err:
        raise ConfigError(f"{err.full_key} is not a key of data={saved.data.name} (the run's data option)") from None
    return cli.to_dataclass(merged)


@hydra.main(config_path=str(Path(__file__).resolve().parent / "configs"), config_name="eval", version_base="1.3")
@cli.report_errors
def main(cfg: DictConfig) -> float:
    config = cli.to_dataclass(cfg)
    run_dir, weights = find_weights(
        Path(config.run_dir) if config.run_dir else None, Path(config.checkpoint) if config.checkpoint else None
    )
    result = evaluate_run(run_config(run_dir, config), run_dir, weights)
    print(format_eval(result))
    print(f"wrote {run_dir / 'eval.json'}")
    return result["val_top1"]


if __name__ == "__main__":
    sys.argv = cli.prepare_torchrun(sys.argv)
    main()
    cli.finish(0)
