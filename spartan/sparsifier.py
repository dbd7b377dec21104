"""``Sparsifier``: the object users hold to train a model to an exact sparsity (docs/design.md §1 and §2).

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

import dataclasses
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.utils import parametrize

from spartan import kernels
from spartan.allocation import layer_densities, masked_density
from spartan.config import SparsityConfig, first_difference
from spartan.costs import cost_factors, flops_per_weight
from spartan.layers import MaskedTensor, find_masked_tensors
from spartan.masking import GradientCorrection
from spartan.methods import Entries, Group, LayerMask, build_method
from spartan.topk import SoftSolve, write_soft_masks


class Sparsifier:
    """Trains ``model``'s Conv2d / Linear / attention weights to ``config.target`` sparsity over ``total_steps``.

    ``optimizer`` (optional) lets the freeze zero the optimizer state of pruned weights, so momentum and
    weight decay cannot revive them; without it, call :meth:`prune_optimizer_state` yourself at the freeze.
    ``process_group`` is the data-parallel group gradients are averaged over (default: the world).
    Build the Sparsifier after placing the model (``model.to(device, dtype)``). ``config.method`` names a
    registered :class:`spartan.methods.Method`, which decides how masks are computed and applied.
    """

    def __init__(
        self,
        model: nn.Module,
        config: SparsityConfig,
        total_steps: int,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        process_group: Any = None,
    ):
        if not isinstance(config, SparsityConfig):
            raise ValueError(f"config must be a SparsityConfig, got {type(config).__name__}")
        self.model, self.config, self.optimizer, self.process_group = model, config, optimizer, process_group
        self.method = build_method(config.method)
        self.schedule = config.schedule(total_steps)
        self.tensors = find_masked_tensors(
            model,
            include=config.include,
            exclude=config.exclude,
            block=config.block,
            block_fallback=config.block_fallback,
        )
        self.factors = cost_factors(
            model, self.tensors, config.cost, input_shape=config.input_shape, custom=config.custom_costs
        )
        self.layer_costs = [f * t.weight.numel() for f, t in zip(self.factors, self.tensors)]
        self.unmasked_cost = self._unmasked_cost()
        if self.method.attaches_masks:  # an unreachable target must fail now, not when the warm-up ends
            self._masked_densities(self.schedule.density_final)
        self.step_count = 0
        self.frozen = False
        self.finalized = False
        self.layers = [LayerMask(t, self.method) for t in self.tensors]
        self.entries, self.groups = self._make_entries() if self.method.attaches_masks else (None, [])
        if any(g.part.stop - g.part.start >= kernels.COMPILE_MIN_NUMEL for g in self.groups):
            self._warm_up_kernels(self.entries.values.device, self.entries.values.dtype, self.entries.costs is not None)
        if self.method.attaches_masks:
            for tensor, layer in zip(self.tensors, self.layers):
                parametrize.register_parametrization(tensor.module, tensor.attr, layer, unsafe=True)
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
            factors = cost_factors(
                self.model,
                others,
                self.config.cost,
                input_shape=self.config.input_shape,
                custom=self.config.custom_costs,
                allow_unused=True,
            )
        except ValueError as err:
            raise ValueError(
                f"accounting='all' counts the excluded layers too: {err} (or use accounting='masked')"
            ) from None
        return float(sum(f * t.weight.numel() for f, t in zip(factors, others)))

    def _make_entries(self) -> tuple[Entries, list[Group]]:
        """Flat per-entry buffers for every masked tensor and the budget groups' parts of them."""
        weights = [t.weight for t in self.tensors]
        device = weights[0].device
        if any(w.device != device for w in weights):
            where = sorted({str(w.device) for w in weights})
            raise ValueError(f"masked weights must all be on one device to share a budget, found {where}")
        # Solve in float32 (float64 for float64 models): the precision soft_topk computes in.
        dtype = torch.float64 if all(w.dtype == torch.float64 for w in weights) else torch.float32
        sizes = [t.n_entries for t in self.tensors]
        starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        entry_costs = [f * t.block_numel for f, t in zip(self.factors, self.tensors)]
        if self.config.allocation == "global":
            member_lists = [list(range(len(self.tensors)))]
        else:
            member_lists = [[i] for i in range(len(self.tensors))]
        uniform = all(len({entry_costs[i] for i in members}) == 1 for members in member_lists)
        costs = None
        if not uniform:
            costs = torch.cat([torch.full((n,), c, dtype=dtype, device=device) for n, c in zip(sizes, entry_costs)])
        n = starts[-1]
        entries = Entries(
            values=torch.empty(n, dtype=dtype, device=device),
            costs=costs,
            hard=torch.zeros(n, dtype=torch.bool, device=device),
            previous_hard=torch.zeros(n, dtype=torch.bool, device=device),
            flags=torch.empty(n, dtype=torch.uint8, device=device),
            soft=torch.empty(n, dtype=dtype, device=device) if self.method.soft_mask else None,
        )
        groups = []
        for members in member_lists:
            total_cost = sum(entry_costs[i] * sizes[i] for i in members)
            n_group = sum(sizes[i] for i in members)
            groups.append(
                Group(
                    members=members,
                    part=slice(starts[members[0]], starts[members[-1] + 1]),
                    slices=[slice(starts[i], starts[i + 1]) for i in members],
                    unit_cost=entry_costs[members[0]] if uniform else 1.0,
                    total_cost=total_cost,
                    total=float(n_group) if uniform else total_cost,
                    correction=GradientCorrection.on(device) if self.method.global_correction else None,
                )
            )
        return entries, groups

    def _warm_up_kernels(self, device: torch.device, dtype: torch.dtype, with_costs: bool) -> None:
        """Compile the top-k kernels now, not in the first step; every rank then takes the same path."""
        kernels.warm_up(device, dtype, with_costs)
        if self._world() > 1:
            compiled = torch.tensor([kernels.path() == "compiled"], dtype=torch.int32, device=device)
            dist.all_reduce(compiled, op=dist.ReduceOp.MIN, group=self.process_group)
            if not bool(compiled) and kernels.path() == "compiled":
                kernels.set_compile(False, reason="compilation failed on another rank")

    def _world(self) -> int:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(self.process_group)
        return 1

    # -------------------------------------------------------------------------------------- training loop

    def target_density(self, step: int | None = None) -> float:
        """Overall target density (1 − sparsity) at ``step``, in the configured accounting (1 for ``dense``)."""
        if not self.method.attaches_masks:
            return 1.0
        return self.schedule.density(self.step_count if step is None else step)

    def _masked_densities(self, density: float) -> tuple[float, list[float] | None]:
        """For an overall target ``density``: the masked layers' density and, unless global, each layer's."""
        masked = masked_density(density, sum(self.layer_costs), self.unmasked_cost, self.config.accounting)
        shapes = [t.shape for t in self.tensors]
        return masked, layer_densities(shapes, self.layer_costs, masked, self.config.allocation)

    def finish_backward(self) -> None:
        """Apply the method's global gradient term (Spartan's); call after ``backward()``, before
        unscaling/clipping/stepping. A no-op for methods without one and once the masks froze.

        Under DDP the per-group scalars are averaged over ranks (one all-reduce of a device tensor), like the
        gradients. Every rank reduces every group, whether or not its backward reached it, so the collectives
        match. Nothing is read on the host.
        """
        if not self.method.global_correction or self.frozen:
            return
        world = self._world()
        if world == 1 and not any(g.correction.pending for g in self.groups):
            return
        accumulated = torch.stack([g.correction.accumulated() for g in self.groups])
        if world > 1:
            dist.all_reduce(accumulated, group=self.process_group)
            accumulated /= world
        for g, total in zip(self.groups, accumulated.unbind(0)):
            g.correction.apply([(self.tensors[i], self.layers[i].soft) for i in g.members], total)

    def step(self, *, statistics: bool = True) -> dict[str, Any]:
        """Advance one optimizer step: recompute masks from the updated weights; return telemetry.

        Telemetry values are host numbers or 0-dim device tensors (``flip_rate``, ``soft_kept``, ...): read them
        (``float(...)``) only when logging, so a step does not wait for the device. ``statistics=False`` leaves
        out the numbers that cost a pass over every mask (``flip_rate``, and Spartan's ``soft_kept`` and
        ``soft_dropped``): for the steps that are not logged.
        """
        if self.finalized:
            raise RuntimeError("Sparsifier.step() after finalize(): the model no longer carries masks")
        if any(g.correction is not None and g.correction.pending for g in self.groups):
            raise RuntimeError(
                "sparsifier.step() found Spartan gradients without their global correction: call "
                "sparsifier.finish_backward() after loss.backward() and before optimizer.step()"
            )
        if self.groups and self.tensors[0].weight.device != self.entries.values.device:
            raise RuntimeError(
                f"{self.tensors[0].name} moved to {self.tensors[0].weight.device} after the Sparsifier was built on "
                f"{self.entries.values.device}: move the model before creating the Sparsifier"
            )
        self.step_count += 1
        return self._update(statistics)

    def _update(self, statistics: bool = True) -> dict[str, Any]:
        """Masks for the current step from the current weights; freezes them at the freeze step."""
        step = self.step_count
        telemetry = {"step": step, "density_target": self.target_density(step), "frozen": self.frozen}
        if self.frozen or not self.method.attaches_masks:
            return telemetry
        density, per_layer = self._masked_densities(self.target_density(step))
        budgets, betas = [], []
        for group in self.groups:
            layer_density = density if per_layer is None else per_layer[group.members[0]]
            # A one-layer group uses its own block (unstructured after a block fallback); a global one the config's.
            if len(group.members) == 1:
                block_numel = self.tensors[group.members[0]].block_numel
            else:
                block_numel = math.prod(self.config.block)
            budget = layer_density * group.total_cost
            if self.entries.costs is None:
                budget /= group.unit_cost  # the budget becomes a number of entries
            budgets.append(min(budget, group.total))
            betas.append(self.schedule.beta(step, block_numel))
        with torch.no_grad():
            self._write_values()
            if self.method.soft_mask and self.config.beta_scale == "kept_mean":
                betas = [beta / scale for beta, scale in zip(betas, self._kept_value_scales())]
            self.method.select(self.entries, self.groups, budgets, betas, self.config.tol)
            if self.method.soft_mask and self._world() > 1:
                self._agree_on_soft_masks()
            for group, beta in zip(self.groups, betas):
                group.beta = beta
                for i, part in zip(group.members, group.slices):
                    self.method.set_layer(
                        self.layers[i], self.entries, group, part, self.factors[i] * self.tensors[i].block_numel
                    )
        telemetry.update(
            masked_density_target=density,
            beta=self.schedule.beta(step, math.prod(self.config.block)),
            **({"beta_effective": betas[0]} if self.method.soft_mask else {}),
        )
        if statistics:
            flips = torch.count_nonzero(self.entries.hard ^ self.entries.previous_hard)
            telemetry["flip_rate"] = flips / self.entries.hard.numel()
        telemetry.update(self.method.telemetry(self.entries, self.groups, self.layers, statistics))
        if self.schedule.frozen(step):
            self._freeze()
            telemetry["frozen"] = True
        return telemetry

    def _kept_value_scales(self) -> list[float]:
        """Each group's mean unit value over the entries it kept at the previous step (over all of its entries
        before the first selection, or if none is kept; 1 if they are all zero), read from the device once."""
        scales = []
        for group in self.groups:
            values, kept = self.entries.values[group.part], self.entries.hard[group.part]
            n_kept = torch.count_nonzero(kept)
            mean_kept = torch.where(kept, values, 0.0).sum() / n_kept.clamp(min=1)
            scale = torch.where(n_kept > 0, mean_kept, values.mean())
            scales.append(torch.where(scale > 0, scale, 1.0))
        return torch.stack(scales).tolist() if scales else []

    def _write_values(self) -> None:
        """Every group's unit values from the current weights."""
        values = self.entries.values
        for group in self.groups:
            for i, part in zip(group.members, group.slices):
                tensor = self.tensors[i]
                entries = values[part].view(tensor.entry_shape)
                # Blocks are summed in the solver's precision, in one fused pass on the CPU only: on CUDA, Inductor
                # may tune a reduction's order per process, and every rank must get the same values bit for bit.
                fused = tensor.block != (1, 1) and tensor.weight.device.type == "cpu"
                blocks = tensor.blocked(tensor.weight.detach()) if fused else None
                if tensor.block == (1, 1) and tensor.weight.dtype == entries.dtype:
                    torch.abs(tensor.weight, out=entries)  # no temporary: this runs on every weight each step
                elif blocks is not None:
                    kernels.fuse(_block_values_pass, blocks, entries.view(blocks.shape[0], blocks.shape[2], -1))
                else:
                    entries.copy_(tensor.entry_values(tensor.weight.to(entries.dtype)))
            if self.entries.costs is None and group.unit_cost != 1:
                values[group.part] /= group.unit_cost  # unit values
        if self.entries.costs is not None:
            values /= self.entries.costs

    def _agree_on_soft_masks(self) -> None:
        """Every rank takes the first rank's ``λ`` and ``S`` and rewrites its soft masks from them.

        Ranks solve from identical weights, but compiled reductions may sum in a different order per process
        (CUDA autotuning), so their λ and S can differ in the last bits and the ranks would drift apart.
        """
        device = self.entries.values.device
        table = kernels.to_device(torch.tensor([[g.lam or 0.0, 0.0] for g in self.groups], dtype=torch.float64), device)
        table[:, 1] = torch.stack([g.correction.slope_total for g in self.groups])
        src = dist.get_global_rank(self.process_group, 0) if self.process_group is not None else 0
        dist.broadcast(table, src=src, group=self.process_group)
        solved = []  # trivial budgets (no λ) have the same constant mask everywhere
        for k, (group, (lam, slope_total)) in enumerate(zip(self.groups, table.unbind(0))):
            group.correction.slope_total.copy_(slope_total)
            group.agreed_lam = lam
            if group.lam is not None:
                solved.append(k)
        if solved:
            write_soft_masks(
                self.entries.values,
                [self.groups[k].part for k in solved],
                self.entries.costs,
                self.entries.soft,
                torch.stack([table[k, 0] for k in solved]),  # no index tensor sent to the device
                torch.stack([self.groups[k].correction.beta for k in solved]),
            )

    def check_consistency(self) -> None:
        """Stop with an error if the masks differ between data-parallel ranks (a collective: every rank calls it).

        Compares per group ``λ``, ``S``, the kept count, the sum of the kept entries' positions and the sum of
        the soft mask (all exact or computed by the same eager kernels) with one all-reduce of their minima and
        maxima. A no-op in a single process and once frozen masks can no longer change.
        """
        if self._world() == 1 or not self.method.attaches_masks:
            return
        table = torch.stack([self._checksums(g) for g in self.groups])
        extremes = torch.cat([table, -table])
        dist.all_reduce(extremes, op=dist.ReduceOp.MIN, group=self.process_group)
        low, high = extremes[: len(self.groups)], -extremes[len(self.groups) :]
        if bool(torch.equal(low, high)):
            return
        names = ("λ", "S", "kept entries", "kept positions", "soft mask sum")
        for g, (lows, highs) in enumerate(zip(low.tolist(), high.tolist())):
            for name, a, b in zip(names, lows, highs):
                if a != b and not (math.isnan(a) and math.isnan(b)):
                    first = self.tensors[self.groups[g].members[0]].name
                    raise RuntimeError(
                        f"spartan: masks differ between data-parallel ranks (group {g}, starting at {first}): "
                        f"{name} ranges over [{a!r}, {b!r}]; the ranks would train different models"
                    )

    def _checksums(self, group: Group) -> Tensor:
        hard = self.entries.hard[group.part]
        zero = torch.zeros((), dtype=torch.float64, device=hard.device)
        lam = zero if group.agreed_lam is None else group.agreed_lam
        slope = zero if group.correction is None else group.correction.slope_total
        soft = zero if self.entries.soft is None else self.entries.soft[group.part].sum(dtype=torch.float64)
        return torch.stack([lam, slope, torch.count_nonzero(hard).double(), _position_sum(hard), soft])

    def _freeze(self) -> None:
        """Fix the masks: kept entries keep their multiplier (the soft value for Spartan), dropped become 0."""
        self._use_fixed_masks()
        self.prune_optimizer_state(self.optimizer)

    def _use_fixed_masks(self) -> None:
        for layer in self.layers:
            self.method.freeze(layer)
        self.frozen = True

    def prune_optimizer_state(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Zero pruned weights and their optimizer state (momentum, Adam moments) so nothing revives them."""
        with torch.no_grad():
            for tensor, layer in zip(self.tensors, self.layers):
                if layer.keep is None:
                    continue
                alive = tensor.expand(layer.keep != 0).to(tensor.weight.dtype)
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
        if self.method.attaches_masks:
            if not self.frozen:
                self._freeze()
            with torch.no_grad():
                for tensor, layer in zip(self.tensors, self.layers):
                    parametrize.remove_parametrizations(tensor.module, tensor.attr, leave_parametrized=False)
                    tensor.weight.mul_(tensor.expand(layer.keep))
                    tensor.weight.masked_fill_(tensor.weight == 0, 0.0)  # −0.0 (w < 0 times 0) as +0.0: one zero
        self.finalized = True
        return self.model

    # -------------------------------------------------------------------------------------- reporting

    def masks(self) -> dict[str, Tensor]:
        """Each masked weight's current forward multiplier by weight name, shaped like the weight and in its dtype
        (it may be a view of the live masks: clone it to keep it): 1 for kept and 0 for pruned weights, the soft
        value ``m`` of kept weights for Spartan. Empty for ``dense``."""
        return {
            t.name: t.expand(layer.keep).to(t.weight.dtype)
            for t, layer in zip(self.tensors, self.layers)
            if layer.keep is not None
        }

    def report(self, input_shape: tuple[int, ...] | None = None) -> dict[str, Any]:
        """Per-layer and total densities, target vs actual; FLOPs when ``input_shape`` (or config's) is known.

        Densities are fractions of weights kept (nonzero in the effective weight); see :func:`measure_sparsity`
        for the totals. Soft-mask methods add each layer's current ``beta`` (1/unit-value units).
        """
        target, per_layer = self._masked_densities(self.target_density())
        report = _density_report(self.model, self.tensors, self._kept_weights(), input_shape or self.config.input_shape)
        for i, row in enumerate(report["layers"]):
            row["density_target"] = target if per_layer is None else per_layer[i]
        if self.method.soft_mask:
            for group in self.groups:
                for i in group.members:
                    report["layers"][i]["beta"] = group.beta
        report["totals"].update(sparsity_target=1 - self.target_density(), accounting=self.config.accounting)
        return report

    def empty_layers(self) -> list[str]:
        """Names of the masked weights that keep no weight at all (the layer's output no longer depends on its
        input): a collapse, e.g. from a global budget that another layer's larger weights took."""
        return [t.name for t, kept in zip(self.tensors, self._kept_weights()) if kept == 0]

    def fallback_layers(self) -> list[str]:
        """Names of the masked weights masked unstructured by ``block_fallback`` (the block did not divide them)."""
        block = tuple(self.config.block)
        return [t.name for t in self.tensors if block != (1, 1) and t.block != block]

    def sparsity(self) -> dict[str, float]:
        """Actual sparsity now (fractions of zeros): over all parameters and over masked weights (cheap)."""
        totals = _density_report(self.model, self.tensors, self._kept_weights(), None)["totals"]
        return {"sparsity_all": totals["sparsity_all"], "sparsity_masked": totals["sparsity_masked"]}

    def _kept_weights(self) -> list[int]:
        """Weights each masked layer keeps: its hard mask's (blocks × block size), or its nonzero weights once
        finalized or before a mask exists."""
        return [
            int(torch.count_nonzero(t.weight))
            if self.finalized or layer.keep is None
            else int(torch.count_nonzero(layer.keep)) * t.block_numel
            for t, layer in zip(self.tensors, self.layers)
        ]

    # -------------------------------------------------------------------------------------- checkpoints

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "total_steps": self.schedule.total_steps,
            "tensors": [(t.name, tuple(t.shape), t.block) for t in self.tensors],
        }

    def state_dict(self) -> dict[str, Any]:
        """Step, warm starts and (once frozen) the fixed masks; soft masks are recomputed from the weights.

        Masks are stored compactly: hard masks as packed bits, frozen multipliers as the packed bits of the kept
        entries plus their values where those are not all 1 (Spartan's soft values).
        """
        groups = []
        for g in self.groups:
            threshold = None
            if g.warm is not None:
                value, lo, hi, movement = g.warm.tolist()
                threshold = {"threshold": value, "band": (lo, hi), "movement": movement}
            solve = None if g.solve is None else dataclasses.asdict(g.solve)
            groups.append(
                {"lam": g.lam, "solve": solve, "threshold": threshold, "hard": pack_bits(self.entries.hard[g.part])}
            )
        state = {
            "fingerprint": self._fingerprint(),
            "step": self.step_count,
            "frozen": self.frozen,
            "finalized": self.finalized,
            "groups": groups,
        }
        if self.frozen:
            state["frozen_keep"] = [_pack_multiplier(layer.keep) for layer in self.layers]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`. Load the model's weights first: masks are rebuilt from them."""
        mine, theirs = self._fingerprint(), state.get("fingerprint")
        if isinstance(theirs, dict) and isinstance(theirs.get("config"), dict):
            theirs = {**theirs, "config": SparsityConfig.upgrade(theirs["config"])}
        if theirs != mine:
            path, saved, this = first_difference(theirs, mine)
            where = path or "state"
            raise ValueError(
                f"sparsifier state does not match this model/config: {where}: saved {saved!r}, this run {this!r}"
            )
        if state["finalized"]:
            raise ValueError("sparsifier state is from a finalized run; there is nothing to resume")
        self.step_count = state["step"]
        for group, saved in zip(self.groups, state["groups"]):
            group.lam = saved["lam"]
            group.solve = None if saved.get("solve") is None else SoftSolve(**saved["solve"])
            t = saved["threshold"]  # older checkpoints also hold the tied entries and kept cost: not needed
            group.warm = None
            if t is not None:
                warm = torch.tensor([t["threshold"], *t["band"], t.get("movement", 0.0)], dtype=torch.float64)
                group.warm = warm.to(self.entries.values.device)
        if state["frozen"]:
            for tensor, layer, keep in zip(self.tensors, self.layers, state["frozen_keep"]):
                layer.keep = _unpack_multiplier(keep).to(tensor.weight.device)
            self._use_fixed_masks()  # the optimizer state was pruned before it was saved
            return
        self.frozen = False
        for group, saved in zip(self.groups, state["groups"]):  # the next flip rate is measured against these
            self.entries.hard[group.part].copy_(unpack_bits(saved["hard"]).reshape(-1))
        self._update()  # before the freeze step, so this only rebuilds the current masks


def _block_values_pass(blocks: Tensor, out: Tensor) -> None:
    """``out = Σ |w|`` over each block in ``out``'s dtype; ``blocks``: ``(R, bh, C, bw, K)``, ``out``: ``(R, C, K)``."""
    out.copy_(blocks.to(out.dtype).abs().sum(dim=(1, 3)))


def _position_sum(mask: Tensor) -> Tensor:
    """``Σ i`` over the set positions ``i`` of a flat boolean ``mask`` (float64, exact below 2^53), computed
    from row and column counts of a 4096-wide view instead of a vector of positions."""
    width = 4096
    rows = mask.numel() // width
    body = mask[: rows * width].view(rows, width)
    tail = mask[rows * width :]
    # count_nonzero, not sum: summing bools makes an int64 copy of the whole mask first
    per_row, per_column = torch.count_nonzero(body, dim=1).double(), torch.count_nonzero(body, dim=0).double()
    total = (per_row * torch.arange(rows, dtype=torch.float64, device=mask.device)).sum() * width
    total = total + (per_column * torch.arange(width, dtype=torch.float64, device=mask.device)).sum()
    positions = torch.arange(rows * width, mask.numel(), dtype=torch.float64, device=mask.device)
    return total + (tail * positions).sum()


def pack_bits(mask: Tensor) -> dict[str, Any]:
    """A boolean tensor as 8 entries per byte (on the CPU) and its shape; :func:`unpack_bits` inverts it."""
    flat = mask.detach().reshape(-1).to("cpu", torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)]).view(-1, 8)
    bits = (flat << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)
    return {"bits": bits, "shape": tuple(mask.shape)}


def unpack_bits(packed: dict[str, Any] | Tensor) -> Tensor:
    """The boolean tensor :func:`pack_bits` packed (a plain tensor, as older checkpoints hold, is returned as is)."""
    if isinstance(packed, Tensor):
        return packed
    bits = (packed["bits"][:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(-1)[: math.prod(packed["shape"])].view(packed["shape"]).bool()


def _pack_multiplier(keep: Tensor) -> dict[str, Any]:
    kept = keep != 0
    values = keep[kept]
    return {
        "kept": pack_bits(kept),
        "values": None if bool((values == 1).all()) else values.cpu(),
        "dtype": str(keep.dtype),
    }


def _unpack_multiplier(packed: dict[str, Any] | Tensor) -> Tensor:
    if isinstance(packed, Tensor):
        return packed
    kept = unpack_bits(packed["kept"])
    keep = torch.zeros(kept.shape, dtype=getattr(torch, packed["dtype"].removeprefix("torch.")))
    keep[kept] = 1 if packed["values"] is None else packed["values"].to(keep.dtype)
    return keep


def measure_sparsity(
    model: nn.Module, config: SparsityConfig, input_shape: tuple[int, ...] | None = None
) -> dict[str, Any]:
    """The :meth:`Sparsifier.report` of a plain model (e.g. a finalized one, loaded from disk): zeros counted in
    the weights ``config`` selects (its ``include``/``exclude``/``block``), FLOPs when ``input_shape`` is given.

    Totals: ``params`` / ``params_kept`` count every parameter of the model (all / nonzero-kept), ``params_masked``
    / ``params_masked_kept`` the masked weights; ``sparsity_all`` and ``sparsity_masked`` are the fractions of
    zeros over each; FLOPs are multiply-adds per sample in the masked layers.
    """
    tensors = find_masked_tensors(
        model, include=config.include, exclude=config.exclude, block=config.block, block_fallback=config.block_fallback
    )
    report = _density_report(
        model, tensors, [int(torch.count_nonzero(t.weight)) for t in tensors], input_shape or config.input_shape
    )
    report["totals"]["accounting"] = config.accounting
    return report


def _density_report(
    model: nn.Module, tensors: list[MaskedTensor], kept: list[int], input_shape: tuple[int, ...] | None
) -> dict[str, Any]:
    flops = flops_per_weight(model, tensors, input_shape) if input_shape else None
    layers = []
    for i, tensor in enumerate(tensors):
        numel = tensor.weight.numel()
        row = {
            "name": tensor.name,
            "shape": tuple(tensor.shape),
            "block": tensor.block,
            "density": kept[i] / numel,
            "params": numel,
            "params_kept": kept[i],
        }
        if flops is not None:
            row["flops_dense"], row["flops_sparse"] = flops[i] * numel, flops[i] * kept[i]
        layers.append(row)
    masked_total, masked_kept = sum(r["params"] for r in layers), sum(kept)
    all_params = sum(p.numel() for p in model.parameters())
    all_kept = all_params - masked_total + masked_kept
    totals = {
        "sparsity_masked": 1 - masked_kept / masked_total if masked_total else 0.0,
        "sparsity_all": 1 - all_kept / all_params,
        "params": all_params,
        "params_kept": all_kept,
        "params_masked": masked_total,
        "params_masked_kept": masked_kept,
    }
    if flops is not None:
        dense = sum(r["flops_dense"] for r in layers)
        totals.update(flops_dense=dense, flops_sparse=sum(r["flops_sparse"] for r in layers))
        totals["flops_reduction"] = dense / max(totals["flops_sparse"], 1)
    return {"layers": layers, "totals": totals}
