"""Density and β schedules over training, and the freeze point (DESIGN.md §1.5).

``step`` always counts optimizer steps already taken (0 before the first). Densities are kept fractions
(1 − sparsity); β is in 1/unit-value units, as in :func:`spartan.soft_topk`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spartan.config import SparsityConfig

DENSITY_SCHEDULES = ("linear", "cosine", "cubic")
BETA_SCHEDULES = ("linear", "geometric")


class Schedule:
    """Where training is at a given step: target density, soft-mask sharpness β, and whether masks froze.

    Reads the schedule fields of a :class:`spartan.SparsityConfig` (validated there):

    - density goes from ``density_init`` to ``1 − target`` over the first ``warmup_frac`` of the steps,
      ``linear``, ``cosine`` or ``cubic`` (Zhu & Gupta's ``(1 − p)^3``), then stays there;
    - β goes from ``beta_init`` to ``beta_final · sqrt(block numel)`` until the freeze step, ``linear`` or
      ``geometric``; the √(block numel) factor compensates for block sums having a smaller relative spread;
    - at ``freeze_step = round((1 − finetune_frac) · total_steps)`` the masks freeze for fine-tuning.
    """

    def __init__(self, config: "SparsityConfig", total_steps: int):
        if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps <= 0:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
        self.config, self.total_steps = config, total_steps
        self.density_final = 1.0 - config.target
        self.warmup_steps = config.warmup_frac * total_steps
        # The first step with frozen masks (== total_steps when there is no fine-tuning); never before the
        # warm-up has reached the target, which rounding could otherwise cause for short runs.
        self.freeze_step = max(round((1.0 - config.finetune_frac) * total_steps), math.ceil(self.warmup_steps))

    def frozen(self, step: int) -> bool:
        return step >= self.freeze_step

    def density(self, step: int) -> float:
        """Target density after ``step`` optimizer steps."""
        if step >= self.warmup_steps:
            return self.density_final
        progress = max(step, 0) / self.warmup_steps
        kind = self.config.density_schedule
        if kind == "linear":
            remaining = 1.0 - progress
        elif kind == "cosine":
            remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            remaining = (1.0 - progress) ** 3
        return self.density_final + (self.config.density_init - self.density_final) * remaining

    def beta(self, step: int, block_numel: int = 1) -> float:
        """Soft-mask sharpness after ``step`` steps for entries of ``block_numel`` weights."""
        initial, final = self.config.beta_init, self.config.beta_final * math.sqrt(block_numel)
        progress = 1.0 if self.freeze_step == 0 else min(max(step, 0) / self.freeze_step, 1.0)
        if self.config.beta_schedule == "linear":
            return initial + (final - initial) * progress
        return initial * (final / initial) ** progress
