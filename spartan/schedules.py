"""Density and β schedules over training, and the freeze point (docs/design.md §1.5).

``step`` always counts optimizer steps already taken (0 before the first). Densities are kept fractions
(1 − sparsity); β is in 1/unit-value units, as in :func:`spartan.soft_topk`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DENSITY_SCHEDULES = ("linear", "cosine", "cubic")
BETA_SCHEDULES = ("linear", "geometric")
BETA_SCALES = ("raw", "kept_mean")  # β in 1/unit-value units, or relative to a group's mean kept unit value


@dataclass(frozen=True)
class Schedule:
    """Where training is at a given step: target density, soft-mask sharpness β, and whether masks froze.

    - density goes from ``density_init`` to ``density_final`` over the first ``warmup_frac`` of the
      ``total_steps``, ``linear``, ``cosine`` or ``cubic`` (Zhu & Gupta's ``(1 − p)^3``), then stays there;
    - β goes from ``beta_init`` to ``beta_final · sqrt(block numel)`` until the freeze step, ``linear`` or
      ``geometric``; the √(block numel) factor compensates for block sums having a smaller relative spread;
    - at ``freeze_step = round((1 − finetune_frac) · total_steps)`` the masks freeze for fine-tuning.

    The values (and their defaults) are :class:`spartan.SparsityConfig`'s, whose
    :meth:`~spartan.SparsityConfig.schedule` builds one; ``total_steps`` is checked here.
    """

    total_steps: int
    density_final: float
    density_init: float
    warmup_frac: float
    finetune_frac: float
    density_schedule: str
    beta_init: float
    beta_final: float
    beta_schedule: str
    warmup_steps: float = field(init=False)
    freeze_step: int = field(init=False)

    def __post_init__(self) -> None:
        steps = self.total_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
            raise ValueError(f"total_steps must be a positive integer, got {steps!r}")
        warmup_steps = self.warmup_frac * steps
        object.__setattr__(self, "warmup_steps", warmup_steps)
        # The first step with frozen masks (== total_steps when there is no fine-tuning); never before the
        # warm-up has reached the target, which rounding could otherwise cause for short runs.
        freeze = max(round((1.0 - self.finetune_frac) * steps), math.ceil(warmup_steps))
        object.__setattr__(self, "freeze_step", freeze)

    def frozen(self, step: int) -> bool:
        return step >= self.freeze_step

    def density(self, step: int) -> float:
        """Target density after ``step`` optimizer steps."""
        if step >= self.warmup_steps:
            return self.density_final
        progress = max(step, 0) / self.warmup_steps
        if self.density_schedule == "linear":
            remaining = 1.0 - progress
        elif self.density_schedule == "cosine":
            remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            remaining = (1.0 - progress) ** 3
        return self.density_final + (self.density_init - self.density_final) * remaining

    def beta(self, step: int, block_numel: int = 1) -> float:
        """Soft-mask sharpness after ``step`` steps for entries of ``block_numel`` weights."""
        initial, final = self.beta_init, self.beta_final * math.sqrt(block_numel)
        progress = 1.0 if self.freeze_step == 0 else min(max(step, 0) / self.freeze_step, 1.0)
        if self.beta_schedule == "linear":
            return initial + (final - initial) * progress
        return initial * (final / initial) ** progress
