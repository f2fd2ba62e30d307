"""TuxBirds: an offline, real-photo Waterbirds built from images that Debian ships.

Bird cut-outs with an alpha channel (Tux Paint's photographic stamps) are pasted on real water or land
photos (Tux Paint templates and KDE Plasma wallpapers), with Waterbirds' own group counts, so every
image has an exact foreground mask. Labels: 0 landbird, 1 waterbird; places: 0 land, 1 water; groups
``2 * label + place``. Variant "95" has Waterbirds-95%'s training groups, "100" has no minority
groups in training; val and test are the same for both.

Sources: the 51 files listed in ``tuxbirds_manifest.sha256`` (shipped with the package, 2.3 MB).
On first use they are fetched into the cache (``root=``, else ``$AIM_EXT_CACHE/tuxbirds``, else
``~/.cache/aim-ext/tuxbirds``) with ``apt-get download`` and ``dpkg-deb``, which need no root (as
root, a failed download is retried once after ``apt-get update``: a fresh Debian machine has no
package lists). Every file is checked by SHA-256 at every construction. Nothing is written to the
repository: the photos are GPL-2 / CC-BY(-SA) and are fetched, never redistributed.

Generation is lazy and a pure function of (seed, split, index): each item has its own random
generator (Python's ``random.Random`` seeded with a string, whose ``random()`` stream is stable
across Python versions). Splits never share background pixels: each background's crop box is cut
into vertical strips, train x in [0, 0.6), val [0.6, 0.7), test [0.7, 1.0].
"""

from __future__ import annotations

import fcntl
import hashlib
import multiprocessing
import os
import posixpath
import random
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import tv_tensors
from tqdm.auto import tqdm

from aim_ext.cache import cache_root, remove_partials, sha256_file, write_atomic
from aim_ext.data.common import MaskedImageDataset, check_split
from aim_ext.data.transforms import normalise_transform

__all__ = [
    "COUNTS",
    "TUXBIRDS_CLASSES",
    "ItemPlan",
    "Rendering",
    "SourcesError",
    "TuxBirds",
    "tuxbirds_variant",
    "default_root",
    "ensure_sources",
    "read_manifest",
]

TUXBIRDS_CLASSES = ("landbird", "waterbird")
VARIANTS = ("95", "100")
# Waterbirds' own counts per group: landbird/land, landbird/water, waterbird/land, waterbird/water.
COUNTS: dict[tuple[str, str], tuple[int, int, int, int]] = {
    ("train", "95"): (3498, 184, 56, 1057),
    ("train", "100"): (3682, 0, 0, 1113),
    ("val", "95"): (467, 466, 133, 133),
    ("val", "100"): (467, 466, 133, 133),
    ("test", "95"): (2255, 2255, 642, 642),
    ("test", "100"): (2255, 2255, 642, 642),
}
# Each split's share of every background's crop box (relative x), disjoint so no pixel is shared.
STRIPS = {"train": (0.0, 0.6), "val": (0.6, 0.7), "test": (0.7, 1.0)}

