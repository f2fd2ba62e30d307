"""PNG figures of the paper: masks (Fig. 6), GradCAM comparison (Fig. 3), EPG scatter (Fig. 5), mask
evolution (Fig. 7); and a vanilla model's GradCAM beside an AIM model's masks.

Figures are built on `matplotlib.figure.Figure` and saved with the Agg canvas, never through pyplot:
no global backend switch, no open-figure registry, safe in a headless training process.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor

from aim_ext.cache import write_atomic
from aim_ext.data.shifted_centre import DIRECTION_NAMES, ShiftedCentre
from aim_ext.explain.epg import resize_maps
from aim_ext.metrics import merged_mask

Stats = Sequence[float]
PANEL_INCHES = 2.2
DIMMED = 0.25  # brightness of positions a mask switches off
CANDIDATE_COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:orange")  # per shifted-centre direction


def to_display(
    images: Tensor, mean: Stats = IMAGENET_DEFAULT_MEAN, std: Stats = IMAGENET_DEFAULT_STD
) -> np.ndarray:
    """Normalised (N, 3, H, W) or (3, H, W) images -> (N, H, W, 3) float arrays in [0, 1]."""
    x = images.detach().float().cpu()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    x = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    return x.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _upsample_mask(mask: Tensor, size: tuple[int, int]) -> np.ndarray:
    """A (1, h, w) or (h, w) mask -> (H, W) float array, nearest (the masks are cell-wise decisions)."""
    m = mask.detach().float().cpu().reshape(1, 1, *mask.shape[-2:])
    return F.interpolate(m, size=size, mode="nearest")[0, 0].numpy()


def _show(ax: Axes, image: np.ndarray, title: str = "") -> None:
    ax.imshow(image)
    ax.set_title(_drawable(title), fontsize=8)
    ax.set_axis_off()


def _drawable(text: str) -> str:
    """Text matplotlib can draw: a non-UTF-8 name's bytes (lone surrogates, which its font code
    refuses) as \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _masked(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with switched-off positions dimmed, so the mask reads against the content."""
    return image * (DIMMED + (1 - DIMMED) * mask[..., None])


def _stage_mask_panels(
    axes: Sequence[Axes],
    image: np.ndarray,
    stage_masks: Sequence[Tensor],
    names: Sequence[str],
    prefix: str = "",
) -> None:
    """One image's stage masks (each (1, h, w), top stage first), then their merge, one panel each,
    titled with the stage name, (with `prefix`: the mask's size) and the active share."""
    merged = merged_mask([m.unsqueeze(0) for m in stage_masks])[0]
    size = image.shape[:2]
    for ax, name, mask in zip(axes, [*names, "merged"], [*stage_masks, merged], strict=True):
        shape = "" if prefix or name == "merged" else f" {tuple(mask.shape[-2:])}"
        title = f"{prefix}{name}{shape} {mask.float().mean().item():.0%}"
        _show(ax, _masked(image, _upsample_mask(mask, size)), title)


def _stage_names(stage_names: Sequence[str] | None, count: int) -> list[str]:
    names = list(stage_names) if stage_names is not None else [f"stage {i}" for i in range(count)]
    if len(names) != count:
        raise ValueError(f"{len(names)} stage names for {count} masks")
    return names


def _save(fig: Figure, path: str | Path) -> Path:
    """The figure as a PNG at ``path``, written whole or not at all (a full disk leaves the old file)."""
    FigureCanvasAgg(fig)
    png = io.BytesIO()
    fig.savefig(png, dpi=100, format="png")
    return write_atomic(Path(path), png.getvalue())


def _grid(rows: int, cols: int) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(PANEL_INCHES * cols, PANEL_INCHES * rows), layout="constrained")
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    return fig, axes


def mask_figure(
    images: Tensor,
    masks: Sequence[Tensor],
    path: str | Path,
    *,
    stage_names: Sequence[str] | None = None,
    max_images: int = 4,
    mean: Stats = IMAGENET_DEFAULT_MEAN,
    std: Stats = IMAGENET_DEFAULT_STD,
) -> Path:
    """Image | per-stage masks (top stage first) | merged mask, one row per image (paper Fig. 6)."""
    shown = to_display(images[:max_images], mean, std)
    names = _stage_names(stage_names, len(masks))
    fig, axes = _grid(len(shown), len(masks) + 2)
    for row, image in enumerate(shown):
        _show(axes[row, 0], image, "image")
        _stage_mask_panels(axes[row, 1:], image, [m[row] for m in masks], names)
    return _save(fig, path)


def _overlay(ax: Axes, image: np.ndarray, heat: np.ndarray, title: str, mask: np.ndarray | None) -> None:
    peak = heat.max()
    ax.imshow(image)
    ax.imshow(heat / peak if peak > 0 else heat, cmap="jet", alpha=0.5, vmin=0, vmax=1)
    if mask is not None:
        ax.contour(mask.astype(float), levels=[0.5], colors="white", linewidths=0.8)
    ax.set_title(_drawable(title), fontsize=8)
    ax.set_axis_off()


def gradcam_comparison(
    images: Tensor,
    maps_a: Tensor,
    maps_b: Tensor,
    epg_a: Tensor,
    epg_b: Tensor,
    path: str | Path,
    *,
    labels: tuple[str, str] = ("vanilla", "AIM"),
    masks: Tensor | None = None,
    max_images: int = 4,
    mean: Stats = IMAGENET_DEFAULT_MEAN,
    std: Stats = IMAGENET_DEFAULT_STD,
) -> Path:
    """Image | map of run A | map of run B per row, each map titled with its EPG (paper Fig. 3).

    Maps of any resolution are resized bilinearly to the image, as EPG scores them; `masks`
    (N, H, W) bool, when given, are outlined.
    """
    shown = to_display(images[:max_images], mean, std)
    size = shown.shape[1:3]
    heats = [resize_maps(m[: len(shown)].detach().cpu(), size).clamp_min(0).numpy() for m in (maps_a, maps_b)]
    scores = [torch.as_tensor(e).reshape(-1)[: len(shown)].tolist() for e in (epg_a, epg_b)]
    fig, axes = _grid(len(shown), 3)
    for row, image in enumerate(shown):
        outline = masks[row].detach().cpu().reshape(size).numpy() if masks is not None else None
        _show(axes[row, 0], image, "image")
        for col, (label, heat, score) in enumerate(zip(labels, heats, scores, strict=True), start=1):
            _overlay(axes[row, col], image, heat[row], f"{label}  EPG {score[row]:.2f}", outline)
    return _save(fig, path)


def gradcam_beside_masks(
    images: Tensor,
    maps: Tensor,
    epg: Tensor,
    stage_masks: Sequence[Tensor],
    path: str | Path,
    *,
    labels: tuple[str, str] = ("vanilla", "AIM"),
    stage_names: Sequence[str] | None = None,
    masks: Tensor | None = None,
    max_images: int = 4,
    mean: Stats = IMAGENET_DEFAULT_MEAN,
    std: Stats = IMAGENET_DEFAULT_STD,
) -> Path:
    """Image | run A's attribution map (titled with its EPG) | run B's AIM masks, each stage's and
    the merged one, per row: what a vanilla model's explanation shows beside what AIM's decision
    can use at all. `masks` (N, H, W) bool, when given, outline the object."""
    shown = to_display(images[:max_images], mean, std)
    size = shown.shape[1:3]
    heat = resize_maps(maps[: len(shown)].detach().cpu(), size).clamp_min(0).numpy()
    scores = torch.as_tensor(epg).reshape(-1)[: len(shown)].tolist()
    names = _stage_names(stage_names, len(stage_masks))
    fig, axes = _grid(len(shown), len(stage_masks) + 3)
    for row, image in enumerate(shown):
        outline = masks[row].detach().cpu().reshape(size).numpy() if masks is not None else None
        _show(axes[row, 0], image, "image")
        _overlay(axes[row, 1], image, heat[row], f"{labels[0]} GradCAM  EPG {scores[row]:.2f}", outline)
        _stage_mask_panels(axes[row, 2:], image, [m[row] for m in stage_masks], names, prefix=f"{labels[1]} ")
    return _save(fig, path)


def epg_scatter(
    epg_a: Tensor, epg_b: Tensor, path: str | Path, *, labels: tuple[str, str] = ("vanilla", "AIM")
) -> Path:
    """Per-sample EPG of run A (x) against run B (y) with the diagonal (paper Fig. 5)."""
    a = torch.as_tensor(epg_a).detach().float().cpu().reshape(-1).numpy()
    b = torch.as_tensor(epg_b).detach().float().cpu().reshape(-1).numpy()
    if a.shape != b.shape:
        raise ValueError(f"{a.size} EPG values for {labels[0]} but {b.size} for {labels[1]}")
    fig = Figure(figsize=(4.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(a, b, s=8, alpha=0.6)
    ax.plot([0, 1], [0, 1], color="black", linewidth=0.8, linestyle="--")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel(f"EPG {labels[0]} (mean {a.mean():.3f})")
    ax.set_ylabel(f"EPG {labels[1]} (mean {b.mean():.3f})")
    above = float((b > a).mean()) if a.size else 0.0
    ax.set_title(f"{a.size} images, {above:.0%} above the diagonal", fontsize=9)
    return _save(fig, path)


def mask_evolution(
    masks_by_epoch: Mapping[int, Tensor | Sequence[Tensor]],
    image: Tensor,
    path: str | Path,
    *,
    mean: Stats = IMAGENET_DEFAULT_MEAN,
    std: Stats = IMAGENET_DEFAULT_STD,
) -> Path:
    """One image and its mask at each saved epoch, left to right (paper Fig. 7).

    Each value is that image's merged mask ((h, w), (1, h, w) or (1, 1, h, w)) or its list of
    stage masks, top stage first, which are merged here.
    """
    shown = to_display(image, mean, std)[0]
    size = shown.shape[:2]
    epochs = sorted(masks_by_epoch)
    fig, axes = _grid(1, len(epochs) + 1)
    _show(axes[0, 0], shown, "image")
    for col, epoch in enumerate(epochs, start=1):
        value = masks_by_epoch[epoch]
        if not isinstance(value, Tensor):
            value = merged_mask([m.reshape(1, 1, *m.shape[-2:]) for m in value])
        mask = value.reshape(value.shape[-2:])
        _show(
            axes[0, col],
            _masked(shown, _upsample_mask(mask, size)),
            f"epoch {epoch}  {mask.float().mean().item():.0%}",
        )
    return _save(fig, path)


def shifted_crops_figure(dataset: ShiftedCentre, indices: Sequence[int], path: str | Path) -> Path:
    """The shifted-centre test's crops (the paper's Figure 10): for each image, its evaluation
    frame with the four candidate crops (a dot at each centre; the chosen one solid), then the
    crop the model sees."""
    fig, axes = _grid(len(indices), 2)
    for row, index in zip(axes, indices, strict=True):
        sample = dataset.frame(index)
        frame = to_display(sample["image"], dataset.mean, dataset.std)[0]
        row[0].imshow(frame)
        chosen = dataset.directions[index]
        for k, (y, x) in enumerate(dataset.candidate_centres(sample["mask"])):
            side = dataset.image_size
            solid = k == chosen
            row[0].add_patch(
                Rectangle(
                    (x - side / 2, y - side / 2),
                    side,
                    side,
                    fill=False,
                    edgecolor=CANDIDATE_COLOURS[k],
                    linewidth=2.5 if solid else 1.0,
                    linestyle="-" if solid else "--",
                )
            )
            row[0].plot(x, y, "o", color=CANDIDATE_COLOURS[k], markersize=6 if solid else 3)
        row[0].set_title(f"image {index}: frame and candidates", fontsize=8)
        row[0].set_axis_off()
        row[1].imshow(to_display(dataset[index]["image"], dataset.mean, dataset.std)[0])
        row[1].set_title(f"shifted {dataset.deviation:g} ({DIRECTION_NAMES[chosen]})", fontsize=8)
        row[1].set_axis_off()
    return _save(fig, path)
