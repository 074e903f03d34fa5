"""`pixelgen import KIND CHECKPOINT OUT`: a published checkpoint as pixelgen generator weights.

    OUT                 a .safetensors file of the generator, its run config in the metadata (as every export),
                        so `pixelgen sample OUT` and the FID stage (fid.weights=OUT) take it
    OUT minus .safetensors + .yaml
                        a run config that scores it: stages [fid], the model keys read off the checkpoint, and
                        the sampler the paper reports its FID with; data.* and fid.reference are yours to set

The conversion itself is pixelgen.models.official; the converted generator is built from the written config and
loaded strictly before anything is written, and both files are written under temporary names and renamed.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
from pathlib import Path

from pipeline.config import ConfigError

EXAMPLES = """examples:
  pixelgen import pixeldit imagenet256_pixeldit_xl_epoch320.ckpt weights/pixeldit_xl_320.safetensors
  pixelgen import pixeldit imagenet512_pixeldit_xl.ckpt weights/pixeldit_xl_512.safetensors --resolution 512
  pixelgen import pixeldit imagenet256_pixeldit_xl_epoch80.ckpt out.safetensors sampler.cfg_scale=3.25 sampler.cfg_interval=[0.1,1.0]
then:
  pixelgen sample weights/pixeldit_xl_320.safetensors --classes 207,360,387
  pixelgen run weights/pixeldit_xl_320.yaml data.shard_dir=/data/imagenet-shards fid.reference=/data/VIRTUAL_imagenet256_labeled.npz
"""

DESCRIPTION = ("Convert an official checkpoint (the model's state dict, or a Lightning checkpoint holding it under "
               "denoiser./ema_denoiser.) into pixelgen's generator weights, and write beside them a run config "
               "that computes their FID with the published sampler settings (docs/models.md lists them).")

# The sampler (and its resolution) each paper reports its best FID with, per kind; key=value overrides change it.
PUBLISHED_SAMPLERS = {
    # imagenet256_pixeldit_xl_epoch320.ckpt: FID 1.61 (80 / 160 epochs: cfg 3.25 on (0.1, 1.0));
    # imagenet512_pixeldit_xl.ckpt: FID 1.81 with cfg 3.5 on (0.1, 1.0), time shift 2.0.
    "pixeldit": {256: {"kind": "ab2", "steps": 100, "cfg_scale": 2.75, "cfg_interval": [0.1, 0.9], "time_shift": 1.0},
                 512: {"kind": "ab2", "steps": 100, "cfg_scale": 3.5, "cfg_interval": [0.1, 1.0], "time_shift": 2.0}},
}


def add_parser(sub, formatter_class) -> None:
    from pixelgen.models.official import CONVERTERS

    p = sub.add_parser("import", formatter_class=formatter_class, help="convert a published checkpoint to pixelgen weights",
                       description=DESCRIPTION, epilog=EXAMPLES)
    p.add_argument("kind", choices=sorted(CONVERTERS), help="whose checkpoint it is")
    p.add_argument("checkpoint", type=Path, help="the official file: .ckpt/.pt/.pth (torch) or .safetensors")
    p.add_argument("out", type=Path, help="the .safetensors file to write (its .yaml run config goes beside it)")
    _options(p)
    # What follows the positionals is parsed again, options and settings intermixed (pipeline.cli.parse_after_positionals).
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key=value",
                   help="run config settings for the written config, e.g. sampler.cfg_scale=3.25")
    p.set_defaults(func=cmd_import)


def _options(p, defaults: bool = True) -> None:
    def default(value):
        return value if defaults else argparse.SUPPRESS

    p.add_argument("--weights", choices=("ema", "model"), default=default("ema"),
                   help="of a training checkpoint holding both: the EMA (what papers sample from, the default) or "
                        "the trained weights")
    p.add_argument("--resolution", type=int, default=default(256),
                   help="the image size the model was trained at (default 256)")
    p.add_argument("--allow-pickle", action="store_true", default=default(False),
                   help="load a torch checkpoint that holds Python objects besides tensors (runs its pickled code: "
                        "only for files from a source you trust)")
    p.add_argument("--force", action="store_true", default=default(False),
                   help="replace OUT and its .yaml when they exist")


def read_checkpoint(path: Path, weights: str, allow_pickle: bool) -> tuple[dict, str]:
    """The model state dict inside an official checkpoint file, and where in the file it was."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    if path.suffix == ".safetensors":
        try:
            data = load_file(str(path))
        except SafetensorError as err:
            raise ConfigError(f"checkpoint '{path}' is not a readable .safetensors file ({err})") from None
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
            raise ConfigError(f"checkpoint '{path}' holds Python objects besides tensors, which loading it safely "
                              f"refuses{f' (such as a {found.group(1)})' if found else ''}: if you trust where it "
                              f"came from, run again with --allow-pickle") from None
        except RuntimeError as err:  # not a torch file (zip or legacy pickle)
            raise ConfigError(f"checkpoint '{path}' cannot be read by torch.load ({str(err).splitlines()[0]})") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]  # Lightning
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f"checkpoint '{path}' holds a {type(data).__name__}, not a state dict of named tensors")
    order = ("ema_denoiser.", "denoiser.") if weights == "ema" else ("denoiser.", "ema_denoiser.")
    for prefix in order:
        inner = {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}
        if inner:
            if prefix != order[0]:
                raise ConfigError(f"checkpoint '{path}': --weights {weights} asks for {order[0]}* tensors and the "
                                  f"file has only {prefix}*: pass --weights "
                                  f"{'model' if weights == 'ema' else 'ema'}")
            return inner, prefix.rstrip(".")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}, "the model's state dict"


