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
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), str(Path(__file__).parent)]),
    }
    workers = [
        subprocess.Popen(
            [sys.executable, str(HELPERS / "ddp_worker.py"), str(tmp_path)],
            env={**env, "RANK": str(rank)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    stderr = [w.communicate(timeout=300)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], stderr
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
    # The mask check passes while the ranks agree and stops both when one rank's mask differs by one bit;
    # finish_backward all-reduces without waiting for the device.
    checks = [torch.load(tmp_path / f"check_rank{r}.pt") for r in range(2)]
    for check in checks:
        assert check["finish_backward_reads"] == []
        assert "masks differ between data-parallel ranks" in check["error"]
        assert "kept entries ranges over [" in check["error"]
    # channels_last: no stride warning from DDP, and the same gradients as the contiguous run.
    for r in range(2):
        contiguous, channels_last = (torch.load(tmp_path / f"layout{k}_rank{r}.pt") for k in (0, 1))
        assert not [w for w in channels_last["warnings"] + contiguous["warnings"] if "stride" in w.lower()]
        for step_a, step_b in zip(contiguous["grads"], channels_last["grads"]):
            for a, b in zip(step_a, step_b):
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert not any("stride" in err.lower() for err in stderr), stderr
