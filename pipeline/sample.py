"""`pixelgen sample`: images of chosen classes from a run folder's exported weights (or any exported file), for
any model family, on the CPU or a GPU.

    OUT/grid.png              one row per class
    OUT/images/<class>_<n>.png
    OUT/samples.json          what made them: the weights and their step, classes, seed, sampler settings, device

Image n of class c draws its noise from its own stream seeded by (seed, n * num_classes + c)
(pixelgen.noise.Streams): the same command gives the same pixels, and an image's noise does not depend on which
other classes, how many per class or which batch size were asked for (its pixels, on the CPU, by a rounding step
at most: another batch is another matmul blocking). OUT is written under a temporary name and
renamed when complete, so a folder of samples is never half-written and never replaces an earlier one.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import json
import os
import shutil
import time
from pathlib import Path

from pipeline.config import ConfigError

WEIGHTS_CHOICES = "ema | ema-<decay> | model | a .safetensors file"
SHOWN_CLASSES = 8  # the default --classes: the first ones

EXAMPLES = """examples:
  pixelgen sample runs/demo                                  (8 images of each of the first 8 classes)
  pixelgen sample runs/pixeldit_b --classes 207,360 --per-class 8 --cfg 3.0
  pixelgen sample runs/pixeldit_b --weights ema-0.9999 --steps 100 sampler.kind=heun sampler.cfg_interval=[0.1,1.0]
  pixelgen sample runs/dual_ar/train_decoder/export/ema.safetensors --classes 1,2 sampler.temperature=0.9
  pixelgen sample weights.safetensors --device cpu --out /tmp/look
"""


DESCRIPTION = ("Draw PER_CLASS images of each class from a run folder (its last training stage's export, picked by "
               "--weights) or an exported .safetensors file (it carries its run config), and write a PNG grid (one "
               "row per class), the single images and samples.json with what made them. The same command gives the "
               "same pixels.")


def add_parser(sub, formatter_class) -> None:
    p = sub.add_parser(
        "sample", formatter_class=formatter_class, help="draw a grid of images of chosen classes",
        description=DESCRIPTION, epilog=EXAMPLES)
    p.add_argument("source", metavar="RUN_DIR|WEIGHTS", help="a run folder, or an exported .safetensors file")
    _options(p)
    # Before Python 3.12 argparse gives a `*` positional nothing once an option came between it and the first
    # positional (`RUN --cfg 3 sampler.kind=heun` would be refused): what follows the source is parsed again,
    # options and settings intermixed, by cmd_sample.
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="sampler.key=value",
                   help="any other sampler setting (pixelgen/models/config.py SamplerConfig), e.g. sampler.kind=heun "
                        "sampler.guidance=semantic sampler.semantic_cfg_scale=2.0 sampler.temperature=0.9")
    p.set_defaults(func=cmd_sample)


def _options(p, defaults: bool = True) -> None:
    """The options; without their defaults (defaults=False) for parsing what follows the source, over what came
    before it."""
    def default(value):
        return value if defaults else argparse.SUPPRESS

    p.add_argument("--classes", metavar="C1,C2,...",
                   help=f"class indices, one grid row each (default: the first {SHOWN_CLASSES})")
    p.add_argument("--per-class", type=int, default=default(8), metavar="N", help="images per class (default 8)")
    p.add_argument("--cfg", type=float, metavar="SCALE", help="guidance scale, sampler.cfg_scale (default: the run's)")
    p.add_argument("--steps", type=int, metavar="N", help="sampler steps, sampler.steps (default: the run's)")
    p.add_argument("--seed", type=int, default=default(0), help="noise seed (default 0)")
    p.add_argument("--weights", metavar="WHICH",
                   help=f"with a run folder: {WEIGHTS_CHOICES} (default: the run's fid.weights)")
    p.add_argument("--out", metavar="DIR", help="folder to write, new or empty (default: RUN_DIR/samples/<time>-... "
                                                "for a run folder, WEIGHTS_DIR/samples/<time>-... for a file)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=default("auto"),
                   help="auto: the GPU when there is one (default)")
    p.add_argument("--batch-size", type=int, default=default(32), metavar="N", help="images drawn at once (default 32)")


def _after_source(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with the options and settings given after the source (in args.overrides, unparsed) parsed."""
    from pipeline.cli import parse_after_positionals

    return parse_after_positionals(args, "pixelgen sample RUN_DIR|WEIGHTS", _options, DESCRIPTION)


