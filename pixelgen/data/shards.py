"""Shard stage: an ImageNet-layout folder -> webdataset tar shards of center-cropped images + manifest.

Output of `write_shards(src, out, cfg, resolution)`:
    out/{split}-{index:06d}.tar   samples {"__key__": file stem, "png"|"jpg": image bytes, "cls": class index}
    out/manifest.json             written last; lists every shard with its count, size and sha256

Which source file lands in which shard is a pure function of the file list and `cfg.seed`, and the
tars are byte-deterministic, so an interrupted run is resumed by keeping the shards already
finished and writing only the rest.
"""

import contextlib
import hashlib
import io
import json
import os
import random
from multiprocessing import Pool

import webdataset as wds
from PIL import Image
from rich.progress import track

from pixelgen.data.config import ShardConfig
from pixelgen.io import atomic_write_json

MANIFEST = "manifest.json"
# Per-shard records of a run still in progress, so a resumed run knows which finished shards to trust.
PROGRESS = "progress.json"
FORMAT_VERSION = 1
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
FORMATS = ("png", "jpg")


def center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """ADM/DiT `center_crop_arr`: halve with BOX while possible, BICUBIC to min side, center crop."""
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left = (image.width - resolution) // 2
    top = (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def _encode(path: str, resolution: int, image_format: str, quality: int) -> bytes:
    if os.path.getsize(path) == 0:
        raise ValueError("empty file")
    with Image.open(path) as image:
        # convert() forces a full decode, so truncated files fail here rather than later.
        rgb = image.convert("RGB")
    buffer = io.BytesIO()
    if image_format == "png":
        center_crop(rgb, resolution).save(buffer, format="PNG")
    else:
        center_crop(rgb, resolution).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
                    data = _encode(src, task["resolution"], task["format"], task["quality"])
                except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                    bad_files.append({"path": src, "reason": f"{type(e).__name__}: {e}", "shard": task["file"]})
                    continue
                writer.write({"__key__": key, task["format"]: data, "cls": label})
                count += 1
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(path + ".tmp", path)
    return {
        "file": task["file"],
        "count": count,
        "bytes": os.path.getsize(path),
        "sha256": _sha256(path),
        "plan": task["plan"],
        "bad_files": bad_files,
    }


def _scan_split(src_dir: str, split: str) -> dict[str, list[str]]:
    """{wnid: sorted image paths} for `src_dir/split/<wnid>/*`."""
    split_dir = os.path.join(src_dir, split)
    try:
        entries = sorted(os.scandir(split_dir), key=lambda e: e.name)
    except OSError as e:
        raise FileNotFoundError(
            f"cannot read split folder {split_dir} ({e.strerror}); the shard stage expects "
            f"{src_dir}/<split>/<wnid>/*.JPEG for each split in {split!r} of the shard config"
        ) from e
    loose = [e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
    if loose:
        raise ValueError(
            f"{split_dir} holds images directly (e.g. {loose[0]}); they must be in class folders "
            f"{split_dir}/<wnid>/ (for the ImageNet val set, sort it into class folders first)"
        )
    classes = {}
    for entry in entries:
        if entry.is_dir():
            names = sorted(n for n in os.listdir(entry.path) if n.lower().endswith(IMAGE_EXTENSIONS))
            classes[entry.name] = [os.path.join(entry.path, n) for n in names]
    if not any(classes.values()):
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {split_dir}/<wnid>/")
    return classes


def _sample_key(path: str) -> str:
    # webdataset splits a sample's files at the first dot of the name, so the key must not have one.
    return os.path.splitext(os.path.basename(path))[0].replace(".", "_")


def _class_split(splits: list[str]) -> str:
    """The split whose class folders define the class indices."""
    return "train" if "train" in splits else splits[0]


def _plan_split(src_dir: str, split: str, by_class: dict[str, list[str]], classes: list[str], cfg: ShardConfig):
    """Shard tasks for one split, [{file, members: [(path, key, label)]}]: a pure function of files and seed."""
    index = {wnid: i for i, wnid in enumerate(classes)}
    members, seen = [], {}
    for wnid, paths in by_class.items():
        if wnid not in index:
            raise ValueError(
                f"class folder {os.path.join(src_dir, split, wnid)} is not a class of the "
                f"{_class_split(cfg.splits)!r} split; every split must use the same wnids"
            )
        for path in paths:
            key = _sample_key(path)
            if key in seen:
                raise ValueError(f"{path} and {seen[key]} give the same sample key {key!r}; rename one")
            seen[key] = path
            members.append((path, key, index[wnid]))
    random.Random(cfg.seed).shuffle(members)
    return [
        {"file": f"{split}-{i // cfg.max_count:06d}.tar", "members": members[i : i + cfg.max_count]}
        for i in range(0, len(members), cfg.max_count)
    ]


def _settings(src_dir: str, cfg: ShardConfig, resolution: int) -> dict:
    """Everything that decides the shard bytes; a finished or partial output must match it to be reused."""
    return {
        "format_version": FORMAT_VERSION,
        "source_dir": src_dir,
        "splits": list(cfg.splits),
        "seed": cfg.seed,
        "max_count": cfg.max_count,
        "preprocessing": {
            "resolution": resolution,
            "crop": "adm_center",
            "format": cfg.image_format,
            "quality": cfg.jpeg_quality if cfg.image_format == "jpg" else None,
        },
    }


def _validate(cfg: ShardConfig, resolution: int) -> None:
    if cfg.image_format not in FORMATS:
        raise ValueError(f"shard config image_format={cfg.image_format!r}; use one of {FORMATS}")
    if not cfg.splits:
        raise ValueError("shard config splits is empty; list at least one split, e.g. ['train', 'val']")
    for name, value in (("max_count", cfg.max_count), ("workers", cfg.workers), ("resolution", resolution)):
        if value < 1:
            raise ValueError(f"shard {name}={value} must be >= 1")
    if cfg.image_format == "jpg" and not 1 <= cfg.jpeg_quality <= 100:
        raise ValueError(f"shard config jpeg_quality={cfg.jpeg_quality} must be in [1, 100]")


def _check_settings(found: dict, settings: dict, path: str) -> None:
    """Raise unless `found` (a manifest or progress settings) was made with `settings`."""
    # list() gives the split names both from a manifest's {split: shards} and from a settings list.
    found = {**found, "splits": list(found.get("splits", []))}
    differing = {k: f"{found.get(k)!r} (requested {v!r})" for k, v in settings.items() if found.get(k) != v}
    if differing:
        raise ValueError(
            f"{path} was made with different settings: {differing}; use another shard folder or delete this one"
        )


def _all_shards_present(manifest: dict, out_dir: str) -> bool:
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    return all(
        os.path.isfile(p := os.path.join(out_dir, s["file"])) and os.path.getsize(p) == s["bytes"] for s in shards
    )


def _trusted_records(out_dir: str, settings: dict, manifest: dict | None) -> dict[str, dict]:
    """Shard records of an earlier run with the same settings, from its manifest or progress file."""
    records = {}
    if manifest is not None:
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                bad_files = [b for b in manifest["bad_files"] if b["shard"] == shard["file"]]
                records[shard["file"]] = {**shard, "bad_files": bad_files}
    progress_path = os.path.join(out_dir, PROGRESS)
    if os.path.exists(progress_path):
        with open(progress_path) as f:
            progress = json.load(f)
        _check_settings(progress["settings"], settings, progress_path)
        records.update(progress["shards"])
    return records


def write_shards(src_dir: str, out_dir: str, cfg: ShardConfig, resolution: int, progress: bool = True) -> dict:
    """Shard `src_dir/<split>/<wnid>/*` for each split in `cfg.splits` into `out_dir`; returns the manifest.

    A no-op when `out_dir` already holds a manifest with the same settings and all its shards.
    Unreadable images are skipped and listed under `bad_files` in the manifest.
    """
    _validate(cfg, resolution)
    if not src_dir:
        raise ValueError("no source folder to shard: set data.imagenet_dir to an ImageNet-layout folder")
    src_dir = os.path.abspath(src_dir)
    settings = _settings(src_dir, cfg, resolution)
    manifest_path = os.path.join(out_dir, MANIFEST)
    manifest = None
    if os.path.exists(manifest_path):
        manifest = read_manifest(out_dir)
        _check_settings(manifest, settings, manifest_path)
        if _all_shards_present(manifest, out_dir):
            return manifest

    scans = {split: _scan_split(src_dir, split) for split in cfg.splits}
    classes = sorted(scans[_class_split(cfg.splits)])
    plans = {split: _plan_split(src_dir, split, scans[split], classes, cfg) for split in cfg.splits}

    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        if name.endswith(".tmp"):
            os.remove(os.path.join(out_dir, name))
    records = _trusted_records(out_dir, settings, manifest)

    todo = []
    for shard in (s for plan in plans.values() for s in plan):
        # The plan digest ties a record to the exact files it was made from, so a changed source reshards.
        shard["plan"] = hashlib.sha256(json.dumps([settings, shard["members"]]).encode()).hexdigest()
        record = records.get(shard["file"])
        path = os.path.join(out_dir, shard["file"])
        trusted = record is not None and record["plan"] == shard["plan"] and os.path.isfile(path)
        if not (trusted and _sha256(path) == record["sha256"]):
            records.pop(shard["file"], None)
            todo.append({**shard, "out_dir": out_dir, **settings["preprocessing"]})

    def save_progress():
        atomic_write_json(os.path.join(out_dir, PROGRESS), {"settings": settings, "shards": records})

    pool = Pool(cfg.workers) if cfg.workers > 1 and len(todo) > 1 else None
    with pool or contextlib.nullcontext():
        done = pool.imap_unordered(_write_shard, todo) if pool else map(_write_shard, todo)
        for record in track(done, total=len(todo), description="shards", disable=not progress):
            records[record["file"]] = record
            save_progress()

    manifest = {**settings, "classes": classes, "splits": {}, "bad_files": []}
    for split, plan in plans.items():
        split_records = [records[s["file"]] for s in plan]
        manifest["splits"][split] = {
            # "plan" stays in the manifest so a rerun can tell whether a shard still matches the source.
            "shards": [{k: r[k] for k in ("file", "count", "bytes", "sha256", "plan")} for r in split_records],
            "totals": {k: sum(r[k] for r in split_records) for k in ("count", "bytes")},
        }
        manifest["bad_files"] += [b for r in split_records for b in r["bad_files"]]
    manifest["bad_files"].sort(key=lambda b: b["path"])
    manifest["totals"] = {k: sum(s["totals"][k] for s in manifest["splits"].values()) for k in ("count", "bytes")}
    atomic_write_json(manifest_path, manifest)
    if os.path.exists(os.path.join(out_dir, PROGRESS)):
        os.remove(os.path.join(out_dir, PROGRESS))
    return manifest


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
