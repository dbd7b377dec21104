"""Density and β schedules over training, and the freeze point (DESIGN.md §1.5).

``step`` always counts optimizer steps already taken (0 before the first). Densities are kept fractions
(1 − sparsity); β is in 1/unit-value units, as in :func:`spartan.soft_topk`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DENSITY_SCHEDULES = ("linear", "cosine", "cubic")
BETA_SCHEDULES = ("linear", "geometric")


@dataclass(frozen=True)
class Schedule:
    """Where training is at a given step: target density, soft-mask sharpness β, and whether masks froze.

    - density goes from ``density_init`` to ``density_final`` over the first ``warmup_frac`` of the steps,
      ``linear``, ``cosine`` or ``cubic`` (Zhu & Gupta's ``(1 − p)^3``), then stays at ``density_final``;
    - β goes from ``beta_init`` to ``beta_final · sqrt(block numel)`` until the freeze step, ``linear`` or
      ``geometric``; the √(block numel) factor compensates for block sums having a smaller relative spread;
    - at ``freeze_step = round((1 − finetune_frac) · total_steps)`` the masks freeze for fine-tuning.
    """

    total_steps: int
    density_final: float
    density_init: float = 1.0
    warmup_frac: float = 0.2
    finetune_frac: float = 0.2
    density_schedule: str = "linear"
    beta_init: float = 1.0
    beta_final: float = 10.0
    beta_schedule: str = "linear"

    def __post_init__(self) -> None:
        if not isinstance(self.total_steps, int) or self.total_steps <= 0:
            raise ValueError(f"total_steps must be a positive integer, got {self.total_steps!r}")
        if not 0.0 < self.density_final <= 1.0:
            raise ValueError(f"density_final must be in (0, 1] (sparsity in [0, 1)), got {self.density_final}")
        if not self.density_final <= self.density_init <= 1.0:
            raise ValueError(f"density_init must be in [density_final={self.density_final}, 1], "
                             f"got {self.density_init}")
        for name in ("warmup_frac", "finetune_frac"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.warmup_frac + self.finetune_frac > 1.0:
            raise ValueError(f"warmup_frac + finetune_frac must be <= 1, got {self.warmup_frac} + "
                             f"{self.finetune_frac}")
        if self.density_schedule not in DENSITY_SCHEDULES:
            raise ValueError(f"density_schedule must be one of {DENSITY_SCHEDULES}, got {self.density_schedule!r}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        for name in ("beta_init", "beta_final"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")

    @property
    def warmup_steps(self) -> float:
        return self.warmup_frac * self.total_steps

    @property
    def freeze_step(self) -> int:
        """The first step at which masks are frozen (== total_steps when there is no fine-tuning)."""
        return round((1.0 - self.finetune_frac) * self.total_steps)

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
        final = self.beta_final * math.sqrt(block_numel)
        progress = 1.0 if self.freeze_step == 0 else min(max(step, 0) / self.freeze_step, 1.0)
        if self.beta_schedule == "linear":
            return self.beta_init + (final - self.beta_init) * progress
        return self.beta_init * (final / self.beta_init) ** progress
