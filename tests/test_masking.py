"""Masked forward weights: the split local + global gradient equals autograd through the explicit formula."""

import pytest
import torch
from torch import nn

import spartan
from spartan.layers import find_masked_tensors
from spartan.masking import GradientCorrection, masked_weight, spartan_weight, straight_through_weight


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 6)


def setup(block=(1, 1), seed=0):
    torch.manual_seed(seed)
    model = Tiny().double()
    tensors = find_masked_tensors(model, block=block)
    factors = [3.0, 1.0]  # the conv's weights cost three times the linear's (as with a flops cost model)
    costs = [torch.full(t.entry_shape, f * t.block_numel, dtype=torch.float64) for t, f in zip(tensors, factors)]
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    target = torch.randn(5, 6, dtype=torch.float64)
    return model, tensors, costs, x, target


def loss_of(weights, model, x, target):
    conv_w, fc_w = weights
    hidden = torch.tanh(nn.functional.conv2d(x, conv_w, model.conv.bias, padding=1))
    return ((nn.functional.linear(hidden.flatten(1), fc_w, model.fc.bias) - target) ** 2).mean()


def global_masks(tensors, costs, density, beta):
    values = torch.cat([t.entry_values(t.weight.detach()).reshape(-1) for t in tensors])
    cost = torch.cat([c.reshape(-1) for c in costs])
    budget = density * float(cost.sum())
    soft = spartan.solve_soft_topk(values, budget, beta, cost, tol=1e-14).mask
    hard = spartan.hard_topk(values, budget, cost).to(values.dtype)
    return values, cost, budget, soft, hard


def split(flat, tensors):
    sizes = [t.n_entries for t in tensors]
    return [part.reshape(t.entry_shape) for part, t in zip(flat.split(sizes), tensors)]


@pytest.mark.parametrize("block", [(1, 1), (2, 2)])
def test_spartan_gradient_equals_autograd_through_the_explicit_formula(block):
    model, tensors, costs, x, target = setup(block)
    density, beta = 0.3, 40.0 / (block[0] * block[1])
    values, cost, budget, soft, hard = global_masks(tensors, costs, density, beta)

    # Reference: w_eff = ST(m(|w|) ⊙ w, H) with m differentiable through soft_topk, all in float64.
    weights = [t.weight.detach().clone().requires_grad_() for t in tensors]
    block_values = torch.cat([t.entry_values(w).reshape(-1) for t, w in zip(tensors, weights)])
    m = spartan.soft_topk(block_values, budget, beta, cost, tol=1e-14)
    effective = []
    for t, w, m_t, h_t in zip(tensors, weights, split(m, tensors), split(hard, tensors)):
        soft_weight = t.expand(m_t) * w
        effective.append(soft_weight + (t.expand(h_t) * soft_weight - soft_weight).detach())
    loss_of(effective, model, x, target).backward()

    # Ours: detached masks, one op per layer, then the group's correction.
    correction = GradientCorrection.on(soft.device)
    correction.set(beta, float((cost * soft * (1 - soft)).sum()))
    members, effective = [], []
    for t, m_t, h_t, c_t in zip(tensors, split(soft, tensors), split(hard, tensors), costs):
        members.append((t, m_t))
        effective.append(spartan_weight(t.weight, t, h_t * m_t, m_t, float(c_t.flatten()[0]), correction))
    loss_of(effective, model, x, target).backward()
    assert correction.pending
    local_only = [t.weight.grad.clone() for t in tensors]
    correction.apply(members, correction.accumulated())
    assert not correction.pending and float(correction.accumulated()) == 0.0

    for t, w in zip(tensors, weights):
        assert torch.allclose(t.weight.grad, w.grad, rtol=1e-9, atol=1e-12), t.name
    # The global term matters: the local part alone is measurably off.
    assert max(float((g - w.grad).abs().max()) for g, w in zip(local_only, weights)) > 1e-6


