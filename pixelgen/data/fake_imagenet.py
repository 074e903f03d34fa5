"""A small synthetic stand-in for ImageNet, laid out exactly like the real folders.

It lets the whole pipeline (shard stage, loader, training, FID) run end to end without the
real data set. Like the real train set it holds a few odd files that must still load (a PNG saved with a
.JPEG name, a CMYK JPEG, a grayscale JPEG), and like a damaged copy a few that must be skipped (a truncated
JPEG, an empty file, a file that is not an image). Each class is a distinct combination of shape, colour palette and background
texture, so a generator trained on it has something class-conditional to learn and a quick
classifier can tell the classes apart.
"""

import colorsys
import io
import json
import math
import os
import shutil

import numpy as np
from PIL import Image, ImageDraw
from rich.progress import track

SHAPES = ("circle", "square", "triangle", "stripes", "ring", "cross", "star")
# 5 is coprime with the 7 shapes, so the first 35 classes all get distinct shape/texture pairs.
TEXTURES = ("flat", "gradient", "checker", "waves", "diagonal")
_GOLDEN = (math.sqrt(5) - 1) / 2  # hue step that keeps consecutive classes far apart on the colour wheel
MARKER = ".complete.json"
FORMAT_VERSION = 2
# Extra train files the shard stage must skip, by kind: written next to the first class's images.
BAD_FILES = ("truncated", "empty", "notimage")


def wnid(class_index: int) -> str:
    return f"n{class_index:08d}"


