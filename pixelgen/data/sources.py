"""Find and label the source images of an ImageNet (ILSVRC-2012) folder for the shard stage.

Each requested split folder `<image_root>/<split>` has one of three layouts:
    class_folders  <split>/<wnid>/*.JPEG (the official train tar extracted, or val sorted into class folders)
    flat_loc_csv   <split>/ILSVRC2012_val_*.JPEG, labelled by Kaggle's LOC_val_solution.csv
    flat_devkit    <split>/ILSVRC2012_val_*.JPEG, labelled by the devkit's ground truth + meta.mat
Kaggle's release keeps the images under <root>/ILSVRC/Data/CLS-LOC. Images are listed, never opened:
damaged image content is the shard stage's business.
"""

import csv
import os
from dataclasses import dataclass, field

import numpy as np
import scipy.io

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")  # compared lower-cased; other files are ignored
LOC_CSV = "LOC_val_solution.csv"
LOC_MAPPING = "LOC_synset_mapping.txt"
DEVKIT_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "meta.mat"
DEVKIT_DIR = os.path.join("ILSVRC2012_devkit_t12", "data")
KAGGLE_IMAGE_DIR = os.path.join("ILSVRC", "Data", "CLS-LOC")


class LayoutError(ValueError):
    """A source layout we cannot recognise, or labels that are missing or inconsistent."""


@dataclass
class SplitSource:
    split: str
    layout: str  # "class_folders" | "flat_loc_csv" | "flat_devkit"
    image_dir: str
    label_file: str | None  # LOC_val_solution.csv or the devkit ground truth for flat layouts
    items: list[tuple[str, str]]  # (absolute image path, wnid), sorted by path


@dataclass
class Source:
    root: str
    image_root: str  # root, or root/ILSVRC/Data/CLS-LOC for the Kaggle release
    splits: dict[str, SplitSource]  # in the order requested
    classes: list[str]  # sorted wnids; class index = position in this list
    names: dict[str, str]  # wnid -> human-readable name, {} when the input has none
    class_source: str  # where `classes` came from, recorded in the manifest

    def describe(self) -> dict:
        return {
            "root": self.root,
            "image_root": self.image_root,
            "class_source": self.class_source,
            "splits": {
                name: {"layout": s.layout, "image_dir": s.image_dir, "label_file": s.label_file, "images": len(s.items)}
                for name, s in self.splits.items()
            },
        }


@dataclass
class _Labels:
    """The label source of one flat split."""

    layout: str
    path: str
    by_stem: dict[str, str]  # image file name without extension -> wnid
    synsets: list[str] | None = None  # sorted leaf wnids of meta.mat
    words: dict[str, str] = field(default_factory=dict)  # meta.mat names of those wnids


def _entries(path: str) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except PermissionError as e:
        raise PermissionError(
            f"cannot list {path}: permission denied; make it readable by the user running the shard stage "
            "(e.g. chmod -R a+rX on the source folder)"
        ) from e


def _is_image(entry: os.DirEntry) -> bool:
    return entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file()


def _read_loc_csv(path: str) -> _Labels:
    by_stem = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or ()):
            raise LayoutError(
                f"{path}: header is {reader.fieldnames}, expected ImageId,PredictionString; "
                f"use Kaggle's {LOC_CSV} unchanged"
            )
        for row in reader:
            tokens = (row["PredictionString"] or "").split()
            if not tokens:
                raise LayoutError(
                    f"{path} line {reader.line_num}: empty PredictionString for {row['ImageId']}; "
                    "each row must start with the image's wnid"
                )
            # Rows list one "wnid x0 y0 x1 y1" group per box; every box of an image has its class.
            by_stem[row["ImageId"]] = tokens[0]
    return _Labels("flat_loc_csv", path, by_stem)


