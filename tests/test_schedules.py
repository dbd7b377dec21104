"""Density and β schedules: endpoints, shapes, freeze point and validation."""

import math

import pytest

from spartan.schedules import Schedule


def test_density_anneals_over_warmup_then_holds():
    schedule = Schedule(total_steps=1000, density_final=0.1, warmup_frac=0.2)
    assert schedule.density(0) == 1.0
    assert schedule.density(100) == pytest.approx(0.55)  # linear, halfway through 200 warm-up steps
    assert schedule.density(200) == 0.1 and schedule.density(999) == 0.1
    values = [schedule.density(step) for step in range(0, 201)]
    assert all(a > b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("kind,halfway", [("linear", 0.5), ("cosine", 0.5), ("cubic", 0.125)])
def test_density_shapes(kind, halfway):
    schedule = Schedule(total_steps=100, density_final=0.2, density_init=0.6, warmup_frac=0.5,
                        density_schedule=kind)
    assert schedule.density(0) == pytest.approx(0.6)
    assert schedule.density(25) == pytest.approx(0.2 + 0.4 * halfway)
    assert schedule.density(50) == 0.2


def test_cosine_starts_and_ends_flat():
    schedule = Schedule(total_steps=1000, density_final=0.1, warmup_frac=1.0, finetune_frac=0.0,
                        density_schedule="cosine")
    first_drop = schedule.density(0) - schedule.density(1)
    middle_drop = schedule.density(500) - schedule.density(501)
    assert first_drop < 1e-2 * middle_drop


def test_no_warmup_means_target_density_from_the_start():
    assert Schedule(total_steps=10, density_final=0.3, warmup_frac=0.0).density(0) == 0.3


def test_beta_reaches_final_times_sqrt_block_at_freeze():
    schedule = Schedule(total_steps=1000, density_final=0.1, finetune_frac=0.2, beta_init=1.0, beta_final=20.0)
    assert schedule.freeze_step == 800
    assert schedule.beta(0) == 1.0
    assert schedule.beta(400) == pytest.approx(10.5)
    assert schedule.beta(800) == 20.0 and schedule.beta(1000) == 20.0
    assert schedule.beta(800, block_numel=256) == pytest.approx(20.0 * 16)
    assert not schedule.frozen(799) and schedule.frozen(800)


def test_geometric_beta_is_log_linear():
    schedule = Schedule(total_steps=100, density_final=0.5, finetune_frac=0.0, beta_init=1.0,
                        beta_final=100.0, beta_schedule="geometric")
    assert schedule.beta(50) == pytest.approx(10.0)
    assert schedule.beta(100) == pytest.approx(100.0)


def test_no_finetune_never_freezes_before_the_end():
    schedule = Schedule(total_steps=50, density_final=0.5, finetune_frac=0.0)
    assert schedule.freeze_step == 50 and not schedule.frozen(49)


@pytest.mark.parametrize("kwargs,message", [
    ({"total_steps": 0}, "total_steps must be a positive integer"),
    ({"total_steps": 10.5}, "total_steps must be a positive integer"),
    ({"density_final": 0.0}, r"density_final must be in \(0, 1\]"),
    ({"density_final": 1.2}, r"density_final must be in \(0, 1\]"),
    ({"density_init": 0.05}, r"density_init must be in \[density_final=0.1, 1\]"),
    ({"warmup_frac": -0.1}, r"warmup_frac must be in \[0, 1\]"),
    ({"warmup_frac": 0.7, "finetune_frac": 0.5}, "warmup_frac \\+ finetune_frac must be <= 1"),
    ({"density_schedule": "exp"}, r"density_schedule must be one of \('linear', 'cosine', 'cubic'\)"),
    ({"beta_schedule": "cubic"}, r"beta_schedule must be one of \('linear', 'geometric'\)"),
    ({"beta_init": 0.0}, "beta_init must be a finite number > 0"),
    ({"beta_final": math.inf}, "beta_final must be a finite number > 0"),
])
def test_bad_schedule_names_the_field(kwargs, message):
    arguments = {"total_steps": 100, "density_final": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        Schedule(**arguments)
