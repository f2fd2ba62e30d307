"""Datasets in their on-disk formats (tiny generated trees) and transforms that keep masks aligned."""

import json
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import (
    CUB_SPECIES,
    HARD_IMAGENET_WNIDS,
    box_of,
    corrupt,
    make_cub,
    make_folder,
    make_hard_imagenet,
    make_travelingbirds,
    make_waterbirds,
)
from PIL import Image
from torch.utils.data import default_collate
from torchvision import tv_tensors
from torchvision.transforms import v2

from aim_ext.data import (
    BadImageWarning,
    CorruptImageError,
    CUBDataset,
    FolderDataset,
    HardImageNetDataset,
    PairedRandAugment,
    TravelingBirdsDataset,
    WaterbirdsDataset,
    build_dataset,
    eval_transform,
    holdout_split,
    list_datasets,
    train_transform,
)
from aim_ext.data.transforms import COLOUR_OPS, GEOMETRIC_OPS

SIZE = 16
IDENTITY = v2.Identity()


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """Every format, generated once for the read-only tests."""
    base = tmp_path_factory.mktemp("data")
    cub = make_cub(base / "CUB_200_2011")
    waterbirds = make_waterbirds(base / "waterbird_complete95_forest2water2", cub)
    places = make_travelingbirds(base, cub)
    make_hard_imagenet(base / "hardImageNet", base / "imagenet")
    make_folder(base / "imagenet100")
    return {"base": base, "cub": cub, "waterbirds": waterbirds, "places": places}


