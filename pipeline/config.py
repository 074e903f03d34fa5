"""The experiment config: the component configs of pixelgen plus the stage list and launch settings.

Loading goes YAML file -> typed schema -> `key=value` overrides -> cross-field checks, and every error names
the key and where it came from (the file or the command line) before any stage starts or any job is
submitted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pixelgen import families
from pixelgen.data.config import DataConfig, ShardConfig, check_shard
from pixelgen.engine.config import (DecoderTrainConfig, LoggingConfig, TrainConfig, batch_split_error,
                                    check_decoder_train, check_train)
from pixelgen.eval.config import SPLIT_REFERENCES, FIDConfig, check_fid, ema_decay
from pixelgen.models.config import ModelConfig, ObjectiveConfig, SamplerConfig, check_objective, check_sampler
from pixelgen.models.teachers import check_weights as check_teacher_weights

STAGES = ("shard", "train_trunk", "train_decoder", "fid")


class ConfigError(ValueError):
    """A config problem, with the key, its source and what to do in the message."""


@dataclass
class StageResources:
    """How one stage runs on this machine (the local executor). On a cluster the profile decides
    (slurm/<name>.yaml, `--cluster NAME`)."""

    tasks: int = 1  # processes (ranks)
    timeout_min: int = 10080  # a week: a local run is not cut short


@dataclass
class LaunchConfig:
    shard: StageResources = field(default_factory=StageResources)
    train_trunk: StageResources = field(default_factory=StageResources)
    train_decoder: StageResources = field(default_factory=StageResources)
    fid: StageResources = field(default_factory=StageResources)


# Keys that moved to cluster profiles, with the profile key that replaces them.
_MOVED = {"partition": "partition", "account": "account", "gpus_per_task": "gpus_per_node",
          "cpus_per_task": "cpus_per_node", "mem_gb": "mem_gb"}


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    run_dir: Optional[str] = None  # default: runs/<name>
    seed: int = 0
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    data: DataConfig = field(default_factory=DataConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train_trunk: TrainConfig = field(default_factory=TrainConfig)
    train_decoder: DecoderTrainConfig = field(default_factory=DecoderTrainConfig)
    fid: FIDConfig = field(default_factory=FIDConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


# Keys of the decoder stage alone that run folders written before DecoderTrainConfig hold under train_trunk too,
# at their defaults (the two stages shared one schema); dropped when such a folder is read back.
_DECODER_ONLY = {"init_from": None, "freeze_trunk": True, "trunk_lr": None}
# Keys renamed since run folders were first written: old name -> new name (the value carries over).
_RENAMED = {"fid.reference_split": "fid.reference"}


def _explain(err: OmegaConfBaseException, source: str, unknown: str | None = None) -> ConfigError:
    """The ConfigError for OmegaConf's error on merging YAML or overrides into a typed schema (the experiment,
    a cluster profile, the shard settings): names `source` and the key; `unknown` says what to do about an
    unknown key (default: the experiment's schema)."""
    key = getattr(err, "full_key", None) or "?"
    msg = getattr(err, "msg", None) or str(err)
    msg = msg.split("\n")[0]
    if key.startswith("launch.") and key.split(".")[-1] in _MOVED:  # only the experiment has launch.<stage>
        return ConfigError(f"{source}: key '{key}' moved to the cluster profile (slurm/<name>.yaml, key "
                           f"'{_MOVED[key.split('.')[-1]]}'), selected with --cluster NAME; the experiment's "
                           f"launch.<stage> keeps only tasks and timeout_min for local runs")
    if key == "fid.ema":
        return ConfigError(f"{source}: key 'fid.ema' is now 'fid.weights': ema (true) or model (false), or "
                           f"ema-<decay> for another EMA, or a .safetensors file")
    if key in _RENAMED:
        return ConfigError(f"{source}: key '{key}' is now '{_RENAMED[key]}' (same values, and more): rename it")
    if key.startswith("train_trunk.") and key.split(".", 1)[1] in _DECODER_ONLY:
        return ConfigError(f"{source}: key '{key}' belongs to the decoder stage alone (the trunk stage has no "
                           f"trunk to load or freeze): set train_decoder.{key.split('.', 1)[1]} instead")
    if "not in struct" in msg or "Key '" in msg and "not in" in msg:
        hint = unknown or "remove it or check its spelling against the schema (pixelgen/*/config.py)"
        return ConfigError(f"{source}: unknown key '{key}': {hint}")
    return ConfigError(f"{source}: bad value for key '{key}': {msg}")


def _merge(base, other, source: str):
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:
        raise _explain(err, source) from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Load an experiment YAML, apply `key=value` overrides and validate. Returns the typed config."""
    cfg = OmegaConf.structured(ExperimentConfig)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist: pass a YAML file such as configs/demo.yaml")
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:  # yaml.YAMLError and friends
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if loaded is None:
            loaded = OmegaConf.create({})
        cfg = _merge(cfg, loaded, str(path))
    return with_overrides(cfg, overrides, str(path) if path is not None else "defaults")


def with_overrides(cfg, overrides: list[str], source: str):
    """`cfg` (typed) with `key=value` overrides applied, validated; `source` names where `cfg` came from."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override '{item}' is not of the form key=value (e.g. train_trunk.steps=100)")
        try:
            dot = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as err:
            raise ConfigError(f"command line: cannot parse override '{item}': {err}") from None
        cfg = _merge(cfg, dot, f"command line override '{item}'")
    if overrides:
        source += f" with overrides {' '.join(overrides)}"
    validate(cfg, source)
    return cfg  # an OmegaConf DictConfig typed by ExperimentConfig


