"""Typed schemas of the trainer's config groups, declared once and validated when instantiated.

Hydra composes ``configs/`` against :class:`TrainConfig` / :class:`EvalConfig` (types and keys are checked at
composition); ``spartan.train.cli.to_dataclass`` turns the composed config into these dataclasses, whose
``__post_init__`` checks values. Every error names the key as users type it (``optim.lr``) and the value.
The ``sparsity`` schema is the library's :class:`spartan.SparsityConfig`; each ``data=`` option has its own schema,
declared with its backend (:mod:`spartan.train.data.backends`). This module does not import Hydra (only
OmegaConf's ``MISSING``): the entry points register the schemas (:func:`register`).
"""

from __future__ import annotations

import hashlib
import typing
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any

from omegaconf import MISSING, OmegaConf

from spartan.config import SparsityConfig
from spartan.train.data import DataConfig, all_backends
from spartan.train.errors import ConfigError, choice, finite, flag, positive_int

MODEL_SOURCES = ("builtin", "torchvision", "timm")
LR_SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("sgd", "adamw")
AMP_MODES = ("auto", "none", "bf16", "fp16")
LOGGERS = ("wandb", "none")
WANDB_MODES = ("auto", "online", "offline", "disabled")


@dataclass
class ModelConfig:
    """The network: a builtin, a torchvision model or a timm model, by name; ``num_classes`` comes from the data."""

    name: str = "digits_cnn"
    source: str = "builtin"
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra constructor arguments, e.g. drop_path_rate

    def __post_init__(self) -> None:
        choice("model.source", self.source, MODEL_SOURCES)
        if not self.name:
            raise ConfigError("model.name must be a model name, got an empty string")


@dataclass
class ScheduleConfig:
    """Length of training and the per-step learning-rate schedule (linear warm-up, then decay).

    The sparsity phases (density warm-up, β annealing, freeze) are fractions of the same steps and live in
    ``sparsity.*`` (``warmup_frac``, ``finetune_frac``, ``beta_init``, ``beta_final``).
    """

    epochs: int = 30
    warmup_epochs: float = 0.0  # learning-rate warm-up, from 0 to the peak
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.0  # the decay ends at min_lr_ratio × peak lr

    def __post_init__(self) -> None:
        positive_int("schedule.epochs", self.epochs)
        finite("schedule.warmup_epochs", self.warmup_epochs, 0.0)
        if self.warmup_epochs > self.epochs:
            raise ConfigError(
                f"schedule.warmup_epochs must be <= schedule.epochs = {self.epochs}, got {self.warmup_epochs!r}"
            )
        choice("schedule.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")


@dataclass
class OptimConfig:
    """Optimizer. ``lr`` is the peak rate at a global batch of ``lr_reference_batch`` (scaled linearly to the
    actual global batch = batch_size × processes × accumulation), or the rate as given when that is null."""

    name: str = "sgd"
    lr: float = 0.1
    lr_reference_batch: int | None = None
    momentum: float = 0.9
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 5e-4
    decay_norms_and_biases: bool = False  # the paper's recipes exclude 1-D parameters from weight decay

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        choice("optim.name", self.name, OPTIMIZERS)
        finite("optim.lr", self.lr, 0.0, low_inclusive=False)
        if self.lr_reference_batch is not None:
            positive_int("optim.lr_reference_batch", self.lr_reference_batch)
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.momentum must be in [0, 1), got {self.momentum!r}")
        if self.nesterov and self.name == "sgd" and self.momentum == 0:
            raise ConfigError("optim.nesterov=true needs optim.momentum > 0, got 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)!r}")
        finite("optim.eps", self.eps, 0.0, low_inclusive=False)
        finite("optim.weight_decay", self.weight_decay, 0.0)


