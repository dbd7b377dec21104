"""Soft and hard top-k: exactness against float64 oracles, gradients, warm starts and bad input."""

import warnings

import pytest
import torch

import spartan
from spartan import kernels
from spartan.reference import sinkhorn_soft_topk, sorted_hard_topk
from spartan.topk import FIT_RTOL, _flagged_positions


def oracle_soft_topk(u: torch.Tensor, costs: torch.Tensor, budget: float, beta: float) -> torch.Tensor:
    """float64 bisection on λ until the bracket stops shrinking: the exact mask for unit values ``u``."""
    u, costs = u.double(), costs.double()
    lo, hi = float(u.min()) - 60 / beta, float(u.max()) + 60 / beta
    while True:
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:
            break
        if float((costs * torch.sigmoid(beta * (u - mid))).sum()) > budget:
            lo = mid
        else:
            hi = mid
    return torch.sigmoid(beta * (u - 0.5 * (lo + hi)))


def random_problem(n: int, weighted: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(n, generator=gen).exp() * 0.02  # log-normal, like weight magnitudes
    costs = (torch.rand(n, generator=gen) * 4 + 0.25) if weighted else None
    return values, costs


def unit_values(values, costs):
    return values if costs is None else values / costs  # the float32 division the solver does


def spread(u: torch.Tensor) -> float:
    width = float(u.max() - u.min())
    return width if width > 0 else abs(float(u[0])) or 1.0


SIZES = [1, 2, 17, 1000, 100_000]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("beta_rel", [1e-2, 1.0, 1e2, 1e5])
@pytest.mark.parametrize("density", [0.001, 0.1, 0.5, 0.999])
def test_soft_topk_matches_float64_oracle(n, weighted, beta_rel, density):
    values, costs = random_problem(n, weighted, seed=n + int(beta_rel * 7) + int(density * 1000))
    c = torch.ones(n) if costs is None else costs
    budget = density * float(c.double().sum())
    u = unit_values(values, costs)
    beta = beta_rel / spread(u)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no max-iteration warning, no compile fallback
        solution = spartan.solve_soft_topk(values, budget, beta, costs)
    mask = solution.mask
    assert mask.dtype == torch.float32 and mask.shape == values.shape
    achieved = float((mask.double() * c.double()).sum())
    assert abs(achieved - budget) <= 1e-6 * budget
    assert solution.budget_error == pytest.approx(abs(achieved - budget) / budget, rel=1e-3, abs=1e-12)
    expected = oracle_soft_topk(u, c, budget, beta)
    assert float((mask.double() - expected).abs().max()) <= 1e-5


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("beta_rel,density", [(1e-2, 0.001), (1.0, 0.1), (1e2, 0.5), (1e5, 0.999), (1e5, 0.05)])
def test_soft_topk_matches_oracle_at_one_million(weighted, beta_rel, density):
    n = 1_000_000
    values, costs = random_problem(n, weighted, seed=11)
    c = torch.ones(n) if costs is None else costs
    budget = density * float(c.double().sum())
    u = unit_values(values, costs)
    beta = beta_rel / spread(u)
    solution = spartan.solve_soft_topk(values, budget, beta, costs)
    assert solution.budget_error <= 1e-6
    achieved = float((solution.mask.double() * c.double()).sum())
    assert abs(achieved - budget) <= 1e-6 * budget
    assert float((solution.mask.double() - oracle_soft_topk(u, c, budget, beta)).abs().max()) <= 1e-5


def test_compiled_and_eager_kernels_agree():
    values, costs = random_problem(kernels.COMPILE_MIN_NUMEL * 2, weighted=True, seed=3)
    budget = 0.1 * float(costs.double().sum())
    beta = 50 / spread(values / costs)
    results = {}
    for compiled in (True, False):
        kernels.set_compile(compiled)
        try:
            with warnings.catch_warnings():
                # A failed compilation falls back to the eager kernels with this warning: here it must fail the
                # test, which would otherwise compare eager with eager.
                warnings.filterwarnings("error", message="spartan: torch.compile", category=RuntimeWarning)
                results[compiled] = (
                    spartan.solve_soft_topk(values, budget, beta, costs),
                    spartan.hard_threshold(values, budget, costs),
                )
        finally:
            kernels.set_compile(True)
    (soft_c, hard_c), (soft_e, hard_e) = results[True], results[False]
    assert float((soft_c.mask - soft_e.mask).abs().max()) <= 1e-5
    assert hard_c.threshold == hard_e.threshold
    assert torch.equal(hard_c.mask(values, costs), hard_e.mask(values, costs))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("beta,density", [(0.7, 0.3), (5.0, 0.05), (40.0, 0.8)])
def test_gradient_matches_finite_differences(weighted, beta, density):
    gen = torch.Generator().manual_seed(5)
    values = torch.rand(12, generator=gen, dtype=torch.float64).requires_grad_()
    costs = torch.rand(12, generator=gen, dtype=torch.float64) + 0.5 if weighted else None
    total = 12.0 if costs is None else float(costs.sum())

    def mask_of(v):
        return spartan.soft_topk(v, density * total, beta, costs, tol=1e-13)

    assert torch.autograd.gradcheck(mask_of, (values,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradient_formula_on_a_tiny_case():
    # Two entries, unit costs, budget 1: m_2 = 1 − m_1, so m_1 = sigmoid(β(v_1 − v_2)/2).
    values = torch.tensor([0.3, 0.1], dtype=torch.float64, requires_grad=True)
    beta = 3.0
    mask = spartan.soft_topk(values, 1.0, beta, tol=1e-14)
    expected = torch.sigmoid(torch.tensor(beta * 0.2 / 2, dtype=torch.float64))
    assert float(mask[0].detach()) == pytest.approx(float(expected), abs=1e-12)
    mask[0].backward()
    slope = float(expected * (1 - expected)) * beta / 2
    assert values.grad.tolist() == pytest.approx([slope, -slope], abs=1e-10)


def test_gradient_of_low_precision_input_has_its_dtype():
    values = torch.rand(64, dtype=torch.bfloat16, requires_grad=True)
    mask = spartan.soft_topk(values, 10.0, 30.0)
    assert mask.dtype == torch.float32
    (mask * torch.arange(64.0)).sum().backward()
    assert values.grad.dtype == torch.bfloat16 and torch.isfinite(values.grad.float()).all()


def test_sinkhorn_reference_converges_to_the_same_mask():
    values, costs = random_problem(500, weighted=True, seed=8)
    values, costs = values.double(), costs.double()
    budget = 0.2 * float(costs.sum())
    beta = 20 / spread(values / costs)
    ours = spartan.solve_soft_topk(values, budget, beta, costs, tol=1e-12).mask
    sinkhorn, iterations = sinkhorn_soft_topk(values, budget, beta, costs, tol=1e-14, max_iter=100_000)
    assert iterations < 100_000
    assert float((ours - sinkhorn).abs().max()) <= 1e-8
    # With the paper's stopping rule (1% change of the objective) the budget is visibly off.
    loose, _ = sinkhorn_soft_topk(values, budget, beta, costs)
    assert abs(float((loose * costs).sum()) - budget) / budget > 1e-5


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("beta_rel", [1.0, 30.0, 1000.0])
@pytest.mark.parametrize("density", [0.05, 0.5])
@pytest.mark.parametrize("n", [1000, 400_000])
def test_warm_start_converges_in_two_passes(n, weighted, beta_rel, density):
    values, costs = random_problem(n, weighted, seed=21)
    c = torch.ones(n) if costs is None else costs
    budget = density * float(c.double().sum())
    beta = beta_rel / spread(unit_values(values, costs))
    first = spartan.solve_soft_topk(values, budget, beta, costs)
    gen = torch.Generator().manual_seed(1)
    perturbed = values * (1 + 1e-3 * torch.randn(n, generator=gen))  # about one SGD step
    second = spartan.solve_soft_topk(perturbed, budget, beta, costs, lam_init=first.lam)
    assert second.iterations <= 2
    assert second.budget_error <= 1e-6
    cold = spartan.solve_soft_topk(perturbed, budget, beta, costs)
    assert float((second.mask - cold.mask).abs().max()) <= 2e-6


def test_soft_topk_keeps_shape_and_float64():
    values = torch.rand(3, 4, 5, dtype=torch.float64)
    mask = spartan.soft_topk(values, 6.0, 10.0)
    assert mask.shape == (3, 4, 5) and mask.dtype == torch.float64
    assert float(mask.sum()) == pytest.approx(6.0, rel=1e-6)


def test_large_beta_tends_to_the_hard_top_k():
    values, _ = random_problem(300, weighted=False, seed=4)
    hard = spartan.hard_topk(values, 30)
    soft = spartan.soft_topk(values, 30, 1e7 / spread(values))
    assert torch.equal(soft > 0.5, hard)


def test_out_buffer_is_filled_in_place():
    values, _ = random_problem(1000, weighted=False, seed=2)
    out = torch.full((1000,), -1.0)
    solution = spartan.solve_soft_topk(values, 100, 10 / spread(values), out=out)
    assert solution.mask.data_ptr() == out.data_ptr()
    assert float(out.sum()) == pytest.approx(100, rel=1e-6)


# ------------------------------------------------------------------------------------------ hard top-k


@pytest.mark.parametrize("n", [1, 5, 1000, 300_000])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("density", [0.0, 0.001, 0.1, 0.5, 0.999, 1.0])
def test_hard_topk_matches_sorted_oracle(n, weighted, ties, density):
    values, costs = random_problem(n, weighted, seed=n + 3)
    if ties:
        values = torch.randint(0, 7, (n,), generator=torch.Generator().manual_seed(n)).float()
    c = torch.ones(n) if costs is None else costs
    total = float(c.double().sum())
    budget = density * total + (0.5 if not weighted and 0 < density < 1 else 0.0)  # fractional budgets too
    budget = min(budget, total)
    result = spartan.hard_threshold(values, budget, costs)
    mask = result.mask(values, costs)
    expected, threshold = sorted_hard_topk(values, budget, costs)
    assert torch.equal(mask, expected)
    assert result.threshold == threshold
    kept_cost = float(c.double()[mask].sum())
    assert result.kept_cost == pytest.approx(kept_cost, rel=1e-9, abs=1e-9)
    assert kept_cost <= budget * (1 + FIT_RTOL)


def test_hard_topk_breaks_ties_by_lower_index():
    values = torch.tensor([0.5, 1.0, 0.5, 0.5, 2.0, 0.5])
    assert spartan.hard_topk(values, 4).tolist() == [True, True, True, False, True, False]
    costs = torch.tensor([1.0, 1.0, 2.0, 1.0, 1.0, 1.0])  # unit values 0.5, 1, 0.25, 0.5, 2, 0.5
    assert spartan.hard_topk(values, 3.5, costs).tolist() == [True, True, False, False, True, False]
    # Cost 4 fits three entries (2, 1, 0.5 by unit value); the next tie (index 3) would make 4 and still fits.
    assert spartan.hard_topk(values, 4, costs).tolist() == [True, True, False, True, True, False]


def test_hard_topk_is_the_fractional_knapsack_prefix():
    # Unit values 3, 2, 1 with costs 1, 5, 1: a budget of 4 keeps the first and stops at the second.
    values = torch.tensor([3.0, 10.0, 1.0])
    costs = torch.tensor([1.0, 5.0, 1.0])
    result = spartan.hard_threshold(values, 4.0, costs)
    assert result.mask(values, costs).tolist() == [True, False, False]
    assert result.threshold == 2.0 and result.kept_cost == 1.0


@pytest.mark.parametrize(
    "n, n_set", [(1 << 20, 3000), (1 << 20, 0), ((1 << 20) + 5, 9000), (1 << 20, 200_000), (999, 50)]
)
def test_flagged_positions_are_those_nonzero_lists(n, n_set):
    # sparse and dense flags, a tail that is not a whole word, a set last byte, a buffer too small for words
    gen = torch.Generator().manual_seed(n_set)
    flags = torch.zeros(n, dtype=torch.uint8)
    flags[torch.randint(0, n, (n_set,), generator=gen)] = torch.randint(
        1, 256, (n_set,), generator=gen, dtype=torch.uint8
    )
    flags[-1] = 1
    assert torch.equal(_flagged_positions(flags), flags.nonzero().squeeze(1))


def test_hard_budget_absorbs_float_rounding():
    values = torch.arange(100.0)
    assert int(spartan.hard_topk(values, 0.29 * 100).sum()) == 29  # 0.29 * 100 == 28.999999999999996


@pytest.mark.parametrize("weighted", [False, True])
def test_hard_threshold_warm_start_agrees_with_cold(weighted):
    values, costs = random_problem(400_000, weighted, seed=6)
    c = torch.ones(len(values)) if costs is None else costs
    budget = 0.1 * float(c.double().sum())
    previous = spartan.hard_threshold(values, budget, costs)
    gen = torch.Generator().manual_seed(0)
    for scale in (1e-4, 1e-2, 0.3):  # small and large moves of the boundary
        moved = values * (1 + scale * torch.randn(len(values), generator=gen))
        warm = spartan.hard_threshold(moved, budget, costs, init=previous)
        cold = spartan.hard_threshold(moved, budget, costs)
        assert warm.threshold == cold.threshold
        assert torch.equal(warm.mask(moved, costs), cold.mask(moved, costs))
        previous = warm


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("solver", ["soft", "hard"])
@pytest.mark.parametrize(
    "values,budget,costs,message",
    [
        (torch.tensor([1.0, float("nan"), 2.0]), 1.0, None, "values must be finite"),
        (torch.tensor([1.0, float("inf"), 2.0]), 1.0, None, "values must be finite"),
        (torch.ones(3), 1.0, torch.tensor([1.0, 0.0, 1.0]), "costs must be finite and > 0"),
        (torch.ones(3), 1.0, torch.tensor([1.0, -2.0, 1.0]), "costs must be finite and > 0"),
        (torch.ones(3), 1.0, torch.tensor([1.0, float("inf"), 1.0]), "costs must be finite and > 0"),
        (torch.ones(3), 1.0, torch.ones(4), "costs must be a tensor shaped like values"),
        (torch.ones(3), -0.5, None, r"budget must be in \[0, Σ costs = 3.0\]"),
        (torch.ones(3), 3.5, None, r"budget must be in \[0, Σ costs = 3.0\]"),
        (torch.ones(3), float("nan"), None, "budget must be in"),
        (torch.ones(0), 0.0, None, "values must not be empty"),
        (torch.ones(3, dtype=torch.long), 1.0, None, "values must be a floating-point tensor"),
    ],
)
def test_bad_input_names_the_argument(solver, values, budget, costs, message):
    with pytest.raises(ValueError, match=message):
        if solver == "soft":
            spartan.soft_topk(values, budget, 1.0, costs)
        else:
            spartan.hard_threshold(values, budget, costs)


def test_nonfinite_values_are_rejected_on_the_compiled_path():
    values = torch.rand(kernels.COMPILE_MIN_NUMEL)
    values[12345] = float("inf")
    with pytest.raises(ValueError, match="values must be finite"):
        spartan.solve_soft_topk(values, 100.0, 1.0)
    with pytest.raises(ValueError, match="values must be finite"):
        spartan.hard_threshold(values, 100.0)


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf"), "x"])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        spartan.soft_topk(torch.ones(3), 1.0, beta)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"tol": 0.0}, "tol must be in"),
        ({"tol": 1.5}, "tol must be in"),
        ({"max_iter": 0}, "max_iter must be >= 1"),
        ({"lam_init": float("nan")}, "lam_init must be finite"),
    ],
)
def test_bad_solver_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        spartan.solve_soft_topk(torch.rand(5), 1.0, 1.0, **kwargs)


def test_trivial_budgets_need_no_solve():
    values = torch.rand(10)
    zero = spartan.solve_soft_topk(values, 0.0, 5.0)
    assert zero.iterations == 0 and torch.equal(zero.mask, torch.zeros(10))
    full = spartan.solve_soft_topk(values, 10.0, 5.0)
    assert full.iterations == 0 and torch.equal(full.mask, torch.ones(10))
    costs = torch.rand(10) + 1
    assert torch.equal(spartan.soft_topk(values, float(costs.double().sum()), 5.0, costs), torch.ones(10))
    assert not spartan.hard_topk(values, 0.0).any() and spartan.hard_topk(values, 10.0).all()


def test_iteration_cap_warns_with_the_error_reached():
    values, _ = random_problem(1000, weighted=False, seed=9)
    with pytest.warns(RuntimeWarning, match=r"stopped after 1 passes with relative budget error"):
        solution = spartan.solve_soft_topk(values, 100, 1e4 / spread(values), max_iter=1)
    assert solution.iterations == 1 and solution.budget_error > 1e-6


@pytest.mark.slow
def test_hundred_million_entries_within_three_temporary_copies(tmp_path):
    """Peak memory of the solvers over 1e8 float32 values (400 MB) stays under ~3 extra copies."""
    import subprocess
    import sys

    script = tmp_path / "peak.py"
    script.write_text(
        "import resource, torch, spartan\n"
        "torch.manual_seed(0)\n"
        "values = torch.rand(100_000_000)\n"
        "spartan.solve_soft_topk(values[:1000], 10, 1.0); spartan.hard_threshold(values[:1000], 10)\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "s = spartan.solve_soft_topk(values, 1e7, 100.0)\n"
        "h = spartan.hard_threshold(values, 1e7)\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print((peak - base) * 1024 / (4 * values.numel()), s.budget_error)\n"
    )
    output = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
    copies, error = map(float, output.split())
    assert copies <= 3.0 and error <= 1e-6
