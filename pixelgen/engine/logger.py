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
                 config: dict, resume_step: int, run_id: str | None = None):
        """`run_id`: the stage's wandb run id from the checkpoint being resumed (None on a fresh start)."""
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.wandb = None
        self.run_id = _stage_run_id(out_dir, run_id) if enabled else None
        if not enabled:
            return
        # A killed run may have logged past its last checkpoint; those steps are redone, so drop them.
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self._file = open(self.path, "a")
        if cfg.wandb != "disabled":
            self.wandb = _init_wandb(out_dir, cfg, run_name, group, config, self.run_id)

    def log(self, step: int, metrics: dict, total_steps: int | None = None) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        # Full precision: a resumed run's loss history is compared with an uninterrupted one's bit for bit.
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.wandb is not None:
            self.wandb.log({"global_step": step, **record}, step=step)
        console.print(console_line(step, total_steps, record), soft_wrap=True)

    def log_image(self, step: int, key: str, path: Path) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path)), "global_step": step}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.wandb is not None:
            self.wandb.finish()


# How the console shows the engine's metrics; anything else (loss parts) is shown as `name value`.
_FORMATS = {
    "lr": "lr {:.3g}", "grad_norm": "gnorm {:.3g}", "img_per_s": "{:.1f} img/s", "step_time_s": "{:.3g} s/step",
    "data_wait": "data {:.0%}", "peak_mem_gib": "mem {:.2f} GiB", "mfu": "MFU {:.1%}", "skipped_steps": "skipped {}",
}


def console_line(step: int, total: int | None, record: dict) -> str:
    """`step 120/1000  loss 0.1234  fm_loss 0.11  lr 0.0001  gnorm 0.52  310.2 img/s  0.41 s/step  data 3% ...`"""
    head = f"[bold]step {step}{f'/{total}' if total else ''}[/bold]"
    values = {k: v for k, v in record.items() if k != "step" and not (k == "skipped_steps" and v == 0)}
    losses = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items() if k not in _FORMATS]
    rest = [_FORMATS[k].format(v) for k, v in values.items() if k in _FORMATS]
    return "  ".join([head, *losses, *rest])


def _stage_run_id(out_dir: Path, from_checkpoint: str | None) -> str:
    """One fixed id per stage, kept in the stage folder and in every checkpoint (either restores the other)."""
    id_file = out_dir / "wandb_id.txt"
    if from_checkpoint:
        if not id_file.exists() or id_file.read_text().strip() != from_checkpoint:
            atomic_write_text(id_file, from_checkpoint)
    elif not id_file.exists():
        atomic_write_text(id_file, uuid.uuid4().hex[:12])
    return id_file.read_text().strip()


def _init_wandb(out_dir: Path, cfg: LoggingConfig, run_name: str, group: str, config: dict, run_id: str):
    import wandb

    if cfg.wandb == "online" and not os.environ.get("WANDB_API_KEY"):
        raise RuntimeError("logging.wandb=online needs WANDB_API_KEY in the environment (it is never read from "
                           "a config file); or set logging.wandb=offline")
    # The fixed id lets an online resumed stage continue its run. Offline runs cannot be resumed (wandb
    # refuses), so each offline attempt gets its own id in the same group.
    if cfg.wandb == "offline":
        run_id = f"{run_id}-{uuid.uuid4().hex[:4]}"
    run = wandb.init(project=cfg.project, entity=cfg.entity, name=run_name, group=group, id=run_id,
                     resume="allow", mode=str(cfg.wandb), dir=str(out_dir), config=config,
                     settings=wandb.Settings(quiet=True))  # our own console line and summary say the same
    run.define_metric("*", step_metric="global_step")
    return run
