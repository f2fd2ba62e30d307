"""TuxBirds: exact group counts, determinism, disjoint background strips, masks, source checks."""

import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from aim_ext.data import TuxBirds, build_dataset, list_datasets
from aim_ext.data.tuxbirds import (
    BACKGROUNDS,
    COUNTS,
    STRIPS,
    SourcesError,
    _background,
    read_manifest,
    strip_box,
)

SIZE = 40
ITEMS = range(6)


@pytest.fixture(scope="module")
def sources(tuxbirds_sources) -> Path:
    return tuxbirds_sources


def test_manifest_lists_51_files_from_three_packages():
    manifest = read_manifest()
    assert len(manifest) == 51
    assert all(len(d) == 64 and not p.startswith("/") for p, d in manifest.items())
    used = {b for place in BACKGROUNDS for b, _ in place}
    assert used <= set(manifest) and len(used) == 18


@pytest.mark.parametrize("split", ["train", "val", "test"])
@pytest.mark.parametrize("variant", ["95", "100"])
def test_group_plan_realises_waterbirds_exact_counts(split, variant):
    plan = TuxBirds.group_plan(split, variant, seed=0)
    counts = Counter(plan)
    assert tuple(counts.get(g, 0) for g in range(4)) == COUNTS[(split, variant)]
    assert TuxBirds.group_plan(split, variant, seed=0) == plan
    assert TuxBirds.group_plan(split, variant, seed=1) != plan
    assert len(plan) == {"train": 4795, "val": 1199, "test": 5794}[split]


