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
  pixelgen import jit jit-h-16/checkpoint-last.pth weights/jit_h16.safetensors
  pixelgen import deco imagenet256_epoch800.ckpt weights/deco_xl_800.safetensors
then:
  pixelgen sample weights/pixeldit_xl_320.safetensors --classes 207,360,387
  pixelgen run weights/pixeldit_xl_320.yaml fid.reference=/data/VIRTUAL_imagenet256_labeled.npz --cluster NAME
"""

DESCRIPTION = ("Convert an official checkpoint (the model's own state dict, or the training checkpoint its code "
               "saves: PixelDiT's and DeCo's Lightning files, JiT's checkpoint-*.pth) into pixelgen's generator weights, and "
               "write beside them a run config that computes their FID with the published objective and sampler "
               "settings (docs/models.md lists them).")

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

    p.add_argument("--weights", default=default("ema"), metavar="WHICH",
                   help="which weights of a training checkpoint: ema (what the papers sample with, the default), "
                        "model (the trained weights), ema2 (JiT's second EMA, 0.9996)")
    p.add_argument("--resolution", type=int, default=default(None),
                   help="the image size the model was trained at (default: what the weights fix, else 256)")
    p.add_argument("--context-start", type=int, default=default(None), metavar="N",
                   help="jit: the block the in-context class tokens join before, for a model of none of the "
                        "published depths whose checkpoint does not name its size")
    p.add_argument("--allow-pickle", action="store_true", default=default(False),
                   help="load a torch checkpoint that holds Python objects besides tensors and training "
                        "arguments (runs its pickled code: only for files from a source you trust)")
    p.add_argument("--force", action="store_true", default=default(False),
                   help="replace OUT and its .yaml when they exist")


def _load(path: Path, allow_pickle: bool):
    """The checkpoint file's contents: a .safetensors file's tensors, or what torch.load gives (tensors,
    containers and argparse.Namespace only, unless allow_pickle: JiT keeps its training arguments as one)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as err:
            raise ConfigError(f"checkpoint '{path}' is not a readable .safetensors file ({err})") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        raise ConfigError(f"checkpoint '{path}' holds Python objects besides tensors, which loading it safely "
                          f"refuses{f' (such as a {found.group(1)})' if found else ''}: if you trust where it "
                          f"came from, run again with --allow-pickle") from None
    except RuntimeError as err:  # not a torch file (zip or legacy pickle)
        raise ConfigError(f"checkpoint '{path}' cannot be read by torch.load ({str(err).splitlines()[0]})") from None


def read_checkpoint(path: Path, kind: str, weights: str, allow_pickle: bool) -> tuple[dict, str, dict]:
    """(the model state dict inside an official checkpoint file, where in the file it was, the training arguments
    the file keeps or {}). A training checkpoint is looked into where that code base keeps `weights`
    (pixelgen.models.official.CHECKPOINTS); anything else is taken as the model's own state dict."""
    import torch

    from pixelgen.models.official import CHECKPOINTS

    data = _load(path, allow_pickle)
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f"checkpoint '{path}' holds a {type(data).__name__}, not a dict of named tensors")
    args = data.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    places = CHECKPOINTS[kind]
    if weights not in places:
        raise ConfigError(f"--weights {weights}: a {kind} checkpoint holds {' | '.join(places)}")

    def inside(entry: str, prefix: str) -> dict:
        holder = data.get(entry) if isinstance(data.get(entry), dict) else {}
        return {k[len(prefix):]: v for k, v in holder.items() if k.startswith(prefix)}

    if any(inside(*place) for place in places.values()):  # a training checkpoint of this kind
        state = inside(*places[weights])
        if not state:
            there = [w for w, place in places.items() if inside(*place)]
            raise ConfigError(f"checkpoint '{path}': --weights {weights} looks for {places[weights][1]}* in "
                              f"{places[weights][0]!r}, which the file does not have: it holds {' | '.join(there)}")
        return state, f"{places[weights][0]}/{places[weights][1].rstrip('.')}", args
    state = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ConfigError(f"checkpoint '{path}' has neither a {kind} training checkpoint's entries "
                          f"({', '.join(sorted({e for e, _ in places.values()}))}) nor tensors of its own")
    return state, "the model's state dict", args


def run_config(kind: str, converted, resolution: int, out: Path, overrides: list[str]):
    """The typed run config that builds the converted generator and scores OUT. What the import decides is checked
    here (the model keys, the objective, the sampler, the FID settings); what it is scored against (a
    fid.reference file, or shards for fid.reference=train) is the user's to add, and `pixelgen run` validates the
    whole."""
    from omegaconf import OmegaConf

    from pipeline.config import ExperimentConfig, _merge
    from pixelgen import families
    from pixelgen.eval.config import check_fid
    from pixelgen.models.config import check_objective, check_sampler
    from pixelgen.models.official import PUBLISHED

    fixed = [o for o in overrides if o.split("=", 1)[0].strip().startswith(("model.", "fid.weights", "stages"))]
    if fixed:
        raise ConfigError(f"override {fixed[0]!r}: the model keys come from the checkpoint, fid.weights is OUT and "
                          f"the stages are [fid]; edit the written config if you need otherwise")
    data = {"name": f"{kind}-{out.stem}", "stages": ["fid"], "model": converted.model,
            **PUBLISHED[kind](converted.model, resolution),
            "data": {"resolution": resolution, "num_classes": converted.model["num_classes"]},
            "fid": {"weights": str(out.resolve())}}
    if converted.objective:  # what the weights were trained to predict; the published settings may add more
        data["objective"] = {**data.get("objective", {}), **converted.objective}
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
    check_objective(cfg.objective, fail)
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
    state, where, train_args = read_checkpoint(args.checkpoint.expanduser(), args.kind, args.weights,
                                               args.allow_pickle)
    hints = {"args": train_args, "context_start": args.context_start} if args.kind == "jit" else {}
    try:
        converted = convert(args.kind, state, **hints)
    except CheckpointMismatch as err:
        raise ConfigError(f"checkpoint '{args.checkpoint}' ({where}): {err}") from None
    resolution = args.resolution or converted.resolution or 256
    if converted.resolution and resolution != converted.resolution:
        raise ConfigError(f"--resolution {resolution}: the checkpoint's weights are for {converted.resolution} px "
                          f"images (its position table): leave --resolution out")
    cfg = run_config(args.kind, converted, resolution, out, args.overrides)
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
                  f"next: pixelgen sample {out}   |   pixelgen run {config_path} fid.reference=REFERENCE.npz "
                  f"(or data.shard_dir=SHARDS for fid.reference=train)")
    return 0
