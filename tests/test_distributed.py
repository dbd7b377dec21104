"""Spartan under DDP (2 gloo processes on CPU) equals single-process training on the whole batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from helpers.ddp_worker import run

HELPERS = Path(__file__).parent / "helpers"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradients_and_masks_match_single_process(tmp_path):
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    workers = [
        subprocess.Popen(
            [sys.executable, str(HELPERS / "ddp_worker.py"), str(tmp_path)], env={**env, "RANK": str(rank)}
        )
        for rank in range(2)
    ]
    assert [w.wait(timeout=300) for w in workers] == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = run(rank=0, world=1, steps=3)
    for step in range(3):
        for a, b, expected in zip(ranks[0]["masks"][step], ranks[1]["masks"][step], single["masks"][step]):
            assert torch.equal(a, b)  # every rank computes the same masks from the synchronized weights
            assert torch.allclose(a, expected, atol=1e-6)
        for a, b, expected in zip(ranks[0]["grads"][step], ranks[1]["grads"][step], single["grads"][step]):
            assert torch.equal(a, b)
            assert torch.allclose(a, expected, rtol=1e-4, atol=1e-6)
    # A layer used on one rank only: finish_backward's collectives still match (no hang), masks agree.
    skipped = [torch.load(tmp_path / f"skip_rank{r}.pt") for r in range(2)]
    for a, b in zip(skipped[0]["masks"], skipped[1]["masks"]):
        assert torch.equal(a, b)
