"""The Sparsifier end to end: exact sparsity, plain finalized models, gradients, freezing, resume, bad input."""

import copy
import io

import pytest
import timm
import torch
import torchvision
from torch import nn

import spartan
from spartan import Sparsifier, SparsityConfig
from spartan.config import ConfigFieldError
from spartan.reference import sorted_hard_topk


class SmallCNN(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = torch.relu(self.norm(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


def train(
    model, sparsifier, optimizer, steps, seed=0, input_shape=(3, 8, 8), classes=10, batch=4, skip=0, statistics=True
):
    """``steps`` training steps on random batches; ``skip`` batches of the stream are passed over first."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(skip):
        torch.randn(batch, *input_shape, generator=gen), torch.randint(0, classes, (batch,), generator=gen)
    telemetry = []
    for _ in range(steps):
        x = torch.randn(batch, *input_shape, generator=gen)
        y = torch.randint(0, classes, (batch,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        sparsifier.finish_backward()
        optimizer.step()
        optimizer.zero_grad()
        telemetry.append(sparsifier.step(statistics=statistics))
    return telemetry


def masked_zeros(sparsifier):
    return sum(int((t.weight == 0).sum()) for t in sparsifier.tensors)


ARCHS = {
    "tv_resnet50": (lambda: torchvision.models.resnet50(num_classes=10), (3, 32, 32)),
    "tv_vit_b_16": (lambda: torchvision.models.vit_b_16(image_size=32, num_classes=10), (3, 32, 32)),
    "timm_vit_base_patch16_224": (
        lambda: timm.create_model("vit_base_patch16_224", img_size=32, num_classes=10),
        (3, 32, 32),
    ),
    "timm_convnext_tiny": (lambda: timm.create_model("convnext_tiny", num_classes=10), (3, 32, 32)),
    "timm_mobilenetv3_small_100": (lambda: timm.create_model("mobilenetv3_small_100", num_classes=10), (3, 32, 32)),
}


def check_finalized(model, build, sparsifier, config):
    reference = build()
    assert type(model) is type(reference)
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    reference.load_state_dict(model.state_dict(), strict=True)
    block = config.block[0] * config.block[1]
    params = sum(p.numel() for p in model.parameters())
    masked = sum(t.weight.numel() for t in sparsifier.tensors)
    zeros = masked_zeros(sparsifier)  # everything else stays dense
    if config.accounting == "all":
        assert abs(zeros - config.target * params) <= block
    else:
        assert abs(zeros - config.target * masked) <= block
    totals = sparsifier.report()["totals"]
    assert totals["params_masked_kept"] == masked - zeros and totals["params_kept"] == params - zeros
    assert totals["sparsity_all"] == pytest.approx(zeros / params, abs=1e-12)


@pytest.mark.parametrize("accounting", ["all", "masked"])
@pytest.mark.parametrize("method", ["spartan", "topkast", "magnitude"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_architectures_finalize_to_plain_models_at_exact_sparsity(arch, method, accounting):
    build, input_shape = ARCHS[arch]
    torch.manual_seed(0)
    model = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    config = SparsityConfig(method=method, target=0.9, accounting=accounting, warmup_frac=0.25, finetune_frac=0.25)
    sparsifier = Sparsifier(model, config, total_steps=4, optimizer=optimizer)
    train(model, sparsifier, optimizer, 4, input_shape=input_shape, batch=2)
    check_finalized(sparsifier.finalize(), build, sparsifier, config)


class CrossAttention(nn.Module):
    """nn.MultiheadAttention with separate q/k/v projection weights (kdim, vdim != embed_dim)."""

    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, kdim=4, vdim=6, batch_first=True)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        query, key, value = x[..., :8], x[..., 8:12], x[..., 12:]
        return self.head(self.attention(query, key, value)[0].mean(1))


def test_separate_attention_projections_are_masked_and_finalized():
    torch.manual_seed(0)
    model = CrossAttention()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    config = SparsityConfig(method="spartan", target=0.7, accounting="masked", warmup_frac=0.25, finetune_frac=0.25)
    sparsifier = Sparsifier(model, config, total_steps=4, optimizer=optimizer)
    assert [t.attr for t in sparsifier.tensors] == [
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
        "weight",
        "weight",
    ]
    train(model, sparsifier, optimizer, 4, input_shape=(5, 18))
    check_finalized(sparsifier.finalize(), CrossAttention, sparsifier, config)


@pytest.mark.parametrize("method", ["spartan", "topkast", "magnitude", "dense"])
@pytest.mark.parametrize("accounting", ["all", "masked"])
@pytest.mark.parametrize(
    "allocation,block", [("global", (1, 1)), ("uniform", (1, 1)), ("erk", (1, 1)), ("global", (4, 4))]
)
def test_methods_allocations_and_blocks_hit_the_target(method, accounting, allocation, block):
    build = lambda: torchvision.models.resnet18(num_classes=10)  # noqa: E731
    torch.manual_seed(0)
    model = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    config = SparsityConfig(
        method=method,
        target=0.0 if method == "dense" else 0.8,
        accounting=accounting,
        allocation=allocation,
        block=block,
        block_fallback=True,
        warmup_frac=0.5,
        finetune_frac=0.25,
    )
    sparsifier = Sparsifier(model, config, total_steps=4, optimizer=optimizer)
    train(model, sparsifier, optimizer, 4, input_shape=(3, 16, 16))
    model = sparsifier.finalize()
    if allocation == "global" or method == "dense":
        check_finalized(model, build, sparsifier, config)
    else:  # per-layer budgets: each layer within one block of its own target
        for row in sparsifier.report()["layers"]:
            assert abs(row["params_kept"] - row["density_target"] * row["params"]) <= 16 + 1e-6 * row["params"]


def test_flops_weighted_global_allocation_keeps_fewer_costly_weights():
    class TwoConvs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(8, 8, 3, padding=1)  # 8x8 outputs: 64 MACs per weight
            self.b = nn.Conv2d(8, 8, 3, padding=1, stride=(2, 1))  # 4x8 outputs: 32 MACs per weight

        def forward(self, x):
            return self.b(x).sum() + self.a(x).sum()

    torch.manual_seed(0)
    model = TwoConvs()
    config = SparsityConfig(
        method="topkast", target=0.7, cost="flops", input_shape=(8, 8, 8), accounting="masked", warmup_frac=0.0
    )
    sparsifier = Sparsifier(model, config, total_steps=10)
    assert sparsifier.factors == [64.0, 32.0]
    values = torch.cat([model.a.weight.detach().abs().reshape(-1), model.b.weight.detach().abs().reshape(-1)])
    costs = torch.cat([torch.full((576,), 64.0), torch.full((576,), 32.0)])
    expected, _ = sorted_hard_topk(values, 0.3 * float(costs.sum()), costs)  # by value per cost
    keeps = torch.cat([m.reshape(-1) for m in sparsifier.masks().values()]).bool()
    assert torch.equal(keeps, expected)
    kept_a, kept_b = int(keeps[:576].sum()), int(keeps[576:].sum())
    assert kept_a < kept_b
    assert 64 * kept_a + 32 * kept_b <= 0.3 * float(costs.sum())


def test_spartan_gradients_equal_autograd_through_the_explicit_formula():
    torch.manual_seed(1)
    model = SmallCNN().double()
    beta = 300.0
    config = SparsityConfig(
        method="spartan", target=0.6, accounting="masked", warmup_frac=0.0, beta_init=beta, beta_final=beta, tol=1e-13
    )
    sparsifier = Sparsifier(model, config, total_steps=10)
    x, y = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.tensor([1, 4, 7])
    nn.functional.cross_entropy(model(x), y).backward()
    sparsifier.finish_backward()
    ours = [t.weight.grad.clone() for t in sparsifier.tensors]

    reference = copy.deepcopy(sparsifier)  # plain copy of the weights via a finalized twin
    twin = reference.finalize()
    originals = [t.weight.detach().clone().requires_grad_() for t in sparsifier.tensors]
    values = torch.cat([w.abs().reshape(-1) for w in originals])
    budget = 0.4 * values.numel()
    soft = spartan.soft_topk(values, budget, beta, tol=1e-13)
    hard = spartan.hard_topk(values.detach(), budget).to(values.dtype)
    offsets = [0]
    for w in originals:
        offsets.append(offsets[-1] + w.numel())
    replacements = {}
    for t, w, a, b in zip(reference.tensors, originals, offsets, offsets[1:]):
        soft_weight = soft[a:b].view_as(w) * w
        replacements[f"{t.module_name}.{t.attr}"] = (
            soft_weight + (hard[a:b].view_as(w) * soft_weight - soft_weight).detach()
        )
    out = torch.func.functional_call(twin, replacements, (x,))
    nn.functional.cross_entropy(out, y).backward()
    for got, w in zip(ours, originals):
        assert torch.allclose(got, w.grad, rtol=1e-8, atol=1e-12)


def test_magnitude_pruned_weights_get_no_gradient_and_stay_zero_through_finetune():
    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    config = SparsityConfig(method="magnitude", target=0.8, warmup_frac=0.2, finetune_frac=0.5)
    sparsifier = Sparsifier(model, config, total_steps=10, optimizer=optimizer)
    train(model, sparsifier, optimizer, 2)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    nn.functional.cross_entropy(model(x), y).backward()
    for t, mask in zip(sparsifier.tensors, sparsifier.masks().values()):
        pruned = mask == 0
        assert pruned.any() and (t.weight.grad[pruned] == 0).all()
    optimizer.zero_grad()
    train(model, sparsifier, optimizer, 3)  # through the freeze at step 5
    assert sparsifier.frozen
    pruned = [mask == 0 for mask in sparsifier.masks().values()]
    train(model, sparsifier, optimizer, 5, seed=1)
    for t, p in zip(sparsifier.tensors, pruned):
        assert (t.weight[p] == 0).all()
        assert (optimizer.state[t.weight]["momentum_buffer"][p] == 0).all()


@pytest.mark.parametrize("method", ["spartan", "topkast"])
def test_dual_averaging_methods_keep_updating_pruned_weights_before_the_freeze(method):
    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sparsifier = Sparsifier(
        model, SparsityConfig(method=method, target=0.8, warmup_frac=0.0), total_steps=10, optimizer=optimizer
    )
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    nn.functional.cross_entropy(model(x), y).backward()
    sparsifier.finish_backward()
    for t, mask in zip(sparsifier.tensors, sparsifier.masks().values()):
        pruned = mask == 0
        assert (t.weight.grad[pruned] != 0).float().mean() > 0.5


def run_steps(steps, resume_at=None, method="spartan"):
    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    config = SparsityConfig(method=method, target=0.85, warmup_frac=0.3, finetune_frac=0.3)
    sparsifier = Sparsifier(model, config, total_steps=steps, optimizer=optimizer)
    if resume_at is None:
        telemetry = train(model, sparsifier, optimizer, steps)
        return model, telemetry
    head = train(model, sparsifier, optimizer, resume_at)
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "sparsifier": sparsifier.state_dict()},
        buffer,
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    torch.manual_seed(123)  # a fresh process: different RNG, fresh objects
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sparsifier = Sparsifier(model, config, total_steps=steps, optimizer=optimizer)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    sparsifier.load_state_dict(checkpoint["sparsifier"])
    tail = train(model, sparsifier, optimizer, steps - resume_at, skip=resume_at)  # the data stream goes on
    return model, head + tail


@pytest.mark.parametrize("method", ["spartan", "magnitude"])
@pytest.mark.parametrize("resume_at", [2, 5, 8])  # during warm-up, after it, after the freeze
def test_resume_equals_uninterrupted_bitwise(method, resume_at):
    whole, whole_telemetry = run_steps(10, method=method)
    resumed, resumed_telemetry = run_steps(10, resume_at=resume_at, method=method)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert whole_telemetry == resumed_telemetry


def test_deepcopy_and_state_dict_saving_work_in_every_phase():
    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sparsifier = Sparsifier(
        model, SparsityConfig(target=0.8, warmup_frac=0.4, finetune_frac=0.4), total_steps=5, optimizer=optimizer
    )  # density anneals over steps 0-2, masks freeze at step 3
    for phase in ("warm-up", "annealed", "frozen", "finalized"):
        if phase == "annealed":
            train(model, sparsifier, optimizer, 2)
        elif phase == "frozen":
            train(model, sparsifier, optimizer, 1)
            assert sparsifier.frozen
        elif phase == "finalized":
            sparsifier.finalize()
        twin = copy.deepcopy(model).eval()
        x = torch.randn(2, 3, 8, 8)
        assert torch.equal(model.eval()(x), twin(x)), phase
        model.train()
        torch.save(model.state_dict(), io.BytesIO())
        torch.save(sparsifier.state_dict(), io.BytesIO())
    torch.save(model, io.BytesIO())  # whole-module pickling: once finalized (parametrized modules refuse it)


def test_optimizer_may_be_created_before_or_after():
    config = SparsityConfig(target=0.7, warmup_frac=0.5, finetune_frac=0.25)
    runs = {}
    for order in ("before", "after"):
        torch.manual_seed(0)
        model = SmallCNN()
        parameters = {id(p) for p in model.parameters()}
        if order == "before":
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
            sparsifier = Sparsifier(model, config, total_steps=8, optimizer=optimizer)
        else:
            sparsifier = Sparsifier(model, config, total_steps=8)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        assert {id(p) for p in model.parameters()} == parameters  # the Parameters kept their identity
        assert train(model, sparsifier, optimizer, 6)[-1]["frozen"]  # the freeze step
        if order == "after":  # the Sparsifier does not know this optimizer: prune its state as documented
            sparsifier.prune_optimizer_state(optimizer)
        train(model, sparsifier, optimizer, 2, skip=6)
        assert all(t.weight in optimizer.state for t in sparsifier.tensors)  # masked weights were optimized
        runs[order] = sparsifier.finalize().state_dict()
    assert all(torch.equal(runs["before"][k], runs["after"][k]) for k in runs["before"])
    assert sum(int((v == 0).sum()) for k, v in runs["after"].items() if k.endswith("weight")) > 0


def test_forgetting_finish_backward_is_an_error():
    model = SmallCNN()
    sparsifier = Sparsifier(model, SparsityConfig(target=0.5, warmup_frac=0.0), total_steps=3)
    nn.functional.cross_entropy(model(torch.randn(2, 3, 8, 8)), torch.tensor([0, 1])).backward()
    with pytest.raises(RuntimeError, match=r"call sparsifier.finish_backward\(\) after loss.backward\(\)"):
        sparsifier.step()


def test_telemetry_reports_the_schedule_and_the_solver():
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sparsifier = Sparsifier(
        model,
        SparsityConfig(target=0.9, warmup_frac=0.5, finetune_frac=0.25, beta_init=1, beta_final=9),
        total_steps=4,
        optimizer=optimizer,
    )
    telemetry = train(model, sparsifier, optimizer, 4)
    assert [t["density_target"] for t in telemetry] == pytest.approx([0.55, 0.1, 0.1, 0.1])
    first = telemetry[0]
    assert first["beta"] == pytest.approx(1 + 8 / 3)
    assert {"lam", "solver_iterations", "flip_rate", "soft_kept", "soft_dropped"} <= set(first)
    assert first["soft_kept"] > first["soft_dropped"]
    assert telemetry[2]["frozen"] and not telemetry[1]["frozen"]


@pytest.mark.parametrize("method", ["spartan", "topkast"])
def test_steps_without_statistics_train_the_same_model(method):
    runs = {}
    for statistics in (True, False):
        torch.manual_seed(0)
        model = SmallCNN()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        config = SparsityConfig(method=method, target=0.8, warmup_frac=0.5)
        sparsifier = Sparsifier(model, config, total_steps=6, optimizer=optimizer)
        telemetry = train(model, sparsifier, optimizer, 4, statistics=statistics)
        runs[statistics] = telemetry, sparsifier.masks(), model.state_dict()
    (with_stats, masks, weights), (without, bare_masks, bare_weights) = runs[True], runs[False]
    costly = {"flip_rate", "soft_kept", "soft_dropped"}
    assert "flip_rate" in with_stats[-1] and not costly & set(without[-1])
    assert {k: v for k, v in with_stats[-1].items() if k not in costly} == without[-1]
    assert all(torch.equal(masks[k], bare_masks[k]) for k in masks)
    assert all(torch.equal(weights[k], bare_weights[k]) for k in weights)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"target": 1.0}, r"target must be a sparsity in \[0, 1\), got 1.0"),
        ({"target": -0.1}, r"target must be a sparsity in \[0, 1\)"),
        ({"method": "rigl"}, "method must be one of"),
        ({"allocation": "random"}, "allocation must be one of"),
        ({"cost": "energy"}, "cost must be one of"),
        ({"density_schedule": "exp"}, "density_schedule must be one of"),
        ({"cost": "flops"}, "input_shape .* is required with cost=flops"),
    ],
)
def test_bad_config_names_the_field(kwargs, message):
    with pytest.raises(ConfigFieldError, match=f"^{message}") as error:
        SparsityConfig(**kwargs)
    assert error.value.field == message.split()[0]


@pytest.mark.parametrize(
    "config,steps,message",
    [
        (SparsityConfig(block=(4, 4)), 10, r"block \(4, 4\) does not divide conv1.weight"),
        (SparsityConfig(include=["encoder.*"]), 10, "include pattern 'encoder.\\*' matches no maskable layer"),
        (SparsityConfig(), 0, "total_steps must be a positive integer"),
        (SparsityConfig(target=0.9999), 10, "unreachable counting all parameters"),
    ],
)
def test_bad_sparsifier_arguments(config, steps, message):
    with pytest.raises(ValueError, match=message):
        Sparsifier(SmallCNN(), config, total_steps=steps)


def test_loading_state_from_another_config_or_model_is_an_error():
    state = Sparsifier(SmallCNN(), SparsityConfig(target=0.5), total_steps=10).state_dict()
    with pytest.raises(ValueError, match=r"config.target: saved 0.5, this run 0.6"):
        Sparsifier(SmallCNN(), SparsityConfig(target=0.6), total_steps=10).load_state_dict(state)
    with pytest.raises(
        ValueError,
        match=r"tensors\[2\]: saved \('fc.weight', \(10, 16\), \(1, 1\)\), "
        r"this run \('fc.weight', \(7, 16\), \(1, 1\)\)",
    ):
        Sparsifier(SmallCNN(classes=7), SparsityConfig(target=0.5), total_steps=10).load_state_dict(state)


def test_a_full_density_that_rounds_above_one_is_accepted():
    model = nn.Sequential(nn.Linear(31, 17, bias=False), nn.Linear(17, 3, bias=False), nn.Linear(3, 31, bias=False))
    config = SparsityConfig(target=0.5, exclude=["2"], cost="custom", custom_costs={"*": 0.1}, allocation="uniform")
    sparsifier = Sparsifier(model, config, total_steps=10)  # step 0: density 1 computes as 1 + 2e-16
    assert sparsifier.report()["totals"]["sparsity_masked"] == 0.0


def test_masks_never_freeze_before_the_warmup_reaches_the_target():
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    config = SparsityConfig(target=0.9, warmup_frac=0.5, finetune_frac=0.5)
    sparsifier = Sparsifier(model, config, total_steps=5, optimizer=optimizer)  # round(2.5) would freeze at 2
    assert sparsifier.schedule.freeze_step == 3
    train(model, sparsifier, optimizer, 5)
    assert sparsifier.report()["totals"]["sparsity_all"] == pytest.approx(0.9, abs=1e-3)


def test_excluded_layers_do_not_need_costs_when_only_masked_weights_count():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    config = SparsityConfig(target=0.5, exclude=["1"], cost="custom", custom_costs={"0": 1.0}, accounting="masked")
    Sparsifier(model, config, total_steps=10)
    with pytest.raises(ValueError, match="accounting='all' counts the excluded layers too: .*give no factor"):
        Sparsifier(
            model, SparsityConfig(target=0.1, exclude=["1"], cost="custom", custom_costs={"0": 1.0}), total_steps=10
        )


def test_unused_excluded_layer_costs_no_flops():
    class WithSpare(SmallCNN):
        def __init__(self):
            super().__init__()
            self.spare = nn.Linear(3, 3)  # never called

    config = SparsityConfig(target=0.5, cost="flops", input_shape=(3, 8, 8), exclude=["spare"])
    sparsifier = Sparsifier(WithSpare(), config, total_steps=10)
    assert sparsifier.unmasked_cost == 0.0


def test_moving_the_model_after_building_the_sparsifier_is_a_clear_error():
    model = SmallCNN()
    Sparsifier(model, SparsityConfig(target=0.5), total_steps=10)
    model.to(torch.float64)
    with pytest.raises(
        RuntimeError,
        match=r"conv1.weight is torch.float64 on cpu but its mask was built for "
        r"torch.float32 on cpu: move the model",
    ):
        model(torch.randn(1, 3, 8, 8, dtype=torch.float64))


def test_fallback_layers_use_the_unstructured_beta():
    model = torchvision.models.resnet18(num_classes=10)
    config = SparsityConfig(
        target=0.5,
        block=(4, 4),
        block_fallback=True,
        allocation="uniform",
        beta_init=2,
        beta_final=2,
        warmup_frac=0.0,
        finetune_frac=1.0,
    )  # β is final at step 0
    sparsifier = Sparsifier(model, config, total_steps=10)
    betas = {row["name"]: row["beta"] for row in sparsifier.report()["layers"]}
    assert betas["conv1.weight"] == pytest.approx(2.0)  # (64, 3, 7, 7): unstructured fallback
    assert betas["layer1.0.conv1.weight"] == pytest.approx(8.0)  # 2 * sqrt(16)


def test_a_new_selection_pattern_is_one_class_and_its_registration():
    from spartan.methods import METHODS, Method, register_method

    @register_method
    class TwoOfFour(Method):
        """N:M sparsity (2 of every 4 consecutive weights of a row), plain masking: only the selection differs."""

        name = "test_2of4"

        def select(self, entries, groups, budgets, betas, tol):
            quads = entries.values.view(-1, 4)
            keep = torch.zeros_like(quads, dtype=torch.bool).scatter_(1, quads.topk(2, dim=1).indices, True)
            entries.previous_hard, entries.hard = entries.hard, entries.previous_hard
            entries.hard.copy_(keep.view(-1))

    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        config = SparsityConfig(method="test_2of4", target=0.5, accounting="masked", warmup_frac=0.0)
        sparsifier = Sparsifier(model, config, total_steps=4, optimizer=optimizer)
        train(model, sparsifier, optimizer, 4, input_shape=(8,), classes=4)
        finalized = sparsifier.finalize()
        for layer in (finalized[0], finalized[2]):
            assert ((layer.weight.view(-1, 4) != 0).sum(1) == 2).all()  # exactly 2 of every 4
        assert sparsifier.report()["totals"]["sparsity_masked"] == 0.5
    finally:
        del METHODS["test_2of4"]


@pytest.mark.parametrize("allocation", ["global", "erk"])
def test_kept_mean_beta_makes_soft_masks_independent_of_the_weights_scale(allocation):
    def soft_masks(scale: float, beta_scale: str) -> tuple[torch.Tensor, dict]:
        torch.manual_seed(0)
        model = SmallCNN()
        with torch.no_grad():
            for weight in (model.conv1.weight, model.conv2.weight, model.fc.weight):
                weight.mul_(scale)
        config = SparsityConfig(
            method="spartan",
            target=0.7,
            accounting="masked",
            allocation=allocation,
            warmup_frac=0.0,
            beta_init=4.0,
            beta_final=4.0,
            beta_scale=beta_scale,
            tol=1e-10,
        )
        sparsifier = Sparsifier(model, config, total_steps=10)
        telemetry = sparsifier.step()  # the second selection: scales from the entries kept at the first
        return torch.cat([m.flatten() for m in sparsifier.masks().values()]), telemetry

    relative, telemetry = soft_masks(1.0, "kept_mean")
    relative_scaled, telemetry_scaled = soft_masks(10.0, "kept_mean")
    assert torch.allclose(relative, relative_scaled, atol=1e-5)
    assert telemetry_scaled["beta_effective"] == pytest.approx(telemetry["beta_effective"] / 10, rel=1e-6)
    raw, raw_telemetry = soft_masks(1.0, "raw")
    assert raw_telemetry["beta_effective"] == 4.0
    assert not torch.allclose(raw, soft_masks(10.0, "raw")[0], atol=1e-2)  # raw β: softness depends on scale


def test_kept_mean_beta_divides_by_the_mean_kept_unit_value():
    torch.manual_seed(0)
    model = SmallCNN()
    config = SparsityConfig(
        method="spartan",
        target=0.7,
        accounting="masked",
        warmup_frac=0.0,
        beta_init=3.0,
        beta_final=3.0,
        beta_scale="kept_mean",
    )
    sparsifier = Sparsifier(model, config, total_steps=10)
    kept = torch.cat([m.flatten() for m in sparsifier.masks().values()]) > 0  # the hard set of the first selection
    values = torch.cat([t.weight.detach().abs().flatten() for t in sparsifier.tensors])
    telemetry = sparsifier.step()
    assert telemetry["beta_effective"] == pytest.approx(3.0 / float(values[kept].double().mean()), rel=1e-5)


def test_block_values_of_a_large_layer_are_its_block_sums():
    from spartan import kernels
    from spartan.sparsifier import _block_values_pass

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10))  # 524,288 weights: compiled
    sparsifier = Sparsifier(model, SparsityConfig(target=0.8, block=(16, 16), include=("0",)), total_steps=10)
    (tensor,) = sparsifier.tensors
    expected = tensor.entry_values(tensor.weight.detach()).reshape(-1) / 256  # unit values: per weight of a block
    assert _block_values_pass in kernels._compiled
    torch.testing.assert_close(sparsifier.entries.values, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", ["spartan", "topkast", "magnitude"])
@pytest.mark.parametrize("block", [(1, 1), (2, 4)])
def test_masks_come_in_the_weights_dtype_and_are_what_the_forward_applies(method, block):
    # hard-mask methods keep their masks as bool internally, Spartan writes its multiplier in place each step
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    config = SparsityConfig(method=method, target=0.7, block=block)  # the density ramps: masks change each step
    sparsifier = Sparsifier(model, config, total_steps=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    moved = False
    for _ in range(6):
        masks = {name: mask.clone() for name, mask in sparsifier.masks().items()}
        assert {mask.dtype for mask in masks.values()} == {torch.float32}
        for i in (0, 2):
            original = model[i].parametrizations.weight.original
            assert torch.equal(model[i].weight, original * masks[f"{i}.weight"])
        model(torch.randn(4, 16)).square().mean().backward()
        sparsifier.finish_backward()
        optimizer.step()
        optimizer.zero_grad()
        sparsifier.step()
        moved |= any(not torch.equal(masks[n], m) for n, m in sparsifier.masks().items())
    assert moved  # the masks changed, and what the forward applies followed them