def run_config(kind: str, converted, resolution: int, out: Path, overrides: list[str]):
    """The typed run config that builds the converted generator and scores OUT. What the import decides is checked
    here (the model keys, the sampler, the FID settings); where the images come from (data.shard_dir, or a
    fid.reference file) is the user's to add, and `pixelgen run` validates the whole."""
    from omegaconf import OmegaConf

    from pipeline.config import ExperimentConfig, _merge
    from pixelgen import families
    from pixelgen.eval.config import check_fid
    from pixelgen.models.config import check_sampler

    fixed = [o for o in overrides if o.split("=", 1)[0].strip().startswith(("model.", "fid.weights", "stages"))]
    if fixed:
        raise ConfigError(f"override {fixed[0]!r}: the model keys come from the checkpoint, fid.weights is OUT and "
                          f"the stages are [fid]; edit the written config if you need otherwise")
    data = {"name": f"{kind}-{out.stem}", "stages": ["fid"], "model": converted.model,
            "data": {"resolution": resolution, "num_classes": converted.model["num_classes"]},
            "fid": {"weights": str(out.resolve())}}
    sampler = PUBLISHED_SAMPLERS.get(kind, {}).get(resolution)
    if sampler:
        data["sampler"] = sampler
    source = f"the config written for {out}"
    cfg = _merge(OmegaConf.structured(ExperimentConfig), OmegaConf.create(data), source)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override '{item}' is not of the form key=value (e.g. sampler.steps=50)")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"command line override '{item}'")

    def fail(key, value, why):
        raise ConfigError(f"{source}: key '{key}' = {value!r}: {why}")

    try:
        families.check_model_config(OmegaConf.to_object(cfg.model), cfg.data.resolution)
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None
    check_sampler(cfg.sampler, fail)
    check_fid(cfg.fid, fail)
    return cfg


def cmd_import(args) -> int:
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from pipeline.config import to_container, to_yaml
    from pixelgen import families
    from pixelgen.io import atomic_write, atomic_write_text, sha256_file
    from pixelgen.models import count_params
    from pixelgen.models.official import CheckpointMismatch, convert

    from pipeline.cli import console, parse_after_positionals

    args = parse_after_positionals(args, "pixelgen import KIND CHECKPOINT OUT", _options, DESCRIPTION)
    out = args.out.expanduser()
    if out.suffix != ".safetensors":
        raise ConfigError(f"OUT '{out}' must end in .safetensors (the run config goes beside it as .yaml)")
    config_path = out.with_suffix(".yaml")
    existing = [p for p in (out, config_path) if p.exists()]
    if existing and not args.force:
        raise ConfigError(f"{' and '.join(map(str, existing))} already exist: pick another OUT or pass --force")
    state, where = read_checkpoint(args.checkpoint.expanduser(), args.weights, args.allow_pickle)
    try:
        converted = convert(args.kind, state)
    except CheckpointMismatch as err:
        raise ConfigError(f"checkpoint '{args.checkpoint}' ({where}): {err}") from None
    cfg = run_config(args.kind, converted, args.resolution, out, args.overrides)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = families.build_generator(OmegaConf.to_object(cfg.model), cfg.data.resolution, pretrained=False)
    model.load_state_dict(converted.state, strict=True)
    source = {"kind": args.kind, "checkpoint": str(args.checkpoint.resolve()), "weights": where,
              "checkpoint_sha256": sha256_file(args.checkpoint)}
    meta = {"config": to_container(cfg), "stage": "import", "step": None, "source": source}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(out, lambda tmp: save_file(state, tmp, {"pixelgen": json.dumps(meta, default=str)}))
    atomic_write_text(config_path, f"# {args.kind} checkpoint {args.checkpoint} ({where}), imported by "
                                   f"`pixelgen import`\n" + to_yaml(cfg))
    for note in converted.notes:
        console.print(note)
    console.print(f"{count_params(model):,} parameters -> {out}\nrun config (FID only) -> {config_path}\n"
                  f"next: pixelgen sample {out}   |   pixelgen run {config_path} data.shard_dir=... fid.reference=...")
    return 0
