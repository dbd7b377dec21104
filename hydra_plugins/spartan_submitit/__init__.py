"""spartan's submitit launchers for Hydra (``hydra/launcher=slurm`` / ``local``): Hydra loads launchers only from the
``hydra_plugins`` namespace package."""
