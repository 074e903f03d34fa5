"""Saved run configs from older pixelgens, brought up to the current schema.

A run folder's config.yaml starts with `schema_version: N` (SCHEMA_VERSION when it was written); folders from
before the version existed have none and count as version 0. `upgrade` applies, in order, every step from the
folder's version to SCHEMA_VERSION, on the plain data, before the typed schema sees it; a folder written by a
newer pixelgen (a higher version) is refused, naming both versions. A change to the schema that would make an
older folder fail to load (a key renamed, removed or given another meaning; a new key with a default is not
such a change) bumps SCHEMA_VERSION and adds its steps under the old version, with a fixture folder written by
the old code under tests/fixtures/run_folders/.

Version 0 covers every folder written before 2026-12-01 (commits a2d1621 .. a38c160). Its steps look for
the old key before changing anything, since those folders differ among themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.config import ConfigError, _DECODER_ONLY, _MOVED, _RENAMED

SCHEMA_VERSION = 1
VERSION_KEY = "schema_version"

Data = dict
Step = Callable[[Data], Data]


def _section(data: Data, name: str) -> dict | None:
    part = data.get(name)
    return part if isinstance(part, dict) else None


def _ema_decay_to_list(data: Data) -> Data:
    """train_*.ema_decay (one float) became ema_decays (a list; the first is the one exported as ema) in 58bb418."""
    for stage in ("train_trunk", "train_decoder"):
        part = _section(data, stage)
        if part is not None and "ema_decay" in part:
            rest = {k: v for k, v in part.items() if k != "ema_decay"}
            data = {**data, stage: {**rest, "ema_decays": [part["ema_decay"]]}}
    return data


def _launch_to_profiles(data: Data) -> Data:
    """launch.partition/account and launch.<stage>.gpus_per_task/cpus_per_task/mem_gb moved to cluster profiles
    in 0336011: dropped (resources, not the experiment; a resumed SLURM run takes them from its profile)."""
    launch = _section(data, "launch")
    if launch is None:
        return data
    return {**data, "launch": {stage: {k: v for k, v in res.items() if k not in _MOVED} if isinstance(res, dict)
                               else res for stage, res in launch.items() if stage not in _MOVED}}


def _renamed_keys(data: Data) -> Data:
    """Keys renamed with the same values (config._RENAMED): fid.reference_split became fid.reference in 14adcab."""
    for old, new in _RENAMED.items():
        section, old_key = old.split(".")
        part = _section(data, section)
        if part is not None and old_key in part:
            rest = {k: v for k, v in part.items() if k != old_key}
            data = {**data, section: {**rest, new.split(".")[1]: part[old_key]}}
    return data


def _fid_ema_to_weights(data: Data) -> Data:
    """fid.ema (a bool) became fid.weights (ema | model | ema-<decay> | a file) in 14adcab."""
    fid = _section(data, "fid")
    if fid is not None and "ema" in fid:
        rest = {k: v for k, v in fid.items() if k != "ema"}
        data = {**data, "fid": {**rest, "weights": "ema" if fid["ema"] else "model"}}
    return data


def _trunk_without_decoder_keys(data: Data) -> Data:
    """Before 2a25895 both training stages shared one schema, so train_trunk held the decoder's init_from,
    freeze_trunk and trunk_lr at their defaults: dropped (a non-default value is left for the schema to refuse,
    naming the key)."""
    trunk = _section(data, "train_trunk")
    if trunk is not None and all(trunk.get(k, v) == v for k, v in _DECODER_ONLY.items()):
        data = {**data, "train_trunk": {k: v for k, v in trunk.items() if k not in _DECODER_ONLY}}
    return data


# STEPS[v]: what takes a version-v config to version v + 1, in order.
STEPS: dict[int, list[Step]] = {
    0: [_ema_decay_to_list, _launch_to_profiles, _renamed_keys, _fid_ema_to_weights, _trunk_without_decoder_keys],
}
assert sorted(STEPS) == list(range(SCHEMA_VERSION)), "one list of steps per version below SCHEMA_VERSION"


def upgrade(data: Data, source: str | Path) -> Data:
    """`data` (a saved config, VERSION_KEY included or not) at SCHEMA_VERSION, without VERSION_KEY."""
    data = dict(data)
    version = data.pop(VERSION_KEY, 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ConfigError(f"{source}: {VERSION_KEY} = {version!r} is not a schema version (a whole number); the "
                          f"file was edited or is not a pixelgen run config")
    if version > SCHEMA_VERSION:
        import pixelgen

        raise ConfigError(f"{source} was written by a newer pixelgen (config schema {version}); this pixelgen "
                          f"({pixelgen.__version__}) reads schema {SCHEMA_VERSION} and older: upgrade pixelgen to "
                          f"read or resume this run folder")
    for v in range(version, SCHEMA_VERSION):
        for step in STEPS[v]:
            data = step(data)
    return data


def with_version(yaml_text: str) -> str:
    """A config's YAML as a run folder saves it: the schema version first."""
    return f"{VERSION_KEY}: {SCHEMA_VERSION}\n{yaml_text}"
