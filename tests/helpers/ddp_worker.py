"""One rank of the 2-process gloo DDP check in tests/test_distributed.py (run as a script)."""

import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn

from spartan import Sparsifier, SparsityConfig
from spartan.diagnostics import HostReads


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


class Branchy(nn.Module):
    """A layer only some ranks use (as with layer drop): their sparsifier groups are pending on some ranks only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(12, 12)
        self.extra = nn.Linear(12, 12)
        self.head = nn.Linear(12, 10)

    def forward(self, x, use_extra: bool):
        x = torch.relu(self.body(x.flatten(1)[:, :12]))
        return self.head(self.extra(x) if use_extra else x)


def run_with_skipped_layer(rank: int, world: int, steps: int) -> dict:
    """Uniform allocation (a group per layer); rank 1 never uses ``extra``. Must neither hang nor diverge."""
    model = Branchy()
    config = SparsityConfig(
        method="spartan", target=0.5, allocation="uniform", accounting="masked", warmup_frac=0.0, finetune_frac=0.0
    )
    sparsifier = Sparsifier(model, config, total_steps=steps + 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trained = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    for step in range(steps):
        x, y = batch(step)
        nn.functional.cross_entropy(trained(x[rank::world], use_extra=rank == 0), y[rank::world]).backward()
        sparsifier.finish_backward()
        optimizer.step()
        optimizer.zero_grad()
        sparsifier.step()
    return {"masks": [m.clone() for m in sparsifier.masks().values()]}


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)


def run(rank: int, world: int, steps: int) -> dict:
    """Train ``steps`` steps on rank ``rank``'s share of each global batch of 8; record grads and masks."""
    model = build()
    config = SparsityConfig(
        method="spartan", target=0.8, warmup_frac=0.0, finetune_frac=0.0, beta_init=50, beta_final=50
    )
    sparsifier = Sparsifier(model, config, total_steps=steps + 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trained = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    record = {"grads": [], "masks": []}
    share = 8 // world
    for step in range(steps):
        x, y = batch(step)
        x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
        nn.functional.cross_entropy(trained(x), y).backward()
        sparsifier.finish_backward()
        record["grads"].append([t.weight.grad.clone() for t in sparsifier.tensors])
        optimizer.step()
        optimizer.zero_grad()
        sparsifier.step()
        record["masks"].append([m.clone() for m in sparsifier.masks().values()])
    return record


def run_consistency_check(rank: int, world: int, steps: int) -> dict:
    """Steps under DDP with the mask check each step (reads in finish_backward counted), then one mask bit
    flipped on rank 1 only: the check must stop every rank."""
    model = build()
    config = SparsityConfig(method="spartan", target=0.8, warmup_frac=0.0, finetune_frac=0.0)
    sparsifier = Sparsifier(model, config, total_steps=steps + 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trained = nn.parallel.DistributedDataParallel(model)
    reads = []
    for step in range(steps):
        x, y = batch(step)
        nn.functional.cross_entropy(trained(x[rank::world]), y[rank::world]).backward()
        with HostReads() as counted:
            sparsifier.finish_backward()
        reads.extend(counted.calls)
        optimizer.step()
        optimizer.zero_grad()
        sparsifier.step()
        sparsifier.check_consistency()
    if rank == 1:
        sparsifier.entries.hard[5] = ~sparsifier.entries.hard[5]
    try:
        sparsifier.check_consistency()
        error = None
    except RuntimeError as err:
        error = str(err)
    return {"finish_backward_reads": reads, "error": error}


def run_channels_last(rank: int, world: int, channels_last: bool, steps: int = 2) -> dict:
    """Spartan on 1×1 and 3×3 convolutions under DDP, in either memory format: gradients and DDP's warnings."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10)
    )
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    config = SparsityConfig(method="spartan", target=0.7, warmup_frac=0.0, finetune_frac=0.0)
    sparsifier = Sparsifier(model, config, total_steps=steps + 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trained = nn.parallel.DistributedDataParallel(model)
    grads = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            x, y = batch(step)
            x = x[rank::world].contiguous(memory_format=layout)
            nn.functional.cross_entropy(trained(x), y[rank::world]).backward()
            sparsifier.finish_backward()
            grads.append([t.weight.grad.contiguous().clone() for t in sparsifier.tensors])
            optimizer.step()
            optimizer.zero_grad()
            sparsifier.step()
    return {"grads": grads, "warnings": [str(w.message) for w in caught]}


if __name__ == "__main__":
    rank, world, out = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), sys.argv[1]
    dist.init_process_group("gloo")
    torch.save(run(rank, world, steps=3), f"{out}/rank{rank}.pt")
    torch.save(run_with_skipped_layer(rank, world, steps=3), f"{out}/skip_rank{rank}.pt")
    torch.save(run_consistency_check(rank, world, steps=2), f"{out}/check_rank{rank}.pt")
    for channels_last in (False, True):
        torch.save(run_channels_last(rank, world, channels_last), f"{out}/layout{int(channels_last)}_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo on CPU can abort at interpreter exit after a clean shutdown (docs/design.md §6)