def test_correction_accumulates_over_micro_batches():
    model, tensors, costs, x, target = setup()
    _, cost, _, soft, hard = global_masks(tensors, costs, 0.4, 20.0)
    slope_total = float((cost * soft * (1 - soft)).sum())

    def run(batches):
        for t in tensors:
            t.weight.grad = None
        correction = GradientCorrection.on(soft.device)
        correction.set(20.0, slope_total)
        layers = list(zip(tensors, split(soft, tensors), split(hard, tensors), costs))
        for xb, yb in batches:
            effective = [
                spartan_weight(t.weight, t, h_t * m_t, m_t, float(c_t.flatten()[0]), correction)
                for t, m_t, h_t, c_t in layers
            ]
            (loss_of(effective, model, xb, yb) * len(xb) / len(x)).backward()
        correction.apply([(t, m_t) for t, m_t, _, _ in layers], correction.accumulated())
        return [t.weight.grad.clone() for t in tensors]

    whole = run([(x, target)])
    halves = run([(x[:2], target[:2]), (x[2:], target[2:])])
    for a, b in zip(whole, halves):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


def test_topkast_gradient_is_dense_and_magnitude_gradient_is_masked():
    model, tensors, costs, x, target = setup()
    _, _, _, _, hard = global_masks(tensors, costs, 0.2, 10.0)
    keeps = split(hard, tensors)
    forward_weights = [(t.expand(h) * t.weight).detach().requires_grad_() for t, h in zip(tensors, keeps)]
    dense_grads = torch.autograd.grad(loss_of(forward_weights, model, x, target), forward_weights)  # ∂L/∂w_eff
    for make, expected in [
        (straight_through_weight, dense_grads),
        (masked_weight, [g * t.expand(h) for g, t, h in zip(dense_grads, tensors, keeps)]),
    ]:
        grads = torch.autograd.grad(
            loss_of([make(t.weight, t, h) for t, h in zip(tensors, keeps)], model, x, target),
            [t.weight for t in tensors],
        )
        for got, want in zip(grads, expected):
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-15)
    pruned = [(t.expand(h) == 0) for t, h in zip(tensors, keeps)]
    assert all(bool((g[p] != 0).any()) for g, p in zip(dense_grads, pruned))  # dual averaging revives them


@pytest.mark.parametrize(
    "layout, block",
    [(torch.contiguous_format, (1, 1)), (torch.channels_last, (1, 1)), (torch.contiguous_format, (16, 16))],
)
def test_the_fused_gradient_passes_equal_the_per_op_formula(layout, block, monkeypatch):
    from spartan import Sparsifier, SparsityConfig, kernels, masking

    torch.manual_seed(0)
    # Both masked weights reach kernels.COMPILE_MIN_NUMEL (147,456 and 262,144), so their passes are compiled.
    model = nn.Sequential(nn.Conv2d(64, 256, 3, padding=1), nn.Flatten(), nn.Linear(256 * 2 * 2, 256))
    model = model.double().to(memory_format=layout)  # float64: the global term is far below float32 rounding
    config = SparsityConfig(method="spartan", target=0.9, warmup_frac=0.0, block=block, allocation="uniform")
    sparsifier = Sparsifier(model, config, total_steps=10)
    x = torch.randn(8, 64, 2, 2, dtype=torch.float64).contiguous(memory_format=layout)

    def gradients() -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each masked weight's local gradient and the global term finish_backward() adds to it."""
        model(x).square().mean().backward()
        local = [t.weight.grad.clone(memory_format=torch.preserve_format) for t in sparsifier.tensors]
        sparsifier.finish_backward()
        grads = [(g, t.weight.grad - g) for t, g in zip(sparsifier.tensors, local)]
        model.zero_grad(set_to_none=True)
        return grads

    fused = gradients()
    assert {masking._local_gradient_pass, masking._correction_pass} <= kernels._compiled.keys()
    monkeypatch.setattr(masking, "_block_views", lambda *tensors: None)  # the same formula op by op
    per_op = gradients()
    for tensor, (local, term), (fused_local, fused_term) in zip(sparsifier.tensors, per_op, fused):
        assert fused_local.stride() == tensor.weight.stride(), tensor.name  # DDP's buckets expect the layout
        torch.testing.assert_close(fused_local, local, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(fused_term, term, rtol=1e-4, atol=1e-4 * float(term.abs().max()))
        assert float(local.abs().max()) > 0 and float(term.abs().max()) > 0