def test_cub_splits_are_official_test_and_a_seeded_stratified_val_holdout(trees):
    root = trees["cub"].root
    train, val, test = (CUBDataset(root, s, eval_transform(SIZE)) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (12, 3, 3)
    assert train.classes == list(CUB_SPECIES) and train.num_classes == 3
    assert sorted(set(train.labels)) == [0, 1, 2] and sorted(val.labels) == [0, 1, 2]
    official_train = {p for p, t in zip(trees["cub"].paths, trees["cub"].is_train, strict=True) if t}
    assert set(train.ids).isdisjoint(val.ids) and set(train.ids) | set(val.ids) == official_train
    assert set(test.ids).isdisjoint(official_train)
    assert CUBDataset(root, "val").ids == val.ids
    assert any(CUBDataset(root, "val", seed=s).ids != val.ids for s in range(1, 5))
    assert train.groups is None and train.has_masks

    sample = train[0]
    assert set(sample) == {"image", "label", "mask", "index"}
    assert sample["image"].shape == (3, SIZE, SIZE) and sample["image"].dtype == torch.float32
    assert sample["mask"].shape == (SIZE, SIZE) and sample["mask"].dtype == torch.bool
    assert sample["label"] == train.labels[0] and sample["index"] == 0


def test_holdout_split_rounds_per_class_and_keeps_singletons():
    kept, held = holdout_split([0] * 10 + [1] * 5 + [2], 0.2, seed=3)
    assert sorted(kept + held) == list(range(16))
    assert [sum(1 for p in held if p < 10), sum(1 for p in held if 10 <= p < 15), 15 in held] == [2, 1, False]
    assert holdout_split([0] * 10 + [1] * 5 + [2], 0.2, seed=3) == (kept, held)
    with pytest.raises(ValueError, match="fraction"):
        holdout_split([0, 1], 1.0, seed=0)


def test_cub_masks_binarise_above_half_of_the_maximum(trees):
    dataset = CUBDataset(trees["cub"].root, "test", IDENTITY)
    path = dataset.ids[0]
    width, height = trees["cub"].sizes[path]
    left, top, right, bottom = box_of((width, height))
    expected = torch.zeros(height, width, dtype=torch.bool)
    expected[top:bottom, left:right] = True
    sample = dataset[0]
    assert sample["image"].shape == (3, height, width)
    # The soft band of level 100 (< 255 / 2) around the box is background.
    assert torch.equal(sample["mask"], expected)


def test_cub_masks_optional_or_required(trees, tmp_path):
    assert not CUBDataset(trees["cub"].root, "test", masks=False).has_masks
    assert "mask" not in CUBDataset(trees["cub"].root, "test", eval_transform(SIZE), masks=False)[0]
    root = tmp_path / "CUB_200_2011"
    shutil.copytree(trees["cub"].root, root, ignore=shutil.ignore_patterns("segmentations"))
    assert not CUBDataset(root, "test").has_masks
    with pytest.raises(FileNotFoundError, match="segmentation folder not found.*segmentations"):
        CUBDataset(root, "test", masks=True)
    outside = CUBDataset(root, "test", segmentations_dir=trees["cub"].root / "segmentations")
    assert outside.has_masks


def test_waterbirds_splits_groups_and_cub_masks(trees):
    root = trees["base"] / "waterbird_complete95_forest2water2"
    rows = trees["waterbirds"]
    for code, split in enumerate(("train", "val", "test")):
        dataset = WaterbirdsDataset(root, split, eval_transform(SIZE), cub_root=trees["cub"].root)
        mine = [r for r in rows if r["split"] == code]
        assert dataset.ids == [r["img_filename"] for r in mine]
        assert dataset.labels == [r["y"] for r in mine]
        assert dataset.groups == [2 * r["y"] + r["place"] for r in mine]
        assert dataset.places == [r["place"] for r in mine]
    assert dataset.classes == ["landbird", "waterbird"] and dataset.has_masks
    sample = dataset[1]
    assert sample["group"] == dataset.groups[1] and sample["mask"].shape == (SIZE, SIZE)
    assert sample["mask"].any()
    plain = WaterbirdsDataset(root, "test", eval_transform(SIZE))
    assert not plain.has_masks and set(plain[0]) == {"image", "label", "group", "index"}
    with pytest.raises(FileNotFoundError, match="segmentation folder not found; pass segmentations_dir="):
        WaterbirdsDataset(root, "test", masks=True)


def test_waterbirds_metadata_errors(trees, tmp_path):
    root = tmp_path / "waterbird_1.0_forest2water2"
    root.mkdir()
    with pytest.raises(FileNotFoundError, match=f"index file not found: {root / 'metadata.csv'}"):
        WaterbirdsDataset(root)
    (root / "metadata.csv").write_text("img_id,img_filename,y,split\n1,a/b.jpg,0,0\n")
    with pytest.raises(ValueError, match="lacks the column.*place"):
        WaterbirdsDataset(root)
    (root / "metadata.csv").write_text("img_id,img_filename,y,split,place\n1,a/b.jpg,0,0,0\n")
    with pytest.raises(FileNotFoundError, match=f"metadata.csv not found: {root / 'a' / 'b.jpg'}"):
        WaterbirdsDataset(root)


def test_travelingbirds_uses_cub_split_fixed_images_places_and_cub_masks(trees):
    base = trees["base"]
    for split in ("train", "val", "test"):
        dataset = TravelingBirdsDataset(base, split, eval_transform(SIZE))
        cub = CUBDataset(trees["cub"].root, split)
        assert dataset.ids == cub.ids and dataset.labels == cub.labels
        folder = "test" if split == "test" else "train"
        assert all(r.image.parent.parent == base / "CUB_fixed" / folder for r in dataset.records)
        assert dataset.places == [trees["places"][folder][i.split("/")[0]] for i in dataset.ids]
        assert dataset.has_masks and dataset.groups is None
    assert dataset[0]["mask"].shape == (SIZE, SIZE)
    # Root may be CUB_fixed itself; the CUB index is then found beside it.
    assert len(TravelingBirdsDataset(base / "CUB_fixed", "test")) == 3


def test_travelingbirds_places_keyed_by_image_and_missing_cub(trees, tmp_path):
    fixed = tmp_path / "CUB_fixed"
    shutil.copytree(trees["base"] / "CUB_fixed", fixed)
    with pytest.raises(FileNotFoundError, match="pass cub_root="):
        TravelingBirdsDataset(tmp_path, "test")
    cub = CUBDataset(trees["cub"].root, "test", masks=False)
    by_image = {path: 7 for path in cub.ids[:2]} | {Path(cub.ids[2]).name: 8}
    (fixed / "test_places.json").write_text(json.dumps(by_image))
    dataset = TravelingBirdsDataset(tmp_path, "test", cub_root=trees["cub"].root)
    assert dataset.places == [7, 7, 8]
    (fixed / "test_places.json").write_text(json.dumps({}))
    with pytest.raises(ValueError, match="test_places.json has no place for"):
        TravelingBirdsDataset(tmp_path, "test", cub_root=trees["cub"].root)
    (fixed / "train_places.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"places file not found: {fixed / 'train_places.json'}"):
        TravelingBirdsDataset(tmp_path, "train", cub_root=trees["cub"].root)


def test_hard_imagenet_masks_over_the_imagenet_tree(trees):
    masks, imagenet = trees["base"] / "hardImageNet", trees["base"] / "imagenet"
    train, val, test = (
        HardImageNetDataset(masks, s, IDENTITY, imagenet_root=imagenet) for s in ("train", "val", "test")
    )
    assert train.classes == list(HARD_IMAGENET_WNIDS) and train.num_classes == 2
    assert (len(train), len(val), len(test)) == (8, 2, 4)
    assert set(train.ids).isdisjoint(val.ids) and sorted(val.labels) == [0, 1]
    assert all(r.image.parent.name == HARD_IMAGENET_WNIDS[r.label] for r in test.records)
    assert all(r.image.parts[-3] == "val" for r in test.records)
    sample = test[0]
    left, top, right, bottom = box_of(tuple(sample["image"].shape[:0:-1]))
    assert sample["mask"].sum() == (right - left) * (bottom - top)
    assert sample["mask"][top:bottom, left:right].all()
    with pytest.raises(ValueError, match="imagenet_root="):
        HardImageNetDataset(masks, "train")


def test_hard_imagenet_missing_image_names_it(trees, tmp_path):
    make_hard_imagenet(tmp_path / "masks", tmp_path / "imagenet", train=2, val=1)
    missing = tmp_path / "imagenet" / "val" / HARD_IMAGENET_WNIDS[0] / "ILSVRC2012_val_00000000.JPEG"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=f"not found: {missing}"):
        HardImageNetDataset(tmp_path / "masks", "test", imagenet_root=tmp_path / "imagenet")


def test_folder_dataset(trees, tmp_path):
    root = trees["base"] / "imagenet100"
    train = FolderDataset(root, "train", eval_transform(SIZE))
    val = FolderDataset(root, "val")
    assert train.classes == ["cat", "dog"] and not train.has_masks
    # ImageNet-100 and ImageWoof ship train/ and val/ only: "test" reads val/, and validation is
    # 20% of train/ held out per class, so model selection never sees the test images.
    assert (len(train), len(val)) == (6, 2) and sorted(val.labels) == [0, 1]
    assert not set(train.ids) & set(val.ids)
    assert sorted(train.ids + val.ids) == sorted(FolderDataset(root, "train", val_fraction=0).ids)
    test = FolderDataset(root, "test")
    assert len(test) == 4 and all((root / "val") in r.image.parents for r in test.records)
    sample = train[0]
    assert set(sample) == {"image", "label", "index"} and sample["image"].shape == (3, SIZE, SIZE)
    everything = FolderDataset(root / "train", None)
    assert len(everything) == 8 and "cat/nested/cat_deep.png" in everything.ids
    assert len(FolderDataset(root / "val", None)) == 4
    with pytest.raises(FileNotFoundError, match=f"image folder root not found: {tmp_path / 'nope'}"):
        FolderDataset(tmp_path / "nope")
    (tmp_path / "train" / "empty").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images found under"):
        FolderDataset(tmp_path, "train")


def test_collate_into_batches(trees):
    dataset = WaterbirdsDataset(
        trees["base"] / "waterbird_complete95_forest2water2", "train", cub_root=trees["cub"].root
    )
    batch = default_collate([dataset[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 224, 224) and batch["mask"].shape == (3, 224, 224)
    assert batch["label"].dtype == torch.int64 and batch["group"].tolist() == dataset.groups[:3]
    # DataLoader workers receive the dataset pickled.
    assert len(pickle.loads(pickle.dumps(dataset))) == len(dataset)


def _left_half(height: int, width: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    mask = torch.zeros(height, width, dtype=torch.uint8)
    mask[:, : width // 2] = 1
    return tv_tensors.Image(mask.expand(3, -1, -1) * 255), tv_tensors.Mask(mask)


def test_train_transform_moves_the_mask_with_the_image():
    image, mask = _left_half(45, 61)
    transform = train_transform(32, mean=(0.0,) * 3, std=(1.0,) * 3, randaugment=(3, 9))
    # Geometric ops only, so the image's brightness stays an exact record of where the object went.
    transform.transforms[2].ops = GEOMETRIC_OPS
    flipped = 0
    for seed in range(12):
        torch.manual_seed(seed)
        out, out_mask = transform(image, mask)
        assert out.shape == (3, 32, 32) and out_mask.shape == (32, 32)
        assert set(out_mask.unique().tolist()) <= {0, 1}
        # Away from the object's edge (where bilinear resampling blends the two), the image is clearly
        # bright or dark, and there the nearest-resampled mask must match it pixel for pixel.
        sure = (out[0] < 0.05) | (out[0] > 0.95)
        assert sure.float().mean() > 0.8
        assert torch.equal((out[0] > 0.5)[sure], out_mask.bool()[sure]), f"seed {seed}: mask left the object"
        flipped += out_mask.any() and out_mask[:, -1].float().mean() > out_mask[:, 0].float().mean()
    assert flipped > 0


def test_randaugment_colour_ops_leave_the_mask_alone():
    image, mask = _left_half(20, 24)
    augment = PairedRandAugment(3, 9)
    augment.ops = COLOUR_OPS[1:]
    torch.manual_seed(0)
    out, out_mask = augment(image, mask)
    assert torch.equal(out_mask, mask) and not torch.equal(out, image)
    with pytest.raises(ValueError, match="magnitude"):
        PairedRandAugment(2, 31)


@pytest.mark.parametrize(("height", "width", "size"), [(45, 61, 32), (300, 500, 224), (31, 17, 7)])
def test_eval_transform_sizes_and_centre_crop(height, width, size):
    image, mask = _left_half(height, width)
    out, out_mask = eval_transform(size)(image, mask)
    assert out.shape == (3, size, size) and out_mask.shape == (size, size)
    torch.manual_seed(0)
    train_out, train_mask = train_transform(size)(image, mask)
    assert train_out.shape == (3, size, size) and train_mask.shape == (size, size)
    resize, crop = eval_transform(224).transforms[:2]
    assert list(resize.size) == [256] and list(crop.size) == [224, 224]


def test_eval_transform_crops_the_centre_of_the_resized_image():
    image, mask = _left_half(300, 500)
    out, out_mask = eval_transform(224)(image, mask)
    # 300x500 -> 256x427 (shorter side 224 / 0.875); the central 224 columns start at 101, so the
    # left half (columns < 213 after resizing) ends at crop column 112.
    assert out_mask[:, :111].all() and not out_mask[:, 113:].any()
    assert (out[0][:, :111] > 0).all() and (out[0][:, 113:] < 0).all()


def _copy_cub(trees, tmp_path):
    root = tmp_path / "CUB_200_2011"
    shutil.copytree(trees["cub"].root, root)
    return root


def test_errors_name_the_missing_root_index_file_and_image(trees, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"CUB-200-2011 root not found: {tmp_path / 'absent'}"):
        CUBDataset(tmp_path / "absent")
    root = _copy_cub(trees, tmp_path)
    (root / "image_class_labels.txt").unlink()
    with pytest.raises(FileNotFoundError, match=f"index file not found: {root / 'image_class_labels.txt'}"):
        CUBDataset(root)
    shutil.copy(trees["cub"].root / "image_class_labels.txt", root)
    missing = root / "images" / trees["cub"].paths[0]
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=f"images.txt not found: {missing}"):
        CUBDataset(root, "train")
    with open(root / "train_test_split.txt", "a") as file:
        file.write("99\n")
    with pytest.raises(ValueError, match="train_test_split.txt, line 19: expected 2 fields"):
        CUBDataset(root, "test")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        CUBDataset(trees["cub"].root, "dev")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_image_raises_naming_it_or_is_skipped_with_a_warning(trees, tmp_path, damage):
    root = _copy_cub(trees, tmp_path)
    path = trees["cub"].paths[-1]
    bad = root / "images" / path
    if damage == "truncate":
        corrupt(bad)
    else:
        bad.write_bytes(b"this is not a JPEG")
    dataset = CUBDataset(root, "test", eval_transform(SIZE))
    position = dataset.ids.index(path)
    with pytest.raises(CorruptImageError, match=f"cannot read image {bad}"):
        dataset[position]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        skipping = CUBDataset(root, "test", eval_transform(SIZE), skip_bad_images=True)
    assert [str(w.message).split(":")[0] for w in caught if w.category is BadImageWarning] == [
        f"skipping unreadable file {bad}"
    ]
    assert skipping.num_bad_images == 1 and skipping.bad_images == [str(bad)]
    assert len(skipping) == len(dataset) - 1 and path not in skipping.ids
    assert [skipping[i]["index"] for i in range(len(skipping))] == list(range(len(skipping)))


def test_skip_bad_images_keeps_groups_aligned(trees, tmp_path):
    source = trees["base"] / "waterbird_complete95_forest2water2"
    root = tmp_path / "waterbirds"
    shutil.copytree(source, root)
    rows = [r for r in trees["waterbirds"] if r["split"] == 0]
    corrupt(root / rows[1]["img_filename"]).write_bytes(b"broken")
    with pytest.warns(BadImageWarning, match=rows[1]["img_filename"]):
        dataset = WaterbirdsDataset(root, "train", skip_bad_images=True)
    kept = rows[:1] + rows[2:]
    assert dataset.groups == [2 * r["y"] + r["place"] for r in kept]
    assert dataset.places == [r["place"] for r in kept]


def test_build_dataset_picks_transforms_and_passes_options(trees):
    assert list_datasets() == [
        "cub",
        "folder",
        "hard_imagenet",
        "travelingbirds",
        "tuxbirds100",
        "tuxbirds95",
        "waterbirds",
    ]
    train = build_dataset("cub", trees["cub"].root, "train", image_size=SIZE)
    assert isinstance(train.transform.transforms[0], v2.RandomResizedCrop)
    test = build_dataset("cub", trees["cub"].root, "test", image_size=SIZE, masks=False)
    assert isinstance(test.transform.transforms[0], v2.Resize) and not test.has_masks
    assert isinstance(
        build_dataset("cub", trees["cub"].root, "train", train=False).transform.transforms[0], v2.Resize
    )
    normalised = build_dataset(
        "folder", trees["base"] / "imagenet100", "val", image_size=SIZE, mean=(0.5,) * 3
    )
    assert normalised[0]["image"].min() < 0
    hard = build_dataset(
        "hard_imagenet", trees["base"] / "hardImageNet", "test", imagenet_root=trees["base"] / "imagenet"
    )
    assert len(hard) == 4
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        build_dataset("imagenet", trees["cub"].root, "train")


def test_mask_size_mismatch_names_both_files(trees, tmp_path):
    root = _copy_cub(trees, tmp_path)
    path = trees["cub"].paths[-1]
    mask = (root / "segmentations" / path).with_suffix(".png")
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(mask)
    dataset = CUBDataset(root, "test")
    with pytest.raises(ValueError, match="mask .* is 5x5 but image"):
        dataset[dataset.ids.index(path)]
