"""The training run, top to bottom: check and build everything, start, train, validate, checkpoint, finalize.

:class:`Run` builds every object and checks every input first, writing nothing (a bad value or an incompatible
checkpoint fails before the first step and leaves an existing run untouched); :meth:`Run.start` then writes the
run directory, starts W&B and wraps the model for DDP. Ordering that matters: model placed → optimizer →
Sparsifier → resume → compile → DDP; each step is forward → backward → ``sparsifier.finish_backward()`` →
unscale/clip → optimizer step → ``sparsifier.step()`` (:meth:`Run.optimizer_step`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from spartan import kernels
from spartan.train.checkpoint import LAST, Checkpoint
from spartan.train.config import TrainConfig
from spartan.train.data import Loaders, build_loaders
from spartan.train.data.transforms import batch_mixer
from spartan.train.device import (
    autocast,
    configure_backend,
    describe_device,
    memory_format,
    resolve_amp,
    resolve_device,
)
from spartan.train.distributed import (
    all_reduce_sum,
    any_process,
    broadcast_flag,
    current_process,
    gather_to_main,
    sync_buffers,
)
from spartan.train.errors import ConfigError
from spartan.train.evaluation import evaluate, sparsity_fields, test_fields
from spartan.train.files import atomic_save, atomic_write_text
from spartan.train.lifecycle import AlreadyFinished, Interrupted, StopSignals, precedence, signal_of
from spartan.train.models import build_model, build_sparsifier
from spartan.train.optim import build_lr_schedule, build_optimizer, peak_lr
from spartan.train.provenance import environment, git_version
from spartan.train.run_dir import check_fresh_run_dir, finished, resolve_resume, truncate_metrics
from spartan.train.seeding import derive_seed, rng_state, seed_everything, set_rng_state
from spartan.train.tracking import MetricLogger, resolve_wandb_mode, shown

log = logging.getLogger("spartan.train")


@dataclasses.dataclass
class Progress:
    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimizer steps
    epoch_step: int = 0  # optimizer steps completed in the current epoch (> 0 in a mid-epoch checkpoint)
    train_seconds: float = 0.0
    images: int = 0  # training images processed, all processes together
    skipped_images: int = 0  # unreadable training images dropped, all processes together


class Run:
    """One training run: :meth:`start` it, :meth:`fit` trains, :meth:`finish` finalizes and reports."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: Path,
        *,
        files: dict[str, str] | None = None,
        run_config: dict[str, Any] | None = None,
    ):
        self.start_time = time.perf_counter()
        self.config, self.run_dir, self.files = config, Path(run_dir), files or {}
        self.run_config = run_config if run_config is not None else dataclasses.asdict(config)
        self.process = current_process()
        self.is_main = self.process.is_main
        if config.resume == "auto" and broadcast_flag(self.is_main and finished(self.run_dir)):
            if (self.run_dir / LAST).is_file():  # the same run, or another one in the same directory?
                Checkpoint.load(self.run_dir / LAST).check_config(dataclasses.asdict(config))
            raise AlreadyFinished(f"{self.run_dir} holds a finished run (model_final.pt, summary.json)")
        trainer = config.trainer
        self.device = resolve_device(trainer.device, self.process)
        self.backend = configure_backend(self.device, trainer.cudnn_benchmark)  # cuDNN autotuning on CUDA
        self.amp_dtype = resolve_amp(trainer.amp, self.device, config.data.image_dtype())
        # Rank 0 decides (the ranks' filesystems may differ); a fresh run must not overwrite an earlier one.
        resume_path = resolve_resume(config.resume, self.run_dir) if self.is_main else None
        if broadcast_flag(resume_path is not None) and not self.is_main:
            resume_path = resolve_resume(config.resume, self.run_dir) or self.run_dir / LAST
        if resume_path is None and config.resume != "auto" and self.is_main:
            check_fresh_run_dir(self.run_dir)
        self.resume_path = resume_path
        # The checkpoint's config is compared before anything expensive (data, model, kernel compilation).
        checkpoint = Checkpoint.load(resume_path) if resume_path is not None else None
        if checkpoint is not None:
            checkpoint.check_config(dataclasses.asdict(config))
        self.wandb_mode = resolve_wandb_mode(config.logger) if self.is_main else None
        if trainer.threads:
            torch.set_num_threads(trainer.threads)
        seed_everything(config.seed)  # the model's initial weights: the same on every process
        self.loaders: Loaders = build_loaders(
            config.data, rank=self.process.rank, world=self.process.world, seed=config.seed, device=self.device
        )
        info = self.loaders.info
        self.mix = batch_mixer(config.data, info.num_classes)  # Mixup/CutMix: the same for every backend
        self.memory_format = memory_format(trainer.channels_last)
        model = build_model(config.model, info.num_classes, info.input_shape[0]).to(self.device)
        self.model = model.to(memory_format=self.memory_format)
        self.steps_per_epoch = len(self.loaders.train) // trainer.accumulate
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"trainer.accumulate={trainer.accumulate} exceeds the {len(self.loaders.train)} batches of an epoch"
            )
        self.total_steps = self.steps_per_epoch * config.schedule.epochs
        self.global_batch = config.data.batch_size * self.process.world * trainer.accumulate
        self.optimizer = build_optimizer(self.model, config.optim, peak_lr(config.optim, self.global_batch))
        self.sparsifier = build_sparsifier(self.model, config.sparsity, self.total_steps, self.optimizer)
        self.warned_empty: set[str] = set()  # layers already warned about for keeping no weights
        self.lr_schedule = build_lr_schedule(self.optimizer, config.schedule, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype is torch.float16)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=trainer.label_smoothing)
        self.progress = Progress()
        self.val_metrics: dict[str, float] = {}
        self.within_epoch: dict[str, Any] | None = None  # this process's part of a mid-epoch checkpoint
        if checkpoint is not None:
            self._restore(checkpoint)
        self.metrics: MetricLogger | None = None
        self.runner: nn.Module = self.model
        self.signals: StopSignals | None = None  # set by train(): stop requests checked at every step boundary
        self.last_checkpoint = time.monotonic()

    def _restore(self, checkpoint: Checkpoint) -> None:
        path = checkpoint.path
        checkpoint.check_resume(
            dataclasses.asdict(self.config), self.amp_dtype, self.config.trainer.amp, self.steps_per_epoch
        )
        progress, self.val_metrics, within_epoch = checkpoint.restore(
            model=self.model,
            sparsifier=self.sparsifier,
            optimizer=self.optimizer,
            lr_schedule=self.lr_schedule,
            scaler=self.scaler,
        )
        self.progress = Progress(**progress)
        if within_epoch is not None:
            if len(within_epoch["ranks"]) != self.process.world:
                raise ConfigError(
                    f"resume: {path} was written mid-epoch by {len(within_epoch['ranks'])} process(es); it continues "
                    f"with as many, this run has {self.process.world}"
                )
            self.within_epoch = within_epoch["ranks"][self.process.rank]

    # ------------------------------------------------------------------------------------------ start

    def start(self) -> None:
        """Write the run directory (main process), start the metric logger, compile and wrap for DDP."""
        already_sent = 0
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.config.resume == "auto":  # drop what a killed job logged after its last checkpoint
                already_sent = truncate_metrics(self.run_dir / "metrics.jsonl", self.progress.step)
            for name, text in self.files.items():
                atomic_write_text(self.run_dir / name, text)
        self.metrics = MetricLogger(
            self.run_dir,
            self.config.logger,
            self.wandb_mode,
            run_name=self.config.name,
            run_config=self.run_config,
            enabled=self.is_main,
            resumed=self.config.resume == "auto",
            already_sent=already_sent,
        )
        # Compile, then DDP: mask updates (sparsifier.step()) stay outside the compiled region.
        self.compiled = torch.compile(self.model) if self.config.trainer.compile else self.model
        self.runner = self.compiled
        if self.process.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.runner = nn.parallel.DistributedDataParallel(self.compiled, device_ids=ids)
        if self.is_main:
            device = {**describe_device(self.device), **self.backend, "topk_kernels": kernels.path()}
            log.info("device: " + ", ".join(f"{key} {value}" for key, value in device.items()))
        if self.is_main and self.loaders.info.num_classes == 1:
            log.warning("the data has a single class: accuracy is 100% by construction and means nothing")
        if self.resume_path is not None:
            log.info(f"resumed from {self.resume_path} at epoch {self.progress.epoch}, step {self.progress.step}")

    # ------------------------------------------------------------------------------------------ training

    def fit(self) -> bool:
        """Train the remaining epochs; False if ``trainer.stop_after_epochs`` ended this job early."""
        epochs = self.config.schedule.epochs
        trainer = self.config.trainer
        self.first_epoch = self.progress.epoch
        for epoch in range(self.first_epoch, epochs):
            self.train_epoch(epoch)
            self.progress.epoch, self.progress.epoch_step = epoch + 1, 0
            last = epoch + 1 == epochs
            if (epoch + 1) % trainer.eval_every == 0 and not last:  # the last epoch is validated after finalize()
                self.validate(epoch + 1, "val")
            if self._checkpoints_after(epoch):
                self.save_checkpoint()
            if self._stops_after(epoch) and not last:
                if self.is_main:
                    log.info(
                        f"stopped after epoch {epoch + 1} (trainer.stop_after_epochs={trainer.stop_after_epochs}, "
                        f"exit status 3); continue with the same command and hydra.run.dir={self.run_dir} resume=auto"
                    )
                return False
        return True

    def _stops_after(self, epoch: int) -> bool:
        """Whether ``trainer.stop_after_epochs`` ends this job after ``epoch``."""
        limit = self.config.trainer.stop_after_epochs
        return limit is not None and epoch + 1 - self.first_epoch >= limit

    def _checkpoints_after(self, epoch: int) -> bool:
        """Whether the end of ``epoch`` writes a checkpoint (``trainer.checkpoint_every``, the last epoch, a stop)."""
        done = epoch + 1
        return (
            done % self.config.trainer.checkpoint_every == 0
            or done == self.config.schedule.epochs
            or self._stops_after(epoch)
        )

    def train_epoch(self, epoch: int) -> None:
        trainer = self.config.trainer
        start = self.progress.epoch_step  # > 0: resumed from a checkpoint written mid-epoch
        self._begin_epoch(epoch, self.within_epoch if start else None)
        self.within_epoch = None
        self.loaders.set_epoch(epoch, start * trainer.accumulate)
        self.runner.train()
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=start,
            desc=f"epoch {epoch + 1}/{self.config.schedule.epochs}",
            disable=not (self.is_main and sys.stderr.isatty()),
            dynamic_ncols=True,
            leave=False,
        )
        window = self.window
        epoch_start = clock = time.perf_counter()
        distributed = isinstance(self.runner, nn.parallel.DistributedDataParallel)
        batches = iter(self.loaders.train)
        for _ in range(start, self.steps_per_epoch):
            for micro in range(trainer.accumulate):
                batch = next(batches)
                if batch is None:  # the skipping loaders' signal: not one image of the batch was readable
                    raise RuntimeError(
                        f"every image of a training batch of {self.config.data.batch_size} was "
                        f"unreadable (the warnings above name them): fix the data"
                    )
                images, labels = batch
                window["skipped"] += self.config.data.batch_size - len(labels)  # unreadable images dropped
                images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
                labels = labels.to(self.device, non_blocking=True)
                images, targets = self.mix(images, labels) if self.mix is not None else (images, labels)
                sync = micro == trainer.accumulate - 1 or not distributed
                with contextlib.nullcontext() if sync else self.runner.no_sync(), autocast(self.device, self.amp_dtype):
                    logits = self.runner(images)
                    loss = self.criterion(logits, targets)
                self.scaler.scale(loss / trainer.accumulate).backward()
                window["loss"] += loss.detach().float() * len(targets)
                window["correct"] += (logits.detach().argmax(1) == labels).sum()
                window["samples"] += len(labels)
            logged = self._logs_after(self.progress.step + 1, self.progress.epoch_step + 1)
            telemetry = self.optimizer_step(statistics=logged)
            self.progress.epoch_step += 1
            self.progress.images += self.global_batch
            bar.update(1)
            if logged:
                self._log_train(epoch, window, telemetry, bar)
            now = time.perf_counter()
            self.progress.train_seconds += now - clock
            self._checkpoint_or_stop(epoch)
            clock = time.perf_counter()
        for _ in batches:  # finish the epoch's iterator (its last batches don't fill an accumulation): FFCV's
            pass  # producer thread and buffers are only released at the end
        bar.close()
        seconds = time.perf_counter() - epoch_start
        skipped = int(all_reduce_sum([window["skipped"]], self.device)[0])
        self.progress.skipped_images += skipped
        degenerate = self.degenerate()
        self._warn_empty_layers(degenerate.get("empty_layers", []))
        if degenerate:
            record = {"kind": "data", "epoch": epoch + 1, **degenerate, "skipped_images": skipped}
            self.metrics.log(record, step=self.progress.step)
        if self.is_main:
            images = (self.steps_per_epoch - start) * self.global_batch
            log.info(
                f"epoch {epoch + 1}/{self.config.schedule.epochs}: {seconds:.1f} s, "
                f"{images / max(seconds, 1e-9):,.0f} img/s, loss {self.last_train['loss']:.4f}, "
                f"train top-1 {100 * self.last_train['top1']:.2f}%, "
                f"sparsity {100 * self.last_train['sparsity_all']:.2f}% "
                f"(target now {100 * self.last_train['sparsity_target']:.2f}%)"
                + (f"; warnings: {describe_degenerate(degenerate)}" if degenerate else "")
            )

    def _begin_epoch(self, epoch: int, resumed: dict[str, Any] | None) -> None:
        """The epoch's randomness and accumulators: derived from ``(seed, rank, epoch)`` at its start, or restored
        as a mid-epoch checkpoint saved them (``resumed``)."""
        if resumed is None:
            seed_everything(derive_seed(self.config.seed, "process", self.process.rank, epoch))
            self.window = {"skipped": 0}
            self._restart_window()
        else:
            set_rng_state(resumed["rng"])
            saved = resumed["window"]
            self.window = {**saved, "loss": saved["loss"].to(self.device), "correct": saved["correct"].to(self.device)}
            self.window["start"] = time.perf_counter()
            self.last_train = resumed["last_train"]

    def _restart_window(self) -> None:
        """Zero the loss, accuracy and sample counts the next training log line averages over."""
        zero = torch.zeros((), device=self.device)
        self.window.update(loss=zero, correct=zero.clone(), samples=0, start=time.perf_counter())

    def _checkpoint_or_stop(self, epoch: int) -> None:
        """After a step: a checkpoint when ``trainer.checkpoint_every_steps`` / ``_minutes`` say so, or when a stop
        signal arrived on any process (all processes agree: one collective), then :class:`Interrupted`."""
        trainer = self.config.trainer
        due = bool(trainer.checkpoint_every_steps) and self.progress.step % trainer.checkpoint_every_steps == 0
        if trainer.checkpoint_every_minutes is not None:
            due = due or time.monotonic() - self.last_checkpoint >= 60 * trainer.checkpoint_every_minutes
        received = precedence(self.signals.received) if self.signals is not None else 0
        if self.process.world > 1:
            received, due = any_process([received, float(due)])
        signum = signal_of(int(received))
        if signum is not None:
            self.save_checkpoint(within_epoch=True)
            previous = self.signals.previous.get(signum) if self.signals is not None else None
            raise Interrupted(signum, epoch + 1, self.progress.step, previous)
        epoch_done = self.progress.epoch_step == self.steps_per_epoch
        if due and not (epoch_done and self._checkpoints_after(epoch)):  # else the epoch's end writes one
            self.save_checkpoint(within_epoch=True)

    def _logs_after(self, step: int, epoch_step: int) -> bool:
        """Whether the train metrics are logged after global step ``step`` (``epoch_step`` within its epoch)."""
        return step % self.config.trainer.log_every == 0 or epoch_step == self.steps_per_epoch

    def optimizer_step(self, statistics: bool = True) -> dict[str, Any]:
        """One optimizer step on the accumulated gradients, in the order the Sparsifier needs: its global gradient
        term → unscale/clip → step → new masks from the updated weights. Returns the Sparsifier's telemetry
        (``statistics``: with the numbers that cost a pass over the masks, for a logged step)."""
        self.sparsifier.finish_backward()
        if self.config.trainer.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.trainer.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used, for the log
        self.lr_schedule.step()
        telemetry = self.sparsifier.step(statistics=statistics)
        self.progress.step += 1
        return telemetry

    def _log_train(self, epoch: int, window: dict, telemetry: dict, bar: tqdm) -> None:
        self.sparsifier.check_consistency()  # every rank logs: a cheap collective that stops diverged masks
        loss_sum, correct, samples = all_reduce_sum(
            [float(window["loss"]), float(window["correct"]), window["samples"]], self.device
        )
        seconds = time.perf_counter() - window["start"]
        record = {
            "kind": "train",
            "epoch": epoch + 1,
            "loss": loss_sum / samples,
            "top1": correct / samples,
            "lr": self.step_lr,
            "img_per_s": samples / seconds,
            "sparsity_target": 1 - telemetry["density_target"],
            **self.sparsifier.sparsity(),
            **{
                k: float(telemetry[k])
                for k in ("beta", "beta_effective", "flip_rate", "solver_iterations", "lam")
                if k in telemetry
            },
            "frozen": telemetry["frozen"],
            "topk_kernels": kernels.path(),
        }
        self.last_train = record
        self.metrics.log(record, step=self.progress.step)
        self._warn_empty_layers(self.sparsifier.empty_layers())
        bar.set_postfix(
            loss=f"{record['loss']:.3f}",
            acc=f"{100 * record['top1']:.1f}%",
            img_s=f"{record['img_per_s']:,.0f}",
            sparsity=f"{100 * record['sparsity_all']:.1f}%",
        )
        if self.is_main and bar.disable:  # no terminal (a Slurm log, nohup): a line in the log instead of the bar
            remaining = (self.total_steps - self.progress.step) * self.global_batch / max(record["img_per_s"], 1e-9)
            log.info(
                f"epoch {epoch + 1}/{self.config.schedule.epochs} step {self.progress.step}/{self.total_steps}: "
                f"{record['img_per_s']:,.0f} img/s, loss {record['loss']:.4f}, lr {record['lr']:.4g}, sparsity "
                f"{100 * record['sparsity_all']:.2f}% (target {100 * record['sparsity_target']:.2f}%), "
                f"ETA {datetime.timedelta(seconds=round(remaining))}"
            )
        self._restart_window()

    def _warn_empty_layers(self, empty: list[str]) -> None:
        """A warning (once per layer) when a masked layer has come to keep no weight at all (``empty``: the layers
        that keep none now)."""
        new = [name for name in empty if name not in self.warned_empty]
        if new and self.is_main:
            log.warning(
                f"step {self.progress.step}: {', '.join(new)} keep no weights (the layer's output no longer depends "
                f"on its input; accuracy will be near chance unless a mask regrows them); see allocation=erk"
            )
        self.warned_empty.update(new)

    def degenerate(self) -> dict[str, Any]:
        """What makes this run's numbers suspect, by kind (nothing when none applies): a single class in the data,
        layers that keep no weights, layers masked unstructured by ``block_fallback``, unreadable images skipped."""
        found: dict[str, Any] = {}
        if self.loaders.info.num_classes == 1:
            found["single_class"] = True
        if empty := self.sparsifier.empty_layers():
            found["empty_layers"] = empty
        if fallback := self.sparsifier.fallback_layers():
            found["block_fallback_layers"] = fallback
        if self.progress.skipped_images:
            found["skipped_images"] = self.progress.skipped_images
        return found

    # ------------------------------------------------------------------------------------------ validation

    def validate(self, epoch: int, kind: str) -> dict[str, Any]:
        """Evaluate and log (metrics in ``self.val_metrics``); return the sparsity report it logged."""
        sync_buffers(self.model)  # BatchNorm statistics drift apart per rank; evaluate rank 0's
        model = self.compiled if kind == "val" else self.model
        self.val_metrics = evaluate(model, self.loaders.val, self.device, self.amp_dtype, self.memory_format)
        report = self.sparsifier.report(self.loaders.info.input_shape)
        self.metrics.log(
            {
                "kind": kind,
                "epoch": epoch,
                **self.val_metrics,
                "sparsity_all": report["totals"]["sparsity_all"],
                "sparsity_masked": report["totals"]["sparsity_masked"],
            },
            step=self.progress.step,
        )
        self.metrics.log_layers(
            [{k: v for k, v in row.items() if k != "block"} for row in report["layers"]],
            step=self.progress.step,
            epoch=epoch,
        )
        if self.is_main:
            log.info(
                f"epoch {epoch} {kind}: top-1 {100 * self.val_metrics['top1']:.2f}%, top-5 "
                f"{100 * self.val_metrics['top5']:.2f}%, loss {self.val_metrics['loss']:.4f}"
            )
        return report

    def save_checkpoint(self, within_epoch: bool = False) -> None:
        """Write ``checkpoints/last.pt`` (main process); ``within_epoch`` adds every process's epoch state."""
        sync_buffers(self.model)
        ranks = gather_to_main(self._epoch_state()) if within_epoch else None
        if self.is_main:
            checkpoint = Checkpoint.capture(
                model=self.model,
                optimizer=self.optimizer,
                lr_schedule=self.lr_schedule,
                scaler=self.scaler,
                sparsifier=self.sparsifier,
                progress=dataclasses.asdict(self.progress),
                amp_dtype=self.amp_dtype,
                train_config=dataclasses.asdict(self.config),
                run_config=self.run_config,
                steps_per_epoch=self.steps_per_epoch,
                val=self.val_metrics,
                world=self.process.world,
                within_epoch=None if ranks is None else {"ranks": ranks},
            )
            checkpoint.save(self.run_dir / LAST)
        self.last_checkpoint = time.monotonic()

    def _epoch_state(self) -> dict[str, Any]:
        """What this process needs to continue its epoch exactly: the log window (with the skipped images), the
        last training record and the RNG states of this step boundary."""
        window = {k: v for k, v in self.window.items() if k != "start"}
        window.update(loss=window["loss"].cpu(), correct=window["correct"].cpu())
        return {"window": window, "last_train": getattr(self, "last_train", None), "rng": rng_state()}

    # ------------------------------------------------------------------------------------------ the end

    def finish(self) -> dict[str, Any]:
        """Bake the masks in, validate the plain sparse model (and test it once, if the data has a test split),
        write ``model_final.pt`` and ``summary.json``."""
        model = self.sparsifier.finalize()
        degenerate = self.degenerate()
        self._warn_empty_layers(degenerate.get("empty_layers", []))
        totals = self.validate(self.config.schedule.epochs, "final")["totals"]
        final = self.val_metrics
        summary = {
            "val_top1": final["top1"],
            "val_top5": final["top5"],
            "val_loss": final["loss"],
            **self._test(),
            "sparsity_target": self.config.sparsity.target if self.config.sparsity.method != "dense" else 0.0,
            **sparsity_fields(totals),
            "degenerate": degenerate,
            "accounting": self.config.sparsity.accounting,
            "epochs": self.config.schedule.epochs,
            "steps": self.progress.step,
            "train_seconds": self.progress.train_seconds,
            "wall_seconds": time.perf_counter() - self.start_time,
            "images_per_second": self.progress.images / max(self.progress.train_seconds, 1e-9),
            "processes": self.process.world,
            "seed": self.config.seed,
            "git": git_version(),
            "env": environment(self.process.world, self.device),
            "topk_kernels": kernels.path(),
            "model_final": str(self.run_dir / "model_final.pt"),
            "metrics": str(self.run_dir / "metrics.jsonl"),
        }
        if self.is_main:
            atomic_save(model.state_dict(), self.run_dir / "model_final.pt")
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            self.metrics.summary(summary)
        return summary

    def _test(self) -> dict[str, Any]:
        """The final model on the test split, logged once (kind ``test``); empty without a test split."""
        if self.loaders.test is None:
            return {}
        metrics = evaluate(self.model, self.loaders.test, self.device, self.amp_dtype, self.memory_format)
        self.metrics.log({"kind": "test", "epoch": self.config.schedule.epochs, **metrics}, step=self.progress.step)
        if self.is_main:
            log.info(f"test: top-1 {100 * metrics['top1']:.2f}%, top-5 {100 * metrics['top5']:.2f}%")
        return test_fields(metrics)

    def close(self, failed: bool = False) -> None:
        if self.metrics is not None:
            self.metrics.close(failed)


