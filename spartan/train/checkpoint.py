"""The training checkpoint: this module owns its format — version, contents, saving, loading, checks, restoring.

A checkpoint (``<run dir>/checkpoints/last.pt``) is a dict of tensors, numbers and strings (it loads with
``torch.load(weights_only=True)``) in format :data:`FORMAT`:

- ``format``, ``epoch``, ``step``, ``progress`` (epoch, step, training seconds, images), ``val`` (the last
  validation metrics), ``steps_per_epoch``, ``amp`` (the autocast dtype);
- ``model``, ``optimizer``, ``lr_schedule``, ``scaler`` and ``sparsifier`` state dicts (the model's keys of masked
  weights are ``<module>.parametrizations.weight.original`` while masks are attached);
- ``train_config`` (the validated config as a dict), ``config`` (the resolved Hydra config), ``git``, ``env``.

No random state is stored: every epoch's randomness is re-derived from the seed (:mod:`spartan.train.seeding`).
Training writes it (:meth:`Checkpoint.capture`, :meth:`Checkpoint.save`), resume reads and checks it
(:meth:`Checkpoint.load`, :meth:`Checkpoint.check_resume`, :meth:`Checkpoint.restore`), and ``eval.py`` turns it
into the plain sparse model training would have ended with (:func:`load_weights`, :meth:`Checkpoint.final_model`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spartan import compressed
from spartan.config import SparsityConfig, first_difference
from spartan.train.config import TrainConfig
from spartan.train.errors import ConfigError
from spartan.train.files import atomic_save
from spartan.train.models import build_sparsifier
from spartan.train.provenance import environment, git_version

FORMAT = "spartan.checkpoint/1"
LAST = Path("checkpoints") / "last.pt"

RESUME_MUST_MATCH = ("model", "sparsity", "schedule", "optim", "seed")
"""Config sections a resumed run must share with its checkpoint (logging, devices, workers, cadence may change)."""


def _read(path: Path, purpose: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"{purpose}: {str(path)!r} is not a readable checkpoint ({load_failure(err)})") from err


def _with_new_fields(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``train_config`` with the keys its sections' schemas gained since it was written set to their
    defaults (a new key's default is the behaviour before it existed)."""
    defaults = {
        f.name: dataclasses.asdict(f.default_factory())
        for f in dataclasses.fields(TrainConfig)
        if f.name in RESUME_MUST_MATCH and f.default_factory is not dataclasses.MISSING
    }
    return {
        **saved,
        **{name: {**defaults[name], **saved[name]} for name in defaults if isinstance(saved.get(name), dict)},
    }


