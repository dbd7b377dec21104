"""Typed schemas of the trainer's config groups, declared once and validated when instantiated.

Hydra composes ``configs/`` against :class:`TrainConfig` / :class:`EvalConfig` (types and keys are checked at
composition); ``spartan.train.cli.to_dataclass`` turns the composed config into these dataclasses, whose
``__post_init__`` checks values. Every error names the key as users type it (``optim.lr``) and the value.
This module does not import Hydra: the entry points register the schemas (:func:`register`).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, Optional

from spartan.config import SparsityConfig

MODEL_SOURCES = ("builtin", "torchvision", "timm")
DATASETS = ("digits", "synthetic", "imagefolder", "ffcv", "webdataset")
AUTO_AUGMENTS = ("none", "randaugment", "trivialaugment")
LR_SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("sgd", "adamw")
AMP_MODES = ("auto", "none", "bf16", "fp16")
LOGGERS = ("wandb", "none")
WANDB_MODES = ("auto", "online", "offline", "disabled")


class ConfigError(ValueError):
    """An invalid config value; the message names the key and the value."""


def _positive_int(key: str, value: Any) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise ConfigError(f"{key} must be an integer > 0, got {value!r}")


def _finite(key: str, value: Any, low: float, *, low_inclusive: bool = True) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= low if low_inclusive else value > low)
    if not ok:
        raise ConfigError(f"{key} must be a finite number {'>=' if low_inclusive else '>'} {low:g}, got {value!r}")


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {allowed}, got {value!r}")


@dataclass
class ModelConfig:
    """The network: a builtin, a torchvision model or a timm model, by name; ``num_classes`` comes from the data."""

    name: str = "digits_cnn"
    source: str = "builtin"
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra constructor arguments, e.g. drop_path_rate

    def __post_init__(self) -> None:
        _choice("model.source", self.source, MODEL_SOURCES)
        if not self.name:
            raise ConfigError("model.name must be a model name, got an empty string")


@dataclass
class DataConfig:
    """Where images come from, how they are augmented and batched. ``batch_size`` is per device (per process).

    ``path``: imagefolder — a folder with ``train/<class>/*`` and ``val/<class>/*``; ffcv — the folder holding
    ``train.beton`` and ``val.beton``; webdataset — a folder holding ``train/*.tar`` and ``val/*.tar``.
    ``train_path`` / ``val_path`` name the files (ffcv) or shard URLs/patterns with braces (webdataset) instead.
    """

    name: str = "digits"
    path: str | None = None
    train_path: str | None = None
    val_path: str | None = None
    batch_size: int = 64
    val_batch_size: int | None = None  # default: batch_size
    num_workers: int = 0
    channels: int = 1
    image_size: int = 8  # training and validation resolution in pixels (ffcv: the final one, see min_res)
    val_crop_ratio: float = 0.875  # resize to image_size / ratio (256 for 224), then center-crop image_size
    interpolation: str = "bicubic"
    min_scale: float = 0.08  # RandomResizedCrop's smallest crop, as a fraction of the image area
    hflip: bool = False
    auto_augment: str = "none"  # none | randaugment | trivialaugment
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    random_erasing: float = 0.0  # probability per image
    mixup_alpha: float = 0.0  # Mixup / CutMix: with both > 0, one of the two per batch (soft targets)
    cutmix_alpha: float = 0.0
    repeated_augment: int = 1  # > 1: each image repeated this often per epoch, in different processes
    num_classes: int = 10  # synthetic, ffcv, webdataset (digits has 10, imagefolder counts its class folders)
    train_size: int | None = None  # synthetic: images per epoch; webdataset: images in the shards (else counted)
    val_size: int | None = None
    val_fraction: float = 0.25  # digits only: stratified hold-out
    shuffle_buffer: int = 5000  # webdataset: samples shuffled in memory (after shard shuffling)
    os_cache: bool = False  # ffcv: read through the OS page cache (dataset fits in RAM) instead of its own
    min_res: int | None = None  # ffcv progressive resizing: from min_res ...
    ramp_start_epoch: int = 0  # ... held until this epoch, then linearly to image_size ...
    ramp_end_epoch: int = 0  # ... reached at this epoch (multiples of 32 px in between)
    dtype: str = "float32"  # ffcv: images handed to the model as float32, float16 or bfloat16
    pin_memory: bool = True
    persistent_workers: bool = False  # true saves worker start-up per epoch, but a resumed run's augmentation differs

    def __post_init__(self) -> None:
        _choice("data.name", self.name, DATASETS)
        _positive_int("data.batch_size", self.batch_size)
        for key in ("val_batch_size", "train_size", "val_size", "min_res"):
            if getattr(self, key) is not None:
                _positive_int(f"data.{key}", getattr(self, key))
        if not (isinstance(self.num_workers, int) and self.num_workers >= 0):
            raise ConfigError(f"data.num_workers must be an integer >= 0, got {self.num_workers!r}")
        for key in ("random_erasing", "mixup_alpha", "cutmix_alpha", "ramp_start_epoch", "ramp_end_epoch"):
            _finite(f"data.{key}", getattr(self, key), 0.0)
        for key in ("channels", "image_size", "num_classes", "repeated_augment", "randaugment_ops",
                    "shuffle_buffer"):
            _positive_int(f"data.{key}", getattr(self, key))
        if not 0 <= self.randaugment_magnitude <= 30:
            raise ConfigError(f"data.randaugment_magnitude must be in [0, 30], got {self.randaugment_magnitude!r}")
        if self.min_res is not None and self.ramp_end_epoch <= 0:
            raise ConfigError(f"data.min_res={self.min_res} needs data.ramp_end_epoch > 0 (the epoch at which the "
                              f"resolution reaches data.image_size), got {self.ramp_end_epoch}")
        for key in ("val_crop_ratio", "min_scale"):
            if not 0 < getattr(self, key) <= 1:
                raise ConfigError(f"data.{key} must be in (0, 1], got {getattr(self, key)!r}")
        if self.random_erasing > 1:
            raise ConfigError(f"data.random_erasing must be a probability in [0, 1], got {self.random_erasing!r}")
        _choice("data.interpolation", self.interpolation, ("bilinear", "bicubic", "nearest"))
        _choice("data.auto_augment", self.auto_augment, AUTO_AUGMENTS)
        _choice("data.dtype", self.dtype, ("float32", "float16", "bfloat16"))
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if self.ramp_end_epoch < self.ramp_start_epoch:
            raise ConfigError(f"data.ramp_end_epoch must be >= data.ramp_start_epoch = {self.ramp_start_epoch}, "
                              f"got {self.ramp_end_epoch}")
        if self.name == "imagefolder" and not self.path:
            raise ConfigError(f"data.path must name a dataset folder for data={self.name}, got {self.path!r}")
        if self.name in ("ffcv", "webdataset"):
            if not self.path and not (self.train_path and self.val_path):
                raise ConfigError(f"data.path must name a dataset folder for data={self.name}, got {self.path!r}")
        if self.name == "synthetic" and (self.train_size is None or self.val_size is None):
            raise ConfigError("data=synthetic needs data.train_size and data.val_size (images per epoch)")


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
        _positive_int("schedule.epochs", self.epochs)
        _finite("schedule.warmup_epochs", self.warmup_epochs, 0.0)
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"schedule.warmup_epochs must be <= schedule.epochs = {self.epochs}, "
                              f"got {self.warmup_epochs!r}")
        _choice("schedule.lr_schedule", self.lr_schedule, LR_SCHEDULES)
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
        _choice("optim.name", self.name, OPTIMIZERS)
        _finite("optim.lr", self.lr, 0.0, low_inclusive=False)
        if self.lr_reference_batch is not None:
            _positive_int("optim.lr_reference_batch", self.lr_reference_batch)
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.momentum must be in [0, 1), got {self.momentum!r}")
        if self.nesterov and self.name == "sgd" and self.momentum == 0:
            raise ConfigError("optim.nesterov=true needs optim.momentum > 0, got 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)!r}")
        _finite("optim.eps", self.eps, 0.0, low_inclusive=False)
        _finite("optim.weight_decay", self.weight_decay, 0.0)


@dataclass
class TrainerConfig:
    """How steps run: device, precision, memory format, compilation, clipping, accumulation, cadence."""

    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:N
    amp: str = "auto"  # auto: bf16 on CUDA, none on CPU
    channels_last: bool = False
    compile: bool = False
    grad_clip: float | None = None  # max global gradient norm; null = off
    accumulate: int = 1  # micro-batches per optimizer step
    label_smoothing: float = 0.1
    eval_every: int = 1  # epochs between validations (the last epoch is always validated)
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch always writes one)
    log_every: int = 10  # optimizer steps between logged training metrics
    stop_after_epochs: int | None = None  # end this job after N epochs (checkpointed); continue with resume=auto
    threads: int | None = None  # CPU threads for torch (default: torch's choice)

    def __post_init__(self) -> None:
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"trainer.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _choice("trainer.amp", self.amp, AMP_MODES)
        if self.grad_clip is not None:
            _finite("trainer.grad_clip", self.grad_clip, 0.0, low_inclusive=False)
        for key in ("accumulate", "eval_every", "checkpoint_every", "log_every"):
            _positive_int(f"trainer.{key}", getattr(self, key))
        for key in ("threads", "stop_after_epochs"):
            if getattr(self, key) is not None:
                _positive_int(f"trainer.{key}", getattr(self, key))
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
        _choice("logger.name", self.name, LOGGERS)
        _choice("logger.mode", self.mode, WANDB_MODES)
        _finite("logger.init_timeout", self.init_timeout, 0.0, low_inclusive=False)


@dataclass
class TrainConfig:
    """Everything ``train.py`` needs; one field per config group plus the run-level keys."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    name: str = "run"
    seed: int = 0
    resume: str | None = None  # auto (this run dir's last checkpoint, if any), a checkpoint file or a run dir

    def __post_init__(self) -> None:
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.resume == "":
            raise ConfigError("resume must be auto, a checkpoint file or a run directory, got ''")


def _overrides(schema: type) -> type:
    """``schema`` with every field optional and unset: the keys a command may override, checked by name."""
    hints = typing.get_type_hints(schema)
    return make_dataclass(f"{schema.__name__}Overrides",
                          [(f.name, Optional[hints[f.name]], field(default=None)) for f in fields(schema)])


DataOverrides = _overrides(DataConfig)
TrainerOverrides = _overrides(TrainerConfig)


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


def register(store: Any) -> None:
    """Register the schemas with a Hydra ``ConfigStore`` (``train.yaml`` / ``eval.yaml`` list them first)."""
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="eval_schema", node=EvalConfig)