def _read_devkit(truth_path: str) -> _Labels:
    meta_path = os.path.join(os.path.dirname(truth_path), DEVKIT_META)
    try:
        # squeeze_me turns a one-entry struct array into a 0-d array; atleast_1d keeps it iterable.
        synsets = np.atleast_1d(scipy.io.loadmat(meta_path, squeeze_me=True)["synsets"])
        # meta.mat also lists the WordNet ancestors (num_children > 0); only the leaves are classes.
        leaves = [s for s in synsets if int(s["num_children"]) == 0]
        id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}
        words = {str(s["WNID"]): str(s["words"]) for s in leaves}
    except (KeyError, ValueError, IndexError) as e:
        raise LayoutError(
            f"{meta_path}: no readable 'synsets' struct with ILSVRC2012_ID, WNID, words and num_children ({e}); "
            f"use the meta.mat from {DEVKIT_DIR}"
        ) from e
    by_stem = {}
    with open(truth_path) as f:
        for number, line in enumerate(f, start=1):
            ilsvrc_id = line.strip()
            if not ilsvrc_id:
                continue
            if not ilsvrc_id.isdigit() or int(ilsvrc_id) not in id_to_wnid:
                raise LayoutError(
                    f"{truth_path} line {number}: {ilsvrc_id!r} is not the ILSVRC2012_ID of a leaf class in "
                    f"{meta_path}; use the ground truth and meta.mat of the same devkit"
                )
            # Line i labels ILSVRC2012_val_<i>, by ILSVRC2012_ID, whose order is not sorted-wnid order.
            by_stem[f"ILSVRC2012_val_{number:08d}"] = id_to_wnid[int(ilsvrc_id)]
    return _Labels("flat_devkit", truth_path, by_stem, sorted(id_to_wnid.values()), words)


def _read_given_labels(path: str) -> _Labels:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"shard.val_labels: {path} does not exist; set it to {LOC_CSV} or {DEVKIT_TRUTH}")
    if path.lower().endswith(".csv"):
        return _read_loc_csv(path)
    if not path.lower().endswith(".txt"):
        raise LayoutError(
            f"shard.val_labels: {path} is neither a .csv ({LOC_CSV}) nor a .txt ({DEVKIT_TRUTH}); "
            "set it to one of those"
        )
    meta_path = os.path.join(os.path.dirname(path), DEVKIT_META)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(
            f"shard.val_labels: {path} holds ILSVRC2012_IDs, which only {DEVKIT_META} maps to wnids, but {meta_path} "
            f"is missing; copy {DEVKIT_META} from the devkit's data folder next to it"
        )
    return _read_devkit(path)


def _find_labels(root: str, split_dir: str, loose: list[str], val_labels: str | None) -> _Labels:
    if val_labels is not None:
        return _read_given_labels(os.path.abspath(val_labels))
    csv_paths = [os.path.join(root, LOC_CSV), os.path.join(split_dir, LOC_CSV)]
    devkit_dirs = [os.path.join(root, DEVKIT_DIR), root]
    for path in csv_paths:
        if os.path.isfile(path):
            return _read_loc_csv(path)
    for folder in devkit_dirs:
        if all(os.path.isfile(os.path.join(folder, name)) for name in (DEVKIT_TRUTH, DEVKIT_META)):
            return _read_devkit(os.path.join(folder, DEVKIT_TRUTH))
    looked_for = csv_paths + [f"{os.path.join(d, DEVKIT_TRUTH)} with {DEVKIT_META} beside it" for d in devkit_dirs]
    raise LayoutError(
        f"{split_dir} holds {len(loose)} loose images (e.g. {os.path.basename(loose[0])}) and no label file was found; "
        f"looked for, in order: {'; '.join(looked_for)}. Put one of these files there, "
        "or set shard.val_labels to its path"
    )


