"""What ``train.py`` and ``eval.py`` share around Hydra (without importing it): run-dir pinning under
torchrun, turning the composed config into validated dataclasses (OmegaConf), and one-line errors."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from omegaconf import DictConfig, OmegaConf

from spartan.config import ConfigFieldError
from spartan.train.distributed import (
    current_process,
    init_process_group,
    launched_as_ranks,
    launched_by_submitit,
    shared_timestamp,
    shutdown,
)
from spartan.train.errors import ConfigError
from spartan.train.lifecycle import ExitStatus, RunError


def prepare_torchrun(argv: list[str]) -> list[str]:
    """Under torchrun: join the process group, agree on one run directory, let only rank 0 log to files.

    Each rank composes its own config; ``${now:...}`` would differ by a second between ranks, so rank 0's
    timestamp is shared through ``SPARTAN_RUN_STAMP`` (read by ``hydra.run.dir`` in ``configs/train.yaml``).
    """
    if not launched_as_ranks():
        return argv
    if any(arg in ("-m", "--multirun") for arg in argv):
        finish(
            ExitStatus.BAD_INPUT, "error: sweeps (-m) cannot run under torchrun: launch one torchrun per configuration"
        )
    process = init_process_group()
    os.environ["SPARTAN_RUN_STAMP"] = shared_timestamp().replace("/", "_")
    if not process.is_main:
        argv = [*argv, "hydra/job_logging=none", "hydra/hydra_logging=none"]
    return argv


def to_dataclass(cfg: DictConfig) -> Any:
    """The composed config as its validated schema dataclasses; bad values are reported as :class:`ConfigError`
    (the library's :class:`spartan.config.ConfigFieldError` — the ``sparsity`` schema is
    :class:`spartan.SparsityConfig` — gets the ``sparsity.`` prefix)."""
    unknown = list(_unknown_keys(cfg))
    if unknown:
        key, schema = unknown[0]
        raise ConfigError(f"{key} is not a key of {schema} (a +{key}=... override adds nothing to a typed group)")
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except ConfigFieldError as err:
        raise ConfigError(f"sparsity.{err}") from None
    except Exception as err:  # OmegaConf reports missing values, and may wrap errors raised by __post_init__
        cause = err.__cause__ or err.__context__
        while isinstance(cause, Exception) and not isinstance(cause, ValueError) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, ConfigFieldError):
            raise ConfigError(f"sparsity.{cause}") from None
        message = str(cause) if isinstance(cause, ValueError) else str(err).splitlines()[0]
        raise ConfigError(message) from None


def _unknown_keys(cfg: DictConfig, path: str = "") -> Iterator[tuple[str, str]]:
    """``(dotted key, schema name)`` of keys a typed node holds but its schema does not declare: what Hydra's
    ``+key=value`` forces into a structured config, and ``OmegaConf.to_object`` would silently drop."""
    schema = OmegaConf.get_type(cfg)
    declared = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in cfg.keys():
        if declared is not None and key not in declared:
            yield f"{path}{key}", schema.__name__
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            yield from _unknown_keys(node, f"{path}{key}.")


def announce(message: str, *, stream: TextIO | None = None) -> None:
    """Print one line on the main process (stderr unless ``stream``)."""
    if current_process().is_main:
        print(message, file=stream or sys.stderr, flush=True)


def finish(status: int, message: str | None = None, *, stream: TextIO | None = None) -> None:
    """End the process with ``status`` (0: return to the caller), printing ``message`` on the main process (one
    line, stderr unless ``stream``). Under torchrun: leave the group and exit at once.

    gloo processes abort at interpreter exit in ~30% of runs after ``destroy_process_group()`` (torch 2.14,
    docs/design.md §6); exiting with ``os._exit`` after flushing skips that teardown.
    """
    if message:
        announce(message, stream=stream)
    if launched_as_ranks() and not launched_by_submitit():  # submitit's task leaves the group and writes results
        shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(status)
    if status:
        sys.exit(status)


def continue_command(overrides: list[str], run_dir: Path) -> str:
    """The command that continues a stopped run: its overrides, its run directory, ``resume=auto``."""
    kept = [o for o in overrides if not o.startswith(("hydra.run.dir=", "resume="))]
    return " ".join(["python train.py", *kept, f"hydra.run.dir={run_dir}", "resume=auto"])


def report_errors(main: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``main``; bad input becomes one ``error: ...`` line and exit status 2, a run error (e.g. a full disk)
    one line and 1, a second Ctrl-C one line and 130 (docs/design.md §2.7)."""

    @functools.wraps(main)  # Hydra finds configs/ relative to the wrapped function's module
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except ConfigError as err:
            logging.getLogger("spartan.train").debug("config error", exc_info=True)
            finish(ExitStatus.BAD_INPUT, f"error: {err}")
        except RunError as err:
            logging.getLogger("spartan.train").debug("run error", exc_info=True)
            finish(ExitStatus.FAILED, f"error: {err}")
        except KeyboardInterrupt:
            finish(130, "interrupted at once: no checkpoint written (the last one, if any, is intact)")

    return wrapped
