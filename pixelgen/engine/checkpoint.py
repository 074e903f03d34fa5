"""DeepSpeed checkpoints that count only when complete.

DeepSpeed writes `<dir>/<tag>/...` from every rank, and each rank may add its own state (its EMA shards) as
`<tag>/rank00000.pt`, ...; a tag becomes complete when rank 0 writes `<tag>/COMPLETE.json` after a barrier that
every rank reaches once its part is on disk. Resume takes the
newest complete tag and ignores anything half-written. Old tags are removed only after a newer one is
complete.

A tag written by another number of ranks loads too (`load(..., other_world=True)`): without ZeRO the
optimizer state is whole in DeepSpeed's model file already; under ZeRO (1, 2 or 3) rank 0 first converts the
tag's shards into DeepSpeed's universal checkpoint (`<tag>/universal/`, one folder per parameter with its
fp32 master and Adam moments; made once, kept beside the tag and removed with it), which every rank then
loads into its own partition. The EMAs' rank files are joined into whole averages, for `EMA.load_state_dict`
to cut into the new partitions.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from pixelgen.engine import faults
from pixelgen.engine.dist import barrier
from pixelgen.io import atomic_write_file, atomic_write_text

MARKER = "COMPLETE.json"
UNIVERSAL = "universal"
_TAG = re.compile(r"^step(\d{8})$")


@dataclass
class Resumed:
    step: int
    client_state: dict  # what rank 0 saved for all
    rank_state: dict  # this rank's own file (its EMA shards); joined whole when the world changed
    saved_world: int  # the number of ranks that wrote the tag


def to_universal(tag_dir: Path) -> Path:
    """`tag_dir`'s ZeRO shards as DeepSpeed's universal checkpoint, `tag_dir/universal` (made under a temporary
    name and renamed when complete, so a crash leaves nothing that looks done); returns its path."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = tag_dir / UNIVERSAL
    if (out / MARKER).is_file():
        return out
    tmp = tag_dir / f"{UNIVERSAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # inject_missing_state: the tags hold no `universal_checkpoint_info` (a Megatron-style client's metadata
    # about tensor-parallel slices); data parallelism alone needs none, and DeepSpeed fills in its defaults.
    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # a line per parameter
        ds_to_universal(args)
    (tmp / MARKER).write_text(json.dumps({"from": tag_dir.name}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


class CheckpointManager:
    def __init__(self, directory: str | Path, keep: int, is_main: bool, world_size: int = 1, rank: int = 0):
        self.dir = Path(directory)
        self.rank = rank
        self.keep = keep
        self.is_main = is_main
        self.world_size = world_size

    def _tags(self) -> list[tuple[int, str, bool]]:
        if not self.dir.is_dir():
            return []
        out = []
        for child in self.dir.iterdir():
            m = _TAG.match(child.name)
            if m and child.is_dir():
                out.append((int(m.group(1)), child.name, (child / MARKER).is_file()))
        return sorted(out)

    def latest_complete(self) -> tuple[int, str] | None:
        complete = [(s, t) for s, t, ok in self._tags() if ok]
        return complete[-1] if complete else None

    def save(self, engine, step: int, client_state: dict, rank_state: dict | None = None) -> None:
        """`client_state`: what rank 0 keeps for all (DeepSpeed writes it); `rank_state`: this rank's own."""
        tag = tag_for(step)
        # No `latest` file: resume takes the newest tag with a marker, never what DeepSpeed last started writing.
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        if rank_state is not None:
            atomic_write_file(self.dir / tag / rank_file(self.rank), lambda f: torch.save(rank_state, f))
        faults.point("checkpoint", step)
        barrier()  # every rank's shard is on disk before the tag is declared complete
        if self.is_main:
            atomic_write_text(self.dir / tag / MARKER,
                              json.dumps({"step": step, "tag": tag, "world_size": self.world_size}))
            self._prune()
        barrier()

    def load(self, engine, other_world: bool = False) -> Resumed | None:
        """The newest complete tag loaded into the engine, or None. A tag of another rank count is refused
        unless `other_world` (the caller knows how to carry the rest of the state, its data position among
        it, across the change)."""
        latest = self.latest_complete()
        if latest is None:
            return None
        step, tag = latest
        tag_dir = self.dir / tag
        saved_world = json.loads((tag_dir / MARKER).read_text()).get("world_size", self.world_size)
        if saved_world == self.world_size:
            path, client_state = engine.load_checkpoint(str(self.dir), tag=tag)
            own = tag_dir / rank_file(self.rank)
            rank_state = torch.load(own, map_location="cpu", weights_only=True) if own.is_file() else {}
        elif not other_world:
            raise RuntimeError(
                f"checkpoint {tag_dir} was written by {saved_world} ranks but this run has {self.world_size}, "
                f"and this stage cannot carry its data position across the change: relaunch with "
                f"{saved_world} ranks (the stage's launch tasks) to resume it, or move {self.dir} aside and "
                f"rerun to start the stage over")
        else:
            path, client_state = self._load_resharded(engine, tag_dir)
            files = [tag_dir / rank_file(r) for r in range(saved_world)]
            rank_state = {}
            if all(f.is_file() for f in files):
                from pixelgen.engine.ema import whole_state

                rank_state = {"ema": whole_state([torch.load(f, map_location="cpu", weights_only=True)["ema"]
                                                  for f in files])}
        if path is None:
            raise RuntimeError(f"checkpoint {tag_dir} is marked complete but DeepSpeed could not load it")
        return Resumed(step, client_state, rank_state, saved_world)

    def _load_resharded(self, engine, tag_dir: Path):
        if engine.zero_optimization_stage() == 0:  # the optimizer state is whole in the model file
            return engine.load_checkpoint(str(self.dir), tag=tag_dir.name)
        if self.is_main:
            to_universal(tag_dir)
        barrier()
        # Read by load_checkpoint alone; set for this call only, so later saves are ordinary ZeRO tags.
        engine._config.load_universal_checkpoint = True
        try:
            return engine.load_checkpoint(str(tag_dir), tag=UNIVERSAL)
        finally:
            engine._config.load_universal_checkpoint = False

    def _prune(self) -> None:
        tags = self._tags()
        complete = [t for t in tags if t[2]]
        newest = complete[-1][0]
        keep = {t[1] for t in complete[-self.keep:]}
        for step, tag, ok in tags:
            # Incomplete tags older than the newest complete one are dead writes; newer ones may be in flight.
            if tag not in keep and (ok or step < newest):
                shutil.rmtree(self.dir / tag, ignore_errors=True)