BIRDS = "usr/share/tuxpaint/stamps/animals/birds/{}.png"
TEMPLATES = "usr/share/tuxpaint/templates/{}.jpg"
WALLPAPERS = "usr/share/wallpapers/{}/contents/images/1920x1080.jpg"
# albino_peahen (grass inside its cut-out) and crowned_crane (ambiguous habitat) are left out.
WATERBIRDS = (
    "drake duck gander heron_greatblue heron_greatblue_flying little-penguin magellanic_penguin penguin "
    "pelican pink_flamingo seagull silver-gull"
).split()
LANDBIRDS = (
    "adelaide-rosella blackbird chicken_profile crow cuckoo guineafowl helmeted_guineafowl hen lark magpie "
    "nandou ostrich owl peacock pigeon quetzal rainbow-lorikeet rooster tucan turkey vulture"
).split()
FULL = (0.0, 0.0, 1.0, 1.0)
# (file, crop box x0, y0, x1, y1 in relative coordinates): each box holds only that kind of place.
WATER_BACKGROUNDS = (
    (TEMPLATES.format("ocean_waves"), FULL),
    (TEMPLATES.format("ocean_splash"), FULL),
    (TEMPLATES.format("jellyfish"), (0.0, 0.0, 1.0, 0.8)),
    (WALLPAPERS.format("summer_1am"), (0.0, 0.45, 1.0, 1.0)),
    (WALLPAPERS.format("EveningGlow"), (0.0, 0.28, 1.0, 0.55)),
    (WALLPAPERS.format("BytheWater"), (0.0, 0.05, 1.0, 0.38)),
)
LAND_BACKGROUNDS = tuple(
    (TEMPLATES.format(name), FULL)
    for name in (
        "mossy_log redwoods_above trees_above sun_behind_leaves corn_maze rocks mudstone mossy_bark"
    ).split()
) + (
    (TEMPLATES.format("sheep"), (0.0, 0.62, 1.0, 1.0)),
    (WALLPAPERS.format("Path"), FULL),
    (WALLPAPERS.format("OneStandsOut"), FULL),
    (WALLPAPERS.format("FallenLeaf"), FULL),
)
# Indexed by label / place.
BIRD_FILES = (tuple(BIRDS.format(n) for n in LANDBIRDS), tuple(BIRDS.format(n) for n in WATERBIRDS))
BACKGROUNDS = (LAND_BACKGROUNDS, WATER_BACKGROUNDS)

# Which Debian package (bookworm version the manifest was made from) holds each folder.
PACKAGES = {
    "usr/share/tuxpaint/stamps/": ("tuxpaint-stamps-default", "2022.06.04-1"),
    "usr/share/tuxpaint/templates/": ("tuxpaint-data", "1:0.9.28-sdl2-1"),
    "usr/share/wallpapers/": ("plasma-workspace-wallpapers", "4:5.27.5-2"),
}
# Recipe scales: the bird's long side, the crop side (of the strip's largest square), the rotation.
BIRD_SCALE = (0.6, 0.9)
CROP_SCALE = (0.5, 1.0)
MAX_ANGLE = 10.0
# Birds are pre-shrunk to this multiple of the image size once, so rotating them per item stays cheap.
BIRD_CACHE_FACTOR = 2
MASK_THRESHOLD = 128
FETCH_TIMEOUT_S = 1800
# Bump when the recipe changes the rendered bytes: prerendered stores are keyed by it.
RECIPE_VERSION = 1


class SourcesError(FileNotFoundError):
    """TuxBirds' source files are missing or do not match the manifest."""


def read_manifest() -> dict[str, str]:
    """The shipped manifest: relative path (no leading slash) -> SHA-256 hex digest."""
    text = resources.files("aim_ext.data").joinpath("tuxbirds_manifest.sha256").read_text()
    entries = {}
    for line in text.splitlines():
        if line.strip():
            digest, path = line.split(maxsplit=1)
            entries[path.strip().lstrip("/")] = digest
    return entries


def default_root() -> Path:
    """The cache folder: ``$AIM_EXT_CACHE/tuxbirds``, else ``~/.cache/aim-ext/tuxbirds``."""
    return cache_root() / "tuxbirds"


def _package_of(relative: str) -> tuple[str, str]:
    for prefix, package in PACKAGES.items():
        if relative.startswith(prefix):
            return package
    raise ValueError(f"no Debian package known for {relative}")


def _how_to_provide(root: Path, missing: Sequence[str]) -> str:
    packages = sorted({_package_of(m) for m in missing})
    listed = "\n".join(f"  {m}" for m in missing[:10]) + (
        f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
    )
    names = " ".join(p for p, _ in packages)
    versions = ", ".join(f"{p} {v}" for p, v in packages)
    return (
        f"{len(missing)} TuxBirds source file(s) missing under {root}:\n{listed}\n"
        f"They come from the Debian (bookworm) packages {versions}. To provide them by hand, on a "
        f"Debian machine run `apt-get download {names}` and `dpkg -x PKG.deb DIR` for each, then pass "
        f"root=DIR (or copy the files, keeping the manifest's relative paths, into {root}); "
        f"the manifest is aim_ext/data/tuxbirds_manifest.sha256."
    )


