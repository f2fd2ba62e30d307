"""Tiny dataset trees in each on-disk format, generated into a folder (for tests: no downloads).

Images are small random RGB files of odd, varying sizes; every segmentation has the size of its image
and marks a rectangle of the image (with a soft, below-threshold border where the format has grey
levels), so tests can check masks against known boxes.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

CUB_SPECIES = ("001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross")
HARD_IMAGENET_WNIDS = ("n01440764", "n02007558")


def write_image(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    """A random RGB image of ``size`` (width, height); the suffix picks JPEG or PNG."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG" if path.suffix.lower() == ".png" else "JPEG")
    return path


def box_of(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The foreground box (left, top, right, bottom) drawn in the mask of an image of ``size``."""
    width, height = size
    return width // 4, height // 3, 3 * width // 4, 2 * height // 3


def write_mask(path: Path, size: tuple[int, int], soft: bool = True, fmt: str = "PNG") -> Path:
    """A greyscale mask: 255 inside ``box_of(size)``; with ``soft``, a 100 (below half) band around it."""
    levels = np.zeros((size[1], size[0]), dtype=np.uint8)
    left, top, right, bottom = box_of(size)
    if soft:
        levels[max(top - 2, 0) : bottom + 2, max(left - 2, 0) : right + 2] = 100
    levels[top:bottom, left:right] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(levels, mode="L").save(path, format=fmt)
    return path


def corrupt(path: Path) -> Path:
    """Truncate an image file so it opens but cannot be decoded."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


@dataclass
class CubTree:
    """What ``make_cub`` wrote."""

    root: Path
    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    is_train: list[bool] = field(default_factory=list)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)


def make_cub(root: Path, per_class: int = 6, train_per_class: int = 5) -> CubTree:
    """CUB_200_2011 with 3 species: images/, the index files, classes.txt, segmentations/."""
    tree = CubTree(root)
    for label, species in enumerate(CUB_SPECIES):
        for k in range(per_class):
            path = f"{species}/{species.split('.')[1]}_{k:04d}_{label}.jpg"
            size = (29 + 4 * k + label, 23 + 3 * k)
            write_image(root / "images" / path, size, seed=len(tree.paths))
            write_mask((root / "segmentations" / path).with_suffix(".png"), size)
            tree.paths.append(path)
            tree.labels.append(label)
            tree.is_train.append(k < train_per_class)
            tree.sizes[path] = size
    ids = range(1, len(tree.paths) + 1)
    (root / "images.txt").write_text("".join(f"{i} {p}\n" for i, p in zip(ids, tree.paths, strict=True)))
    (root / "image_class_labels.txt").write_text(
        "".join(f"{i} {label + 1}\n" for i, label in zip(ids, tree.labels, strict=True))
    )
    (root / "train_test_split.txt").write_text(
        "".join(f"{i} {int(t)}\n" for i, t in zip(ids, tree.is_train, strict=True))
    )
    (root / "classes.txt").write_text("".join(f"{i + 1} {s}\n" for i, s in enumerate(CUB_SPECIES)))
    return tree


def make_waterbirds(root: Path, cub: CubTree) -> list[dict[str, int | str]]:
    """A Waterbirds folder over the CUB tree's images (same paths and sizes) and its metadata.csv."""
    rows = []
    for i, path in enumerate(cub.paths):
        write_image(root / path, cub.sizes[path], seed=100 + i)
        y = int(cub.labels[i] == 2)
        rows.append(
            {
                "img_id": i + 1,
                "img_filename": path,
                "y": y,
                "split": i % 3,
                "place": (i // 3) % 2,
                "place_filename": f"/b/bamboo_forest/{i:08d}.jpg",
            }
        )
    with (root / "metadata.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def make_travelingbirds(root: Path, cub: CubTree) -> dict[str, dict[str, int]]:
    """``root/CUB_fixed`` with every CUB image in train/ and test/, and the two places JSON files."""
    fixed = root / "CUB_fixed"
    for i, path in enumerate(cub.paths):
        for part in ("train", "test"):
            write_image(fixed / part / path, cub.sizes[path], seed=200 + i)
    places = {
        "train": {species: 10 + k for k, species in enumerate(CUB_SPECIES)},
        # As the generator does: test places are the training places rolled by one species.
        "test": {species: 10 + (k - 1) % len(CUB_SPECIES) for k, species in enumerate(CUB_SPECIES)},
    }
    for part, mapping in places.items():
        (fixed / f"{part}_places.json").write_text(json.dumps(mapping, indent=4, sort_keys=True))
    return places


def make_hard_imagenet(mask_root: Path, imagenet_root: Path, train: int = 5, val: int = 2) -> None:
    """Hard ImageNet masks ``{train,val}/<wnid>_<file>`` over a small ImageNet tree with extra classes."""
    for w, wnid in enumerate(HARD_IMAGENET_WNIDS):
        for part, count in (("train", train), ("val", val)):
            for k in range(count):
                name = f"{wnid}_{k}.JPEG" if part == "train" else f"ILSVRC2012_val_{w:04d}{k:04d}.JPEG"
                size = (33 + 2 * k, 27 + w)
                write_image(imagenet_root / part / wnid / name, size, seed=300 + 10 * w + k)
                # The release names masks after the ImageNet file, extension included.
                write_mask(mask_root / part / f"{wnid}_{name}", size, soft=False)
    # A class that Hard ImageNet does not use: it must not appear in the dataset.
    write_image(imagenet_root / "train" / "n09999999" / "n09999999_0.JPEG", (31, 31))


def make_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), train: int = 3, val: int = 2) -> None:
    """A class-per-folder tree with train/ and val/ (one image in a nested sub-folder, one PNG)."""
    for c, name in enumerate(classes):
        for part, count in (("train", train), ("val", val)):
            for k in range(count):
                write_image(root / part / name / f"{name}_{k}.jpg", (30 + k, 26 + c), seed=400 + k)
        write_image(root / "train" / name / "nested" / f"{name}_deep.png", (28, 28))
    (root / "train" / classes[0] / "notes.txt").write_text("not an image")


def waterbirds_training_flags(root: Path) -> list[str]:
    """aim-train's flags for a tiny run on a Waterbirds tree (with its CUB tree) written under
    ``root``: resnet18, 64 px, two epochs of batch 4 on the CPU, annealing over the first."""
    cub = make_cub(root / "CUB_200_2011")
    make_waterbirds(root / "waterbirds", cub)
    return [
        "--dataset", "waterbirds", "--data-root", str(root / "waterbirds"), "--cub-root", str(cub.root),
        "--model", "resnet18", "--image-size", "64", "--epochs", "2", "--batch-size", "4",
        "--num-workers", "0", "--device", "cpu", "--lr-backbone", "1e-3", "--lr-topdown", "1e-3",
        "--area-duration", "1", "--select-from", "1", "--mask-log-every", "1",
    ]  # fmt: skip
