"""Spartan: sparse training by soft top-k masking via regularized optimal transport."""

from spartan.config import SparsityConfig
from spartan.sparsifier import Sparsifier, measure_sparsity
from spartan.topk import (
    HardThreshold,
    SoftTopKSolution,
    hard_threshold,
    hard_topk,
    soft_topk,
    solve_soft_topk,
)

__all__ = [
    "HardThreshold",
    "Sparsifier",
    "SparsityConfig",
    "SoftTopKSolution",
    "hard_threshold",
    "hard_topk",
    "measure_sparsity",
    "soft_topk",
    "solve_soft_topk",
]