@dataclass
class TrainerConfig:
    """How steps run: device, precision, memory format, compilation, clipping, accumulation, cadence.

    ``cudnn_benchmark``: cuDNN autotunes the convolution algorithms for each new input shape (faster for the fixed
    shapes of a training run; the chosen algorithms, and thus rounding, may differ between runs); CUDA only,
    ignored on the CPU (:func:`spartan.train.device.configure_backend`)."""

    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:N
    amp: str = "auto"  # auto: bf16 on CUDA, none on CPU
    channels_last: bool = False
    compile: bool = False
    cudnn_benchmark: bool = False  # cuDNN autotuning (CUDA only)
    grad_clip: float | None = None  # max global gradient norm; null = off
    accumulate: int = 1  # micro-batches per optimizer step
    label_smoothing: float = 0.1
    eval_every: int = 1  # epochs between validations (the last epoch is always validated)
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch always writes one)
    checkpoint_every_steps: int | None = None  # also a checkpoint every N optimizer steps (mid-epoch)
    checkpoint_every_minutes: float | None = None  # also a checkpoint when this long has passed since the last one
    log_every: int = 10  # optimizer steps between logged training metrics (and progress lines without a terminal)
    stop_after_epochs: int | None = None  # end this job after N epochs (checkpointed); continue with resume=auto
    threads: int | None = None  # CPU threads for torch (default: torch's choice)

    def __post_init__(self) -> None:
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"trainer.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        choice("trainer.amp", self.amp, AMP_MODES)
        for key in ("channels_last", "compile", "cudnn_benchmark"):
            flag(f"trainer.{key}", getattr(self, key))
        if self.grad_clip is not None:
            finite("trainer.grad_clip", self.grad_clip, 0.0, low_inclusive=False)
        for key in ("accumulate", "eval_every", "checkpoint_every", "log_every"):
            positive_int(f"trainer.{key}", getattr(self, key))
        for key in ("threads", "stop_after_epochs", "checkpoint_every_steps"):
            if getattr(self, key) is not None:
                positive_int(f"trainer.{key}", getattr(self, key))
        if self.checkpoint_every_minutes is not None:
            finite("trainer.checkpoint_every_minutes", self.checkpoint_every_minutes, 0.0, low_inclusive=False)
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"trainer.label_smoothing must be in [0, 1), got {self.label_smoothing!r}")


@dataclass
class LoggerConfig:
    """Where metrics go besides ``metrics.jsonl`` (always written). W&B ``auto``: online when an API key is
    configured, else offline (sync later with ``wandb sync``)."""

    name: str = "wandb"
    project: str = "spartan"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = "auto"
    init_timeout: float = 60.0  # seconds an online start may take before auto mode falls back to offline

    def __post_init__(self) -> None:
        choice("logger.name", self.name, LOGGERS)
        choice("logger.mode", self.mode, WANDB_MODES)
        finite("logger.init_timeout", self.init_timeout, 0.0, low_inclusive=False)


@dataclass
class TrainConfig:
    """Everything ``train.py`` needs; one field per config group plus the run-level keys."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = MISSING  # the schema of the chosen data= option (configs/data/<option>.yaml)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    name: str = "run"
    seed: int = 0
    resume: str | None = None  # auto (this run dir's last checkpoint, if any), a checkpoint file or a run dir

    def __post_init__(self) -> None:
        if not isinstance(self.data, DataConfig):  # Hydra always fills it; TrainConfig() built in code does not
            raise ConfigError(f"data must be a data option's schema (e.g. DigitsConfig()), got {self.data!r}")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.resume == "":
            raise ConfigError("resume must be auto, a checkpoint file or a run directory, got ''")


def _overrides(name: str, *schemas: type) -> type:
    """Every field of ``schemas`` optional and unset: the keys a command may override, checked by name."""
    optional = {}
    for schema in schemas:
        hints = typing.get_type_hints(schema)
        for f in fields(schema):
            optional.setdefault(f.name, (f.name, hints[f.name] | None, field(default=None)))
    return make_dataclass(name, list(optional.values()))


# eval.py may override a key of any data= option; the run's own option is checked when the configs are merged.
DataOverrides = _overrides("DataOverrides", *(b.schema for b in all_backends().values()))
TrainerOverrides = _overrides("TrainerOverrides", TrainerConfig)


@dataclass
class EvalConfig:
    """What ``eval.py`` evaluates: a run directory's final model, or a checkpoint; data/trainer override the run's."""

    run_dir: str | None = None
    checkpoint: str | None = None  # model_final.pt or a training checkpoint; its run dir supplies the config
    data: DataOverrides = field(default_factory=DataOverrides)  # e.g. data.path=..., data.batch_size=...
    trainer: TrainerOverrides = field(default_factory=TrainerOverrides)  # e.g. trainer.device=cpu

    def __post_init__(self) -> None:
        if not self.run_dir and not self.checkpoint:
            raise ConfigError("eval needs run_dir=<a training run directory> or checkpoint=<a .pt file>")


def job_dirname(overrides: str, limit: int = 160) -> str:
    """A sweep job's directory name from its overrides (``hydra.job.override_dirname``), shortened with a hash when
    too long for a file name."""
    if len(overrides) <= limit:
        return overrides
    return f"{overrides[: limit - 9]}-{hashlib.sha1(overrides.encode()).hexdigest()[:8]}"


def register(store: Any) -> None:
    """Register the schemas with a Hydra ``ConfigStore``: ``train_schema`` / ``eval_schema`` (which ``train.yaml`` /
    ``eval.yaml`` list first) and ``data/<name>_schema`` for every backend (which ``configs/data/<name>.yaml``
    lists first, so a key of another backend fails at composition); and the ``job_dirname`` resolver."""
    OmegaConf.register_new_resolver("job_dirname", job_dirname, replace=True)
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="eval_schema", node=EvalConfig)
    for name, backend in all_backends().items():
        store.store(group="data", name=f"{name}_schema", node=backend.schema)
