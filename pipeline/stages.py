"""The four stages. Each is a function of (config, run folder) that writes into its own folder; `run_stage`
adds the contract: a finished stage is a no-op, the completion marker is written last, and a restarted
stage resumes from what is on disk."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from pipeline import rundir
from pipeline.config import ConfigError, sweep_points, to_container
from pixelgen import families
from pixelgen.data import loader as data_loader
from pixelgen.data import shards as data_shards
from pixelgen.data import to_float
from pixelgen.engine.dist import init_distributed
from pixelgen.engine.export import MODEL_FILE, PRIMARY_EMA, ema_filename, load_weights, weights_metadata
from pixelgen.engine.train import TrainTask, run_training
from pixelgen.eval import fid as fid_lib
from pixelgen.eval.config import SPLIT_REFERENCES, Metric, ema_decay, missing_reference_keys
from pixelgen.io import atomic_write_file, atomic_write_json, sha256_file
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

    def data_fn(micro, rank, world, start_batch):
        return iter(data_loader.train_loader(shards_dir, micro, seed=tc.seed, rank=rank, world_size=world,
                                             num_workers=cfg.data.num_workers,
                                             shuffle_buffer=cfg.data.shuffle_buffer, start_batch=start_batch,
                                             resolution=cfg.data.resolution))

    task = TrainTask(make_model=make_model, trainable=family.trainable(cfg, stage), loss_fn=loss_fn,
                     sample_fn=_sample_fn(cfg), data_fn=data_fn, lr_of=family.lr_of(cfg, stage),
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
def _generator_weights(cfg, run_dir: Path) -> Path:
    """The file `fid.weights` names: an export of the last training stage (its first EMA, the EMA of a given
    decay, or the trained weights) or a file of its own."""
    last = "train_decoder" if "train_decoder" in cfg.stages else "train_trunk"
    export = rundir.stage_dir(run_dir, last) / "export"
    weights = cfg.fid.weights
    if weights in ("ema", "model"):
        return export / (PRIMARY_EMA if weights == "ema" else MODEL_FILE)
    decay = ema_decay(weights)
    if decay is not None:
        decays = [float(d) for d in cfg[last].ema_decays]
        return export / ema_filename(decays.index(decay), decay)  # validated: one of them
    return Path(weights).expanduser()


def _cached(path: Path, meta: dict, needs: set, compute) -> tuple[dict, dict]:
    """(reference, meta) from the cache at `path` when it was made with `meta` and holds the arrays `needs`;
    otherwise `compute()` -> (reference, more meta), saved there first."""
    if path.exists():
        ref, saved = fid_lib.load_statistics(path)
        if {k: saved.get(k) for k in meta} == meta and needs <= ref.keys():
            return ref, saved
    ref, extra = compute()
    saved = {**meta, **extra}
    fid_lib.save_statistics(path, ref, saved)
    return ref, saved


def _reference(cfg, run_dir: Path, manifest: dict, out: Path, extractor, weights_sha256: str):
    """(reference, images its statistics summarise or None when unknown, its protocol entries) for
    `fid.reference`: a split's features, cached next to the metrics with what made them (the shards' hashes, the
    Inception weights', the precision/recall image count) and recomputed when any changed; or a reference file,
    whose images (ADM's arr_0) are featurised once for precision/recall and cached the same way."""
    fid = cfg.fid
    if fid.reference in SPLIT_REFERENCES:
        split = fid.reference
        if split not in manifest["splits"]:
            raise ConfigError(f"key 'fid.reference' = {split!r}: the shards in {shard_dir(cfg, run_dir)} hold the "
                              f"splits {sorted(manifest['splits'])}: add {split!r} to shard.splits and reshard, or "
                              f"set fid.reference to one of them or to a reference .npz file")

        def from_split():
            batches = data_loader.eval_batches(shard_dir(cfg, run_dir), split, fid.batch_size,
                                               resolution=cfg.data.resolution)
            total = -(-manifest["splits"][split]["totals"]["count"] // fid.batch_size)
            feats = extractor.extract(batches, progress=True, total=total)
            return (fid_lib.reference_from_features(feats, fid.reference_images),
                    {"count": feats[fid_lib.FEATURE_FID].shape[0]})

        meta = {"split": split, "shards": [s["sha256"] for s in manifest["splits"][split]["shards"]],
                "weights": weights_sha256, "prc_images": fid.reference_images}
        ref, saved = _cached(out / f"reference_{split}.npz", meta, {"mu_s", "features"}, from_split)
        return ref, saved.get("count"), {"reference": split}

    path = str(Path(fid.reference).expanduser())
    why = missing_reference_keys(path, fid.metrics)  # checked when the config was loaded; the file may have changed
    if why:
        raise ConfigError(f"key 'fid.reference' = {fid.reference!r}: {why}")
    sha = sha256_file(path)
    ref, _ = fid_lib.load_statistics(path)
    if Metric.precision_recall in fid.metrics:
        def from_images():
            batches = fid_lib.load_reference_images(path).split(fid.batch_size)
            feats = extractor.extract(batches, progress=True, total=len(batches))
            return fid_lib.reference_from_features(feats, feats[fid_lib.FEATURE_FID].shape[0]), {}

        meta = {"file_sha256": sha, "weights": weights_sha256}
        ref["features"] = _cached(out / "reference_file_features.npz", meta, {"features"}, from_images)[0]["features"]
    return ref, None, {"reference": "file", "reference_file": str(Path(path).resolve()), "reference_sha256": sha}


class _Scorer:
    """Class-balanced samples from one generator, seeded so that a rerun draws the same images, scored against
    the reference statistics."""

    def __init__(self, cfg, model, extractor, ref_stats, device):
        self.cfg, self.model, self.extractor, self.ref_stats, self.device = cfg, model, extractor, ref_stats, device
        n_cls, per = cfg.model.num_classes, cfg.fid.samples_per_class
        self.labels = torch.arange(n_cls).repeat_interleave(per)
        self.show = min(per, 8)  # per class in the grids, one class per row
        self.grid_idx = torch.cat([torch.arange(c * per, c * per + self.show) for c in range(min(n_cls, 16))])

    def __call__(self, sampler_cfg, what: str) -> tuple[torch.Tensor, dict]:
        bs, n = self.cfg.fid.batch_size, self.labels.numel()
        g = torch.Generator(device=self.device).manual_seed(self.cfg.fid.seed)
        draw = families.get(self.cfg.model.trunk.kind).sampler(self.cfg, sampler_cfg)
        chunks, t0 = [], time.monotonic()

        def rate() -> str:
            return f"{sum(len(c) for c in chunks) / max(time.monotonic() - t0, 1e-9):.2f} images/s"

        # A live bar on a terminal, a line with the rate and the ETA every 30 s in a SLURM log.
        starts = range(0, n, bs)
        for i in report(starts, len(starts), f"sampling {n} images{what}", unit="batches", extra=rate):
            y = self.labels[i:i + bs].to(self.device)
            chunks.append(to_uint8(draw(self.model, y, g)).cpu())
        images = torch.cat(chunks)
        batches = [images[i:i + bs] for i in range(0, len(images), bs)]
        feats = self.extractor.extract(batches, progress=True, total=len(batches))
        return images, fid_lib.compute_metrics(feats, self.ref_stats, self.cfg.fid.metrics)

    def grid(self, images: torch.Tensor, path: Path) -> Path:
        return save_grid(images[self.grid_idx], path, nrow=self.show)


def _sweep(cfg, out: Path, score: _Scorer) -> list[dict]:
    """The sweep's points, each kept as it finishes so that a restarted stage goes on from the next one."""
    rows = []
    points = sweep_points(cfg)
    for k, (entry, sampler_cfg) in enumerate(points, start=1):
        point_path = out / "sweep" / f"point{k:03d}.json"
        done = json.loads(point_path.read_text()) if point_path.is_file() else None
        if done is None or done["sampler"] != entry:
            images, metrics = score(sampler_cfg, f" ({entry}; sweep {k}/{len(points)})")
            done = {"sampler": entry, **{k: v for k, v in metrics.items() if k != "isc_splits"},
                    "sample_grid": str(score.grid(images, out / "sweep" / f"point{k:03d}.png"))}
            atomic_write_json(point_path, done)
        rows.append(done)
    return rows


_SWEEP_COLUMNS = (("fid", None), ("isc_mean", "IS"), ("sfid", "sFID"), ("precision", "precision"),
                  ("recall", "recall"))


def _print_sweep(sweep: list[dict], metric_name: str, images: int) -> None:
    from rich.table import Table

    table = Table(title=f"{metric_name} sweep ({images} images each)")
    columns = [(key, title or metric_name) for key, title in _SWEEP_COLUMNS if key in sweep[0]]
    for col in ("sampler", *(title for _, title in columns)):
        table.add_column(col)
    for row in sweep:
        table.add_row(row["sampler"] or "(config)", *(f"{row[key]:.3f}" if key in row else "-" for key, _ in columns))
    console.print(table)


def stage_fid(cfg, run_dir: Path) -> dict:
    manifest = _checked_manifest(cfg, run_dir)
    out = rundir.stage_dir(run_dir, "fid")
    out.mkdir(parents=True, exist_ok=True)
    weights, is_proxy = fid_lib.resolve_inception_weights(cfg.fid, out)
    dist = init_distributed()
    extractor = fid_lib.InceptionFeatures(weights, device=dist.device, batch_size=cfg.fid.batch_size)
    proto = fid_lib.protocol(cfg.fid, weights, is_proxy, 0, 0)  # hashes the weights file once
    ref_stats, num_ref, ref_desc = _reference(cfg, run_dir, manifest, out, extractor, proto["weights_sha256"])

    gen_path = _generator_weights(cfg, run_dir)
    model = _load_generator(cfg, gen_path).to(dist.device).eval()
    score = _Scorer(cfg, model, extractor, ref_stats, dist.device)
    images, metrics = score(cfg.sampler, "")
    # ADM-style sample batch (uint8 NHWC, arr_0) so the numbers can be checked with other evaluators.
    atomic_write_file(out / "samples.npz",
                      lambda f: np.savez(f, arr_0=images.permute(0, 2, 3, 1).numpy(), labels=score.labels.numpy()))
    grid = score.grid(images, out / "samples.png")
    points = _sweep(cfg, out, score)
    sweep = [{"sampler": "", **{k: v for k, v in metrics.items() if k != "isc_splits"}, "sample_grid": str(grid)},
             *points]
    if points:
        _print_sweep(sweep, proto["metric_name"], len(images))

    proto = {**proto, **ref_desc, "num_gen": len(images), "num_ref": num_ref,
             "num_ref_precision_recall": len(ref_stats["features"]) if "features" in ref_stats else None}
    result = {
        "metric_name": proto["metric_name"],
        "proxy": is_proxy,
        **metrics,
        "protocol": proto,
        "generator_weights": str(gen_path),
        "generator_step": weights_metadata(gen_path).get("step"),  # the training step the weights come from
        "sampler": to_container(cfg.sampler),
        "sampling_precision": "bf16" if use_bf16(cfg.sampler.precision, dist.device) else "fp32",
        "samples_npz": str(out / "samples.npz"),
        "sample_grid": str(grid),
        **({"sweep": sweep} if points else {}),
    }
    atomic_write_json(out / "metrics.json", result)
    summary = {"metric_name": proto["metric_name"], "proxy": is_proxy,
               **{k: metrics[k] for k in ("fid", "isc_mean", "sfid", "precision", "recall") if k in metrics},
               "reference": ref_desc["reference"], "metrics": str(out / "metrics.json"), "sample_grid": str(grid)}
    if points:
        best = min(sweep, key=lambda row: row["fid"])
        summary["best"] = {"sampler": best["sampler"] or "(config)", "fid": best["fid"]}
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