def _check(root: Path, manifest: dict[str, str], repair: bool = False) -> list[str]:
    """The missing files; with ``repair`` (the cache, which aim-ext filled), also those whose hash
    does not match (a damaged copy: fetched again); else raise SourcesError naming the first."""
    missing = []
    for relative, digest in manifest.items():
        path = root / relative
        if path.is_file() and sha256_file(path) == digest:
            continue
        if path.is_file() and not repair:
            raise SourcesError(
                f"TuxBirds source {path} does not match the manifest (sha256 {digest} expected): "
                f"delete it to fetch it again, or replace it with the file from Debian's "
                f"{' '.join(_package_of(relative))}"
            )
        missing.append(relative)
    return missing


def _apt_download(package: str, folder: Path) -> Path:
    """``apt-get download package`` into ``folder``; as root, retried once after ``apt-get update``."""

    def attempt() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["apt-get", "download", package],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=FETCH_TIMEOUT_S,
        )

    done = attempt()
    if done.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
        # A fresh Debian machine (CI) has no package lists until `apt-get update`.
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
        done = attempt()
    debs = sorted(folder.glob(f"{package}_*.deb"))
    if done.returncode != 0 or not debs:
        raise RuntimeError(f"`apt-get download {package}` failed: {done.stderr.strip()[-500:]}")
    return debs[-1]


def _extract(deb: Path, wanted: dict[str, str], root: Path) -> None:
    """Stream the package's files out of ``deb`` and write only the wanted ones, hash-checked."""
    # Some wanted paths are symlinks (the wallpapers' 1920x1080.jpg points at 2560x1600.jpg), and a
    # link may come before or after its target in the stream: keep the regular files of the wanted
    # folders (a few MB) and resolve links at the end.
    folders = {posixpath.dirname(r) for r in wanted}
    files: dict[str, bytes] = {}
    links: dict[str, str] = {}
    # dpkg-deb streams the data tarball (what `dpkg -x` unpacks), so only the wanted files touch the disk.
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                relative = posixpath.normpath(member.name.removeprefix("./"))
                if member.issym() and relative in wanted:
                    links[relative] = posixpath.normpath(
                        posixpath.join(posixpath.dirname(relative), member.linkname)
                    )
                elif member.isfile() and posixpath.dirname(relative) in folders:
                    files[relative] = tar.extractfile(member).read()  # type: ignore[union-attr]
        proc.stdout.close()
    if proc.returncode != 0:
        raise RuntimeError(f"`dpkg-deb --fsys-tarfile {deb.name}` failed (exit {proc.returncode})")
    for relative, digest in wanted.items():
        data = files.get(links.get(relative, relative))
        if data is None:
            continue
        if hashlib.sha256(data).hexdigest() != digest:
            raise SourcesError(
                f"{relative} in {deb.name} does not match the manifest (sha256 {digest} expected): this "
                f"Debian release ships another version; provide the bookworm files by hand (root=)"
            )
        write_atomic(root / relative, data)


def _fetch(root: Path, manifest: dict[str, str], missing: Sequence[str]) -> None:
    tools = [t for t in ("apt-get", "dpkg-deb") if shutil.which(t) is None]
    if tools:
        raise SourcesError(
            f"cannot fetch: {' and '.join(tools)} not found.\n{_how_to_provide(root, missing)}"
        )
    by_package: dict[str, dict[str, str]] = {}
    for relative in missing:
        by_package.setdefault(_package_of(relative)[0], {})[relative] = manifest[relative]
    with tempfile.TemporaryDirectory(prefix="tuxbirds-") as tmp:
        for package, wanted in sorted(by_package.items()):
            try:
                deb = _apt_download(package, Path(tmp))
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
                raise SourcesError(f"cannot fetch: {error}\n{_how_to_provide(root, missing)}") from error
            _extract(deb, wanted, root)
            deb.unlink()


