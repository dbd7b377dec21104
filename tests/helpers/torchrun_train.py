"""``train.py`` under torchrun, with each rank saving its final masks to $MASKS_DIR (test instrumentation)."""

import os
import sys
from pathlib import Path

import torch

import spartan.train.loop as loop
from spartan.train import cli

finish = loop.Run.finish


def finish_and_save_masks(self):
    masks = [m.clone() for m in self.sparsifier.masks().values()]
    torch.save(masks, Path(os.environ["MASKS_DIR"]) / f"masks_rank{self.process.rank}.pt")
    return finish(self)


loop.Run.finish = finish_and_save_masks

if __name__ == "__main__":
    import train  # the repository root is on PYTHONPATH (tests/conftest.py's clean_env)

    sys.argv = cli.prepare_torchrun(["train.py", *sys.argv[1:]])
    train.main()
    cli.finish(0)
