"""``SparsityConfig``: everything that defines how a model is sparsified (the trainer's ``sparsity`` schema)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from spartan.allocation import ACCOUNTINGS, ALLOCATIONS
from spartan.costs import COST_MODELS
from spartan.methods import METHODS
from spartan.schedules import BETA_SCALES, BETA_SCHEDULES, DENSITY_SCHEDULES, Schedule


class ConfigFieldError(ValueError):
    """An invalid :class:`SparsityConfig` value: ``field`` names it, ``message`` says what is allowed and what was
    given (``str(error)`` is ``"<field> <message>"``); a caller such as the trainer may prefix its own key path."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field, self.message = field, message


@dataclass
class SparsityConfig:
    """What to mask, how much, by which method, and on what schedule.

    ``target`` is the final *sparsity* (fraction of zeros, in [0, 1)); with ``accounting="all"`` it counts every
    parameter of the model (biases, norms, embeddings and excluded layers stay dense, so masked layers are made
    sparser), with ``"masked"`` only the masked weights. With the ``flops`` cost model it is a fraction of
    FLOPs. ``beta_*`` are in 1/unit-value units (unit value = mean |w| over an entry's block) with
    ``beta_scale="raw"``; with ``"kept_mean"`` they are relative to each group's weight scale: the β the solver
    gets is ``beta / (mean unit value of the entries the group kept at the previous step)``, so the softness of the
    mask does not depend on the weights' magnitude.
    Invalid values raise :class:`ConfigFieldError`.
    """

    method: str = "spartan"
    target: float = 0.9
    block: tuple[int, int] = (1, 1)
    block_fallback: bool = False
    allocation: str = "global"
    accounting: str = "all"
    cost: str = "params"
    input_shape: tuple[int, ...] | None = None
    custom_costs: dict[str, float] | None = None
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    density_init: float = 1.0
    warmup_frac: float = 0.2
    finetune_frac: float = 0.2
    density_schedule: str = "linear"
    beta_init: float = 1.0
    beta_final: float = 10.0
    beta_schedule: str = "linear"
    beta_scale: str = "raw"
    tol: float = 1e-6

    def __post_init__(self) -> None:
        self.block = tuple(self.block)
        self.include = tuple(self.include)
        self.exclude = tuple(self.exclude)
        if self.input_shape is not None:
            self.input_shape = tuple(self.input_shape)
        choices = (
            ("method", tuple(METHODS)),
            ("allocation", ALLOCATIONS),
            ("accounting", ACCOUNTINGS),
            ("cost", COST_MODELS),
            ("density_schedule", DENSITY_SCHEDULES),
            ("beta_schedule", BETA_SCHEDULES),
            ("beta_scale", BETA_SCALES),
        )
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ConfigFieldError(name, f"must be one of {allowed}, got {getattr(self, name)!r}")
        if not (isinstance(self.target, (int, float)) and 0.0 <= self.target < 1.0):
            raise ConfigFieldError("target", f"must be a sparsity in [0, 1), got {self.target!r}")
        if not 1.0 - self.target <= self.density_init <= 1.0:
            raise ConfigFieldError(
                "density_init", f"must be in [1 - target = {1.0 - self.target:g}, 1], got {self.density_init}"
            )
        for name in ("warmup_frac", "finetune_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigFieldError(name, f"must be in [0, 1], got {getattr(self, name)}")
        if self.warmup_frac + self.finetune_frac > 1.0:
            raise ConfigFieldError(
                "warmup_frac", f"+ finetune_frac must be <= 1, got {self.warmup_frac} + {self.finetune_frac}"
            )
        for name in ("beta_init", "beta_final"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ConfigFieldError(name, f"must be a finite number > 0, got {getattr(self, name)}")
        if self.cost == "flops" and self.input_shape is None:
            raise ConfigFieldError(
                "input_shape", "(one sample's shape, e.g. [3, 224, 224]) is required with cost=flops"
            )
        if self.cost == "custom" and not self.custom_costs:
            raise ConfigFieldError("custom_costs", "(module-name glob -> cost per weight) is required with cost=custom")
        if not (0 < self.tol < 1 and math.isfinite(self.tol)):
            raise ConfigFieldError("tol", f"must be in (0, 1), got {self.tol}")

    def schedule(self, total_steps: int) -> Schedule:
        """The density/β schedule of this config over ``total_steps`` optimizer steps."""
        return Schedule(
            total_steps=total_steps,
            density_final=1.0 - self.target,
            density_init=self.density_init,
            warmup_frac=self.warmup_frac,
            finetune_frac=self.finetune_frac,
            density_schedule=self.density_schedule,
            beta_init=self.beta_init,
            beta_final=self.beta_final,
            beta_schedule=self.beta_schedule,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def upgrade(cls, saved: dict) -> dict:
        """A :meth:`to_dict` written by an earlier version, with the fields added since set to their defaults (a new
        field's default is the behaviour before it existed), so that a run started before an upgrade can resume."""
        return {**cls().to_dict(), **saved}


def first_difference(a: Any, b: Any, path: str = "") -> tuple[str, Any, Any]:
    """``(dotted path, a's value, b's value)`` of the first place two nested dicts/lists differ.

    Dict keys are visited in ``a``'s order (a schema's field order: the first field is the most telling), then
    ``b``'s extra keys; lists of equal length element by element; anything else is compared whole.
    """
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            if a.get(key) != b.get(key):
                return first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for k, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return first_difference(x, y, f"{path}[{k}]")
    return path, a, b