def _hsv255(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255.0


def _class_style(k: int) -> dict:
    hue = (k * _GOLDEN) % 1.0
    bg_hue = hue + 0.5 + 0.15 * ((k // 2) % 3 - 1)
    return {
        "shape": SHAPES[k % len(SHAPES)],
        "texture": TEXTURES[k % len(TEXTURES)],
        "fg": _hsv255(hue, 0.85, 0.95),
        "bg_dark": _hsv255(bg_hue, 0.6, 0.25 + 0.1 * (k % 3)),
        "bg_light": _hsv255(bg_hue, 0.35, 0.6 + 0.1 * (k % 4)),
    }


def _texture(name: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Blend weights in [0, 1] of shape [h, w] between the class's two background colours."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) / max(h, w)
    phase = rng.uniform(0, 2 * np.pi)
    freq = rng.uniform(3.0, 5.0)
    if name == "flat":
        return np.full((h, w), rng.uniform(0.3, 0.7), np.float32)
    if name == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = x * np.cos(angle) + y * np.sin(angle)
        return (t - t.min()) / max(t.max() - t.min(), 1e-6)
    if name == "checker":
        return ((np.floor(x * freq * 2 + phase) + np.floor(y * freq * 2 + phase)) % 2).astype(np.float32)
    if name == "waves":
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * y + phase) * np.cos(2 * np.pi * freq * x)
    if name == "diagonal":
        return (np.sin(2 * np.pi * freq * 1.5 * (x + y) + phase) > 0).astype(np.float32)
    raise ValueError(f"unknown texture {name!r}; expected one of {TEXTURES}")


def _place(points_xy: np.ndarray, cx: float, cy: float, r: float, theta: float) -> list[tuple[float, float]]:
    """Scale unit-square polygon [N, 2] by r, rotate by theta and move to (cx, cy)."""
    c, s = np.cos(theta), np.sin(theta)
    rotated = points_xy @ np.array([[c, s], [-s, c]])
    return [tuple(p) for p in rotated * r + (cx, cy)]


def _star_points() -> np.ndarray:
    angles = np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    return np.stack([radii * np.sin(angles), -radii * np.cos(angles)], axis=1)


_POLYGONS = {
    "square": np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]]),
    "triangle": np.array([[0.0, -1.0], [0.87, 0.5], [-0.87, 0.5]]),
    "star": _star_points(),
}
_BAR = np.array([[-1.0, -0.25], [1.0, -0.25], [1.0, 0.25], [-1.0, 0.25]])


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx, cy, r, theta, fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, round(r / 3)))
    elif shape == "cross":
        draw.polygon(_place(_BAR, cx, cy, r, theta), fill=fill)
        draw.polygon(_place(_BAR, cx, cy, r, theta + np.pi / 2), fill=fill)
    elif shape == "stripes":
        for offset in (-0.75, 0.0, 0.75):
            bar = _BAR * (1.0, 0.5) + (0.0, offset)
            draw.polygon(_place(bar, cx, cy, r, theta), fill=fill)
    elif shape in _POLYGONS:
        draw.polygon(_place(_POLYGONS[shape], cx, cy, r, theta), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(class_index: int, size: int, rng: np.random.Generator) -> Image.Image:
    """One image of class `class_index`: height `size`, width in [size, 1.3 * size]."""
    style = _class_style(class_index)
    h, w = size, int(rng.integers(size, int(1.3 * size) + 1))
    t = _texture(style["texture"], h, w, rng)[..., None]
    background = style["bg_dark"] * (1 - t) + style["bg_light"] * t
    background += rng.normal(0, 8, 3)  # per-image colour cast
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))

    r = rng.uniform(0.2, 0.35) * size
    cx = rng.uniform(0.3, 0.7) * w
    cy = rng.uniform(0.3, 0.7) * h
    fg = np.clip(style["fg"] + rng.normal(0, 12, 3), 0, 255).astype(np.uint8)
    _draw_shape(ImageDraw.Draw(image), style["shape"], cx, cy, r, rng.uniform(0, 2 * np.pi), tuple(fg.tolist()))

    pixels = np.asarray(image, np.float32) + rng.normal(0, 5, (h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def class_name(k: int) -> str:
    style = _class_style(k)
    return f"{style['shape']} on {style['texture']}, class {k}"


def _save(image: Image.Image, path: str, kind: str | None) -> None:
    if kind == "png":  # ILSVRC-2012 train has a PNG file with a .JPEG name
        image.save(path, format="PNG")
    elif kind == "cmyk":  # ... and 22 CMYK JPEGs
        image.convert("CMYK").save(path, format="JPEG", quality=90)
    elif kind == "grayscale":  # ... and grayscale ones
        image.convert("L").save(path, format="JPEG", quality=90)
    else:
        image.save(path, format="JPEG", quality=90)


def _write_bad_files(root: str, seed: int, size: int) -> list[str]:
    """Files a damaged copy of ImageNet has; relative paths, in BAD_FILES order."""
    folder = os.path.join("train", wnid(0))
    buffer = io.BytesIO()
    render(0, size, np.random.default_rng([seed, 2])).save(buffer, format="JPEG", quality=90)
    contents = {
        "truncated": buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3],
        "empty": b"",
        "notimage": b"<html>404 Not Found</html>\n",
    }
    paths = []
    for kind in BAD_FILES:
        rel = os.path.join(folder, f"{wnid(0)}_{kind}.JPEG")
        with open(os.path.join(root, rel), "wb") as f:
            f.write(contents[kind])
        paths.append(rel)
    return paths


def _plan(num_classes: int, train_per_class: int, val_per_class: int) -> list[tuple[str, int, int, str]]:
    """(split, class, index within class, relative path) for every image, in writing order."""
    items = []
    for k in range(num_classes):
        items += [("train", k, n, f"train/{wnid(k)}/{wnid(k)}_{n}.JPEG") for n in range(train_per_class)]
    val_number = 1  # like ILSVRC2012_val_00000001.JPEG: one 1-based count over the whole val set
    for k in range(num_classes):
        for n in range(val_per_class):
            items.append(("val", k, n, f"val/{wnid(k)}/ILSVRC2012_val_{val_number:08d}.JPEG"))
            val_number += 1
    return items


def _finished(out_dir: str, params: dict) -> dict | None:
    """The summary of a finished set made with `params` in `out_dir`, or None when there is none to keep (an
    older generator's set with the same parameters is removed); refuses a folder holding anything else."""
    marker_path = os.path.join(out_dir, MARKER)
    if os.path.exists(marker_path):
        with open(marker_path) as f:
            summary = json.load(f)
        if summary["params"] == params:
            return {**summary, "path": out_dir}
        if {**summary["params"], "format_version": FORMAT_VERSION} != params:
            raise ValueError(
                f"{out_dir} already holds a fake ImageNet made with {summary['params']}, not the requested "
                f"{params}; pick another folder or delete this one"
            )
        shutil.rmtree(out_dir)  # the same set made by an older version of this generator: ours to replace
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(
            f"{out_dir} exists, is not empty and has no {MARKER}, so it is not a finished fake ImageNet; "
            "pick another folder or delete this one"
        )
    return None


def generate(
    out_dir: str,
    num_classes: int = 10,
    train_per_class: int = 100,
    val_per_class: int = 20,
    size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Write a fake ImageNet to `out_dir` (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG); returns a summary.

    Deterministic in `seed`. The set is built in `<out_dir>.tmp` and renamed into place with its
    marker file written last inside it, so `out_dir` either holds a complete set or does not exist
    (an empty `out_dir` is replaced). Rerunning with the same parameters is a no-op.
    """
    for name, value, minimum in (
        ("num_classes", num_classes, 1),
        ("train_per_class", train_per_class, 0),
        ("val_per_class", val_per_class, 0),
        ("size", size, 8),
    ):
        if value < minimum:
            raise ValueError(f"fake ImageNet: {name}={value} must be >= {minimum}")
    params = {
        "format_version": FORMAT_VERSION,
        "num_classes": num_classes,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "size": size,
        "seed": seed,
    }
    out_dir = os.path.abspath(out_dir)
    done = _finished(out_dir, params)
    if done is not None:
        return done

    # An interrupted earlier run may have left a partial build; start it over.
    build_dir = out_dir + ".tmp"
    shutil.rmtree(build_dir, ignore_errors=True)
    items = _plan(num_classes, train_per_class, val_per_class)
    for k in range(num_classes):
        for split in ("train", "val"):
            os.makedirs(os.path.join(build_dir, split, wnid(k)))
    split_ids = {"train": 0, "val": 1}
    # The first train images get the odd-but-valid encodings ImageNet really has.
    odd = dict(zip([rel for split, _, _, rel in items if split == "train"], ("png", "cmyk", "grayscale")))
    for split, k, n, rel_path in track(items, description="fake ImageNet", disable=not progress):
        # Seeding each image separately makes its bytes independent of generation order.
        rng = np.random.default_rng([seed, split_ids[split], k, n])
        _save(render(k, size, rng), os.path.join(build_dir, rel_path), odd.get(rel_path))
    bad = _write_bad_files(build_dir, seed, size) if train_per_class else []
    with open(os.path.join(build_dir, "LOC_synset_mapping.txt"), "w") as f:
        f.writelines(f"{wnid(k)} {class_name(k)}\n" for k in range(num_classes))

    summary = {
        "params": params,
        "wnids": [wnid(k) for k in range(num_classes)],
        "train_images": num_classes * train_per_class,
        "val_images": num_classes * val_per_class,
        "odd_files": {kind: rel for rel, kind in odd.items()},
        "bad_files": bad,
    }
    with open(os.path.join(build_dir, MARKER), "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(build_dir, out_dir)  # POSIX rename also replaces an empty out_dir
    return {**summary, "path": out_dir}
