"""Per-weight cost models: the "linear model of per-parameter costs" that budgets are measured in.

- ``params``: every weight costs 1 (budgets count weights);
- ``flops``: a weight costs the multiply-accumulates it takes part in per sample — ``H_out·W_out`` for a
  conv, tokens per sample for a linear or attention projection — read off one traced forward at a given
  input shape (re-run it if the resolution changes);
- ``custom``: a user-given factor per layer, by module-name glob.

An entry's cost is its layer's factor times its block's numel.
"""

from __future__ import annotations

import fnmatch
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from spartan.layers import MaskedTensor

COST_MODELS = ("params", "flops", "custom")


def cost_factors(
    model: nn.Module,
    tensors: Sequence[MaskedTensor],
    cost: str,
    *,
    input_shape: Sequence[int] | None = None,
    custom: Mapping[str, float] | None = None,
    allow_unused: bool = False,
) -> list[float]:
    """Cost per weight (cost units) of each masked tensor, in order.

    ``input_shape`` is one sample's shape without the batch dim (e.g. ``(3, 224, 224)``), needed for ``flops``;
    ``custom`` maps module-name globs to factors (first match wins), needed for ``custom``. ``allow_unused``
    gives layers the traced forward never runs 0 FLOPs instead of an error.
    """
    if cost == "params":
        return [1.0] * len(tensors)
    if cost == "flops":
        if input_shape is None:
            raise ValueError("the flops cost model needs input_shape, one sample's shape such as (3, 224, 224)")
        return flops_per_weight(model, tensors, input_shape, allow_unused=allow_unused)
    if cost == "custom":
        return _custom_factors(tensors, custom)
    raise ValueError(f"cost must be one of {COST_MODELS}, got {cost!r}")


def flops_per_weight(
    model: nn.Module, tensors: Sequence[MaskedTensor], input_shape: Sequence[int], *, allow_unused: bool = False
) -> list[float]:
    """Multiply-accumulates per weight per sample of each masked tensor, from one traced forward (eval mode)."""
    uses: dict[tuple[int, str], float] = defaultdict(float)
    masked = {id(t.module) for t in tensors}
    hooks = []
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            # Its forward reads out_proj.weight directly, never calling out_proj: count both here.
            if id(module) in masked or id(module.out_proj) in masked:
                hooks.append(module.register_forward_hook(_attention_hook(uses), with_kwargs=True))
        elif id(module) in masked:
            hooks.append(module.register_forward_hook(_output_positions_hook(uses)))
    modes = {m: m.training for m in model.modules()}
    parameter = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, dtype=parameter.dtype, device=parameter.device))
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
    factors = [uses[(id(t.module), t.attr)] for t in tensors]
    unused = [t.name for t, f in zip(tensors, factors) if f == 0]
    if unused and not allow_unused:
        raise ValueError(
            f"the traced forward at input_shape {tuple(input_shape)} never used {unused}; exclude "
            f"them from masking or use another cost model"
        )
    return factors


def _output_positions_hook(uses):
    def hook(module, args, output):
        if isinstance(module, nn.Conv2d):
            positions = output.shape[-2] * output.shape[-1]
        else:  # Linear: every leading dim but the batch is a token
            positions = math.prod(output.shape[1:-1]) if output.dim() > 1 else 1
        uses[(id(module), "weight")] += positions

    return hook


def _attention_hook(uses):
    def hook(module, args, kwargs, output):
        query = kwargs["query"] if "query" in kwargs else args[0]
        key = kwargs["key"] if "key" in kwargs else args[1]
        batched = query.dim() == 3
        seq_dim = 1 if (module.batch_first and batched) else 0
        q_len, kv_len = query.shape[seq_dim], key.shape[seq_dim]
        uses[(id(module), "in_proj_weight")] += (q_len + 2 * kv_len) / 3  # rows: q, k, v thirds
        uses[(id(module), "q_proj_weight")] += q_len
        uses[(id(module), "k_proj_weight")] += kv_len
        uses[(id(module), "v_proj_weight")] += kv_len
        uses[(id(module.out_proj), "weight")] += q_len

    return hook


def _custom_factors(tensors: Sequence[MaskedTensor], custom: Mapping[str, float] | None) -> list[float]:
    if not custom:
        raise ValueError("the custom cost model needs factors: a mapping of module-name globs to costs per weight")
    for pattern, factor in custom.items():
        if not (isinstance(factor, (int, float)) and factor > 0 and math.isfinite(factor)):
            raise ValueError(f"custom cost factor for {pattern!r} must be a finite number > 0, got {factor!r}")
    factors, missing = [], []
    for t in tensors:
        factor = next((f for p, f in custom.items() if fnmatch.fnmatchcase(t.module_name, p)), None)
        if factor is None:
            missing.append(t.module_name)
        factors.append(float(factor or 0))
    if missing:
        raise ValueError(
            f"custom cost factors give no factor for layers {missing}; add a matching glob (e.g. '*' as a default)"
        )
    return factors
