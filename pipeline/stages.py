"""The four stages. Each is a function of (config, run folder) that writes into its own folder; `run_stage`
adds the contract: a finished stage is a no-op, the completion marker is written last, and a restarted
stage resumes from what is on disk."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from pipeline import rundir
from pipeline.config import ConfigError, SweepPoint, sweep_points, to_container
from pixelgen import families
from pixelgen.data import loader as data_loader
from pixelgen.data import shards as data_shards
from pixelgen.data import to_float
from pixelgen.engine.dist import barrier, init_distributed
from pixelgen.engine.export import MODEL_FILE, PRIMARY_EMA, ema_filename, load_weights, weights_metadata
from pixelgen.engine.train import PreemptionFlag, TrainTask, run_training
from pixelgen.eval import fid as fid_lib
from pixelgen.eval import sampling
from pixelgen.eval.sampling import Plan
from pixelgen.eval.config import SPLIT_REFERENCES, Metric, ema_decay, missing_reference_keys
from pixelgen.io import atomic_write_json, sha256_file
from pixelgen.precision import use_bf16
from pixelgen.progress import console, report
from pixelgen.viz import save_grid, to_uint8


class StagePreempted(RuntimeError):
    """The stage saved a checkpoint and stopped on a preemption signal; rerunning it resumes."""


def shard_dir(cfg, run_dir: Path) -> Path:
    return Path(cfg.data.shard_dir) if cfg.data.shard_dir else rundir.stage_dir(run_dir, "shard")


def _checked_manifest(cfg, run_dir: Path) -> dict:
    manifest = data_shards.read_manifest(shard_dir(cfg, run_dir))
    classes = len(manifest["classes"])
    if classes != cfg.data.num_classes:
        raise ConfigError(f"key 'data.num_classes' = {cfg.data.num_classes} but the shards in "
                          f"{shard_dir(cfg, run_dir)} hold {classes} classes: set data.num_classes={classes}")
    res = manifest["preprocessing"]["resolution"]
    if res is not None and res != cfg.data.resolution:  # None: original bytes, cropped by the loader
        raise ConfigError(f"key 'data.resolution' = {cfg.data.resolution} but the shards in "
                          f"{shard_dir(cfg, run_dir)} are {res}px: set data.resolution={res} or reshard")
    return manifest


# ----------------------------------------------------------------------------------------------------- shard
def stage_shard(cfg, run_dir: Path, task: int | None = None) -> dict:
    """All shards, or one array task's range of them (`task`); incomplete until the last task writes the manifest."""
    manifest = data_shards.write_shards(cfg.data.imagenet_dir, rundir.stage_dir(run_dir, "shard"), cfg.shard,
                                        cfg.data.resolution, progress=True, task=task)
    if manifest is None:
        return {"incomplete": True, "task": task}
    bad = manifest["bad_files"]
    if bad:
        console.print(f"shard: skipped {len(bad)} unreadable source files, listed in "
                      f"{rundir.stage_dir(run_dir, 'shard') / data_shards.BAD_FILES}", soft_wrap=True)
    return {"splits": {s: {**v["totals"], "shards": len(v["shards"])} for s, v in manifest["splits"].items()},
            "bad_files": len(bad), "classes": len(manifest["classes"]),
            "layouts": {s: v["layout"] for s, v in manifest["source"]["splits"].items()}}


# ------------------------------------------------------------------------------------------------- training
def _sample_fn(cfg, per_class: int = 2, max_classes: int = 16):
    """A class-balanced grid: `per_class` images for each of the first classes, fixed noise every time."""
    draw = families.get(cfg.model.trunk.kind).sampler(cfg)

    def fn(model) -> torch.Tensor:
        device = next(model.parameters()).device
        classes = min(cfg.model.num_classes, max_classes)
        y = torch.arange(classes, device=device).repeat_interleave(per_class)
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        was_training = model.training
        model.eval()
        x = draw(model, y, g)
        model.train(was_training)
        return to_uint8(x)

    return fn


def _train_images(cfg, run_dir: Path):
    """(batch, seed) -> float [-1, 1] batches of the training split, as one rank alone reads them."""
    def images(batch: int, seed: int):
        loader = data_loader.train_loader(shard_dir(cfg, run_dir), batch, seed=seed, rank=0, world_size=1,
                                          num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer,
                                          resolution=cfg.data.resolution)
        return (to_float(x) for x, _ in loader)

    return images