def format_summary(summary: dict[str, Any], run_dir: Path, wandb_note: str | None = None) -> str:
    """The table printed at the end of a run."""
    rows = [
        ("val top-1", f"{100 * summary['val_top1']:.2f}%   (top-5 {100 * summary['val_top5']:.2f}%)"),
        (
            "sparsity",
            f"{100 * summary['sparsity_all']:.2f}% of all parameters, "
            f"{100 * summary['sparsity_masked']:.2f}% of masked weights "
            f"(target {100 * summary['sparsity_target']:.2f}%, counted over "
            f"{'all parameters' if summary['accounting'] == 'all' else 'masked weights'})",
        ),
        (
            "FLOPs",
            f"{_si(summary['flops_dense'])} → {_si(summary['flops_sparse'])} multiply-adds per image in "
            f"masked layers ({summary['flops_reduction']:.1f}× fewer)",
        ),
        (
            "time",
            f"{summary['wall_seconds']:.0f} s, {summary['images_per_second']:,.0f} training img/s, "
            f"{summary['steps']} steps on {summary['processes']} process(es)",
        ),
        ("model", shown(summary["model_final"])),
        ("logs", f"{shown(summary['metrics'])}, {shown(run_dir / 'summary.json')}"),
    ]
    if summary["degenerate"]:
        rows.append(("warnings", describe_degenerate(summary["degenerate"])))
    if "test_top1" in summary:
        rows.insert(1, ("test top-1", f"{100 * summary['test_top1']:.2f}%   (top-5 {100 * summary['test_top5']:.2f}%)"))
    if wandb_note:
        rows.append(("W&B", wandb_note))
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", "spartan run summary", "-" * 19, *(f"{k:<{width}}  {v}" for k, v in rows)])


