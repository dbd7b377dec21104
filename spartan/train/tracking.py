"""Where metrics go: ``metrics.jsonl`` in the run directory (always) and Weights & Biases (``logger=wandb``).

Only the main process writes. W&B is imported only when selected; with ``logger.mode=auto`` it runs online
when an API key is configured (``WANDB_API_KEY`` or ``wandb login``) and offline otherwise, so a missing key
never stops training. The key itself is never read into logs or configs.
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

log = logging.getLogger("spartan.train")


class MetricLogger:
    """``log(record)`` appends one JSON line (and logs to W&B); ``close()`` ends the W&B run."""

    def __init__(self, run_dir: Path, config: LoggerConfig | None, *, run_name: str, run_config: dict[str, Any],
                 enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb_run = None
        self.wandb_note = None
        if enabled and config is not None and config.name == "wandb":
            self.wandb_run, self.wandb_note = _start_wandb(config, run_dir, run_name, run_config)

    def log(self, record: dict[str, Any], *, step: int) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({**record, "step": step}, default=_jsonable) + "\n")
        if self.wandb_run is not None:
            kind = record.get("kind", "train")
            self.wandb_run.log({f"{kind}/{k}": v for k, v in record.items()
                                if k != "kind" and isinstance(v, (int, float)) and not isinstance(v, bool)},
                               step=step)

    def log_layers(self, rows: list[dict[str, Any]], *, step: int, epoch: int) -> None:
        """The per-layer density table (one JSON line; a W&B table)."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"kind": "layers", "epoch": epoch, "layers": rows, "step": step}, default=_jsonable) + "\n")
        if self.wandb_run is not None:
            import wandb

            columns = ["name", "params", "params_kept", "density", "density_target"]
            table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
            self.wandb_run.log({"layers/densities": table}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.enabled and self.wandb_run is not None:
            for key, value in values.items():
                if isinstance(value, (int, float, str)):
                    self.wandb_run.summary[key] = value

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def wandb_key_configured() -> bool:
    """Whether W&B has an API key: the environment variable, or the netrc entry ``wandb login`` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _start_wandb(config: LoggerConfig, run_dir: Path, run_name: str, run_config: dict[str, Any]):
    import wandb

    mode, note = config.mode, None
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_key_configured() else "offline")
        if mode == "offline":
            note = (f"offline (no API key configured): upload with `wandb sync {run_dir / 'wandb'}/offline-run-*`")
            log.info(f"W&B: {note}")
    id_file = run_dir / "wandb_id"  # a resumed run continues the same W&B run
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    run = wandb.init(project=config.project, entity=config.entity, group=config.group, tags=list(config.tags),
                     name=run_name, dir=str(run_dir), config=run_config, mode=mode, id=run_id, resume="allow",
                     settings=wandb.Settings(quiet=True))
    if mode == "online":
        note = run.url
    return run, note