def validate(cfg, source: str = "config") -> None:
    """Every cross-field check, before anything runs: each component's own (next to its config), then the ones
    that need several components. Raises ConfigError naming the key and `source`."""

    def fail(key: str, value: Any, why: str):
        raise ConfigError(f"{source}: key '{key}' = {value!r}: {why}")

    def fail_from(err: Exception):
        raise ConfigError(f"{source}: {err}") from None

    _check_stages(cfg, fail)
    res = cfg.data.resolution
    if res <= 0:
        fail("data.resolution", res, "must be positive")
    if cfg.model.num_classes != cfg.data.num_classes:
        fail("model.num_classes", cfg.model.num_classes, f"must equal data.num_classes={cfg.data.num_classes}")
    try:
        families.check_model_config(OmegaConf.to_object(cfg.model), res)
        check_shard(cfg.shard, res)
    except ValueError as err:
        fail_from(err)
    check_objective(cfg.objective, fail)
    check_sampler(cfg.sampler, fail)
    for point in sweep_points(cfg, source):
        def fail_entry(key: str, value: Any, why: str, entry=point.entry):
            raise ConfigError(f"{source}: key 'fid.sweep' entry {entry!r}: {key} = {value!r}: {why}")

        check_sampler(point.sampler, fail_entry)
        check_weights(cfg, "weights", point.weights, fail_entry)
    check_fid(cfg.fid, fail)
    family = families.get(cfg.model.trunk.kind)
    family.check_experiment(cfg, fail)
    for key, teacher in family.teachers(cfg):
        try:
            check_teacher_weights(teacher, key)
        except (ValueError, FileNotFoundError) as err:
            fail_from(err)
    check_train(cfg.train_trunk, "train_trunk", fail)
    check_decoder_train(cfg.train_decoder, "train_decoder", fail)
    for name in ("train_trunk", "train_decoder"):
        why = batch_split_error(cfg[name], cfg.launch[name].tasks)
        if why:
            fail(f"{name}.batch_size", cfg[name].batch_size, f"{why} (launch.{name}.tasks)")
    check_weights(cfg, "fid.weights", cfg.fid.weights, fail)
    if cfg.train_decoder.init_from and not Path(cfg.train_decoder.init_from).is_file():
        fail("train_decoder.init_from", cfg.train_decoder.init_from, "file does not exist")


