"""Shard stage: an ImageNet folder -> WebDataset tar shards + a manifest.

Output of `write_shards(src, out, cfg, resolution)`:
    out/{split}-{index:06d}.tar   samples {"__key__": file stem, "png"|"webp"|"jpg": image bytes, "cls": class index}
    out/bad_files.csv             source files that were skipped, with the reason
    out/manifest.json             written last: per shard its count, bytes and sha256; totals; preprocessing;
                                  the source layout; the classes; the bad files

Which source file lands in which shard is a pure function of the source files and the settings, and the tars
are byte-deterministic. So an interrupted run resumes by keeping the shards already finished (checked
against their sha256) and writing only the rest, and the tasks of a SLURM job array can each write their own
range of shards: every task saves its records in its own progress file, and whichever task finds all shards
done writes the manifest.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import glob
import hashlib
import io
import json
import os
import random
import warnings
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import Pool

import webdataset as wds
from PIL import Image

from pixelgen.data.config import ShardConfig, check_shard
from pixelgen.data.sources import Source, scan_source
from pixelgen.io import atomic_write, atomic_write_json, leftover_temps, sha256_file
from pixelgen.progress import report

MANIFEST = "manifest.json"
BAD_FILES = "bad_files.csv"
LOCK = ".shard.lock"
FORMAT_VERSION = 2
PROBE_IMAGES = 64  # images encoded up front to size shards by bytes
TAR_OVERHEAD = 1536  # per sample: two 512-byte member headers and half a block of padding on average
# What a damaged or non-image file raises while being decoded.
BAD_FILE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_SOURCE_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """ADM/DiT `center_crop_arr`: halve with BOX while possible, BICUBIC to min side, center crop."""
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left = (image.width - resolution) // 2
    top = (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def encode_image(path: str, resolution: int | None, image_format: str, quality: int) -> tuple[str, bytes]:
    """(extension, bytes) of one source image as it goes into a shard; raises one of BAD_FILE_ERRORS."""
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ValueError("empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Possibly corrupt EXIF data": harmless, and per file
        with Image.open(io.BytesIO(data)) as image:
            source_format = image.format
            # convert() decodes everything (CMYK and grayscale become RGB), so a truncated file fails here.
            rgb = image.convert("RGB")
    if image_format == "original" and source_format in _SOURCE_EXT:
        return _SOURCE_EXT[source_format], data
    buffer = io.BytesIO()
    if image_format == "original":  # a format readers may not expect (GIF, BMP, ...): whole, as lossless PNG
        rgb.save(buffer, format="PNG")
        return "png", buffer.getvalue()
    crop = center_crop(rgb, resolution)
    if image_format == "png":
        crop.save(buffer, format="PNG")
    elif image_format == "webp":
        crop.save(buffer, format="WEBP", lossless=True)
    else:
        crop.save(buffer, format="JPEG", quality=quality)
    return image_format, buffer.getvalue()


def _reason(error: Exception) -> str:
    if isinstance(error, Image.UnidentifiedImageError):  # its message names a BytesIO, not the file
        return "not an image: PIL recognises no image format in it"
    return f"{type(error).__name__}: {error}"


def _write_shard(task: dict) -> dict:
    """Encode one planned shard to `<file>.tmp`, then rename it into place. Runs in a pool worker."""
    path = os.path.join(task["out_dir"], task["file"])
    bad_files = []
    count = 0
    with open(path + ".tmp", "wb") as stream:
        # Fixed mtime: TarWriter would otherwise stamp the current time and the bytes would differ per run.
        with wds.TarWriter(stream, mtime=0) as writer:
            for src, key, label in task["members"]:
                try:
                    ext, data = encode_image(src, task["resolution"], task["format"], task["quality"])
                except BAD_FILE_ERRORS as e:
                    bad_files.append({"path": src, "reason": _reason(e),
                                      "split": task["split"], "shard": task["file"]})
                    continue
                writer.write({"__key__": key, ext: data, "cls": label})
                count += 1
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(path + ".tmp", path)
    return {"file": task["file"], "count": count, "bytes": os.path.getsize(path), "sha256": sha256_file(path),
            "plan": task["plan"], "bad_files": bad_files}


def _sample_key(path: str) -> str:
    # webdataset splits a sample's files at the first dot of the name, so the key must not have one.
    return os.path.splitext(os.path.basename(path))[0].replace(".", "_")


def _probe_mean_bytes(members: list, cfg: ShardConfig, resolution: int | None) -> float | None:
    """Mean encoded size of the first images of the (shuffled, so representative) split."""
    sizes = []
    for path, _, _ in members[:PROBE_IMAGES]:
        with contextlib.suppress(*BAD_FILE_ERRORS):
            sizes.append(len(encode_image(path, resolution, cfg.image_format, cfg.jpeg_quality)[1]))
    return sum(sizes) / len(sizes) if sizes else None


def _plan_split(source: Source, split: str, cfg: ShardConfig, resolution: int | None) -> dict:
    """{"samples_per_shard", "probe_mean_bytes", "shards": [{file, split, members: [(path, key, label)]}]}."""
    index = {wnid: i for i, wnid in enumerate(source.classes)}
    members, seen = [], {}
    for path, wnid in source.splits[split].items:
        key = _sample_key(path)
        if key in seen:
            raise ValueError(f"{path} and {seen[key]} give the same sample key {key!r}; rename one")
        seen[key] = path
        members.append((path, key, index[wnid]))
    random.Random(cfg.seed).shuffle(members)
    mean = _probe_mean_bytes(members, cfg, resolution)
    # 10% headroom, as the probe mean is an estimate of the shard's mean.
    per_shard = cfg.max_count if mean is None else int(cfg.max_bytes // (1.1 * mean + TAR_OVERHEAD))
    per_shard = max(1, min(cfg.max_count, per_shard))
    shards = [{"file": f"{split}-{i // per_shard:06d}.tar", "split": split, "members": members[i:i + per_shard]}
              for i in range(0, len(members), per_shard)]
    return {"samples_per_shard": per_shard, "probe_mean_bytes": mean and round(mean), "shards": shards}


def _settings(src_dir: str, cfg: ShardConfig, resolution: int) -> dict:
    """Everything that decides the shard bytes; a finished or partial output must match it to be reused."""
    original = cfg.image_format == "original"
    return {
        "format_version": FORMAT_VERSION,
        "source_dir": src_dir,
        "splits": list(cfg.splits),
        "seed": cfg.seed,
        "max_count": cfg.max_count,
        "max_bytes": cfg.max_bytes,
        "preprocessing": {
            "crop": "none" if original else "adm_center",
            "resolution": None if original else resolution,
            "format": cfg.image_format,
            "quality": cfg.jpeg_quality if cfg.image_format == "jpg" else None,
        },
    }


def _check_settings(found: dict, settings: dict, path: str) -> None:
    """Raise unless `found` (a manifest or progress settings) was made with `settings`."""
    # list() gives the split names both from a manifest's {split: shards} and from a settings list.
    found = {**found, "splits": list(found.get("splits", []))}
    differing = {k: f"{found.get(k)!r} (requested {v!r})" for k, v in settings.items() if found.get(k) != v}
    if differing:
        raise ValueError(
            f"{path} was made with different settings: {differing}; use another shard folder or delete this one"
        )


def _manifest_shards(manifest: dict) -> list[dict]:
    return [s for split in manifest["splits"].values() for s in split["shards"]]


def _present(out_dir: str, record: dict) -> bool:
    """The shard of `record` exists with its recorded size (cheap; sha256 is checked where it matters)."""
    path = os.path.join(out_dir, record["file"])
    return os.path.isfile(path) and os.path.getsize(path) == record["bytes"]


def _progress_path(out_dir: str, task: int | None, tasks: int) -> str:
    name = "progress-all.json" if task is None else f"progress-{task}-of-{tasks}.json"
    return os.path.join(out_dir, name)


def _trusted_records(out_dir: str, settings: dict) -> dict[str, dict]:
    """Shard records of earlier or concurrent tasks with the same settings: the manifest, then progress files."""
    records = {}
    manifest_path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(manifest_path):
        manifest = read_manifest(out_dir)
        _check_settings(manifest, settings, manifest_path)
        for shard in _manifest_shards(manifest):
            bad_files = [b for b in manifest["bad_files"] if b["shard"] == shard["file"]]
            records[shard["file"]] = {**shard, "bad_files": bad_files}
    for path in sorted(glob.glob(os.path.join(out_dir, "progress-*.json"))):
        with open(path) as f:
            progress = json.load(f)
        _check_settings(progress["settings"], settings, path)
        records.update(progress["shards"])
    return records


@contextlib.contextmanager
def _dir_lock(out_dir: str):
    """Serialise manifest writing between the tasks of an array (flock works across nodes on Lustre/GPFS/NFSv4)."""
    with open(os.path.join(out_dir, LOCK), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _task_range(num_shards: int, task: int | None, tasks: int) -> range:
    if task is None:
        return range(num_shards)
    if not 0 <= task < tasks:
        raise ValueError(f"array task {task} is outside 0..{tasks - 1} (shard.array_tasks={tasks}); submit the "
                         f"array with --array=0-{tasks - 1} or change shard.array_tasks")
    return range(task * num_shards // tasks, (task + 1) * num_shards // tasks)


def _bad_files_csv(bad_files: list[dict]):
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["split", "shard", "path", "reason"])
            writer.writeheader()
            writer.writerows(bad_files)

    return write


def _finalize(out_dir: str, settings: dict, source: Source, plans: dict[str, dict]) -> dict | None:
    """Write the manifest if every planned shard is done (by any task); None while some are not."""
    with _dir_lock(out_dir):
        records = _trusted_records(out_dir, settings)
        for plan in plans.values():
            for shard in plan["shards"]:
                record = records.get(shard["file"])
                if not (record and record["plan"] == shard["plan"] and _present(out_dir, record)):
                    return None
        manifest = {**settings, "source": source.describe(), "classes": source.classes,
                    "class_names": source.names, "splits": {}, "bad_files": []}
        for split, plan in plans.items():
            split_records = [records[s["file"]] for s in plan["shards"]]
            manifest["splits"][split] = {
                # "plan" stays in the manifest so a rerun can tell whether a shard still matches the source.
                "shards": [{k: r[k] for k in ("file", "count", "bytes", "sha256", "plan")} for r in split_records],
                "totals": {k: sum(r[k] for r in split_records) for k in ("count", "bytes")},
                "samples_per_shard": plan["samples_per_shard"],
                "probe_mean_bytes": plan["probe_mean_bytes"],
            }
            manifest["bad_files"] += [{"split": split, **b} for r in split_records for b in r["bad_files"]]
        manifest["bad_files"].sort(key=lambda b: b["path"])
        manifest["totals"] = {k: sum(s["totals"][k] for s in manifest["splits"].values()) for k in ("count", "bytes")}
        atomic_write(os.path.join(out_dir, BAD_FILES), _bad_files_csv(manifest["bad_files"]))
        atomic_write_json(os.path.join(out_dir, MANIFEST), manifest)
        _remove_leftovers(out_dir)  # every writer is done: its shard is recorded and present
        return manifest


def _leftovers(out_dir: str) -> list[str]:
    """What a finished folder no longer needs: the progress files, and the temporary files of a progress
    file, bad_files.csv or the manifest that a writer killed between write and rename left."""
    return glob.glob(os.path.join(out_dir, "progress-*.json")) + [
        str(path) for pattern in ("progress-*.json", BAD_FILES, MANIFEST) for path in leftover_temps(out_dir, pattern)]


def _remove_leftovers(out_dir: str) -> None:
    for path in _leftovers(out_dir):
        os.remove(path)


def write_shards(src_dir: str, out_dir: str, cfg: ShardConfig, resolution: int, progress: bool = True,
                 task: int | None = None) -> dict | None:
    """Shard the splits `cfg.splits` of the ImageNet folder `src_dir` into `out_dir`; returns the manifest.

    `task` (0-based) writes only that array task's range of the shards (of `cfg.array_tasks` ranges) and
    returns None when other tasks still have shards to write; the last task to finish writes the manifest.
    A no-op when `out_dir` already holds a manifest with the same settings and all its shards.
    Unreadable images are skipped and listed in `bad_files.csv` and the manifest.
    """
    check_shard(cfg, resolution)
    if not src_dir:
        raise ValueError("no source folder to shard: set data.imagenet_dir to an ImageNet folder")
    src_dir = os.path.abspath(src_dir)
    settings = _settings(src_dir, cfg, resolution)
    preprocessing = settings["preprocessing"]
    manifest_path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(manifest_path):
        manifest = read_manifest(out_dir)
        _check_settings(manifest, settings, manifest_path)
        if all(_present(out_dir, shard) for shard in _manifest_shards(manifest)):
            if _leftovers(out_dir):  # a finaliser killed after writing the manifest left these
                with _dir_lock(out_dir):  # (only then: the folder may be read-only, shared by many runs)
                    _remove_leftovers(out_dir)
            return manifest

    source = scan_source(src_dir, list(cfg.splits), cfg.val_labels)
    plans = {split: _plan_split(source, split, cfg, preprocessing["resolution"]) for split in cfg.splits}
    shards = [s for plan in plans.values() for s in plan["shards"]]
    for shard in shards:
        # The plan digest ties a record to the exact files it was made from, so a changed source reshards.
        members = json.dumps([settings, shard["members"]]).encode()
        shard["plan"] = hashlib.sha256(members).hexdigest()
    owned = [shards[i] for i in _task_range(len(shards), task, cfg.array_tasks)]

    os.makedirs(out_dir, exist_ok=True)
    for shard in owned:  # only this task's leftovers: other tasks may be writing theirs right now
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out_dir, shard["file"] + ".tmp"))
    trusted = _trusted_records(out_dir, settings)
    mine, todo = {}, []
    for shard in owned:
        record = trusted.get(shard["file"])
        path = os.path.join(out_dir, shard["file"])
        if record and record["plan"] == shard["plan"] and os.path.isfile(path) and sha256_file(path) == record["sha256"]:
            mine[shard["file"]] = record
        else:
            todo.append({**shard, "out_dir": out_dir, **preprocessing})

    progress_path = _progress_path(out_dir, task, cfg.array_tasks)
    images = [0]
    pool = Pool(cfg.workers) if cfg.workers > 1 and len(todo) > 1 else None
    with pool or contextlib.nullcontext():
        done = pool.imap_unordered(_write_shard, todo) if pool else map(_write_shard, todo)
        what = "shards" if task is None else f"shards (task {task} of {cfg.array_tasks})"
        for record in report(done, len(todo), f"writing {what}", unit="shards", enabled=progress,
                             extra=lambda: f"{images[0]} images"):
            mine[record["file"]] = record
            images[0] += record["count"]
            atomic_write_json(progress_path, {"settings": settings, "shards": mine})
    return _finalize(out_dir, settings, source, plans)


def read_manifest(shard_dir: str) -> dict:
    path = os.path.join(shard_dir, MANIFEST)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no shard manifest at {path}; run the shard stage (`pixelgen stage shard`) to create it"
        ) from None
    except json.JSONDecodeError as e:
        raise ValueError(
            f"shard manifest {path} is not valid JSON ({e}); delete it and rerun the shard stage "
            "(`pixelgen stage shard`)"
        ) from e


def shard_paths(shard_dir: str, split: str) -> list[str]:
    manifest = read_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise KeyError(
            f"split {split!r} is not in the shard manifest of {shard_dir} (it has {sorted(manifest['splits'])}); "
            "add it to the shard config's splits and rerun the shard stage"
        )
    return [os.path.join(shard_dir, s["file"]) for s in manifest["splits"][split]["shards"]]


def verify_shards(shard_dir: str, workers: int = 4, progress: bool = True) -> list[str]:
    """Check every shard of the manifest: present, the recorded size and sha256. Returns the problems found,
    each naming its shard; empty when all is well."""
    manifest = read_manifest(shard_dir)
    shards = _manifest_shards(manifest)

    def check(shard: dict) -> str | None:
        path = os.path.join(shard_dir, shard["file"])
        if not os.path.isfile(path):
            return f"{path}: missing"
        size = os.path.getsize(path)
        if size != shard["bytes"]:
            return f"{path}: {size} bytes, the manifest says {shard['bytes']}"
        digest = sha256_file(path)
        if digest != shard["sha256"]:
            return f"{path}: sha256 {digest[:16]}..., the manifest says {shard['sha256'][:16]}..."
        return None

    # hashlib releases the GIL on large reads, so threads hash shards in parallel.
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(report(pool.map(check, shards), len(shards), "verifying shards", unit="shards",
                              enabled=progress))
    return [r for r in results if r is not None]
