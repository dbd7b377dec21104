"""Train a sparse network: ``python train.py [experiment=NAME] [GROUP=OPTION] [KEY=VALUE ...]``.

See README.md for the ImageNet, torchrun, Slurm and sweep commands; configs/ holds every option. Exit statuses:
``spartan.train.lifecycle.ExitStatus`` (0 finished, 1 failed, 2 bad input, 3 stopped by trainer.stop_after_epochs,
4 stopped by a signal with a checkpoint; 3 and 4 continue with resume=auto).
"""

import contextlib
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from spartan.train import cli
from spartan.train.config import register
from spartan.train.distributed import launched_by_submitit
from spartan.train.errors import ConfigError
from spartan.train.lifecycle import AlreadyFinished, ExitStatus, Interrupted
from spartan.train.loop import train

register(ConfigStore.instance())


@hydra.main(config_path=str(Path(__file__).resolve().parent / "configs"), config_name="train", version_base="1.3")
@cli.report_errors
def main(cfg: DictConfig) -> float | None:
    hydra_config = HydraConfig.get()
    run_dir = Path(hydra_config.runtime.output_dir)
    overrides = list(hydra_config.overrides.task)
    if hydra_config.mode == RunMode.MULTIRUN and cfg.logger.group is None:
        cfg.logger.group = Path(hydra_config.sweep.dir).name  # a sweep's runs form one W&B group
    try:
        config = cli.to_dataclass(cfg)
        files = {
            ".hydra/config.yaml": OmegaConf.to_yaml(cfg, resolve=True),
            ".hydra/overrides.yaml": OmegaConf.to_yaml(overrides),
        }
        summary = train(config, run_dir, files=files, run_config=OmegaConf.to_container(cfg, resolve=True))
    except ConfigError:
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # Hydra created it for this run; a start that failed leaves nothing (non-empty: kept)
        raise
    except AlreadyFinished as done:
        cli.finish(ExitStatus.FINISHED, f"nothing to do: {done}", stream=sys.stdout)
        return None
    except Interrupted as stop:
        cli.announce(
            f"stopped by {stop.signal_name} in epoch {stop.epoch} after step {stop.step}, checkpoint written; "
            + (
                "submitit requeues the job if Slurm asked for it"
                if launched_by_submitit()
                else f"continue with: {cli.continue_command(overrides, run_dir)}"
            )
        )
        stop.forward()  # submitit's handler requeues the job (and exits) here
        cli.finish(ExitStatus.INTERRUPTED)
    if summary is None:  # trainer.stop_after_epochs (the loop logged where and how to continue)
        if hydra_config.mode != RunMode.MULTIRUN:  # a sweep goes on with its next job
            cli.finish(ExitStatus.STOPPED)
        return None
    return summary["val_top1"]  # the value a sweeper optimizes


if __name__ == "__main__":
    sys.argv = cli.prepare_torchrun(sys.argv)
    main()
    cli.finish(ExitStatus.FINISHED)