def load_failure(err: Exception) -> str:
    """``Type: message`` of a failed ``torch.load``; of the weights-only unpickler's long message, its reason."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _is_checkpoint(state: Any) -> bool:
    return isinstance(state, dict) and isinstance(state.get("format"), str) and state["format"].startswith("spartan.")


class Checkpoint:
    """One training checkpoint in memory (``state``, the dict described in the module docstring)."""

    def __init__(self, state: dict[str, Any], path: Path | None = None):
        self.state, self.path = state, path

    @classmethod
    def capture(
        cls,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_schedule: Any,
        scaler: torch.amp.GradScaler,
        sparsifier: Any,
        progress: dict[str, Any],
        amp_dtype: torch.dtype | None,
        train_config: dict[str, Any],
        run_config: dict[str, Any],
        steps_per_epoch: int,
        val: dict[str, float],
        world: int,
        within_epoch: dict[str, Any] | None = None,
    ) -> Checkpoint:
        """The state of a run between two optimizer steps (``within_epoch``: what a mid-epoch one adds)."""
        return cls(
            {
                "format": FORMAT,
                "epoch": progress["epoch"],
                "step": progress["step"],
                "progress": progress,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_schedule": lr_schedule.state_dict(),
                "scaler": scaler.state_dict(),
                "sparsifier": sparsifier.state_dict(),
                "amp": str(amp_dtype),
                "train_config": train_config,
                "config": run_config,
                "steps_per_epoch": steps_per_epoch,
                "val": val,
                "git": git_version(),
                "env": environment(world),
                **({"within_epoch": within_epoch} if within_epoch is not None else {}),
            }
        )

    def save(self, path: Path) -> None:
        atomic_save(self.state, path)

    @classmethod
    def load(cls, path: Path, purpose: str = "resume") -> Checkpoint:
        """A training checkpoint from ``path``; a :class:`ConfigError` (prefixed ``purpose``) for anything else."""
        return cls._checked(_read(path, purpose), path, purpose)

    @classmethod
    def _checked(cls, state: Any, path: Path, purpose: str) -> Checkpoint:
        if not _is_checkpoint(state):
            raise ConfigError(f"{purpose}: {str(path)!r} is not a spartan training checkpoint (format {FORMAT})")
        if state["format"] != FORMAT:
            raise ConfigError(
                f"{purpose}: {str(path)!r} has checkpoint format {state['format']!r}; this version reads {FORMAT!r}"
            )
        return cls(state, path)

    @property
    def step(self) -> int:
        return self.state["step"]

    def check_resume(
        self, train_config: dict[str, Any], amp_dtype: torch.dtype | None, trainer_amp: str, steps_per_epoch: int
    ) -> None:
        """A :class:`ConfigError` naming the first key in which this run differs from the checkpoint's, if any."""
        self.check_config(train_config)
        where = self.path
        if self.state["amp"] != str(amp_dtype):
            raise ConfigError(
                f"resume: {where} was trained with autocast dtype {self.state['amp']}, trainer.amp={trainer_amp} "
                f"gives {amp_dtype} here (keep the precision)"
            )
        if self.state["steps_per_epoch"] != steps_per_epoch:
            raise ConfigError(
                f"resume: {where} has {self.state['steps_per_epoch']} steps per epoch, this run {steps_per_epoch} "
                f"(keep data.batch_size × processes × trainer.accumulate)"
            )

    def check_config(self, train_config: dict[str, Any]) -> None:
        """The config sections a resumed run must share (:data:`RESUME_MUST_MATCH`), compared with this one's."""
        saved = _with_new_fields(self.state["train_config"])
        for section in RESUME_MUST_MATCH:
            if saved[section] != train_config[section]:
                key, before, now = first_difference(saved[section], train_config[section], section)
                raise ConfigError(
                    f"resume: {self.path} was trained with {key}={before!r}, this run has {key}={now!r} (resume "
                    f"with the same value, or start a new run)"
                )

    def restore(
        self,
        *,
        model: nn.Module,
        sparsifier: Any,
        optimizer: torch.optim.Optimizer,
        lr_schedule: Any,
        scaler: torch.amp.GradScaler,
    ) -> tuple[dict[str, Any], dict[str, float], dict[str, Any] | None]:
        """Load every state into the built objects; return ``(progress, val metrics, within_epoch)``."""
        model.load_state_dict(self.state["model"])
        sparsifier.load_state_dict(self.state["sparsifier"])  # after the weights: masks are rebuilt from them
        optimizer.load_state_dict(self.state["optimizer"])
        lr_schedule.load_state_dict(self.state["lr_schedule"])
        scaler.load_state_dict(self.state["scaler"])
        return self.state["progress"], self.state["val"], self.state.get("within_epoch")

    def final_model(self, model: nn.Module, sparsity: SparsityConfig) -> nn.Module:
        """``model`` (freshly built, like the checkpoint's) with these weights, the masks frozen and baked in as if
        training had ended here."""
        total_steps = self.state["sparsifier"]["fingerprint"]["total_steps"]
        sparsifier = build_sparsifier(model, sparsity, total_steps)
        model.load_state_dict(self.state["model"])
        sparsifier.load_state_dict(self.state["sparsifier"])
        return sparsifier.finalize()


def load_weights(path: Path) -> Checkpoint | dict[str, torch.Tensor]:
    """A weights file for evaluation: a training :class:`Checkpoint`, or a plain state_dict (``model_final.pt``,
    or a compressed ``model_sparse.pt``, expanded)."""
    state = _read(path, "checkpoint")
    if compressed.is_compressed(state):
        return compressed.decompress(state)
    return Checkpoint._checked(state, path, "checkpoint") if _is_checkpoint(state) else state