def _check_stages(cfg, fail) -> None:
    """The stage list, and what each configured stage needs from outside the chain."""
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        fail("stages", list(cfg.stages), f"unknown stage(s) {unknown}; known stages are {list(STAGES)}")
    order = [STAGES.index(s) for s in cfg.stages]
    if order != sorted(order) or len(set(order)) != len(order):
        fail("stages", list(cfg.stages), f"stages must be distinct and in pipeline order {list(STAGES)}")
    stages = set(cfg.stages)
    if "shard" in stages and not cfg.data.imagenet_dir:
        fail("data.imagenet_dir", cfg.data.imagenet_dir,
             "the shard stage needs an ImageNet-layout folder (make one with `pixelgen fake-imagenet DIR`)")
    # FID alone against a reference file (published weights scored against ADM's batch) reads no images.
    needs_images = stages & {"train_trunk", "train_decoder"} or ("fid" in stages and cfg.fid.reference in SPLIT_REFERENCES)
    if "shard" not in stages and not cfg.data.shard_dir and needs_images:
        fail("data.shard_dir", cfg.data.shard_dir, "without the shard stage, point data.shard_dir at existing shards"
             + ("" if stages & {"train_trunk", "train_decoder"} else ", or fid.reference at a reference .npz file"))
    if "train_decoder" in stages and "train_trunk" not in stages and not cfg.train_decoder.init_from:
        fail("train_decoder.init_from", cfg.train_decoder.init_from,
             "the decoder stage needs a trunk: add train_trunk to stages or set train_decoder.init_from "
             "to an exported generator .safetensors file")
    if "fid" in stages and not stages & {"train_trunk", "train_decoder"} and not Path(cfg.fid.weights).is_file():
        fail("stages", list(cfg.stages), "the fid stage needs a trained generator: include train_trunk or "
                                         "train_decoder, or set fid.weights to an exported .safetensors file")


class SweepPoint(NamedTuple):
    entry: str  # as written in fid.sweep
    sampler: Any  # the run's sampler with the entry's sampler keys set
    weights: str  # the entry's weights=..., else fid.weights


def sweep_points(cfg, source: str = "config") -> list[SweepPoint]:
    """The points of fid.sweep: each entry is space-separated sampler keys, and optionally `weights=` (a value
    of fid.weights, e.g. ema-0.9999) to score another EMA: the CFG scale x EMA decay sweep papers tune on."""
    points = []
    for entry in cfg.fid.sweep:
        where = f"{source}: key 'fid.sweep' entry {entry!r}"
        if not entry.split():
            raise ConfigError(f"{where}: an entry sets at least one sampler key (the config's own sampler is "
                              f"always scored first)")
        sampler, weights = sampler_entry(cfg, entry, where)
        points.append(SweepPoint(entry, sampler, weights or cfg.fid.weights))
    return points


def sampler_entry(cfg, entry: str, where: str):
    """(the run's sampler with the entry's space-separated sampler keys set, the entry's weights=... or None)."""
    items = entry.split()
    if any("=" not in item for item in items):
        raise ConfigError(f"{where}: write space-separated sampler keys and optionally weights=..., e.g. "
                          f"\"guidance=semantic semantic_cfg_scale=2.0\" or \"cfg_scale=1.5 weights=ema-0.9999\"")
    weights = [item.split("=", 1)[1] for item in items if item.startswith("weights=")]
    keys = [item for item in items if not item.startswith("weights=")]
    try:
        sampler = OmegaConf.merge(cfg.sampler, OmegaConf.from_dotlist(keys))
    except OmegaConfBaseException as err:
        raise _explain(err, where) from None
    return sampler, weights[-1] if weights else None


def check_weights(cfg, key: str, weights: str, fail) -> None:
    """`weights` (fid.weights or a sweep entry's weights=) names what the last training stage exports."""
    last = "train_decoder" if "train_decoder" in cfg.stages else "train_trunk"
    decay = ema_decay(weights)
    if decay is not None and decay not in [float(d) for d in cfg[last].ema_decays]:
        fail(key, weights, f"{last} keeps the EMAs of decays {list(cfg[last].ema_decays)}: name one of them "
                           f"(ema-<decay>), ema for the first, or model")
    elif not (weights in ("ema", "model") or decay is not None or Path(weights).expanduser().is_file()):
        fail(key, weights, "must be ema, ema-<decay> (one of the training stage's ema_decays), model, or an "
                           "existing .safetensors file")


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def config_hash(cfg) -> str:
    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16]


def to_container(cfg) -> dict:
    """Plain data (dicts, lists, scalars; the choices as their strings) for checkpoints, JSON and wandb."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def from_container(data: dict):
    """Rebuild a typed config from plain data (a saved run config at the current schema: see
    pipeline.migrations); validated like a file."""
    cfg = _merge(OmegaConf.structured(ExperimentConfig), OmegaConf.create(data), "saved run config")
    validate(cfg, "saved run config")
    return cfg