def describe_degenerate(found: dict[str, Any]) -> str:
    """One line for :meth:`Run.degenerate`'s findings."""
    parts = []
    if found.get("single_class"):
        parts.append("the data has a single class")
    if found.get("empty_layers"):
        parts.append(f"no kept weights in {', '.join(found['empty_layers'])}")
    if found.get("block_fallback_layers"):
        parts.append(f"masked unstructured by block_fallback: {', '.join(found['block_fallback_layers'])}")
    if found.get("skipped_images"):
        parts.append(f"{found['skipped_images']} unreadable training images skipped")
    return "; ".join(parts)


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def train(
    config: TrainConfig, run_dir: Path, *, files: dict[str, str] | None = None, run_config: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """Train ``config`` into ``run_dir``; return the summary (also in ``summary.json``), None if
    ``trainer.stop_after_epochs`` ended it early. A stop signal during training ends it at the next step boundary
    with a checkpoint and :class:`~spartan.train.lifecycle.Interrupted` (handlers are installed in the main thread
    only); one that arrives after the last step goes to the handler installed before, once training is done."""
    run = Run(config, run_dir, files=files, run_config=run_config)
    failed = True
    in_main_thread = threading.current_thread() is threading.main_thread()
    try:
        with StopSignals() if in_main_thread else contextlib.nullcontext() as signals:
            run.signals = signals
            run.start()
            completed = run.fit()
        if signals is not None and signals.received is not None:
            signal.raise_signal(signals.received)  # e.g. submitit's requeue: the last epoch is checkpointed
        if completed:
            summary = run.finish()
        failed = False
    except Interrupted:
        failed = False  # checkpointed: the W&B run is not a failure, the job continues later
        raise
    finally:
        run.close(failed)
    if not completed:
        return None
    if run.is_main:
        log.info(format_summary(summary, Path(run_dir), run.metrics.wandb_note))
    return summary
