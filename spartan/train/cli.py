"""What ``train.py`` and ``eval.py`` share around Hydra (without importing it): run-dir pinning under
torchrun, turning the composed config into validated dataclasses, and one-line errors."""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Any, Callable

from spartan.train.config import ConfigError
from spartan.train.distributed import init_process_group, launched_by_torchrun, shared_timestamp, shutdown


def prepare_torchrun(argv: list[str]) -> list[str]:
    """Under torchrun: join the process group, agree on one run directory, let only rank 0 log to files.

    Each rank composes its own config; ``${now:...}`` would differ by a second between ranks, so rank 0's
    timestamp is shared through ``SPARTAN_RUN_STAMP`` (read by ``hydra.run.dir`` in ``configs/train.yaml``).
    """
    if not launched_by_torchrun():
        return argv
    if any(arg in ("-m", "--multirun") for arg in argv):
        fail("sweeps (-m) cannot run under torchrun: launch one torchrun per configuration")
    process = init_process_group()
    os.environ["SPARTAN_RUN_STAMP"] = shared_timestamp().replace("/", "_")
    if not process.is_main:
        argv = [*argv, "hydra/job_logging=none", "hydra/hydra_logging=none"]
    return argv


def to_dataclass(cfg: Any, to_object: Callable[[Any], Any]) -> Any:
    """``OmegaConf.to_object`` (passed in) with value errors reported as :class:`ConfigError`."""
    try:
        return to_object(cfg)
    except ConfigError:
        raise
    except Exception as err:  # OmegaConf wraps errors raised by __post_init__ and reports missing values
        cause = err.__cause__ or err.__context__
        while isinstance(cause, Exception) and not isinstance(cause, ValueError) and cause.__cause__ is not None:
            cause = cause.__cause__
        message = str(cause) if isinstance(cause, ValueError) else str(err).splitlines()[0]
        raise ConfigError(message) from None


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def report_errors(main: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``main``; a :class:`ConfigError` becomes one ``error: ...`` line and exit status 2."""

    @functools.wraps(main)  # Hydra finds configs/ relative to the wrapped function's module
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except ConfigError as err:
            logging.getLogger("spartan.train").debug("config error", exc_info=True)
            fail(str(err))

    return wrapped


def exit_distributed() -> None:
    """After a successful run under torchrun: leave the group and exit at once.

    gloo processes abort at interpreter exit in ~30% of runs after ``destroy_process_group()`` (torch 2.14,
    DESIGN.md §3); exiting with ``os._exit(0)`` after flushing skips that teardown.
    """
    if launched_by_torchrun():
        shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(0)