def _scan_split(split: str, split_dir: str, root: str, val_labels: str | None) -> tuple[SplitSource, _Labels | None]:
    loose: list[str] = []
    in_folders: list[tuple[str, str]] = []
    for entry in _entries(split_dir):
        if entry.is_dir():
            in_folders += [(e.path, entry.name) for e in _entries(entry.path) if _is_image(e)]
        elif _is_image(entry):
            loose.append(entry.path)
    if loose and in_folders:
        raise LayoutError(
            f"{split_dir} holds both loose images (e.g. {os.path.basename(loose[0])}) and class folders with images "
            f"(e.g. {os.path.relpath(in_folders[0][0], split_dir)}); keep one layout per split: all images in "
            "<wnid>/ folders, or all loose with a label file"
        )
    if in_folders:
        return SplitSource(split, "class_folders", split_dir, None, sorted(in_folders)), None
    if not loose:
        raise LayoutError(
            f"{split_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}), neither loose nor in <wnid>/ folders; "
            f"point data.imagenet_dir at a complete copy or drop {split!r} from shard.splits"
        )
    labels = _find_labels(root, split_dir, loose, val_labels)
    items = []
    for path in loose:
        wnid = labels.by_stem.get(os.path.splitext(os.path.basename(path))[0])
        if wnid is None:
            raise LayoutError(f"{path} has no label in {labels.path}; use the label file that belongs to these images")
        items.append((path, wnid))
    return SplitSource(split, labels.layout, split_dir, labels.path, sorted(items)), labels


def _missing_split(image_root: str, split_dir: str) -> FileNotFoundError:
    listing = [e.name + ("/" if e.is_dir() else "") for e in _entries(image_root)]
    shown = ", ".join(listing[:10]) + (f", ... ({len(listing)} entries)" if len(listing) > 10 else "")
    return FileNotFoundError(
        f"no split folder {split_dir}; {image_root} contains: {shown or 'nothing'}. Expected {split_dir}/<wnid>/*.JPEG "
        f"or loose {split_dir}/*.JPEG with {LOC_CSV} or the devkit labels; point data.imagenet_dir at the extracted "
        "ILSVRC-2012 folder or fix shard.splits"
    )


def _read_mapping(path: str) -> dict[str, str]:
    names = {}
    with open(path) as f:
        for line in f:
            wnid, _, name = line.strip().partition(" ")
            if wnid:
                names[wnid] = name
    return names


def scan_source(root: str, splits: list[str], val_labels: str | None = None) -> Source:
    """Detect each split's layout under `root` and label its images; see the module docstring."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"ImageNet source {root} is not a folder; set data.imagenet_dir to the extracted ILSVRC-2012 folder"
        )
    kaggle_dir = os.path.join(root, KAGGLE_IMAGE_DIR)
    image_root = kaggle_dir if os.path.isdir(kaggle_dir) else root
    found: dict[str, SplitSource] = {}
    devkit: _Labels | None = None
    for split in splits:
        split_dir = os.path.join(image_root, split)
        if not os.path.isdir(split_dir):
            raise _missing_split(image_root, split_dir)
        found[split], labels = _scan_split(split, split_dir, root, val_labels)
        if labels is not None and labels.synsets is not None:
            devkit = labels

    mapping_path = os.path.join(root, LOC_MAPPING)
    mapping = _read_mapping(mapping_path) if os.path.isfile(mapping_path) else None
    train = found.get("train")
    if train is not None and train.layout == "class_folders":
        classes, class_source = sorted({w for _, w in train.items}), f"{train.image_dir}/<wnid> folders"
    elif mapping is not None:
        classes, class_source = sorted(mapping), mapping_path
    elif devkit is not None:
        classes, class_source = devkit.synsets, os.path.join(os.path.dirname(devkit.path), DEVKIT_META)
    else:
        classes = sorted({w for s in found.values() for _, w in s.items})
        class_source = "wnids of splits " + ", ".join(found)

    known = set(classes)
    for s in found.values():
        stray = next(((path, w) for path, w in s.items if w not in known), None)
        if stray is not None:
            raise LayoutError(
                f"{s.label_file or s.image_dir}: wnid {stray[1]!r} (e.g. {stray[0]}) is not among the {len(classes)} "
                f"classes from {class_source}; every split must use the train split's wnids"
            )
    all_names = mapping if mapping is not None else devkit.words if devkit is not None else {}
    names = {w: all_names[w] for w in classes if w in all_names}
    return Source(root, image_root, found, classes, names, class_source)
