"""Density and β schedules: endpoints, shapes, freeze point and validation."""

import math

import pytest

from spartan import SparsityConfig
from spartan.config import ConfigFieldError


def schedule(total_steps, target, **fields):
    return SparsityConfig(target=target, **fields).schedule(total_steps)


def test_density_anneals_over_warmup_then_holds():
    s = schedule(1000, 0.9, warmup_frac=0.2)
    assert s.density(0) == 1.0
    assert s.density(100) == pytest.approx(0.55)  # linear, halfway through 200 warm-up steps
    assert s.density(200) == pytest.approx(0.1) and s.density(999) == pytest.approx(0.1)
    values = [s.density(step) for step in range(0, 201)]
    assert all(a > b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("kind,halfway", [("linear", 0.5), ("cosine", 0.5), ("cubic", 0.125)])
def test_density_shapes(kind, halfway):
    s = schedule(100, 0.8, density_init=0.6, warmup_frac=0.5, finetune_frac=0.2, density_schedule=kind)
    assert s.density(0) == pytest.approx(0.6)
    assert s.density(25) == pytest.approx(0.2 + 0.4 * halfway)
    assert s.density(50) == pytest.approx(0.2)


def test_cosine_starts_and_ends_flat():
    s = schedule(1000, 0.9, warmup_frac=1.0, finetune_frac=0.0, density_schedule="cosine")
    first_drop = s.density(0) - s.density(1)
    middle_drop = s.density(500) - s.density(501)
    assert first_drop < 1e-2 * middle_drop


def test_no_warmup_means_target_density_from_the_start():
    assert schedule(10, 0.7, warmup_frac=0.0).density(0) == pytest.approx(0.3)


def test_beta_reaches_final_times_sqrt_block_at_freeze():
    s = schedule(1000, 0.9, finetune_frac=0.2, beta_init=1.0, beta_final=20.0)
    assert s.freeze_step == 800
    assert s.beta(0) == 1.0
    assert s.beta(400) == pytest.approx(10.5)
    assert s.beta(800) == 20.0 and s.beta(1000) == 20.0
    assert s.beta(800, block_numel=256) == pytest.approx(20.0 * 16)
    assert not s.frozen(799) and s.frozen(800)


def test_geometric_beta_is_log_linear():
    s = schedule(100, 0.5, finetune_frac=0.0, beta_init=1.0, beta_final=100.0, beta_schedule="geometric")
    assert s.beta(50) == pytest.approx(10.0)
    assert s.beta(100) == pytest.approx(100.0)


def test_no_finetune_never_freezes_before_the_end():
    s = schedule(50, 0.5, finetune_frac=0.0)
    assert s.freeze_step == 50 and not s.frozen(49)


@pytest.mark.parametrize("steps", [0, -3, 10.5, True])
def test_bad_total_steps(steps):
    with pytest.raises(ValueError, match="total_steps must be a positive integer"):
        SparsityConfig().schedule(steps)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"density_init": 0.05}, r"density_init must be in \[1 - target = 0.1, 1\], got 0.05"),
        ({"warmup_frac": -0.1}, r"warmup_frac must be in \[0, 1\], got -0.1"),
        ({"finetune_frac": 1.5}, r"finetune_frac must be in \[0, 1\], got 1.5"),
        ({"warmup_frac": 0.7, "finetune_frac": 0.5}, r"warmup_frac \+ finetune_frac must be <= 1"),
        ({"density_schedule": "exp"}, r"density_schedule must be one of \('linear', 'cosine', 'cubic'\)"),
        ({"beta_schedule": "cubic"}, r"beta_schedule must be one of \('linear', 'geometric'\)"),
        ({"beta_init": 0.0}, "beta_init must be a finite number > 0, got 0.0"),
        ({"beta_final": math.inf}, "beta_final must be a finite number > 0, got inf"),
    ],
)
def test_bad_schedule_fields_name_the_field(fields, message):
    with pytest.raises(ConfigFieldError, match=f"^{message}") as error:
        SparsityConfig(**fields)
    assert error.value.field == next(iter(fields))  # structured: the trainer adds its own key prefix
