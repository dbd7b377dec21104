"""Shared helpers for the trainer tests: compose the real configs, run the real entry points."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore

from spartan.train import cli
from spartan.train.config import TrainConfig, register

ROOT = Path(__file__).resolve().parents[1]
register(ConfigStore.instance())


def compose_train(*overrides: str) -> TrainConfig:
    """``configs/train.yaml`` composed with ``overrides`` and validated, as ``train.py`` does."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    return cli.to_dataclass(cfg)


def clean_env(home: Path) -> dict[str, str]:
    """The environment of a fresh user: no W&B key, no netrc, one thread per process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_cli(
    script: str,
    *args: str,
    cwd: Path,
    home: Path | None = None,
    timeout: int = 300,
    launcher: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    command = [*launcher] if launcher else [sys.executable]
    target = [script] if script.startswith("-") else [str(ROOT / script)]  # "-c" runs code
    return subprocess.run(
        [*command, *target, *args],
        cwd=cwd,
        env={**clean_env(home or cwd), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def tiny_digits() -> tuple[str, ...]:
    """Overrides for a seconds-long digits run (the out-of-the-box config, shortened)."""
    return ("logger=none", "schedule.epochs=2", "trainer.log_every=5")


def write_image_folder(root: Path, classes: int = 4, per_class: int = 6) -> Path:
    """A tiny ImageNet-layout folder of JPEGs whose colour depends on the class."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                size = (int(torch.randint(24, 48, (), generator=gen)), int(torch.randint(24, 48, (), generator=gen)))
                base = torch.tensor([60 * c, 255 - 60 * c, 128]).view(1, 1, 3)
                noise = torch.randint(0, 40, (size[1], size[0], 3), generator=gen)
                Image.fromarray((base + noise).clamp(0, 255).to(torch.uint8).numpy()).save(folder / f"{i}.JPEG")
    return root
