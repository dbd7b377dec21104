"""``Sparsifier``: the object users hold to train a model to an exact sparsity (DESIGN.md §1 and §2).

The training loop::

    sparsifier = Sparsifier(model, SparsityConfig(target=0.9), total_steps, optimizer=optimizer)
    for batch in data:
        loss = criterion(model(x), y)
        loss.backward()
        sparsifier.finish_backward()     # Spartan's global gradient term (a no-op for other methods)
        optimizer.step(); optimizer.zero_grad()
        sparsifier.step()                # new masks from the updated weights
    model = sparsifier.finalize()        # plain modules with exact zeros

Masks are attached as ``torch.nn.utils.parametrize`` parametrizations: the Parameters themselves are kept (an
optimizer built before or after works), nothing is registered as a buffer (DDP does not broadcast masks;
every rank recomputes them identically from the synchronized weights), and no autograd graph is kept
between steps, so ``copy.deepcopy(model)`` works. While masks are attached, ``model.state_dict()`` keys of
masked weights read ``<module>.parametrizations.<name>.original``; ``finalize()`` restores the plain keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.utils import parametrize

from spartan.allocation import layer_densities, masked_density
from spartan.config import SparsityConfig, first_difference
from spartan.costs import cost_factors, flops_per_weight
from spartan.layers import MaskedTensor, find_masked_tensors
from spartan.masking import GradientCorrection, masked_weight, spartan_weight, straight_through_weight
from spartan.schedules import Schedule
from spartan.topk import HardThreshold, hard_threshold, solve_soft_topk


class _Mask(nn.Module):
    """The parametrization of one masked weight: ``weight -> effective weight`` by the current mode."""

    def __init__(self, tensor: MaskedTensor):
        super().__init__()
        self.tensor = tensor
        self.mode = "masked"  # "spartan" | "straight_through" | "masked"
        self.keep: Tensor | None = None
        self.soft: Tensor | None = None
        self.slope: Tensor | None = None
        self.cost = 1.0
        self.correction: GradientCorrection | None = None

    def forward(self, weight: Tensor) -> Tensor:
        if self.keep.device != weight.device or self.keep.dtype != weight.dtype:
            raise RuntimeError(f"{self.tensor.name} is {weight.dtype} on {weight.device} but its mask was built for "
                               f"{self.keep.dtype} on {self.keep.device}: move the model (model.to(...)) before "
                               f"creating the Sparsifier")
        if self.mode == "spartan":
            return spartan_weight(weight, self.tensor, self.keep, self.soft, self.slope, self.cost, self.correction)
        if self.mode == "straight_through":
            return straight_through_weight(weight, self.tensor, self.keep)
        return masked_weight(weight, self.tensor, self.keep)


@dataclass(eq=False)
class _Group:
    """Masked tensors that share one budget (all of them for ``global`` allocation, else one tensor)."""

    members: list[int]
    slices: list[slice]
    costs: Tensor | None  # per-entry costs, or None when they all equal ``unit_cost``
    unit_cost: float
    total_cost: float
    values: Tensor
    soft: Tensor
    hard: Tensor
    previous_hard: Tensor
    correction: GradientCorrection
    lam: float | None = None
    threshold: HardThreshold | None = None
    telemetry: dict = field(default_factory=dict)


class Sparsifier:
    """Trains ``model``'s Conv2d / Linear / attention weights to ``config.target`` sparsity over ``total_steps``.

    ``optimizer`` (optional) lets the freeze zero the optimizer state of pruned weights, so momentum and
    weight decay cannot revive them; without it, call :meth:`prune_optimizer_state` yourself at the freeze.
    ``process_group`` is the data-parallel group gradients are averaged over (default: the world).
    Build the Sparsifier after placing the model (``model.to(device, dtype)``).
    """

    def __init__(self, model: nn.Module, config: SparsityConfig, total_steps: int, *,
                 optimizer: torch.optim.Optimizer | None = None, process_group: Any = None):
        if not isinstance(config, SparsityConfig):
            raise ValueError(f"config must be a SparsityConfig, got {type(config).__name__}")
        self.model, self.config, self.optimizer, self.process_group = model, config, optimizer, process_group
        self.schedule = Schedule(config, total_steps)
        self.tensors = find_masked_tensors(model, include=config.include, exclude=config.exclude,
                                           block=config.block, block_fallback=config.block_fallback)
        self.factors = cost_factors(model, self.tensors, config.cost, input_shape=config.input_shape,
                                    custom=config.custom_costs)
        self.layer_costs = [f * t.weight.numel() for f, t in zip(self.factors, self.tensors)]
        self.unmasked_cost = self._unmasked_cost()
        if config.method != "dense":  # an unreachable target must fail now, not when the warm-up ends
            self._masked_densities(self.schedule.density_final)
        self.step_count = 0
        self.frozen = False
        self.finalized = False
        self.masks = [_Mask(t) for t in self.tensors]
        self.groups = self._make_groups()
        if config.method != "dense":
            for tensor, mask in zip(self.tensors, self.masks):
                parametrize.register_parametrization(tensor.module, tensor.attr, mask, unsafe=True)
        self._update()

    # -------------------------------------------------------------------------------------- construction

    def _unmasked_cost(self) -> float:
        """Cost of what stays dense, counted by ``accounting="all"`` (cost units of the configured model)."""
        if self.config.accounting == "masked":
            return 0.0
        masked_ids = {id(t.weight) for t in self.tensors}
        if self.config.cost == "params":
            return float(sum(p.numel() for p in self.model.parameters() if id(p) not in masked_ids))
        # Other cost models: the excluded maskable layers at their own cost (biases and norms are negligible).
        others = [t for t in find_masked_tensors(self.model) if id(t.weight) not in masked_ids]
        if not others:
            return 0.0
        try:
            factors = cost_factors(self.model, others, self.config.cost, input_shape=self.config.input_shape,
                                   custom=self.config.custom_costs, allow_unused=True)
        except ValueError as err:
            raise ValueError(f"accounting='all' counts the excluded layers too: {err} (or use accounting='masked')") \
                from None
        return float(sum(f * t.weight.numel() for f, t in zip(factors, others)))

    def _make_groups(self) -> list[_Group]:
        if self.config.method == "dense":
            return []
        if self.config.allocation == "global":
            member_lists = [list(range(len(self.tensors)))]
        else:
            member_lists = [[i] for i in range(len(self.tensors))]
        groups = []
        for members in member_lists:
            device = self.tensors[members[0]].weight.device
            # Solve in float32 (float64 for float64 models): the precision soft_topk computes in.
            dtype = torch.float64 if self.tensors[members[0]].weight.dtype == torch.float64 else torch.float32
            entry_costs = [self.factors[i] * self.tensors[i].block_numel for i in members]
            sizes = [self.tensors[i].n_entries for i in members]
            starts = [sum(sizes[:k]) for k in range(len(sizes))]
            slices = [slice(a, a + n) for a, n in zip(starts, sizes)]
            n = sum(sizes)
            uniform = all(c == entry_costs[0] for c in entry_costs)
            costs = None if uniform else torch.cat([torch.full((s,), c, dtype=dtype, device=device)
                                                    for s, c in zip(sizes, entry_costs)])
            groups.append(_Group(
                members=members, slices=slices, costs=costs, unit_cost=entry_costs[0] if uniform else 1.0,
                total_cost=sum(c * s for c, s in zip(entry_costs, sizes)),
                values=torch.empty(n, dtype=dtype, device=device), soft=torch.empty(n, dtype=dtype, device=device),
                hard=torch.zeros(n, dtype=torch.bool, device=device),
                previous_hard=torch.zeros(n, dtype=torch.bool, device=device),
                correction=GradientCorrection(beta=1.0, slope_total=0.0,
                                              accumulated=torch.zeros((), dtype=torch.float64, device=device))))
        return groups

    # -------------------------------------------------------------------------------------- training loop

    def target_density(self, step: int | None = None) -> float:
        """Overall target density (1 − sparsity) at ``step``, in the configured accounting (1 for ``dense``)."""
        if self.config.method == "dense":
            return 1.0
        return self.schedule.density(self.step_count if step is None else step)

    def _masked_densities(self, density: float) -> tuple[float, list[float] | None]:
        """For an overall target ``density``: the masked layers' density and, unless global, each layer's."""
        masked = masked_density(density, sum(self.layer_costs), self.unmasked_cost, self.config.accounting)
        shapes = [t.shape for t in self.tensors]
        return masked, layer_densities(shapes, self.layer_costs, masked, self.config.allocation)

    def finish_backward(self) -> None:
        """Apply Spartan's global gradient term; call after ``backward()``, before unscaling/clipping/stepping.

        Under DDP the per-group scalars are averaged over ranks (one all-reduce), like the gradients. Every
        rank reduces every group, pending or not (a rank may have skipped a layer), so the collectives match.
        """
        if self.config.method != "spartan" or self.frozen:
            return
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            device = self.groups[0].correction.accumulated.device
            packed = torch.tensor([[float(g.correction.accumulated), float(g.correction.pending)] for g in self.groups],
                                  dtype=torch.float64, device=device)
            dist.all_reduce(packed, group=self.process_group)
            world = dist.get_world_size(self.process_group)
            for g, (total, pending_ranks) in zip(self.groups, packed.tolist()):
                g.correction.accumulated.fill_(total / world)
                g.correction.pending = pending_ranks > 0
        for g in self.groups:
            if g.correction.pending:
                g.correction.apply([(self.tensors[i], self.masks[i].slope) for i in g.members])

    def step(self) -> dict[str, Any]:
        """Advance one optimizer step: recompute masks from the updated weights; return telemetry."""
        if self.finalized:
            raise RuntimeError("Sparsifier.step() after finalize(): the model no longer carries masks")
        if any(g.correction.pending for g in self.groups):
            raise RuntimeError("sparsifier.step() found Spartan gradients without their global correction: call "
                               "sparsifier.finish_backward() after loss.backward() and before optimizer.step()")
        for tensor, group in ((self.tensors[g.members[0]], g) for g in self.groups):
            if tensor.weight.device != group.values.device:
                raise RuntimeError(f"{tensor.name} moved to {tensor.weight.device} after the Sparsifier was built on "
                                   f"{group.values.device}: move the model before creating the Sparsifier")
        self.step_count += 1
        return self._update()

    def _update(self) -> dict[str, Any]:
        """Masks for the current step from the current weights; freezes them at the freeze step."""
        step = self.step_count
        telemetry = {"step": step, "density_target": self.target_density(step), "frozen": self.frozen}
        if self.frozen or self.config.method == "dense":
            return telemetry
        density, per_layer = self._masked_densities(self.target_density(step))
        for group in self.groups:
            layer_density = density if per_layer is None else per_layer[group.members[0]]
            # A one-layer group uses its own block (unstructured after a block fallback); a global one the config's.
            block_numel = self.tensors[group.members[0]].block_numel if len(group.members) == 1 \
                else math.prod(self.config.block)
            beta = self.schedule.beta(step, block_numel)
            self._update_group(group, layer_density * group.total_cost, beta)
        entries = sum(g.hard.numel() for g in self.groups)
        telemetry.update(masked_density_target=density, beta=self.schedule.beta(step, math.prod(self.config.block)),
                         flip_rate=sum(g.telemetry["flip_rate"] * g.hard.numel() for g in self.groups) / entries)
        if self.config.method == "spartan":
            first = self.groups[0].telemetry
            telemetry.update(lam=first["lam"], soft_kept=first["soft_kept"], soft_dropped=first["soft_dropped"],
                             solver_iterations=max(g.telemetry["solver_iterations"] for g in self.groups))
        if self.schedule.frozen(step):
            self._freeze()
            telemetry["frozen"] = True
        return telemetry

    def _update_group(self, group: _Group, budget: float, beta: float) -> None:
        with torch.no_grad():
            for i, part in zip(group.members, group.slices):
                tensor = self.tensors[i]
                entries = group.values[part].view(tensor.entry_shape)
                if tensor.block == (1, 1) and tensor.weight.dtype == entries.dtype:
                    torch.abs(tensor.weight, out=entries)  # no temporary: this runs on every weight each step
                else:  # blocks are summed in the solver's precision, not in float16
                    entries.copy_(tensor.entry_values(tensor.weight.to(entries.dtype)))
            if group.costs is None:
                group.values /= group.unit_cost  # unit values; the budget becomes a number of entries
                budget /= group.unit_cost
            budget = min(budget, float(group.values.numel()) if group.costs is None else group.total_cost)
            group.previous_hard, group.hard = group.hard, group.previous_hard
            group.threshold = hard_threshold(group.values, budget, group.costs, init=group.threshold)
            group.threshold.mask(group.values, group.costs, out=group.hard)
            flips = int(torch.count_nonzero(group.hard ^ group.previous_hard))
            group.telemetry = {"flip_rate": flips / group.hard.numel()}
            if self.config.method == "spartan":
                solution = solve_soft_topk(group.values, budget, beta, group.costs, lam_init=group.lam,
                                           tol=self.config.tol, out=group.soft)
                group.lam = solution.lam if math.isfinite(solution.lam) else None  # trivial budgets: no λ
                group.correction.beta = beta
                group.correction.slope_total = solution.slope_total * group.unit_cost  # S = Σ c·s
                group.telemetry.update(lam=solution.lam, solver_iterations=solution.iterations)
            kept_soft = sum(self._set_layer_masks(i, group, part) for i, part in zip(group.members, group.slices))
            if self.config.method == "spartan":
                n_kept = int(torch.count_nonzero(group.hard))
                n_dropped = group.hard.numel() - n_kept
                dropped_soft = float(group.soft.sum()) - kept_soft
                group.telemetry.update(soft_kept=kept_soft / n_kept if n_kept else math.nan,
                                       soft_dropped=dropped_soft / n_dropped if n_dropped else math.nan)

    def _set_layer_masks(self, i: int, group: _Group, part: slice) -> float:
        """Hand layer ``i`` its slice of the group's masks; return the sum of its kept soft values."""
        tensor, mask = self.tensors[i], self.masks[i]
        dtype = tensor.weight.dtype
        hard = group.hard[part].view(tensor.entry_shape)
        if self.config.method != "spartan":
            mask.mode = "straight_through" if self.config.method == "topkast" else "masked"
            mask.keep = hard.to(dtype)
            return 0.0
        soft = group.soft[part].view(tensor.entry_shape)  # soft and slope stay in the solver's precision
        mask.mode, mask.soft, mask.slope = "spartan", soft, soft * (1 - soft)
        mask.keep = torch.where(hard, soft, 0.0).to(dtype)
        mask.cost, mask.correction = self.factors[i] * tensor.block_numel, group.correction
        return float(mask.keep.sum())

    def _freeze(self) -> None:
        """Fix the masks: kept entries keep their multiplier (the soft value for Spartan), dropped become 0."""
        self._use_fixed_masks()
        self.prune_optimizer_state(self.optimizer)

    def _use_fixed_masks(self) -> None:
        for mask in self.masks:
            mask.mode, mask.soft, mask.slope, mask.correction = "masked", None, None, None
        self.frozen = True

    def prune_optimizer_state(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Zero pruned weights and their optimizer state (momentum, Adam moments) so nothing revives them."""
        with torch.no_grad():
            for tensor, mask in zip(self.tensors, self.masks):
                if mask.keep is None:
                    continue
                alive = tensor.expand(mask.keep != 0).to(tensor.weight.dtype)
                tensor.weight.mul_(alive)
                state = optimizer.state.get(tensor.weight, {}) if optimizer is not None else {}
                for value in state.values():
                    if isinstance(value, Tensor) and value.shape == tensor.weight.shape:
                        value.mul_(alive)

    # -------------------------------------------------------------------------------------- end of training

    def finalize(self) -> nn.Module:
        """Bake ``w ⊙ mask`` into the weights and remove all masking: plain modules with exact zeros."""
        if self.finalized:
            return self.model
        if self.config.method != "dense":
            if not self.frozen:
                self._freeze()
            with torch.no_grad():
                for tensor, mask in zip(self.tensors, self.masks):
                    parametrize.remove_parametrizations(tensor.module, tensor.attr, leave_parametrized=False)
                    tensor.weight.mul_(tensor.expand(mask.keep))
        self.finalized = True
        return self.model

    # -------------------------------------------------------------------------------------- reporting

    def report(self, input_shape: tuple[int, ...] | None = None) -> dict[str, Any]:
        """Per-layer and total densities, target vs actual; FLOPs when ``input_shape`` (or config's) is known.

        Densities are fractions of weights kept (nonzero in the effective weight).
        """
        target, per_layer = self._masked_densities(self.target_density())
        report = _density_report(self.model, self.tensors, self._kept_weights(), input_shape or self.config.input_shape)
        for i, row in enumerate(report["layers"]):
            row["density_target"] = target if per_layer is None else per_layer[i]
        report["totals"].update(sparsity_target=1 - self.target_density(), accounting=self.config.accounting)
        return report

    def sparsity(self) -> dict[str, float]:
        """Actual sparsity now (fractions of zeros): over all parameters and over masked weights (cheap)."""
        totals = _density_report(self.model, self.tensors, self._kept_weights(), None)["totals"]
        return {"sparsity_all": totals["sparsity_all"], "sparsity_masked": totals["sparsity_masked"]}

    def _kept_weights(self) -> list[int]:
        """Weights each masked layer keeps: its hard mask's (blocks × block size), or its nonzero weights once
        finalized or before a mask exists."""
        return [int(torch.count_nonzero(t.weight)) if self.finalized or m.keep is None
                else int(torch.count_nonzero(m.keep)) * t.block_numel for t, m in zip(self.tensors, self.masks)]

    # -------------------------------------------------------------------------------------- checkpoints

    def _fingerprint(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "total_steps": self.schedule.total_steps,
                "tensors": [(t.name, tuple(t.shape), t.block) for t in self.tensors]}

    def state_dict(self) -> dict[str, Any]:
        """Step, warm starts and (once frozen) the fixed masks; soft masks are recomputed from the weights."""
        state = {"fingerprint": self._fingerprint(), "step": self.step_count, "frozen": self.frozen,
                 "finalized": self.finalized,
                 "groups": [{"lam": g.lam, "threshold": None if g.threshold is None else {
                     "threshold": g.threshold.threshold, "tie_keep": g.threshold.tie_keep.cpu(),
                     "kept_cost": g.threshold.kept_cost, "band": g.threshold.band},
                     "hard": g.hard.cpu()} for g in self.groups]}
        if self.frozen:
            state["frozen_keep"] = [m.keep.cpu() for m in self.masks]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`. Load the model's weights first: masks are rebuilt from them."""
        mine, theirs = self._fingerprint(), state.get("fingerprint")
        if theirs != mine:
            path, saved, this = first_difference(theirs, mine)
            raise ValueError(f"sparsifier state does not match this model/config: {path or 'state'}: saved "
                             f"{saved!r}, this run {this!r}")
        if state["finalized"]:
            raise ValueError("sparsifier state is from a finalized run; there is nothing to resume")
        self.step_count = state["step"]
        for group, saved in zip(self.groups, state["groups"]):
            group.lam = saved["lam"]
            t = saved["threshold"]
            group.threshold = None if t is None else HardThreshold(
                t["threshold"], t["tie_keep"].to(group.values.device), t["kept_cost"], tuple(t["band"]))
        if state["frozen"]:
            for tensor, mask, keep in zip(self.tensors, self.masks, state["frozen_keep"]):
                mask.keep = keep.to(tensor.weight.device)
            self._use_fixed_masks()  # the optimizer state was pruned before it was saved
            return
        self.frozen = False
        for group, saved in zip(self.groups, state["groups"]):
            group.hard.copy_(saved["hard"])  # so the next flip rate is measured against the same mask
        self._update()  # before the freeze step, so this only rebuilds the current masks


def measure_sparsity(model: nn.Module, config: SparsityConfig,
                     input_shape: tuple[int, ...] | None = None) -> dict[str, Any]:
    """The :meth:`Sparsifier.report` of a plain model (e.g. a finalized one, loaded from disk): zeros counted in
    the weights ``config`` selects (its ``include``/``exclude``/``block``), FLOPs when ``input_shape`` is given.
    """
    tensors = find_masked_tensors(model, include=config.include, exclude=config.exclude, block=config.block,
                                  block_fallback=config.block_fallback)
    report = _density_report(model, tensors, [int(torch.count_nonzero(t.weight)) for t in tensors],
                             input_shape or config.input_shape)
    report["totals"]["accounting"] = config.accounting
    return report


def _density_report(model: nn.Module, tensors: list[MaskedTensor], kept: list[int],
                    input_shape: tuple[int, ...] | None) -> dict[str, Any]:
    flops = flops_per_weight(model, tensors, input_shape) if input_shape else None
    layers = []
    for i, tensor in enumerate(tensors):
        numel = tensor.weight.numel()
        row = {"name": tensor.name, "shape": tuple(tensor.shape), "block": tensor.block, "density": kept[i] / numel,
               "params": numel, "params_kept": kept[i]}
        if flops is not None:
            row["flops_dense"], row["flops_sparse"] = flops[i] * numel, flops[i] * kept[i]
        layers.append(row)
    masked_total, masked_kept = sum(r["params"] for r in layers), sum(kept)
    all_params = sum(p.numel() for p in model.parameters())
    totals = {"sparsity_masked": 1 - masked_kept / masked_total if masked_total else 0.0,
              "sparsity_all": 1 - (all_params - masked_total + masked_kept) / all_params,
              "params": all_params, "params_masked": masked_total, "params_kept": masked_kept}
    if flops is not None:
        dense = sum(r["flops_dense"] for r in layers)
        totals.update(flops_dense=dense, flops_sparse=sum(r["flops_sparse"] for r in layers))
        totals["flops_reduction"] = dense / max(totals["flops_sparse"], 1)
    return {"layers": layers, "totals": totals}