def _train(cfg, run_dir: Path, stage: str, make_model) -> dict:
    """One training stage of any family: the family says what trains, the loss, the sampler and the curves."""
    tc = cfg[stage]
    family = families.get(cfg.model.trunk.kind)
    model_cfg = OmegaConf.to_object(cfg.model)
    loss_fn = family.loss(cfg, stage, model_cfg, init_distributed().device)
    shards_dir = shard_dir(cfg, run_dir)
    data_shards.shard_paths(shards_dir, "train")  # fail before DeepSpeed starts when the train split is missing

    def data_fn(micro, rank, world, start_batch, segments):
        return iter(data_loader.train_loader(shards_dir, micro, seed=tc.seed, rank=rank, world_size=world,
                                             num_workers=cfg.data.num_workers,
                                             shuffle_buffer=cfg.data.shuffle_buffer, start_batch=start_batch,
                                             segments=[data_loader.Segment(*s) for s in segments],
                                             resolution=cfg.data.resolution))

    # The loader carries its position across a change of rank count (pixelgen.data.loader's Segment).
    task = TrainTask(make_model=make_model, trainable=family.trainable(cfg, stage), loss_fn=loss_fn,
                     sample_fn=_sample_fn(cfg), data_fn=data_fn, data_any_world=True, lr_of=family.lr_of(cfg, stage),
                     loss_terms=family.plot_keys)
    plain = to_container(cfg)
    result = run_training(task, tc, rundir.stage_dir(run_dir, stage), logging=cfg.logging,
                          run_name=f"{cfg.name}/{stage}", group=cfg.name, run_config=plain,
                          export_meta={"config": plain, "stage": stage})
    if result.preempted:
        raise StagePreempted(f"{stage} stopped at step {result.step} on a preemption signal, checkpoint saved; "
                             f"rerun to resume (a SLURM job requeues itself)")
    samples = sorted((rundir.stage_dir(run_dir, stage) / "samples").glob("*.png"))
    return {"steps": result.step, "final_loss": result.final_loss, "train_seconds": round(result.seconds, 1),
            "params_trainable": result.params_trainable, "params_total": result.params_total,
            "skipped_steps": result.skipped_steps,
            "export": str(result.export_dir),
            "sample_grid": str(samples[-1]) if samples else None,
            "curves": str(rundir.stage_dir(run_dir, stage) / "curves.png")}


def stage_train_trunk(cfg, run_dir: Path) -> dict:
    _checked_manifest(cfg, run_dir)
    ctx = families.StageContext(cfg=cfg, stage="train_trunk", stage_dir=rundir.stage_dir(run_dir, "train_trunk"),
                                dist=init_distributed(), train_images=_train_images(cfg, run_dir))
    init = families.get(cfg.model.trunk.kind).prepare(ctx)

    def make_model():
        model = families.build_generator(OmegaConf.to_object(cfg.model), cfg.data.resolution)
        if init is not None:
            init(model)
        return model

    return _train(cfg, run_dir, "train_trunk", make_model)


def _load_generator(cfg, path: Path):
    # No teacher weights for a DINO student's initialisation: the file's weights replace them.
    model = families.build_generator(OmegaConf.to_object(cfg.model), cfg.data.resolution, pretrained=False)
    state, _ = load_weights(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"weights '{path}' do not fit the generator of this config (missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}): check the model.* keys against the run that made them")
    return model


def stage_train_decoder(cfg, run_dir: Path) -> dict:
    _checked_manifest(cfg, run_dir)
    tc = cfg.train_decoder
    init = Path(tc.init_from) if tc.init_from else rundir.stage_dir(run_dir, "train_trunk") / "export" / PRIMARY_EMA
    load_weights(init)  # fail before DeepSpeed starts when the trunk's export is missing
    summary = _train(cfg, run_dir, "train_decoder", lambda: _load_generator(cfg, init))
    return {**summary, "init_from": str(init), "trunk_frozen": tc.freeze_trunk}