def test_dataset_attributes_follow_the_plan(sources):
    data = TuxBirds("val", "100", image_size=SIZE, root=sources)
    assert len(data) == 1199 and data.groups == TuxBirds.group_plan("val", "100")
    assert data.labels == [g // 2 for g in data.groups] and data.places == [g % 2 for g in data.groups]
    assert data.classes == ["landbird", "waterbird"] and data.num_classes == 2 and data.has_masks
    sample = data[0]
    assert set(sample) == {"image", "label", "mask", "group", "index"}
    assert sample["image"].shape == (3, SIZE, SIZE) and sample["image"].dtype == torch.float32
    assert sample["mask"].shape == (SIZE, SIZE) and sample["mask"].dtype == torch.bool
    assert (sample["label"], sample["group"], sample["index"]) == (data.labels[0], data.groups[0], 0)


def test_same_arguments_give_identical_bytes(sources):
    a = TuxBirds("train", "95", image_size=SIZE, seed=3, root=sources)
    b = TuxBirds("train", "95", image_size=SIZE, seed=3, root=sources)
    other = TuxBirds("train", "95", image_size=SIZE, seed=4, root=sources)
    for i in ITEMS:
        ra, rb = a.render(i), b.render(i)
        assert ra.image.tobytes() == rb.image.tobytes() and np.array_equal(ra.mask, rb.mask)
        assert torch.equal(a[i]["image"], b[i]["image"])
    assert any(a.render(i).image.tobytes() != other.render(i).image.tobytes() for i in ITEMS)
    # Reading items out of order changes nothing: each item has its own generator.
    assert (
        a.render(5).image.tobytes()
        == TuxBirds("train", image_size=SIZE, seed=3, root=sources).render(5).image.tobytes()
    )


def test_splits_never_share_background_pixels(sources):
    for place in BACKGROUNDS:
        for relative, box in place:
            size = _background(sources / relative).size
            strips = {s: strip_box(size, box, s) for s in STRIPS}
            assert strips["train"][2] == strips["val"][0] and strips["val"][2] == strips["test"][0]
            assert all(s[0] < s[2] and s[1] < s[3] for s in strips.values())
    for split in STRIPS:
        data = TuxBirds(split, image_size=SIZE, root=sources)
        for i in range(0, len(data), len(data) // 12):
            plan = data.plan(i)
            box = dict(BACKGROUNDS[plan.place])[plan.background]
            left, top, right, bottom = strip_box(_background(sources / plan.background).size, box, split)
            x0, y0, x1, y1 = plan.crop
            assert left <= x0 < x1 <= right and top <= y0 < y1 <= bottom
            assert x1 - x0 == y1 - y0


def test_mask_is_the_pasted_bird_and_counterfactuals_keep_it(sources):
    data = TuxBirds("test", image_size=SIZE, root=sources)
    for i in ITEMS:
        rendering = data.render(i)
        fraction = rendering.mask.mean()
        assert 0.01 < fraction < 0.6
        outside = rendering.alpha == 0
        assert np.array_equal(rendering.image[outside], rendering.background[outside])
        assert not (rendering.mask & outside).any()
        differs = (rendering.image != rendering.background).any(axis=-1)
        assert differs[rendering.mask].mean() > 0.9

        sample, cf = data[i], data.counterfactual(i)
        assert torch.equal(sample["mask"], torch.from_numpy(rendering.mask))
        assert torch.equal(cf["image"], sample["image"]) and torch.equal(cf["mask"], sample["mask"])
        assert cf["swapped_group"] == 2 * sample["label"] + 1 - cf["place"]
        inside, out = cf["mask"], ~torch.from_numpy(rendering.alpha > 0)
        # The background-only view is the item's own crop; the swapped view keeps the bird pixels.
        assert torch.equal(cf["background"][:, out], cf["image"][:, out])
        assert not torch.equal(cf["background"][:, inside], cf["image"][:, inside])
        full = torch.from_numpy(rendering.alpha == 1)
        assert torch.equal(cf["swapped"][:, full], cf["image"][:, full])
        assert not torch.equal(cf["swapped"][:, out], cf["image"][:, out])


def test_build_dataset_names_and_train_transform_move_the_mask(sources, monkeypatch):
    monkeypatch.setenv("AIM_EXT_CACHE", str(sources.parent))
    train = build_dataset("tuxbirds95", "", "train", image_size=32, prerendered=False)
    assert isinstance(train, TuxBirds) and train.variant == "95" and train.root == sources
    sample = train[0]
    assert sample["image"].shape == (3, 32, 32) and sample["mask"].shape == (32, 32)
    strict = build_dataset("tuxbirds100", None, "train", image_size=32, train=False, prerendered=False)
    assert strict.variant == "100" and Counter(strict.groups)[1] == 0
    assert {"tuxbirds95", "tuxbirds100"} <= set(list_datasets())


def test_hash_mismatch_names_the_file(sources, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(sources, root, ignore=shutil.ignore_patterns(".lock"))
    victim = "usr/share/tuxpaint/templates/rocks.jpg"
    data = bytearray((root / victim).read_bytes())
    data[100] ^= 0xFF
    (root / victim).write_bytes(bytes(data))
    with pytest.raises(SourcesError, match="rocks.jpg does not match the manifest"):
        TuxBirds("val", image_size=SIZE, root=root)


def test_missing_sources_say_what_and_how_to_provide_them(tmp_path, monkeypatch):
    with pytest.raises(SourcesError) as caught:
        TuxBirds("val", root=tmp_path, fetch=False)
    message = str(caught.value)
    assert "51 TuxBirds source file(s) missing" in message and "birds/drake.png" in message
    assert "root=" in message and "apt-get download" in message and "tuxpaint-stamps-default" in message
    # Without apt-get and dpkg-deb on PATH, fetching fails with the same guidance.
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    with pytest.raises(SourcesError, match="apt-get and dpkg-deb not found") as caught:
        TuxBirds("val", root=tmp_path / "empty")
    assert "root=" in str(caught.value)


def test_prerendered_store_serves_the_same_bytes(sources, tmp_path, monkeypatch):
    monkeypatch.setenv("AIM_EXT_CACHE", str(tmp_path))
    live = TuxBirds("val", image_size=24, root=sources)
    stored = TuxBirds("val", image_size=24, root=sources, prerendered=True)
    folder = stored.store_folder()
    assert folder.parent == tmp_path / "tuxbirds-rendered" and "val-95-24px-seed0" in folder.name
    # No partial folder left, only the store and its lock file.
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name, folder.name + ".lock"]
    for index in (0, 1, 600, len(live) - 1):
        a, b = live[index], stored[index]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert (a["label"], a["group"]) == (b["label"], b["group"])
    with pytest.raises(IndexError):
        stored[len(stored)]
    # The existing store is reused, not rendered again; another seed, size or variant is another store.
    mtime = (folder / "images.npy").stat().st_mtime_ns
    again = TuxBirds("val", image_size=24, root=sources, prerendered=True)
    assert again.store_folder() == folder and (folder / "images.npy").stat().st_mtime_ns == mtime
    for other in (dict(seed=1), dict(image_size=25), dict(variant="100")):
        assert TuxBirds("val", **{"image_size": 24, **other}, root=sources).store_folder() != folder
    # Workers get the folder, not a copy of the arrays; they map the store themselves.
    clone = pickle.loads(pickle.dumps(stored))
    assert clone._arrays is None and torch.equal(clone[5]["image"], stored[5]["image"])
    assert len(pickle.dumps(stored)) < 100_000


def test_prerender_clears_a_killed_run_and_serves_complete_stores_only(sources, tmp_path, monkeypatch):
    monkeypatch.setenv("AIM_EXT_CACHE", str(tmp_path))
    data = TuxBirds("val", image_size=12, root=sources)
    folder = data.store_folder()
    stale = folder.parent / f"{folder.name}.abcd.partial"
    stale.mkdir(parents=True)
    (stale / "images.npy").write_bytes(b"half")
    data.prerender(progress=False)
    assert not stale.exists() and (folder / "masks.npy").is_file()


def test_build_dataset_generates_at_the_training_size(sources, monkeypatch, tmp_path):
    monkeypatch.setenv("AIM_EXT_CACHE", str(tmp_path))
    val = build_dataset("tuxbirds95", sources, "val", image_size=20)
    assert val.image_size == 20 and val._store is not None  # prerendered by default
    # Evaluation: normalisation only, so the item is the rendered image itself.
    rendering = val.render(3)
    mean, std = (torch.tensor(v)[:, None, None] for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    expected = (torch.from_numpy(rendering.image).permute(2, 0, 1) / 255.0 - mean) / std
    torch.testing.assert_close(val[3]["image"], expected)
    assert torch.equal(val[3]["mask"], torch.from_numpy(rendering.mask))
