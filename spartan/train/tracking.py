"""Where metrics go: ``metrics.jsonl`` in the run directory (always) and Weights & Biases (``logger=wandb``).

Only the main process writes. W&B is imported only when selected; with ``logger.mode=auto`` it runs online
when an API key is configured (``WANDB_API_KEY`` or ``wandb login``) and offline otherwise, so a missing key
never stops training; if an online start fails (no network on a compute node) it falls back to offline.
The key itself is never read into logs or configs.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import uuid
from pathlib import Path
from typing import Any

from spartan.train.config import LoggerConfig
from spartan.train.errors import ConfigError
from spartan.train.files import append_line, atomic_write_text

log = logging.getLogger("spartan.train")

# Hosts ``wandb login`` writes netrc entries for (wandb >= 0.31 defaults to the CoreWeave host).
WANDB_HOSTS = ("api.wandb.ai", "api.forge.coreweave.com")


class MetricLogger:
    """``log(record)`` appends one JSON line (and logs to W&B); ``close()`` ends the W&B run.

    A run resumed in its own directory continues its W&B run. The killed job had sent ``already_sent`` records past
    its last checkpoint, which the resumed run logs again, bitwise the same: ``metrics.jsonl`` gets them back, W&B
    keeps its first copy (they are not sent twice).
    """

    def __init__(
        self,
        run_dir: Path,
        config: LoggerConfig | None,
        wandb_mode: str | None,
        *,
        run_name: str,
        run_config: dict[str, Any],
        enabled: bool,
        resumed: bool,
        already_sent: int = 0,
    ):
        self.enabled = enabled
        self.already_sent = already_sent
        self.path = run_dir / "metrics.jsonl"
        self.wandb_run = None
        self.wandb_note = None
        if enabled and config is not None and config.name == "wandb" and wandb_mode != "disabled":
            self.wandb_run, self.wandb_note = _start_wandb(config, wandb_mode, run_dir, run_name, run_config, resumed)

    def log(self, record: dict[str, Any], *, step: int) -> None:
        if not self.enabled:
            return
        self._append({**record, "step": step})
        if self._send():
            kind = record.get("kind", "train")
            values = {
                f"{kind}/{k}": v
                for k, v in record.items()
                if k != "kind" and isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            self.wandb_run.log({**values, "step": step})

    def log_layers(self, rows: list[dict[str, Any]], *, step: int, epoch: int) -> None:
        """The per-layer density table (one JSON line; a W&B table)."""
        if not self.enabled:
            return
        self._append({"kind": "layers", "epoch": epoch, "layers": rows, "step": step})
        if self._send():
            import wandb

            columns = ["name", "params", "params_kept", "density", "density_target"]
            table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
            self.wandb_run.log({"layers/densities": table, "step": step})

    def _send(self) -> bool:
        """Whether this record goes to W&B (not a repeat of one the killed job sent)."""
        if self.already_sent:
            self.already_sent -= 1
            return False
        return self.wandb_run is not None

    def _append(self, record: dict[str, Any]) -> None:
        append_line(self.path, json.dumps(record, default=_jsonable))

    def summary(self, values: dict[str, Any]) -> None:
        if self.enabled and self.wandb_run is not None:
            for key, value in values.items():
                if isinstance(value, (int, float, str)):
                    self.wandb_run.summary[key] = value

    def close(self, failed: bool = False) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else 0)
            self.wandb_run = None


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def wandb_key_configured() -> bool:
    """Whether W&B has credentials: environment variables, or the netrc entry ``wandb login`` writes."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    hosts = set(WANDB_HOSTS)
    if os.environ.get("WANDB_BASE_URL"):
        hosts.add(os.environ["WANDB_BASE_URL"].split("://")[-1].split("/")[0])
    try:
        entries = netrc.netrc().hosts
    except (OSError, netrc.NetrcParseError):
        return False
    return any(host in entries for host in hosts)


def resolve_wandb_mode(config: LoggerConfig) -> str | None:
    """The W&B mode to start in (checked before anything is written), or None without ``logger=wandb``."""
    if config.name != "wandb":
        return None
    mode = config.mode if config.mode != "auto" else os.environ.get("WANDB_MODE", "auto")
    if mode == "online" and not wandb_key_configured():
        raise ConfigError(
            "logger.mode=online (or WANDB_MODE=online) needs a W&B API key: run `wandb login` or set "
            "WANDB_API_KEY, or use logger.mode=auto / offline"
        )
    return mode


def shown(path: Path | str) -> str:
    """``path`` as printed for users: relative to the working directory when it lies below it, else as it is."""
    path = Path(path)
    return str(path.relative_to(Path.cwd())) if path.is_absolute() and path.is_relative_to(Path.cwd()) else str(path)


def _offline_note(reason: str, run_dir: Path) -> str:
    return f"offline ({reason}): upload with `wandb sync {shown(run_dir / 'wandb')}/offline-run-*`"


def _start_wandb(
    config: LoggerConfig, mode: str, run_dir: Path, run_name: str, run_config: dict[str, Any], resumed: bool
):
    import wandb

    note = None
    if mode == "auto":
        mode = "online" if wandb_key_configured() else "offline"
        if mode == "offline":
            note = _offline_note("no API key configured", run_dir)
    id_file = run_dir / "wandb_id"  # a resumed run continues the same W&B run
    run_id = id_file.read_text().strip() if resumed and id_file.is_file() else uuid.uuid4().hex[:12]
    atomic_write_text(id_file, run_id)
    kwargs = dict(
        project=config.project,
        entity=config.entity,
        group=config.group,
        tags=list(config.tags),
        name=run_name,
        dir=str(run_dir),
        config=run_config,
        id=run_id,
        resume="allow",
    )
    try:
        run = wandb.init(mode=mode, settings=wandb.Settings(quiet=True, init_timeout=config.init_timeout), **kwargs)
    except Exception as err:  # an unreachable server must not stop training when offline logging is possible
        if mode != "online" or config.mode == "online":
            raise
        note = _offline_note(f"online start failed: {type(err).__name__}", run_dir)
        kwargs["id"] = uuid.uuid4().hex[:12]  # W&B's service still holds the failed run's id
        atomic_write_text(id_file, kwargs["id"])
        run = wandb.init(mode="offline", settings=wandb.Settings(quiet=True), **kwargs)
    if mode == "online" and note is None:
        note = run.url
    if note:
        log.info(f"W&B: {note}")
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run, note