# ------------------------------------------------------------------------------------------------------ fid
def _generator_weights(cfg, run_dir: Path, weights: str | None = None) -> Path:
    """The file `weights` (a sweep entry's; default fid.weights) names: an export of the last training stage
    (its first EMA, the EMA of a given decay, or the trained weights) or a file of its own."""
    last = "train_decoder" if "train_decoder" in cfg.stages else "train_trunk"
    export = rundir.stage_dir(run_dir, last) / "export"
    weights = cfg.fid.weights if weights is None else weights
    if weights in ("ema", "model"):
        return export / (PRIMARY_EMA if weights == "ema" else MODEL_FILE)
    decay = ema_decay(weights)
    if decay is not None:
        decays = [float(d) for d in cfg[last].ema_decays]
        return export / ema_filename(decays.index(decay), decay)  # validated: one of them
    return Path(weights).expanduser()


def _is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _from_main(value):
    """The main rank's `value`, on every rank (what it found on disk, so that all ranks act on one view)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _cached(path: Path, meta: dict, needs: set, compute) -> tuple[dict | None, dict | None]:
    """(reference, meta) from the cache at `path` when it was made with `meta` and holds the arrays `needs`;
    otherwise `compute()` -> (reference, more meta), which every rank calls (it may share the work) and whose
    result on the main rank is saved there first. Other ranks get (None, None): only the main rank scores."""
    hit = None
    if _is_main() and path.exists():
        ref, saved = fid_lib.load_statistics(path)
        if {k: saved.get(k) for k in meta} == meta and needs <= ref.keys():
            hit = ref, saved
    if _from_main(hit is not None):
        return hit if _is_main() else (None, None)
    ref, extra = compute()
    if not _is_main():
        return None, None
    saved = {**meta, **extra}
    fid_lib.save_statistics(path, ref, saved)
    return ref, saved


def _split_features(cfg, run_dir: Path, manifest: dict, split: str, extractor) -> tuple[dict, dict]:
    """A split's reference, computed by all ranks together: each featurises every world-size-th shard (one
    pipeline per shard, so batches never depend on the rank count) and the moments merge on the main rank,
    with the pool3 features of the first fid.reference_images images for precision/recall."""
    fid = cfg.fid
    shards = manifest["splits"][split]["shards"]
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) \
        if torch.distributed.is_initialized() else (0, 1)
    counts = np.cumsum([s["count"] for s in shards])
    prc_shards = int(np.searchsorted(counts, fid.reference_images)) + 1  # the shards holding the first images
    moments = {name: None for name in (fid_lib.FEATURE_FID, fid_lib.FEATURE_SFID)}
    prc: dict[int, torch.Tensor] = {}
    mine = list(range(rank, len(shards), world))
    for index in report(mine, len(mine), f"reference: Inception features of the {split} split (rank {rank})",
                        unit="shards"):
        batches = data_loader.eval_batches(shard_dir(cfg, run_dir), split, fid.batch_size,
                                           resolution=cfg.data.resolution, shards=[index])
        features = extractor.extract(batches)
        for name in moments:
            moments[name] = moments[name] or fid_lib.Moments(features[name].shape[1], extractor.device)
            moments[name].update(features[name])
        if index < prc_shards:
            prc[index] = features[fid_lib.FEATURE_FID].to(torch.float32)
    for m in moments.values():
        m.gather()
    if world > 1:
        parts = [None] * world if rank == 0 else None
        torch.distributed.gather_object(prc, parts, dst=0)
        prc = {k: v for part in parts for k, v in part.items()} if rank == 0 else {}
    if rank != 0:
        return {}, {}
    pool3 = [prc[k] for k in sorted(prc)]
    summary = fid_lib.summary_from_moments(moments, moments[fid_lib.FEATURE_FID].count, [], pool3)
    ref = {k: summary[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}
    ref["features"] = summary["features"][:fid.reference_images]
    return ref, {"count": summary["count"]}


def _reference_cache(cfg, run_dir: Path, out: Path, name: str) -> Path:
    """Beside the shards (once per shard set, for every run that uses them) when that folder is writable, else
    in the stage's folder."""
    beside = shard_dir(cfg, run_dir) / "fid_reference"
    try:
        beside.mkdir(exist_ok=True)
        writable = os.access(beside, os.W_OK)
    except OSError:
        writable = False
    return (beside if writable else out) / name