def cmd_sample(args: argparse.Namespace) -> int:
    from pipeline.cli import console
    from pipeline.config import to_container
    from pipeline.stages import _load_generator
    from pixelgen.engine.export import weights_metadata
    from pixelgen.precision import use_bf16

    args = _after_source(args)
    cfg, weights, base, choice = _source(args.source, args.weights)
    classes = _classes(args.classes, cfg.model.num_classes)
    for flag, value in (("--per-class", args.per_class), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: must be at least 1")
    sampler = _sampler(cfg, args.overrides, cfg_scale=args.cfg, steps=args.steps)
    device = _device(args.device)
    out = Path(args.out).expanduser() if args.out else None
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: already exists and is not an empty folder: name a new folder (samples are "
                          f"never written over)")
    meta = weights_metadata(weights)

    t0 = time.monotonic()
    model = _load_generator(cfg, weights).to(device).eval()
    images = _draw(cfg, sampler, model, classes, args.per_class, args.seed, args.batch_size, device)
    seconds = time.monotonic() - t0
    record = {"source": str(Path(args.source).resolve()), "weights": str(weights.resolve()),
              "weights_choice": choice, "stage": meta.get("stage"), "step": meta.get("step"),
              "run": cfg.name, "classes": classes, "per_class": args.per_class, "seed": args.seed,
              "noise": "per image: image n of class c seeded by (seed, n * num_classes + c)",
              "num_classes": cfg.model.num_classes, "sampler": to_container(sampler),
              "sampling_precision": "bf16" if use_bf16(sampler.precision, device) else "fp32",
              "device": str(device), "batch_size": args.batch_size, "seconds": round(seconds, 2),
              "created": datetime.datetime.now().isoformat(timespec="seconds")}
    out = _write(images, classes, args.per_class, record, out, base, _name(args, choice or weights.stem))
    console.print(f"[green]✓[/green] {len(images)} images ({len(classes)} classes x {args.per_class}) from "
                  f"{weights} ({_made_by(meta)}) in {seconds:.2f} s on {device}")
    console.print(f"grid:     {out / 'grid.png'}")
    console.print(f"images:   {out / 'images'}/<class>_<n>.png")
    console.print(f"settings: {out / 'samples.json'}")
    return 0


# ------------------------------------------------------------------------------------------------- inputs
def _source(source: str, weights: str | None):
    """(typed run config, weights file, folder the default output goes under, --weights as resolved in a run
    folder or None for a file) for a run folder or a file."""
    from omegaconf import OmegaConf
    from safetensors import SafetensorError

    from pipeline.config import check_weights
    from pipeline.stages import _generator_weights
    from pixelgen.engine.export import weights_metadata

    path = Path(source).expanduser()
    if path.is_dir():
        saved = path / "config.yaml"
        if not saved.is_file():
            raise FileNotFoundError(f"'{path}' is not a pixelgen run folder (no config.yaml): give a run folder or "
                                    f"an exported .safetensors file")
        cfg = _sampling_config(OmegaConf.to_container(OmegaConf.load(saved)), saved)
        choice = cfg.fid.weights if weights is None else weights

        def fail(key, value, why):
            raise ConfigError(f"{key} {value}: {why}")

        check_weights(cfg, "--weights", choice, fail)
        file = _generator_weights(cfg, path, choice)
        if not file.is_file():
            raise FileNotFoundError(f"--weights {choice}: '{file}' does not exist: the run's training stage has not "
                                    f"exported it yet (see `pixelgen status {path}`)")
        return cfg, file, path, choice
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' does not exist: give a run folder or an exported .safetensors file")
    if weights is not None:
        raise ConfigError(f"--weights {weights}: picks a file of a run folder, and '{path}' is already a weights file")
    try:
        meta = weights_metadata(path)
    except (SafetensorError, json.JSONDecodeError) as err:  # not a safetensors file, or not pixelgen's metadata
        raise ConfigError(f"'{path}' is not a readable .safetensors file ({err})") from None
    if not isinstance(meta.get("config"), dict):
        raise ConfigError(f"'{path}' holds no pixelgen run config in its metadata (not exported by a pixelgen "
                          f"training stage): sample from the run folder that made it, or from its export/*.safetensors")
    return _sampling_config(meta["config"], path), path, path.parent, None


def _sampling_config(data: dict, source: Path):
    """The typed run config, checked for what sampling reads (the model against the resolution, the sampler).
    Not validated as a run (pipeline.config.validate): that also wants the run's inputs, such as its teachers'
    weights files, which weights copied to another machine, or a run folder copied off a cluster, lack."""
    from omegaconf import OmegaConf

    from pipeline import migrations
    from pipeline.config import ExperimentConfig, _merge
    from pixelgen import families

    cfg = _merge(OmegaConf.structured(ExperimentConfig), OmegaConf.create(migrations.upgrade(data, source)),
                 f"run config of {source}")
    try:
        families.check_model_config(OmegaConf.to_object(cfg.model), cfg.data.resolution)
    except ValueError as err:
        raise ConfigError(f"run config of {source}: {err}") from None
    return cfg


def _made_by(meta: dict) -> str:
    """Where the weights come from, for the summary line: a training step, or the checkpoint they were imported
    from (pixelgen import)."""
    source = meta.get("source")
    if meta.get("stage") == "import" and isinstance(source, dict):
        return f"imported from {source.get('kind')} {Path(str(source.get('checkpoint'))).name}"
    return f"step {meta.get('step')}"


def _classes(text: str | None, num_classes: int) -> list[int]:
    if text is None:
        return list(range(min(num_classes, SHOWN_CLASSES)))
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"--classes {text!r}: give class indices separated by commas, e.g. --classes 207,360")
    classes = []
    for item in items:
        try:
            c = int(item)
        except ValueError:
            raise ConfigError(f"--classes: {item!r} is not a class index (a whole number)") from None
        if not 0 <= c < num_classes:
            raise ConfigError(f"--classes: class {c} is out of range: this model has {num_classes} classes, "
                              f"0 to {num_classes - 1}")
        classes.append(c)
    return classes