def ensure_sources(root: str | Path | None = None, fetch: bool = True) -> Path:
    """The folder holding the 51 manifest files, all hash-checked; fetched there first when missing.
    In the cache (no ``root``) a file that does not match the manifest is fetched again too."""
    root = Path(root) if root else default_root()
    repair = fetch and root == default_root()
    manifest = read_manifest()
    missing = _check(root, manifest, repair)
    if not missing:
        return root
    if not fetch:
        raise SourcesError(f"fetching is off (fetch=False).\n{_how_to_provide(root, missing)}")
    root.mkdir(parents=True, exist_ok=True)
    # One fetch at a time per cache (several training processes may start together).
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        remove_partials(root, recursive=True)  # what a killed fetch left; only the holder writes
        missing = _check(root, manifest, repair)
        if missing:
            _fetch(root, manifest, missing)
            missing = _check(root, manifest)
            if missing:
                raise SourcesError(f"the packages lacked some files.\n{_how_to_provide(root, missing)}")
    return root


# Decoded sources, shared by every dataset in the process: (path, image size or 0) -> image.
_DECODED: dict[tuple[str, int], Image.Image] = {}


def _background(path: Path) -> Image.Image:
    key = (str(path), 0)
    if key not in _DECODED:
        with Image.open(path) as image:
            _DECODED[key] = image.convert("RGB")
    return _DECODED[key]


def _bird(path: Path, image_size: int) -> Image.Image:
    """The cut-out trimmed to its alpha and shrunk to at most BIRD_CACHE_FACTOR x image_size."""
    key = (str(path), image_size)
    if key not in _DECODED:
        with Image.open(path) as image:
            bird = image.convert("RGBA")
        bird = bird.crop(bird.getchannel("A").getbbox())
        longest = BIRD_CACHE_FACTOR * image_size
        if max(bird.size) > longest:
            ratio = longest / max(bird.size)
            size = (max(1, round(bird.width * ratio)), max(1, round(bird.height * ratio)))
            bird = bird.resize(size, Image.Resampling.LANCZOS)
        _DECODED[key] = bird
    return _DECODED[key]


def strip_box(size: tuple[int, int], box: Sequence[float], split: str) -> tuple[int, int, int, int]:
    """The split's strip of a crop box, in pixels (left, top, right, bottom; right and bottom excluded).

    Adjacent splits share the rounded boundary as one's right edge and the other's left, so no
    pixel column belongs to two splits.
    """
    width, height = size
    x0, y0, x1, y1 = box
    a, b = STRIPS[split]
    return (
        round(width * (x0 + (x1 - x0) * a)),
        round(height * y0),
        round(width * (x0 + (x1 - x0) * b)),
        round(height * y1),
    )


@dataclass(frozen=True)
class ItemPlan:
    """Every random choice behind one item (the bird's pixel size and position are set when rendered)."""

    label: int
    place: int
    bird: str
    flip: bool
    angle: float
    bird_scale: float
    position: tuple[float, float]
    background: str
    crop: tuple[int, int, int, int]

    @property
    def group(self) -> int:
        """``2 * label + place``."""
        return 2 * self.label + self.place


@dataclass(frozen=True)
class Rendering:
    """One composed image before transforms: uint8 H x W x 3 arrays, the soft alpha and the mask."""

    image: np.ndarray
    background: np.ndarray
    alpha: np.ndarray
    mask: np.ndarray