def _reference(cfg, run_dir: Path, manifest: dict, out: Path, extractor, weights_sha256: str):
    """(reference, images its statistics summarise or None when unknown, its protocol entries) for
    `fid.reference`: a split's statistics, computed by all ranks and cached beside the shards with what made
    them (the shards' hashes, the Inception weights', the precision/recall image count), recomputed when any
    changed; or a reference file, whose images (ADM's arr_0) are featurised once for precision/recall and
    cached the same way. The reference is the main rank's alone (None elsewhere)."""
    fid = cfg.fid
    if fid.reference in SPLIT_REFERENCES:
        split = fid.reference
        if split not in manifest["splits"]:
            raise ConfigError(f"key 'fid.reference' = {split!r}: the shards in {shard_dir(cfg, run_dir)} hold the "
                              f"splits {sorted(manifest['splits'])}: add {split!r} to shard.splits and reshard, or "
                              f"set fid.reference to one of them or to a reference .npz file")
        meta = {"split": split, "shards": [s["sha256"] for s in manifest["splits"][split]["shards"]],
                "weights": weights_sha256, "prc_images": fid.reference_images}
        digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
        path = _reference_cache(cfg, run_dir, out, f"{split}-{digest}.npz")
        ref, saved = _cached(path, meta, {"mu_s", "features"},
                             lambda: _split_features(cfg, run_dir, manifest, split, extractor))
        return ref, saved and saved.get("count"), {"reference": split, "reference_cache": str(path)}

    path = str(Path(fid.reference).expanduser())
    why = missing_reference_keys(path, fid.metrics)  # checked when the config was loaded; the file may have changed
    if why:
        raise ConfigError(f"key 'fid.reference' = {fid.reference!r}: {why}")
    sha = sha256_file(path)
    desc = {"reference": "file", "reference_file": str(Path(path).resolve()), "reference_sha256": sha}
    ref = fid_lib.load_statistics(path)[0] if _is_main() else None
    if Metric.precision_recall in fid.metrics:
        def from_images():  # 10k images: the main rank alone
            if not _is_main():
                return {}, {}
            batches = fid_lib.load_reference_images(path).split(fid.batch_size)
            feats = extractor.extract(batches, progress=True, total=len(batches))
            return fid_lib.reference_from_features(feats, feats[fid_lib.FEATURE_FID].shape[0]), {}

        meta = {"file_sha256": sha, "weights": weights_sha256}
        cached, _ = _cached(out / "reference_file_features.npz", meta, {"features"}, from_images)
        if ref is not None:
            ref["features"] = cached["features"]
    return ref, None, desc


_SWEEP_COLUMNS = (("fid", None), ("isc_mean", "IS"), ("sfid", "sFID"), ("precision", "precision"),
                  ("recall", "recall"))


def _print_sweep(sweep: list[dict], metric_name: str, images: int) -> None:
    from rich.table import Table

    table = Table(title=f"{metric_name} sweep ({images} images each)")
    columns = [(key, title or metric_name) for key, title in _SWEEP_COLUMNS if key in sweep[0]]
    for col in ("sampler", "weights", *(title for _, title in columns)):
        table.add_column(col)
    for row in sweep:
        table.add_row(row["sampler"] or "(config)", row["weights"],
                      *(f"{row[key]:.3f}" if key in row else "-" for key, _ in columns))
    console.print(table)


