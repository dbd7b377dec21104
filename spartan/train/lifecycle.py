"""How a run ends: exit statuses, one-line run errors, and stop signals turned into a checkpoint and a clean exit.

A signal (Slurm's preemption / time-limit warning SIGUSR1 or SIGUSR2 — submitit uses SIGUSR2 —, SIGTERM, or Ctrl-C's
SIGINT) only records that a stop was asked for; the training loop checks at every optimizer-step boundary (all
processes agree with one collective), writes a checkpoint there, mid-epoch if need be, and raises
:class:`Interrupted`. The entry point then hands the signal to the handler that was installed before (submitit's
requeues the job) or exits with :attr:`ExitStatus.INTERRUPTED`. When processes received different signals, the one
earliest in :data:`STOP_SIGNALS` wins (SIGUSR2, which requeues under submitit, over a SIGTERM that may come with it).
"""

from __future__ import annotations

import enum
import os
import signal
from types import FrameType
from typing import Any

STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGUSR2", "SIGUSR1", "SIGTERM", "SIGINT") if hasattr(signal, name)
)
"""The signals that stop a run, in order of precedence."""


class ExitStatus(enum.IntEnum):
    """The exit status of ``train.py`` (and ``eval.py``, which uses 0, 1 and 2)."""

    FINISHED = 0  # the run finished (also: resume=auto found it finished and changed nothing)
    FAILED = 1  # a crash, or a run error reported in one line (e.g. no space left for a checkpoint)
    BAD_INPUT = 2  # a config value, path or checkpoint was refused before anything was written
    STOPPED = 3  # trainer.stop_after_epochs ended this job after a checkpoint: continue with resume=auto
    INTERRUPTED = 4  # a stop signal ended it at a step boundary after a checkpoint: continue with resume=auto


class RunError(RuntimeError):
    """A failure of the environment reported as one ``error: ...`` line (exit status 1), e.g. a full disk."""


class AlreadyFinished(Exception):
    """``resume=auto`` found a finished run: nothing to do, nothing changed."""


class Interrupted(Exception):
    """The loop stopped for signal ``signum`` in ``epoch`` (1-based) after optimizer step ``step``, after writing a
    checkpoint; ``previous`` is the handler installed before ours."""

    def __init__(self, signum: int, epoch: int, step: int, previous: Any = None):
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"{self.signal_name} in epoch {epoch}, after step {step}")
        self.signum, self.epoch, self.step, self.previous = signum, epoch, step, previous

    def forward(self) -> None:
        """Hand the signal to the previous handler if it was a Python function (submitit's requeues the job and
        exits)."""
        if callable(self.previous) and self.previous is not signal.default_int_handler:
            self.previous(self.signum, None)


class StopSignals:
    """Records stop signals instead of dying; a context manager that restores the previous handlers (kept in
    ``previous``). ``received`` is the received signal of highest precedence or None; a second Ctrl-C stops at
    once."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for signum in self.signals:
            self.previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt
        first = self.received is None
        if first or precedence(signum) > precedence(self.received):
            self.received = signum
        if first:  # os.write: print() could re-enter a stderr write the signal interrupted
            again = " (Ctrl-C again: stop at once, without one)" if signum == signal.SIGINT else ""
            name = signal.Signals(signum).name
            os.write(
                2, f"spartan: {name} received: stopping at the next step boundary with a checkpoint{again}\n".encode()
            )


def precedence(signum: int | None) -> int:
    """A number that orders stop signals (0: none); the loop agrees on the largest over processes."""
    return 0 if signum is None else len(STOP_SIGNALS) - STOP_SIGNALS.index(signum)


def signal_of(precedence_value: int) -> int | None:
    return None if precedence_value == 0 else STOP_SIGNALS[len(STOP_SIGNALS) - precedence_value]


def ignore_stop_signals(*_: Any) -> None:
    """DataLoader ``worker_init_fn``: workers leave stop signals to the main process (which checkpoints), instead of
    dying on the Ctrl-C or SIGTERM their process group receives and breaking the epoch's data stream."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
