"""Train a sparse network: ``python train.py [experiment=NAME] [GROUP=OPTION] [KEY=VALUE ...]``.

See README.md for the ImageNet, torchrun and sweep commands; configs/ holds every option.
"""

import contextlib
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from spartan.train import cli
from spartan.train.config import register
from spartan.train.errors import ConfigError
from spartan.train.loop import train

register(ConfigStore.instance())


@hydra.main(config_path=str(Path(__file__).resolve().parent / "configs"), config_name="train", version_base="1.3")
@cli.report_errors
def main(cfg: DictConfig) -> float | None:
    hydra_config = HydraConfig.get()
    run_dir = Path(hydra_config.runtime.output_dir)
    try:
        config = cli.to_dataclass(cfg)
        files = {
            ".hydra/config.yaml": OmegaConf.to_yaml(cfg, resolve=True),
            ".hydra/overrides.yaml": OmegaConf.to_yaml(list(hydra_config.overrides.task)),
        }
        summary = train(config, run_dir, files=files, run_config=OmegaConf.to_container(cfg, resolve=True))
    except ConfigError:
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # Hydra created it for this run; a start that failed leaves nothing (non-empty: kept)
        raise
    return summary["val_top1"] if summary else None  # the value a sweeper optimizes


if __name__ == "__main__":
    sys.argv = cli.prepare_torchrun(sys.argv)
    main()
    cli.exit_distributed()