class _Points:
    """Scores the points of a run (the config's sampler, then each fid.sweep entry): each drawn in chunks by
    every rank, scored by the main rank, kept as it finishes so that a restarted stage goes on from there."""

    def __init__(self, cfg, run_dir: Path, out: Path, extractor, ref_stats, proto: dict):
        self.cfg, self.run_dir, self.out, self.extractor, self.ref_stats = cfg, run_dir, out, extractor, ref_stats
        self.proto = proto
        self.dist = init_distributed()
        self.model, self.model_path = None, None

    def _generator(self, path: Path):
        if path != self.model_path:
            self.model = None  # one generator in memory at a time
            self.model = _load_generator(self.cfg, path).to(self.dist.device).eval()
            self.model_path = path
        return self.model

    def plan(self, point: SweepPoint, gen_sha: str) -> Plan:
        cfg = self.cfg
        key = {"sampler": to_container(point.sampler), "generator_sha256": gen_sha, "model": to_container(cfg.model),
               "resolution": cfg.data.resolution, "inception_sha256": self.proto["weights_sha256"],
               "sampling_precision": "bf16" if use_bf16(point.sampler.precision, self.dist.device) else "fp32"}
        return Plan(cfg.model.num_classes, cfg.fid.samples_per_class, cfg.fid.chunk_size, cfg.fid.batch_size,
                    cfg.fid.seed, key)

    def score(self, name: str, point: SweepPoint, label: str = "", primary: bool = False,
              extra: dict | None = None) -> dict | None:
        """The record of the point kept as points/<name>.json (None on ranks other than the main one), with
        `extra` in it; `label` says which point it is in the log; the primary point's grid is samples.png, with
        samples.npz beside it.
        Raises StagePreempted after finishing the chunk in hand when a preemption signal arrived."""
        out, cfg = self.out, self.cfg
        record_path = out / "points" / f"{name}.json"
        gen_path = _generator_weights(cfg, self.run_dir, point.weights)
        gen_sha = _from_main(sha256_file(gen_path) if _is_main() else None)
        plan = self.plan(point, gen_sha)
        expected = plan.as_json()
        done = None
        if _is_main() and record_path.is_file():
            saved = json.loads(record_path.read_text())
            done = saved if saved.get("plan") == expected else None
        folder = out / "chunks" / name
        if _from_main(done is not None):
            if _is_main() and folder.exists():  # killed between writing the record and removing the chunks
                shutil.rmtree(folder)
            return done
        todo = _from_main(sampling.open_plan(folder, plan) if _is_main() else None)
        rank, world = self.dist.rank, self.dist.world_size
        what = f" ({label})" if label else ""
        if _is_main():
            console.print(f"sampling {plan.num_samples} images in {plan.num_chunks} chunks{what}: "
                          f"{plan.num_chunks - len(todo)} on disk, {len(todo)} to draw on {world} rank(s)",
                          soft_wrap=True)
        draw = families.get(cfg.model.trunk.kind).sampler(cfg, point.sampler)
        model = self._generator(gen_path)
        flag = PreemptionFlag()
        try:
            finished = sampling.draw_chunks(folder, plan, todo[rank::world], draw, model, self.extractor,
                                            self.dist.device, stop=lambda: flag.raised,
                                            desc=f"sampling{what} (rank {rank})")
        finally:
            flag.restore()
        if not finished:
            raise StagePreempted(f"fid stopped on a preemption signal with {len(list(folder.glob('chunk*.npz')))} of "
                                 f"{plan.num_chunks} chunks of point {name} on disk; rerun to resume (a SLURM job "
                                 f"requeues itself)")
        barrier()  # every chunk on disk
        if not _is_main():
            return None
        labels: list[torch.Tensor] = []
        metrics = fid_lib.compute_metrics(sampling.feature_chunks(folder, plan, labels), self.ref_stats,
                                          cfg.fid.metrics)
        counts = torch.bincount(torch.cat(labels), minlength=plan.num_classes)
        images, per_row = sampling.grid_images(folder, plan)
        grid = save_grid(images, out / ("samples.png" if primary else f"points/{name}.png"), nrow=per_row)
        if primary:  # ADM-style sample batch (uint8 NHWC, arr_0) so the numbers can be checked with other evaluators
            sampling.write_samples_npz(folder, plan, out / "samples.npz")
        record = {"sampler": point.entry, "weights": point.weights, **metrics, "generator_weights": str(gen_path),
                  "generator_step": weights_metadata(gen_path).get("step"),  # the training step they come from
                  "class_counts": {"min": int(counts.min()), "max": int(counts.max())},
                  "sample_grid": str(grid), **(extra or {}), "plan": expected}
        atomic_write_json(record_path, record)
        shutil.rmtree(folder)  # its numbers are in the record, its images (point 0) in samples.npz
        return record


def fid_scorer(cfg, run_dir: Path, out: Path) -> tuple[_Points, int | None, dict]:
    """What scores points into `out` under the run's FID protocol (fid.*): the Inception features and the
    reference (cached beside the shards). Returns (scorer, reference image count or None, reference entries).
    A reference file needs no shards: scoring published weights against ADM's batch reads no ImageNet."""
    manifest = _checked_manifest(cfg, run_dir) if _needs_shards(cfg) else None
    out.mkdir(parents=True, exist_ok=True)
    dist = init_distributed()
    weights, is_proxy = fid_lib.resolve_inception_weights(cfg.fid, out)
    extractor = fid_lib.InceptionFeatures(weights, device=dist.device, batch_size=cfg.fid.batch_size)
    proto = fid_lib.protocol(cfg.fid, weights, is_proxy, 0, 0)  # hashes the weights file once
    ref_stats, num_ref, ref_desc = _reference(cfg, run_dir, manifest, out, extractor, proto["weights_sha256"])
    return _Points(cfg, run_dir, out, extractor, ref_stats, {**proto, "proxy": is_proxy}), num_ref, ref_desc


