"""Sparse weights and a small model for the tests of sparse inference."""

import torch
from torch import nn


def block_sparse(rows: int, cols: int, block: int, density: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    kept = torch.rand(rows // block, cols // block, generator=gen) < density
    mask = kept.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return torch.where(mask, torch.randn(rows, cols, generator=gen), 0.0)  # +0.0: a product could give −0.0


def unstructured(shape: tuple[int, ...], density: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(shape, generator=gen) < density, torch.randn(shape, generator=gen), 0.0)


class Mlp(nn.Module):
    """A transformer MLP block: fc1 → GELU → fc2 with a residual, the chain whose activations pass transposed."""

    def __init__(self):
        super().__init__()
        self.norm, self.fc1, self.fc2, self.head = (
            nn.LayerNorm(64),
            nn.Linear(64, 256),
            nn.Linear(256, 64),
            nn.Linear(64, 10),
        )

    def forward(self, x):
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))
        return self.head(x.mean(1))


def sparse_mlp(*, fc2: bool = True) -> Mlp:
    """An :class:`Mlp` in eval mode with ``fc1`` (and ``fc2``) 10% dense in 16×16 blocks; seeded."""
    torch.manual_seed(0)
    model = Mlp().eval()
    with torch.no_grad():
        model.fc1.weight.copy_(block_sparse(256, 64, 16, 0.1))
        if fc2:
            model.fc2.weight.copy_(block_sparse(64, 256, 16, 0.1))
    return model