def _sampler(cfg, overrides: list[str], *, cfg_scale: float | None, steps: int | None):
    """The run's sampler with the `sampler.key=value` overrides, then --cfg and --steps, checked."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from pipeline.config import _explain
    from pixelgen.models.config import check_sampler

    keys = []
    for item in overrides:
        key = item.split("=", 1)[0]
        if "=" not in item or not key.startswith("sampler.") or key == "sampler.":
            raise ConfigError(f"{item!r}: write sampler settings as sampler.KEY=VALUE, e.g. sampler.kind=heun")
        keys.append(item[len("sampler."):])
    flags = {"cfg_scale": ("--cfg", cfg_scale), "steps": ("--steps", steps)}
    for item in keys:
        key = item.split("=", 1)[0]
        if key in flags and flags[key][1] is not None:
            raise ConfigError(f"sampler.{key} is set twice (also by {flags[key][0]}): give one of them")
    given = {key: value for key, (_, value) in flags.items() if value is not None}
    try:
        sampler = OmegaConf.merge(cfg.sampler, OmegaConf.from_dotlist(keys), given)
    except OmegaConfBaseException as err:  # names the key, and the expected type
        raise _explain(err, "command line", unknown="see SamplerConfig in pixelgen/models/config.py") from None

    def fail(key, value, why):
        raise ConfigError(f"command line: key '{key}' = {value!r}: {why}")

    check_sampler(sampler, fail)
    return sampler


def _device(choice: str):
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible here (torch.cuda.is_available() is false): use "
                          "--device cpu, or auto")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


# ------------------------------------------------------------------------------------------------ drawing
def _draw(cfg, sampler, model, classes: list[int], per_class: int, seed: int, batch_size: int, device):
    """uint8 images [len(classes) * per_class, 3, H, W], class by class (the grid's rows)."""
    import torch

    from pixelgen import families
    from pixelgen.noise import Streams
    from pixelgen.progress import report
    from pixelgen.viz import to_uint8

    draw = families.get(cfg.model.trunk.kind).sampler(cfg, sampler)
    work = [(c, n) for c in classes for n in range(per_class)]
    batches = [work[i:i + batch_size] for i in range(0, len(work), batch_size)]
    parts = []  # the samplers run without autograd themselves
    for batch in report(batches, len(batches), "sampling", unit="batches", enabled=len(batches) > 1):
        y = torch.tensor([c for c, _ in batch], device=device)
        streams = Streams(seed, [n * cfg.model.num_classes + c for c, n in batch], device)
        parts.append(to_uint8(draw(model, y, streams)).cpu())
    return torch.cat(parts)


# ------------------------------------------------------------------------------------------------- output
def _name(args, what: str) -> str:
    """A folder name that says what is in it, after the time it was made (so they list in order)."""
    scale = f"-cfg{args.cfg:g}" if args.cfg is not None else ""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{what}{scale}-seed{args.seed}"


def _write(images, classes: list[int], per_class: int, record: dict, out: Path | None, base: Path, name: str) -> Path:
    """Write everything into a temporary folder beside the destination, then rename it there: OUT, or a fresh
    BASE/samples/NAME[-k]."""
    from PIL import Image

    from pixelgen.io import atomic_write_json
    from pixelgen.viz import save_grid

    parent = out.parent if out is not None else base / "samples"
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".sample-{os.getpid()}-{time.monotonic_ns()}.tmp"
    (tmp / "images").mkdir(parents=True)
    try:
        save_grid(images, tmp / "grid.png", nrow=per_class)
        files = []
        for k, image in enumerate(images):
            file = f"images/{classes[k // per_class]}_{k % per_class}.png"
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp / file, format="PNG")
            files.append(file)
        atomic_write_json(tmp / "samples.json", {**record, "grid": "grid.png", "images": files})
        return _publish(tmp, [out] if out is not None else [parent / name] + [parent / f"{name}-{k}"
                                                                              for k in range(2, 1000)])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when published


def _publish(tmp: Path, candidates: list[Path]) -> Path:
    """Rename `tmp` to the first candidate not taken (a missing or empty folder); never onto earlier samples."""
    for dest in candidates:
        try:
            os.rename(tmp, dest)  # replaces an empty folder, fails on a file or a folder with anything in it
            return dest
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                raise
    raise ConfigError(f"{candidates[0]}: already exists and is not an empty folder: name a new folder with --out "
                      f"(samples are never written over)")
