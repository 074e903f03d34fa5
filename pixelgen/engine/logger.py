"""Rank-0 metrics: metrics.jsonl always, wandb (offline by default), a readable console line per interval."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from pixelgen.engine.config import LoggingConfig
from pixelgen.io import atomic_write_text
from pixelgen.progress import console


class MetricsLogger:
    def __init__(self, out_dir: Path, cfg: LoggingConfig, *, enabled: bool, run_name: str, group: str,
                 config: dict, resume_step: int):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.wandb = None
        if not enabled:
            return
        # A killed run may have logged past its last checkpoint; those steps are redone, so drop them.
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self._file = open(self.path, "a")
        if cfg.wandb != "disabled":
            self.wandb = _init_wandb(out_dir, cfg, run_name, group, config)

    def log(self, step: int, metrics: dict, console_line: bool = True) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.wandb is not None:
            self.wandb.log({"global_step": step, **record}, step=step)
        if console_line:
            parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if k != "step"]
            console.print(f"[bold]step {step}[/bold]  " + "  ".join(parts), soft_wrap=True)

    def log_image(self, step: int, key: str, path: Path) -> None:
        if self.enabled and self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path)), "global_step": step}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    return round(v, 6) if isinstance(v, float) else v


def _init_wandb(out_dir: Path, cfg: LoggingConfig, run_name: str, group: str, config: dict):
    import wandb

    if cfg.wandb == "online" and not os.environ.get("WANDB_API_KEY"):
        raise RuntimeError("logging.wandb=online needs WANDB_API_KEY in the environment (it is never read from "
                           "a config file); or set logging.wandb=offline")
    # One fixed id per stage so an online resumed stage continues its run. Offline runs cannot be resumed
    # (wandb refuses), so each offline attempt gets its own id in the same group.
    id_file = out_dir / "wandb_id.txt"
    if not id_file.exists():
        atomic_write_text(id_file, uuid.uuid4().hex[:12])
    run_id = id_file.read_text().strip()
    if cfg.wandb == "offline":
        run_id = f"{run_id}-{uuid.uuid4().hex[:4]}"
    run = wandb.init(project=cfg.project, entity=cfg.entity, name=run_name, group=group, id=run_id,
                     resume="allow", mode=cfg.wandb, dir=str(out_dir), config=config,
                     settings=wandb.Settings(quiet=True))  # our own console line and summary say the same
    run.define_metric("*", step_metric="global_step")
    return run
