"""Masked-tensor discovery, blocks, allocation (uniform / ERK / accounting) and cost models."""

import math

import pytest
import timm
import torch
import torchvision
from torch import nn

from spartan.allocation import layer_densities, masked_density
from spartan.costs import cost_factors
from spartan.layers import find_masked_tensors


class TwoConvs(nn.Module):
    """conv_a runs at 8×8 output positions, conv_b (stride 2) at 4×4; both have 3·3·4·4 weights."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(4, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1, stride=2)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        return self.head(self.conv_b(self.conv_a(x)).mean((2, 3)))


# ------------------------------------------------------------------------------------------ discovery


def test_resnet50_masks_every_conv_and_linear_weight():
    model = torchvision.models.resnet50()
    tensors = find_masked_tensors(model)
    expected = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [t.module for t in tensors] == expected
    assert sum(t.weight.numel() for t in tensors) == 25_502_912
    assert all(t.weight is t.module.weight for t in tensors)


def test_vit_attention_projections_are_found():
    model = torchvision.models.vit_b_16()
    names = {t.name for t in find_masked_tensors(model)}
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in names
    assert "encoder.layers.encoder_layer_0.self_attention.out_proj.weight" in names
    assert "conv_proj.weight" in names and "heads.head.weight" in names


def test_separate_qkv_projections_are_found():
    attention = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)
    assert [t.attr for t in find_masked_tensors(attention)] == [
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
        "weight",
    ]


def test_include_and_exclude_globs():
    model = torchvision.models.vit_b_16()
    tensors = find_masked_tensors(model, include=["encoder.*"], exclude=["*.mlp.*"])
    assert tensors and all(t.module_name.startswith("encoder.") and ".mlp." not in t.module_name for t in tensors)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"include": ["encoder.*"]}, "include pattern 'encoder.\\*' matches no maskable layer"),
        ({"exclude": ["*.fc2"]}, "exclude pattern '\\*.fc2' matches no maskable layer"),
        ({"include": ["fc"], "exclude": ["fc"]}, "leave no layer to mask"),
        ({"block": (0, 4)}, "block must be two positive integers"),
        ({"block": (2.5, 2)}, "block must be two positive integers"),
    ],
)
def test_bad_filters_and_blocks(kwargs, message):
    with pytest.raises(ValueError, match=message):
        find_masked_tensors(torchvision.models.resnet18(), **kwargs)


def test_indivisible_block_names_the_layer_or_falls_back(caplog):
    model = torchvision.models.resnet18()  # conv1 is (64, 3, 7, 7): 3 input channels
    with pytest.raises(ValueError, match=r"block \(4, 4\) does not divide conv1.weight of shape \(64, 3, 7, 7\)"):
        find_masked_tensors(model, block=(4, 4))
    with caplog.at_level("WARNING", logger="spartan"):
        tensors = find_masked_tensors(model, block=(4, 4), block_fallback=True)
    assert {t.name: t.block for t in tensors}["conv1.weight"] == (1, 1)
    assert {t.name: t.block for t in tensors}["layer1.0.conv1.weight"] == (4, 4)
    assert "conv1.weight" in caplog.text and "unstructured" in caplog.text


def test_block_values_and_expansion_round_trip():
    conv = nn.Conv2d(6, 8, 3)  # weight (8, 6, 3, 3)
    (tensor,) = find_masked_tensors(conv, block=(4, 2))
    assert tensor.entry_shape == (2, 3, 3, 3) and tensor.block_numel == 8 and tensor.n_entries == 54
    weight = conv.weight.detach()
    values = tensor.entry_values(weight)
    assert torch.allclose(values[1, 2, 0, 1], weight[4:8, 4:6, 0, 1].abs().sum())
    expanded = tensor.expand(values)
    assert expanded.shape == weight.shape
    assert torch.equal(expanded[5, 4, 0, 1].expand(4, 2), expanded[4:8, 4:6, 0, 1])


# ------------------------------------------------------------------------------------------ allocation


def test_uniform_and_global():
    assert layer_densities([(4, 4), (8, 8)], [16, 64], 0.3, "uniform") == [0.3, 0.3]
    assert layer_densities([(4, 4), (8, 8)], [16, 64], 0.3, "global") is None


def test_erk_matches_the_formula_and_the_budget():
    shapes = [(64, 3, 7, 7), (64, 64, 3, 3), (256, 64, 1, 1), (1000, 2048), (2304, 768)]
    costs = [math.prod(s) for s in shapes]
    densities = layer_densities(shapes, costs, 0.1, "erk")
    assert sum(d * c for d, c in zip(densities, costs)) == pytest.approx(0.1 * sum(costs))
    free = [(d, s) for d, s in zip(densities, shapes) if d < 1]
    ratios = [d / (sum(s) / math.prod(s)) for d, s in free]
    assert max(ratios) == pytest.approx(min(ratios))  # ∝ Σ dims / Π dims wherever not capped


def test_erk_caps_small_layers_at_dense_and_redistributes():
    shapes = [(4, 3, 3, 3), (512, 512, 3, 3), (512, 512)]
    costs = [math.prod(s) for s in shapes]
    densities = layer_densities(shapes, costs, 0.2, "erk")
    assert densities[0] == 1.0 and all(0 < d < 1 for d in densities[1:])
    assert sum(d * c for d, c in zip(densities, costs)) == pytest.approx(0.2 * sum(costs))


def test_accounting_over_all_parameters_makes_masked_layers_sparser():
    assert masked_density(0.1, masked_cost=900, unmasked_cost=100, accounting="masked") == 0.1
    density = masked_density(0.1, masked_cost=900, unmasked_cost=10, accounting="all")
    assert (density * 900 + 10) / 910 == pytest.approx(0.1)
    with pytest.raises(ValueError, match="target sparsity 0.95 is unreachable counting all parameters"):
        masked_density(0.05, masked_cost=900, unmasked_cost=100, accounting="all")


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: layer_densities([(2, 2)], [4], 0.5, "random"), "allocation must be one of"),
        (lambda: layer_densities([(2, 2)], [4], 0.0, "erk"), r"density must be in \(0, 1\]"),
        (lambda: masked_density(0.5, 10, 1, "some"), "accounting must be one of"),
    ],
)
def test_bad_allocation_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ------------------------------------------------------------------------------------------ costs


def test_flops_factors_count_output_positions():
    model = TwoConvs()
    tensors = find_masked_tensors(model)
    assert cost_factors(model, tensors, "flops", input_shape=(4, 8, 8)) == [64.0, 16.0, 1.0]
    assert cost_factors(model, tensors, "params") == [1.0, 1.0, 1.0]
    assert model.training  # the trace restores the mode


def test_flops_follow_the_resolution():
    model = torchvision.models.resnet18()
    tensors = find_masked_tensors(model)
    small = cost_factors(model, tensors, "flops", input_shape=(3, 64, 64))
    large = cost_factors(model, tensors, "flops", input_shape=(3, 128, 128))
    assert [b / a for a, b in zip(small[:-1], large[:-1])] == pytest.approx([4.0] * (len(small) - 1))
    assert small[0] == 32 * 32 and small[-1] == large[-1] == 1.0


def test_vit_flops_use_tokens_per_sample():
    model = torchvision.models.vit_b_16(image_size=64)  # 4x4 patches + class token = 17 tokens
    tensors = find_masked_tensors(model)
    factors = dict(zip((t.name for t in tensors), cost_factors(model, tensors, "flops", input_shape=(3, 64, 64))))
    layer = "encoder.layers.encoder_layer_0"
    assert factors["conv_proj.weight"] == 16
    assert factors[f"{layer}.self_attention.in_proj_weight"] == 17
    assert factors[f"{layer}.self_attention.out_proj.weight"] == 17
    assert factors[f"{layer}.mlp.0.weight"] == 17
    assert factors["heads.head.weight"] == 1


def test_timm_vit_flops_use_tokens_per_sample():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10)  # 4 patches + class token
    tensors = find_masked_tensors(model)
    factors = dict(zip((t.name for t in tensors), cost_factors(model, tensors, "flops", input_shape=(3, 32, 32))))
    assert factors["blocks.0.attn.qkv.weight"] == 5 and factors["head.weight"] == 1
    assert factors["patch_embed.proj.weight"] == 4


def test_custom_factors_by_glob():
    model = TwoConvs()
    tensors = find_masked_tensors(model)
    assert cost_factors(model, tensors, "custom", custom={"conv_*": 2.0, "*": 0.5}) == [2.0, 2.0, 0.5]
    with pytest.raises(ValueError, match=r"give no factor for layers \['head'\]"):
        cost_factors(model, tensors, "custom", custom={"conv_*": 2.0})
    with pytest.raises(ValueError, match="must be a finite number > 0"):
        cost_factors(model, tensors, "custom", custom={"*": -1.0})


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"cost": "energy"}, "cost must be one of"),
        ({"cost": "flops"}, "the flops cost model needs input_shape"),
        ({"cost": "custom"}, "the custom cost model needs factors"),
    ],
)
def test_bad_cost_arguments(kwargs, message):
    model = TwoConvs()
    with pytest.raises(ValueError, match=message):
        cost_factors(model, find_masked_tensors(model), **kwargs)


def test_unused_layer_is_reported_for_flops():
    model = TwoConvs()
    model.spare = nn.Linear(3, 3)  # never called in forward
    with pytest.raises(ValueError, match=r"never used \['spare.weight'\]"):
        cost_factors(model, find_masked_tensors(model), "flops", input_shape=(4, 8, 8))
