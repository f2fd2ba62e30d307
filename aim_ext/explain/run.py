"""A training run opened for evaluation: its config, its model with a checkpoint loaded, and the
dataset split to evaluate. A run folder is what `aim_ext.engine.fit` writes: config.yaml,
best.pt/last.pt, metrics.jsonl and, for AIM runs, masks/epoch_XXXX.pt snapshots of a fixed
validation batch."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from aim_ext.engine import TrainConfig, build_model, build_split, data_config, load_config, resolve_device
from aim_ext.explain.attributions import METHODS
from aim_ext.models import MaskingModel, load_checkpoint, load_model, load_model_state
from aim_ext.models.saved import CONFIG_FILE, WEIGHTS_FILE


class EvalError(RuntimeError):
    """A run cannot be evaluated as asked (missing folder, config or checkpoint; mismatched runs)."""


@dataclass
class EvalOptions:
    """How to evaluate: which checkpoint and split, attribution methods and targets, limits."""

    checkpoint: str = "best"
    split: str = "test"
    methods: Sequence[str] = METHODS
    target: str = "label"
    batch_size: int = 32  # attributions need a backward pass: not the (large) training batch
    max_images: int | None = None
    figures: int = 4
    device: str = "auto"
    num_workers: int | None = None  # None: the run's setting
    counterfactuals: bool = True  # TuxBirds: background-swap and background-only rates
    counterfactual_images: int | None = None  # None: every evaluated image
    # Another dataset than the run's (required for a saved model, which names none): its name,
    # root and, for Waterbirds and TravelingBirds, the CUB tree.
    dataset: str | None = None
    data_root: str | None = None
    cub_root: str | None = None

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise EvalError(f"unknown attribution methods {unknown}; choose from {', '.join(METHODS)}")
        if self.target not in ("label", "pred"):
            raise EvalError(f"target must be 'label' or 'pred', got {self.target!r}")
        if self.counterfactual_images is not None and self.counterfactual_images < 1:
            raise EvalError(f"counterfactual_images must be at least 1, got {self.counterfactual_images}")
        if self.split not in ("test", "val"):
            raise EvalError(f"split must be 'test' or 'val', got {self.split!r}")
        self.methods = tuple(dict.fromkeys(self.methods))


@dataclass
class Run:
    """A training run ready to evaluate: its config, model with the checkpoint loaded, and dataset."""

    folder: Path
    cfg: TrainConfig
    checkpoint: Path
    epoch: int | None
    model: nn.Module
    dataset: Dataset
    split: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    train_group_counts: dict[int, int] | None

    @property
    def name(self) -> str:
        return self.folder.resolve().name

    @property
    def is_aim(self) -> bool:
        return isinstance(self.model, MaskingModel)

    @property
    def stage_names(self) -> list[str]:
        """AIM stage names, top stage first, after the backbone feature stages they mask."""
        return [f"stage_{i}" for i in self.model.stage_indices] if self.is_aim else []


def _checkpoint_path(folder: Path, checkpoint: str) -> Path:
    path = folder / f"{checkpoint}.pt" if checkpoint in ("best", "last") else Path(checkpoint)
    if not path.is_file():
        found = sorted(p.name for p in folder.glob("*.pt"))
        raise EvalError(
            f"checkpoint not found: {path} (checkpoints in {folder}: {', '.join(found) or 'none'})"
        )
    return path


def open_run(folder: str | Path, options: EvalOptions) -> Run:
    """Load a run's config and checkpoint (or a saved model), build its model and the dataset
    split to evaluate."""
    folder = Path(folder)
    if folder.is_file():
        raise EvalError(
            f"{folder} is a file: give the run folder (aim-train's --out) or a saved model's folder; "
            "--checkpoint picks a checkpoint file"
        )
    if not folder.is_dir():
        raise EvalError(f"run folder not found: {folder}")
    if (folder / CONFIG_FILE).is_file():
        return _open_saved_model(folder, options)
    config = folder / "config.yaml"
    if not config.is_file():
        raise EvalError(
            f"no config.yaml in {folder}: not a run folder written by aim-train, nor a saved model"
        )
    try:
        cfg = _with_dataset(load_config(config), options)
    except ValueError as error:
        raise EvalError(str(error) if str(config) in str(error) else f"{config}: {error}") from error
    path = _checkpoint_path(folder, options.checkpoint)
    # The checkpoint replaces every weight: never fetch or read the pretrained ones again.
    cfg = dataclasses.replace(cfg, pretrained=False, pretrained_file=None)
    data = data_config(cfg)
    dataset = build_split(cfg, options.split, data)
    model = build_model(cfg, num_classes=dataset.num_classes)
    try:
        state = load_checkpoint(path)
        load_model_state(model, state, source=str(path))
    except (ValueError, RuntimeError) as error:  # RuntimeError: tensor sizes (e.g. number of classes)
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise EvalError(text if str(path) in text else f"cannot load {path}: {text}") from error
    return _ready(folder, cfg, path, state.get("epoch"), model, dataset, data, options)


def _open_saved_model(folder: Path, options: EvalOptions) -> Run:
    """A saved model (aim_ext.save_pretrained) on the dataset the options name."""
    if options.dataset is None:
        raise EvalError(f"{folder} is a saved model, which names no data: give --dataset (and --data-root)")
    try:
        model = load_model(folder)
    except ValueError as error:
        raise EvalError(str(error)) from None
    pretrained = model.pretrained_cfg
    cfg = TrainConfig(
        model=model.backbone_name if isinstance(model, MaskingModel) else pretrained["architecture"],
        stop_stage=getattr(model, "stop_stage", None),
        image_size=pretrained["input_size"][-1],
        num_workers=0,
    )
    cfg = _with_dataset(cfg, options)
    data = {"mean": pretrained["mean"], "std": pretrained["std"]}
    dataset = build_split(cfg, options.split, data)
    if dataset.num_classes != model.num_classes:
        raise EvalError(
            f"{folder} classifies {model.num_classes} classes; {cfg.dataset} at {cfg.data_root} has "
            f"{dataset.num_classes}"
        )
    epoch = json.loads((folder / CONFIG_FILE).read_text()).get("training") or {}
    return _ready(
        folder, cfg, folder / WEIGHTS_FILE, epoch.get("selected_epoch"), model, dataset, data, options
    )


def _with_dataset(cfg: TrainConfig, options: EvalOptions) -> TrainConfig:
    if options.dataset is None:
        return cfg
    changes = {"dataset": options.dataset, "data_root": options.data_root or ""}
    if options.cub_root:
        changes["cub_root"] = options.cub_root
    return dataclasses.replace(cfg, **changes)


def _ready(folder, cfg, path, epoch, model, dataset, data, options: EvalOptions) -> Run:
    device = resolve_device(options.device)
    # Attributions need gradients of activations and inputs only, never of the weights: skipping
    # the weight gradients saves a third of the backward pass.
    model.to(device).eval().requires_grad_(False)
    train_counts = None
    if getattr(dataset, "groups", None) is not None:
        # Only the training split's groups are read: a generated dataset need not be rendered.
        train_groups = build_split(cfg, "train", data, prerender=False).groups
        train_counts = {g: train_groups.count(g) for g in sorted(set(train_groups))}
    mean, std = tuple(data["mean"]), tuple(data["std"])
    return Run(folder, cfg, path, epoch, model, dataset, options.split, mean, std, device, train_counts)
