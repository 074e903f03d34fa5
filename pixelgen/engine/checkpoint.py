"""DeepSpeed checkpoints that count only when complete.

DeepSpeed writes `<dir>/<tag>/...` from every rank, and each rank may add its own state (its EMA shards) as
`<tag>/rank00000.pt`, ...; a tag becomes complete when rank 0 writes `<tag>/COMPLETE.json` after a barrier that
every rank reaches once its part is on disk. Resume takes the
newest complete tag and ignores anything half-written. Old tags are removed only after a newer one is
complete.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from pixelgen.engine import faults
from pixelgen.engine.dist import barrier
from pixelgen.io import atomic_write_file, atomic_write_text

MARKER = "COMPLETE.json"
_TAG = re.compile(r"^step(\d{8})$")


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

    def load(self, engine) -> tuple[int, dict, dict] | None:
        """The newest complete tag loaded into the engine: (step, client state, this rank's own state or {})."""
        latest = self.latest_complete()
        if latest is None:
            return None
        step, tag = latest
        saved_world = json.loads((self.dir / tag / MARKER).read_text()).get("world_size", self.world_size)
        if saved_world != self.world_size:
            # ZeRO shards, each rank's data position and RNG stream are per rank: loading them into another
            # number of ranks would resume silently wrong.
            raise RuntimeError(
                f"checkpoint {self.dir / tag} was written by {saved_world} ranks but this run has "
                f"{self.world_size}: relaunch with {saved_world} ranks (the stage's launch tasks) to resume it. "
                f"A stage cannot change its rank count midway; to run it on {self.world_size} ranks, move "
                f"{self.dir} aside and rerun, and the stage starts over")
        path, client_state = engine.load_checkpoint(str(self.dir), tag=tag)
        if path is None:
            raise RuntimeError(f"checkpoint {self.dir / tag} is marked complete but DeepSpeed could not load it")
        own = self.dir / tag / rank_file(self.rank)
        rank_state = torch.load(own, map_location="cpu", weights_only=True) if own.is_file() else {}
        return step, client_state, rank_state

    def _prune(self) -> None:
        tags = self._tags()
        complete = [t for t in tags if t[2]]
        newest = complete[-1][0]
        keep = {t[1] for t in complete[-self.keep:]}
        for step, tag, ok in tags:
            # Incomplete tags older than the newest complete one are dead writes; newer ones may be in flight.
            if tag not in keep and (ok or step < newest):
                shutil.rmtree(self.dir / tag, ignore_errors=True)
