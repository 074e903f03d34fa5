"""Source-folder detection for the shard stage: layouts, label files, class lists and their error messages."""

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import scipy.io
from PIL import Image

from pixelgen.data import fake_imagenet
from pixelgen.data.sources import DEVKIT_TRUTH, LayoutError, scan_source

MAPPING = {"n01": "tench, Tinca tinca", "n02": "goldfish, Carassius auratus", "n03": "great white shark"}
SYNSET_DTYPE = [("ILSVRC2012_ID", "i4"), ("WNID", "O"), ("words", "O"), ("num_children", "i4")]
# ILSVRC2012_ID order (n03, n01, n02) differs from sorted-wnid order, as in the real meta.mat, plus one
# non-leaf ancestor (ID > 1000, num_children > 0) that must not become a class.
SYNSETS = [
    (1, "n03", "shark words", 0),
    (2, "n01", "tench words", 0),
    (3, "n02", "goldfish words", 0),
    (1001, "n00", "fish", 3),
]
WNID_OF_ID = {1: "n03", 2: "n01", 3: "n02"}


def image(path: str, color: tuple[int, int, int] = (200, 30, 30)) -> str:
    """A tiny real image at `path` (PNG for .png names, JPEG otherwise)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path, format="PNG" if path.lower().endswith(".png") else "JPEG")
    return path


def text(path: str, content: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(content)
    return path


def class_folders(split_dir: str, files: dict[str, list[str]]) -> list[tuple[str, str]]:
    """Write `split_dir/<wnid>/<name>` images; returns the expected (path, wnid) items, sorted."""
    return sorted((image(os.path.join(split_dir, wnid, name)), wnid) for wnid, names in files.items() for name in names)


def flat_val(val_dir: str, numbers: list[int]) -> list[str]:
    return [image(os.path.join(val_dir, f"ILSVRC2012_val_{n:08d}.JPEG")) for n in numbers]


def loc_csv(path: str, labels: dict[int, str]) -> str:
    """Kaggle's LOC_val_solution.csv: several 'wnid x0 y0 x1 y1' boxes per row; the first wnid is the label.

    The second box names another wnid so that taking any token but the first shows up as a wrong label."""
    rows = [f"ILSVRC2012_val_{n:08d},{w} 1 2 30 40 n99 5 6 7 8 " for n, w in labels.items()]
    return text(path, "\n".join(["ImageId,PredictionString", *rows]) + "\n")


def mapping_file(root: str, names: dict[str, str]) -> str:
    return text(os.path.join(root, "LOC_synset_mapping.txt"), "".join(f"{w} {n}\n" for w, n in names.items()))


def devkit(folder: str, truth: list[int]) -> str:
    """meta.mat (SYNSETS) + ground truth (line i = ILSVRC2012_ID of val image i) in `folder`."""
    os.makedirs(folder, exist_ok=True)
    scipy.io.savemat(os.path.join(folder, "meta.mat"), {"synsets": np.array(SYNSETS, dtype=SYNSET_DTYPE)})
    return text(os.path.join(folder, DEVKIT_TRUTH), "".join(f"{i}\n" for i in truth))


def train_tree(root: str) -> list[tuple[str, str]]:
    return class_folders(os.path.join(root, "train"), {"n01": ["a.JPEG"], "n02": ["b.JPEG"], "n03": ["c.JPEG"]})


def test_class_folders_for_train_and_val(tmp_path):
    root = str(tmp_path / "src")
    train = class_folders(
        os.path.join(root, "train"), {"n02": ["z.JPEG", "b.jpg", "a.Png"], "n01": ["y.jpeg", "x.JPG"], "n10": ["q.PNG"]}
    )
    text(os.path.join(root, "train", "n01", "README.txt"), "not an image")
    text(os.path.join(root, "train", "n02", ".DS_Store"), "")
    text(os.path.join(root, "train", "notes.JPEG.txt"), "")
    image(os.path.join(root, "train", "n01", "nested", "deeper.JPEG"))  # two levels down: ignored
    os.makedirs(os.path.join(root, "train", "n05"))  # empty class folder: skipped
    val = class_folders(os.path.join(root, "val"), {"n10": ["ILSVRC2012_val_00000002.JPEG"], "n01": ["v.JPEG"]})

    source = scan_source(root, ["train", "val"])

    assert source.root == root and source.image_root == root
    assert list(source.splits) == ["train", "val"]
    assert source.classes == ["n01", "n02", "n10"]
    assert source.splits["train"].items == train and len(train) == 6
    assert [os.path.basename(p) for p, _ in train[:2]] == ["x.JPG", "y.jpeg"]
    assert source.splits["val"].items == val
    for split in source.splits.values():
        assert split.layout == "class_folders" and split.label_file is None
    assert source.names == {}
    assert source.describe() == {
        "root": root,
        "image_root": root,
        "class_source": f"{root}/train/<wnid> folders",
        "splits": {
            "train": {"layout": "class_folders", "image_dir": f"{root}/train", "label_file": None, "images": 6},
            "val": {"layout": "class_folders", "image_dir": f"{root}/val", "label_file": None, "images": 2},
        },
    }


def test_fake_imagenet_is_read_as_class_folders(tmp_path):
    out = str(tmp_path / "fake")
    fake_imagenet.generate(out, num_classes=3, train_per_class=2, val_per_class=2, size=16, seed=0, progress=False)

    source = scan_source(out, ["train", "val"])

    assert source.classes == [fake_imagenet.wnid(k) for k in range(3)]
    for split in ("train", "val"):
        items = source.splits[split].items
        assert [p for p, _ in items] == sorted(glob.glob(os.path.join(out, split, "*", "*.JPEG")))
        assert all(os.path.basename(os.path.dirname(p)) == w for p, w in items)
    assert len(source.splits["val"].items) == 6


def test_flat_val_with_loc_csv_and_mapping(tmp_path):
    root = str(tmp_path / "src")
    train_tree(root)
    val = flat_val(os.path.join(root, "val"), [1, 2, 3])
    # Rows for images not on disk (here 4) are fine: a damaged copy may miss files.
    csv_path = loc_csv(os.path.join(root, "LOC_val_solution.csv"), {1: "n02", 2: "n03", 3: "n02", 4: "n01"})
    mapping_file(root, {**MAPPING, "n99": "not a class here"})

    source = scan_source(root, ["train", "val"])

    split = source.splits["val"]
    assert split.layout == "flat_loc_csv" and split.label_file == csv_path
    assert split.items == list(zip(val, ["n02", "n03", "n02"]))
    assert source.classes == ["n01", "n02", "n03"]
    assert source.names == MAPPING
    assert source.describe()["splits"]["val"]["images"] == 3


def test_kaggle_release_root(tmp_path):
    root = str(tmp_path / "imagenet-object-localization-challenge")
    image_root = os.path.join(root, "ILSVRC", "Data", "CLS-LOC")
    train = train_tree(image_root)
    val = flat_val(os.path.join(image_root, "val"), [1, 2])
    loc_csv(os.path.join(root, "LOC_val_solution.csv"), {1: "n03", 2: "n01"})
    mapping_file(root, MAPPING)

    source = scan_source(root, ["train", "val"])

    assert source.root == root and source.image_root == image_root
    assert source.splits["train"].items == train
    assert source.splits["val"].image_dir == os.path.join(image_root, "val")
    assert source.splits["val"].items == list(zip(val, ["n03", "n01"]))
    assert source.names == MAPPING


@pytest.mark.parametrize("with_train", [True, False])
def test_flat_val_with_devkit(tmp_path, with_train):
    root = str(tmp_path / "src")
    if with_train:
        train_tree(root)
    val = flat_val(os.path.join(root, "val"), [1, 2, 3, 4])
    data_dir = os.path.join(root, "ILSVRC2012_devkit_t12", "data")
    truth = devkit(data_dir, [3, 1, 2, 1])
    loaded = scipy.io.loadmat(os.path.join(data_dir, "meta.mat"), squeeze_me=True)["synsets"]
    assert [(int(s["ILSVRC2012_ID"]), str(s["WNID"]), int(s["num_children"])) for s in loaded] == [
        (i, w, c) for i, w, _, c in SYNSETS
    ]

    source = scan_source(root, ["train", "val"] if with_train else ["val"])

    split = source.splits["val"]
    assert split.layout == "flat_devkit" and split.label_file == truth
    assert split.items == list(zip(val, [WNID_OF_ID[i] for i in (3, 1, 2, 1)]))
    assert source.classes == ["n01", "n02", "n03"]
    # Image 2 has ILSVRC2012_ID 1, but its class index is the sorted-wnid position of n03.
    assert source.classes.index(split.items[1][1]) == 2
    assert source.names == {"n01": "tench words", "n02": "goldfish words", "n03": "shark words"}
    expected_source = f"{root}/train/<wnid> folders" if with_train else os.path.join(data_dir, "meta.mat")
    assert source.describe()["class_source"] == expected_source


@pytest.mark.parametrize("where", ["root_csv", "split_csv", "devkit_dir", "root_devkit"])
def test_label_file_search_locations(tmp_path, where):
    root = str(tmp_path / "src")
    val_dir = os.path.join(root, "val")
    val = flat_val(val_dir, [1, 2])
    if where == "root_csv":
        label = loc_csv(os.path.join(root, "LOC_val_solution.csv"), {1: "n03", 2: "n01"})
        # The root CSV is searched before the split folder's CSV and the devkit; these would label both n02.
        loc_csv(os.path.join(val_dir, "LOC_val_solution.csv"), {1: "n02", 2: "n02"})
        devkit(os.path.join(root, "ILSVRC2012_devkit_t12", "data"), [3, 3])
    elif where == "split_csv":
        label = loc_csv(os.path.join(val_dir, "LOC_val_solution.csv"), {1: "n03", 2: "n01"})
        devkit(os.path.join(root, "ILSVRC2012_devkit_t12", "data"), [3, 3])
    elif where == "devkit_dir":
        label = devkit(os.path.join(root, "ILSVRC2012_devkit_t12", "data"), [1, 2])
        devkit(root, [3, 3])
    else:
        label = devkit(root, [1, 2])

    source = scan_source(root, ["val"])

    assert source.splits["val"].label_file == label
    assert source.splits["val"].items == list(zip(val, ["n03", "n01"]))


@pytest.mark.parametrize("kind", ["csv", "txt"])
def test_val_labels_override(tmp_path, kind):
    root = str(tmp_path / "src")
    train_tree(root)
    val = flat_val(os.path.join(root, "val"), [1, 2])
    loc_csv(os.path.join(root, "LOC_val_solution.csv"), {1: "n02", 2: "n02"})  # would win without the override
    elsewhere = str(tmp_path / "labels")
    if kind == "csv":
        given = loc_csv(os.path.join(elsewhere, "my_val_labels.csv"), {1: "n03", 2: "n01"})
    else:
        given = devkit(elsewhere, [1, 2])

    source = scan_source(root, ["train", "val"], val_labels=given)

    assert source.splits["val"].layout == ("flat_loc_csv" if kind == "csv" else "flat_devkit")
    assert source.splits["val"].label_file == given
    assert source.splits["val"].items == list(zip(val, ["n03", "n01"]))


def test_val_labels_txt_needs_meta_mat(tmp_path):
    root = str(tmp_path / "src")
    flat_val(os.path.join(root, "val"), [1])
    given = text(str(tmp_path / "labels" / DEVKIT_TRUTH), "1\n")
    meta = str(tmp_path / "labels" / "meta.mat")
    with pytest.raises(FileNotFoundError, match=re.escape(meta)):
        scan_source(root, ["val"], val_labels=given)


def test_val_only_takes_classes_from_mapping(tmp_path):
    root = str(tmp_path / "src")
    val = flat_val(os.path.join(root, "val"), [1, 2])
    loc_csv(os.path.join(root, "LOC_val_solution.csv"), {1: "n03", 2: "n01"})
    mapping = mapping_file(root, MAPPING)

    source = scan_source(root, ["val"])

    assert list(source.splits) == ["val"]
    assert source.classes == ["n01", "n02", "n03"]  # n02 has no val image but is still class 1
    assert source.splits["val"].items == list(zip(val, ["n03", "n01"]))
    assert source.names == MAPPING
    assert source.describe()["class_source"] == mapping


def test_missing_split_folder_lists_root(tmp_path):
    root = str(tmp_path / "src")
    train_tree(root)
    text(os.path.join(root, "notes.txt"), "")
    with pytest.raises(FileNotFoundError) as error:
        scan_source(root, ["train", "validation"])
    message = str(error.value)
    assert os.path.join(root, "validation") in message
    assert "notes.txt, train/" in message
    assert "<wnid>/*.JPEG" in message


def test_flat_images_without_label_file(tmp_path):
    root = str(tmp_path / "src")
    val_dir = os.path.join(root, "val")
    flat_val(val_dir, [1, 2, 3])
    with pytest.raises(LayoutError) as error:
        scan_source(root, ["val"])
    message = str(error.value)
    assert f"{val_dir} holds 3 loose images (e.g. ILSVRC2012_val_00000001.JPEG)" in message
    for looked_for in (
        os.path.join(root, "LOC_val_solution.csv"),
        os.path.join(val_dir, "LOC_val_solution.csv"),
        os.path.join(root, "ILSVRC2012_devkit_t12", "data", DEVKIT_TRUTH),
        os.path.join(root, DEVKIT_TRUTH),
        "meta.mat",
        "shard.val_labels",
    ):
        assert looked_for in message


def test_loose_image_without_label_row(tmp_path):
    root = str(tmp_path / "src")
    missing = flat_val(os.path.join(root, "val"), [1, 2])[1]
    csv_path = loc_csv(os.path.join(root, "LOC_val_solution.csv"), {1: "n01"})
    with pytest.raises(LayoutError, match=f"{re.escape(missing)} has no label in {re.escape(csv_path)}"):
        scan_source(root, ["val"])


def test_mixed_loose_images_and_class_folders(tmp_path):
    root = str(tmp_path / "src")
    val_dir = os.path.join(root, "val")
    flat_val(val_dir, [1])
    class_folders(val_dir, {"n01": ["ILSVRC2012_val_00000002.JPEG"]})
    with pytest.raises(LayoutError) as error:
        scan_source(root, ["val"])
    message = str(error.value)
    assert val_dir in message
    assert "ILSVRC2012_val_00000001.JPEG" in message and "n01/ILSVRC2012_val_00000002.JPEG" in message


def test_val_wnid_not_among_train_classes(tmp_path):
    root = str(tmp_path / "src")
    train_tree(root)
    val_dir = os.path.join(root, "val")
    class_folders(val_dir, {"n01": ["v1.JPEG"], "n77": ["v2.JPEG"]})
    with pytest.raises(LayoutError, match=f"{re.escape(val_dir)}: wnid 'n77'.*train split's wnids"):
        scan_source(root, ["train", "val"])


def test_flat_val_wnid_not_among_train_classes_names_label_file(tmp_path):
    root = str(tmp_path / "src")
    train_tree(root)
    flat_val(os.path.join(root, "val"), [1])
    csv_path = loc_csv(os.path.join(root, "LOC_val_solution.csv"), {1: "n77"})
    with pytest.raises(LayoutError, match=f"{re.escape(csv_path)}: wnid 'n77'"):
        scan_source(root, ["train", "val"])


def test_empty_split(tmp_path):
    root = str(tmp_path / "src")
    train_tree(root)
    val_dir = os.path.join(root, "val")
    text(os.path.join(val_dir, "README.txt"), "")
    os.makedirs(os.path.join(val_dir, "n01"))
    with pytest.raises(LayoutError, match=f"{re.escape(val_dir)} holds no images"):
        scan_source(root, ["train", "val"])


def test_unreadable_class_folder(tmp_path):
    # pytest's tmp_path is root-only (0700); an unprivileged user needs a world-readable tree.
    tmp = tempfile.mkdtemp(dir="/tmp")
    root = os.path.join(tmp, "src")
    locked = os.path.join(root, "train", "n02")
    try:
        os.chmod(tmp, 0o755)
        train_tree(root)
        os.chmod(locked, 0o000)
        if os.geteuid() == 0:
            # root reads through chmod 000, so scan as `nobody`.
            code = "import sys\nfrom pixelgen.data.sources import scan_source\nscan_source(sys.argv[1], ['train'])"
            drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            proc = subprocess.run(
                [*drop, sys.executable, "-c", code, root], capture_output=True, text=True, timeout=120, cwd=tmp
            )
            assert proc.returncode != 0
            assert "PermissionError" in proc.stderr and f"cannot list {locked}:" in proc.stderr, proc.stderr
        else:
            with pytest.raises(PermissionError, match=f"cannot list {re.escape(locked)}:"):
                scan_source(root, ["train"])
    finally:
        if os.path.isdir(locked):
            os.chmod(locked, 0o755)
        shutil.rmtree(tmp)
