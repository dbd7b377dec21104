"""``train.py`` under torchrun, with each rank saving its final masks to $MASKS_DIR (test instrumentation)."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import spartan.train.loop as loop  # noqa: E402
from spartan.train import cli  # noqa: E402

finish = loop.Run.finish


def finish_and_save_masks(self):
    masks = [m.keep.clone() for m in self.sparsifier.masks]
    torch.save(masks, Path(os.environ["MASKS_DIR"]) / f"masks_rank{self.process.rank}.pt")
    return finish(self)


loop.Run.finish = finish_and_save_masks

if __name__ == "__main__":
    import train

    sys.argv = cli.prepare_torchrun(["train.py", *sys.argv[1:]])
    train.main()
    cli.exit_distributed()