def _shuffled(values: list[int], rng: random.Random) -> list[int]:
    # Fisher-Yates on random() alone: random.shuffle's algorithm is not promised across versions.
    for i in range(len(values) - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        values[i], values[j] = values[j], values[i]
    return values


def _uniform(rng: random.Random, low: float, high: float) -> float:
    return low + (high - low) * rng.random()


def _choice(rng: random.Random, n: int) -> int:
    return min(int(rng.random() * n), n - 1)


class TuxBirds(MaskedImageDataset):
    """TuxBirds-95 or -100: landbird vs waterbird, groups 2*y + place, exact masks, generated lazily."""

    has_counterfactuals = True

    def __init__(
        self,
        split: str = "train",
        variant: str = "95",
        image_size: int = 224,
        seed: int = 0,
        root: str | Path | None = None,
        transform: Callable[..., Any] | None = None,
        *,
        fetch: bool = True,
        prerendered: bool = False,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        """``transform`` defaults to normalisation only: images are generated at ``image_size`` already.

        ``root``: the source folder (None or "" for the cache); ``fetch=False`` never downloads.
        ``prerendered``: render the whole split once into the cache (see `prerender`) and serve items
        from there: the same bytes, without the 5-10 ms of compositing per item and epoch.
        """
        check_split(split)
        if variant not in VARIANTS:
            raise ValueError(f"unknown TuxBirds variant {variant!r}; expected one of {', '.join(VARIANTS)}")
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {image_size}")
        self.root = ensure_sources(root, fetch=fetch)
        super().__init__([], TUXBIRDS_CLASSES, transform or normalise_transform(mean, std), has_masks=True)
        self.split, self.variant, self.image_size, self.seed = split, variant, image_size, seed
        self.groups = self.group_plan(split, variant, seed)
        self.labels = [g // 2 for g in self.groups]
        self.places = [g % 2 for g in self.groups]
        self.ids = [f"{split}/{i:05d}" for i in range(len(self.groups))]
        # The prerendered store's folder; its arrays are memory-mapped on first use in each process.
        self._store_folder: Path | None = self.prerender() if prerendered else None
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    @staticmethod
    def group_plan(split: str, variant: str = "95", seed: int = 0) -> list[int]:
        """Every item's group: Waterbirds' exact counts, in an order seeded by (seed, split)."""
        counts = COUNTS[(check_split(split), variant)]
        groups = [g for g, n in enumerate(counts) for _ in range(n)]
        return _shuffled(groups, random.Random(f"tuxbirds:{seed}:{split}:groups"))

    def __len__(self) -> int:
        return len(self.groups)

    def _rng(self, index: int, stream: str = "item") -> random.Random:
        # String seeds are hashed with SHA-512: stable across runs, processes and Python versions.
        return random.Random(f"tuxbirds:{self.seed}:{self.split}:{index}:{stream}")

    def _crop(self, rng: random.Random, place: int) -> tuple[str, tuple[int, int, int, int]]:
        """A background of ``place`` and a random square in the split's strip of its crop box."""
        relative, box = BACKGROUNDS[place][_choice(rng, len(BACKGROUNDS[place]))]
        left, top, right, bottom = strip_box(_background(self.root / relative).size, box, self.split)
        side = max(1, round(min(right - left, bottom - top) * _uniform(rng, *CROP_SCALE)))
        x = left + _choice(rng, right - left - side + 1)
        y = top + _choice(rng, bottom - top - side + 1)
        return relative, (x, y, x + side, y + side)

    def plan(self, index: int) -> ItemPlan:
        """The random choices of item ``index``: a pure function of (seed, split, index)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        group = self.groups[index]
        label, place = group // 2, group % 2
        rng = self._rng(index)
        # Draw in a fixed order so each choice depends on nothing but (seed, split, index).
        bird = BIRD_FILES[label][_choice(rng, len(BIRD_FILES[label]))]
        flip = rng.random() < 0.5
        angle = _uniform(rng, -MAX_ANGLE, MAX_ANGLE)
        scale = _uniform(rng, *BIRD_SCALE)
        position = (rng.random(), rng.random())
        background, crop = self._crop(rng, place)
        return ItemPlan(label, place, bird, flip, angle, scale, position, background, crop)

    def _backdrop(self, relative: str, crop: tuple[int, int, int, int]) -> np.ndarray:
        size = (self.image_size, self.image_size)
        image = _background(self.root / relative)
        # reducing_gap: a box-filter pre-shrink before the resampling filter, much faster on big crops.
        return np.array(image.resize(size, Image.Resampling.BICUBIC, box=crop, reducing_gap=3.0))

    def _cutout(self, plan: ItemPlan) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """The bird's RGB and alpha at its pasted size and its top-left corner."""
        bird = _bird(self.root / plan.bird, self.image_size)
        if plan.flip:
            bird = bird.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        bird = bird.rotate(plan.angle, Image.Resampling.BICUBIC, expand=True)
        bird = bird.crop(bird.getchannel("A").getbbox())
        ratio = plan.bird_scale * self.image_size / max(bird.size)
        width = min(self.image_size, max(1, round(bird.width * ratio)))
        height = min(self.image_size, max(1, round(bird.height * ratio)))
        bird = np.asarray(bird.resize((width, height), Image.Resampling.LANCZOS))
        x = min(int(plan.position[0] * (self.image_size - width + 1)), self.image_size - width)
        y = min(int(plan.position[1] * (self.image_size - height + 1)), self.image_size - height)
        return bird[..., :3], bird[..., 3], (x, y)

    def _compose(self, backdrop: np.ndarray, plan: ItemPlan) -> tuple[np.ndarray, np.ndarray]:
        """The bird of ``plan`` pasted on ``backdrop``: the image and the full-size soft alpha in [0, 1]."""
        rgb, alpha, (x, y) = self._cutout(plan)
        height, width = alpha.shape
        full = np.zeros(backdrop.shape[:2], np.float32)
        full[y : y + height, x : x + width] = alpha / 255.0
        bird = np.zeros_like(backdrop)
        bird[y : y + height, x : x + width] = rgb
        a = full[..., None]
        image = np.rint(backdrop * (1.0 - a) + bird * a).astype(np.uint8)
        # Outside the cut-out the backdrop is kept exactly (no rounding of bg * 1.0 + 0).
        image[full == 0] = backdrop[full == 0]
        return image, full

    def render(self, index: int) -> Rendering:
        """Item ``index`` composed at ``image_size``, before any transform."""
        plan = self.plan(index)
        backdrop = self._backdrop(plan.background, plan.crop)
        image, alpha = self._compose(backdrop, plan)
        mask = np.rint(alpha * 255.0) >= MASK_THRESHOLD
        return Rendering(image=image, background=backdrop, alpha=alpha, mask=mask)

    def _sample(self, index: int, images: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, Any]:
        # One transform call for every image and the mask, so random geometry is shared among them.
        tensors = {
            k: tv_tensors.Image(torch.from_numpy(v).permute(2, 0, 1).contiguous()) for k, v in images.items()
        }
        out = self.transform(tensors, tv_tensors.Mask(torch.from_numpy(mask.astype(np.uint8))))
        transformed, transformed_mask = out
        sample: dict[str, Any] = {k: v.as_subclass(torch.Tensor) for k, v in transformed.items()}
        sample.update(
            label=self.labels[index],
            mask=transformed_mask.as_subclass(torch.Tensor).bool(),
            group=self.groups[index],
            index=index,
        )
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._store is not None:
            images, masks = self._store
            if not 0 <= index < len(self):
                raise IndexError(f"index {index} out of range for {len(self)} items")
            return self._sample(index, {"image": np.array(images[index])}, np.array(masks[index]))
        rendering = self.render(index)
        return self._sample(index, {"image": rendering.image}, rendering.mask)

    @property
    def _store(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self._store_folder is not None and self._arrays is None:
            self._arrays = (
                np.load(self._store_folder / "images.npy", mmap_mode="r"),
                np.load(self._store_folder / "masks.npy", mmap_mode="r"),
            )
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        # Pickling a memory map copies its data: a worker process maps the store itself instead.
        return {**self.__dict__, "_arrays": None}

    def mask_fraction(self, indices: Sequence[int] | None = None) -> float:
        """Mean fraction of object pixels over the split (or ``indices``): the EPG of a uniform map,
        i.e. the chance level."""
        indices = range(len(self)) if indices is None else indices
        if self._store is not None:
            masks = self._store[1]
            return float(np.mean([masks[i].mean(dtype=np.float64) for i in indices]))
        return float(np.mean([self.render(i).mask.mean() for i in indices]))

    def store_folder(self) -> Path:
        """Where `prerender` keeps this split: the cache, keyed by everything the bytes depend on."""
        # The bytes depend on the sources and on Pillow's resampling too.
        key = (
            "\n".join(f"{d} {p}" for p, d in sorted(read_manifest().items())) + f"\npillow {PIL.__version__}"
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        name = f"{self.split}-{self.variant}-{self.image_size}px-seed{self.seed}-r{RECIPE_VERSION}-{digest}"
        return cache_root() / "tuxbirds-rendered" / name

    def prerender(self, workers: int | None = None, progress: bool = True) -> Path:
        """Render every item of the split once into ``store_folder()`` (``images.npy``, N x S x S x 3
        uint8, and ``masks.npy``, N x S x S bool) unless it is there already; returns the folder.

        The folder appears complete or not at all (written aside, then renamed), so an interrupted
        run renders again instead of reading half a store.
        """
        folder = self.store_folder()
        if (folder / "masks.npy").is_file():
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        # One renderer per store (DDP ranks or parallel runs may start together); the others wait.
        with open(folder.parent / f"{folder.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (folder / "masks.npy").is_file():
                for stale in folder.parent.glob(folder.name + ".*.partial"):  # from a killed run
                    shutil.rmtree(stale, ignore_errors=True)
                self._render_store(folder, workers, progress)
        return folder

    def _render_store(self, folder: Path, workers: int | None, progress: bool) -> None:
        partial = Path(tempfile.mkdtemp(prefix=folder.name + ".", suffix=".partial", dir=folder.parent))
        try:
            size = (len(self), self.image_size, self.image_size)
            np.lib.format.open_memmap(partial / "images.npy", "w+", np.uint8, size + (3,)).flush()
            np.lib.format.open_memmap(partial / "masks.npy", "w+", np.bool_, size).flush()
            self._decode_sources()  # once, before forking: the workers share the decoded photos
            workers = workers or min(len(os.sched_getaffinity(0)), 8)
            chunks = [range(i, min(i + 64, len(self))) for i in range(0, len(self), 64)]
            bar = tqdm(
                total=len(self), desc=f"rendering TuxBirds {self.split}", unit="img", disable=not progress
            )
            context = multiprocessing.get_context("fork")
            # A worker that dies (out of memory, a full disk) fails the pool instead of hanging it.
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                jobs = [pool.submit(_render_chunk, self, partial, c) for c in chunks]
                for job in as_completed(jobs):
                    bar.update(job.result())
            bar.close()
            os.rename(partial, folder)
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    def _decode_sources(self) -> None:
        for kind in BACKGROUNDS:
            for relative, _ in kind:
                _background(self.root / relative)
        for kind in BIRD_FILES:
            for relative in kind:
                _bird(self.root / relative, self.image_size)

    def counterfactual(self, index: int) -> dict[str, Any]:
        """Item ``index`` with two counterfactual images, transformed together with it.

        ``image``: the item itself; ``swapped``: the same bird (pose, size, position: same mask) on a
        background of the other place kind, a fresh crop from the same split's strips (drawn from a
        stream of its own, so it too is a pure function of (seed, split, index)); ``background``: the
        item's own crop with no bird. Also ``mask``, ``label``, ``group``, ``index`` as in an item, and
        ``swapped_group`` (``2 * label + 1 - place``) and ``place``.
        """
        plan = self.plan(index)
        backdrop = self._backdrop(plan.background, plan.crop)
        image, alpha = self._compose(backdrop, plan)
        other, crop = self._crop(self._rng(index, "swap"), 1 - plan.place)
        swapped, _ = self._compose(self._backdrop(other, crop), plan)
        mask = np.rint(alpha * 255.0) >= MASK_THRESHOLD
        sample = self._sample(index, {"image": image, "swapped": swapped, "background": backdrop}, mask)
        sample.update(swapped_group=2 * plan.label + 1 - plan.place, place=plan.place)
        return sample

    def __repr__(self) -> str:
        return (
            f"TuxBirds(split={self.split!r}, variant={self.variant!r}, {len(self)} images, "
            f"image_size={self.image_size}, seed={self.seed})"
        )


def _render_chunk(dataset: TuxBirds, folder: Path, indices: range) -> int:
    images = np.lib.format.open_memmap(folder / "images.npy", "r+")
    masks = np.lib.format.open_memmap(folder / "masks.npy", "r+")
    for index in indices:
        rendering = dataset.render(index)
        images[index] = rendering.image
        masks[index] = rendering.mask
    images.flush()
    masks.flush()
    return len(indices)


def tuxbirds_variant(variant: str) -> Callable[..., TuxBirds]:
    """TuxBirds of one variant in ``build_dataset``'s argument order (root, split, transform);
    root "" or None is the cache. ``build_dataset`` passes ``image_size`` (the images are generated at
    the training size, not resized) and ``prerendered=True``."""

    def build(
        root: str | Path | None = None,
        split: str = "train",
        transform: Callable[..., Any] | None = None,
        **kwargs: Any,
    ) -> TuxBirds:
        return TuxBirds(split, variant, root=root or None, transform=transform, **kwargs)

    return build