def _needs_shards(cfg) -> bool:
    """Whether the FID stage reads the shards: for a split's statistics, or to check them against the config
    where there are any (pipeline.config lets a reference file go without)."""
    return cfg.fid.reference in SPLIT_REFERENCES or bool(cfg.data.shard_dir) or "shard" in cfg.stages


def stage_fid(cfg, run_dir: Path) -> dict:
    out = rundir.stage_dir(run_dir, "fid")
    scorer, num_ref, ref_desc = fid_scorer(cfg, run_dir, out)
    dist, ref_stats, proto = scorer.dist, scorer.ref_stats, dict(scorer.proto)
    is_proxy = proto.pop("proxy")

    points = [SweepPoint("", cfg.sampler, cfg.fid.weights), *sweep_points(cfg)]
    rows = [scorer.score(f"point{k:03d}", point, f"{point.entry}; sweep {k}/{len(points) - 1}" if k else "",
                         primary=k == 0) for k, point in enumerate(points)]
    if not _is_main():
        return {"rank": dist.rank}
    main = rows[0]
    metrics = {k: main[k] for k in ("fid", "isc_mean", "isc_std", "isc_splits", "sfid", "precision", "recall")
               if main.get(k) is not None}
    num_gen = cfg.model.num_classes * cfg.fid.samples_per_class
    sweep = [{k: v for k, v in row.items() if k != "plan"} for row in rows]
    if len(points) > 1:
        _print_sweep(sweep, proto["metric_name"], num_gen)

    proto = {**proto, **ref_desc, "num_gen": num_gen, "num_ref": num_ref,
             "num_ref_precision_recall": len(ref_stats["features"]) if "features" in ref_stats else None,
             "class_counts": main["class_counts"], "chunk_size": cfg.fid.chunk_size,
             "batch_size": cfg.fid.batch_size, "ranks": dist.world_size,
             # On the CPU a convolution's bits depend on the threads that split it: part of "the same hardware".
             "cpu_threads_per_rank": torch.get_num_threads() if dist.device.type == "cpu" else None,
             "noise": "per image: seeded by (fid.seed, image index), whatever the batch or rank"}
    result = {
        "metric_name": proto["metric_name"],
        "proxy": is_proxy,
        **metrics,
        "protocol": proto,
        "generator_weights": main["generator_weights"],
        "generator_step": main["generator_step"],
        "sampler": to_container(cfg.sampler),
        "sampling_precision": main["plan"]["key"]["sampling_precision"],
        "samples_npz": str(out / "samples.npz"),
        "sample_grid": main["sample_grid"],
        **({"sweep": sweep} if len(points) > 1 else {}),
    }
    atomic_write_json(out / "metrics.json", result)
    summary = {"metric_name": proto["metric_name"], "proxy": is_proxy,
               **{k: metrics[k] for k in ("fid", "isc_mean", "sfid", "precision", "recall") if k in metrics},
               "reference": ref_desc["reference"], "metrics": str(out / "metrics.json"),
               "sample_grid": main["sample_grid"]}
    if len(points) > 1:
        best = min(sweep, key=lambda row: row["fid"])
        summary["best"] = {"sampler": best["sampler"] or "(config)", "weights": best["weights"], "fid": best["fid"]}
    return summary


STAGE_FUNCTIONS = {
    "shard": stage_shard,
    "train_trunk": stage_train_trunk,
    "train_decoder": stage_train_decoder,
    "fid": stage_fid,
}


def run_stage(name: str, cfg, run_dir: str | Path, task: int | None = None) -> dict:
    """Run one stage under the contract; returns its summary (the marker's content).

    `task`: this process is one task of the stage's job array (the shard stage); it does its part, and only
    the task that completes the stage writes the marker.
    """
    run_dir = Path(run_dir)
    done = rundir.marker(run_dir, name)
    if done is not None:
        return done
    with rundir.stage_lock(run_dir, name, task):
        done = rundir.marker(run_dir, name)  # it may have finished while we waited to start
        if done is not None:
            return done
        t0 = time.time()
        summary = STAGE_FUNCTIONS[name](cfg, run_dir, **({} if task is None else {"task": task}))
        summary = {"stage": name, "seconds": round(time.time() - t0, 1), **summary}
        is_main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        if is_main and not summary.get("incomplete"):
            rundir.mark_done(run_dir, name, summary)
    return summary
